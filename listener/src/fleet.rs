//! Runs the listeners of one process: one agent, or every active agent of the
//! registry (`--all`), following registry changes (new tokens, agents added,
//! removed or made inactive) without a restart; answers
//! health pings; serves `/health` and `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mesh_protocol::killswitch::{self, Scope};
use mesh_protocol::{AgentId, Registry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ListenerConfig, Selection};
use crate::consumer::{self, LoopConfig};
use crate::delivery::{AgentEntry, Deps};
use crate::gateway::{Gateway, HttpGateway};
use crate::ping::{self, GatewayUrls};
use crate::registry_file;
use crate::secrets::OsSecrets;
use crate::state::FleetState;

/// A pause or resume request for the running loops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseCommand {
    /// Pause (true) or resume (false) one agent.
    Agent(AgentId, bool),
    /// Pause (true) or resume (false) every agent.
    All(bool),
}

/// Handles to a running listener process, for embedding (tests, `mesh up`,
/// the kill switch).
#[derive(Debug, Clone)]
pub struct Control {
    /// Pause and resume requests.
    pub pause: mpsc::UnboundedSender<PauseCommand>,
    /// Live state of every agent.
    pub fleet: Arc<FleetState>,
    /// Where `/health`, `/metrics` and the agent API are served (the bound address of `--http`).
    pub http: Option<std::net::SocketAddr>,
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
    run_with(config, shutdown, |_| {}).await
}

