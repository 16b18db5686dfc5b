//! The console's pages and its sign-in: without a session every page sends
//! the browser to `/login`, which shows nothing of the mesh.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::Markup;
use serde::Deserialize;

use super::auth::{self, Caller, SignInRefused};
use super::{Peer, WebState, pages};
use crate::command::Command;

/// How many audit records the audit page reads before filtering.
pub const AUDIT_READ: usize = 500;
/// How many dead letters the dead letters page lists.
pub const DEAD_LETTERS_LISTED: usize = 200;

/// The caller allowed to read the console (viewer or more), or the response to give instead.
#[allow(clippy::result_large_err)] // the refusal is the handler's response, returned at once
pub(super) fn reader(state: &WebState, headers: &HeaderMap, peer: Peer) -> Result<Caller, Response> {
    let caller = match state.caller(headers, peer) {
        Ok(caller) => caller,
        Err(auth::NoCaller::Unknown) => return Err(Redirect::to("/login").into_response()),
        Err(auth::NoCaller::Throttled) => {
            let retry = [(header::RETRY_AFTER, auth::FAILURE_WINDOW.as_secs().to_string())];
            return Err((StatusCode::TOO_MANY_REQUESTS, retry, pages::refusal(super::BEARER_THROTTLED)).into_response());
        }
    };
    let who = caller.identity();
    if let Err(denied) = state.permissions.check(&who, &Command::Status, None) {
        return Err((StatusCode::FORBIDDEN, pages::refusal(&denied.to_string())).into_response());
    }
    Ok(caller)
}

fn html(markup: Markup) -> Response {
    markup.into_response()
}

/// `GET /`.
pub async fn fleet(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    match reader(&state, &headers, peer) {
        Ok(caller) => html(pages::fleet(&state.viewer(&caller), &state.hub.fleet())),
        Err(response) => response,
    }
}

/// `GET /traffic`.
pub async fn traffic(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    match reader(&state, &headers, peer) {
        Ok(caller) => {
            let fleet = state.hub.fleet();
            let agents: Vec<&str> = fleet.agents.iter().map(|a| a.agent.as_str()).collect();
            html(pages::traffic(&state.viewer(&caller), &state.hub.recent(), &agents))
        }
        Err(response) => response,
    }
}

