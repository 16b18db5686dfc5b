//! Retrying JetStream calls that fail only for a moment: a request that timed
//! out or found no responder, or a "temporarily unavailable" answer, as while
//! a cluster elects leaders. Which failures qualify ([`Transient`]) and the
//! schedule ([`Backoff`]) are pure; [`retry`] runs an attempt until it
//! succeeds, fails for good, or the bound is reached.
//!
//! Only idempotent attempts are retried: creating or looking up a stream or
//! consumer, and a publish that keeps its `Nats-Msg-Id` (JetStream drops a
//! repeat inside the stream's duplicate window, which [`Backoff::total`]
//! stays well inside).

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{
    ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamError, CreateStreamErrorKind, PublishError, PublishErrorKind,
    RequestError, RequestErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use tracing::warn;

/// The schedule: waits doubling from `first` up to `max_delay`; no new
/// attempt starts once `total` has passed since the first one began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Wait before the first retry.
    pub first: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
    /// No attempt starts later than this after the first (the one running
    /// then may still take its own request timeout).
    pub total: Duration,
}

/// The mesh's schedule: 250 ms doubling to 4 s, for up to 30 s; a cluster
/// elects a new leader within a few seconds of losing one.
pub const JETSTREAM: Backoff =
    Backoff { first: Duration::from_millis(250), max_delay: Duration::from_secs(4), total: Duration::from_secs(30) };

impl Backoff {
    /// The wait before retry number `retry` (0 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(16));
        self.first.saturating_mul(factor).min(self.max_delay)
    }

    /// After a failed attempt, `elapsed` since the first began: the wait
    /// before retry number `retry`, or `None` to give up (the retry would
    /// start after [`Backoff::total`]).
    pub fn next(&self, retry: u32, elapsed: Duration) -> Option<Duration> {
        let delay = self.delay(retry);
        (elapsed + delay <= self.total).then_some(delay)
    }
}

/// A failure that may pass if the same request is made again shortly.
pub trait Transient {
    /// True for a timeout, no responders, or JetStream's "temporarily unavailable".
    fn is_transient(&self) -> bool;
    /// True when the request may have reached JetStream and been applied
    /// even though no answer came (a timed-out publish may be stored).
    fn maybe_applied(&self) -> bool {
        false
    }
}

/// JetStream API answers that mean "not now" rather than "no".
fn transient_code(error: &async_nats::jetstream::Error) -> bool {
    // 10008: "JetStream system temporarily unavailable" (no meta leader yet).
    error.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE
}

fn request_is_transient(error: &RequestError) -> bool {
    matches!(error.kind(), RequestErrorKind::TimedOut | RequestErrorKind::NoResponders)
}

impl Transient for RequestError {
    fn is_transient(&self) -> bool {
        request_is_transient(self)
    }
}

impl Transient for CreateStreamError {
    fn is_transient(&self) -> bool {
        match self.kind() {
            // JetStreamUnavailable is how a request with no responders ends here.
            CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
            CreateStreamErrorKind::JetStream(error) => transient_code(&error),
            _ => false,
        }
    }
}

impl Transient for ConsumerInfoError {
    fn is_transient(&self) -> bool {
        match self.kind() {
            ConsumerInfoErrorKind::TimedOut | ConsumerInfoErrorKind::NoResponders | ConsumerInfoErrorKind::Offline => {
                true
            }
            ConsumerInfoErrorKind::JetStream(error) => transient_code(&error),
            _ => false,
        }
    }
}

impl Transient for ConsumerError {
    fn is_transient(&self) -> bool {
        match self.kind() {
            ConsumerErrorKind::TimedOut => true,
            ConsumerErrorKind::JetStream(error) => transient_code(&error),
            // A failed request (no responders among them) carries its cause.
            ConsumerErrorKind::Request => std::error::Error::source(self)
                .and_then(|source| source.downcast_ref::<RequestError>())
                .is_some_and(request_is_transient),
            _ => false,
        }
    }
}

