//! What a listener checks before it reads anything: the streams, the kill
//! switch bucket and its agent's consumer must be what
//! [`mesh_protocol::layout`] describes. A listener may not create or change
//! them (the bot and the `mesh` commands do), so it waits for what is missing
//! and refuses to run on what is set up differently. The comparisons are pure.

use async_nats::jetstream::{consumer, stream};
use mesh_protocol::killswitch::BUCKET;
use mesh_protocol::layout::{ConsumerSpec, StreamSpec};

/// Who creates what a listener waits for.
const CREATORS: &str = "the bot (`mesh bot`) or `mesh agents add` creates it";

/// Why a listener cannot use the JetStream layout (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A stream is missing: wait for the bot.
    #[error("stream {0} does not exist yet; {CREATORS}")]
    MissingStream(String),
    /// The kill switch bucket is missing: wait for the bot.
    #[error("kill switch bucket {BUCKET} does not exist yet; {CREATORS}")]
    MissingBucket,
    /// The agent's consumer is missing: wait for the bot.
    #[error("consumer {0} does not exist yet; {CREATORS}")]
    MissingConsumer(String),
    /// Something exists with other settings than the layout's: refuse to run.
    #[error(
        "{what} is not set up as this listener expects ({why}); refusing to run: an admin checks who changed it and \
         recreates it (delete it; the bot creates it again as it should be)"
    )]
    Mismatch {
        /// `stream MESH_AGENTS`, `consumer agent-nova`.
        what: String,
        /// The differences.
        why: String,
    },
    /// NATS did not answer as expected (retry).
    #[error("{0}")]
    Nats(String),
}

impl LayoutError {
    /// True when waiting will not help: the listener must stop.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Mismatch { .. })
    }
}

fn mismatch(what: String, diffs: Vec<String>) -> Result<(), LayoutError> {
    if diffs.is_empty() { Ok(()) } else { Err(LayoutError::Mismatch { what, why: diffs.join(", ") }) }
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().filter(|s| !s.is_empty()).collect();
    items.sort();
    items.dedup();
    items
}

/// Checks a stream's config against its spec (replicas may differ: a cluster scales them).
pub fn check_stream(spec: &StreamSpec, config: &stream::Config) -> Result<(), LayoutError> {
    let mut diffs = Vec::new();
    let (want, have) = (sorted(spec.subjects.clone()), sorted(config.subjects.clone()));
    if want != have {
        diffs.push(format!("subjects {have:?}, expected {want:?}"));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        diffs.push(format!("retention {:?}, expected limits", config.retention));
    }
    if config.max_age != spec.max_age {
        diffs.push(format!("max_age {:?}, expected {:?}", config.max_age, spec.max_age));
    }
    if config.max_message_size != spec.max_msg_size {
        diffs.push(format!("max_msg_size {}, expected {}", config.max_message_size, spec.max_msg_size));
    }
    if config.duplicate_window != spec.duplicate_window {
        diffs.push(format!("duplicate_window {:?}, expected {:?}", config.duplicate_window, spec.duplicate_window));
    }
    mismatch(format!("stream {}", spec.name), diffs)
}

/// Checks the kill switch bucket's stream: its entries must never expire (a
/// hard kill lasts until a director resumes) and it holds only its own keys.
pub fn check_bucket(config: &stream::Config) -> Result<(), LayoutError> {
    let mut diffs = Vec::new();
    let want = vec![mesh_protocol::access::killswitch_keys()];
    if sorted(config.subjects.clone()) != want {
        diffs.push(format!("subjects {:?}, expected {want:?}", config.subjects));
    }
    if !config.max_age.is_zero() {
        diffs.push(format!("entries expire after {:?}, expected never", config.max_age));
    }
    if config.max_messages_per_subject < 1 {
        diffs.push("not a key-value bucket".to_owned());
    }
    mismatch(format!("kill switch bucket {BUCKET}"), diffs)
}

/// Checks an agent's consumer: what it reads (filters), that it is a pull
/// consumer with explicit acks, and that the server never drops a message
/// by itself (the listener counts deliveries and dead-letters). The tuning
/// (ack wait, messages in flight) may differ: see [`tuning_note`].
pub fn check_consumer(spec: &ConsumerSpec, info: &consumer::Info) -> Result<(), LayoutError> {
    let config = &info.config;
    let mut diffs = Vec::new();
    if info.stream_name != spec.stream {
        diffs.push(format!("stream {}, expected {}", info.stream_name, spec.stream));
    }
    let want = sorted(spec.filter_subjects.clone());
    let have = sorted(config.filter_subjects.iter().cloned().chain([config.filter_subject.clone()]));
    if want != have {
        diffs.push(format!("filters {have:?}, expected {want:?}"));
    }
    if config.deliver_subject.is_some() {
        diffs.push("a push consumer, expected a pull consumer".to_owned());
    }
    if config.ack_policy != consumer::AckPolicy::Explicit {
        diffs.push(format!("ack policy {:?}, expected explicit", config.ack_policy));
    }
    if config.max_deliver > 0 {
        diffs.push(format!("max_deliver {}, expected unlimited (the listener dead-letters)", config.max_deliver));
    }
    mismatch(format!("consumer {}", spec.durable), diffs)
}

