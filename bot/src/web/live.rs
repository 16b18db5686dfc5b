//! The web console's one view of the mesh, shared by every viewer: the
//! fleet (pinged every [`FLEET_EVERY`], and again on each mesh event), the
//! traffic on the agents stream with each message's outcome, and the mesh's
//! events. One set of NATS subscriptions for the whole bot, fanned out to the
//! viewers through a bounded broadcast channel: a viewer that falls
//! [`CHANNEL`] updates behind is dropped, never the bot.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::envelope::Arrival;
use mesh_protocol::event::Event;
use mesh_protocol::subject::{self, Subject};
use mesh_protocol::{Envelope, Recipient, Registry, layout};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the fleet is pinged for the console.
pub const FLEET_EVERY: Duration = Duration::from_secs(2);
/// How long a console ping waits for pongs.
const PING_WAIT: Duration = Duration::from_millis(1500);
/// How often the consumers of agents with messages in flight are read.
const ACK_POLL: Duration = Duration::from_millis(200);
/// Updates a viewer may fall behind before it is dropped.
pub const CHANNEL: usize = 256;
/// Traffic rows kept for a page load.
pub const RECENT: usize = 200;
/// Messages in flight followed at most; older ones are left pending.
const IN_FLIGHT: usize = 2000;
/// How long a message in flight is followed.
const FOLLOW_FOR: Duration = Duration::from_secs(600);

/// One update for the viewers.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Update {
    /// The fleet as last seen.
    Fleet(Box<FleetSnapshot>),
    /// A message sent, or its outcome known.
    Traffic(TrafficRow),
    /// A mesh event (kill switch, agent down or back, dead letters, broadcast).
    Event {
        /// Its kind.
        kind: String,
        /// Its text.
        text: String,
        /// When.
        at: String,
    },
    /// An `ask`'s answer, for the user who asked.
    Reply {
        /// The user who asked.
        user: String,
        /// The reply's title.
        title: String,
        /// Its lines.
        lines: Vec<String>,
    },
}

/// The fleet, as the fleet page shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FleetSnapshot {
    /// The NATS server the bot is connected to.
    pub nats: NatsRow,
    /// One row per registry agent.
    pub agents: Vec<AgentRow>,
    /// Kill switch entries in force.
    pub kill: Vec<KillRow>,
    /// Dead letters stored, all agents.
    pub dead_letters: u64,
    /// Why the fleet could not be read, if it could not.
    pub error: Option<String>,
}

/// The NATS server.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NatsRow {
    /// Server name.
    pub name: String,
    /// Server version.
    pub version: String,
    /// Whether the bot is connected.
    pub connected: bool,
}

/// One agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    /// Its id.
    pub agent: String,
    /// Its delivery mode (`wake`, `agent`, `chat`).
    pub delivery: String,
    /// `ok`, `no answer`, `gateway down`, `gateway unknown`, `paused`, `inactive`.
    pub state: String,
    /// Listener round trip, when it answered.
    pub rtt_ms: Option<u64>,
    /// Messages waiting, when it answered.
    pub pending: Option<u64>,
    /// Its dead letters.
    pub dead_letters: u64,
    /// Paused by the kill switch.
    pub paused: bool,
    /// The last delivery the console saw: when and how it ended.
    pub last_delivery: Option<LastDelivery>,
}

/// The last outcome seen for an agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastDelivery {
    /// RFC 3339.
    pub at: String,
    /// `delivered` or `dead-lettered`.
    pub outcome: String,
}

/// A kill switch entry in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillRow {
    /// The agent it holds, or `None` for the whole mesh.
    pub agent: Option<String>,
    /// `the whole mesh` or `agent <id>`.
    pub scope: String,
    /// `soft`, `hard`, `nuclear`.
    pub mode: String,
    /// Who pulled it.
    pub by: String,
    /// When a soft kill ends (RFC 3339).
    pub until: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// One line.
    pub text: String,
}

/// A message on the agents stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficRow {
    /// The message id.
    pub id: String,
    /// Its sequence in the agents stream.
    pub seq: u64,
    /// The sender.
    pub from: String,
    /// The agent, or `broadcast`.
    pub to: String,
    /// `message`, `broadcast`, `ask`, `reply`.
    pub kind: String,
    /// `low` .. `urgent`.
    pub priority: String,
    /// The text (untrusted: pages escape it).
    pub text: String,
    /// When it was stored (RFC 3339).
    pub at: String,
    /// `pending`, `delivered`, `delivered 2/3`, `dead-lettered: <reason>`.
    pub outcome: String,
    /// From stored to delivered (or dead-lettered), when known.
    pub latency_ms: Option<u64>,
}

