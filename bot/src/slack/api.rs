//! Calls out to Slack: the `response_url` follow-up of a slash command, and
//! `chat.postMessage` through slack-morphism's Web API client, whose base URL
//! is configurable (tests point it at a local recorder).

use std::time::Duration;

use slack_morphism::prelude::*;

use crate::command::{Reply, render_slack};

/// Errors calling Slack.
#[derive(Debug, thiserror::Error)]
pub enum SlackApiError {
    #[error("response_url {0:?} is not a Slack URL this bot accepts")]
    ForeignResponseUrl(String),
    #[error("posting to response_url failed: {0}")]
    Respond(String),
    #[error("chat.postMessage failed: {0}")]
    Post(String),
    #[error("chat.postMessage was rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// Slack's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("chat.postMessage did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("no bot token configured (SLACK_BOT_TOKEN); cannot post to channels")]
    NoBotToken,
    #[error("cannot build the HTTPS client: {0}")]
    Tls(String),
}

/// Longest wait for any call to Slack.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl SlackApiError {
    /// How long Slack asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// Wait before the second attempt at a `response_url` follow-up (the third,
/// in plain text, waits twice as long).
const RESPOND_RETRY: Duration = Duration::from_millis(500);
/// Wait between the posts of a long reply.
const PART_SPACING: Duration = Duration::from_secs(1);
/// Attempts at a rate-limited later post of a long reply.
const PART_ATTEMPTS: u32 = 3;
/// Longest wait for a rate-limited later post of a long reply.
const MAX_PART_WAIT: Duration = Duration::from_secs(30);
/// Longest plain-text follow-up.
const MAX_PLAIN_CHARS: usize = 3000;

/// A follow-up without blocks: the reply as plain text, escaped.
fn plain_response(reply: &Reply, rendered: &serde_json::Value) -> serde_json::Value {
    let text = crate::command::render_text::render(reply);
    let mut text: String = render_slack::escape(text.trim_end()).chars().take(MAX_PLAIN_CHARS).collect();
    if let Some(amp) = text.rfind('&')
        && !text[amp..].contains(';')
    {
        text.truncate(amp);
    }
    serde_json::json!({"response_type": rendered["response_type"], "text": text})
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
/// slack-morphism's connector over our rustls connector.
pub type HyperConnector = SlackClientHyperConnector<Connector>;
/// slack-morphism's client over our rustls connector.
pub type WebClient = SlackClient<HyperConnector>;

/// A Web API client for `api_url` (plain HTTP is allowed so tests can point it at a local recorder).
pub fn web_client(api_url: &str) -> Result<std::sync::Arc<WebClient>, SlackApiError> {
    mesh_listener::gateway::install_tls_provider();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| SlackApiError::Tls(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .build();
    let connector =
        SlackClientHyperConnector::with_connector(connector).with_slack_api_url(api_url.trim_end_matches('/'));
    Ok(std::sync::Arc::new(SlackClient::new(connector)))
}

/// The Slack side of the bot.
#[derive(Clone)]
pub struct SlackApi {
    http: reqwest::Client,
    web: Option<(std::sync::Arc<WebClient>, SlackApiToken)>,
    response_url_prefix: String,
}

impl std::fmt::Debug for SlackApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackApi")
            .field("web_api", &self.web.is_some())
            .field("response_url_prefix", &self.response_url_prefix)
            .finish()
    }
}

