//! Creating what listeners may not create themselves: the streams, the kill
//! switch bucket, and the durable consumer of every active agent of the
//! registry, so an agent has its consumer (and keeps every message sent to
//! it) from the moment it is registered. The bot does it at start and on every
//! registry change; `mesh agents add` and `mesh deploy up` do it when NATS is
//! reachable; senders create their target's consumer before publishing.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use mesh_protocol::layout::{ConsumerTuning, Replicas};
use mesh_protocol::{AgentId, Registry};
use mesh_runtime::layout_check::LayoutError;
use mesh_runtime::lookup;
use mesh_runtime::nats::{self, NatsError};
use tracing::{info, warn};

/// Creates the streams and the kill switch bucket when missing.
pub async fn ensure_mesh(js: &jetstream::Context, replicas: Replicas) -> Result<(), NatsError> {
    nats::ensure_streams(js, replicas).await?;
    mesh_runtime::kill_bucket::open(js, replicas).await?;
    Ok(())
}

/// Creates the consumer of every active agent with the tuning its registry
/// entry asks for (`concurrency`), or updates one whose tuning differs;
/// `tuning` overrides the registry's for every agent (test harnesses).
/// Returns how many agents were seen to.
pub async fn ensure_agents(
    js: &jetstream::Context,
    registry: &Registry,
    tuning: Option<ConsumerTuning>,
) -> Result<usize, NatsError> {
    let mut done = 0;
    for agent in registry.active() {
        ensure_agent(js, &agent.id, tuning.unwrap_or_else(|| agent.consumer_tuning())).await?;
        done += 1;
    }
    Ok(done)
}

/// Creates an agent's consumer with `tuning`, or updates its tuning when it
/// differs (its filters and start position stay; a listener notices the new
/// window when it next looks its consumer up).
async fn ensure_agent(js: &jetstream::Context, id: &AgentId, tuning: ConsumerTuning) -> Result<(), NatsError> {
    if nats::consumer_tuning(js, id).await? == Some(tuning) {
        return Ok(());
    }
    nats::bind_consumer(js, id, tuning).await?;
    info!(agent = %id, max_ack_pending = tuning.max_ack_pending, ack_wait_s = tuning.ack_wait.as_secs(), "consumer tuning set");
    Ok(())
}

/// Checks what exists against the layout, as every listener does: the
/// streams, the kill switch bucket and the consumer of each active agent of
/// `registry` (one not created yet is fine). The bot refuses to start on a
/// mismatch (a stream with a subject transform, a consumer reading other
/// inboxes...): it would otherwise keep feeding it.
pub async fn verify(js: &jetstream::Context, registry: &Registry) -> Result<(), LayoutError> {
    lookup::check_streams(js).await?;
    lookup::find_bucket(js).await?;
    for agent in registry.active() {
        match lookup::find_consumer(js, &agent.id).await {
            Ok(_) | Err(LayoutError::MissingConsumer(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Settings of [`follow`].
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// The registry file.
    pub registry_path: PathBuf,
    /// How often it is read.
    pub poll: Duration,
    /// Stream replicas.
    pub replicas: Replicas,
    /// The hosts the registry's URLs may point at (empty: any).
    pub allowed_hosts: mesh_protocol::registry::HostAllowList,
    /// Consumer tuning for every agent (`None`: each agent's from the registry).
    pub tuning: Option<ConsumerTuning>,
}

/// How often everything is ensured again even when the registry did not
/// change (a consumer deleted by hand, a NATS server replaced).
pub const RECHECK_EVERY: Duration = Duration::from_secs(30);

/// Ensures the streams, the bucket and every active agent's consumer now and
/// whenever the registry changes, until `stop` completes. Failures (NATS
/// down, registry unreadable) are logged and retried at the next poll.
pub async fn follow(js: jetstream::Context, config: FollowConfig, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut done: Option<(Registry, tokio::time::Instant)> = None;
    let mut last_error = String::new();
    loop {
        let outcome = async {
            let registry = mesh_runtime::registry_file::load(&config.registry_path, &config.allowed_hosts)
                .map_err(|e| e.to_string())?;
            let fresh = done.as_ref().is_some_and(|(r, at)| *r == registry && at.elapsed() < RECHECK_EVERY);
            if fresh {
                return Ok(None);
            }
            ensure_mesh(&js, config.replicas).await.map_err(|e| e.to_string())?;
            let n = ensure_agents(&js, &registry, config.tuning).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Some((registry, n)))
        };
        let outcome = tokio::select! {
            () = &mut stop => return,
            outcome = outcome => outcome,
        };
        match outcome {
            Ok(Some((registry, n))) => {
                if done.as_ref().is_none_or(|(r, _)| *r != registry) {
                    info!(agents = n, "streams, kill switch bucket and agent consumers in place");
                }
                done = Some((registry, tokio::time::Instant::now()));
                last_error.clear();
            }
            Ok(None) => {}
            Err(e) => {
                if e != last_error {
                    warn!(error = %e, "cannot create the streams or agent consumers yet; retrying");
                    last_error = e;
                }
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(config.poll) => {}
        }
    }
}
