//! A tiny agent gateway for the demo: checks the bearer token, prints every
//! hook call it receives, and answers chat completions with an echo.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Largest request body accepted, as a real gateway does (about 256 KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// One demo gateway's identity.
#[derive(Debug, Clone)]
pub struct DemoGateway {
    /// The agent it stands for.
    pub agent: String,
    /// The hook token it accepts.
    pub hooks_token: String,
    /// The operator token it accepts on chat completions.
    pub gateway_token: String,
}

/// Serves a demo gateway on `127.0.0.1:0`; returns its address.
pub async fn serve(gateway: DemoGateway) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    serve_on(listener, gateway);
    Ok(addr)
}

/// Serves a demo gateway on a bound listener (`mesh deploy demo-gateway`), in the background.
pub fn serve_on(listener: tokio::net::TcpListener, gateway: DemoGateway) {
    let state = Arc::new(gateway);
    let app = Router::new()
        .route("/hooks/wake", post(wake))
        .route("/hooks/agent", post(agent))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_secs(10),
        ));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given == token)
}

async fn wake(State(gw): State<Arc<DemoGateway>>, headers: HeaderMap, body: axum::Json<Value>) -> StatusCode {
    if !authorized(&headers, &gw.hooks_token) {
        return StatusCode::UNAUTHORIZED;
    }
    let text = body.get("text").and_then(Value::as_str).unwrap_or("");
    let mode = body.get("mode").and_then(Value::as_str).unwrap_or("");
    println!("  [{} gateway] /hooks/wake (mode {mode}): {text}", gw.agent);
    StatusCode::OK
}

async fn agent(State(gw): State<Arc<DemoGateway>>, headers: HeaderMap, body: axum::Json<Value>) -> StatusCode {
    if !authorized(&headers, &gw.hooks_token) {
        return StatusCode::UNAUTHORIZED;
    }
    let text = body.get("message").and_then(Value::as_str).unwrap_or("");
    let session = body.get("sessionKey").and_then(Value::as_str).unwrap_or("");
    println!("  [{} gateway] /hooks/agent (session {session}): {text}", gw.agent);
    StatusCode::ACCEPTED
}

async fn chat(
    State(gw): State<Arc<DemoGateway>>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    if !authorized(&headers, &gw.gateway_token) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "unauthorized"})));
    }
    let text = body.pointer("/messages/0/content").and_then(Value::as_str).unwrap_or("");
    println!("  [{} gateway] /v1/chat/completions: {text}", gw.agent);
    let reply = format!("{} here. I read you: {}", gw.agent, text.rsplit(": ").next().unwrap_or(text));
    (StatusCode::OK, axum::Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})))
}