impl Transient for PublishError {
    fn is_transient(&self) -> bool {
        match self.kind() {
            // No ack in time (stored or not: the retry keeps the Nats-Msg-Id),
            // the ack subscription lost in a reconnect, or no stream leader to
            // answer (async-nats reports "no responders" as StreamNotFound).
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => true,
            PublishErrorKind::Other => std::error::Error::source(self)
                .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
                .is_some_and(transient_code),
            _ => false,
        }
    }

    fn maybe_applied(&self) -> bool {
        matches!(self.kind(), PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe)
    }
}

/// How a retried call ended without success.
#[derive(Debug)]
pub enum Failure<E> {
    /// A failure that retrying cannot fix; returned at once.
    Permanent(E),
    /// Still failing transiently when the bound was reached.
    GaveUp {
        /// The last attempt's error.
        last: E,
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt began.
        waited: Duration,
        /// Whether any attempt may have been applied without an answer.
        maybe_applied: bool,
    },
}

impl<E> Failure<E> {
    /// The last error.
    pub fn error(&self) -> &E {
        match self {
            Self::Permanent(e) | Self::GaveUp { last: e, .. } => e,
        }
    }
}

impl<E: fmt::Display> fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Permanent(e) => write!(f, "{e}"),
            Self::GaveUp { last, attempts, waited, .. } => write!(
                f,
                "{last} (still failing after {attempts} attempts in {}s; a cluster electing leaders answers again \
                 within seconds: check that the NATS servers run)",
                waited.as_secs()
            ),
        }
    }
}

/// The cause is the last attempt's error.
impl<E: std::error::Error + 'static> std::error::Error for Failure<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error())
    }
}

