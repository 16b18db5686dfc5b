//! The HTTP call to an agent's gateway, behind a small trait so delivery logic
//! can be exercised without sockets.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::hook::HookRequest;
use crate::policy::Outcome;

/// Largest gateway response body read (a chat reply), in bytes.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// What the gateway answered.
#[derive(Debug, Clone)]
pub struct Response {
    /// The outcome the policy decides on.
    pub outcome: Outcome,
    /// The response body of a 2xx answer (capped at [`MAX_RESPONSE_BYTES`]).
    pub body: Bytes,
    /// Set when `body` is not the whole body: longer than the cap, or the
    /// read failed part way. A chat reply must not be taken from such a body.
    pub body_error: Option<BodyError>,
    /// How long the call took.
    pub elapsed: Duration,
}

/// Why a 2xx answer's body is not all there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the gateway's answer is larger than the {} MiB the listener reads", MAX_RESPONSE_BYTES / (1024 * 1024))]
    TooLarge,
    #[error("reading the gateway's answer failed: {0}")]
    Read(String),
}

/// Sends hook requests.
pub trait Gateway: Send + Sync + 'static {
    /// POSTs one request and reports what happened. Never panics, never errors:
    /// every failure is an [`Outcome`].
    fn post(&self, request: &HookRequest) -> impl Future<Output = Response> + Send;

    /// `GET /health` on a gateway base URL: true when it answered 2xx.
    fn health(&self, url: url::Url) -> impl Future<Output = bool> + Send;
}

/// The real gateway client: one connection pool for every agent.
#[derive(Debug, Clone)]
pub struct HttpGateway {
    client: reqwest::Client,
}

/// Why the gateway client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the gateway CA file {path} ({CA_FILE_ENV}) cannot be read: {source}; fix the path or unset it")]
    CaUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the gateway CA file {path} ({CA_FILE_ENV}) holds no usable PEM certificate{detail}; give it the CA that signed the gateways' certificates"
    )]
    CaInvalid { path: PathBuf, detail: String },
    #[error("the HTTP client cannot be built: {0}")]
    Build(#[source] reqwest::Error),
}

/// The variable naming extra CA certificates (PEM) trusted for `https://` gateways.
pub const CA_FILE_ENV: &str = "MESH_GATEWAY_CA_FILE";

/// The CA certificates of a PEM file (one or several), for
/// [`HttpGateway::new`]: trusted besides the system's roots.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let pem = std::fs::read(path).map_err(|source| ClientError::CaUnreadable { path: path.to_owned(), source })?;
    let invalid = |detail: String| ClientError::CaInvalid { path: path.to_owned(), detail };
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| invalid(format!(" ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(String::new()));
    }
    Ok(certs)
}

impl HttpGateway {
    /// A client with a per-request timeout that trusts the system's roots and
    /// `extra_roots` (a private CA of `https://` gateways, [`CA_FILE_ENV`]);
    /// redirects are not followed (a hook URL that redirects is a
    /// misconfiguration, and following it could leak the token).
    pub fn new(timeout: Duration, extra_roots: Vec<reqwest::Certificate>) -> Result<Self, ClientError> {
        install_tls_provider();
        let client = reqwest::Client::builder()
            .tls_certs_merge(extra_roots)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("mesh-listener/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { client })
    }
}

/// Installs rustls' ring provider once per process (reqwest is built without a default one).
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Gateway for HttpGateway {
    async fn post(&self, request: &HookRequest) -> Response {
        let started = Instant::now();
        let sent = self
            .client
            .post(request.url.clone())
            .bearer_auth(request.token.expose())
            .header("Idempotency-Key", &request.idempotency_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(request.body.clone())
            .send()
            .await;
        let (outcome, (body, body_error)) = match sent {
            Ok(response) => {
                let code = response.status().as_u16();
                let retry_after = parse_retry_after(response.headers().get(reqwest::header::RETRY_AFTER));
                let body =
                    if response.status().is_success() { read_capped(response).await } else { (Bytes::new(), None) };
                (Outcome::Status { code, retry_after }, body)
            }
            Err(e) if e.is_timeout() => (Outcome::Timeout, (Bytes::new(), None)),
            Err(e) => (Outcome::Unreachable(describe_error(&e)), (Bytes::new(), None)),
        };
        Response { outcome, body, body_error, elapsed: started.elapsed() }
    }

    async fn health(&self, url: url::Url) -> bool {
        let Ok(url) = url.join("health") else {
            return false;
        };
        matches!(self.client.get(url).timeout(Duration::from_secs(2)).send().await, Ok(r) if r.status().is_success())
    }
}

/// Reads a body up to [`MAX_RESPONSE_BYTES`]; what is read is returned
/// either way, with the reason when it is not the whole body.
async fn read_capped(mut response: reqwest::Response) -> (Bytes, Option<BodyError>) {
    let mut body = Vec::new();
    let error = loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_RESPONSE_BYTES => break Some(BodyError::TooLarge),
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break None,
            Err(e) => break Some(BodyError::Read(describe_error(&e))),
        }
    };
    (Bytes::from(body), error)
}

/// `Retry-After` in seconds; the HTTP-date form is treated as absent.
pub fn parse_retry_after(value: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// A one-line description of a transport error without the URL (which the
/// logs already carry as a field) and without any header value.
fn describe_error(e: &reqwest::Error) -> String {
    let mut kind = if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_request() {
        "request failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "response body failed".to_owned()
    } else {
        "transport error".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !text.is_empty() && !kind.contains(&text) {
            kind = format!("{kind}: {text}");
        }
        source = inner.source();
    }
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_cannot_serve_says_which_file_and_setting_to_fix() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = dir.join("missing.pem");
        let err = load_ca_file(&missing).expect_err("a missing file").to_string();
        assert!(err.contains("missing.pem") && err.contains(CA_FILE_ENV) && err.contains("fix the path"), "{err}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("writing");
        let err = load_ca_file(&empty).expect_err("no certificate").to_string();
        assert!(err.contains("empty.pem") && err.contains("no usable PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
