//! One message, start to finish: decode it, for a chat agent check where its
//! reply will go, call the gateway (keeping the message alive with
//! in-progress acks while the gateway works), publish the chat reply, then
//! ack, schedule a redelivery, or store a dead letter and only then ack.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::envelope::Arrival;
use mesh_protocol::layout::{self, ConsumerTuning, MSG_ID_HEADER};
use mesh_protocol::registry::AgentTokens;
use mesh_protocol::subject::Subject;
use mesh_protocol::{Agent, AgentId, DeliveryMode, Envelope, Recipient, Registry};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::gateway::{BodyError, Gateway, Response};
use crate::hook;
use crate::metrics;
use crate::policy::{self, Decision, ReplyOutcome, RetryPolicy};
use crate::reply::{self, ConsumerLookup, Route};
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
    /// Ordered with a prefetch window ([`crate::ordered`]): a retry is
    /// returned to the caller, which retries the message in place while those
    /// behind it wait (a NAK would let them overtake it), and a delivered
    /// message is left to the caller to ack (confirmed, without holding up
    /// the next delivery).
    pub in_order: bool,
    /// Goes up on every NATS (re)connection.
    pub connects: tokio::sync::watch::Receiver<u64>,
    /// The registry as last read (chat replies go only to its active agents).
    pub registry: tokio::sync::watch::Receiver<Arc<Registry>>,
    /// The registry file, read again when a reply target is missing from the
    /// copy above (which is up to a poll interval old).
    pub registry_path: std::path::PathBuf,
    /// The hosts the registry's URLs may point at (read once at start).
    pub allowed_hosts: mesh_protocol::registry::HostAllowList,
}

/// How one delivery ended, for the caller's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Delivered and acked.
    Delivered,
    /// Not delivered; to be tried again after this delay (scheduled with
    /// JetStream, or in ordered-window mode left to the caller).
    Retrying(Duration),
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
    handle_attempt(deps, entry, state, &msg, 0).await
}

