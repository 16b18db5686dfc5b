//! Keeps an agent loop alive: a loop that panics (a bug, or input nobody
//! foresaw) is reported on `/health` and started again after a growing
//! delay, instead of leaving its agent silently without a listener.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::state::AgentState;

/// Delay before the first restart; doubled after each panic in a row.
pub const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between restarts.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);

/// Runs the loop `start` makes until it returns (its result is returned) or
/// `stop` is cancelled (`Ok(())`-like default from `on_stop`). A panic marks
/// the agent refused with the panic's message while it waits to restart; the
/// mark is lifted when the loop starts again.
pub async fn run<F, T>(state: &AgentState, stop: &CancellationToken, on_stop: T, mut start: impl FnMut() -> F) -> T
where
    F: Future<Output = T>,
{
    let mut delay = FIRST_RESTART_DELAY;
    loop {
        let panic = match AssertUnwindSafe(start()).catch_unwind().await {
            Ok(result) => return result,
            Err(panic) => panic,
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        error!(agent = %state.id, panic = what, restart_in_s = delay.as_secs(), "the agent loop panicked; restarting it (please report this as a bug)");
        state.set_refused(format!(
            "the agent loop panicked ({what}); restarting it in {} s; please report this as a bug",
            delay.as_secs()
        ));
        tokio::select! {
            () = stop.cancelled() => return on_stop,
            () = tokio::time::sleep(delay) => {}
        }
        state.clear_refused();
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_loop_is_reported_and_started_again() {
        let state = Arc::new(AgentState::new(mesh_protocol::AgentId::parse("nova").unwrap()));
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let (s, st, n) = (state.clone(), stop.clone(), starts.clone());
        let task = tokio::spawn(async move {
            run(&s, &st, "stopped", || {
                let n = n.clone();
                async move {
                    if n.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("overflow adding duration to date");
                    }
                    "returned"
                }
            })
            .await
        });
        // Paused time: the runtime jumps over the restart delays.
        assert_eq!(task.await.unwrap(), "returned");
        assert_eq!(starts.load(Ordering::SeqCst), 3, "started again after each panic");
        assert_eq!(state.refused(), None, "the mark is lifted once it runs again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_while_waiting_to_restart_ends_it_with_the_panic_on_health() {
        let state = AgentState::new(mesh_protocol::AgentId::parse("nova").unwrap());
        let stop = CancellationToken::new();
        stop.cancel();
        let ended = run(&state, &stop, "stopped", || async { panic!("boom") }).await;
        assert_eq!(ended, "stopped");
        let why = state.refused().unwrap();
        assert!(why.contains("panicked (boom)"), "{why}");
    }
}