/// A warning when the consumer's tuning differs from this listener's
/// settings (it runs with the consumer's: fewer messages in flight, or a
/// different ack wait, than `--concurrency` and `--ack-wait` ask for).
pub fn tuning_note(spec: &ConsumerSpec, info: &consumer::Info) -> Option<String> {
    let config = &info.config;
    let (want, have) = (spec.tuning, (config.ack_wait, config.max_ack_pending));
    (have != (want.ack_wait, want.max_ack_pending)).then(|| {
        format!(
            "consumer {} has ack_wait {:?} and max_ack_pending {}; this listener's settings ask for {:?} and {}: \
             the consumer's apply (the bot creates consumers with the defaults)",
            spec.durable, have.0, have.1, want.ack_wait, want.max_ack_pending
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::layout::{ConsumerTuning, agent_consumer, agents_stream};

    fn consumer_info(filters: &[&str]) -> consumer::Info {
        let spec = agent_consumer(&"nova".parse().unwrap(), ConsumerTuning::default());
        let json = serde_json::json!({
            "stream_name": "MESH_AGENTS",
            "name": spec.durable,
            "created": "2026-11-30T12:00:00Z",
            "config": {
                "durable_name": spec.durable,
                "deliver_policy": "new",
                "ack_policy": "explicit",
                "ack_wait": 30_000_000_000u64,
                "max_deliver": -1,
                "filter_subjects": filters,
                "replay_policy": "instant",
                "max_ack_pending": 1,
            },
            "delivered": {"consumer_seq": 0, "stream_seq": 0},
            "ack_floor": {"consumer_seq": 0, "stream_seq": 0},
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_consumer_reading_other_inboxes_is_refused() {
        let spec = agent_consumer(&"nova".parse().unwrap(), ConsumerTuning::default());
        assert_eq!(check_consumer(&spec, &consumer_info(&["agents.broadcast", "agents.nova.inbox"])), Ok(()));
        let err = check_consumer(&spec, &consumer_info(&["agents.*.inbox", "agents.broadcast"])).unwrap_err();
        assert!(err.is_fatal());
        assert!(
            err.to_string().starts_with(
                "consumer agent-nova is not set up as this listener expects (filters [\"agents.*.inbox\", \
                 \"agents.broadcast\"], expected [\"agents.broadcast\", \"agents.nova.inbox\"]); refusing to run"
            ),
            "{err}"
        );
        assert_eq!(tuning_note(&spec, &consumer_info(&["agents.nova.inbox", "agents.broadcast"])), None);
        let busy =
            agent_consumer(&"nova".parse().unwrap(), ConsumerTuning { max_ack_pending: 16, ..Default::default() });
        assert!(tuning_note(&busy, &consumer_info(&[])).unwrap().contains("max_ack_pending 1"));
    }

    #[test]
    fn streams_and_the_bucket_are_compared_with_the_layout() {
        let spec = agents_stream(1);
        let config = crate::nats::stream_config(&spec);
        assert_eq!(check_stream(&spec, &config), Ok(()));
        let wider = stream::Config { subjects: vec!["agents.>".into()], max_age: std::time::Duration::ZERO, ..config };
        let err = check_stream(&spec, &wider).unwrap_err().to_string();
        assert!(err.contains("subjects [\"agents.>\"], expected") && err.contains("max_age 0ns"), "{err}");
        let bucket = stream::Config {
            subjects: vec!["$KV.mesh_killswitch.>".into()],
            max_messages_per_subject: 16,
            ..Default::default()
        };
        assert_eq!(check_bucket(&bucket), Ok(()));
        let expiring = stream::Config { max_age: std::time::Duration::from_secs(1), ..bucket };
        assert!(check_bucket(&expiring).unwrap_err().to_string().contains("entries expire after 1s, expected never"));
        assert_eq!(
            LayoutError::MissingConsumer("agent-nova".into()).to_string(),
            "consumer agent-nova does not exist yet; the bot (`mesh bot`) or `mesh agents add` creates it"
        );
    }
}
