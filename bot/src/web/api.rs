//! `/api/`: the JSON the pages use, for scripts too (`Authorization: Bearer
//! <token>` of a web user, or the session cookie), and `/api/events`, the
//! live updates as Server-Sent Events. A viewer whose stream falls behind the
//! hub's channel is disconnected (its browser reconnects and reloads).

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use super::auth::{self, Caller};
use super::live::Update;
use super::views::{AuditFilter, DEAD_LETTERS_LISTED, audit_records};
use super::{Peer, WebState};
use crate::command::Command;

fn unauthorized() -> Response {
    let body = serde_json::json!({"error": "sign in, or send Authorization: Bearer <token> of a MESH_WEB_USERS user"});
    (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], Json(body)).into_response()
}

/// The answer to a client that sent too many wrong bearer tokens lately.
pub(super) fn throttled() -> Response {
    let retry = [(axum::http::header::RETRY_AFTER, auth::FAILURE_WINDOW.as_secs().to_string())];
    (StatusCode::TOO_MANY_REQUESTS, retry, Json(serde_json::json!({"error": super::BEARER_THROTTLED}))).into_response()
}

/// The caller allowed to run `command`'s kind of read, or the JSON refusal.
#[allow(clippy::result_large_err)] // the refusal is the handler's response, returned at once
fn caller(state: &WebState, headers: &HeaderMap, peer: Peer, command: &Command) -> Result<Caller, Response> {
    let caller = state.caller(headers, peer).map_err(|no| match no {
        auth::NoCaller::Unknown => unauthorized(),
        auth::NoCaller::Throttled => throttled(),
    })?;
    match state.permissions.check(&caller.identity(), command, None) {
        Ok(_) => Ok(caller),
        Err(denied) => {
            Err((StatusCode::FORBIDDEN, Json(serde_json::json!({"error": denied.to_string()}))).into_response())
        }
    }
}

/// `GET /api/fleet`.
pub async fn fleet(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    match caller(&state, &headers, peer, &Command::Status) {
        Ok(_) => Json(state.hub.fleet()).into_response(),
        Err(response) => response,
    }
}

/// `GET /api/traffic`: the recent messages, newest first.
pub async fn traffic(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    match caller(&state, &headers, peer, &Command::Status) {
        Ok(_) => Json(state.hub.recent()).into_response(),
        Err(response) => response,
    }
}

/// `GET /api/dead-letters` (admin).
pub async fn dead_letters(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    let dlq = Command::Dlq { agent: None, limit: DEAD_LETTERS_LISTED as u32 };
    if let Err(response) = caller(&state, &headers, peer, &dlq) {
        return response;
    }
    match crate::dlq::list(&state.js, None, DEAD_LETTERS_LISTED).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, Json(serde_json::json!({"error": e.to_string()}))).into_response(),
    }
}

/// `GET /api/audit?who=&command=`: newest first.
pub async fn audit(
    State(state): State<WebState>,
    peer: Peer,
    headers: HeaderMap,
    Query(filter): Query<AuditFilter>,
) -> Response {
    if let Err(response) = caller(&state, &headers, peer, &Command::Audit { count: 1 }) {
        return response;
    }
    match audit_records(&state, &filter).await {
        Ok(records) => Json(records).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, Json(serde_json::json!({"error": e}))).into_response(),
    }
}

/// `GET /api/events`: `fleet` (first the current one), `traffic`, `event`
/// and the caller's own `reply` updates, as Server-Sent Events.
pub async fn events(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    let caller = match caller(&state, &headers, peer, &Command::Status) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let first = Update::Fleet(Box::new(state.hub.fleet()));
    let stream = updates(caller.user().to_owned(), first, state.hub.subscribe());
    // Ends when the bot stops, so its graceful shutdown is not held by open pages.
    let stream = futures::StreamExt::take_until(stream, state.stop.clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn sse(update: &Update) -> Option<Event> {
    let name = match update {
        Update::Fleet(_) => "fleet",
        Update::Traffic(_) => "traffic",
        Update::Event { .. } => "event",
        Update::Reply { .. } => "reply",
    };
    Event::default().event(name).json_data(update).ok()
}

/// The updates one viewer sees; ends when it falls behind (`Lagged`).
fn updates(
    user: String,
    first: Update,
    receiver: tokio::sync::broadcast::Receiver<Update>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let first = futures::stream::iter(sse(&first).map(Ok));
    let rest = futures::stream::unfold((receiver, user), |(mut receiver, user)| async move {
        loop {
            match receiver.recv().await {
                Ok(Update::Reply { user: for_user, .. }) if for_user != user => continue,
                Ok(update) => match sse(&update) {
                    Some(event) => return Some((Ok(event), (receiver, user))),
                    None => continue,
                },
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(user, missed, "web console viewer fell behind; disconnected");
                    return None;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    futures::StreamExt::chain(first, rest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use futures::StreamExt as _;

    use super::*;
    use crate::web::live::Hub;

    #[tokio::test]
    async fn a_viewer_sees_its_own_replies_and_is_dropped_when_behind() {
        let hub = Hub::default();
        let first = Update::Fleet(Box::default());
        let reply = |user: &str| Update::Reply { user: user.into(), title: "42".into(), lines: Vec::new() };
        let mut alice = Box::pin(updates("alice".into(), first.clone(), hub.subscribe()));
        hub.send(reply("bob"));
        hub.send(reply("alice"));
        assert!(alice.next().await.is_some(), "the fleet first");
        let event = alice.next().await.unwrap().unwrap();
        assert!(format!("{event:?}").contains("reply"), "{event:?}");
        let mut slow = Box::pin(updates("carol".into(), first, hub.subscribe()));
        for _ in 0..super::super::live::CHANNEL + 1 {
            hub.send(reply("carol"));
        }
        slow.next().await;
        assert!(slow.next().await.is_none(), "a viewer that fell behind is disconnected");
    }
}