/// Handles one pulled message for `entry`, which the listener itself tried
/// `earlier` times before in this delivery (ordered-window retries in
/// place): they count against the delivery budget like JetStream's own.
pub async fn handle_attempt<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    msg: &jetstream::Message,
    earlier: u64,
) -> Handled {
    let agent = entry.agent.id.as_str();
    let Ok(info) = msg.info() else {
        warn!(agent, subject = %msg.subject, "message without JetStream metadata; ignoring it");
        return Handled::Unsettled;
    };
    let (stream_seq, stored_at) = (info.stream_sequence, info.published);
    let delivered = (info.delivered.max(1) as u64).saturating_add(earlier);
    state.pending.store(info.pending, Ordering::Relaxed);
    let subject = Subject::parse(msg.subject.as_str());
    let arrival = match &subject {
        Ok(Subject::Inbox(id) | Subject::InboxFrom(id, _)) => Recipient::Agent(id.clone()),
        _ => Recipient::Broadcast,
    };
    let arrival = Arrival { to: arrival, fallback_id: legacy_id(stream_seq, stored_at), stored_at };
    let envelope = match Envelope::decode(&msg.payload, &arrival) {
        Ok((envelope, _format)) => envelope,
        Err(e) => {
            let reason = format!("undecodable payload: {e}");
            let stored = Stored { msg, id: arrival.fallback_id, stream_seq, stored_at };
            return dead_letter(deps, entry, state, &stored, delivered, None, reason).await;
        }
    };
    // An agent's listener may publish only on subjects naming its agent as
    // the sender (NATS permissions): a `from` that is not that agent is forged.
    if let Err(reason) = subject.as_ref().map_or(Ok(()), |subject| subject.check_sender(&envelope.from)) {
        let stored = Stored { msg, id: envelope.id, stream_seq, stored_at };
        return dead_letter(deps, entry, state, &stored, delivered, None, reason).await;
    }
    let stored = Stored { msg, id: envelope.id, stream_seq, stored_at };
    let msg_id = envelope.id.to_string();
    // Past its time to live (checked on every delivery, a retry's included):
    // never delivered; a dead letter an operator can replay as a new message.
    if let Some(reason) = policy::expired(&envelope, time::OffsetDateTime::now_utc()) {
        return dead_letter(deps, entry, state, &stored, delivered, None, reason).await;
    }
    // Past the budget (a dead letter that could not be stored, so the message
    // came back): straight to the dead letter, without asking the agent again.
    if delivered > deps.retry.max_deliver {
        let reason =
            format!("gave up after {} deliveries; the dead letter could not be stored before", deps.retry.max_deliver);
        return dead_letter(deps, entry, state, &stored, delivered, None, reason).await;
    }
    let request = match hook::build(&entry.agent, &entry.tokens, &envelope) {
        Ok(request) => request,
        Err(e) => {
            return dead_letter(deps, entry, state, &stored, delivered, None, e.to_string()).await;
        }
    };
    // A chat agent's reply must have somewhere to go before the agent is asked:
    // a refused target costs no LLM turn, and its dead letter was never delivered.
    let route = if entry.agent.delivery == DeliveryMode::Chat {
        match check_route(deps, &envelope).await {
            Ok(route) => Some(route),
            Err(outcome) => {
                let attempt = Attempt { stored: &stored, msg_id: &msg_id, delivered, status: None };
                return settle_reply(deps, entry, state, &attempt, &outcome).await.unwrap_or(Handled::Unsettled);
            }
        }
    } else {
        None
    };
    state.record_handed(crate::state::Handed {
        id: envelope.id,
        from: envelope.from.clone(),
        hops: envelope.hops,
        in_reply_to: envelope.metadata.get("in_reply_to").cloned(),
        text: envelope.text.chars().take(crate::state::RECENT_TEXT_CHARS).collect(),
        stream_seq,
        sent_at: envelope.sent_at,
    });
    let response = call_keeping_alive(deps, msg, &request).await;
    state.record_call(response.outcome.label() == "ok");
    metrics::gateway_duration(response.elapsed);
    let decision = policy::decide(&response.outcome, delivered, &deps.retry, fastrand::f64());
    match decision {
        Decision::Ack => {
            if let Some(route) = &route {
                let outcome = publish_reply(deps, entry, state, &envelope, route, &response).await;
                let attempt =
                    Attempt { stored: &stored, msg_id: &msg_id, delivered, status: response.outcome.status() };
                if let Some(handled) = settle_reply(deps, entry, state, &attempt, &outcome).await {
                    return handled;
                }
            }
            if deps.in_order {
                // The caller acks it (confirmed) while the next delivery starts.
            } else if let Err(e) = ack(msg, deps).await {
                warn!(agent, msg_id, error = %e, "ack not confirmed; JetStream will redeliver (the gateway gets the same Idempotency-Key)");
                return Handled::Unsettled;
            }
            state.delivered.fetch_add(1, Ordering::Relaxed);
            state.counters.delivered.increment(1);
            let now = time::OffsetDateTime::now_utc();
            if let Some(age) = metrics::latency_since(envelope.sent_at, state.resumed_at(), now) {
                metrics::latency(age);
            }
            info!(%agent, msg_id, stream_seq, from = %envelope.from, status = response.outcome.status(), elapsed_ms = response.elapsed.as_millis() as u64, "delivered");
            Handled::Delivered
        }
        Decision::Retry(delay) => {
            state.retried.fetch_add(1, Ordering::Relaxed);
            state.counters.retry.increment(1);
            warn!(%agent, msg_id, stream_seq, delivered, outcome = response.outcome.label(), status = response.outcome.status(), retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
            retry(deps, msg, delay).await
        }
        Decision::DeadLetter(reason) => {
            dead_letter(deps, entry, state, &stored, delivered, response.outcome.status(), reason).await
        }
    }
}

/// A pulled message as the agents stream stored it.
struct Stored<'a> {
    msg: &'a jetstream::Message,
    /// Its envelope id (or the id derived for a body without one).
    id: Uuid,
    stream_seq: u64,
    stored_at: time::OffsetDateTime,
}

/// The delivery a reply belongs to, for settling it.
struct Attempt<'a> {
    stored: &'a Stored<'a>,
    msg_id: &'a str,
    delivered: u64,
    status: Option<u16>,
}

