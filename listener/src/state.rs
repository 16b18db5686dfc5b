//! What a listener process knows about itself and each of its agents, shared
//! by the delivery loops, the ping responder and the health endpoints.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mesh_protocol::AgentId;
use mesh_protocol::health::{GatewayHealth, Pong};

/// Gateway calls failing in a row before the agent counts as unhealthy.
pub const UNHEALTHY_AFTER_FAILURES: u64 = 5;

/// Messages handed to an agent that its listener remembers (the ones an agent
/// may answer with `in_reply_to`, and its `inbox`); older ones are forgotten.
pub const RECENT_DELIVERIES: usize = 64;

/// Characters of each remembered message's text kept (the whole text is in the stream).
pub const RECENT_TEXT_CHARS: usize = 4096;

/// A message handed to an agent's gateway, as remembered for its answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The message id (what `in_reply_to` names).
    pub id: uuid::Uuid,
    /// Who sent it.
    pub from: String,
    /// Its hop count (an answer carries one more).
    pub hops: u8,
    /// The message it answers, if it is an answer.
    pub in_reply_to: Option<String>,
    /// Its text.
    pub text: String,
    /// Its sequence in the agents stream.
    pub stream_seq: u64,
    /// When it was sent.
    pub sent_at: time::OffsetDateTime,
}

/// Live counters of one agent.
#[derive(Debug)]
pub struct AgentState {
    /// The agent.
    pub id: AgentId,
    /// Messages waiting, as of the last pulled message.
    pub pending: AtomicU64,
    /// True while paused by the kill switch.
    pub paused: AtomicBool,
    /// Gateway calls that did not end in 2xx, in a row.
    pub consecutive_failures: AtomicU64,
    /// Messages delivered.
    pub delivered: AtomicU64,
    /// Deliveries scheduled for retry.
    pub retried: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Chat replies routed back.
    pub replies: AtomicU64,
    /// Chat replies stopped by the loop guard.
    pub loop_guard: AtomicU64,
    /// When the kill switch last resumed the agent (unix ms; 0: never).
    resumed_at_ms: AtomicI64,
    /// The agent's Prometheus delivery counters.
    pub counters: crate::metrics::DeliveryCounters,
    gateway: AtomicU8,
    gateway_checked: Mutex<Option<Instant>>,
    refused: Mutex<Option<String>>,
    /// The last [`RECENT_DELIVERIES`] messages handed to the gateway, oldest first.
    recent: Mutex<VecDeque<Handed>>,
}

impl AgentState {
    /// Fresh state for an agent.
    pub fn new(id: AgentId) -> Self {
        Self {
            counters: crate::metrics::DeliveryCounters::new(id.as_str()),
            id,
            pending: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            consecutive_failures: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            loop_guard: AtomicU64::new(0),
            resumed_at_ms: AtomicI64::new(0),
            gateway: AtomicU8::new(0),
            gateway_checked: Mutex::new(None),
            refused: Mutex::new(None),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_DELIVERIES)),
        }
    }

    /// Sets the paused flag; a pause ending records the time of the resume
    /// (latency is counted from it: [`crate::metrics::latency_since`]).
    pub fn set_paused(&self, paused: bool) {
        let was = self.paused.swap(paused, Ordering::Relaxed);
        if was && !paused {
            let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            self.resumed_at_ms.store(i64::try_from(now_ms).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    /// When the kill switch last resumed the agent, if it ever did.
    pub fn resumed_at(&self) -> Option<time::OffsetDateTime> {
        let ms = self.resumed_at_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()).flatten()
    }

    /// Remembers a message handed to the gateway (a redelivery once).
    pub fn record_handed(&self, handed: Handed) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.iter().any(|h| h.id == handed.id) {
            return;
        }
        if recent.len() == RECENT_DELIVERIES {
            recent.pop_front();
        }
        recent.push_back(handed);
    }

    /// A message recently handed to this agent, by id.
    pub fn handed(&self, id: uuid::Uuid) -> Option<Handed> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|h| h.id == id).cloned()
    }

    /// The newest `n` messages handed to this agent, newest first.
    pub fn recent(&self, n: usize) -> Vec<Handed> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().take(n).cloned().collect()
    }

    /// Notes that this agent's loop stopped for good, and why (its consumer
    /// is set up otherwise than the layout says).
    pub fn set_refused(&self, why: String) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Lifts [`Self::set_refused`] (a crashed loop that runs again).
    pub fn clear_refused(&self) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why this agent's loop stopped for good, if it did.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes whether a gateway call succeeded.
    pub fn record_call(&self, ok: bool) {
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.set_gateway(GatewayHealth::Ok);
        } else if self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1 >= UNHEALTHY_AFTER_FAILURES {
            self.set_gateway(GatewayHealth::Down);
        }
    }

    /// Records the result of a `GET /health`.
    pub fn record_health_check(&self, ok: bool) {
        *self.gateway_checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let failing = self.consecutive_failures.load(Ordering::Relaxed) >= UNHEALTHY_AFTER_FAILURES;
        self.set_gateway(if ok && !failing { GatewayHealth::Ok } else { GatewayHealth::Down });
    }

    /// Notes that a health check started, so concurrent pings do not start more.
    pub fn mark_health_check_started(&self) {
        *self.gateway_checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// True when the last health check is older than `max_age` (or missing).
    pub fn health_check_due(&self, max_age: Duration) -> bool {
        self.gateway_checked.lock().unwrap_or_else(|p| p.into_inner()).is_none_or(|at| at.elapsed() > max_age)
    }

    fn set_gateway(&self, health: GatewayHealth) {
        let raw = match health {
            GatewayHealth::Unknown => 0,
            GatewayHealth::Ok => 1,
            GatewayHealth::Down => 2,
        };
        self.gateway.store(raw, Ordering::Relaxed);
    }

    /// The gateway's state.
    pub fn gateway(&self) -> GatewayHealth {
        match self.gateway.load(Ordering::Relaxed) {
            1 => GatewayHealth::Ok,
            2 => GatewayHealth::Down,
            _ => GatewayHealth::Unknown,
        }
    }

    /// True when deliveries keep failing.
    pub fn is_failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) >= UNHEALTHY_AFTER_FAILURES
    }

    /// The pong for this agent.
    pub fn pong(&self, uptime: Duration) -> Pong {
        Pong {
            agent: self.id.clone(),
            version: mesh_protocol::VERSION.to_owned(),
            uptime_s: uptime.as_secs(),
            gateway: self.gateway(),
            pending: self.pending.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
        }
    }
}

/// The agents of one process.
#[derive(Debug)]
pub struct FleetState {
    /// When the process started.
    pub started: Instant,
    agents: RwLock<BTreeMap<AgentId, Arc<AgentState>>>,
}

impl Default for FleetState {
    fn default() -> Self {
        Self { started: Instant::now(), agents: RwLock::default() }
    }
}

impl FleetState {
    /// Adds an agent (or returns the existing state).
    pub fn add(&self, id: &AgentId) -> Arc<AgentState> {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        agents.entry(id.clone()).or_insert_with(|| Arc::new(AgentState::new(id.clone()))).clone()
    }

    /// Removes an agent.
    pub fn remove(&self, id: &AgentId) {
        self.agents.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// A snapshot of every agent's state.
    pub fn agents(&self) -> Vec<Arc<AgentState>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// One agent's state.
    pub fn get(&self, id: &AgentId) -> Option<Arc<AgentState>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }
}
