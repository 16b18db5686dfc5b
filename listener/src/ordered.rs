//! Ordered delivery with a prefetch window: at concurrency 1 on a consumer
//! that hands out `window` messages at once (its `max_ack_pending`, the
//! registry's `prefetch`), the messages are delivered strictly one after
//! another in stream order while the next ones are already here, kept alive
//! with in-progress acks. A failing head is retried in place (backoff,
//! `Retry-After`; these tries count against the dead-letter budget) while
//! those behind it wait. Pause, stop and rebind close the pull, finish the
//! head's call, and hand the rest back in order (NAKs, head first), so the
//! server redelivers them in that order.
//!
//! After a crash the server may still count messages as handed to the dead
//! process (until their ack wait runs out). Nothing is delivered until every
//! message the consumer has out is here: the server's count of unacked
//! messages must not exceed what this loop holds. Then the ones redelivered
//! (older) sort before the new ones. Messages still out after twice the ack
//! wait are held by a live listener (a replica: replicas of an ordered agent
//! need a window of 1): this loop hands its own back and binds again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::delivery::{self, AgentEntry, Deps, Handled};
use crate::gateway::Gateway;
use crate::state::AgentState;

/// How often the server is asked whether every unacked message is here yet
/// (only after a bind that found messages out elsewhere).
const VERIFY_EVERY: Duration = Duration::from_millis(250);

/// The message at the head of the line, between tries.
struct Head {
    msg: jetstream::Message,
    /// Tries made in place before (each counts as a delivery).
    earlier: u64,
    /// When to try again.
    retry_at: Option<Instant>,
}