/// Settles a message whose reply did not go through: a retry with the
/// policy's backoff (counted against the delivery budget) or a dead letter.
/// `None` when the reply is fine and the message is to be acked.
async fn settle_reply<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    attempt: &Attempt<'_>,
    outcome: &ReplyOutcome,
) -> Option<Handled> {
    let agent = entry.agent.id.as_str();
    let Attempt { stored, msg_id, delivered, status } = *attempt;
    let (msg, stream_seq) = (stored.msg, stored.stream_seq);
    match policy::decide_reply(outcome, delivered, &deps.retry, fastrand::f64()) {
        Decision::Ack => None,
        Decision::Retry(delay) => {
            state.retried.fetch_add(1, Ordering::Relaxed);
            state.counters.retry.increment(1);
            let why = match outcome {
                ReplyOutcome::Failed(why) | ReplyOutcome::Refused(why) => why.as_str(),
                ReplyOutcome::Done => "",
            };
            warn!(
                agent,
                msg_id,
                stream_seq,
                delivered,
                error = why,
                retry_in_ms = delay.as_millis() as u64,
                "chat reply not published; will retry"
            );
            Some(retry(deps, msg, delay).await)
        }
        Decision::DeadLetter(reason) => Some(dead_letter(deps, entry, state, stored, delivered, status, reason).await),
    }
}
/// A stable id for a body that carries none (legacy `{"from", "message"}`,
/// plain text, undecodable bytes): its stream sequence and the time the
/// stream stored it, so redeliveries share an `Idempotency-Key` and a dead
/// letter id, while a message stored after `mesh restore` (sequences
/// restart, the store time does not repeat) gets a new one.
pub fn legacy_id(stream_seq: u64, stored_at: time::OffsetDateTime) -> Uuid {
    // Nanoseconds since 1970 fit 64 bits until 2554; the low bits are the ones that differ.
    Uuid::from_u64_pair(stored_at.unix_timestamp_nanos() as u64, stream_seq)
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
pub(crate) async fn confirmed_ack(msg: &jetstream::Message, ack_wait: Duration) -> Result<(), async_nats::Error> {
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

/// Has `msg` tried again after `delay`: by JetStream (a NAK with the delay),
/// or in ordered-window mode by the caller, in place.
async fn retry<G>(deps: &Deps<G>, msg: &jetstream::Message, delay: Duration) -> Handled {
    if deps.in_order {
        return Handled::Retrying(delay);
    }
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        // Without the nak JetStream still redelivers after the ack wait.
        debug!(error = %e, "nak failed");
    }
    Handled::Retrying(delay)
}

/// Stores `stored` as a dead letter, then terminates it; when the dead
/// letter is not stored, NAKs it with the backoff. JetStream answering
/// `duplicate` means this very dead letter is stored already (its
/// `Nats-Msg-Id` names the agent and the stored message, see
/// [`DeadLetter::msg_id`]): the message is terminated.
async fn dead_letter<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    stored: &Stored<'_>,
    attempts: u64,
    status: Option<u16>,
    reason: String,
) -> Handled {
    let (msg, stream_seq) = (stored.msg, stored.stream_seq);
    let record = DeadLetter {
        agent: entry.agent.id.clone(),
        reason,
        status,
        attempts,
        subject: msg.subject.to_string(),
        stream_seq,
        message_id: stored.id,
        stored_at: stored.stored_at,
    };
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in record.headers() {
        headers.insert(name, value.as_str());
    }
    headers.insert(MSG_ID_HEADER, record.msg_id().as_str());
    let subject = Subject::DeadLetter(entry.agent.id.clone()).to_string();
    let published = match deps.js.publish_with_headers(subject, headers, msg.payload.clone()).await {
        Ok(ack) => ack.await.map(|ack| ack.duplicate).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let duplicate = match published {
        Ok(duplicate) => duplicate,
        Err(e) => {
            // Growing and capped: a JetStream refusing writes is asked again less
            // and less often, and the gateway is not called again (see `handle`).
            let delay = policy::backoff(None, attempts, &deps.retry, fastrand::f64());
            error!(agent = %entry.agent.id, stream_seq, attempts, error = %e, retry_in_ms = delay.as_millis() as u64, "dead letter could not be stored; the message stays in the stream and storing it is retried (without calling the gateway again)");
            return retry(deps, msg, delay).await;
        }
    };
    if duplicate {
        // Its id names this agent and this stored message: an earlier
        // delivery stored it and its TERM was lost (or the listener stopped).
        warn!(agent = %entry.agent.id, stream_seq, msg_id = %record.msg_id(), "this message's dead letter was stored already; terminating it");
    }
    state.dead_lettered.fetch_add(1, Ordering::Relaxed);
    state.counters.dead_letter.increment(1);
    error!(agent = %entry.agent.id, stream_seq, attempts, status, reason = %record.reason, "dead-lettered");
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        warn!(error = %e, "terminating a dead-lettered message failed; it may be dead-lettered again (deduplicated)");
    }
    Handled::DeadLettered
}

/// Where a reply to `original` goes: the registry says whether the target is
/// an active agent, JetStream whether its consumer exists. The registry file
/// is read again for every reply (the listener's copy is up to a poll old: a
/// target removed or made inactive by hand meanwhile would still look
/// active); only when it cannot be read is the last copy used.
async fn check_route<G>(deps: &Deps<G>, original: &Envelope) -> Result<Route, ReplyOutcome> {
    let routed = match crate::registry_file::load(&deps.registry_path, &deps.allowed_hosts) {
        Ok(fresh) => reply::route(original, &fresh),
        Err(e) => {
            debug!(error = %e, "reading the registry again failed; routing the reply on the last copy");
            let registry = deps.registry.borrow().clone();
            reply::route(original, &registry)
        }
    };
    match routed {
        Err(reason) => Err(ReplyOutcome::Refused(reason)),
        Ok(Route::Agent(id)) => match reply::consumer_check(&id, consumer_lookup(&deps.js, &id).await) {
            ReplyOutcome::Done => Ok(Route::Agent(id)),
            refused_or_failed => Err(refused_or_failed),
        },
        Ok(route) => Ok(route),
    }
}

