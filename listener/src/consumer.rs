//! One agent's pull loop: look up and check the durable consumer (never
//! create it: the bot does), pull in batches, hand each message to
//! [`crate::delivery::handle`], and stop pulling on pause or shutdown without
//! acking anything undelivered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::delivery::{self, AgentEntry, Deps};
use crate::gateway::Gateway;
use crate::layout_check::{self, LayoutError};
use crate::state::AgentState;

/// Settings of one agent loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Deliveries in flight asked for (`--concurrency`); the consumer may allow fewer.
    pub concurrency: usize,
    /// Ack wait asked for (`--ack-wait`); the consumer's applies.
    pub ack_wait: Duration,
}

/// Messages asked for per pull request.
const PULL_BATCH: usize = 128;
/// How long one pull request lives on the server.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Wait between attempts to bind a consumer that failed.
const REBIND_DELAY: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled. `entry` carries registry updates (a
/// rotated token applies from the next request on); `paused` stops pulling
/// while it is true. A missing consumer is waited for; one set up otherwise
/// than the layout says ends the loop with the error (the process stops).
pub async fn run_agent<G: Gateway + Clone>(
    shared: Arc<Deps<G>>,
    state: Arc<AgentState>,
    entry: watch::Receiver<Arc<AgentEntry>>,
    mut paused: watch::Receiver<bool>,
    config: LoopConfig,
    stop: CancellationToken,
) -> Result<(), LayoutError> {
    let agent = entry.borrow().agent.id.clone();
    while !stop.is_cancelled() {
        let is_paused = *paused.borrow();
        state.set_paused(is_paused);
        if is_paused {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = paused.wait_for(|p| !*p) => continue,
            }
        }
        let find = || crate::lookup::find_consumer(&shared.js, &agent);
        let consumer = match crate::lookup::wait_for(agent.as_str(), find, stop.cancelled()).await {
            None => break,
            Some(Ok(consumer)) => consumer,
            Some(Err(e)) => {
                error!(agent = %agent, error = %e, "refusing to run");
                return Err(e);
            }
        };
        // The consumer's ack wait and in-flight window apply, whatever the flags asked for.
        let (run, note) = layout_check::effective(config.concurrency, config.ack_wait, consumer.cached_info());
        if let Some(note) = note {
            warn!(agent = %agent, "{note}");
        }
        let window = usize::try_from(consumer.cached_info().config.max_ack_pending).unwrap_or(1).max(1);
        let in_order = run.concurrency <= 1 && window > 1;
        let deps = Arc::new(Deps {
            ack_wait: run.ack_wait,
            confirm_acks: run.concurrency <= 1,
            in_order,
            ..Deps::clone(&shared)
        });
        let failure = if in_order {
            crate::ordered::run_window(&deps, &state, &entry, &mut paused, &stop, &consumer, window).await
        } else if run.concurrency <= 1 {
            info!(agent = %agent, concurrency = 1, "pulling one message at a time");
            pull_one_at_a_time(&deps, &state, &entry, &mut paused, &stop, &consumer).await
        } else {
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
            info!(agent = %agent, concurrency = run.concurrency, ack_wait_ms = run.ack_wait.as_millis() as u64, "pulling");
            let limit = run.concurrency;
            // Above concurrency 1 the server lets up to three times `limit` more
            // messages wait here (see `ConsumerTuning::for_concurrency`), so a free slot
            // starts the next message at once instead of after an ack round trip.
            let prefetch = 3 * limit;
            let mut waiting: VecDeque<jetstream::Message> = VecDeque::with_capacity(prefetch);
            let mut keep_waiting_alive = tokio::time::interval(progress_period(deps.ack_wait));
            keep_waiting_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut connects = deps.connects.clone();
            connects.mark_unchanged();
            let mut in_flight = FuturesUnordered::new();
            let failure = loop {
                while in_flight.len() < limit
                    && let Some(msg) = waiting.pop_front()
                {
                    let current = entry.borrow().clone();
                    let (deps, state) = (&*deps, &*state);
                    in_flight.push(async move {
                        delivery::handle(deps, &current, state, msg).await;
                    });
                }
                let keep_alive_due = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break None,
                    _ = paused.wait_for(|p| *p) => break None,
                    _ = connects.changed() => break Some("reconnected to NATS; pulling again".to_owned()),
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => false,
                    item = messages.next(), if in_flight.len() < limit || waiting.len() < prefetch => match item {
                        Some(Ok(msg)) => {
                            waiting.push_back(msg);
                            false
                        }
                        Some(Err(e)) => break Some(e.to_string()),
                        None => break Some("pull stream ended".to_owned()),
                    },
                    _ = keep_waiting_alive.tick(), if !waiting.is_empty() => true,
                };
                // A waiting message's ack wait runs too: keep it from being redelivered.
                if keep_alive_due {
                    for msg in &waiting {
                        if let Err(e) = msg.ack_with(AckKind::Progress).await {
                            debug!(agent = %agent, error = %e, "in-progress ack of a waiting message failed");
                        }
                    }
                }
            };
            // Close the pull before handing anything back: a message NAKed while
            // it is open comes straight back into it (using up a delivery
            // attempt) and is lost with the subscription (waiting out the ack
            // wait). What is already buffered is taken first, then the
            // unstarted messages go back at once (not after the in-flight
            // ones, which may take a whole gateway call) and the in-flight
            // ones are finished.
            while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
                waiting.push_back(msg);
            }
            drop(messages);
            let mut released = 0;
            for msg in waiting.drain(..) {
                if msg.ack_with(AckKind::Nak(None)).await.is_ok() {
                    released += 1;
                }
            }
            while in_flight.next().await.is_some() {}
            if released > 0 {
                debug!(agent = %agent, released, "released pulled messages");
            }
            failure
        };
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
    Ok(())
}