/// The hub: the latest fleet, the recent traffic, the viewers' channel.
#[derive(Debug)]
pub struct Hub {
    updates: broadcast::Sender<Update>,
    fleet: Mutex<FleetSnapshot>,
    recent: Mutex<VecDeque<TrafficRow>>,
    last: Mutex<BTreeMap<String, LastDelivery>>,
    refresh: Notify,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            updates: broadcast::channel(CHANNEL).0,
            fleet: Mutex::default(),
            recent: Mutex::default(),
            last: Mutex::default(),
            refresh: Notify::new(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A new viewer's receiver.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Sends an update to every viewer (none listening is fine).
    pub fn send(&self, update: Update) {
        let _ = self.updates.send(update);
    }

    /// The fleet as last seen.
    pub fn fleet(&self) -> FleetSnapshot {
        lock(&self.fleet).clone()
    }

    /// The recent traffic, newest first.
    pub fn recent(&self) -> Vec<TrafficRow> {
        lock(&self.recent).iter().rev().cloned().collect()
    }

    /// Asks for a fresh fleet view now (after an action or an event).
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    fn set_fleet(&self, fleet: FleetSnapshot) {
        let changed = {
            let mut current = lock(&self.fleet);
            let changed = *current != fleet;
            *current = fleet.clone();
            changed
        };
        if changed {
            self.send(Update::Fleet(Box::new(fleet)));
        }
    }

    fn traffic(&self, row: TrafficRow) {
        {
            let mut recent = lock(&self.recent);
            match recent.iter_mut().find(|r| r.id == row.id && r.seq == row.seq) {
                Some(existing) => *existing = row.clone(),
                None => {
                    recent.push_back(row.clone());
                    while recent.len() > RECENT {
                        recent.pop_front();
                    }
                }
            }
        }
        self.send(Update::Traffic(row));
    }

    fn last_delivery(&self, agent: &str, outcome: &str) {
        let at = crate::killswitch::rfc3339(OffsetDateTime::now_utc());
        lock(&self.last).insert(agent.to_owned(), LastDelivery { at, outcome: outcome.to_owned() });
    }
}

/// What the hub's tasks need.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The bot's NATS connection.
    pub client: async_nats::Client,
    /// The registry file.
    pub registry_path: PathBuf,
    /// Hosts its URLs may name.
    pub allowed_hosts: mesh_protocol::registry::HostAllowList,
}

/// Starts the hub's tasks until `stop`; the kill switch is read through
/// `engine` (its bucket opened once, when the engine started).
pub fn start(hub: Arc<Hub>, sources: Sources, engine: Arc<crate::engine::Engine>, stop: CancellationToken) {
    tokio::spawn(fleet(hub.clone(), sources.clone(), engine, stop.clone()));
    tokio::spawn(events(hub.clone(), sources.client.clone(), stop.clone()));
    tokio::spawn(traffic(hub, sources, stop));
}

fn load_registry(sources: &Sources) -> Result<Registry, String> {
    mesh_runtime::registry_file::load(&sources.registry_path, &sources.allowed_hosts).map_err(|e| e.to_string())
}

async fn fleet(hub: Arc<Hub>, sources: Sources, engine: Arc<crate::engine::Engine>, stop: CancellationToken) {
    let js = jetstream::new(sources.client.clone());
    loop {
        let snapshot = read_fleet(&hub, &sources, &js, &engine).await;
        hub.set_fleet(snapshot);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FLEET_EVERY) => {}
            _ = hub.refresh.notified() => {}
        }
    }
}

async fn read_fleet(
    hub: &Hub,
    sources: &Sources,
    js: &jetstream::Context,
    engine: &crate::engine::Engine,
) -> FleetSnapshot {
    let info = sources.client.server_info();
    let nats = NatsRow {
        name: info.server_name.clone(),
        version: info.version.clone(),
        connected: sources.client.connection_state() == async_nats::connection::State::Connected,
    };
    let registry = match load_registry(sources) {
        Ok(registry) => registry,
        Err(e) => return FleetSnapshot { nats, error: Some(e), ..Default::default() },
    };
    let mut error = None;
    let report = crate::ping::ping(&sources.client, &registry, PING_WAIT)
        .await
        .inspect_err(|e| error = Some(e.to_string()))
        .ok();
    let mut kill_rows = Vec::new();
    match engine.kill_in_force().await {
        Ok(entries) => {
            for (scope, state) in entries {
                let agent = match &scope {
                    mesh_protocol::killswitch::Scope::Global => None,
                    mesh_protocol::killswitch::Scope::Agent(id) => Some(id.to_string()),
                };
                kill_rows.push(KillRow {
                    agent,
                    scope: scope.to_string(),
                    mode: state.mode.as_str().to_owned(),
                    by: state.by.clone(),
                    until: state.until.map(crate::killswitch::rfc3339),
                    reason: state.reason.clone(),
                    text: crate::killswitch::describe(&scope, &state),
                })
            }
        }
        Err(e) => error = Some(format!("kill switch unreadable (the banner may be missing a kill in force): {e}")),
    }
    let per_agent = dead_letter_counts(js).await;
    let last = lock(&hub.last).clone();
    let agents = registry
        .agents()
        .map(|agent| {
            let id = agent.id.to_string();
            let row = report.as_ref().and_then(|r| r.rows.iter().find(|row| row.agent == id));
            let paused = kill_rows.iter().any(|k| k.agent.as_ref().is_none_or(|a| *a == id))
                || row.is_some_and(|r| r.state == "paused");
            AgentRow {
                delivery: format!("{:?}", agent.delivery).to_lowercase(),
                state: row.map_or("unknown", |r| r.state).to_owned(),
                rtt_ms: row.and_then(|r| r.rtt_ms),
                pending: row.and_then(|r| r.pending),
                dead_letters: per_agent.get(&id).copied().unwrap_or(0),
                paused,
                last_delivery: last.get(&id).cloned(),
                agent: id,
            }
        })
        .collect();
    FleetSnapshot { nats, agents, kill: kill_rows, dead_letters: per_agent.values().sum(), error }
}

