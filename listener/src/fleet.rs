//! Runs the listeners of one process: one agent, or every active agent of the
//! registry (`--all`), following registry changes without a restart.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use mesh_protocol::{AgentId, Registry};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ListenerConfig, Selection};
use crate::consumer::{self, LoopConfig};
use crate::delivery::{AgentEntry, Deps};
use crate::gateway::{HttpGateway, Response};
use crate::registry_file;
use crate::secrets::OsSecrets;

/// Counters of one listener process.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages delivered and acked.
    pub delivered: AtomicU64,
    /// Deliveries scheduled for retry.
    pub retried: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Chat replies routed back.
    pub replies: AtomicU64,
    /// Chat replies suppressed by the loop guard.
    pub loop_guard: AtomicU64,
    /// Gateway calls that did not end in 2xx, in a row.
    pub consecutive_failures: AtomicU64,
}

impl Stats {
    /// Notes one gateway call.
    pub fn record_attempt(&self, response: &Response) {
        if response.outcome.label() == "ok" {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Notes a delivered message.
    pub fn record_delivered(&self, _envelope: &mesh_protocol::Envelope) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    /// Notes a retry.
    pub fn record_retry(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    /// Notes a dead letter.
    pub fn record_dead_letter(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    /// Notes a routed reply.
    pub fn record_reply(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
    }
    /// Notes a reply stopped by the loop guard.
    pub fn record_loop_guard(&self) {
        self.loop_guard.fetch_add(1, Ordering::Relaxed);
    }
}

/// One running agent loop.
struct Running {
    entry: watch::Sender<Arc<AgentEntry>>,
    paused: watch::Sender<bool>,
    stop: CancellationToken,
}

/// Runs the listeners until `shutdown` completes, then stops pulling and
/// waits (bounded) for in-flight deliveries.
pub async fn run(config: ListenerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let registry = registry_file::load(&config.registry_path)?;
    let selected = select(&registry, &config.selection)?;
    if let Selection::One(id) = &config.selection {
        // A single-agent listener with a bad entry cannot do its one job.
        selected.get(id).with_context(|| format!("agent {id:?} has unresolvable tokens"))?;
    }
    let client = crate::nats::connect_service(&config.nats_url, "mesh-listener").await?;
    let js = async_nats::jetstream::new(client.clone());
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => return Ok(()),
        () = wait_for_streams(&js, config.replicas) => {}
    }
    let gateway = HttpGateway::new(config.request_timeout).context("building the HTTP client")?;
    let stats = Arc::new(Stats::default());
    let deps = Arc::new(Deps {
        js: js.clone(),
        gateway,
        retry: config.retry,
        max_hops: config.max_hops,
        ack_wait: config.ack_wait,
        stats,
    });
    let loop_config = LoopConfig { concurrency: config.concurrency, tuning: config.tuning() };
    let root = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut running: BTreeMap<AgentId, Running> = BTreeMap::new();
    apply(&selected, &mut running, &mut tasks, &deps, loop_config, &root);
    info!(agents = running.len(), nats = %config.nats_url, "listener started");

    let mut last_registry = registry;
    let mut poll = tokio::time::interval(config.registry_poll);
    poll.tick().await;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = poll.tick(), if config.selection == Selection::All => {
                match registry_file::load(&config.registry_path) {
                    Ok(registry) if registry != last_registry => {
                        info!("registry changed; applying");
                        match select(&registry, &config.selection) {
                            Ok(selected) => apply(&selected, &mut running, &mut tasks, &deps, loop_config, &root),
                            Err(e) => warn!(error = %e, "registry change not applied"),
                        }
                        last_registry = registry;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "registry unreadable; keeping the last good one"),
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined && e.is_panic() {
                    error!(error = %e, "an agent loop panicked");
                }
            }
        }
    }
    info!("stopping: no new pulls; waiting for in-flight deliveries");
    root.cancel();
    let drained =
        tokio::time::timeout(config.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            grace_s = config.shutdown_grace.as_secs(),
            "in-flight deliveries did not finish in time; JetStream will redeliver them"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    info!("listener stopped");
    Ok(())
}

/// Waits until the streams exist (NATS may still be starting).
async fn wait_for_streams(js: &async_nats::jetstream::Context, replicas: usize) {
    let mut delay = Duration::from_millis(200);
    loop {
        match crate::nats::ensure_streams(js, replicas).await {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "streams not ready; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The agents to serve, with tokens resolved. Agents whose tokens do not
/// resolve are reported and skipped (the rest of the fleet keeps running).
fn select(registry: &Registry, selection: &Selection) -> anyhow::Result<BTreeMap<AgentId, AgentEntry>> {
    let agents: Vec<_> = match selection {
        Selection::All => registry.active().collect(),
        Selection::One(id) => {
            let agent = registry
                .get(id)
                .with_context(|| format!("unknown agent {:?} (known: {})", id.as_str(), registry.known_ids()))?;
            anyhow::ensure!(
                agent.is_active(),
                "agent {:?} is inactive in the registry; set \"status\": \"active\" to serve it",
                id.as_str()
            );
            vec![agent]
        }
    };
    let mut out = BTreeMap::new();
    for agent in agents {
        match agent.resolve_tokens(&OsSecrets) {
            Ok(tokens) => {
                out.insert(agent.id.clone(), AgentEntry { agent: agent.clone(), tokens });
            }
            Err(e) => error!(error = %e, "agent skipped"),
        }
    }
    Ok(out)
}

/// Starts, updates and stops agent loops so that exactly `selected` run.
fn apply<G: crate::gateway::Gateway>(
    selected: &BTreeMap<AgentId, AgentEntry>,
    running: &mut BTreeMap<AgentId, Running>,
    tasks: &mut JoinSet<()>,
    deps: &Arc<Deps<G>>,
    loop_config: LoopConfig,
    root: &CancellationToken,
) {
    running.retain(|id, run| {
        let keep = selected.contains_key(id);
        if !keep {
            info!(agent = %id, "agent removed or inactive; stopping its listener");
            run.stop.cancel();
        }
        keep
    });
    for (id, entry) in selected {
        match running.get(id) {
            Some(run) => {
                let changed = run.entry.borrow().agent != entry.agent || run.entry.borrow().tokens != entry.tokens;
                if changed {
                    info!(agent = %id, "agent entry changed; used from the next request on");
                    run.entry.send_replace(Arc::new(entry.clone()));
                }
            }
            None => {
                let (entry_tx, entry_rx) = watch::channel(Arc::new(entry.clone()));
                let (paused_tx, paused_rx) = watch::channel(false);
                let stop = root.child_token();
                tasks.spawn(consumer::run_agent(deps.clone(), entry_rx, paused_rx, loop_config, stop.clone()));
                info!(agent = %id, "listener started for agent");
                running.insert(id.clone(), Running { entry: entry_tx, paused: paused_tx, stop });
            }
        }
    }
}

impl Running {
    #[allow(dead_code)]
    fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}
