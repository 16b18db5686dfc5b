//! `POST /slack/commands`: the `/mesh` slash command. The signature is
//! checked on the raw body before anything else; a platform retry or a
//! replayed request runs once; Slack gets an ephemeral "working" answer at
//! once and the result follows on `response_url` (an `ask` reply follows in
//! a thread of the channel).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::api::SlackApi;
use super::verify::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::command::Identity;
use crate::engine::{Engine, Platform, Request};

/// What the slash command handler needs.
#[derive(Debug, Clone)]
pub struct SlackState {
    /// The command engine.
    pub engine: Arc<Engine>,
    /// Slack's API.
    pub api: SlackApi,
    /// The signing secret (none in Socket Mode only: HTTP commands are then refused).
    pub signing_secret: Option<Arc<mesh_protocol::Secret>>,
}

/// The fields of a slash command form this bot reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SlashCommand {
    /// Who typed it.
    pub user_id: String,
    /// Where it was typed.
    #[serde(default)]
    pub channel_id: Option<String>,
    /// What followed `/mesh`.
    #[serde(default)]
    pub text: String,
    /// Where the result goes (checked against the allowed prefix by the caller).
    pub response_url: String,
}

impl SlashCommand {
    /// Parses a (verified) `application/x-www-form-urlencoded` body. Pure; fuzzed.
    pub fn parse(body: &[u8]) -> Result<Self, serde_urlencoded::de::Error> {
        serde_urlencoded::from_bytes(body)
    }
}

/// Why a verified slash command is not run.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Its `response_url` is outside the accepted prefix.
    ForeignResponseUrl,
}

/// Handles one slash command request.
pub async fn handle(
    State(state): State<SlackState>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = header(SIGNATURE_HEADER);
    let Some(secret) = &state.signing_secret else {
        let error = "slash commands over HTTP need SLACK_SIGNING_SECRET";
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({ "error": error })));
    };
    if let Err(e) = verify::verify(secret.expose(), header(TIMESTAMP_HEADER), signature, &body, now) {
        warn!(error = %e, "slack request rejected");
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": format!("invalid request: {e}")})));
    }
    let signature = signature.unwrap_or_default();
    let Ok(command) = SlashCommand::parse(&body) else {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "not a slash command form"})));
    };
    // The signature covers timestamp and body: the same signature is the same request.
    match start(&state, command, &format!("slack:{signature}")).await {
        Ok(text) => (StatusCode::OK, axum::Json(json!({"response_type": "ephemeral", "text": text}))),
        Err(Refused::ForeignResponseUrl) => {
            (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "response_url is not a Slack URL"})))
        }
    }
}

/// Starts a verified slash command unless `dedup_key` was seen before (a
/// platform retry or a replay); returns the immediate ephemeral answer.
pub(super) async fn start(state: &SlackState, command: SlashCommand, dedup_key: &str) -> Result<String, Refused> {
    if !state.api.accepts_response_url(&command.response_url) {
        warn!("slash command with a response_url outside the allowed prefix");
        return Err(Refused::ForeignResponseUrl);
    }
    if !state.engine.first_in_fleet(dedup_key).await {
        info!(user = %command.user_id, "duplicate slack request ignored");
        return Ok("duplicate request ignored (already handled)".to_owned());
    }
    let working = format!("working on `/mesh {}`…", super::super::command::render_slack::escape(command.text.trim()));
    let request =
        Request::chat(Identity::Slack { user: command.user_id }, Platform::Slack, command.channel_id, command.text);
    tokio::spawn(run(state.clone(), request, command.response_url));
    Ok(working)
}

async fn run(state: SlackState, request: Request, response_url: String) {
    let channel = request.channel.clone();
    let handled = state.engine.handle(request).await;
    let thread = match (&handled.follow_up, &channel) {
        (Some(_), Some(channel)) if state.api.can_post() => match state.api.post(channel, &handled.reply, None).await {
            Ok(ts) => Some(ts),
            Err(e) => {
                warn!(error = %e, "cannot post the ask to the channel; answering on response_url");
                None
            }
        },
        _ => None,
    };
    if thread.is_none()
        && let Err(e) = state.api.respond(&response_url, &handled.reply).await
    {
        warn!(error = %e, "slack follow-up failed");
    }
    if let Some(code) = handled.confirmation_code {
        // The prompt went to response_url: replaced there once its window passes undecided.
        let (api, url) = (state.api.clone(), response_url.clone());
        crate::expiry::when_expired(state.engine.clone(), code, move |expired| async move {
            if let Err(e) = api.respond_click(&url, &expired, true).await {
                warn!(error = %e, "slack prompt not marked expired");
            }
        });
    }
    if let Some(follow_up) = handled.follow_up {
        let answer = follow_up.await;
        let posted = match (&thread, &channel) {
            (Some(ts), Some(channel)) => state.api.post(channel, &answer, Some(ts)).await.map(|_| ()),
            _ => state.api.respond(&response_url, &answer).await,
        };
        if let Err(e) = posted {
            warn!(error = %e, "slack ask reply not delivered");
        }
    }
}
