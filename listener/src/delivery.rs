//! One message, start to finish: decode it, call the gateway (keeping the
//! message alive with in-progress acks while the gateway works), then ack,
//! schedule a redelivery, or store a dead letter and only then ack.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::envelope::Arrival;
use mesh_protocol::layout::MSG_ID_HEADER;
use mesh_protocol::registry::AgentTokens;
use mesh_protocol::subject::Subject;
use mesh_protocol::{Agent, DeliveryMode, Envelope, Kind, Recipient};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use std::sync::atomic::Ordering;

use crate::gateway::{Gateway, Response};
use crate::hook;
use crate::metrics;
use crate::policy::{self, Decision, RetryPolicy};
use crate::state::AgentState;

/// An agent as a listener serves it: registry entry plus resolved tokens.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// The registry entry.
    pub agent: Agent,
    /// Its resolved tokens.
    pub tokens: AgentTokens,
}

/// What every delivery of an agent loop shares.
#[derive(Debug, Clone)]
pub struct Deps<G> {
    /// JetStream, for dead letters and chat replies.
    pub js: jetstream::Context,
    /// The gateway client.
    pub gateway: G,
    /// Retry limits.
    pub retry: RetryPolicy,
    /// Chat replies stop after this many hops.
    pub max_hops: u8,
    /// The consumer's ack wait, as the server has it (in-progress acks are sent at a third of it).
    pub ack_wait: Duration,
    /// Wait for the server to confirm each ack (ordered mode).
    pub confirm_acks: bool,
    /// Goes up on every NATS (re)connection.
    pub connects: tokio::sync::watch::Receiver<u64>,
}

/// How one delivery ended, for the caller's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Delivered and acked.
    Delivered,
    /// Scheduled for redelivery.
    Retrying,
    /// Stored as a dead letter and acked.
    DeadLettered,
    /// Could not even be settled (NATS trouble); JetStream redelivers it.
    Unsettled,
}

/// Handles one pulled message for `entry`.
pub async fn handle<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    msg: jetstream::Message,
) -> Handled {
    let agent = entry.agent.id.as_str();
    let Ok(info) = msg.info() else {
        warn!(agent, subject = %msg.subject, "message without JetStream metadata; ignoring it");
        return Handled::Unsettled;
    };
    let (stream_seq, delivered, stored_at) = (info.stream_sequence, info.delivered.max(1) as u64, info.published);
    state.pending.store(info.pending, Ordering::Relaxed);
    let arrival = match Subject::parse(msg.subject.as_str()) {
        Ok(Subject::Inbox(id)) => Recipient::Agent(id),
        _ => Recipient::Broadcast,
    };
    let arrival = Arrival { to: arrival, fallback_id: legacy_id(stream_seq), stored_at };
    let envelope = match Envelope::decode(&msg.payload, &arrival) {
        Ok((envelope, _format)) => envelope,
        Err(e) => {
            let reason = format!("undecodable payload: {e}");
            return dead_letter(deps, entry, state, &msg, stream_seq, delivered, None, reason).await;
        }
    };
    let msg_id = envelope.id.to_string();
    let request = match hook::build(&entry.agent, &entry.tokens, &envelope) {
        Ok(request) => request,
        Err(e) => {
            return dead_letter(deps, entry, state, &msg, stream_seq, delivered, None, e.to_string()).await;
        }
    };
    let response = call_keeping_alive(deps, &msg, &request).await;
    state.record_call(response.outcome.label() == "ok");
    metrics::gateway_duration(response.elapsed);
    let decision = policy::decide(&response.outcome, delivered, &deps.retry, fastrand::f64());
    match decision {
        Decision::Ack => {
            if entry.agent.delivery == DeliveryMode::Chat
                && let Err(e) = route_reply(deps, entry, state, &envelope, &response.body).await
            {
                warn!(agent, msg_id, error = %e, "chat reply not published; the message will be redelivered");
                return nak(&msg, Duration::from_secs(1)).await;
            }
            if let Err(e) = ack(&msg, deps).await {
                warn!(agent, msg_id, error = %e, "ack not confirmed; JetStream will redeliver (the gateway gets the same Idempotency-Key)");
                return Handled::Unsettled;
            }
            state.delivered.fetch_add(1, Ordering::Relaxed);
            state.counters.delivered.increment(1);
            if let Ok(age) = (time::OffsetDateTime::now_utc() - envelope.sent_at).try_into() {
                metrics::latency(age);
            }
            info!(%agent, msg_id, stream_seq, from = %envelope.from, status = response.outcome.status(), elapsed_ms = response.elapsed.as_millis() as u64, "delivered");
            Handled::Delivered
        }
        Decision::Retry(delay) => {
            state.retried.fetch_add(1, Ordering::Relaxed);
            state.counters.retry.increment(1);
            warn!(%agent, msg_id, stream_seq, delivered, outcome = response.outcome.label(), status = response.outcome.status(), retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
            nak(&msg, delay).await;
            Handled::Retrying
        }
        Decision::DeadLetter(reason) => {
            dead_letter(deps, entry, state, &msg, stream_seq, delivered, response.outcome.status(), reason).await
        }
    }
}

/// A stable id for a body that carries none: the same stream sequence always
/// gives the same id, so redeliveries share an `Idempotency-Key`.
pub fn legacy_id(stream_seq: u64) -> Uuid {
    Uuid::from_u64_pair(0x6d65_7368_0000_0000, stream_seq)
}

async fn call_keeping_alive<G: Gateway>(
    deps: &Deps<G>,
    msg: &jetstream::Message,
    request: &hook::HookRequest,
) -> Response {
    let call = deps.gateway.post(request);
    tokio::pin!(call);
    let period = (deps.ack_wait / 3).max(Duration::from_millis(100));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            response = &mut call => return response,
            _ = keepalive.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "in-progress ack failed");
                }
            }
        }
    }
}

