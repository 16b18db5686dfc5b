//! `mesh bot`: the chat bot server. Slack slash commands and Discord
//! interactions over HTTP, Discord message commands over the gateway, health
//! and metrics endpoints, the notifications relays and the fleet monitor,
//! until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use mesh_protocol::Secret;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::command::{ConfirmConfig, Permissions};
use crate::engine::{Engine, EngineConfig};
use crate::{discord, slack};

/// Largest request body accepted on any endpoint.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Notifications relayed to a chat channel: at most one post per interval.
const NOTIFY_INTERVAL: Duration = Duration::from_secs(1);
/// Longest any request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Slack settings (from the environment: secrets never come from flags).
#[derive(Debug, Clone)]
pub struct SlackConfig {
    /// `SLACK_SIGNING_SECRET` (or the file named by `SLACK_SIGNING_SECRET_FILE`):
    /// enables `POST /slack/commands`.
    pub signing_secret: Option<Secret>,
    /// `SLACK_APP_TOKEN` (or `SLACK_APP_TOKEN_FILE`): enables Socket Mode.
    pub app_token: Option<Secret>,
    /// `SLACK_BOT_TOKEN`, for channel posts.
    pub bot_token: Option<Secret>,
    /// `SLACK_API_URL`, default `https://slack.com/api`.
    pub api_url: String,
    /// `SLACK_RESPONSE_URL_PREFIX`, default `https://hooks.slack.com/`.
    pub response_url_prefix: String,
    /// `SLACK_NOTIFY_CHANNEL`: where events are relayed.
    pub notify_channel: Option<String>,
}

/// Discord settings (from the environment: secrets never come from flags).
#[derive(Debug, Clone)]
pub struct DiscordConfig {
    /// `DISCORD_PUBLIC_KEY` (or `_FILE`): enables `POST /discord/interactions`.
    pub public_key: Option<discord::verify::PublicKey>,
    /// `DISCORD_BOT_TOKEN` (or `_FILE`): channel posts, the gateway, command registration.
    pub bot_token: Option<Secret>,
    /// `DISCORD_APPLICATION_ID`: registers the `/mesh` command on start.
    pub application_id: Option<String>,
    /// `DISCORD_API_URL`, default `https://discord.com/api/v10`.
    pub api_url: String,
    /// `DISCORD_NOTIFY_CHANNEL`: where events are relayed.
    pub notify_channel: Option<String>,
    /// `DISCORD_GATEWAY` (`on` by default when a bot token is set; `off` disables).
    pub gateway: bool,
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
    /// Discord, when configured.
    pub discord: Option<DiscordConfig>,
    /// `REDIS_URL`, for shared rate limits and dedup.
    pub redis_url: Option<String>,
    /// How often the fleet is pinged for agent up/down events.
    pub monitor_every: Duration,
    /// The Docker engine and compose project of the deployed mesh.
    pub docker: crate::docker::DockerHost,
}

