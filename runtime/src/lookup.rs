//! The listener's read-only way into JetStream: look up the streams, the kill
//! switch bucket and the agent's consumer, and check each with
//! [`crate::layout_check`]. Nothing here creates or changes anything (the
//! listener's NATS user may not): the bot and the `mesh` commands do that.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use mesh_protocol::AgentId;
use mesh_protocol::layout::{self, ConsumerTuning};
use tracing::{info, warn};

use crate::layout_check::{self, LayoutError};

/// Looks up every mesh stream and checks its settings.
pub async fn check_streams(js: &jetstream::Context) -> Result<(), LayoutError> {
    for spec in layout::all_streams(1) {
        let stream = js.get_stream(spec.name).await.map_err(|e| {
            if not_found(&e.to_string()) {
                LayoutError::MissingStream(spec.name.to_owned())
            } else {
                LayoutError::Nats(format!("looking up stream {}: {e}", spec.name))
            }
        })?;
        layout_check::check_stream(&spec, &stream.cached_info().config)?;
    }
    Ok(())
}

/// Looks up the kill switch bucket and checks its stream (the listener reads
/// its keys with direct gets: `mesh_listener::killswitch::read`).
pub async fn find_bucket(js: &jetstream::Context) -> Result<(), LayoutError> {
    let name = mesh_protocol::access::killswitch_stream();
    match js.get_stream(&name).await {
        Ok(stream) => layout_check::check_bucket(&stream.cached_info().config),
        Err(e) if not_found(&e.to_string()) => Err(LayoutError::MissingBucket),
        Err(e) => Err(LayoutError::Nats(format!("looking up {name}: {e}"))),
    }
}

/// Looks up an agent's consumer and checks it. Its tuning (ack wait,
/// messages in flight) is the consumer's own: see [`ConsumerTuning`] of
/// `consumer.cached_info().config`.
pub async fn find_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
) -> Result<jetstream::consumer::Consumer<pull::Config>, LayoutError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js.get_stream_no_info(spec.stream).await.map_err(|e| LayoutError::Nats(e.to_string()))?;
    let consumer = stream.get_consumer::<pull::Config>(&spec.durable).await.map_err(|e| {
        if not_found(&e.to_string()) {
            LayoutError::MissingConsumer(spec.durable.clone())
        } else {
            LayoutError::Nats(format!("looking up consumer {}: {e}", spec.durable))
        }
    })?;
    layout_check::check_consumer(&spec, consumer.cached_info())?;
    Ok(consumer)
}

/// True for JetStream's "not found" answers (stream 10059, consumer 10014).
fn not_found(error: &str) -> bool {
    error.contains("not found") || error.contains("10059") || error.contains("10014")
}

/// Retries `lookup` until it succeeds, fails for good ([`LayoutError::is_fatal`])
/// or `stop` completes (`None`). What is missing is logged once, then again
/// every minute, so an operator sees what the listener waits for.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    mut lookup: F,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Result<T, LayoutError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LayoutError>>,
{
    tokio::pin!(stop);
    let mut delay = Duration::from_millis(200);
    let mut logged: Option<(String, tokio::time::Instant)> = None;
    loop {
        let error = tokio::select! {
            () = &mut stop => return None,
            result = lookup() => match result {
                Ok(found) => {
                    if logged.is_some() {
                        info!(what, "found; starting");
                    }
                    return Some(Ok(found));
                }
                Err(e) if e.is_fatal() => return Some(Err(e)),
                Err(e) => e.to_string(),
            },
        };
        let due = logged.as_ref().is_none_or(|(last, at)| *last != error || at.elapsed() >= Duration::from_secs(60));
        if due {
            warn!(what, "{error}; waiting");
            logged = Some((error, tokio::time::Instant::now()));
        }
        tokio::select! {
            () = &mut stop => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}
