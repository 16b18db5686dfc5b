//! `mesh bot`: the chat bot server. Slack slash commands and Discord
//! interactions over HTTP, Discord message commands over the gateway, health
//! and metrics endpoints, the notifications relays and the fleet monitor,
//! until ctrl-c or SIGTERM.

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
use tracing::{info, warn};

use crate::command::Permissions;
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
    /// NATS credentials and inbox prefix.
    pub nats: mesh_runtime::config::NatsAuth,
    /// The web console, when `MESH_WEB_USERS` names its users.
    pub web: Option<crate::web::WebConfig>,
    /// How long a message may wait undelivered before the bot warns that it
    /// is about to age out of `MESH_AGENTS` ([`crate::backlog`]).
    pub backlog_warn_after: Duration,
}

pub use crate::config::{
    PermissionsFileError, broadcast_ttl_from_env, discord_from_env, env, permissions_from_env, permissions_from_file,
    slack_from_env,
};

/// The engine's defaults for a registry and permissions (no two-person rule,
/// auto replicas, any host); `mesh` builds its own from [`crate::config::Settings`].
pub fn engine_config(registry_path: PathBuf, permissions: Permissions) -> EngineConfig {
    EngineConfig::new(registry_path, permissions)
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
    let client = mesh_listener::nats::connect_service(&config.nats_url, "mesh-bot", &config.nats).await?;
    let limits = crate::limits::LimitStore::from_url(config.redis_url.as_deref()).await;
    let engine =
        Engine::new(config.engine.clone(), client.clone(), limits).await?.shared_with_replicas(client.clone()).await;
    let engine = Arc::new(engine.with_containers(Arc::new(config.docker.clone())));
    let js = async_nats::jetstream::new(client.clone());
    // What listeners refuse to run on, the bot refuses to feed.
    if let Ok(registry) = mesh_listener::registry_file::load(&config.engine.registry_path, &config.engine.allowed_hosts)
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
            app = app
                .route("/slack/commands", post(slack::commands::handle).with_state(state.clone()))
                .route("/slack/interactions", post(slack::interactions::handle).with_state(state));
            info!("slack slash commands on /slack/commands, button clicks on /slack/interactions");
        }
    }
    if let Some(discord) = &config.discord {
        app = app.merge(discord_routes(discord, &engine, &js, &config.engine.permissions, &stop)?);
    }
    if let Some(web) = &config.web {
        let sources = crate::web::live::Sources {
            client: client.clone(),
            registry_path: config.engine.registry_path.clone(),
            allowed_hosts: config.engine.allowed_hosts.clone(),
        };
        let permissions = config.engine.permissions.clone();
        app = app.merge(crate::web::routes(web, engine.clone(), client.clone(), sources, permissions, stop.clone()));
        info!(users = web.users.names().count(), "web console on /");
    }
    // Listeners may not create their consumers: the bot sees to every active agent's, now and on registry changes.
    let provision = crate::provision::FollowConfig {
        registry_path: config.engine.registry_path.clone(),
        poll: PROVISION_POLL,
        replicas: config.engine.replicas,
        allowed_hosts: config.engine.allowed_hosts.clone(),
        tuning: None,
    };
    tokio::spawn(crate::provision::follow(js.clone(), provision, stop.clone().cancelled_owned()));
    tokio::spawn(crate::events::monitor(
        client.clone(),
        config.engine.registry_path.clone(),
        config.engine.allowed_hosts.clone(),
        config.engine.replicas,
        config.monitor_every,
        stop.clone(),
    ));
    let metrics = mesh_listener::metrics::install();
    let backlog = crate::backlog::WatchConfig {
        registry_path: config.engine.registry_path.clone(),
        allowed_hosts: config.engine.allowed_hosts.clone(),
        every: config.monitor_every,
        warn_after: config.backlog_warn_after,
    };
    tokio::spawn(crate::backlog::watch(client.clone(), backlog, stop.clone(), mesh_listener::metrics::backlog_age));
    tokio::spawn(crate::kill_gauge::export(js.clone(), config.engine.replicas, stop.clone()));
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
    // The peer's address tells whether a trusted proxy forwarded a request (the console's cookie).
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
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
