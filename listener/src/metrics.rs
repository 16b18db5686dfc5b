//! Prometheus metrics of the listener. Names are constants so dashboards and
//! alert rules can be checked against them. [`upkeep`] drains recorded
//! histogram samples on a timer, so memory stays flat when nobody scrapes.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Deliveries by agent and outcome (`delivered`, `retry`, `dead_letter`).
pub const DELIVERIES: &str = "mesh_deliveries_total";
/// Seconds from the envelope's `sent_at` (or the agent's last resume by the
/// kill switch, when later) to the gateway's 2xx: time paused is not counted.
pub const LATENCY: &str = "mesh_publish_to_gateway_seconds";
/// Seconds a gateway request took.
pub const GATEWAY_DURATION: &str = "mesh_gateway_request_seconds";
/// Messages waiting per agent.
pub const PENDING: &str = "mesh_pending_messages";
/// 1 while an agent is paused.
pub const PAUSED: &str = "mesh_paused";
/// Chat replies routed back, by agent.
pub const REPLIES: &str = "mesh_replies_total";
/// Chat replies stopped by the loop guard, by agent.
pub const LOOP_GUARD: &str = "mesh_loop_guard_total";
/// Seconds the agent's oldest undelivered message has waited in `MESH_AGENTS`
/// (0: nothing waits); recorded by the bot, which warns a day before 7 days.
pub const BACKLOG_OLDEST_AGE: &str = "mesh_backlog_oldest_age_seconds";

const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How often [`upkeep`] drains histogram samples into their buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder once and returns its handle. The
/// recorder keeps every histogram sample until upkeep (or a scrape) folds it
/// into the buckets: run [`upkeep`] next to it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Prefix("mesh_".into()), BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embed several
            // listeners); then this handle renders nothing, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Something whose recorded samples must be drained now and then (the
/// recorder's handle; a counter in tests).
pub trait Upkeep {
    /// Drains what was recorded since the last call.
    fn run_upkeep(&self);
}

impl Upkeep for PrometheusHandle {
    fn run_upkeep(&self) {
        PrometheusHandle::run_upkeep(self);
    }
}

/// Runs `target`'s upkeep every `every` until `stop` is cancelled. Without
/// it, each histogram sample (two per delivered message) stays in memory
/// until someone scrapes `/metrics`, which by default nobody does.
pub async fn upkeep(target: impl Upkeep, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => target.run_upkeep(),
        }
    }
}

/// One agent's delivery counters, registered once so the per-message path
/// neither allocates labels nor looks the series up.
#[derive(Debug, Clone)]
pub struct DeliveryCounters {
    /// Delivered (2xx and acked).
    pub delivered: metrics::Counter,
    /// Scheduled for retry.
    pub retry: metrics::Counter,
    /// Dead-lettered.
    pub dead_letter: metrics::Counter,
}

impl DeliveryCounters {
    /// Registers the counters of `agent` (after installing the recorder, so they are never no-ops).
    pub fn new(agent: &str) -> Self {
        install();
        let counter =
            |outcome: &'static str| metrics::counter!(DELIVERIES, "agent" => agent.to_owned(), "outcome" => outcome);
        Self { delivered: counter("delivered"), retry: counter("retry"), dead_letter: counter("dead_letter") }
    }
}

/// Records publish-to-gateway latency.
pub fn latency(elapsed: Duration) {
    static HISTOGRAM: OnceLock<metrics::Histogram> = OnceLock::new();
    HISTOGRAM.get_or_init(|| registered(|| metrics::histogram!(LATENCY))).record(elapsed.as_secs_f64());
}

/// The latency of a delivery at `now`: from `sent_at`, or from the agent's
/// last resume when that is later, so a message held by a pause (a
/// maintenance window, a kill) does not count the pause. `None` when the
/// clocks disagree (a start in the future).
pub fn latency_since(
    sent_at: time::OffsetDateTime,
    resumed_at: Option<time::OffsetDateTime>,
    now: time::OffsetDateTime,
) -> Option<Duration> {
    let start = resumed_at.map_or(sent_at, |resumed| resumed.max(sent_at));
    (now - start).try_into().ok()
}

/// Records a gateway request's duration.
pub fn gateway_duration(elapsed: Duration) {
    static HISTOGRAM: OnceLock<metrics::Histogram> = OnceLock::new();
    HISTOGRAM.get_or_init(|| registered(|| metrics::histogram!(GATEWAY_DURATION))).record(elapsed.as_secs_f64());
}

fn registered<T>(register: impl FnOnce() -> T) -> T {
    install();
    register()
}

/// Sets an agent's pending count.
pub fn pending(agent: &str, pending: u64) {
    metrics::gauge!(PENDING, "agent" => agent.to_owned()).set(pending as f64);
}

/// Sets the age of an agent's oldest undelivered message (the bot's backlog watch).
pub fn backlog_age(agent: &str, seconds: f64) {
    metrics::gauge!(BACKLOG_OLDEST_AGE, "agent" => agent.to_owned()).set(seconds);
}

/// Sets an agent's paused flag.
pub fn paused(agent: &str, paused: bool) {
    metrics::gauge!(PAUSED, "agent" => agent.to_owned()).set(if paused { 1.0 } else { 0.0 });
}

/// Counts a routed reply.
pub fn reply(agent: &str) {
    metrics::counter!(REPLIES, "agent" => agent.to_owned()).increment(1);
}

/// Counts a reply stopped by the loop guard.
pub fn loop_guard(agent: &str) {
    metrics::counter!(LOOP_GUARD, "agent" => agent.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Counts upkeep runs on a channel.
    struct Probe(mpsc::UnboundedSender<()>);

    impl Upkeep for Probe {
        fn run_upkeep(&self) {
            let _ = self.0.send(());
        }
    }

    #[test]
    fn latency_does_not_count_time_paused() {
        use time::macros::datetime;
        let sent = datetime!(2026-11-30 10:00:00 UTC);
        let resumed = datetime!(2026-11-30 10:05:00 UTC);
        let now = datetime!(2026-11-30 10:05:02 UTC);
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        // Held by a five-minute pause: two seconds, not 302.
        assert_eq!(secs(latency_since(sent, Some(resumed), now)), Some(2));
        // Sent after the last resume, or never paused: from the send.
        assert_eq!(secs(latency_since(resumed, Some(sent), now)), Some(2));
        assert_eq!(secs(latency_since(sent, None, now)), Some(302));
        // A sender's clock ahead of ours: nothing recorded.
        assert_eq!(latency_since(now, None, sent), None);
    }

    #[test]
    fn a_resume_is_recorded_when_a_pause_ends() {
        let state = crate::state::AgentState::new("nova".parse().unwrap());
        state.set_paused(false);
        assert_eq!(state.resumed_at(), None, "never paused");
        state.set_paused(true);
        assert_eq!(state.resumed_at(), None, "still paused");
        let before = time::OffsetDateTime::now_utc() - Duration::from_millis(1);
        state.set_paused(false);
        assert!(state.resumed_at().is_some_and(|at| at >= before), "{:?}", state.resumed_at());
    }

    #[tokio::test]
    async fn upkeep_runs_on_its_timer_until_stopped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(upkeep(Probe(tx), Duration::from_millis(5), stop.clone()));
        for _ in 0..3 {
            rx.recv().await.expect("upkeep ran");
        }
        stop.cancel();
        task.await.expect("the upkeep task ends when stopped");
        // The task dropped its probe: nothing runs after the stop.
        while rx.try_recv().is_ok() {}
        assert!(rx.recv().await.is_none(), "upkeep ran after the stop");
    }
}
