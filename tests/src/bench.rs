//! The benchmark behind `mesh-bench`: starts its own nats-server, a fast sink
//! gateway and listener processes, runs each workload, and reports figures.
//! It measures; it asserts nothing.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use futures::StreamExt;
use mesh_protocol::{Envelope, Recipient};
use serde::Serialize;
use tokio::sync::watch;

use crate::server::TestNats;

/// One arrival at the sink.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Message index parsed from the text (`bench <i>`).
    pub index: u64,
    /// When it arrived.
    pub at: Instant,
}

/// A fast gateway that records arrivals per agent and answers 200.
#[derive(Debug, Clone)]
pub struct Sink {
    arrivals: Arc<Mutex<BTreeMap<String, Vec<Arrival>>>>,
    total_tx: Arc<watch::Sender<usize>>,
    total: watch::Receiver<usize>,
    /// Its address.
    pub addr: std::net::SocketAddr,
}

impl Sink {
    /// Starts the sink on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (total_tx, total) = watch::channel(0);
        let sink = Self { arrivals: Arc::default(), total_tx: Arc::new(total_tx), total, addr };
        let app = Router::new()
            .route("/hooks/{agent}", post(arrive))
            .route("/health", axum::routing::get(|| async { "ok" }))
            .with_state(sink.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(sink)
    }

    /// Forgets every arrival.
    pub fn reset(&self) {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.total_tx.send_replace(0);
    }

    /// Waits until `n` arrivals in all; returns false on timeout.
    pub async fn wait_total(&self, n: usize, timeout: Duration) -> bool {
        let mut total = self.total.clone();
        tokio::time::timeout(timeout, total.wait_for(|t| *t >= n)).await.is_ok()
    }

    /// Arrivals counted so far (kept across [`Sink::forget_arrivals`]).
    pub fn total(&self) -> usize {
        *self.total.borrow()
    }

    /// The arrival count, to wait on.
    pub fn counter(&self) -> watch::Receiver<usize> {
        self.total.clone()
    }

    /// Drops the recorded arrivals but keeps counting (long runs).
    pub fn forget_arrivals(&self) {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Arrivals of one agent.
    pub fn arrivals(&self, agent: &str) -> Vec<Arrival> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner()).get(agent).cloned().unwrap_or_default()
    }

    /// Arrivals of every agent.
    pub fn all(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner()).values().flatten().copied().collect()
    }
}

async fn arrive(State(sink): State<Sink>, UrlPath(agent): UrlPath<String>, body: Bytes) -> &'static str {
    let at = Instant::now();
    let index = parse_index(&body).unwrap_or(u64::MAX);
    sink.arrivals.lock().unwrap_or_else(|p| p.into_inner()).entry(agent).or_default().push(Arrival { index, at });
    sink.total_tx.send_modify(|t| *t += 1);
    "ok"
}

