//! `/health`, `/health/live`, `/health/ready` and `/metrics` of a listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::state::FleetState;

/// Largest request body accepted (the endpoints take none).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Clone)]
struct Ctx {
    fleet: Arc<FleetState>,
    client: async_nats::Client,
    metrics: PrometheusHandle,
}

/// Serves the health and metrics endpoints on `addr` until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    fleet: Arc<FleetState>,
    client: async_nats::Client,
    api: Option<crate::agent_api::AgentApi>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let ctx = Ctx { fleet, client, metrics: crate::metrics::install() };
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        // These routes read no body: anything larger than the limit is refused with 413 up front.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .with_state(ctx);
    // The agent API has its own body limit (a message is larger than 16 KiB).
    let app = match api {
        Some(api) => app.merge(crate::agent_api::router(api.clone())).merge(crate::mcp::router(api)),
        None => app,
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    });
    Ok(bound)
}

fn nats_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

async fn health(State(ctx): State<Ctx>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let connected = nats_connected(&ctx.client);
    let uptime = ctx.fleet.started.elapsed();
    let agents: Vec<_> = ctx.fleet.agents().iter().map(|a| a.pong(uptime)).collect();
    let failing: Vec<_> = ctx.fleet.agents().iter().filter(|a| a.is_failing()).map(|a| a.id.to_string()).collect();
    let refused: serde_json::Map<String, serde_json::Value> =
        ctx.fleet.agents().iter().filter_map(|a| a.refused().map(|why| (a.id.to_string(), why.into()))).collect();
    let healthy = connected && failing.is_empty() && refused.is_empty();
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "nats": if connected { "connected" } else { "disconnected" },
        "failing_gateways": failing,
        "refused": refused,
        "uptime_s": uptime.as_secs(),
        "version": mesh_protocol::VERSION,
        "agents": agents,
    });
    (status, axum::Json(body))
}

async fn ready(State(ctx): State<Ctx>) -> (StatusCode, &'static str) {
    if nats_connected(&ctx.client) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "nats disconnected")
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    for agent in ctx.fleet.agents() {
        crate::metrics::pending(agent.id.as_str(), agent.pending.load(std::sync::atomic::Ordering::Relaxed));
        crate::metrics::paused(agent.id.as_str(), agent.paused.load(std::sync::atomic::Ordering::Relaxed));
    }
    ctx.metrics.render()
}
