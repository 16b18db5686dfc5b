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
    if config.max_age != spec.max_age {
        diffs.push(format!("max_age {:?}, expected {:?}", config.max_age, spec.max_age));
    }
    if config.max_message_size != spec.max_msg_size {
        diffs.push(format!("max_msg_size {}, expected {}", config.max_message_size, spec.max_msg_size));
    }
    if config.duplicate_window != spec.duplicate_window {
        diffs.push(format!("duplicate_window {:?}, expected {:?}", config.duplicate_window, spec.duplicate_window));
    }
    if config.max_messages_per_subject > 0 {
        diffs.push(format!("max_msgs_per_subject {}, expected unlimited", config.max_messages_per_subject));
    }
    if config.discard != stream::DiscardPolicy::Old {
        diffs.push(format!("discard {:?}, expected old", config.discard));
    }
    diffs.extend(storage_diffs(config));
    mismatch(format!("stream {}", spec.name), diffs)
}

/// What changes which messages a stream stores, under which subject, or
/// where else they go, for the mesh streams and the kill switch bucket alike:
/// it must hold what is published to it, as published, and nothing else.
fn storage_diffs(config: &stream::Config) -> Vec<String> {
    let mut diffs = Vec::new();
    if let Some(transform) = &config.subject_transform
        && !(transform.source.is_empty() && transform.destination.is_empty())
    {
        diffs.push(format!("subject_transform {:?} -> {:?}, expected none", transform.source, transform.destination));
    }
    if let Some(republish) = &config.republish {
        diffs.push(format!("republish {:?} -> {:?}, expected none", republish.source, republish.destination));
    }
    if let Some(mirror) = &config.mirror {
        diffs.push(format!("mirror of {:?}, expected none", mirror.name));
    }
    if let Some(sources) = config.sources.as_ref().filter(|s| !s.is_empty()) {
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        diffs.push(format!("sources {names:?}, expected none"));
    }
    if config.sealed {
        diffs.push("sealed, expected open".to_owned());
    }
    if config.no_ack {
        diffs.push("no_ack on, expected publishes to be acknowledged".to_owned());
    }
    if config.max_messages > 0 {
        diffs.push(format!("max_msgs {}, expected unlimited", config.max_messages));
    }
    if config.max_bytes > 0 {
        diffs.push(format!("max_bytes {}, expected unlimited", config.max_bytes));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        diffs.push(format!("retention {:?}, expected limits", config.retention));
    }
    diffs
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
    if !config.allow_direct {
        diffs.push("allow_direct off, expected on (listeners read their keys with direct gets)".to_owned());
    }
    if config.max_message_size > 0 {
        diffs.push(format!("max_msg_size {}, expected unlimited", config.max_message_size));
    }
    diffs.extend(storage_diffs(config));
    mismatch(format!("kill switch bucket {BUCKET}"), diffs)
}

/// Checks an agent's consumer: what it reads (filters), that it is a pull
/// consumer with explicit acks, and that the server never drops a message
/// by itself (the listener counts deliveries and dead-letters). The tuning
/// (ack wait, messages in flight) is the consumer's: see [`effective`].
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
    if config.headers_only {
        diffs.push("headers_only on, expected whole messages".to_owned());
    }
    if config.replay_policy != consumer::ReplayPolicy::Instant {
        diffs.push(format!("replay_policy {:?}, expected instant", config.replay_policy));
    }
    if config.rate_limit > 0 {
        diffs.push(format!("rate_limit {} bit/s, expected none", config.rate_limit));
    }
    // New (the bot) or from a sequence (a restore); never one that skips what is stored by time or by subject.
    if !matches!(
        config.deliver_policy,
        consumer::DeliverPolicy::New | consumer::DeliverPolicy::All | consumer::DeliverPolicy::ByStartSequence { .. }
    ) {
        diffs.push(format!("deliver_policy {:?}, expected new", config.deliver_policy));
    }
    if !config.inactive_threshold.is_zero() {
        diffs.push(format!(
            "inactive_threshold {:?}, expected none (the server would delete it while its listener is down)",
            config.inactive_threshold
        ));
    }
    if !config.backoff.is_empty() {
        diffs.push(format!("backoff {:?}, expected none (the listener schedules retries)", config.backoff));
    }
    mismatch(format!("consumer {}", spec.durable), diffs)
}