/// Finds `bench <n>` at the end of the wake text without a JSON parse.
fn parse_index(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("bench ")? + 6;
    let digits: String = text[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Writes a registry of `n` agents `a0..` pointing at the sink.
pub fn write_registry(dir: &Path, sink: &Sink, n: usize) -> std::io::Result<PathBuf> {
    let mut map = serde_json::Map::new();
    for i in 0..n {
        map.insert(
            format!("a{i}"),
            serde_json::json!({
                "hooks_token": format!("bench-token-{i}"),
                "hooks_url": format!("http://{}/hooks/a{i}", sink.addr),
            }),
        );
    }
    let path = dir.join(format!("tokens-{n}.json"));
    std::fs::write(&path, serde_json::Value::Object(map).to_string())?;
    Ok(path)
}

/// A listener process under measurement.
#[derive(Debug)]
pub struct ListenerProcess {
    child: tokio::process::Child,
}

impl ListenerProcess {
    /// Starts the listener binary next to this executable.
    pub fn start(nats: &TestNats, registry: &Path, args: &[&str]) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("mesh-listener-under-test");
        let child = tokio::process::Command::new(bin)
            .args(args)
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", registry)
            .env("MESH_LOG", "error")
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// CPU seconds used so far (user + system), from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Resident set size in KiB, from `VmRSS` in /proc/<pid>/status.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// RSS and PSS in KiB, from /proc/<pid>/smaps_rollup.
    pub fn memory_kib(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("Rss:"), field("Pss:"))
    }

    /// Stops it gracefully (SIGTERM: in-flight deliveries finish and are acked).
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU seconds process `pid` used so far (user + system), from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the comm field.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size of process `pid` in KiB, from `VmRSS` in /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Publishes `n` messages to `agent` at full speed (JetStream, acked, 256
/// in flight); returns each index's publish instant.
pub async fn publish_burst(js: &jetstream::Context, agent: &str, n: usize) -> anyhow::Result<Vec<Instant>> {
    let to = Recipient::Agent(agent.parse()?);
    let mut sent = Vec::with_capacity(n);
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let envelope = Envelope::new("bench", to.clone(), format!("bench {i}"))?;
        sent.push(Instant::now());
        pending.push(publish(js, envelope).await?.into_future());
        if pending.len() >= 256 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    Ok(sent)
}

/// What a live burst measured at the sink for one agent.
#[derive(Debug, Clone, Copy)]
pub struct BurstFigures {
    /// Messages per second from the first publish to the last arrival.
    pub rate: f64,
    /// Latency percentiles (publish instant to arrival), ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Arrivals counted.
    pub delivered: usize,
}

/// The figures of a burst published at `sent` instants, from `arrivals`.
pub fn burst_figures(sent: &[Instant], arrivals: &[Arrival]) -> BurstFigures {
    let first = sent.first().copied();
    let last = arrivals.iter().map(|a| a.at).max();
    let rate = match (first, last) {
        (Some(first), Some(last)) if last > first => arrivals.len() as f64 / (last - first).as_secs_f64(),
        _ => f64::NAN,
    };
    let samples: Vec<Duration> = arrivals
        .iter()
        .filter_map(|a| sent.get(a.index as usize).map(|s| a.at.saturating_duration_since(*s)))
        .collect();
    let (p50_ms, p99_ms, _) = percentiles(samples);
    BurstFigures { rate, p50_ms, p99_ms, delivered: arrivals.len() }
}

/// Publishes `n` messages to `agent` as fast as acks allow (256 in flight).
pub async fn publish_backlog(js: &jetstream::Context, agent: &str, n: usize) -> anyhow::Result<Duration> {
    let to = Recipient::Agent(agent.parse()?);
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let envelope = Envelope::new("bench", to.clone(), format!("bench {i}"))?;
        pending.push(publish(js, envelope).await?.into_future());
        if pending.len() >= 256 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    Ok(started.elapsed())
}

async fn publish(js: &jetstream::Context, envelope: Envelope) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let subject = envelope.to.subject().ok_or_else(|| anyhow::anyhow!("no subject"))?.to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
    Ok(js.publish_with_headers(subject, headers, envelope.encode()?.into()).await?)
}

/// Publishes `n` messages at `rate` per second; returns each index's publish instant.
pub async fn publish_paced(js: &jetstream::Context, agent: &str, n: usize, rate: f64) -> anyhow::Result<Vec<Instant>> {
    let to = Recipient::Agent(agent.parse()?);
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(n);
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        ticker.tick().await;
        let envelope = Envelope::new("bench", to.clone(), format!("bench {i}"))?;
        sent.push(Instant::now());
        acks.push(publish(js, envelope).await?.into_future());
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
            ack?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    Ok(sent)
}

/// p50, p99 and max of a set of durations, in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.50), at(0.99), at(1.0))
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Workload name.
    pub workload: String,
    /// Figures, by name.
    pub figures: BTreeMap<String, f64>,
    /// How it was measured.
    pub method: String,
}

impl Row {
    /// A row.
    pub fn new(workload: impl Into<String>, method: impl Into<String>) -> Self {
        Self { workload: workload.into(), figures: BTreeMap::new(), method: method.into() }
    }

    /// Adds a figure.
    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.figures.insert(name.to_owned(), value);
        self
    }
}

/// Makes sure `agent`'s consumer exists with the tuning of a listener at
/// `concurrency` (so nothing published is missed; listeners create nothing),
/// and the kill switch bucket a listener waits for.
pub async fn ensure_consumer(js: &jetstream::Context, agent: &str, concurrency: usize) -> anyhow::Result<()> {
    let tuning =
        crate::fixtures::listener_tuning(concurrency, mesh_protocol::layout::ConsumerTuning::default().ack_wait);
    crate::fixtures::provision_agent(js, agent, tuning).await?;
    Ok(())
}

/// Waits until `agent`'s consumer has a waiting pull request (the listener is pulling).
pub async fn wait_pulling(js: &jetstream::Context, agent: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(stream) = js.get_stream("MESH_AGENTS").await
            && let Ok(info) = stream.consumer_info(format!("agent-{agent}")).await
            && info.num_waiting > 0
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
