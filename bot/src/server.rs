//! `mesh bot`: the chat bot server. Slack slash commands (and, later,
//! Discord interactions) over HTTP, health and metrics endpoints, the
//! notifications relay and the fleet monitor, until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use mesh_protocol::Secret;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::command::{ConfirmConfig, Permissions};
use crate::engine::{Engine, EngineConfig};
use crate::slack;

/// Largest request body accepted on any endpoint.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest any request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Slack settings (from the environment: secrets never come from flags).
#[derive(Debug, Clone)]
pub struct SlackConfig {
    /// `SLACK_SIGNING_SECRET` (or the file named by `SLACK_SIGNING_SECRET_FILE`).
    pub signing_secret: Secret,
    /// `SLACK_BOT_TOKEN`, for channel posts.
    pub bot_token: Option<Secret>,
    /// `SLACK_API_URL`, default `https://slack.com/api`.
    pub api_url: String,
    /// `SLACK_RESPONSE_URL_PREFIX`, default `https://hooks.slack.com/`.
    pub response_url_prefix: String,
    /// `SLACK_NOTIFY_CHANNEL`: where events are relayed.
    pub notify_channel: Option<String>,
}

/// Everything `mesh bot` needs.
#[derive(Debug, Clone)]
pub struct BotConfig {
    /// NATS URL.
    pub nats_url: String,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Slack, when configured.
    pub slack: Option<SlackConfig>,
    /// `REDIS_URL`, for shared rate limits and dedup.
    pub redis_url: Option<String>,
    /// How often the fleet is pinged for agent up/down events.
    pub monitor_every: Duration,
}

/// Environment variable names.
pub mod env {
    /// Slack signing secret.
    pub const SLACK_SIGNING_SECRET: &str = "SLACK_SIGNING_SECRET";
    /// File holding the Slack signing secret.
    pub const SLACK_SIGNING_SECRET_FILE: &str = "SLACK_SIGNING_SECRET_FILE";
    /// Slack bot token.
    pub const SLACK_BOT_TOKEN: &str = "SLACK_BOT_TOKEN";
    /// Slack Web API base URL.
    pub const SLACK_API_URL: &str = "SLACK_API_URL";
    /// Accepted prefix of `response_url`.
    pub const SLACK_RESPONSE_URL_PREFIX: &str = "SLACK_RESPONSE_URL_PREFIX";
    /// Channel for notifications.
    pub const SLACK_NOTIFY_CHANNEL: &str = "SLACK_NOTIFY_CHANNEL";
    /// Permissions file.
    pub const MESH_PERMISSIONS: &str = "MESH_PERMISSIONS";
    /// Two-person rule for nuclear.
    pub const MESH_TWO_PERSON_NUCLEAR: &str = "MESH_TWO_PERSON_NUCLEAR";
    /// Redis URL.
    pub const REDIS_URL: &str = "REDIS_URL";
}

fn secret_from_env(var: &str, file_var: Option<&str>) -> anyhow::Result<Option<Secret>> {
    if let Ok(value) = std::env::var(var)
        && !value.trim().is_empty()
    {
        return Ok(Some(Secret::new(value.trim())));
    }
    if let Some(file_var) = file_var
        && let Ok(path) = std::env::var(file_var)
    {
        let value = std::fs::read_to_string(&path).with_context(|| format!("reading {file_var}={path}"))?;
        return Ok(Some(Secret::new(value.trim())));
    }
    Ok(None)
}

/// Reads the Slack settings from the environment.
pub fn slack_from_env() -> anyhow::Result<Option<SlackConfig>> {
    let Some(signing_secret) = secret_from_env(env::SLACK_SIGNING_SECRET, Some(env::SLACK_SIGNING_SECRET_FILE))? else {
        return Ok(None);
    };
    Ok(Some(SlackConfig {
        signing_secret,
        bot_token: secret_from_env(env::SLACK_BOT_TOKEN, None)?,
        api_url: std::env::var(env::SLACK_API_URL).unwrap_or_else(|_| "https://slack.com/api".into()),
        response_url_prefix: std::env::var(env::SLACK_RESPONSE_URL_PREFIX)
            .unwrap_or_else(|_| "https://hooks.slack.com/".into()),
        notify_channel: std::env::var(env::SLACK_NOTIFY_CHANNEL).ok().filter(|c| !c.is_empty()),
    }))
}