/// Runs the ordered window on `consumer` until pause, stop or a pull
/// failure (returned). Everything not delivered is handed back in order.
pub(crate) async fn run_window<G: Gateway>(
    deps: &Deps<G>,
    state: &AgentState,
    entry: &watch::Receiver<Arc<AgentEntry>>,
    paused: &mut watch::Receiver<bool>,
    stop: &CancellationToken,
    consumer: &jetstream::consumer::PullConsumer,
    window: usize,
) -> Option<String> {
    let agent = entry.borrow().agent.id.clone();
    let mut messages = match consumer
        .stream()
        .max_messages_per_batch(window)
        .heartbeat(Duration::from_secs(5))
        .expires(crate::consumer::PULL_EXPIRES)
        .messages()
        .await
    {
        Ok(messages) => messages,
        Err(e) => return Some(e.to_string()),
    };
    info!(agent = %agent, concurrency = 1, window, "pulling in order with a prefetch window");
    let mut connects = deps.connects.clone();
    connects.mark_unchanged();
    // Waiting behind the head, by stream sequence.
    let mut waiting: BTreeMap<u64, jetstream::Message> = BTreeMap::new();
    let mut head: Option<Head> = None;
    let mut call: Option<BoxFuture<'_, (Head, Handled)>> = None;
    let mut acks = FuturesUnordered::new();
    // The lookup just read the consumer: nothing out means nothing elsewhere.
    let out_elsewhere = consumer.cached_info().num_ack_pending;
    let mut verified = out_elsewhere == 0;
    if !verified {
        info!(agent = %agent, unacked = out_elsewhere, "messages are out to an earlier listener; delivering once they are back here");
    }
    let give_up_at = Instant::now() + 2 * deps.ack_wait;
    let mut verify = tokio::time::interval(VERIFY_EVERY);
    verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let period = crate::consumer::progress_period(deps.ack_wait);
    let mut keep_alive = tokio::time::interval_at(Instant::now() + period, period);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let failure = loop {
        if call.is_none() && verified {
            if head.is_none()
                && let Some((_, msg)) = waiting.pop_first()
            {
                head = Some(Head { msg, earlier: 0, retry_at: None });
            }
            if let Some(next) = head.take_if(|h| h.retry_at.is_none_or(|at| at <= Instant::now())) {
                let current = entry.borrow().clone();
                call = Some(Box::pin(async move {
                    let handled = delivery::handle_attempt(deps, &current, state, &next.msg, next.earlier).await;
                    (next, handled)
                }));
            }
        }
        let held = waiting.len() + usize::from(head.is_some()) + usize::from(call.is_some()) + acks.len();
        let retry_at = head.as_ref().and_then(|h| h.retry_at);
        tokio::select! {
            biased;
            _ = stop.cancelled() => break None,
            // The guard `wait_for` returns is not `Send`: dropped at once.
            () = async { drop(paused.wait_for(|p| *p).await) } => break None,
            _ = connects.changed() => break Some("reconnected to NATS; pulling again".to_owned()),
            Some((done, handled)) = futures::future::OptionFuture::from(call.as_mut()), if call.is_some() => {
                call = None;
                settle(done, handled, &mut head, &mut acks, deps.ack_wait);
            }
            Some((msg, confirmed)) = acks.next(), if !acks.is_empty() => {
                if let Err(e) = confirmed {
                    // JetStream redelivers it after its ack wait: pulling
                    // again hands the window back, and a new pull delivers
                    // nothing before it is back, so nothing overtakes it.
                    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
                    warn!(agent = %agent, stream_seq = seq, error = %e, "ack not confirmed; JetStream will redeliver (the gateway gets the same Idempotency-Key)");
                    break Some(format!("the ack of stream sequence {seq} was not confirmed; pulling again so it comes back first"));
                }
            }
            item = messages.next(), if held < window => match item {
                Some(Ok(msg)) => match msg.info().map(|i| i.stream_sequence) {
                    // A second copy of a sequence (its ack wait ran out) replaces the first.
                    Ok(seq) => { waiting.insert(seq, msg); }
                    Err(e) => warn!(agent = %agent, error = %e, "message without JetStream metadata; ignoring it"),
                },
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("pull stream ended".to_owned()),
            },
            _ = sleep_until(retry_at), if retry_at.is_some() && call.is_none() => {}
            _ = verify.tick(), if !verified => {
                match consumer.get_info().await {
                    Ok(info) if info.num_ack_pending <= held => {
                        debug!(agent = %agent, held, "every unacked message is here; delivering");
                        verified = true;
                    }
                    Ok(info) if Instant::now() >= give_up_at => break Some(format!(
                        "{} messages are still out to another listener after twice the ack wait (replicas of an \
                         ordered agent need \"prefetch\": 1 in the registry); handing these back",
                        info.num_ack_pending - held.min(info.num_ack_pending)
                    )),
                    Ok(info) => debug!(agent = %agent, held, unacked = info.num_ack_pending, "waiting for messages still out"),
                    Err(e) => debug!(agent = %agent, error = %e, "consumer info failed; asking again"),
                }
            }
            _ = keep_alive.tick(), if !waiting.is_empty() || head.is_some() => {
                for msg in waiting.values().chain(head.as_ref().map(|h| &h.msg)) {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        debug!(agent = %agent, error = %e, "in-progress ack of a waiting message failed");
                    }
                }
            }
        }
    };
    // Close the pull before handing anything back: a message NAKed while it
    // is open comes straight back into it. What is buffered is taken first.
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        if let Ok(info) = msg.info() {
            waiting.insert(info.stream_sequence, msg);
        }
    }
    drop(messages);
    if let Some(running) = call.take() {
        let (done, handled) = running.await;
        settle(done, handled, &mut head, &mut acks, deps.ack_wait);
    }
    while acks.next().await.is_some() {}
    let back: Vec<jetstream::Message> = head.map(|h| h.msg).into_iter().chain(waiting.into_values()).collect();
    let mut released = 0;
    for msg in &back {
        if msg.ack_with(AckKind::Nak(None)).await.is_ok() {
            released += 1;
        }
    }
    if released > 0 {
        debug!(agent = %agent, released, "handed back the window in order");
    }
    failure
}

/// Books the end of the head's try: a retry stays the head, a delivery is
/// acked (confirmed, while the next one starts).
fn settle(
    done: Head,
    handled: Handled,
    head: &mut Option<Head>,
    acks: &mut FuturesUnordered<BoxFuture<'static, (jetstream::Message, Result<(), async_nats::Error>)>>,
    ack_wait: Duration,
) {
    match handled {
        Handled::Retrying(delay) => {
            *head = Some(Head { msg: done.msg, earlier: done.earlier + 1, retry_at: Some(Instant::now() + delay) });
        }
        Handled::Delivered => {
            let msg = done.msg;
            acks.push(Box::pin(async move {
                let confirmed = delivery::confirmed_ack(&msg, ack_wait).await;
                (msg, confirmed)
            }));
        }
        // Not settled for lack of NATS (a refused reply's dead letter not
        // stored): it stays the head, tried again shortly, so nothing behind
        // it overtakes it. A message without JetStream metadata cannot come
        // back and is dropped, as the unordered loop does.
        Handled::Unsettled if done.msg.info().is_ok() => {
            *head =
                Some(Head { msg: done.msg, earlier: done.earlier, retry_at: Some(Instant::now() + UNSETTLED_RETRY) });
        }
        Handled::DeadLettered | Handled::Unsettled => {}
    }
}

/// How soon a head left unsettled by a NATS failure is tried again.
const UNSETTLED_RETRY: Duration = Duration::from_secs(1);

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
