//! What a gateway outcome, and for a chat agent the fate of its reply, means
//! for the message: ack it, retry it later, or give up and dead-letter it;
//! and whether a message is past its time to live. Pure, table-tested.

use std::time::Duration;

/// What happened when the listener called the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The gateway answered with this status.
    Status {
        /// HTTP status code.
        code: u16,
        /// The `Retry-After` the gateway asked for.
        retry_after: Option<Duration>,
    },
    /// No answer within the request timeout.
    Timeout,
    /// No connection (refused, reset, DNS).
    Unreachable(String),
}

impl Outcome {
    /// The HTTP status, if the gateway answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Status { code: 200..=299, .. } => "ok",
            Self::Status { .. } => "http_error",
            Self::Timeout => "timeout",
            Self::Unreachable(_) => "unreachable",
        }
    }
}

/// What to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Delivered: ack it.
    Ack,
    /// Not delivered: have JetStream redeliver it after this delay.
    Retry(Duration),
    /// Not deliverable: store it as a dead letter with this reason, then ack it.
    DeadLetter(String),
}

/// Retry limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first redelivery.
    pub base: Duration,
    /// Longest delay between deliveries.
    pub max: Duration,
    /// Deliveries before giving up (the first delivery counts).
    pub max_deliver: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { base: Duration::from_millis(500), max: Duration::from_secs(60), max_deliver: 10 }
    }
}

/// Longest `Retry-After` honoured; a gateway asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// True for outcomes worth retrying: 408, 425, 429, 5xx, timeouts, no connection.
pub fn is_retryable(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Status { code, .. } => matches!(code, 408 | 425 | 429 | 500..=599),
        Outcome::Timeout | Outcome::Unreachable(_) => true,
    }
}

/// Decides what to do after `delivered` deliveries (1 for the first) ended in
/// `outcome`. `jitter` in `[0, 1)` spreads retries of many messages apart.
pub fn decide(outcome: &Outcome, delivered: u64, policy: &RetryPolicy, jitter: f64) -> Decision {
    if let Outcome::Status { code: 200..=299, .. } = outcome {
        return Decision::Ack;
    }
    let what = describe(outcome);
    if !is_retryable(outcome) {
        return Decision::DeadLetter(format!("{what}; not retried"));
    }
    if delivered >= policy.max_deliver {
        return Decision::DeadLetter(format!("{what}; gave up after {delivered} deliveries"));
    }
    let retry_after = match outcome {
        Outcome::Status { retry_after, .. } => *retry_after,
        _ => None,
    };
    Decision::Retry(backoff(retry_after, delivered, policy, jitter))
}

/// How routing a chat agent's reply went (checked before the gateway is
/// called, and published after its 2xx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Published, or there is nothing to publish (a broadcast, no reply text,
    /// no reply address, the loop guard).
    Done,
    /// Can never be published for this message: the target is not a
    /// registered active agent or has no consumer, the gateway's answer was
    /// cut at the read cap, the reply cannot be encoded.
    Refused(String),
    /// May work later: the publish or the target lookup failed (timeout, no
    /// permission yet, JetStream full or unavailable).
    Failed(String),
}

/// Decides what to do with a message whose gateway call (if any) was fine
/// but whose reply ended in `outcome`, after `delivered` deliveries. A refused
/// reply is dead-lettered at once, so the gateway is not called again for
/// it; a failed one is retried with the backoff and counts against the
/// delivery budget like a failed gateway call.
pub fn decide_reply(outcome: &ReplyOutcome, delivered: u64, policy: &RetryPolicy, jitter: f64) -> Decision {
    match outcome {
        ReplyOutcome::Done => Decision::Ack,
        ReplyOutcome::Refused(why) => Decision::DeadLetter(format!("{why}; not retried")),
        ReplyOutcome::Failed(why) if delivered >= policy.max_deliver => {
            Decision::DeadLetter(format!("{why}; gave up after {delivered} deliveries"))
        }
        ReplyOutcome::Failed(_) => Decision::Retry(backoff(None, delivered, policy, jitter)),
    }
}

