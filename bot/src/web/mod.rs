//! The web console `mesh bot` serves when `MESH_WEB_USERS` names its users:
//! the fleet, live traffic, dead letters, the audit trail and the actions,
//! as server-rendered HTML with a little plain JavaScript, and the same data
//! as JSON under `/api/` (for scripts, with `Authorization: Bearer`).
//! Every action runs through the command engine as `web:<user>`.
//!
//! # Layout
//!
//! - [`auth`]: users, sessions, CSRF tokens, the cookie, bearer tokens.
//! - [`live`]: the one view of the mesh shared by every viewer, and its updates.
//! - [`pages`]: the HTML. [`views`]: the page handlers and sign-in.
//! - [`actions`]: the forms that run commands. [`api`]: `/api/` JSON and the event stream.
//! - [`assets`]: the stylesheet and script, embedded in the binary.

pub mod actions;
pub mod api;
pub mod assets;
pub mod auth;
pub mod live;
pub mod pages;
pub mod views;

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::command::{Command, Identity, Permissions, Role};
use crate::engine::Engine;

/// The console's settings, read once at start (`crate::config::web_from_env`).
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    /// The users of `MESH_WEB_USERS`, tokens resolved.
    pub users: auth::WebUsers,
    /// `MESH_WEB_TRUSTED_PROXIES`: the proxies whose `X-Forwarded-Proto: https`
    /// makes the session cookie `Secure`.
    pub trusted_proxies: Vec<IpAddr>,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct WebState {
    engine: Arc<Engine>,
    js: async_nats::jetstream::Context,
    permissions: Arc<Permissions>,
    users: Arc<auth::WebUsers>,
    sessions: Arc<auth::Sessions>,
    hub: Arc<live::Hub>,
    trusted_proxies: Arc<Vec<IpAddr>>,
    /// Cancelled when the bot stops: live streams end so the server can drain.
    stop: CancellationToken,
}

/// The address a request came from, when the server is served with
/// `ConnectInfo` (`mesh bot` is); `None` otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let connect = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        Ok(Self(connect.map(|c| c.0.ip())))
    }
}

/// What a request refused for too many wrong bearer tokens is told.
pub const BEARER_THROTTLED: &str = "too many wrong bearer tokens from this address; wait a minute and try again \
                                    (a browser session is not affected)";

impl WebState {
    /// The caller of a request: its session, else its bearer token (wrong
    /// ones counted against the client address, see [`auth::client_key`]).
    fn caller(&self, headers: &axum::http::HeaderMap, peer: Peer) -> Result<auth::Caller, auth::NoCaller> {
        let client = auth::client_key(&self.trusted_proxies, peer.0, headers);
        auth::caller(headers, client, &self.users, &self.sessions)
    }

    fn role(&self, who: &Identity) -> Option<Role> {
        self.permissions.role_of(who)
    }

    /// True when `who` may run commands like `command` now (the engine checks again).
    fn may(&self, who: &Identity, command: &Command) -> bool {
        self.permissions.check(who, command, None).is_ok()
    }

    fn can(&self, who: &Identity) -> pages::Can {
        let text = String::new();
        pages::Can {
            send: self.may(who, &Command::Broadcast { priority: Default::default(), text, ttl: None }),
            kill: self.may(who, &Command::KillSoft { duration: Default::default(), agent: None, reason: None }),
            nuclear: self.may(who, &Command::KillNuclear { purge: false }),
        }
    }

    fn viewer(&self, caller: &auth::Caller) -> pages::Viewer {
        let who = caller.identity();
        let csrf = match caller {
            auth::Caller::Session { session, .. } => session.csrf.clone(),
            auth::Caller::Bearer { .. } => String::new(),
        };
        pages::Viewer {
            user: caller.user().to_owned(),
            role: self.role(&who).map_or("no role", Role::as_str).to_owned(),
            csrf,
            can: self.can(&who),
        }
    }
}

/// Starts the live view's tasks and returns the console's routes.
pub fn routes<S: Clone + Send + Sync + 'static>(
    config: &WebConfig,
    engine: Arc<Engine>,
    client: async_nats::Client,
    sources: live::Sources,
    permissions: Permissions,
    stop: CancellationToken,
) -> Router<S> {
    let hub = Arc::new(live::Hub::default());
    live::start(hub.clone(), sources, engine.clone(), stop.clone());
    let state = WebState {
        engine,
        js: async_nats::jetstream::new(client),
        permissions: Arc::new(permissions),
        users: Arc::new(config.users.clone()),
        sessions: Arc::new(auth::Sessions::default()),
        hub,
        trusted_proxies: Arc::new(config.trusted_proxies.clone()),
        stop,
    };
    Router::new()
        .route("/", get(views::fleet))
        .route("/traffic", get(views::traffic))
        .route("/dead-letters", get(views::dead_letters))
        .route("/audit", get(views::audit))
        .route("/login", get(views::sign_in_page).post(views::sign_in))
        .route("/logout", post(views::sign_out))
        .route("/actions/{action}", post(actions::run))
        .route("/api/actions/{action}", post(actions::run))
        .route("/api/fleet", get(api::fleet))
        .route("/api/traffic", get(api::traffic))
        .route("/api/dead-letters", get(api::dead_letters))
        .route("/api/audit", get(api::audit))
        .route("/api/events", get(api::events))
        .route("/assets/console.css", get(assets::css))
        .route("/assets/console.js", get(assets::js))
        .with_state(state)
        .layer(axum::middleware::map_response(security_headers))
}

/// What every console response carries: no inline script, no framing, no sniffing.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name, value: &'static str| {
        headers.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    response
}
