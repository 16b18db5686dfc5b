//! Confirmation prompts that say "expired" in place: the front end that
//! posted a prompt (and only that one, so one replica) starts a timer for
//! the code's window; when it ends undecided, the engine says so
//! ([`Engine::expire`]) and the front end edits its prompt to "expired",
//! buttons removed. A prompt confirmed or cancelled before (on any replica)
//! is left as the decision made it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::command::Reply;
use crate::engine::Engine;

/// How long after the window the prompt is edited (the engine counts a code
/// expired only once its window has passed).
pub const MARGIN: Duration = Duration::from_millis(500);

/// Edits the prompt of `code` with `edit` once its window has passed, if
/// it passed undecided.
pub fn when_expired<F, Fut>(engine: Arc<Engine>, code: String, edit: F)
where
    F: FnOnce(Reply) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::time::sleep(engine.confirm_window() + MARGIN).await;
        if let Some(expired) = engine.expire(&code).await {
            edit(expired).await;
        }
    });
}