/// The delay before delivery `delivered + 1`: `base` doubling per delivery,
/// capped at `max`, with equal jitter, and at least `retry_after` (capped at
/// [`MAX_RETRY_AFTER`]).
pub fn backoff(retry_after: Option<Duration>, delivered: u64, policy: &RetryPolicy, jitter: f64) -> Duration {
    let exponent = delivered.saturating_sub(1).min(20) as u32;
    let full = policy.base.saturating_mul(2u32.saturating_pow(exponent)).min(policy.max);
    // Equal jitter: half fixed, half random, so delays grow but do not align.
    // `clamp` passes NaN through and `mul_f64` panics on it: a NaN jitter counts as 0.
    let jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
    let jittered = full.mul_f64(0.5 + 0.5 * jitter);
    match retry_after {
        Some(after) => jittered.max(after.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Status { code, .. } => format!("gateway answered HTTP {code}"),
        Outcome::Timeout => "gateway did not answer in time".into(),
        Outcome::Unreachable(why) => format!("gateway unreachable: {why}"),
    }
}

/// The dead-letter reason of a message past its expiry at `now`, if it is.
pub fn expired(envelope: &mesh_protocol::Envelope, now: time::OffsetDateTime) -> Option<String> {
    if !envelope.is_expired(now) {
        return None;
    }
    let at = envelope.expires_at?;
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let at = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    Some(format!("{EXPIRED}: its time to live ended at {at}; not delivered"))
}

/// The first word of an expired message's dead-letter reason.
pub const EXPIRED: &str = "expired";

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Outcome {
        Outcome::Status { code, retry_after: None }
    }

    #[test]
    fn a_message_past_its_expiry_is_a_dead_letter_named_expired() {
        use mesh_protocol::envelope::EXPIRY_SKEW_TOLERANCE;
        let env = mesh_protocol::Envelope::new("cli:t", mesh_protocol::Recipient::Broadcast, "x").unwrap();
        assert_eq!(expired(&env, env.sent_at + Duration::from_secs(86_400)), None, "no ttl, no expiry");
        let env = env.with_ttl(Duration::from_secs(2)).unwrap();
        let at = env.expires_at.unwrap();
        assert_eq!(expired(&env, at + EXPIRY_SKEW_TOLERANCE), None);
        let reason = expired(&env, at + EXPIRY_SKEW_TOLERANCE + Duration::from_millis(1)).unwrap();
        assert!(reason.starts_with("expired: its time to live ended at "), "{reason}");
    }

    #[test]
    fn outcome_table() {
        let policy = RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(60), max_deliver: 5 };
        let retry = |d: u64| Decision::Retry(Duration::from_secs(d));
        let cases: Vec<(Outcome, u64, Decision)> = vec![
            (status(200), 1, Decision::Ack),
            (status(202), 9, Decision::Ack),
            (status(204), 1, Decision::Ack),
            (status(408), 1, retry(1)),
            (status(425), 2, retry(2)),
            (status(429), 3, retry(4)),
            (status(500), 1, retry(1)),
            (status(502), 4, retry(8)),
            (status(503), 5, Decision::DeadLetter("gateway answered HTTP 503; gave up after 5 deliveries".into())),
            (Outcome::Timeout, 1, retry(1)),
            (Outcome::Unreachable("connection refused".into()), 2, retry(2)),
            (
                Outcome::Unreachable("connection refused".into()),
                5,
                Decision::DeadLetter("gateway unreachable: connection refused; gave up after 5 deliveries".into()),
            ),
            (status(400), 1, Decision::DeadLetter("gateway answered HTTP 400; not retried".into())),
            (status(401), 1, Decision::DeadLetter("gateway answered HTTP 401; not retried".into())),
            (status(403), 1, Decision::DeadLetter("gateway answered HTTP 403; not retried".into())),
            (status(404), 1, Decision::DeadLetter("gateway answered HTTP 404; not retried".into())),
            (status(413), 1, Decision::DeadLetter("gateway answered HTTP 413; not retried".into())),
            (status(301), 1, Decision::DeadLetter("gateway answered HTTP 301; not retried".into())),
        ];
        for (outcome, delivered, want) in cases {
            // jitter 1.0 makes the delay the full exponential step.
            assert_eq!(decide(&outcome, delivered, &policy, 1.0), want, "{outcome:?} at delivery {delivered}");
        }
    }

    #[test]
    fn backoff_is_capped_jittered_and_honours_retry_after() {
        let policy = RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(10), max_deliver: 100 };
        assert_eq!(decide(&status(500), 30, &policy, 1.0), Decision::Retry(Duration::from_secs(10)));
        assert_eq!(decide(&status(500), 30, &policy, 0.0), Decision::Retry(Duration::from_secs(5)));
        let asked = Outcome::Status { code: 429, retry_after: Some(Duration::from_secs(42)) };
        assert_eq!(decide(&asked, 1, &policy, 0.0), Decision::Retry(Duration::from_secs(42)));
        let greedy = Outcome::Status { code: 503, retry_after: Some(Duration::from_secs(86_400)) };
        assert_eq!(decide(&greedy, 1, &policy, 0.0), Decision::Retry(MAX_RETRY_AFTER));
    }

    #[test]
    fn reply_outcome_table() {
        let policy = RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(60), max_deliver: 5 };
        let refused = ReplyOutcome::Refused("reply target kaan has no consumer".into());
        let failed = ReplyOutcome::Failed("publishing the reply failed: timed out".into());
        let cases: Vec<(ReplyOutcome, u64, Decision)> = vec![
            (ReplyOutcome::Done, 1, Decision::Ack),
            (ReplyOutcome::Done, 99, Decision::Ack),
            // Refused: dead-lettered at the first delivery, whatever the budget left.
            (refused.clone(), 1, Decision::DeadLetter("reply target kaan has no consumer; not retried".into())),
            (refused, 4, Decision::DeadLetter("reply target kaan has no consumer; not retried".into())),
            // Failed: the policy's backoff, not a fixed delay, until the budget is spent.
            (failed.clone(), 1, Decision::Retry(Duration::from_secs(1))),
            (failed.clone(), 3, Decision::Retry(Duration::from_secs(4))),
            (failed.clone(), 4, Decision::Retry(Duration::from_secs(8))),
            (
                failed.clone(),
                5,
                Decision::DeadLetter("publishing the reply failed: timed out; gave up after 5 deliveries".into()),
            ),
            (
                failed,
                17,
                Decision::DeadLetter("publishing the reply failed: timed out; gave up after 17 deliveries".into()),
            ),
        ];
        for (outcome, delivered, want) in cases {
            assert_eq!(decide_reply(&outcome, delivered, &policy, 1.0), want, "{outcome:?} at delivery {delivered}");
        }
    }

    #[test]
    fn odd_jitter_is_clamped_not_a_panic() {
        let policy = RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(10), max_deliver: 100 };
        for jitter in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -3.0, 7.0] {
            assert!(matches!(decide(&status(500), 2, &policy, jitter), Decision::Retry(_)), "{jitter}");
        }
    }
}

