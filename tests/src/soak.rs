//! The soak workload of `mesh-bench`: a long paced stream of messages through
//! one listener process to the sink, with nobody scraping `/metrics`, and the
//! listener's resident memory sampled as it goes. Growth per message shows up
//! as a rising RSS; a flat one means nothing is kept per message.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use mesh_protocol::{Envelope, Recipient};

use crate::bench::{ListenerProcess, Sink};

/// Publish acks awaited at most at once.
const ACKS_IN_FLIGHT: usize = 256;
/// Messages published but not yet delivered, at most: the publisher waits
/// for the listener, so the run measures the listener, not a backlog.
const AHEAD: usize = 5_000;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct SoakConfig {
    /// Messages to push through.
    pub messages: usize,
    /// Publish rate cap, messages per second (the listener's pace below it).
    pub rate: f64,
    /// Messages between two RSS samples.
    pub sample_every: usize,
}

/// One RSS sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Messages delivered to the sink when it was taken.
    pub delivered: usize,
    /// Seconds since the first publish.
    pub at_s: f64,
    /// The listener's VmRSS, KiB.
    pub rss_kib: u64,
}

/// What the soak measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakReport {
    /// RSS while pulling, before the first message.
    pub idle_kib: u64,
    /// Every sample, in order (the first after `sample_every` deliveries).
    pub samples: Vec<Sample>,
    /// Messages the sink received.
    pub delivered: usize,
    /// Seconds from the first publish to the last delivery.
    pub elapsed_s: f64,
}

impl SoakReport {
    /// The first sample (after warm-up: the first `sample_every` messages).
    pub fn start_kib(&self) -> u64 {
        self.samples.first().map_or(self.idle_kib, |s| s.rss_kib)
    }

    /// The last sample.
    pub fn end_kib(&self) -> u64 {
        self.samples.last().map_or(self.idle_kib, |s| s.rss_kib)
    }

    /// The largest sample.
    pub fn max_kib(&self) -> u64 {
        self.samples.iter().map(|s| s.rss_kib).max().unwrap_or(self.idle_kib)
    }
}

/// Pushes `config.messages` messages for `agent` through `listener` (already
/// pulling) to `sink` at `config.rate`, sampling the listener's RSS from
/// `/proc/<pid>/status` every `config.sample_every` deliveries.
pub async fn run(
    js: &jetstream::Context,
    sink: &Sink,
    listener: &ListenerProcess,
    agent: &str,
    config: SoakConfig,
) -> anyhow::Result<SoakReport> {
    sink.reset();
    let idle_kib = listener.rss_kib();
    let started = Instant::now();
    let publisher =
        tokio::spawn(publish_paced(js.clone(), sink.counter(), agent.to_owned(), config.messages, config.rate));
    let mut samples = Vec::new();
    let mut next = config.sample_every.max(1);
    // A generous bound: the publisher sets the pace; a stall ends the run early.
    let stall = Duration::from_secs(60);
    while next <= config.messages {
        if !sink.wait_total(next, stall).await {
            break;
        }
        sink.forget_arrivals();
        let sample = Sample { delivered: next, at_s: started.elapsed().as_secs_f64(), rss_kib: listener.rss_kib() };
        eprintln!(
            "soak: {:>9} delivered, {:>6.1} s, RSS {:.1} MB",
            sample.delivered,
            sample.at_s,
            sample.rss_kib as f64 / 1024.0
        );
        samples.push(sample);
        next += config.sample_every.max(1);
    }
    publisher.await??;
    let delivered = sink.total();
    Ok(SoakReport { idle_kib, samples, delivered, elapsed_s: started.elapsed().as_secs_f64() })
}

/// Publishes `n` messages to `agent` at up to `rate` per second and at most
/// [`AHEAD`] ahead of `delivered`, each with its own `Nats-Msg-Id`, at most
/// [`ACKS_IN_FLIGHT`] acks awaited at once; keeps no per-message state.
async fn publish_paced(
    js: jetstream::Context,
    mut delivered: tokio::sync::watch::Receiver<usize>,
    agent: String,
    n: usize,
    rate: f64,
) -> anyhow::Result<()> {
    let to = Recipient::Agent(agent.parse()?);
    // Ticks of 10 ms, each publishing what the rate owes by then.
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut sent = 0;
    while sent < n {
        ticker.tick().await;
        let owed = ((started.elapsed().as_secs_f64() * rate) as usize).min(n);
        while sent < owed {
            if sent >= AHEAD {
                delivered.wait_for(|d| *d + AHEAD > sent).await?;
            }
            let envelope = Envelope::new("bench", to.clone(), format!("bench {sent}"))?;
            let subject = envelope.to.subject().ok_or_else(|| anyhow::anyhow!("no subject"))?.to_string();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
            let ack = js.publish_with_headers(subject, headers, envelope.encode()?.into()).await?;
            acks.push(ack.into_future());
            sent += 1;
            if acks.len() >= ACKS_IN_FLIGHT {
                acks.next().await.transpose()?;
            }
        }
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
            ack?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    Ok(())
}