/// Looks up an agent's durable consumer (read-only: the listener never
/// creates another agent's consumer).
async fn consumer_lookup(js: &jetstream::Context, agent: &AgentId) -> ConsumerLookup {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = match js.get_stream_no_info(spec.stream).await {
        Ok(stream) => stream,
        Err(e) => return ConsumerLookup::Failed(e.to_string()),
    };
    match stream.consumer_info(&spec.durable).await {
        Ok(_) => ConsumerLookup::Found,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => ConsumerLookup::Missing,
        Err(e) => ConsumerLookup::Failed(e.to_string()),
    }
}

/// Publishes the chat reply in `response` along `route`, after the gateway's 2xx.
async fn publish_reply<G: Gateway>(
    deps: &Deps<G>,
    entry: &AgentEntry,
    state: &AgentState,
    original: &Envelope,
    route: &Route,
    response: &Response,
) -> ReplyOutcome {
    let agent = entry.agent.id.as_str();
    // A 2xx that is no chat completion (a proxy's page, a wrong endpoint)
    // does not say the agent got the message: not acked as delivered but
    // dead-lettered with what came (asking again would cost a turn).
    let Some(target) = route.subject() else {
        if response.body_error.is_none()
            && let Err(junk) = hook::chat_reply(&response.body)
        {
            return ReplyOutcome::Refused(junk);
        }
        debug!(agent, msg_id = %original.id, ?route, "no reply routed");
        return ReplyOutcome::Done;
    };
    match &response.body_error {
        // The reply would be a fragment: the gateway answered more than the
        // listener reads, and asking again would give as much.
        Some(e @ BodyError::TooLarge) => return ReplyOutcome::Refused(e.to_string()),
        Some(e @ BodyError::Read(_)) => return ReplyOutcome::Failed(e.to_string()),
        None => {}
    }
    let text = match hook::chat_reply(&response.body) {
        Ok(text) => text,
        Err(junk) => return ReplyOutcome::Refused(junk),
    };
    let Some(text) = text else {
        let tool_calls = hook::asks_for_tools(&response.body);
        warn!(agent, msg_id = %original.id, tool_calls, "chat response had no reply text (tool calls are not run by the mesh); acked, nothing routed back");
        return ReplyOutcome::Done;
    };
    let hops = original.hops.saturating_add(1);
    if hops > deps.max_hops {
        state.loop_guard.fetch_add(1, Ordering::Relaxed);
        metrics::loop_guard(agent);
        warn!(agent, msg_id = %original.id, hops, max_hops = deps.max_hops, "loop guard: reply not sent");
        return ReplyOutcome::Done;
    }
    // The gateway may have taken its time: the target is checked again (registry,
    // consumer) right before the publish, so a reply to an agent removed meanwhile
    // is dead-lettered, not published into an inbox nobody reads.
    if let Route::Agent(_) = route
        && let Err(outcome) = check_route(deps, original).await
    {
        return outcome;
    }
    let reply = match reply::build(&entry.agent.id, original, &target, &text, hops) {
        Ok(reply) => reply,
        Err(reason) => return ReplyOutcome::Refused(reason),
    };
    if let Some(bytes) = reply.cut_from {
        warn!(agent, msg_id = %original.id, bytes, kept = reply.envelope.text.len(), "chat reply too long for a message; cut and marked as truncated");
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MSG_ID_HEADER, format!("reply-{}", original.id).as_str());
    // Published as this agent: on the subject naming it as the sender, the
    // only one its NATS user may write (`agents.<to>.inbox.<id>`, `mesh.reply.<asker>.<token>.<id>`).
    let on = target.sent_by(&entry.agent.id).unwrap_or_else(|| target.clone());
    let published = match deps.js.publish_with_headers(on.to_string(), headers, reply.payload.into()).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = published {
        return ReplyOutcome::Failed(format!("publishing the reply to {target} failed: {e}"));
    }
    state.replies.fetch_add(1, Ordering::Relaxed);
    metrics::reply(agent);
    info!(agent, msg_id = %reply.envelope.id, in_reply_to = %original.id, to = %target, hops, "reply routed");
    ReplyOutcome::Done
}