/// Reads the permissions file named by `MESH_PERMISSIONS` (none: only `help` for chat users).
pub fn permissions_from_env() -> anyhow::Result<Permissions> {
    match std::env::var(env::MESH_PERMISSIONS) {
        Ok(path) => {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}={path}", env::MESH_PERMISSIONS))?;
            serde_json::from_str(&text).with_context(|| format!("{path} is not a valid permissions file"))
        }
        Err(_) => Ok(Permissions::new()),
    }
}

/// Default engine settings for a registry.
pub fn engine_config(registry_path: PathBuf, permissions: Permissions) -> EngineConfig {
    let two_person = std::env::var(env::MESH_TWO_PERSON_NUCLEAR).is_ok_and(|v| v == "1" || v == "true");
    EngineConfig {
        registry_path,
        permissions,
        confirm: ConfirmConfig { window: crate::command::confirm::CONFIRM_WINDOW, two_person_nuclear: two_person },
        ask_timeout: Duration::from_secs(120),
        ping_timeout: Duration::from_secs(2),
    }
}

#[derive(Clone)]
struct HealthState {
    client: async_nats::Client,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// Runs the bot until `shutdown`; `on_bound` gets the address it listens on.
pub async fn run(
    config: BotConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let client = mesh_listener::nats::connect_service(&config.nats_url, "mesh-bot").await?;
    let limits = crate::limits::LimitStore::from_url(config.redis_url.as_deref()).await;
    let engine = Arc::new(Engine::new(config.engine.clone(), client.clone(), limits).await?);
    let stop = CancellationToken::new();
    let mut app = Router::new();
    if let Some(slack) = &config.slack {
        let api = slack::api::SlackApi::new(
            &slack.api_url,
            slack.bot_token.as_ref().map(|t| t.expose().to_owned()),
            slack.response_url_prefix.clone(),
        )?;
        if let Some(channel) = &slack.notify_channel {
            tokio::spawn(slack::notify::relay(
                engine.jetstream().clone(),
                api.clone(),
                channel.clone(),
                Duration::from_secs(1),
                stop.clone(),
            ));
        }
        let state = slack::commands::SlackState {
            engine: engine.clone(),
            api,
            signing_secret: Arc::new(slack.signing_secret.clone()),
        };
        app = app.route("/slack/commands", post(slack::commands::handle).with_state(state));
        info!("slack slash commands on /slack/commands");
    }
    tokio::spawn(crate::events::monitor(
        client.clone(),
        config.engine.registry_path.clone(),
        config.monitor_every,
        stop.clone(),
    ));
    let health = HealthState { client: client.clone(), metrics: mesh_listener::metrics::install() };
    let app = app
        .route("/health", get(health_report))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(|State(h): State<HealthState>| async move { h.metrics.render() }))
        .with_state(health)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // 413 on any route, before a handler runs, for a declared or streamed body over the limit.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT));
    let listener =
        tokio::net::TcpListener::bind(config.addr).await.with_context(|| format!("binding {}", config.addr))?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "mesh bot listening");
    on_bound(bound);
    let stop_serving = stop.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop_serving.cancel();
        })
        .await?;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    Ok(())
}

async fn health_report(State(h): State<HealthState>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let connected = h.client.connection_state() == async_nats::connection::State::Connected;
    let status = if connected { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if connected { "ok" } else { "unhealthy" },
        "nats": if connected { "connected" } else { "disconnected" },
        "version": mesh_protocol::VERSION,
    });
    (status, axum::Json(body))
}

async fn ready(State(h): State<HealthState>) -> (StatusCode, &'static str) {
    if h.client.connection_state() == async_nats::connection::State::Connected {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "nats disconnected")
    }
}