/// `GET /dead-letters` (admin: the role `dlq` needs).
pub async fn dead_letters(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    let caller = match reader(&state, &headers, peer) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let dlq = Command::Dlq { agent: None, limit: DEAD_LETTERS_LISTED as u32 };
    if let Err(denied) = state.permissions.check(&caller.identity(), &dlq, None) {
        return (StatusCode::FORBIDDEN, pages::refusal(&denied.to_string())).into_response();
    }
    let (entries, error) = match crate::dlq::list(&state.js, None, DEAD_LETTERS_LISTED).await {
        Ok(entries) => (entries, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    html(pages::dead_letters(&state.viewer(&caller), &entries, error.as_deref()))
}

/// The audit page's filter.
#[derive(Debug, Default, Deserialize)]
pub struct AuditFilter {
    /// Part of the `who` (`web:alice`, `slack:U1`).
    #[serde(default)]
    pub who: String,
    /// The start of the command line (`kill`, `send`).
    #[serde(default)]
    pub command: String,
}

impl AuditFilter {
    /// True when `record` passes the filter.
    pub fn keeps(&self, record: &crate::audit::AuditRecord) -> bool {
        let (who, command) = (self.who.trim(), self.command.trim().to_lowercase());
        (who.is_empty() || record.who.contains(who))
            && (command.is_empty() || record.line.to_lowercase().starts_with(&command))
    }
}

/// The newest audit records that pass `filter`, newest first.
pub(super) async fn audit_records(
    state: &WebState,
    filter: &AuditFilter,
) -> Result<Vec<crate::audit::AuditRecord>, String> {
    let mut records = crate::audit::newest(&state.js, AUDIT_READ).await.map_err(|e| e.to_string())?;
    records.retain(|r| filter.keeps(r));
    records.sort_by_key(|r| std::cmp::Reverse(r.at));
    Ok(records)
}

/// `GET /audit?who=&command=`.
pub async fn audit(
    State(state): State<WebState>,
    peer: Peer,
    headers: HeaderMap,
    Query(filter): Query<AuditFilter>,
) -> Response {
    let caller = match reader(&state, &headers, peer) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let (records, error) = match audit_records(&state, &filter).await {
        Ok(records) => (records, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    html(pages::audit(&state.viewer(&caller), &records, &filter.who, &filter.command, error.as_deref()))
}

/// `GET /login`.
pub async fn sign_in_page(State(state): State<WebState>, peer: Peer, headers: HeaderMap) -> Response {
    match state.caller(&headers, peer) {
        Ok(Caller::Session { .. }) => Redirect::to("/").into_response(),
        _ => html(pages::sign_in(None)),
    }
}

/// The sign-in form.
#[derive(Deserialize)]
pub struct SignInForm {
    name: String,
    token: String,
}

impl std::fmt::Debug for SignInForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignInForm").field("name", &self.name).finish_non_exhaustive()
    }
}

fn secure(state: &WebState, headers: &HeaderMap, connect: Option<&ConnectInfo<SocketAddr>>) -> bool {
    auth::secure_cookie(&state.trusted_proxies, connect.map(|c| c.0.ip()), headers)
}

/// `POST /login`.
pub async fn sign_in(
    State(state): State<WebState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Form(form): Form<SignInForm>,
) -> Response {
    let name = form.name.trim();
    let shown: String = name.chars().take(64).collect();
    // Another site's page may not sign anyone in, nor spend a user's
    // failures (which would lock them out): refused before anything counts.
    if auth::cross_site(&headers) {
        tracing::warn!(user = shown, "web console sign-in refused: posted from another site");
        let message = "Sign in from this console's own sign-in page.";
        return (StatusCode::FORBIDDEN, pages::sign_in(Some(message))).into_response();
    }
    match state.sessions.sign_in(&state.users, name, form.token.trim()) {
        Ok((id, _)) => {
            tracing::info!(user = name, "web console sign-in");
            let cookie = auth::session_cookie(&id, secure(&state, &headers, extensions.get()));
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(SignInRefused::Wrong) => {
            tracing::warn!("web console sign-in refused: wrong user or token");
            (StatusCode::UNAUTHORIZED, pages::sign_in(Some("Wrong user or token."))).into_response()
        }
        Err(SignInRefused::Throttled) => {
            tracing::warn!(user = shown, "web console sign-in refused: too many failed sign-ins for this name");
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, auth::FAILURE_WINDOW.as_secs().to_string())],
                pages::sign_in(Some("Too many failed sign-ins for this user; wait a minute and try again.")),
            )
                .into_response()
        }
        Err(SignInRefused::Full) => (
            StatusCode::SERVICE_UNAVAILABLE,
            pages::sign_in(Some("Too many open sessions; try again later or restart the bot.")),
        )
            .into_response(),
    }
}

/// The sign-out form.
#[derive(Debug, Deserialize)]
pub struct SignOutForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// `POST /logout`.
pub async fn sign_out(
    State(state): State<WebState>,
    peer: Peer,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Form(form): Form<SignOutForm>,
) -> Response {
    if let Ok(caller) = state.caller(&headers, peer)
        && let Caller::Session { id, .. } = &caller
    {
        if !caller.csrf_ok(form.csrf.as_deref()) {
            return (StatusCode::FORBIDDEN, pages::refusal("the form is stale; reload the page")).into_response();
        }
        state.sessions.sign_out(id);
    }
    let cookie = auth::cleared_cookie(secure(&state, &headers, extensions.get()));
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_filter_matches_who_and_the_command_start() {
        let record = crate::audit::AuditRecord {
            at: time::OffsetDateTime::UNIX_EPOCH,
            who: "web:alice".into(),
            platform: "web".into(),
            channel: None,
            line: "kill soft 5m".into(),
            decision: "allowed".into(),
            outcome: "paused".into(),
            message_ids: Vec::new(),
        };
        let filter = |who: &str, command: &str| AuditFilter { who: who.into(), command: command.into() };
        assert!(filter("", "").keeps(&record));
        assert!(filter("alice", "Kill").keeps(&record));
        assert!(!filter("bob", "").keeps(&record));
        assert!(!filter("", "soft").keeps(&record));
    }
}
