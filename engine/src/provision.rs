//! Creating what listeners may not create themselves: the streams, the kill
//! switch bucket, and the durable consumer of every active agent of the
//! registry, so an agent has its consumer (and keeps every message sent to
//! it) from the moment it is registered. The bot does it at start and on every
//! registry change; `mesh agents add` and `mesh deploy up` do it when NATS is
//! reachable; senders create their target's consumer before publishing.
//!
//! An agent's consumer lives as long as the agent is registered and active:
//! `mesh agents remove` (with `--keep` too) deletes it (one holding a backlog
//! only with `--drop-backlog`), `mesh agents add` deletes one left over from an
//! earlier agent of the same id before writing the registry, and the bot
//! deletes the consumer of an agent it sees removed or made inactive in the
//! registry when it holds nothing and predates the removal (it never drops a
//! backlog, nor retires every agent in one pass). So a re-activated or re-used
//! id receives nothing sent before its (re)activation: no old broadcasts, no
//! earlier backlog (except one the bot kept).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use mesh_protocol::layout::{ConsumerTuning, Replicas};
use mesh_protocol::registry::Agent;
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
    if nats::consumer_current(js, id, tuning).await? {
        return Ok(());
    }
    nats::bind_consumer(js, id, tuning).await?;
    info!(agent = %id, max_ack_pending = tuning.max_ack_pending, ack_wait_s = tuning.ack_wait.as_secs(), "consumer tuning set");
    Ok(())
}

/// Deletes the consumers of `agents` (removed or made inactive), saying what
/// each still held; an agent without one is skipped. One still holding
/// messages not delivered is deleted only when `drop_backlog` says so, and
/// kept (with a warning naming them) otherwise.
///
/// `seen`: when the bot saw the removal; a consumer created since (the
/// agent added back) is kept.
pub async fn retire(
    js: &jetstream::Context,
    agents: &[AgentId],
    drop_backlog: bool,
    seen: Option<time::OffsetDateTime>,
) -> Result<String, NatsError> {
    let mut done = Vec::new();
    for id in agents {
        match nats::delete_consumer(js, id, drop_backlog, seen).await? {
            nats::Retired::Deleted { held } => {
                if held > 0 {
                    warn!(agent = %id, dropped = held, "consumer deleted with messages it had not delivered; they stay in the stream until they age out, undelivered");
                } else {
                    info!(agent = %id, "consumer deleted");
                }
                done.push(format!("agent-{id} deleted ({held} undelivered messages dropped)"));
            }
            nats::Retired::Kept { held, after } => {
                warn!(agent = %id, held, after_stream_seq = after, "consumer of a removed or inactive agent kept: it holds messages not delivered; re-add the agent to deliver them, or delete the consumer by hand to drop them");
                done.push(format!(
                    "agent-{id} kept: it holds {held} messages not delivered (stream sequences after {after}); \
                     re-add {id} to deliver them, or `nats consumer rm MESH_AGENTS agent-{id}` drops them"
                ));
            }
            nats::Retired::Newer => done.push(format!("agent-{id} kept (created after the removal was seen)")),
            nats::Retired::None => done.push(format!("agent-{id} (there was none)")),
        }
    }
    Ok(format!("consumers: {}; a re-added agent starts with messages sent after it", done.join(", ")))
}