/// At concurrency 1: one pull request for one message, and the next request
/// only once that message is settled. So no request is open while a message
/// is in flight, and its ack (during a pause's or stop's drain too) cannot
/// make the server hand the next message to a request nobody reads any more,
/// where it would wait out a whole ack wait or be handed back having used up
/// a delivery attempt. A pause or stop while a request waits drops it (the
/// server hands nothing to a request whose reply subject lost its
/// subscriber); a message that raced in with the pause is handed back
/// unstarted. Returns why pulling failed, or `None` on pause or stop.
async fn pull_one_at_a_time<G: Gateway>(
    deps: &Deps<G>,
    state: &AgentState,
    entry: &watch::Receiver<Arc<AgentEntry>>,
    paused: &mut watch::Receiver<bool>,
    stop: &CancellationToken,
    consumer: &jetstream::consumer::PullConsumer,
) -> Option<String> {
    let mut connects = deps.connects.clone();
    connects.mark_unchanged();
    loop {
        let mut request = match consumer.batch().max_messages(1).expires(PULL_EXPIRES).messages().await {
            Ok(request) => request,
            Err(e) => return Some(e.to_string()),
        };
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            _ = paused.wait_for(|p| *p) => return None,
            _ = connects.changed() => return Some("reconnected to NATS; pulling again".to_owned()),
            item = request.next() => match item {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return Some(e.to_string()),
                // The request expired empty: ask again.
                None => continue,
            },
        };
        drop(request);
        if stop.is_cancelled() || *paused.borrow() {
            if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                debug!(error = %e, "handing back a message pulled as a pause began failed; redelivered after the ack wait");
            }
            return None;
        }
        let current = entry.borrow().clone();
        delivery::handle(deps, &current, state, msg).await;
    }
}

/// How often messages waiting for a free slot get an in-progress ack: well
/// inside the ack wait.
pub(crate) fn progress_period(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(100))
}