/// Dead letters per agent, from the dead-letter stream's subject counts.
async fn dead_letter_counts(js: &jetstream::Context) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(stream) = js.get_stream(layout::dead_letter_stream(1).name).await else { return out };
    let Ok(mut subjects) = stream.info_with_subjects(subject::ALL_DEAD_LETTERS).await else { return out };
    while let Some(Ok((subject, count))) = subjects.next().await {
        if let Ok(Subject::DeadLetter(agent)) = Subject::parse(&subject) {
            out.insert(agent.to_string(), count as u64);
        }
    }
    out
}

async fn events(hub: Arc<Hub>, client: async_nats::Client, stop: CancellationToken) {
    let mut events = match client.subscribe(subject::ALL_EVENTS).await {
        Ok(events) => events,
        Err(e) => return warn!(error = %e, "web console: no live mesh events"),
    };
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            message = events.next() => match message { Some(m) => m, None => return },
        };
        let Ok(event) = Event::decode(&message.payload) else { continue };
        hub.send(event_update(&event));
        hub.refresh();
    }
}

fn event_update(event: &Event) -> Update {
    Update::Event {
        kind: event.kind.as_str().to_owned(),
        text: event.text.clone(),
        at: crate::killswitch::rfc3339(event.at),
    }
}

/// A message in flight: the agents it still waits for.
#[derive(Debug)]
struct InFlight {
    row: TrafficRow,
    stored: OffsetDateTime,
    waiting: Vec<String>,
    total: usize,
}

