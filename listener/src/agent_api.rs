//! Agents on the mesh: `POST /v1/messages` on a listener's `--http` address.
//! `Authorization: Bearer <mesh_token>` picks the agent among those this
//! listener serves (401 before anything else); the message then takes the
//! engine's one road as principal `agent:<id>` from front end `http`
//! (permission, rate limit, execution, audit). `from` is always the
//! authenticated agent: no field of the request can set it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mesh_engine::command::Command;
use mesh_engine::engine::{Engine, Handled, Platform};
use mesh_engine::thread::Thread;
use mesh_protocol::{AgentId, Priority, Secret};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::state::FleetState;

/// Largest `POST /v1/messages` body: the text limit (192 KiB) escaped as JSON, and the other fields.
pub const MAX_MESSAGE_BODY_BYTES: usize = 512 * 1024;

/// Longest a request to the agent API may take.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The mesh tokens of the agents this listener serves, kept current by the
/// fleet on every registry change (a rotated token is refused from then on).
pub type MeshTokens = watch::Receiver<Arc<BTreeMap<AgentId, Secret>>>;

/// What the agent endpoints share.
#[derive(Clone)]
pub struct AgentApi {
    /// The one road every command takes.
    pub engine: Arc<Engine>,
    /// Who may call, by token.
    pub tokens: MeshTokens,
    /// What each served agent was handed (answers must name one of them).
    pub fleet: Arc<FleetState>,
    /// Hop limit of answers (`--max-hops`).
    pub max_hops: u8,
}

impl std::fmt::Debug for AgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApi").field("max_hops", &self.max_hops).finish_non_exhaustive()
    }
}

/// The agent a request's Bearer token names, if any. Every served agent's
/// token is compared in constant time, so the time taken says nothing about
/// which (or whether any) token was close.
pub fn authenticate(tokens: &BTreeMap<AgentId, Secret>, headers: &HeaderMap) -> Option<AgentId> {
    let presented = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?.trim().as_bytes();
    let mut found = None;
    for (id, secret) in tokens {
        if bool::from(secret.expose().as_bytes().ct_eq(presented)) && found.is_none() {
            found = Some(id.clone());
        }
    }
    found.filter(|_| !presented.is_empty())
}

/// `POST /v1/messages`, with its own body limit, behind the Bearer check.
pub fn router(api: AgentApi) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_MESSAGE_BODY_BYTES))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_MESSAGE_BODY_BYTES))
        // A publish retries for up to 30 s while JetStream does not answer.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        // Outermost: a request without a known token is answered 401 before its body is read.
        .layer(middleware::from_fn_with_state(api.clone(), require_agent))
        .with_state(api)
}

/// The authenticated agent, as a request extension.
#[derive(Debug, Clone)]
pub struct Caller(pub AgentId);

/// Answers 401 unless the request's Bearer token is a served agent's `mesh_token`; puts the [`Caller`] in the request.
pub async fn require_agent(State(api): State<AgentApi>, mut request: Request, next: Next) -> Response {
    let tokens = api.tokens.borrow().clone();
    match authenticate(&tokens, request.headers()) {
        Some(id) => {
            request.extensions_mut().insert(Caller(id));
            next.run(request).await
        }
        None => unauthorized(),
    }
}

/// 401 with a JSON error and the Bearer challenge.
pub fn unauthorized() -> Response {
    let body = json!({"error": "missing or unknown mesh token: send Authorization: Bearer <the agent's mesh_token>"});
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body)).into_response()
}

/// A JSON error.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// The body of `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageRequest {
    /// An agent id, or `*` for every active agent.
    to: String,
    text: String,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    in_reply_to: Option<String>,
}

async fn messages(
    State(api): State<AgentApi>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let request: MessageRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) if e.to_string().contains("unknown field `from`") => {
            return error(
                StatusCode::BAD_REQUEST,
                "from is not a field: messages are always from the agent whose token was sent",
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body is not {{\"to\", \"text\", \"priority\"?, \"in_reply_to\"?}}: {e}"),
            );
        }
    };
    match send(&api, &caller, Platform::Http, request.to.trim(), request.text, request.priority, request.in_reply_to)
        .await
    {
        Ok(sent) => (StatusCode::OK, axum::Json(sent)).into_response(),
        Err((status, message)) => error(status, message),
    }
}

