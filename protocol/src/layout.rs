//! The JetStream layout as plain data: which streams exist, what they hold,
//! and each agent's durable consumer. The listener and the bot turn these specs
//! into client calls; nothing else decides stream names or limits.

use std::time::Duration;

use crate::agent_id::AgentId;
use crate::envelope::MAX_ENVELOPE_BYTES;
use crate::subject::{self, Subject};

/// Header carrying the envelope id; JetStream deduplicates on it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Deduplication window of the agent stream (JetStream's default).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// How long a message is kept.
    pub max_age: Duration,
    /// Largest message, in bytes.
    pub max_msg_size: i32,
    /// Deduplication window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Replicas (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// Most consumers the stream takes; 0 leaves it to the server (nats-server
    /// 2.15 gives a stream 1,000 unless the stream sets its own).
    pub max_consumers: i32,
}

/// Most consumers on the agents stream: one durable consumer per agent, so
/// the most agents one mesh serves (see ARCHITECTURE.md, "Scale").
pub const MAX_AGENT_CONSUMERS: i32 = 100_000;

/// Replicas a cluster gets when the setting is [`Replicas::Auto`].
pub const CLUSTER_REPLICAS: usize = 3;
/// Most replicas JetStream allows.
pub const MAX_REPLICAS: usize = 5;

/// How many copies of each stream to keep (`MESH_REPLICAS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// 1 on a single server, [`CLUSTER_REPLICAS`] when the server says it is
    /// part of a cluster.
    #[default]
    Auto,
    /// Exactly this many (1 to [`MAX_REPLICAS`]).
    Exactly(usize),
}

impl Replicas {
    /// The number of replicas, given the cluster the connected server belongs to (if any).
    pub fn resolve(self, cluster: Option<&str>) -> usize {
        match (self, cluster) {
            (Self::Exactly(n), _) => n,
            (Self::Auto, Some(name)) if !name.is_empty() => CLUSTER_REPLICAS,
            (Self::Auto, _) => 1,
        }
    }
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(Self::Exactly(n)),
            _ => Err(format!("replicas must be `auto` or a number from 1 to {MAX_REPLICAS}, not {raw:?}")),
        }
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Exactly(n) => write!(f, "{n}"),
        }
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);
// Room for headers and the dead-letter wrapping around an envelope.
const MAX_STORED_MSG: i32 = (MAX_ENVELOPE_BYTES + 64 * 1024) as i32;

/// Agent inboxes and broadcasts. File storage, limits retention: a message
/// stays for its consumers for a week whether or not a listener runs.
pub fn agents_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "MESH_AGENTS",
        description: "agent inboxes and broadcasts",
        subjects: vec![
            subject::ALL_INBOXES.into(),
            subject::ALL_SENT_INBOXES.into(),
            subject::BROADCAST.into(),
            subject::ALL_SENT_BROADCASTS.into(),
        ],
        max_age: 7 * DAY,
        max_msg_size: MAX_STORED_MSG,
        duplicate_window: DUPLICATE_WINDOW,
        replicas,
        max_consumers: MAX_AGENT_CONSUMERS,
    }
}

/// Dead letters: messages a listener could not deliver, with the reason.
pub fn dead_letter_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "MESH_DLQ",
        description: "undeliverable messages with the reason",
        subjects: vec![subject::ALL_DEAD_LETTERS.into()],
        max_age: 30 * DAY,
        max_msg_size: MAX_STORED_MSG,
        duplicate_window: DUPLICATE_WINDOW,
        replicas,
        max_consumers: 0,
    }
}

/// The audit trail of every command.
pub fn audit_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "MESH_AUDIT",
        description: "audit trail of every mesh command",
        subjects: vec![subject::ALL_AUDIT.into()],
        max_age: 365 * DAY,
        max_msg_size: MAX_STORED_MSG,
        duplicate_window: DUPLICATE_WINDOW,
        replicas,
        max_consumers: 0,
    }
}

/// Replies to `ask` requests, kept briefly for the asker to pick up.
pub fn replies_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "MESH_REPLIES",
        description: "agent replies to ask requests",
        subjects: vec![subject::ALL_REPLIES.into()],
        max_age: Duration::from_secs(3600),
        max_msg_size: MAX_STORED_MSG,
        duplicate_window: DUPLICATE_WINDOW,
        replicas,
        max_consumers: 0,
    }
}