/// Acks a delivered message. In ordered mode (one in flight) the ack is
/// confirmed, since a lost one would stall the agent for a whole ack wait;
/// with several in flight a plain ack keeps throughput (a lost one means one
/// redelivery, which the gateway recognises by its `Idempotency-Key`).
async fn ack<G>(msg: &jetstream::Message, deps: &Deps<G>) -> Result<(), async_nats::Error> {
    if deps.confirm_acks { confirmed_ack(msg, deps.ack_wait).await } else { msg.ack().await }
}

/// Acks and waits for the server to confirm, retrying across a reconnect
/// (a lost ack would stall the agent for a whole ack wait and cause a duplicate).
async fn confirmed_ack(msg: &jetstream::Message, ack_wait: Duration) -> Result<(), async_nats::Error> {
    let deadline = tokio::time::Instant::now() + ack_wait;
    loop {
        match msg.double_ack().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + Duration::from_millis(250) < deadline => {
                debug!(error = %e, "ack not confirmed yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn nak(msg: &jetstream::Message, delay: Duration) -> Handled {
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        // Without the nak JetStream still redelivers after the ack wait.
        debug!(error = %e, "nak failed");
    }
    Handled::Retrying
}

#[allow(clippy::too_many_arguments)]
async fn dead_letter<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    msg: &jetstream::Message,
    stream_seq: u64,
    attempts: u64,
    status: Option<u16>,
    reason: String,
) -> Handled {
    let record = DeadLetter {
        agent: entry.agent.id.clone(),
        reason,
        status,
        attempts,
        subject: msg.subject.to_string(),
        stream_seq,
    };
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in record.headers() {
        headers.insert(name, value.as_str());
    }
    headers.insert(MSG_ID_HEADER, record.msg_id().as_str());
    let subject = Subject::DeadLetter(entry.agent.id.clone()).to_string();
    let stored = match deps.js.publish_with_headers(subject, headers, msg.payload.clone()).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = stored {
        error!(agent = %entry.agent.id, stream_seq, error = %e, "dead letter not stored; the message stays pending and is retried");
        return nak(msg, Duration::from_secs(1)).await;
    }
    state.dead_lettered.fetch_add(1, Ordering::Relaxed);
    state.counters.dead_letter.increment(1);
    error!(agent = %entry.agent.id, stream_seq, attempts, status, reason = %record.reason, "dead-lettered");
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        warn!(error = %e, "terminating a dead-lettered message failed; it may be dead-lettered again (deduplicated)");
    }
    Handled::DeadLettered
}

/// Errors routing a chat reply.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("publishing the reply failed: {0}")]
    Publish(String),
}

async fn route_reply<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    original: &Envelope,
    body: &Bytes,
) -> Result<(), ReplyError> {
    let agent = entry.agent.id.as_str();
    if original.kind == Kind::Broadcast {
        // Every chat agent answering every broadcast would flood the sender.
        debug!(agent, msg_id = %original.id, "no reply routed for a broadcast");
        return Ok(());
    }
    let Some(text) = hook::chat_reply_text(body) else {
        warn!(agent, msg_id = %original.id, "chat response had no reply text; nothing to route back");
        return Ok(());
    };
    let Some(target) = original.reply_subject() else {
        debug!(agent, msg_id = %original.id, "sender has no inbox and no reply_to; reply not routed");
        return Ok(());
    };
    let hops = original.hops.saturating_add(1);
    if hops > deps.max_hops {
        state.loop_guard.fetch_add(1, Ordering::Relaxed);
        metrics::loop_guard(agent);
        warn!(agent, msg_id = %original.id, hops, max_hops = deps.max_hops, "loop guard: reply not sent");
        return Ok(());
    }
    let to = match &target {
        Subject::Inbox(id) => Recipient::Agent(id.clone()),
        _ => Recipient::reply_to_sender(&original.from),
    };
    let mut reply = match Envelope::new(agent, to, truncate(&text)) {
        Ok(reply) => reply,
        Err(e) => {
            warn!(agent, error = %e, "chat reply is not a valid message; dropped");
            return Ok(());
        }
    };
    reply.kind = Kind::Reply;
    reply.hops = hops;
    reply.metadata.insert("in_reply_to".into(), original.id.to_string());
    let payload = reply.encode().map_err(|e| ReplyError::Publish(e.to_string()))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MSG_ID_HEADER, format!("reply-{}", original.id).as_str());
    let ack = deps
        .js
        .publish_with_headers(target.to_string(), headers, payload.into())
        .await
        .map_err(|e| ReplyError::Publish(e.to_string()))?;
    ack.await.map_err(|e| ReplyError::Publish(e.to_string()))?;
    state.replies.fetch_add(1, Ordering::Relaxed);
    metrics::reply(agent);
    info!(agent, msg_id = %reply.id, in_reply_to = %original.id, to = %target, hops, "reply routed");
    Ok(())
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = mesh_protocol::envelope::MAX_TEXT_BYTES / 2;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let mut cut = LIMIT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… [truncated]", &text[..cut])
}
