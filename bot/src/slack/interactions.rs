//! `POST /slack/interactions` (the app's Interactivity Request URL): button
//! clicks on the bot's messages. Slack sends a form with one field,
//! `payload`, holding a `block_actions` JSON document (`user.id`,
//! `actions[].action_id`, `response_url`, `trigger_id`), signed like slash
//! commands (Slack's "Handling user interaction" guide). The `v0` signature
//! is checked on the raw body before anything is parsed; the click is
//! acknowledged at once with an empty 200 (Slack wants it within 3 s); the
//! engine decides it with the clicker's identity and role; and the result
//! goes to the payload's `response_url` (the same prefix rule as slash
//! commands): `replace_original: true` for a decision, so the message shows
//! who confirmed or cancelled and loses its buttons, or a new ephemeral
//! message for a refusal, leaving the original as it was. A retried or
//! replayed click runs once (its `trigger_id`, across replicas).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::commands::SlackState;
use super::verify::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::command::Identity;
use crate::engine::{Platform, Request};

/// A verified click, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    /// Who clicked.
    pub user_id: String,
    /// In which channel.
    pub channel_id: Option<String>,
    /// The clicked button's id (the engine's opaque id).
    pub action_id: String,
    /// Where the message update goes.
    pub response_url: String,
    /// Unique per interaction: the dedup key.
    pub trigger_id: String,
}

#[derive(Debug, Deserialize)]
struct Form {
    payload: String,
}

#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: IdOnly,
    #[serde(default)]
    channel: Option<IdOnly>,
    #[serde(default)]
    trigger_id: String,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    actions: Vec<ActionInfo>,
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Debug, Deserialize)]
struct ActionInfo {
    action_id: String,
}

/// Why a verified interaction is not a click this bot handles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClickError {
    #[error("body is not an interaction form with a payload: {0}")]
    NotAForm(String),
    #[error("interaction type {0:?} is not handled (only block_actions)")]
    Unsupported(String),
    #[error("interaction has no {0}")]
    Missing(&'static str),
}

impl Click {
    /// Reads a verified `application/x-www-form-urlencoded` interaction body. Pure.
    pub fn parse(body: &[u8]) -> Result<Self, ClickError> {
        let form: Form = serde_urlencoded::from_bytes(body).map_err(|e| ClickError::NotAForm(e.to_string()))?;
        let payload: Payload = serde_json::from_str(&form.payload).map_err(|e| ClickError::NotAForm(e.to_string()))?;
        if payload.kind != "block_actions" {
            return Err(ClickError::Unsupported(payload.kind.chars().take(40).collect()));
        }
        let action = payload.actions.into_iter().next().ok_or(ClickError::Missing("action"))?;
        let response_url = payload.response_url.filter(|u| !u.is_empty()).ok_or(ClickError::Missing("response_url"))?;
        if payload.trigger_id.is_empty() {
            return Err(ClickError::Missing("trigger_id"));
        }
        Ok(Self {
            user_id: payload.user.id,
            channel_id: payload.channel.map(|c| c.id),
            action_id: action.action_id,
            response_url,
            trigger_id: payload.trigger_id,
        })
    }
}

/// Handles one interaction request.
pub async fn handle(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let Some(secret) = &state.signing_secret else {
        return (
            StatusCode::UNAUTHORIZED,
            json!({"error": "interactions over HTTP need SLACK_SIGNING_SECRET"}).to_string(),
        );
    };
    if let Err(e) = verify::verify(secret.expose(), header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER), &body, now) {
        warn!(error = %e, "slack interaction rejected");
        return (StatusCode::UNAUTHORIZED, json!({"error": format!("invalid request: {e}")}).to_string());
    }
    let click = match Click::parse(&body) {
        Ok(click) => click,
        Err(e) => {
            warn!(error = %e, "slack interaction not handled");
            return (StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string());
        }
    };
    match start(&state, click).await {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(e) => (StatusCode::BAD_REQUEST, json!({"error": e}).to_string()),
    }
}