/// Environment variable names.
pub mod env {
    /// Slack signing secret.
    pub const SLACK_SIGNING_SECRET: &str = "SLACK_SIGNING_SECRET";
    /// File holding the Slack signing secret.
    pub const SLACK_SIGNING_SECRET_FILE: &str = "SLACK_SIGNING_SECRET_FILE";
    /// Slack bot token.
    pub const SLACK_BOT_TOKEN: &str = "SLACK_BOT_TOKEN";
    /// Slack app-level token (`xapp-...`), for Socket Mode.
    pub const SLACK_APP_TOKEN: &str = "SLACK_APP_TOKEN";
    /// File holding the Slack app-level token.
    pub const SLACK_APP_TOKEN_FILE: &str = "SLACK_APP_TOKEN_FILE";
    /// Slack Web API base URL.
    pub const SLACK_API_URL: &str = "SLACK_API_URL";
    /// Accepted prefix of `response_url`.
    pub const SLACK_RESPONSE_URL_PREFIX: &str = "SLACK_RESPONSE_URL_PREFIX";
    /// Channel for notifications.
    pub const SLACK_NOTIFY_CHANNEL: &str = "SLACK_NOTIFY_CHANNEL";
    /// Discord application public key (hex).
    pub const DISCORD_PUBLIC_KEY: &str = "DISCORD_PUBLIC_KEY";
    /// File holding the Discord public key.
    pub const DISCORD_PUBLIC_KEY_FILE: &str = "DISCORD_PUBLIC_KEY_FILE";
    /// Discord bot token.
    pub const DISCORD_BOT_TOKEN: &str = "DISCORD_BOT_TOKEN";
    /// File holding the Discord bot token.
    pub const DISCORD_BOT_TOKEN_FILE: &str = "DISCORD_BOT_TOKEN_FILE";
    /// Discord application id.
    pub const DISCORD_APPLICATION_ID: &str = "DISCORD_APPLICATION_ID";
    /// Discord REST API base URL.
    pub const DISCORD_API_URL: &str = "DISCORD_API_URL";
    /// Discord channel for notifications.
    pub const DISCORD_NOTIFY_CHANNEL: &str = "DISCORD_NOTIFY_CHANNEL";
    /// `on` or `off`: the Discord gateway client.
    pub const DISCORD_GATEWAY: &str = "DISCORD_GATEWAY";
    /// Permissions file.
    pub const MESH_PERMISSIONS: &str = "MESH_PERMISSIONS";
    /// Two-person rule for nuclear.
    pub const MESH_TWO_PERSON_NUCLEAR: &str = "MESH_TWO_PERSON_NUCLEAR";
    /// Time to live of a broadcast sent without `--ttl` (`30s`, `5m`, `2h`; unset: none).
    pub const MESH_BROADCAST_TTL: &str = "MESH_BROADCAST_TTL";
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

/// Reads the Slack settings from the environment: Slack is on when a signing
/// secret (HTTP slash commands) or an app token (Socket Mode) is set.
pub fn slack_from_env() -> anyhow::Result<Option<SlackConfig>> {
    let signing_secret = secret_from_env(env::SLACK_SIGNING_SECRET, Some(env::SLACK_SIGNING_SECRET_FILE))?;
    let app_token = secret_from_env(env::SLACK_APP_TOKEN, Some(env::SLACK_APP_TOKEN_FILE))?;
    if signing_secret.is_none() && app_token.is_none() {
        return Ok(None);
    }
    Ok(Some(SlackConfig {
        signing_secret,
        app_token,
        bot_token: secret_from_env(env::SLACK_BOT_TOKEN, None)?,
        api_url: std::env::var(env::SLACK_API_URL).unwrap_or_else(|_| "https://slack.com/api".into()),
        response_url_prefix: std::env::var(env::SLACK_RESPONSE_URL_PREFIX)
            .unwrap_or_else(|_| "https://hooks.slack.com/".into()),
        notify_channel: std::env::var(env::SLACK_NOTIFY_CHANNEL).ok().filter(|c| !c.is_empty()),
    }))
}

/// Reads the Discord settings from the environment (none when neither a
/// public key nor a bot token is set).
pub fn discord_from_env() -> anyhow::Result<Option<DiscordConfig>> {
    let public_key = secret_from_env(env::DISCORD_PUBLIC_KEY, Some(env::DISCORD_PUBLIC_KEY_FILE))?;
    let bot_token = secret_from_env(env::DISCORD_BOT_TOKEN, Some(env::DISCORD_BOT_TOKEN_FILE))?;
    if public_key.is_none() && bot_token.is_none() {
        return Ok(None);
    }
    let public_key = public_key.map(|k| k.expose().parse::<discord::verify::PublicKey>()).transpose()?;
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let gateway = match var(env::DISCORD_GATEWAY).as_deref() {
        None | Some("on" | "1" | "true") => bot_token.is_some(),
        Some("off" | "0" | "false") => false,
        Some(other) => anyhow::bail!("{}={other:?} is not on or off", env::DISCORD_GATEWAY),
    };
    Ok(Some(DiscordConfig {
        public_key,
        bot_token,
        application_id: var(env::DISCORD_APPLICATION_ID),
        api_url: var(env::DISCORD_API_URL).unwrap_or_else(|| discord::api::DEFAULT_API_URL.into()),
        notify_channel: var(env::DISCORD_NOTIFY_CHANNEL),
        gateway,
    }))
}

/// Why the permissions file cannot be used. Every command that needs a role,
/// and `mesh bot`, stops on it (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum PermissionsFileError {
    /// The file cannot be read.
    #[error("cannot read the permissions file {path} ({}); fix the path or unset it", env::MESH_PERMISSIONS)]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON, names an unknown role or key, or a malformed identity.
    #[error(
        "the permissions file {path} ({}) is invalid, so commands that need a role are refused; fix it",
        env::MESH_PERMISSIONS
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The fault, with its line and column.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the permissions file named by `MESH_PERMISSIONS`. None set: chat
/// users may only run `help`, and the terminal is director.
pub fn permissions_from_env() -> Result<Permissions, PermissionsFileError> {
    match std::env::var(env::MESH_PERMISSIONS) {
        // Set but empty (a compose default) means unset.
        Ok(path) if !path.trim().is_empty() => permissions_from_file(Path::new(&path)),
        _ => Ok(Permissions::new()),
    }
}

/// Reads one permissions file.
pub fn permissions_from_file(path: &Path) -> Result<Permissions, PermissionsFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PermissionsFileError::Unreadable { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| PermissionsFileError::Invalid { path: path.to_owned(), source })
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
        broadcast_ttl: None,
    }
}

