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
use mesh_runtime::nats::{self, NatsError};
use tracing::{info, warn};

/// Creates the streams and the kill switch bucket when missing.
pub async fn ensure_mesh(js: &jetstream::Context, replicas: Replicas) -> Result<(), NatsError> {
    nats::ensure_streams(js, replicas).await?;
    mesh_runtime::kill_bucket::open(js, replicas).await?;
    Ok(())
}

/// Creates the consumer of every active agent that has none (an existing one
/// is left as it is); with `tuning`, creates or updates each with it.
/// Returns how many agents were seen to.
pub async fn ensure_agents(
    js: &jetstream::Context,
    registry: &Registry,
    tuning: Option<ConsumerTuning>,
) -> Result<usize, NatsError> {
    let mut done = 0;
    for agent in registry.active() {
        ensure_agent(js, &agent.id, tuning).await?;
        done += 1;
    }
    Ok(done)
}

async fn ensure_agent(js: &jetstream::Context, id: &AgentId, tuning: Option<ConsumerTuning>) -> Result<(), NatsError> {
    match tuning {
        None => nats::ensure_consumer(js, id).await,
        Some(tuning) => nats::bind_consumer(js, id, tuning).await.map(|_| ()),
    }
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
    /// Consumer tuning to set (`None`: create missing consumers with the defaults, leave others alone).
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
            let registry = mesh_runtime::registry_file::load(&config.registry_path).map_err(|e| e.to_string())?;
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

/// For the `mesh` commands that change what runs (`agents add`, `deploy up`):
/// creates the streams, the bucket and the consumers of `agents` on the NATS
/// at `nats_url`; says what was created, or why nothing was.
pub async fn after_change(nats_url: &str, agents: &[AgentId]) -> Result<String, NatsError> {
    let client = nats::connect_now(nats_url, "mesh-cli").await?;
    let js = jetstream::new(client);
    ensure_mesh(&js, nats::replicas_from_env()?).await?;
    for id in agents {
        ensure_agent(&js, id, None).await?;
    }
    let names = agents.iter().map(|a| format!("agent-{a}")).collect::<Vec<_>>();
    Ok(match names.as_slice() {
        [] => "streams and kill switch bucket in place".to_owned(),
        _ => format!("consumers in place ({}): messages sent from now on wait for the listener", names.join(", ")),
    })
}