/// What a listener runs with on a consumer: its ack wait, and the fewer of
/// the deliveries in flight asked for (`--concurrency`) and those the
/// consumer allows (its `max_ack_pending`, see
/// [`mesh_protocol::layout::ConsumerTuning::concurrency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    /// The consumer's ack wait (in-progress acks go out at a third of it).
    pub ack_wait: std::time::Duration,
    /// Deliveries in flight.
    pub concurrency: usize,
}

/// The settings a listener asking for `concurrency` and `ack_wait` runs with
/// on the consumer `info`, and a note for the log when they differ from
/// what it asked for.
pub fn effective(
    concurrency: usize,
    ack_wait: std::time::Duration,
    info: &consumer::Info,
) -> (Effective, Option<String>) {
    let config = &info.config;
    let tuning =
        mesh_protocol::layout::ConsumerTuning { ack_wait: config.ack_wait, max_ack_pending: config.max_ack_pending };
    let allowed = tuning.concurrency();
    let run = Effective { ack_wait: config.ack_wait, concurrency: concurrency.clamp(1, allowed) };
    let mut notes = Vec::new();
    if run.concurrency != concurrency {
        notes.push(format!(
            "runs {} deliveries in flight, not {concurrency}: consumer {} allows {allowed} (max_ack_pending {}); \
             set \"concurrency\": {concurrency} for the agent in the registry and the bot updates it",
            run.concurrency, info.name, config.max_ack_pending
        ));
    }
    if run.ack_wait != ack_wait {
        notes.push(format!(
            "uses consumer {}'s ack wait {:?}, not --ack-wait {:?} (in-progress acks every {:?})",
            info.name,
            run.ack_wait,
            ack_wait,
            run.ack_wait / 3
        ));
    }
    (run, (!notes.is_empty()).then(|| notes.join("; ")))
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
        assert_eq!(
            check_consumer(
                &spec,
                &consumer_info(&[
                    "agents.broadcast",
                    "agents.broadcast.from.*",
                    "agents.nova.inbox",
                    "agents.nova.inbox.*"
                ])
            ),
            Ok(())
        );
        // One made before the sender-bound subjects is refused too (the bot rebinds it).
        assert!(check_consumer(&spec, &consumer_info(&["agents.broadcast", "agents.nova.inbox"])).is_err());
        let err = check_consumer(&spec, &consumer_info(&["agents.*.inbox", "agents.broadcast"])).unwrap_err();
        assert!(err.is_fatal());
        assert!(
            err.to_string().starts_with(
                "consumer agent-nova is not set up as this listener expects (filters [\"agents.*.inbox\", \
                 \"agents.broadcast\"], expected [\"agents.broadcast\", \"agents.broadcast.from.*\", \"agents.nova.inbox\", \
                 \"agents.nova.inbox.*\"]); refusing to run"
            ),
            "{err}"
        );
    }

    #[test]
    fn consumer_settings_that_change_what_is_delivered_are_refused() {
        let spec = agent_consumer(&"nova".parse().unwrap(), ConsumerTuning::default());
        let good =
            consumer_info(&["agents.broadcast", "agents.broadcast.from.*", "agents.nova.inbox", "agents.nova.inbox.*"]);
        type Change = fn(&mut consumer::Config);
        let changes: [(&str, Change); 6] = [
            ("headers_only", |c| c.headers_only = true),
            ("replay_policy", |c| c.replay_policy = consumer::ReplayPolicy::Original),
            ("rate_limit", |c| c.rate_limit = 8),
            ("deliver_policy", |c| c.deliver_policy = consumer::DeliverPolicy::LastPerSubject),
            ("inactive_threshold", |c| c.inactive_threshold = std::time::Duration::from_secs(60)),
            ("backoff", |c| c.backoff = vec![std::time::Duration::from_secs(60)]),
        ];
        for (field, change) in changes {
            let mut info = good.clone();
            change(&mut info.config);
            let said = check_consumer(&spec, &info).unwrap_err().to_string();
            assert!(said.contains(field), "{field}: {said}");
        }
        let mut restored = good.clone();
        restored.config.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence: 7 };
        assert_eq!(check_consumer(&spec, &restored), Ok(()));
    }

    #[test]
    fn a_listener_runs_within_its_consumer() {
        let info = consumer_info(&["agents.nova.inbox", "agents.broadcast"]);
        let thirty = std::time::Duration::from_secs(30);
        assert_eq!(effective(1, thirty, &info), (Effective { ack_wait: thirty, concurrency: 1 }, None));
        let (run, note) = effective(32, std::time::Duration::from_secs(120), &info);
        assert_eq!(run, Effective { ack_wait: thirty, concurrency: 1 });
        let note = note.unwrap();
        assert!(note.contains("runs 1 deliveries in flight, not 32: consumer agent-nova allows 1"), "{note}");
        assert!(note.contains("ack wait 30s, not --ack-wait 120s"), "{note}");
        let mut wide = info.clone();
        wide.config.max_ack_pending = 128;
        assert_eq!(effective(4, thirty, &wide), (Effective { ack_wait: thirty, concurrency: 4 }, None));
        assert_eq!(effective(64, thirty, &wide).0.concurrency, 32);
    }

    #[test]
    fn streams_and_the_bucket_are_compared_with_the_layout() {
        let spec = agents_stream(1);
        let config = crate::nats::stream_config(&spec);
        assert_eq!(check_stream(&spec, &config), Ok(()));
        let wider =
            stream::Config { subjects: vec!["agents.>".into()], max_age: std::time::Duration::ZERO, ..config.clone() };
        let err = check_stream(&spec, &wider).unwrap_err().to_string();
        // Each setting that changes what is stored, or where it goes, alone.
        let changed: [(&str, stream::Config); 9] = [
            (
                "subject_transform",
                stream::Config {
                    subject_transform: Some(stream::SubjectTransform {
                        source: "agents.*.inbox".into(),
                        destination: "agents.a1.inbox".into(),
                    }),
                    ..config.clone()
                },
            ),
            (
                "republish",
                stream::Config {
                    republish: Some(stream::Republish {
                        source: ">".into(),
                        destination: "mesh.health.ping".into(),
                        headers_only: false,
                    }),
                    ..config.clone()
                },
            ),
            (
                "mirror",
                stream::Config {
                    mirror: Some(stream::Source { name: "X".into(), ..Default::default() }),
                    ..config.clone()
                },
            ),
            (
                "sources",
                stream::Config {
                    sources: Some(vec![stream::Source { name: "X".into(), ..Default::default() }]),
                    ..config.clone()
                },
            ),
            ("sealed", stream::Config { sealed: true, ..config.clone() }),
            ("max_msgs 5", stream::Config { max_messages: 5, ..config.clone() }),
            ("max_bytes 5", stream::Config { max_bytes: 5, ..config.clone() }),
            ("max_msgs_per_subject 1", stream::Config { max_messages_per_subject: 1, ..config.clone() }),
            ("discard New", stream::Config { discard: stream::DiscardPolicy::New, ..config.clone() }),
        ];
        for (field, changed) in changed {
            let said = check_stream(&spec, &changed).unwrap_err().to_string();
            assert!(said.contains(field), "{field}: {said}");
        }
        assert!(err.contains("subjects [\"agents.>\"], expected") && err.contains("max_age 0ns"), "{err}");
        let bucket = stream::Config {
            subjects: vec!["$KV.mesh_killswitch.>".into()],
            max_messages_per_subject: 16,
            allow_direct: true,
            ..Default::default()
        };
        assert_eq!(check_bucket(&bucket), Ok(()));
        let hidden = stream::Config {
            subject_transform: Some(stream::SubjectTransform {
                source: "$KV.mesh_killswitch.global".into(),
                destination: "$KV.mesh_killswitch.elsewhere".into(),
            }),
            ..bucket.clone()
        };
        assert!(check_bucket(&hidden).unwrap_err().to_string().contains("subject_transform"));
        let expiring = stream::Config { max_age: std::time::Duration::from_secs(1), ..bucket };
        assert!(check_bucket(&expiring).unwrap_err().to_string().contains("entries expire after 1s, expected never"));
        assert_eq!(
            LayoutError::MissingConsumer("agent-nova".into()).to_string(),
            "consumer agent-nova does not exist yet; the bot (`mesh bot`) or `mesh agents add` creates it"
        );
    }
}
