//! One agent's pull loop: bind the durable consumer, pull in batches, hand
//! each message to [`crate::delivery::handle`], and stop pulling on pause or
//! shutdown without acking anything undelivered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::delivery::{self, AgentEntry, Deps};
use crate::gateway::Gateway;
use crate::state::AgentState;

/// Settings of one agent loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Deliveries in flight; 1 keeps order.
    pub concurrency: usize,
    /// Consumer tuning.
    pub tuning: mesh_protocol::layout::ConsumerTuning,
}

/// Messages asked for per pull request.
const PULL_BATCH: usize = 64;
/// How long one pull request lives on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Wait between attempts to bind a consumer that failed.
const REBIND_DELAY: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled. `entry` carries registry updates (a
/// rotated token applies from the next request on); `paused` stops pulling
/// while it is true.
pub async fn run_agent<G: Gateway>(
    deps: Arc<Deps<G>>,
    state: Arc<AgentState>,
    entry: watch::Receiver<Arc<AgentEntry>>,
    mut paused: watch::Receiver<bool>,
    config: LoopConfig,
    stop: CancellationToken,
) {
    let agent = entry.borrow().agent.id.clone();
    while !stop.is_cancelled() {
        let is_paused = *paused.borrow();
        state.paused.store(is_paused, std::sync::atomic::Ordering::Relaxed);
        if is_paused {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = paused.wait_for(|p| !*p) => continue,
            }
        }
        let consumer = match crate::nats::bind_consumer(&deps.js, &agent, config.tuning).await {
            Ok(consumer) => consumer,
            Err(e) => {
                warn!(agent = %agent, error = %e, "cannot bind consumer; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(REBIND_DELAY) => continue,
                }
            }
        };
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(Duration::from_secs(5))
            .expires(PULL_EXPIRES)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(e) => {
                warn!(agent = %agent, error = %e, "cannot start pulling; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(REBIND_DELAY) => continue,
                }
            }
        };
        info!(agent = %agent, concurrency = config.concurrency, "pulling");
        let limit = config.concurrency.max(1);
        let mut connects = deps.connects.clone();
        connects.mark_unchanged();
        let mut in_flight = FuturesUnordered::new();
        let failure = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
                _ = paused.wait_for(|p| *p) => break None,
                _ = connects.changed() => break Some("reconnected to NATS; pulling again".to_owned()),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                item = messages.next(), if in_flight.len() < limit => match item {
                    Some(Ok(msg)) => {
                        let current = entry.borrow().clone();
                        let (deps, state) = (&*deps, &*state);
                        in_flight.push(async move {
                            delivery::handle(deps, &current, state, msg).await;
                        });
                    }
                    // Any error (a missed heartbeat after a server restart, a
                    // deleted consumer) rebinds: a fresh pull is cheaper than a stall.
                    Some(Err(e)) => break Some(e.to_string()),
                    None => break Some("pull stream ended".to_owned()),
                },
            }
        };
        // Finish what is in flight (acked or NAKed), then hand back what was
        // pulled but not started, so it is redelivered at once instead of
        // after the ack wait.
        while in_flight.next().await.is_some() {}
        let mut released = 0;
        while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
            if msg.ack_with(AckKind::Nak(None)).await.is_ok() {
                released += 1;
            }
        }
        if released > 0 {
            debug!(agent = %agent, released, "released pulled messages");
        }
        match failure {
            Some(e) => {
                warn!(agent = %agent, error = %e, "pull stream failed; rebinding");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(REBIND_DELAY) => {}
                }
            }
            None if *paused.borrow() => info!(agent = %agent, "paused; not pulling"),
            None => {}
        }
    }
    info!(agent = %agent, "stopped");
}