async fn traffic(hub: Arc<Hub>, sources: Sources, stop: CancellationToken) {
    let js = jetstream::new(sources.client.clone());
    loop {
        if let Err(e) = follow_traffic(&hub, &sources, &js, &stop).await {
            warn!(error = %e, "web console: live traffic interrupted; following again in 1 s");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
) -> Result<(jetstream::stream::Stream, consumer::pull::Ordered), async_nats::Error> {
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    Ok((stream, consumer.messages().await?))
}

async fn follow_traffic(
    hub: &Hub,
    sources: &Sources,
    js: &jetstream::Context,
    stop: &CancellationToken,
) -> Result<(), async_nats::Error> {
    let (agents_stream, mut sent) = ordered(js, layout::agents_stream(1).name).await?;
    let (_, mut dead) = ordered(js, layout::dead_letter_stream(1).name).await?;
    let mut flying: Vec<InFlight> = Vec::new();
    let mut poll = tokio::time::interval(ACK_POLL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = sent.next() => {
                let message = message.ok_or("the agents stream's consumer ended")??;
                if let Some(entry) = in_flight(sources, &message) {
                    hub.traffic(entry.row.clone());
                    flying.push(entry);
                    if flying.len() > IN_FLIGHT {
                        flying.remove(0);
                    }
                }
            }
            message = dead.next() => {
                let message = message.ok_or("the dead-letter stream's consumer ended")??;
                let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
                if let Some(record) = DeadLetter::from_headers(header) {
                    dead_lettered(hub, &mut flying, &record);
                }
            }
            _ = poll.tick(), if !flying.is_empty() => {
                settle(hub, &agents_stream, &mut flying).await;
            }
        }
    }
}

fn in_flight(sources: &Sources, message: &jetstream::Message) -> Option<InFlight> {
    let info = message.info().ok()?;
    let (seq, stored) = (info.stream_sequence, info.published);
    let to = match Subject::parse(&message.subject) {
        Ok(Subject::Inbox(id)) => Recipient::Agent(id),
        _ => Recipient::Broadcast,
    };
    let arrival = Arrival { to, fallback_id: uuid::Uuid::nil(), stored_at: stored };
    let (envelope, _) = Envelope::decode(&message.payload, &arrival).ok()?;
    let waiting: Vec<String> = match &envelope.to {
        Recipient::Agent(id) => vec![id.to_string()],
        _ => match load_registry(sources) {
            Ok(registry) => registry.agents().filter(|a| a.is_active()).map(|a| a.id.to_string()).collect(),
            Err(_) => Vec::new(),
        },
    };
    let row = TrafficRow {
        id: envelope.id.to_string(),
        seq,
        from: envelope.from.clone(),
        to: match &envelope.to {
            Recipient::Agent(id) => id.to_string(),
            Recipient::Broadcast => "broadcast".to_owned(),
            Recipient::Sender(s) => s.clone(),
        },
        kind: format!("{:?}", envelope.kind).to_lowercase(),
        priority: envelope.priority.as_str().to_owned(),
        text: envelope.text,
        at: crate::killswitch::rfc3339(stored),
        outcome: "pending".to_owned(),
        latency_ms: None,
    };
    let total = waiting.len();
    Some(InFlight { row, stored, waiting, total })
}

fn elapsed_ms(since: OffsetDateTime) -> u64 {
    (OffsetDateTime::now_utc() - since).whole_milliseconds().max(0) as u64
}

fn dead_lettered(hub: &Hub, flying: &mut Vec<InFlight>, record: &DeadLetter) {
    let id = record.message_id.to_string();
    let agent = record.agent.to_string();
    hub.last_delivery(&agent, "dead-lettered");
    let mut row = match flying.iter().position(|f| f.row.id == id) {
        Some(i) => {
            let mut entry = flying.remove(i);
            entry.row.latency_ms = Some(elapsed_ms(entry.stored));
            entry.row
        }
        // Settled already (its ack came first) or sent before the console watched.
        None => match hub.recent().into_iter().find(|r| r.id == id) {
            Some(row) => row,
            None => return,
        },
    };
    row.outcome = format!("dead-lettered: {}", record.reason);
    hub.traffic(row);
    hub.refresh();
}

/// Reads the consumers of the agents with messages in flight, once each, and
/// reports the messages their acks passed.
async fn settle(hub: &Hub, stream: &jetstream::stream::Stream, flying: &mut Vec<InFlight>) {
    let now = OffsetDateTime::now_utc();
    flying.retain(|f| now - f.stored < FOLLOW_FOR);
    let agents: std::collections::BTreeSet<String> = flying.iter().flat_map(|f| f.waiting.clone()).collect();
    let mut floors = BTreeMap::new();
    for agent in agents {
        match stream.consumer_info(format!("agent-{agent}")).await {
            Ok(info) => {
                floors.insert(agent, info.ack_floor.stream_sequence);
            }
            Err(e) => debug!(agent, error = %e, "consumer unreadable"),
        }
    }
    let mut changed = false;
    flying.retain_mut(|f| {
        let before = f.waiting.len();
        f.waiting.retain(|agent| floors.get(agent).is_none_or(|floor| *floor < f.row.seq));
        if f.waiting.len() == before {
            return true;
        }
        changed = true;
        let done = f.total - f.waiting.len();
        f.row.outcome = if f.total <= 1 { "delivered".to_owned() } else { format!("delivered {done}/{}", f.total) };
        f.row.latency_ms = Some(elapsed_ms(f.stored));
        hub.traffic(f.row.clone());
        if f.row.to != "broadcast" {
            hub.last_delivery(&f.row.to, "delivered");
        }
        !f.waiting.is_empty()
    });
    if changed {
        hub.refresh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> TrafficRow {
        TrafficRow {
            id: id.into(),
            seq: 1,
            from: "cli:a".into(),
            to: "nova".into(),
            kind: "message".into(),
            priority: "normal".into(),
            text: "hi".into(),
            at: "now".into(),
            outcome: "pending".into(),
            latency_ms: None,
        }
    }

    #[tokio::test]
    async fn a_viewer_that_falls_behind_is_dropped_not_the_hub() {
        let hub = Hub::default();
        let mut slow = hub.subscribe();
        for i in 0..CHANNEL + 10 {
            hub.traffic(row(&i.to_string()));
        }
        assert!(matches!(slow.recv().await, Err(broadcast::error::RecvError::Lagged(10))));
        assert_eq!(hub.recent().len(), RECENT, "the hub keeps its last rows");
        assert_eq!(hub.recent()[0].id, (CHANNEL + 9).to_string(), "newest first");
    }

    #[test]
    fn an_outcome_replaces_the_row_it_is_about() {
        let hub = Hub::default();
        hub.traffic(row("a"));
        hub.traffic(TrafficRow { outcome: "delivered".into(), ..row("a") });
        assert_eq!(hub.recent().len(), 1);
        assert_eq!(hub.recent()[0].outcome, "delivered");
    }
}