/// Starts a verified click unless it was seen before (a retry or a replay);
/// the caller acknowledges at once. Refuses a `response_url` outside the prefix.
pub(super) async fn start(state: &SlackState, click: Click) -> Result<(), &'static str> {
    if !state.api.accepts_response_url(&click.response_url) {
        warn!("slack click with a response_url outside the allowed prefix");
        return Err("response_url is not a Slack URL");
    }
    if !state.engine.first_in_fleet(&format!("slack:click:{}", click.trigger_id)).await {
        info!(user = %click.user_id, "duplicate slack click ignored");
        return Ok(());
    }
    tokio::spawn(run(state.clone(), click));
    Ok(())
}

async fn run(state: SlackState, click: Click) {
    let request = Request::chat(Identity::Slack { user: click.user_id }, Platform::Slack, click.channel_id, "");
    let clicked = state.engine.click(request, &click.action_id).await;
    if let Some(update) = &clicked.update
        && let Err(e) = state.api.respond_click(&click.response_url, update, true).await
    {
        warn!(error = %e, "slack message not updated after a click");
    }
    if let Some(answer) = &clicked.answer
        && let Err(e) = state.api.respond_click(&click.response_url, answer, false).await
    {
        warn!(error = %e, "slack click answer not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(payload: serde_json::Value) -> Vec<u8> {
        serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap().into_bytes()
    }

    fn block_actions() -> serde_json::Value {
        json!({
            "type": "block_actions",
            "user": {"id": "UALICE", "username": "alice", "team_id": "T1"},
            "api_app_id": "A1", "team": {"id": "T1"},
            "container": {"type": "message", "message_ts": "1.2", "channel_id": "C1", "is_ephemeral": false},
            "trigger_id": "123.456.abc",
            "channel": {"id": "C1", "name": "ops"},
            "response_url": "https://hooks.slack.com/actions/T1/1/xyz",
            "actions": [{"type": "button", "action_id": "mesh:confirm:K7P2QX", "block_id": "mesh_actions",
                         "value": "mesh:confirm:K7P2QX", "text": {"type": "plain_text", "text": "Confirm"},
                         "action_ts": "1700000000.1"}],
        })
    }

    #[test]
    fn block_actions_are_read() {
        let click = Click::parse(&body(block_actions())).unwrap();
        assert_eq!(
            click,
            Click {
                user_id: "UALICE".into(),
                channel_id: Some("C1".into()),
                action_id: "mesh:confirm:K7P2QX".into(),
                response_url: "https://hooks.slack.com/actions/T1/1/xyz".into(),
                trigger_id: "123.456.abc".into(),
            }
        );
        // slack-morphism reads the same payload (what Socket Mode hands us).
        let typed: slack_morphism::prelude::SlackInteractionEvent = serde_json::from_value(block_actions()).unwrap();
        assert!(matches!(typed, slack_morphism::prelude::SlackInteractionEvent::BlockActions(_)));
    }

    #[test]
    fn other_payloads_are_refused() {
        let mut other = block_actions();
        other["type"] = json!("view_submission");
        assert_eq!(Click::parse(&body(other)), Err(ClickError::Unsupported("view_submission".into())));
        let mut none = block_actions();
        none["actions"] = json!([]);
        assert_eq!(Click::parse(&body(none)), Err(ClickError::Missing("action")));
        let mut no_url = block_actions();
        no_url.as_object_mut().unwrap().remove("response_url");
        assert_eq!(Click::parse(&body(no_url)), Err(ClickError::Missing("response_url")));
        assert!(matches!(Click::parse(b"text=kill+hard"), Err(ClickError::NotAForm(_))));
        assert!(matches!(Click::parse(b"payload=nope"), Err(ClickError::NotAForm(_))));
    }

    #[test]
    fn the_app_manifest_names_these_endpoints_and_scopes() {
        let manifest = include_str!("../../../deploy/slack-app-manifest.yaml");
        for needed in [
            "command: /mesh",
            "/slack/commands",
            "request_url: https://mesh.example.com/slack/interactions",
            "- commands",
            "- chat:write",
            "socket_mode_enabled:",
            "is_enabled: true",
        ] {
            assert!(manifest.contains(needed), "the manifest lacks {needed:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Click::parse(&body);
        }
    }
}