/// The default time to live of broadcasts ([`env::MESH_BROADCAST_TTL`]), read once at start.
pub fn broadcast_ttl_from_env() -> anyhow::Result<Option<Duration>> {
    match std::env::var(env::MESH_BROADCAST_TTL) {
        Ok(raw) if !raw.trim().is_empty() => crate::command::grammar::parse_duration(raw.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {e}; unset it or use 30s, 5m or 2h", env::MESH_BROADCAST_TTL)),
        _ => Ok(None),
    }
}

#[derive(Clone)]
struct HealthState {
    client: async_nats::Client,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// How often the bot reads the registry for agents that need a consumer.
pub const PROVISION_POLL: Duration = Duration::from_secs(2);

/// Runs the bot until `shutdown`; `on_bound` gets the address it listens on.
pub async fn run(
    config: BotConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let client = mesh_listener::nats::connect_service(&config.nats_url, "mesh-bot").await?;
    let limits = crate::limits::LimitStore::from_url(config.redis_url.as_deref()).await;
    let engine = Engine::new(config.engine.clone(), client.clone(), limits).await?;
    let engine = Arc::new(engine.with_containers(Arc::new(config.docker.clone())));
    let js = async_nats::jetstream::new(client.clone());
    // What listeners refuse to run on, the bot refuses to feed.
    if let Ok(registry) = mesh_listener::registry_file::load(&config.engine.registry_path)
        && let Err(e) = crate::provision::verify(&js, &registry).await
        && e.is_fatal()
    {
        anyhow::bail!("refusing to start: {e}");
    }
    // Connected by now (the engine created the streams).
    if let Some(warning) = mesh_runtime::server_pause::Support::of(&client).warning() {
        tracing::warn!("{warning}");
    }
    let stop = CancellationToken::new();
    let mut app = Router::new();
    if let Some(slack) = &config.slack {
        let api = slack::api::SlackApi::new(
            &slack.api_url,
            slack.bot_token.as_ref().map(|t| t.expose().to_owned()),
            slack.response_url_prefix.clone(),
        )?;
        if let Some(channel) = &slack.notify_channel {
            let (api, channel) = (api.clone(), channel.clone());
            let post = move |note: crate::notify::Notification| {
                let (api, channel) = (api.clone(), channel.clone());
                async move {
                    api.post_with_fallback(&channel, &note.reply, None, Some(&note.text))
                        .await
                        .map(drop)
                        .map_err(|e| crate::notify::PostFailure { retry_after: e.retry_after(), detail: e.to_string() })
                }
            };
            // Slack allows about one post per second per channel.
            let relay = crate::notify::relay(js.clone(), "slack", NOTIFY_INTERVAL, stop.clone(), post);
            tokio::spawn(relay);
        }
        let state = slack::commands::SlackState {
            engine: engine.clone(),
            api,
            signing_secret: slack.signing_secret.clone().map(Arc::new),
        };
        if let Some(app_token) = slack.app_token.clone() {
            let (state, api_url, stop) = (state.clone(), slack.api_url.clone(), stop.clone());
            tokio::spawn(async move {
                if let Err(e) = slack::socket::serve(state, &api_url, &app_token, stop).await {
                    warn!(error = %e, "slack socket mode stopped; check SLACK_APP_TOKEN and SLACK_API_URL");
                }
            });
            info!("slack socket mode enabled");
        }
        if slack.signing_secret.is_some() {
            app = app.route("/slack/commands", post(slack::commands::handle).with_state(state));
            info!("slack slash commands on /slack/commands");
        }
    }
    if let Some(discord) = &config.discord {
        app = app.merge(discord_routes(discord, &engine, &js, &config.engine.permissions, &stop)?);
    }
    // Listeners may not create their consumers: the bot sees to every active agent's, now and on registry changes.
    let provision = crate::provision::FollowConfig {
        registry_path: config.engine.registry_path.clone(),
        poll: PROVISION_POLL,
        replicas: mesh_listener::nats::replicas_from_env()?,
        tuning: None,
    };
    tokio::spawn(crate::provision::follow(js.clone(), provision, stop.clone().cancelled_owned()));
    tokio::spawn(crate::events::monitor(
        client.clone(),
        config.engine.registry_path.clone(),
        config.monitor_every,
        stop.clone(),
    ));
    let metrics = mesh_listener::metrics::install();
    tokio::spawn(mesh_listener::metrics::upkeep(metrics.clone(), mesh_listener::metrics::UPKEEP_EVERY, stop.clone()));
    let health = HealthState { client: client.clone(), metrics };
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

/// Starts the Discord side (command registration, relay, gateway) and
/// returns its routes.
fn discord_routes<S: Clone + Send + Sync + 'static>(
    discord: &DiscordConfig,
    engine: &Arc<Engine>,
    js: &async_nats::jetstream::Context,
    permissions: &Permissions,
    stop: &CancellationToken,
) -> anyhow::Result<Router<S>> {
    let api =
        discord::api::DiscordApi::new(&discord.api_url, discord.bot_token.clone(), discord.application_id.clone())?;
    if discord.application_id.is_some() && api.can_post() {
        let api = api.clone();
        tokio::spawn(async move {
            match api.register_command().await {
                Ok(()) => info!("discord /mesh command registered"),
                Err(e) => tracing::warn!(error = %e, "discord /mesh command not registered"),
            }
        });
    }
    if let Some(channel) = &discord.notify_channel {
        let (api, channel) = (api.clone(), channel.clone());
        let post = move |note: crate::notify::Notification| {
            let (api, channel) = (api.clone(), channel.clone());
            // The client waits out Discord's 429 `retry_after` itself.
            async move {
                api.post(&channel, &note.reply, None)
                    .await
                    .map(drop)
                    .map_err(|e| crate::notify::PostFailure::new(e.to_string()))
            }
        };
        // Well within Discord's five messages per five seconds in a channel.
        let relay = crate::notify::relay(js.clone(), "discord", NOTIFY_INTERVAL, stop.clone(), post);
        tokio::spawn(relay);
    }
    if let (true, Some(token)) = (discord.gateway, &discord.bot_token) {
        tokio::spawn(discord::gateway::run(
            token.clone(),
            discord.api_url.clone(),
            engine.clone(),
            api.clone(),
            stop.clone(),
        ));
        info!("discord gateway: !mesh message commands");
    }
    let Some(public_key) = &discord.public_key else {
        return Ok(Router::new());
    };
    let state = discord::interactions::DiscordState {
        engine: engine.clone(),
        api,
        public_key: Arc::new(public_key.clone()),
        permissions: Arc::new(permissions.clone()),
    };
    info!("discord interactions on /discord/interactions");
    Ok(Router::new().route("/discord/interactions", post(discord::interactions::handle).with_state(state)))
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
