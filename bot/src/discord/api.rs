//! Calls out to Discord's REST API: editing an interaction's original answer
//! and sending its follow-ups, channel posts (gateway replies and
//! notifications), and registering the `/mesh` application command. The base
//! URL is configurable (tests point it at a local recorder); requests are
//! spaced under Discord's global limit (50 per second) and a 429 is waited
//! out as `retry_after` says. Interaction tokens sit in URL paths, so no URL
//! ever reaches an error or a log line.

use std::sync::Arc;
use std::time::Duration;

use mesh_protocol::Secret;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::command::{Reply, render_discord};

/// Discord's API base URL.
pub const DEFAULT_API_URL: &str = "https://discord.com/api/v10";
/// Least time between two requests (Discord allows about 50 per second in all).
pub const MIN_SPACING: Duration = Duration::from_millis(20);
/// How often a request answered 429 is tried again.
const MAX_RETRIES: u32 = 3;
/// How often an edit of a deferred answer is tried when Discord does not know it yet.
const EDIT_ATTEMPTS: u32 = 3;
/// Wait before the next try of such an edit (times the attempt number).
const EDIT_RETRY_AFTER: Duration = Duration::from_millis(250);
/// Longest wait for a 429 before giving up.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Errors calling Discord.
#[derive(Debug, thiserror::Error)]
pub enum DiscordApiError {
    #[error("{what} failed: {detail}")]
    Request { what: &'static str, detail: String },
    #[error("{what} failed: HTTP {status} {body}")]
    Status { what: &'static str, status: u16, body: String },
    #[error("{what} was rate limited {MAX_RETRIES} times by Discord; gave up")]
    RateLimited { what: &'static str },
    #[error("no bot token configured (DISCORD_BOT_TOKEN); cannot {0}")]
    NoBotToken(&'static str),
    #[error("no application id configured (DISCORD_APPLICATION_ID); cannot register the /mesh command")]
    NoApplicationId,
    #[error("cannot build the HTTPS client: {0}")]
    Tls(String),
}

/// The Discord side of the bot.
#[derive(Clone)]
pub struct DiscordApi {
    http: reqwest::Client,
    base: String,
    bot_token: Option<Arc<Secret>>,
    application_id: Option<String>,
    next_slot: Arc<Mutex<tokio::time::Instant>>,
}

impl std::fmt::Debug for DiscordApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordApi")
            .field("base", &self.base)
            .field("bot_token", &self.bot_token.is_some())
            .field("application_id", &self.application_id)
            .finish()
    }
}

impl DiscordApi {
    /// A client for `api_url` (`https://discord.com/api/v10` in production).
    pub fn new(
        api_url: &str,
        bot_token: Option<Secret>,
        application_id: Option<String>,
    ) -> Result<Self, DiscordApiError> {
        mesh_listener::gateway::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "DiscordBot (https://github.com/agent-mesh/agent-mesh, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .build()
            .map_err(|e| DiscordApiError::Tls(e.to_string()))?;
        Ok(Self {
            http,
            base: api_url.trim_end_matches('/').to_owned(),
            bot_token: bot_token.map(Arc::new),
            application_id,
            next_slot: Arc::new(Mutex::new(tokio::time::Instant::now())),
        })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// True when a bot token is configured (channel posts, command registration).
    pub fn can_post(&self) -> bool {
        self.bot_token.is_some()
    }

    /// Replaces an interaction's original (deferred) answer with `reply`. A
    /// fast command can finish before Discord has taken the deferred answer
    /// (the edit then meets 404 Unknown Message): that is tried again shortly.
    pub async fn edit_original(&self, application_id: &str, token: &str, reply: &Reply) -> Result<(), DiscordApiError> {
        let path = format!("/webhooks/{application_id}/{token}/messages/@original");
        let mut messages = render_discord::render_messages(reply).into_iter();
        let body = messages.next().unwrap_or_else(|| render_discord::render(reply));
        let mut attempt = 1;
        loop {
            let sent = self.send("editing the interaction answer", reqwest::Method::PATCH, &path, body.clone(), false);
            match sent.await {
                Err(DiscordApiError::Status { status: 404, .. }) if attempt < EDIT_ATTEMPTS => {
                    tokio::time::sleep(EDIT_RETRY_AFTER * attempt).await;
                    attempt += 1;
                }
                result => {
                    result?;
                    break;
                }
            }
        }
        // What one message cannot hold continues in follow-ups.
        self.follow_up_messages(application_id, token, messages, reply.ephemeral).await
    }

    /// Replaces the message a button was clicked on (after a type 6 answer)
    /// with `reply`, its buttons with the reply's own (none: removed).
    pub async fn edit_original_update(
        &self,
        application_id: &str,
        token: &str,
        reply: &Reply,
    ) -> Result<(), DiscordApiError> {
        let path = format!("/webhooks/{application_id}/{token}/messages/@original");
        let body = render_discord::render_update(reply);
        self.send("editing the clicked message", reqwest::Method::PATCH, &path, body, false).await.map(drop)
    }

    /// Answers an interaction that came over the gateway (which, unlike the
    /// HTTP endpoint, has no response body to answer in) with `answer`: the
    /// same JSON the HTTP endpoint would have returned (type 7, 6 or 4).
    pub async fn interaction_callback(
        &self,
        interaction_id: &str,
        token: &str,
        answer: Value,
    ) -> Result<(), DiscordApiError> {
        let path = format!("/interactions/{interaction_id}/{token}/callback");
        self.send("answering the interaction", reqwest::Method::POST, &path, answer, false).await.map(drop)
    }

    /// Sends a follow-up message to an interaction (an `ask` answer), in several when long.
    pub async fn follow_up(&self, application_id: &str, token: &str, reply: &Reply) -> Result<(), DiscordApiError> {
        self.follow_up_messages(application_id, token, render_discord::render_messages(reply), reply.ephemeral).await
    }

    async fn follow_up_messages(
        &self,
        application_id: &str,
        token: &str,
        messages: impl IntoIterator<Item = Value>,
        ephemeral: bool,
    ) -> Result<(), DiscordApiError> {
        let path = format!("/webhooks/{application_id}/{token}");
        for mut body in messages {
            // A follow-up is public unless flagged, whatever the deferred answer was.
            if ephemeral {
                body["flags"] = json!(render_discord::EPHEMERAL_FLAG);
            }
            self.send("the interaction follow-up", reqwest::Method::POST, &path, body, false).await?;
        }
        Ok(())
    }

    /// Posts `reply` in a channel (or thread), as an answer to `reply_to` when
    /// given; returns the new message's id.
    /// A long reply is several messages, each after the one before.
    pub async fn post(&self, channel: &str, reply: &Reply, reply_to: Option<&str>) -> Result<String, DiscordApiError> {
        let path = format!("/channels/{channel}/messages");
        let mut first = None;
        let mut reply_to = reply_to.map(str::to_owned);
        for mut body in render_discord::render_messages(reply) {
            if let Some(message) = &reply_to {
                body["message_reference"] = json!({"message_id": message, "fail_if_not_exists": false});
            }
            let answer = self.send("posting to the channel", reqwest::Method::POST, &path, body, true).await?;
            let id = answer["id"].as_str().unwrap_or_default().to_owned();
            if !id.is_empty() {
                reply_to = Some(id.clone());
            }
            first.get_or_insert(id);
        }
        Ok(first.unwrap_or_default())
    }

    /// Replaces the bot's own message `message` in `channel` (a prompt posted
    /// in answer to `!mesh`) with `reply`, its buttons with the reply's own (none: removed).
    pub async fn edit_message(&self, channel: &str, message: &str, reply: &Reply) -> Result<(), DiscordApiError> {
        let path = format!("/channels/{channel}/messages/{message}");
        let body = render_discord::render_update(reply);
        self.send("editing the channel message", reqwest::Method::PATCH, &path, body, true).await.map(drop)
    }

    /// Creates or updates the global `/mesh` command. Discord treats a create
    /// with an existing name as an update, so this is idempotent.
    pub async fn register_command(&self) -> Result<(), DiscordApiError> {
        let application_id = self.application_id.as_deref().ok_or(DiscordApiError::NoApplicationId)?;
        let path = format!("/applications/{application_id}/commands");
        self.send("registering /mesh", reqwest::Method::POST, &path, command_definition(), true).await.map(drop)
    }

    async fn send(
        &self,
        what: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Value,
        as_bot: bool,
    ) -> Result<Value, DiscordApiError> {
        let token = match (as_bot, &self.bot_token) {
            (true, Some(token)) => Some(token.clone()),
            (true, None) => return Err(DiscordApiError::NoBotToken(what)),
            (false, _) => None,
        };
        let url = format!("{}{path}", self.base);
        for _ in 0..=MAX_RETRIES {
            self.wait_for_slot().await;
            let mut request = self.http.request(method.clone(), &url).json(&body);
            if let Some(token) = &token {
                request = request.header(reqwest::header::AUTHORIZATION, format!("Bot {}", token.expose()));
            }
            let response = request
                .send()
                .await
                .map_err(|e| DiscordApiError::Request { what, detail: e.without_url().to_string() })?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_wait(&text);
                if wait > MAX_RETRY_WAIT {
                    break;
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            if !status.is_success() {
                let body: String = text.chars().take(200).collect();
                return Err(DiscordApiError::Status { what, status: status.as_u16(), body });
            }
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        Err(DiscordApiError::RateLimited { what })
    }

    /// Spaces requests [`MIN_SPACING`] apart across every task of this client.
    async fn wait_for_slot(&self) {
        let at = {
            let mut next = self.next_slot.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + MIN_SPACING;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The `/mesh` application command: one free-text option, the command line.
pub fn command_definition() -> Value {
    json!({
        "name": "mesh",
        "type": 1,
        "description": "Drive the agent mesh: send, broadcast, ping, status, kill, ask (try: help)",
        "options": [{
            "type": 3,
            "name": "command",
            "description": "the command line, e.g. \"send nova deploy done\" or \"help\"",
            "required": false,
        }],
    })
}
/// How long a 429 answer asks to wait: its `retry_after` in seconds, or 1 s
/// when it is missing, negative or not a finite number (never a panic).
fn retry_wait(body: &str) -> Duration {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["retry_after"].as_f64())
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_without_ever_panicking() {
        assert_eq!(retry_wait(r#"{"retry_after": 0.25}"#), Duration::from_millis(250));
        for body in [r#"{"retry_after": -5}"#, r#"{"retry_after": 1e309}"#, r#"{"retry_after": "x"}"#, "junk", ""] {
            assert_eq!(retry_wait(body), Duration::from_secs(1), "{body}");
        }
    }
}
