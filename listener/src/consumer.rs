//! One agent's pull loop: bind the durable consumer, pull in batches, hand
//! each message to [`crate::delivery::handle`], and stop pulling on pause or
//! shutdown without acking anything undelivered.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
        let messages = match consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
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
        let halt = stop.child_token();
        let pause_watch = {
            let halt = halt.clone();
            let mut paused = paused.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = halt.cancelled() => {}
                    _ = paused.wait_for(|p| *p) => halt.cancel(),
                }
            })
        };
        let deps_ref = &deps;
        let state_ref = &*state;
        let entry_ref = &entry;
        let errors = messages
            .take_until(halt.cancelled())
            .map(|item| async move {
                match item {
                    Ok(msg) => {
                        let current = entry_ref.borrow().clone();
                        delivery::handle(deps_ref, &current, state_ref, msg).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(config.concurrency.max(1))
            .filter_map(|r| async move { r.err() });
        let outcome = std::pin::pin!(errors).next().await;
        halt.cancel();
        let _ = pause_watch.await;
        match outcome {
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