/// Like [`run`], handing `on_start` the process's [`Control`] once started.
pub async fn run_with(
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(Control),
) -> anyhow::Result<()> {
    let registry = registry_file::load(&config.registry_path, &config.allowed_hosts)?;
    // Fail closed, as `mesh bot` does: a permissions file that cannot be used stops the listener here.
    let permissions = match &config.permissions_file {
        Some(path) => Some(crate::permissions::Followed::start(path.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (permissions, live_permissions) = permissions.unzip();
    let selected = select(&registry, &config.selection, &OsSecrets::for_registry(&config.registry_path))?;
    if let Selection::One(id) = &config.selection
        && !selected.contains_key(id)
    {
        anyhow::bail!("agent {:?} has tokens that do not resolve; see the error above", id.as_str());
    }
    let (client, connects) = crate::nats::connect_watched(&config.nats_url, "mesh-listener", &config.nats_auth).await?;
    let js = async_nats::jetstream::new(client.clone());
    tokio::pin!(shutdown);
    // The bot creates the streams, the bucket and the consumers; a listener
    // waits for them and refuses to run on what is set up otherwise.
    match crate::lookup::wait_for("streams", || crate::lookup::check_streams(&js), &mut shutdown).await {
        None => return Ok(()),
        Some(result) => result?,
    }
    match crate::lookup::wait_for("kill switch", || crate::lookup::find_bucket(&js), &mut shutdown).await {
        None => return Ok(()),
        Some(result) => result?,
    }
    // Connected by now (the lookups were answered).
    if let Some(warning) = mesh_runtime::server_pause::Support::of(&client).warning() {
        tracing::warn!("{warning}");
    }
    let extra_roots = match &config.gateway_ca_file {
        Some(path) => crate::gateway::load_ca_file(path)?,
        None => Vec::new(),
    };
    let gateway = HttpGateway::new(config.request_timeout, extra_roots)?;
    let metrics = crate::metrics::install();
    let (registry_tx, registry_rx) = watch::channel(Arc::new(registry.clone()));
    let deps = Arc::new(Deps {
        js: js.clone(),
        gateway: gateway.clone(),
        retry: config.retry,
        max_hops: config.max_hops,
        // Each agent loop sets both from its consumer.
        ack_wait: config.ack_wait,
        confirm_acks: config.concurrency <= 1,
        in_order: false,
        connects,
        registry: registry_rx,
        registry_path: config.registry_path.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
    });
    let kill_keys = crate::killswitch::keys_of(selected.keys());
    let (kill_states, kill_seen) = crate::killswitch::load(&client, &kill_keys).await?;
    let fleet = Arc::new(FleetState::default());
    let urls = GatewayUrls::default();
    let root = CancellationToken::new();
    tokio::spawn(crate::metrics::upkeep(metrics, crate::metrics::UPKEEP_EVERY, root.clone()));
    let (mesh_tokens, mesh_tokens_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let api = match config.http_addr {
        Some(_) => agent_api(&config, &client, &fleet, mesh_tokens_rx, live_permissions).await,
        None => None,
    };
    let mut http = None;
    if let Some(addr) = config.http_addr {
        let bound = crate::http::serve(addr, fleet.clone(), client.clone(), api, root.clone())
            .await
            .with_context(|| format!("serving /health and /metrics on {addr}"))?;
        info!(addr = %bound, "health and metrics endpoints up");
        http = Some(bound);
    }
    tokio::spawn(ping::respond(client.clone(), fleet.clone(), gateway, urls.clone(), root.clone()));
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
    let (kill_keys_tx, kill_keys_rx) = watch::channel(kill_keys);
    tokio::spawn(crate::killswitch::follow(client.clone(), kill_seen, kill_keys_rx, kill_tx, root.clone()));

    let (pause_tx, mut pause_rx) = mpsc::unbounded_channel();
    let mut world = World {
        running: BTreeMap::new(),
        tasks: JoinSet::new(),
        deps,
        fleet: fleet.clone(),
        urls,
        loop_config: LoopConfig { concurrency: config.concurrency, ack_wait: config.ack_wait },
        root: root.clone(),
        pause_all: false,
        paused_agents: BTreeSet::new(),
        kill: kill_states,
        kill_keys: kill_keys_tx,
        mesh_tokens,
        unresolved: BTreeSet::new(),
    };
    world.apply(&selected);
    info!(agents = world.running.len(), nats = %crate::nats::redact_url(&config.nats_url), "listener started");
    on_start(Control { pause: pause_tx, fleet, http });

    let mut last_registry = registry;
    let mut poll = tokio::time::interval(config.registry_poll);
    poll.tick().await;
    let mut refused = None;
    loop {
        let next_deadline = world.next_kill_deadline();
        tokio::select! {
            () = &mut shutdown => break,
            Some(command) = pause_rx.recv() => world.pause(command),
            Some((key, state)) = kill_rx.recv() => {
                match state {
                    Some(state) => {
                        info!(key, mode = %state.mode, by = %state.by, "kill switch changed");
                        world.kill.insert(key, state);
                    }
                    None => {
                        world.kill.remove(&key);
                    }
                }
                world.refresh_pauses();
            }
            () = sleep_until_deadline(next_deadline) => {
                info!("a soft kill ended; resuming");
                world.refresh_pauses();
            }
            _ = poll.tick() => {
                if let Some(permissions) = &permissions {
                    permissions.reload();
                }
                match registry_file::load(&config.registry_path, &config.allowed_hosts) {
                    Ok(registry) if registry != last_registry => {
                        info!("registry changed; applying");
                        registry_tx.send_replace(Arc::new(registry.clone()));
                        match select(&registry, &config.selection, &OsSecrets::for_registry(&config.registry_path)) {
                            Ok(selected) => world.apply(&selected),
                            // One agent, now removed or inactive: stop pulling for it.
                            Err(e) if matches!(config.selection, Selection::One(_)) => {
                                warn!(error = %e, "this listener's agent left the registry; idle");
                                world.apply(&BTreeMap::new());
                            }
                            Err(e) => warn!(error = %e, "registry change not applied"),
                        }
                        last_registry = registry;
                    }
                    // Same registry: token files may have been rewritten in place (a rotation).
                    Ok(_) => world.refresh_tokens(&OsSecrets::for_registry(&config.registry_path)),
                    Err(e) => warn!(error = %e, "registry unreadable; keeping the last good one"),
                }
            }
            Some(joined) = world.tasks.join_next(), if !world.tasks.is_empty() => {
                match joined {
                    // One agent: the process stops with the error.
                    Ok((_, Err(e))) if matches!(config.selection, Selection::One(_)) => {
                        refused = Some(e);
                        break;
                    }
                    // One of many: only that agent stops; /health reports it.
                    Ok((agent, Err(e))) => {
                        error!(agent = %agent, error = %e, "this agent stopped; the others keep running (restart the listener once it is fixed)");
                        if let Some(state) = world.fleet.get(&agent) {
                            state.set_refused(e.to_string());
                        }
                    }
                    Err(e) if e.is_panic() => error!(error = %e, "an agent loop panicked"),
                    _ => {}
                }
            }
        }
    }
    info!("stopping: no new pulls; waiting for in-flight deliveries");
    root.cancel();
    let tasks = &mut world.tasks;
    let drained =
        tokio::time::timeout(config.shutdown_grace(), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            grace_s = config.shutdown_grace().as_secs(),
            "in-flight deliveries did not finish in time; JetStream will redeliver them"
        );
    }
    // Acks are queued publishes: make sure they reached the server before leaving.
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        warn!(error = %e, "final acks may not have reached NATS; those messages will be redelivered");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    if let Some(e) = refused {
        return Err(e.into());
    }
    info!("listener stopped");
    Ok(())
}

/// The engine behind `/v1/messages`: agents' sends take the same road as
/// every other command. `None` (logged) when it cannot be set up; the health
/// endpoints still run.
async fn agent_api(
    config: &ListenerConfig,
    client: &async_nats::Client,
    fleet: &Arc<FleetState>,
    tokens: crate::agent_api::MeshTokens,
    live_permissions: Option<mesh_engine::engine::LivePermissions>,
) -> Option<crate::agent_api::AgentApi> {
    use mesh_engine::limits::{LimitStore, LimitsConfig, SystemClock};
    let engine_config = mesh_engine::engine::EngineConfig {
        registry_path: config.registry_path.clone(),
        permissions: config.permissions.clone(),
        confirm: mesh_engine::command::ConfirmConfig::default(),
        ask_timeout: Duration::from_secs(120),
        ping_timeout: Duration::from_secs(2),
        replicas: config.replicas,
        allowed_hosts: config.allowed_hosts.clone(),
        broadcast_ttl: None,
    };
    let limits = LimitsConfig { rates: config.agent_limits, ..LimitsConfig::default() };
    let limits = LimitStore::new(limits, None, Arc::new(SystemClock::new()));
    match mesh_engine::engine::Engine::new(engine_config, client.clone(), limits).await {
        Ok(engine) => Some(crate::agent_api::AgentApi {
            engine: Arc::new(match live_permissions {
                Some(live) => engine.with_live_permissions(live),
                None => engine,
            }),
            tokens,
            fleet: fleet.clone(),
            max_hops: config.max_hops,
        }),
        Err(e) => {
            error!(error = %e, "the agent API (/v1/messages) is off: the engine cannot reach the mesh");
            None
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_deadline(deadline: Option<time::OffsetDateTime>) {
    match deadline {
        Some(at) => {
            let left = (at - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
            let left = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(5);
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// The agents to serve, with tokens resolved. Agents whose tokens do not
/// resolve are reported and skipped (the rest of the fleet keeps running).
fn select(
    registry: &Registry,
    selection: &Selection,
    secrets: &OsSecrets,
) -> anyhow::Result<BTreeMap<AgentId, AgentEntry>> {
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
        match agent.resolve_tokens(secrets) {
            Ok(tokens) => {
                out.insert(agent.id.clone(), AgentEntry { agent: agent.clone(), tokens });
            }
            Err(e) => error!(error = %e, "agent skipped"),
        }
    }
    Ok(out)
}

/// The running loops of one process.
struct World<G> {
    running: BTreeMap<AgentId, Running>,
    tasks: JoinSet<(AgentId, Result<(), crate::layout_check::LayoutError>)>,
    deps: Arc<Deps<G>>,
    fleet: Arc<FleetState>,
    urls: GatewayUrls,
    loop_config: LoopConfig,
    root: CancellationToken,
    pause_all: bool,
    paused_agents: BTreeSet<AgentId>,
    kill: crate::killswitch::KillStates,
    /// The kill switch keys followed: the global one and the running agents'.
    kill_keys: watch::Sender<BTreeSet<String>>,
    /// The mesh tokens of the running agents (who may call `/v1/messages`).
    mesh_tokens: watch::Sender<Arc<BTreeMap<AgentId, mesh_protocol::Secret>>>,
    /// Running agents whose tokens did not resolve at the last refresh (said once).
    unresolved: BTreeSet<AgentId>,
}

impl<G: Gateway + Clone> World<G> {
    /// Starts, updates and stops loops so that exactly `selected` run.
    fn apply(&mut self, selected: &BTreeMap<AgentId, AgentEntry>) {
        let fleet = &self.fleet;
        let urls = &self.urls;
        self.running.retain(|id, run| {
            let keep = selected.contains_key(id);
            if !keep {
                info!(agent = %id, "agent removed or inactive; stopping its listener");
                run.stop.cancel();
                fleet.remove(id);
                urls.write().unwrap_or_else(|p| p.into_inner()).remove(id);
            }
            keep
        });
        for (id, entry) in selected {
            self.urls.write().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), entry.agent.gateway_base());
            if let Some(run) = self.running.get(id) {
                let current = run.entry.borrow().clone();
                if current.agent != entry.agent || current.tokens != entry.tokens {
                    info!(agent = %id, "agent entry changed; used from the next request on");
                    run.entry.send_replace(Arc::new(entry.clone()));
                }
                continue;
            }
            let (entry_tx, entry_rx) = watch::channel(Arc::new(entry.clone()));
            let (paused_tx, paused_rx) = watch::channel(self.should_pause(id));
            let stop = self.root.child_token();
            let state = self.fleet.add(id);
            let (deps, config, agent) = (self.deps.clone(), self.loop_config, id.clone());
            let stopping = stop.clone();
            // A loop that panics is started again (see `supervise`), not left dead.
            self.tasks.spawn(async move {
                let start = || {
                    let (entry, paused) = (entry_rx.clone(), paused_rx.clone());
                    consumer::run_agent(deps.clone(), state.clone(), entry, paused, config, stopping.clone())
                };
                let result = crate::supervise::run(&state, &stopping, Ok(()), start).await;
                (agent, result)
            });
            info!(agent = %id, "listener started for agent");
            self.running.insert(id.clone(), Running { entry: entry_tx, paused: paused_tx, stop });
        }
        let mut tokens: BTreeMap<_, _> =
            selected.iter().filter_map(|(id, e)| e.tokens.mesh.clone().map(|t| (id.clone(), t))).collect();
        // Two agents with one mesh token (different references, same value): neither is authenticated by it.
        for (first, second) in mesh_protocol::registry::shared_mesh_tokens(&tokens) {
            error!(
                first = %first, second = %second,
                "agents {first} and {second} have the same mesh_token; both are refused until each has its own"
            );
            tokens.remove(&first);
            tokens.remove(&second);
        }
        self.mesh_tokens.send_if_modified(|known| {
            let changed = **known != tokens;
            *known = Arc::new(tokens);
            changed
        });
        let keys = crate::killswitch::keys_of(self.running.keys());
        self.kill_keys.send_if_modified(|known| {
            let changed = *known != keys;
            *known = keys;
            changed
        });
    }

    /// Resolves the running agents' tokens again (a `file:` token rewritten
    /// in place, an `env:` one cannot change) and applies those that changed,
    /// so a rotated token is used, and the old one refused, from this poll on.
    /// A hooks or gateway token that does not resolve now (a file being
    /// rewritten) keeps the last good one, said once; a mesh token does not:
    /// an agent's credential that no longer resolves (its file deleted or
    /// emptied to revoke it) is refused from this poll on.
    fn refresh_tokens(&mut self, secrets: &OsSecrets) {
        let mut selected = BTreeMap::new();
        let mut changed = false;
        for (id, run) in &self.running {
            let current = run.entry.borrow().clone();
            match current.agent.resolve_tokens(secrets) {
                Ok(tokens) => {
                    self.unresolved.remove(id);
                    changed |= tokens != current.tokens;
                    selected.insert(id.clone(), AgentEntry { agent: current.agent.clone(), tokens });
                }
                Err(e) => {
                    if self.unresolved.insert(id.clone()) {
                        warn!(agent = %id, error = %e, "a token no longer resolves; keeping the last good hooks and gateway tokens, refusing the agent's mesh token");
                    }
                    let mut kept = (*current).clone();
                    changed |= kept.tokens.mesh.take().is_some();
                    selected.insert(id.clone(), kept);
                }
            }
        }
        if changed {
            info!("a token file changed; applying");
            self.apply(&selected);
        }
    }

    fn pause(&mut self, command: PauseCommand) {
        match command {
            PauseCommand::Agent(id, true) => {
                self.paused_agents.insert(id);
            }
            PauseCommand::Agent(id, false) => {
                self.paused_agents.remove(&id);
            }
            PauseCommand::All(paused) => self.pause_all = paused,
        }
        self.refresh_pauses();
    }

    /// True when an agent must not pull: paused by hand, or by the kill switch.
    fn should_pause(&self, id: &AgentId) -> bool {
        let global = crate::killswitch::entry(&self.kill, &Scope::Global);
        let own = crate::killswitch::entry(&self.kill, &Scope::Agent(id.clone()));
        self.pause_all
            || self.paused_agents.contains(id)
            || killswitch::effective(global, own, time::OffsetDateTime::now_utc()).is_some()
    }

    /// Pauses and resumes loops to match the current state.
    fn refresh_pauses(&mut self) {
        for (id, run) in &self.running {
            let paused = self.should_pause(id);
            if *run.paused.borrow() != paused {
                info!(agent = %id, paused, "pause state changed");
                run.paused.send_replace(paused);
            }
        }
    }

    /// When the next soft kill in force ends.
    fn next_kill_deadline(&self) -> Option<time::OffsetDateTime> {
        let now = time::OffsetDateTime::now_utc();
        self.kill.values().filter(|s| s.in_force(now)).filter_map(|s| s.until).min()
    }
}