/// Events for the chat channels (kill switch, agents down and up, dead letters).
pub fn events_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "MESH_EVENTS",
        description: "notifications for the chat channels",
        subjects: vec![subject::ALL_EVENTS.into()],
        max_age: 7 * DAY,
        max_msg_size: MAX_STORED_MSG,
        duplicate_window: DUPLICATE_WINDOW,
        replicas,
        max_consumers: 0,
    }
}

/// The bot replicas' bucket of the state last announced per agent (fleet monitor).
pub const FLEET_BUCKET: &str = "mesh_fleet";
/// The bot replicas' bucket of pending confirmation codes.
pub const CONFIRM_BUCKET: &str = "mesh_confirm";
/// The bot replicas' bucket of chat requests already handled.
pub const DEDUP_BUCKET: &str = "mesh_dedup";
/// The buckets the bot replicas share state in (besides the kill switch).
pub const BOT_BUCKETS: [&str; 3] = [FLEET_BUCKET, CONFIRM_BUCKET, DEDUP_BUCKET];

/// Every stream of the mesh.
pub fn all_streams(replicas: usize) -> Vec<StreamSpec> {
    vec![
        agents_stream(replicas),
        dead_letter_stream(replicas),
        audit_stream(replicas),
        replies_stream(replicas),
        events_stream(replicas),
    ]
}

/// Tunables of an agent's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerTuning {
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Messages in flight at once; 1 keeps per-agent order.
    pub max_ack_pending: i64,
}

// The server's own max-deliver is left unlimited on purpose: the listener
// counts deliveries and dead-letters a message itself, so the server never
// drops a message while the dead-letter publish is failing.
impl Default for ConsumerTuning {
    fn default() -> Self {
        Self { ack_wait: Duration::from_secs(30), max_ack_pending: 1 }
    }
}

/// Most deliveries in flight an agent's consumer may be set up for.
pub const MAX_CONCURRENCY: u16 = 1024;

/// Messages an ordered agent's consumer hands its listener at once by
/// default (its prefetch window: the one in flight and those behind it).
pub const DEFAULT_PREFETCH: u16 = 4;

/// The largest prefetch window of an ordered agent (larger ones would read
/// as a concurrency above 1, see [`ConsumerTuning::concurrency`]).
pub const MAX_PREFETCH: u16 = 4;

impl ConsumerTuning {
    /// The tuning of an agent run with `concurrency` deliveries in flight
    /// (the registry's `concurrency`, default 1) and the default prefetch
    /// window; see [`ConsumerTuning::for_agent`].
    pub fn for_concurrency(concurrency: u16) -> Self {
        Self::for_agent(concurrency, DEFAULT_PREFETCH)
    }

    /// The tuning of an agent run with `concurrency` deliveries in flight and,
    /// at concurrency 1 (in order), a prefetch window of `prefetch` messages
    /// (1 to [`MAX_PREFETCH`]): the listener delivers them strictly one after
    /// another while the next ones are already at hand, kept alive with
    /// in-progress acks. A window of 1 has the server enforce the order
    /// alone, also across listener replicas. Above concurrency 1 four times
    /// the concurrency, so the next messages wait in the listener rather than
    /// behind an ack round trip to the server.
    pub fn for_agent(concurrency: u16, prefetch: u16) -> Self {
        let concurrency = i64::from(concurrency.max(1));
        let max_ack_pending =
            if concurrency == 1 { i64::from(prefetch.clamp(1, MAX_PREFETCH)) } else { 4 * concurrency };
        Self { max_ack_pending, ..Self::default() }
    }

    /// The deliveries in flight this tuning allows a listener (the inverse of
    /// [`ConsumerTuning::for_concurrency`]; at least 1).
    pub fn concurrency(&self) -> usize {
        if self.max_ack_pending <= 1 { 1 } else { usize::try_from(self.max_ack_pending / 4).unwrap_or(1).max(1) }
    }
}

/// One agent's durable pull consumer on the agents stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Stream it reads.
    pub stream: &'static str,
    /// Durable name, `agent-<id>`.
    pub durable: String,
    /// The agent's inbox and the broadcast subject.
    pub filter_subjects: Vec<String>,
    /// Tunables.
    pub tuning: ConsumerTuning,
}