/// Runs `attempt` until it succeeds, fails with a non-[`Transient`] error, or
/// `backoff` says to give up; logs each retry with `what`.
pub async fn retry<T, E, F, Fut>(what: &str, backoff: Backoff, mut attempt: F) -> Result<T, Failure<E>>
where
    E: Transient + fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut retries = 0u32;
    let mut maybe_applied = false;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if !error.is_transient() => return Err(Failure::Permanent(error)),
            Err(error) => error,
        };
        maybe_applied |= error.maybe_applied();
        let Some(delay) = backoff.next(retries, started.elapsed()) else {
            let waited = started.elapsed();
            return Err(Failure::GaveUp { last: error, attempts: retries + 1, waited, maybe_applied });
        };
        warn!(what, error = %error, retry_in_ms = delay.as_millis() as u64, "JetStream not answering; retrying");
        tokio::time::sleep(delay).await;
        retries += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn api_error(code: u64, err_code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({"code": code, "err_code": err_code, "description": "x"})).unwrap()
    }

    #[test]
    fn the_schedule_doubles_to_a_cap_and_stops_at_the_bound() {
        let delays: Vec<u64> = (0..8).map(|r| JETSTREAM.delay(r).as_millis() as u64).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 4000, 4000, 4000]);
        assert_eq!(JETSTREAM.delay(u32::MAX), JETSTREAM.max_delay);
        // Attempts that fail at once: retries are planned until the waits add up to the bound.
        let (mut elapsed, mut retries) = (Duration::ZERO, 0);
        while let Some(delay) = JETSTREAM.next(retries, elapsed) {
            elapsed += delay;
            retries += 1;
        }
        assert_eq!(retries, 10, "{elapsed:?}");
        assert!(elapsed <= JETSTREAM.total);
        assert_eq!(JETSTREAM.next(0, Duration::from_secs(30)), None);
    }

    /// A retried publish must still be recognised as a repeat by JetStream.
    #[test]
    fn the_bound_stays_inside_the_duplicate_window() {
        let window = mesh_protocol::layout::all_streams(1)
            .into_iter()
            .find(|s| s.name == "MESH_AGENTS")
            .map(|s| s.duplicate_window)
            .unwrap();
        // The last attempt may take a request timeout (5 s by default) on top of the bound.
        assert!(JETSTREAM.total + Duration::from_secs(5) < window, "{window:?}");
    }

    #[test]
    fn timeouts_no_responders_and_unavailable_are_transient_nothing_else() {
        use PublishErrorKind as P;
        for (kind, transient, applied) in [
            (P::TimedOut, true, true),
            (P::BrokenPipe, true, true),
            (P::StreamNotFound, true, false),
            (P::WrongLastMessageId, false, false),
            (P::MaxPayloadExceeded, false, false),
            (P::Other, false, false),
        ] {
            let error = PublishError::new(kind);
            assert_eq!((error.is_transient(), error.maybe_applied()), (transient, applied), "{kind:?}");
        }
        assert!(PublishError::with_source(P::Other, api_error(503, 10008)).is_transient());
        assert!(!PublishError::with_source(P::Other, api_error(400, 10054)).is_transient());

        use CreateStreamErrorKind as S;
        assert!(CreateStreamError::new(S::TimedOut).is_transient());
        assert!(CreateStreamError::new(S::JetStreamUnavailable).is_transient());
        assert!(CreateStreamError::new(S::JetStream(api_error(503, 10008))).is_transient());
        // No suitable peers: the cluster lacks servers; retrying does not place the stream.
        assert!(!CreateStreamError::new(S::JetStream(api_error(500, 10005))).is_transient());
        assert!(!CreateStreamError::new(S::InvalidStreamName).is_transient());

        use ConsumerErrorKind as C;
        assert!(ConsumerError::new(C::TimedOut).is_transient());
        assert!(ConsumerError::new(C::JetStream(api_error(503, 10008))).is_transient());
        assert!(!ConsumerError::new(C::JetStream(api_error(400, 10012))).is_transient());
        let no_responders = RequestError::new(RequestErrorKind::NoResponders);
        assert!(ConsumerError::with_source(C::Request, no_responders).is_transient());
        let other = RequestError::new(RequestErrorKind::Other);
        assert!(!ConsumerError::with_source(C::Request, other).is_transient());
        assert!(!ConsumerError::new(C::InvalidName).is_transient());
    }

    const FAST: Backoff =
        Backoff { first: Duration::from_millis(1), max_delay: Duration::from_millis(2), total: Duration::from_secs(5) };

    /// Fails with `kind` `failures` times, then succeeds; counts attempts.
    async fn flaky(calls: &Cell<u32>, failures: u32, kind: PublishErrorKind) -> Result<u32, PublishError> {
        calls.set(calls.get() + 1);
        if calls.get() <= failures { Err(PublishError::new(kind)) } else { Ok(calls.get()) }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_call_succeeds() {
        let calls = Cell::new(0);
        let result = retry("test", FAST, || flaky(&calls, 3, PublishErrorKind::TimedOut)).await;
        assert_eq!(result.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_returned_after_one_attempt() {
        let calls = Cell::new(0);
        let result = retry("test", FAST, || flaky(&calls, 3, PublishErrorKind::WrongLastMessageId)).await;
        assert!(matches!(result, Err(Failure::Permanent(_))));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn retrying_gives_up_at_the_bound_with_the_last_error() {
        let bound =
            Backoff { first: Duration::from_millis(1), max_delay: Duration::from_millis(1), total: Duration::ZERO };
        let calls = Cell::new(0);
        let result = retry("test", bound, || flaky(&calls, u32::MAX, PublishErrorKind::StreamNotFound)).await;
        let Err(Failure::GaveUp { attempts, maybe_applied, .. }) = result else { panic!("{result:?}") };
        assert_eq!((attempts, calls.get(), maybe_applied), (1, 1, false));

        let bound = Backoff { total: Duration::from_millis(20), ..FAST };
        let calls = Cell::new(0);
        let result = retry("test", bound, || flaky(&calls, u32::MAX, PublishErrorKind::TimedOut)).await;
        let Err(failure @ Failure::GaveUp { .. }) = result else { panic!("{result:?}") };
        let Failure::GaveUp { attempts, maybe_applied, .. } = &failure else { unreachable!() };
        assert!(*attempts >= 2 && *attempts == calls.get(), "{attempts} attempts, {} calls", calls.get());
        assert!(maybe_applied);
        assert!(failure.to_string().contains("still failing after"), "{failure}");
    }
}