/// What a send answers: the message id, its place in the stream, and whether
/// it waits for a kill switch to be released.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sent {
    /// The message id (what an answer names as `in_reply_to`).
    pub id: String,
    /// Its sequence in the agents stream.
    pub stream_seq: u64,
    /// True while a kill switch holds it: accepted, delivered when the pause ends.
    pub queued: bool,
    /// Why it is queued, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Sends `text` from `caller` to `to` (`*`: every active agent) through the engine.
pub async fn send(
    api: &AgentApi,
    caller: &AgentId,
    platform: Platform,
    to: &str,
    text: String,
    priority: Option<String>,
    in_reply_to: Option<String>,
) -> Result<Sent, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let priority = match priority.as_deref() {
        None => Priority::Normal,
        Some(raw) => raw.parse().map_err(bad)?,
    };
    let command = if to == "*" {
        Command::Broadcast { priority, text, ttl: None }
    } else {
        let agent = AgentId::parse(to).map_err(|e| bad(format!("to: {e}; or \"*\" for every agent")))?;
        Command::Send { agent, text, priority, ttl: None }
    };
    let mut request = mesh_engine::engine::Request::agent(caller, platform, &command);
    if let Some(raw) = in_reply_to {
        request = request.with_thread(thread(api, caller, &raw).map_err(bad)?);
    }
    let handled = api.engine.handle_command(request, command).await;
    outcome(&handled)
}

/// The thread of an answer: the answered message must be one this listener
/// handed to `caller` (its hops are read from there, not from the caller).
fn thread(api: &AgentApi, caller: &AgentId, raw: &str) -> Result<Thread, String> {
    let id = uuid::Uuid::parse_str(raw.trim())
        .map_err(|_| format!("in_reply_to {raw:?} is not a message id (the id in the wake text, a UUID)"))?;
    let handed = api.fleet.get(caller).and_then(|state| state.handed(id)).ok_or_else(|| {
        format!(
            "in_reply_to {id} is not one of the last {} messages handed to {caller} by this listener; answer a \
             message you were woken by, or send without in_reply_to",
            crate::state::RECENT_DELIVERIES
        )
    })?;
    Ok(Thread::answering(id, handed.hops, api.max_hops))
}

/// The engine's answer as a result: the receipt, or a status and the error.
pub fn outcome(handled: &Handled) -> Result<Sent, (StatusCode, String)> {
    let reply = &handled.reply;
    let status = match handled.decision {
        "denied" => StatusCode::FORBIDDEN,
        // The caller's own kill is in force: refused until `mesh resume <id>`.
        "paused" => StatusCode::LOCKED,
        "limited" => StatusCode::TOO_MANY_REQUESTS,
        _ if !handled.failed => StatusCode::OK,
        _ if reply.title.contains("JetStream") || reply.title.contains("NATS") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    if status != StatusCode::OK {
        return Err((status, reply.title.clone()));
    }
    let data = reply.data.clone().unwrap_or_default();
    let id = data["id"].as_str().unwrap_or_default().to_owned();
    let note = data["queued_note"].as_str().map(str::to_owned);
    Ok(Sent { id, stream_seq: data["stream_seq"].as_u64().unwrap_or_default(), queued: note.is_some(), note })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_picks_the_agent() {
        let tokens: BTreeMap<AgentId, Secret> = [("nova", "n-token"), ("kaan", "k-token")]
            .into_iter()
            .map(|(id, t)| (id.parse().unwrap(), Secret::new(t)))
            .collect();
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert_eq!(authenticate(&tokens, &headers("Bearer n-token")), Some("nova".parse().unwrap()));
        assert_eq!(authenticate(&tokens, &headers("Bearer k-token")), Some("kaan".parse().unwrap()));
        for wrong in ["Bearer n-toke", "Bearer n-token2", "n-token", "Basic n-token", "Bearer ", "Bearer"] {
            assert_eq!(authenticate(&tokens, &headers(wrong)), None, "{wrong}");
        }
        assert_eq!(authenticate(&tokens, &HeaderMap::new()), None);
    }
}