/// The durable consumer of one agent. It is created (if missing) by the bot
/// (for every active agent, at start and on registry changes), by `mesh
/// agents add`, and by every sender before it publishes, so a message sent
/// before the listener ever ran is still delivered. Never by the listener: it
/// may only look its consumer up and check it against this spec.
pub fn agent_consumer(agent: &AgentId, tuning: ConsumerTuning) -> ConsumerSpec {
    ConsumerSpec {
        stream: agents_stream(1).name,
        durable: format!("agent-{agent}"),
        // The inbox and the broadcast, each as written by the bot (plain) and by
        // agents (the sender bound into the subject).
        filter_subjects: vec![
            Subject::Inbox(agent.clone()).to_string(),
            format!("{}.*", Subject::Inbox(agent.clone())),
            Subject::Broadcast.to_string(),
            subject::ALL_SENT_BROADCASTS.to_owned(),
        ],
        tuning,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_reads_inbox_and_broadcast() {
        let spec = agent_consumer(&AgentId::parse("nova").unwrap(), ConsumerTuning::default());
        assert_eq!(spec.durable, "agent-nova");
        assert_eq!(
            spec.filter_subjects,
            ["agents.nova.inbox", "agents.nova.inbox.*", "agents.broadcast", "agents.broadcast.from.*"]
        );
        assert_eq!(spec.stream, "MESH_AGENTS");
    }

    #[test]
    fn tuning_follows_the_concurrency() {
        for (concurrency, pending) in [(0, 4), (1, 4), (2, 8), (32, 128), (1024, 4096)] {
            let tuning = ConsumerTuning::for_concurrency(concurrency);
            assert_eq!(tuning.max_ack_pending, pending, "{concurrency}");
            assert_eq!(tuning.concurrency(), usize::from(concurrency.max(1)));
            assert_eq!(tuning.ack_wait, ConsumerTuning::default().ack_wait);
        }
        assert_eq!(ConsumerTuning { max_ack_pending: 3, ..Default::default() }.concurrency(), 1);
        for prefetch in 0..=MAX_PREFETCH + 3 {
            let tuning = ConsumerTuning::for_agent(1, prefetch);
            assert_eq!(tuning.max_ack_pending, i64::from(prefetch.clamp(1, MAX_PREFETCH)), "{prefetch}");
            assert_eq!(tuning.concurrency(), 1, "a prefetch window of {prefetch} stays in order");
        }
        assert_eq!(ConsumerTuning::for_agent(8, 1).max_ack_pending, 32, "the window is for ordered agents only");
        assert_eq!(ConsumerTuning { max_ack_pending: -1, ..Default::default() }.concurrency(), 1);
    }

    #[test]
    fn replicas_parse_and_resolve() {
        let table: [(&str, Option<&str>, Result<usize, ()>); 8] = [
            ("auto", None, Ok(1)),
            ("auto", Some("mesh"), Ok(3)),
            ("AUTO", Some(""), Ok(1)),
            ("1", Some("mesh"), Ok(1)),
            (" 3 ", None, Ok(3)),
            ("5", None, Ok(5)),
            ("0", None, Err(())),
            ("6", None, Err(())),
        ];
        for (raw, cluster, want) in table {
            let got = raw.parse::<Replicas>().map(|r| r.resolve(cluster)).map_err(|_| ());
            assert_eq!(got, want, "{raw:?} on {cluster:?}");
        }
        assert!("three".parse::<Replicas>().unwrap_err().contains("`auto` or a number from 1 to 5"));
        assert_eq!(Replicas::default().to_string(), "auto");
        assert_eq!(Replicas::Exactly(3).to_string(), "3");
    }

    #[test]
    fn streams_do_not_overlap() {
        let streams = all_streams(1);
        let mut subjects: Vec<_> = streams.iter().flat_map(|s| s.subjects.clone()).collect();
        let n = subjects.len();
        subjects.sort();
        subjects.dedup();
        assert_eq!(subjects.len(), n);
        assert!(streams.iter().all(|s| s.max_msg_size as usize > MAX_ENVELOPE_BYTES));
    }
}
