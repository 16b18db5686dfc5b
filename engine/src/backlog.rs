//! Messages about to age out undelivered: `MESH_AGENTS` keeps a message 7
//! days (`max_age`), so one held that long by a pause or a stopped listener
//! would be dropped by the server without a dead letter. The bot looks at
//! every active agent's oldest undelivered message each round; once it has
//! waited [`DEFAULT_WARN_AFTER`] (a day before it ages out) it publishes an
//! event (posted in the notify channels) and the bot's `/metrics` show its age
//! (`mesh_backlog_oldest_age_seconds`, alert `BacklogAboutToExpire`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use mesh_protocol::event::{Event, EventKind};
use mesh_protocol::layout;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long a message may wait before the warning: one day before `MESH_AGENTS` drops it.
pub const DEFAULT_WARN_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);

/// One agent's oldest message not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oldest {
    /// Its stream sequence.
    pub seq: u64,
    /// When the stream stored it.
    pub stored_at: OffsetDateTime,
    /// Messages the agent's consumer holds (pending and unacknowledged).
    pub waiting: u64,
}

/// When `MESH_AGENTS` drops a message stored at `stored_at`.
pub fn ages_out_at(stored_at: OffsetDateTime) -> OffsetDateTime {
    stored_at + layout::agents_stream(1).max_age
}

/// The warning for `agent`'s oldest message, when it has waited `warn_after` or longer.
pub fn warning(agent: &str, oldest: &Oldest, now: OffsetDateTime, warn_after: Duration) -> Option<String> {
    let waited = now - oldest.stored_at;
    if waited < warn_after {
        return None;
    }
    let left = ages_out_at(oldest.stored_at) - now;
    let when = if left.is_positive() {
        format!("in {}h {}m", left.whole_hours(), left.whole_minutes() % 60)
    } else {
        "now".to_owned()
    };
    Some(format!(
        "agent {agent}: {} messages waiting, the oldest stored {}; it ages out of MESH_AGENTS {when}, \
         undelivered and without a dead letter: resume the agent or start its listener (`mesh status`)",
        oldest.waiting,
        oldest.stored_at.replace_nanosecond(0).unwrap_or(oldest.stored_at),
    ))
}

/// The oldest message `agent`'s consumer has not acknowledged, if any.
pub async fn oldest(
    stream: &jetstream::stream::Stream,
    agent: &mesh_protocol::AgentId,
) -> anyhow::Result<Option<Oldest>> {
    let spec = layout::agent_consumer(agent, layout::ConsumerTuning::default());
    let info = stream.consumer_info(&spec.durable).await?;
    let waiting = info.num_pending + info.num_ack_pending as u64;
    if waiting == 0 {
        return Ok(None);
    }
    let from = info.ack_floor.stream_sequence + 1;
    let mut first: Option<Oldest> = None;
    for subject in &spec.filter_subjects {
        let found = stream.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send().await;
        if let Ok(message) = found
            && first.as_ref().is_none_or(|f| message.sequence < f.seq)
        {
            first = Some(Oldest { seq: message.sequence, stored_at: message.time, waiting });
        }
    }
    Ok(first)
}

/// What [`watch`] needs.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The registry file (its active agents are watched).
    pub registry_path: PathBuf,
    /// `MESH_HOOKS_ALLOWED_HOSTS`, read at start.
    pub allowed_hosts: mesh_protocol::registry::HostAllowList,
    /// Time between two looks.
    pub every: Duration,
    /// How long a message may wait before the warning.
    pub warn_after: Duration,
}

/// Looks at every active agent's backlog every `config.every` until `stop`;
/// `record` gets each agent's oldest waiting age in seconds (0: nothing
/// waits), for the metrics. A warning is published once per oldest message
/// (with a `Nats-Msg-Id` naming it, so bot replicas post it once).
pub async fn watch(
    client: async_nats::Client,
    config: WatchConfig,
    stop: CancellationToken,
    record: impl Fn(&str, f64) + Send + 'static,
) {
    let js = jetstream::new(client);
    let mut warned: BTreeMap<String, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(config.every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(registry) = mesh_runtime::registry_file::load(&config.registry_path, &config.allowed_hosts) else {
            continue;
        };
        let Ok(stream) = js.get_stream(layout::agents_stream(1).name).await else { continue };
        let now = OffsetDateTime::now_utc();
        for agent in registry.active() {
            let id = agent.id.as_str();
            let oldest = match oldest(&stream, &agent.id).await {
                Ok(oldest) => oldest,
                Err(e) => {
                    debug!(agent = id, error = %e, "backlog not read");
                    continue;
                }
            };
            let age = oldest.as_ref().map_or(0.0, |o| (now - o.stored_at).as_seconds_f64().max(0.0));
            record(id, age);
            let Some(oldest) = oldest else { continue };
            let Some(text) = warning(id, &oldest, now, config.warn_after) else { continue };
            if warned.get(id) == Some(&oldest.seq) {
                continue;
            }
            warn!(agent = id, seq = oldest.seq, "{text}");
            let event = Event::now(EventKind::Agent, text);
            crate::events::publish_once(&js, &event, &format!("backlog:{id}:{}", oldest.seq)).await;
            warned.insert(id.to_owned(), oldest.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_message_is_announced_from_a_day_before_it_ages_out() {
        let stored = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let oldest = Oldest { seq: 7, stored_at: stored, waiting: 3 };
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(warning("nova", &oldest, stored + 5 * day, DEFAULT_WARN_AFTER), None);
        let text = warning("nova", &oldest, stored + 6 * day + Duration::from_secs(90), DEFAULT_WARN_AFTER).unwrap();
        assert!(text.starts_with("agent nova: 3 messages waiting"), "{text}");
        assert!(text.contains("ages out of MESH_AGENTS in 23h 58m"), "{text}");
        let late = warning("nova", &oldest, stored + 8 * day, DEFAULT_WARN_AFTER).unwrap();
        assert!(late.contains("ages out of MESH_AGENTS now"), "{late}");
        assert_eq!(ages_out_at(stored), stored + 7 * day);
    }
}