/// The active agents of `before` that `after` no longer has active.
fn retired(before: &Registry, after: &Registry) -> Vec<AgentId> {
    before.active().filter(|a| !after.get(&a.id).is_some_and(Agent::is_active)).map(|a| a.id.clone()).collect()
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
/// whenever the registry changes, until `stop` completes; and keeps the
/// server-side pause of the agent consumers in step with the kill switch
/// bucket (watched: a hand edit is applied at once; checked again every
/// [`RECHECK_EVERY`]). Failures (NATS down, registry unreadable) are logged
/// and retried at the next poll. The pause is kept in step on its own path:
/// a broken registry or one agent whose consumer cannot be ensured does not
/// stop it.
pub async fn follow(js: jetstream::Context, config: FollowConfig, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut done: Option<(Registry, tokio::time::Instant)> = None;
    let mut last_error = String::new();
    // The kill switch bucket, watched so the server-side pause follows every change.
    let mut watch_changes: Option<kv::Watch> = None;
    let mut paused_at: Option<tokio::time::Instant> = None;
    loop {
        if watch_changes.is_none() {
            watch_changes = match js.get_key_value(mesh_protocol::killswitch::BUCKET).await {
                Ok(store) => store.watch_all().await.ok(),
                Err(_) => None,
            };
            // A watch tells only of changes after it starts: the sync of
            // this pass applies those made before (a resume by hand while
            // no watch ran would otherwise wait for the next check).
            if watch_changes.is_some() {
                paused_at = None;
            }
        }
        let outcome = async {
            // Consumers created from now on (an agent added back) are never retired by this pass.
            let seen = time::OffsetDateTime::now_utc();
            let registry = mesh_runtime::registry_file::load(&config.registry_path, &config.allowed_hosts)
                .map_err(|e| e.to_string())?;
            let fresh = done.as_ref().is_some_and(|(r, at)| *r == registry && at.elapsed() < RECHECK_EVERY);
            if fresh {
                return Ok(None);
            }
            ensure_mesh(&js, config.replicas).await.map_err(|e| e.to_string())?;
            if let Some((before, _)) = &done {
                let gone = retired(before, &registry);
                let active = before.active().count();
                // A `{}` written by a script, a stale copy: never retire every agent in one pass.
                let bulk = gone.len() > 1 && gone.len() == active;
                if bulk {
                    warn!(
                        agents = active,
                        "the registry no longer lists any of the active agents; their consumers are kept: remove agents with `mesh agents remove`, or delete a consumer by hand"
                    );
                }
                // Read once more right before deleting: an agent added back
                // meanwhile (`mesh agents add` recreates its consumer) keeps it.
                let now = mesh_runtime::registry_file::load(&config.registry_path, &config.allowed_hosts)
                    .map_err(|e| e.to_string())?;
                let gone: Vec<_> =
                    gone.into_iter().filter(|id| !bulk && !now.get(id).is_some_and(Agent::is_active)).collect();
                if !gone.is_empty() {
                    retire(&js, &gone, false, Some(seen)).await.map_err(|e| e.to_string())?;
                }
            }
            let n = ensure_agents(&js, &registry, config.tuning).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Some((registry, n)))
        };
        let outcome = tokio::select! {
            () = &mut stop => return,
            outcome = outcome => outcome,
        };
        // A kill switch change whose server-side pause failed (or a consumer
        // created while it was applied) is corrected here: after consumers
        // were ensured, and every RECHECK_EVERY whatever else failed.
        let ensured = matches!(outcome, Ok(Some(_)));
        if ensured || paused_at.is_none_or(|at| at.elapsed() >= RECHECK_EVERY) {
            let synced = tokio::select! {
                () = &mut stop => return,
                synced = mesh_runtime::server_pause::sync(&js, None) => synced,
            };
            match synced {
                Ok(_) => paused_at = Some(tokio::time::Instant::now()),
                Err(e) => warn!(error = %e, "cannot apply the kill switch on the server yet; retrying"),
            }
        }
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
            change = next_change(&mut watch_changes) => match change {
                // Any change of the bucket, a hand edit included: the server follows it.
                Some(Ok(_)) => {
                    if let Err(e) = mesh_runtime::server_pause::sync(&js, None).await {
                        warn!(error = %e, "cannot apply the kill switch on the server yet; retrying at the next poll");
                        paused_at = None;
                    }
                }
                _ => watch_changes = None,
            },
        }
    }
}

/// The next change of the kill switch bucket, or never without a watch.
async fn next_change(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

/// For the `mesh` commands that change what runs (`agents add`, `deploy up`):
/// creates the streams, the bucket and the consumers of `agents` on the NATS
/// at `nats_url` (each with its registry tuning); says what was created, or why nothing was.
pub async fn after_change(
    nats_url: &str,
    auth: &mesh_runtime::config::NatsAuth,
    replicas: Replicas,
    agents: &[&Agent],
) -> Result<String, NatsError> {
    let client = nats::connect_now(nats_url, "mesh-cli", auth).await?;
    let js = jetstream::new(client);
    ensure_mesh(&js, replicas).await?;
    for agent in agents {
        ensure_agent(&js, &agent.id, agent.consumer_tuning()).await?;
    }
    let names = agents.iter().map(|a| format!("agent-{}", a.id)).collect::<Vec<_>>();
    Ok(match names.as_slice() {
        [] => "streams and kill switch bucket in place".to_owned(),
        _ => format!("consumers in place ({}): messages sent from now on wait for the listener", names.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(json: &str) -> Registry {
        Registry::parse(json).unwrap()
    }

    #[test]
    fn an_agent_removed_or_made_inactive_is_retired_and_no_other() {
        let before = registry(
            r#"{"nova": {"hooks_token": "a", "hooks_url": "http://h/"},
                "kaan": {"hooks_token": "b", "hooks_url": "http://h/"},
                "zed": {"hooks_token": "c", "hooks_url": "http://h/"},
                "old": {"hooks_token": "d", "hooks_url": "http://h/", "status": "inactive"}}"#,
        );
        let after = registry(
            r#"{"nova": {"hooks_token": "a2", "hooks_url": "http://h/"},
                "zed": {"hooks_token": "c", "hooks_url": "http://h/", "status": "inactive"},
                "new": {"hooks_token": "e", "hooks_url": "http://h/"}}"#,
        );
        let ids: Vec<String> = retired(&before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(ids, ["kaan", "zed"], "removed and made inactive; a rotated token or a new agent is no retirement");
        assert!(retired(&after, &after).is_empty());
    }
}
