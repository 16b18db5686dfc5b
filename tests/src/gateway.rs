//! The recording gateway: a real HTTP server on `127.0.0.1:0` that records
//! every request and answers from a script (a queue of statuses, then 200).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use tokio::sync::watch;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request path.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The JSON body (Null when not JSON).
    pub body: serde_json::Value,
    /// The status the gateway answered.
    pub status: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
}

impl Recorded {
    /// The `text` field of a wake body.
    pub fn text(&self) -> &str {
        self.body.get("text").and_then(|v| v.as_str()).unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: Vec<Recorded>,
    script: VecDeque<u16>,
    delay: Option<Duration>,
    chat_reply: Option<String>,
    failure_rate: f64,
    rng_state: u64,
    bodies: std::collections::BTreeMap<String, serde_json::Value>,
    retry_after: Option<u64>,
}

/// A recording gateway; serves until the test's runtime ends.
#[derive(Debug, Clone)]
pub struct RecordingGateway {
    inner: Arc<Mutex<Inner>>,
    count: watch::Receiver<usize>,
    count_tx: Arc<watch::Sender<usize>>,
    /// While true, requests are recorded but not answered.
    latch: Arc<watch::Sender<bool>>,
    /// Address it listens on.
    pub addr: std::net::SocketAddr,
}

impl RecordingGateway {
    /// Starts a gateway that answers 200 to everything.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("binding the gateway");
        let gateway = Self::recording(listener.local_addr().expect("local addr"));
        let app = Router::new().fallback(any(record)).with_state(gateway.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        gateway
    }

    /// Starts a gateway that answers 200 to everything over HTTPS only, with
    /// `tls`'s certificate; connections whose handshake fails are dropped
    /// (and recorded nowhere).
    pub async fn start_tls(tls: &crate::tls::TestTls) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("binding the gateway");
        let gateway = Self::recording(listener.local_addr().expect("local addr"));
        let app = Router::new().fallback(any(record)).with_state(gateway.clone());
        let listener = crate::tls::TlsListener::new(listener, tls.server_config());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        gateway
    }

    fn recording(addr: std::net::SocketAddr) -> Self {
        let (count_tx, count) = watch::channel(0);
        let latch = Arc::new(watch::channel(false).0);
        Self { inner: Arc::default(), count, count_tx: Arc::new(count_tx), latch, addr }
    }

    /// The wake hook URL.
    pub fn hooks_url(&self) -> String {
        format!("http://{}/hooks/wake", self.addr)
    }

    /// Answers the next requests with these statuses, in order, then 200 again.
    pub fn script(&self, statuses: impl IntoIterator<Item = u16>) {
        self.lock().script.extend(statuses);
    }

    /// Holds every answer (requests are still recorded) until [`Self::release`].
    pub fn hold(&self) {
        self.latch.send_replace(true);
    }

    /// Answers the held requests and those after them.
    pub fn release(&self) {
        self.latch.send_replace(false);
    }

    /// Waits this long before answering each request.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = Some(delay);
    }

    /// Answers 500 to this fraction of requests (after the script), chosen by
    /// a seeded generator so a run is reproducible.
    pub fn set_failure_rate(&self, rate: f64, seed: u64) {
        let mut inner = self.lock();
        inner.failure_rate = rate;
        inner.rng_state = seed.max(1);
    }

    /// Answers requests to `path` with this JSON body (a Slack API recorder, say).
    pub fn respond_with(&self, path: &str, body: serde_json::Value) {
        self.lock().bodies.insert(path.to_owned(), body);
    }

    /// Sends `Retry-After: secs` with every 429 it answers (Slack's rate limit).
    pub fn set_retry_after(&self, secs: u64) {
        self.lock().retry_after = Some(secs);
    }

    /// Requests to one path.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `n` requests to `path` arrived; panics after `timeout`.
    pub async fn wait_for_path(&self, path: &str, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut count = self.count.clone();
        loop {
            let got = self.requests_to(path);
            if got.len() >= n {
                return got;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {n} requests to {path} within {timeout:?}: {:?}",
                got.len(),
                self.requests()
            );
            let _ = tokio::time::timeout(left, count.changed()).await;
        }
    }

    /// Requests answered 2xx.
    pub fn successes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }

    /// Answers chat completions with this reply.
    pub fn set_chat_reply(&self, reply: &str) {
        self.lock().chat_reply = Some(reply.to_owned());
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Waits until at least `n` requests arrived (answered or not); panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        match self.try_wait_for(n, timeout).await {
            Ok(requests) => requests,
            Err(got) => panic!("gateway got {got} of {n} expected requests within {timeout:?}"),
        }
    }

    /// Waits until at least `n` requests arrived (answered or not); after
    /// `timeout`, how many did (so a test can show its processes' output).
    pub async fn try_wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Recorded>, usize> {
        let mut count = self.count.clone();
        match tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await {
            Ok(_) => Ok(self.requests()),
            Err(_) => Err(self.requests().len()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type Answer = (StatusCode, HeaderMap, String);

async fn record(
    State(gw): State<RecordingGateway>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let mut json = HeaderMap::new();
    json.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    // Health checks are answered but not recorded: tests count deliveries.
    if method == Method::GET && uri.path() == "/health" {
        return (StatusCode::OK, json, "{}".to_owned());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut recorded = Recorded {
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        status: 200,
        at: std::time::Instant::now(),
    };
    let is_chat = recorded.path == "/v1/chat/completions";
    let canned = gw.lock().bodies.get(&recorded.path).cloned();
    let (status, delay, reply) = {
        let mut inner = gw.lock();
        let status = match inner.script.pop_front() {
            Some(status) => status,
            None if inner.failure_rate > 0.0 && next_unit(&mut inner.rng_state) < inner.failure_rate => 500,
            None => 200,
        };
        if let (429, Some(secs)) = (status, inner.retry_after) {
            json.insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        recorded.status = status;
        inner.requests.push(recorded);
        (status, inner.delay, inner.chat_reply.clone())
    };
    gw.count_tx.send_modify(|c| *c += 1);
    let _ = gw.latch.subscribe().wait_for(|held| !held).await;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(canned) = canned {
        return (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), json, canned.to_string());
    }
    let body = match (is_chat, reply) {
        (true, reply) => {
            // Without a scripted reply: a completion with no text (nothing to route back).
            let content = reply.unwrap_or_default();
            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
        }
        _ => "{}".to_owned(),
    };
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), json, body)
}

/// xorshift64: a small reproducible generator for scripted failures.
fn next_unit(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    (x >> 11) as f64 / (1u64 << 53) as f64
}