/// Property tests: 2xx always acks, retries stay within their bounds and grow
/// with the delivery count, the delivery budget is never exceeded.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (1u64..60_000, 1u64..3_600_000, 1u64..50).prop_map(|(base, max, max_deliver)| RetryPolicy {
            base: Duration::from_millis(base),
            max: Duration::from_millis(max),
            max_deliver,
        })
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        let after = proptest::option::of((0u64..200_000).prop_map(Duration::from_secs));
        prop_oneof![
            (100u16..600, after).prop_map(|(code, retry_after)| Outcome::Status { code, retry_after }),
            Just(Outcome::Timeout),
            "\\PC{0,20}".prop_map(Outcome::Unreachable),
        ]
    }

    proptest! {
        #[test]
        fn success_always_acks(code in 200u16..300, delivered in any::<u64>(), policy in policy(), jitter in proptest::num::f64::ANY | proptest::num::f64::INFINITE | proptest::num::f64::QUIET_NAN) {
            let outcome = Outcome::Status { code, retry_after: None };
            prop_assert_eq!(decide(&outcome, delivered, &policy, jitter), Decision::Ack);
        }

        #[test]
        fn retries_are_bounded(outcome in outcome(), delivered in 0u64..100, policy in policy(), jitter in proptest::num::f64::ANY | proptest::num::f64::INFINITE | proptest::num::f64::QUIET_NAN) {
            match decide(&outcome, delivered, &policy, jitter) {
                Decision::Ack => prop_assert!(matches!(outcome.status(), Some(200..=299))),
                Decision::Retry(delay) => {
                    prop_assert!(is_retryable(&outcome) && delivered < policy.max_deliver);
                    let asked = match outcome {
                        Outcome::Status { retry_after: Some(after), .. } => after.min(MAX_RETRY_AFTER),
                        _ => Duration::ZERO,
                    };
                    prop_assert!(delay <= policy.max.max(asked), "{:?} over the cap", delay);
                    prop_assert!(delay >= policy.base.min(policy.max) / 2, "{:?} under half the first step", delay);
                }
                Decision::DeadLetter(reason) => {
                    prop_assert!(!is_retryable(&outcome) || delivered >= policy.max_deliver, "{}", reason);
                }
            }
        }

        #[test]
        fn a_reply_failure_never_outlives_the_budget(delivered in 0u64..100, policy in policy(), jitter in 0.0f64..1.0, refused in any::<bool>()) {
            let outcome = if refused { ReplyOutcome::Refused("x".into()) } else { ReplyOutcome::Failed("x".into()) };
            match decide_reply(&outcome, delivered, &policy, jitter) {
                Decision::Ack => prop_assert!(false, "a failed reply is never acked"),
                Decision::Retry(delay) => {
                    prop_assert!(!refused && delivered < policy.max_deliver);
                    prop_assert!(delay <= policy.max && delay >= policy.base.min(policy.max) / 2, "{:?}", delay);
                }
                Decision::DeadLetter(_) => prop_assert!(refused || delivered >= policy.max_deliver),
            }
        }

        #[test]
        fn backoff_never_shrinks(delivered in 1u64..40, policy in policy(), jitter in 0.0f64..1.0) {
            let policy = RetryPolicy { max_deliver: u64::MAX, ..policy };
            let delay = |n| match decide(&Outcome::Timeout, n, &policy, jitter) {
                Decision::Retry(d) => d,
                other => panic!("{other:?}"),
            };
            prop_assert!(delay(delivered) <= delay(delivered + 1));
        }
    }
}