impl SlackApi {
    /// A client for `api_url` (`https://slack.com/api` in production) with an
    /// optional bot token; follow-ups only go to URLs under `response_url_prefix`.
    pub fn new(api_url: &str, bot_token: Option<String>, response_url_prefix: String) -> Result<Self, SlackApiError> {
        mesh_listener::gateway::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SlackApiError::Tls(e.to_string()))?;
        let web = match bot_token {
            Some(token) => Some((web_client(api_url)?, SlackApiToken::new(SlackApiTokenValue(token)))),
            None => None,
        };
        Ok(Self { http, web, response_url_prefix })
    }

    /// True when a `response_url` from a verified request may be called.
    pub fn accepts_response_url(&self, url: &str) -> bool {
        response_url_allowed(&self.response_url_prefix, url)
    }

    /// Posts a reply to a slash command's `response_url`; tried again once
    /// after a failure, then sent as plain text (a message Slack refused for
    /// its blocks still arrives), so "working on ..." is never left alone.
    pub async fn respond(&self, response_url: &str, reply: &Reply) -> Result<(), SlackApiError> {
        if !self.accepts_response_url(response_url) {
            return Err(SlackApiError::ForeignResponseUrl(response_url.chars().take(60).collect()));
        }
        let rendered = render_slack::render(reply);
        let mut failure = match self.send_response(response_url, &rendered).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        for (wait, body) in [(RESPOND_RETRY, rendered.clone()), (RESPOND_RETRY * 2, plain_response(reply, &rendered))] {
            tracing::warn!(error = %failure, retry_in = ?wait, "slack follow-up failed; trying again");
            tokio::time::sleep(wait).await;
            match self.send_response(response_url, &body).await {
                Ok(()) => return Ok(()),
                Err(e) => failure = e,
            }
        }
        Err(failure)
    }

    /// Answers a click on `response_url`: with `replace`, the clicked
    /// message becomes `reply` (`replace_original: true`: its buttons go);
    /// otherwise `reply` is a new message beside it (ephemeral when the reply
    /// is). Tried again once after a failure.
    pub async fn respond_click(&self, response_url: &str, reply: &Reply, replace: bool) -> Result<(), SlackApiError> {
        if !self.accepts_response_url(response_url) {
            return Err(SlackApiError::ForeignResponseUrl(response_url.chars().take(60).collect()));
        }
        let body = render_slack::render_response(reply, replace);
        match self.send_response(response_url, &body).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?RESPOND_RETRY, "slack click answer failed; trying again");
                tokio::time::sleep(RESPOND_RETRY).await;
                self.send_response(response_url, &body).await
            }
        }
    }

    async fn send_response(&self, response_url: &str, body: &serde_json::Value) -> Result<(), SlackApiError> {
        let response = self
            .http
            .post(response_url)
            .json(body)
            .send()
            .await
            .map_err(|e| SlackApiError::Respond(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(SlackApiError::Respond(format!("HTTP {}", response.status().as_u16())));
        }
        Ok(())
    }

    /// Posts a reply in a channel (in a thread when `thread_ts` is given); returns the message ts.
    pub async fn post(&self, channel: &str, reply: &Reply, thread_ts: Option<&str>) -> Result<String, SlackApiError> {
        self.post_with_fallback(channel, reply, thread_ts, None).await
    }

    /// Like [`SlackApi::post`], with `fallback` (plain text, escaped here) as
    /// the message's `text`, what notifications on phones show.
    pub async fn post_with_fallback(
        &self,
        channel: &str,
        reply: &Reply,
        thread_ts: Option<&str>,
        fallback: Option<&str>,
    ) -> Result<String, SlackApiError> {
        let mut first_ts = None;
        // A long reply is several posts, in the same thread, one per second (Slack's pace for a channel).
        for (i, rendered) in render_slack::render_posts(reply).into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(PART_SPACING).await;
            }
            let text = match (i, fallback) {
                (0, Some(fallback)) => render_slack::escape(fallback),
                _ => rendered["text"].as_str().unwrap_or_default().to_owned(),
            };
            let mut attempt = 0;
            let ts = loop {
                match self.post_one(channel, &rendered, text.clone(), thread_ts).await {
                    Err(SlackApiError::RateLimited { retry_after }) if i > 0 && attempt < PART_ATTEMPTS => {
                        attempt += 1;
                        tokio::time::sleep(retry_after.unwrap_or(PART_SPACING).min(MAX_PART_WAIT)).await;
                    }
                    other => break other?,
                }
            };
            first_ts.get_or_insert(ts);
        }
        Ok(first_ts.unwrap_or_default())
    }

    /// One `chat.postMessage` of a rendered message with `text` as its fallback.
    async fn post_one(
        &self,
        channel: &str,
        rendered: &serde_json::Value,
        text: String,
        thread_ts: Option<&str>,
    ) -> Result<String, SlackApiError> {
        let (client, token) = self.web.as_ref().ok_or(SlackApiError::NoBotToken)?;
        let blocks: Vec<SlackBlock> = serde_json::from_value(rendered["blocks"].clone()).unwrap_or_default();
        let content = SlackMessageContent::new().with_text(text).with_blocks(blocks);
        let mut request = SlackApiChatPostMessageRequest::new(SlackChannelId(channel.to_owned()), content);
        if let Some(ts) = thread_ts {
            request = request.with_thread_ts(SlackTs(ts.to_owned()));
        }
        let session = client.open_session(token);
        let response = tokio::time::timeout(CALL_TIMEOUT, session.chat_post_message(&request))
            .await
            .map_err(|_| SlackApiError::TimedOut(CALL_TIMEOUT))?
            .map_err(|e| match e {
                slack_morphism::errors::SlackClientError::RateLimitError(limited) => {
                    SlackApiError::RateLimited { retry_after: limited.retry_after }
                }
                other => SlackApiError::Post(other.to_string()),
            })?;
        Ok(response.ts.0)
    }

    /// True when a bot token is configured.
    pub fn can_post(&self) -> bool {
        self.web.is_some()
    }
}

/// True when `url` is under `prefix` as a URL, not only as a string: same
/// scheme, host and port, a path under the prefix's path, and no user info
/// (so `https://hooks.slack.com.evil.net/` never passes for a prefix written
/// without its final slash).
pub fn response_url_allowed(prefix: &str, url: &str) -> bool {
    let (Ok(prefix), Ok(parsed)) = (url::Url::parse(prefix), url::Url::parse(url)) else { return false };
    parsed.scheme() == prefix.scheme()
        && parsed.host_str() == prefix.host_str()
        && parsed.port_or_known_default() == prefix.port_or_known_default()
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path().starts_with(prefix.path())
        && !url.contains('@')
}

#[cfg(test)]
mod tests {
    use super::response_url_allowed;

    #[test]
    fn response_urls_stay_under_the_prefix() {
        for prefix in ["https://hooks.slack.com/", "https://hooks.slack.com"] {
            assert!(response_url_allowed(prefix, "https://hooks.slack.com/commands/T1/2/abc"), "{prefix}");
            for bad in [
                "https://hooks.slack.com.evil.net/commands/T1",
                "https://hooks.slack.com@evil.net/commands",
                "https://user:pw@hooks.slack.com/commands",
                "http://hooks.slack.com/commands",
                "https://hooks.slack.com:8443/commands",
                "https://evil.net/https://hooks.slack.com/",
                "not a url",
                "",
            ] {
                assert!(!response_url_allowed(prefix, bad), "{prefix} accepted {bad}");
            }
        }
        assert!(!response_url_allowed("https://hooks.slack.com/commands/", "https://hooks.slack.com/other/x"));
    }
}
