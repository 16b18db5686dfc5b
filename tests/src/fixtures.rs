//! Registries written to temp files, listeners run in-process, and the paths
//! of the binaries under test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_listener::config::{ListenerConfig, Selection};
use mesh_protocol::AgentId;
use tokio::sync::oneshot;

use crate::gateway::RecordingGateway;
use crate::server::TestNats;

/// A registry file in a temp dir.
#[derive(Debug)]
pub struct Fixture {
    dir: tempfile::TempDir,
    /// The registry path.
    pub registry: PathBuf,
}

impl Fixture {
    /// Writes `agents` (id, gateway, active) as a registry with literal tokens
    /// `<id>-hook-token`.
    pub fn registry(agents: &[(&str, &RecordingGateway, bool)]) -> Self {
        let mut map = serde_json::Map::new();
        for (id, gateway, active) in agents {
            map.insert(
                (*id).to_owned(),
                serde_json::json!({
                    "gateway": gateway.addr.to_string(),
                    "hooks_token": format!("{id}-hook-token"),
                    "hooks_url": gateway.hooks_url(),
                    "status": if *active { "active" } else { "inactive" },
                }),
            );
        }
        Self::from_json(&serde_json::Value::Object(map))
    }

    /// Writes any registry JSON.
    pub fn from_json(json: &serde_json::Value) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = dir.path().join("tokens.json");
        std::fs::write(&registry, serde_json::to_string_pretty(json).expect("json")).expect("writing the registry");
        Self { dir, registry }
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a token file where listeners may read it (`secrets/` beside the
    /// registry) and returns its path.
    pub fn secret_file(&self, name: &str, value: &str) -> PathBuf {
        let dir = self.dir.path().join("secrets");
        std::fs::create_dir_all(&dir).expect("creating the secrets directory");
        let path = dir.join(name);
        std::fs::write(&path, value).expect("writing a token file");
        path
    }

    /// Listener settings for this registry with fast retries for tests.
    pub fn listener_config(&self, nats: &TestNats, selection: Selection) -> ListenerConfig {
        self.listener_config_at(&nats.url(), selection)
    }

    /// Like [`Fixture::listener_config`], for any NATS URL setting (a cluster's URLs, say).
    pub fn listener_config_at(&self, nats_url: &str, selection: Selection) -> ListenerConfig {
        let mut config = ListenerConfig::new(nats_url, &self.registry, selection);
        config.retry.base = Duration::from_millis(50);
        config.retry.max = Duration::from_millis(400);
        config.registry_poll = Duration::from_millis(200);
        config
    }
}

/// An in-process listener, stopped on [`ListenerHandle::stop`] or drop.
#[derive(Debug)]
pub struct ListenerHandle {
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ListenerHandle {
    /// Starts `mesh_listener::run` in this process, with what a bot would do
    /// alongside (listeners create nothing): the streams, the kill switch
    /// bucket and every active agent's consumer with the listener's tuning,
    /// once before the listener starts and again on registry changes.
    pub fn spawn(config: ListenerConfig) -> Self {
        if std::env::var_os("MESH_TEST_LOG").is_some() {
            mesh_listener::logging::init();
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let provisioner = provision(&config).await;
            let result = mesh_listener::run(config, async move {
                let _ = stopped.await;
            })
            .await;
            provisioner.abort();
            result
        });
        Self { stop: Some(stop), join: Some(join) }
    }

    /// Starts `mesh_listener::run` alone: nothing creates what it waits for.
    pub fn spawn_bare(config: ListenerConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(mesh_listener::run(config, async move {
            let _ = stopped.await;
        }));
        Self { stop: Some(stop), join: Some(join) }
    }

    /// Starts `mesh_listener::run_with` (with the bot's part, as [`ListenerHandle::spawn`])
    /// and waits until it hands over its [`mesh_listener::Control`].
    pub async fn spawn_with_control(config: ListenerConfig) -> (Self, mesh_listener::Control) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (control_tx, control_rx) = oneshot::channel();
        let provisioner = provision(&config).await;
        let join = tokio::spawn(async move {
            let result = mesh_listener::run_with(
                config,
                async move {
                    let _ = stopped.await;
                },
                move |control| {
                    let _ = control_tx.send(control);
                },
            )
            .await;
            provisioner.abort();
            result
        });
        let control = control_rx.await.expect("listener started");
        (Self { stop: Some(stop), join: Some(join) }, control)
    }

    /// Starts a listener for one agent.
    pub fn one(fixture: &Fixture, nats: &TestNats, agent: &str) -> Self {
        let id = AgentId::parse(agent).expect("valid agent id");
        Self::spawn(fixture.listener_config(nats, Selection::One(id)))
    }

    /// Stops it gracefully and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.join.take() {
            Some(join) => join.await.expect("listener task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Does the bot's part for a listener started without one: the streams, the
/// bucket and the active agents' consumers (with the listener's tuning) now,
/// waiting a bounded time for NATS, then following the registry until the
/// returned task is aborted.
pub async fn provision(config: &ListenerConfig) -> tokio::task::JoinHandle<()> {
    let follow = mesh_bot::provision::FollowConfig {
        registry_path: config.registry_path.clone(),
        poll: config.registry_poll,
        replicas: config.replicas,
        allowed_hosts: config.allowed_hosts.clone(),
        tuning: Some(config.tuning()),
    };
    let client = mesh_listener::nats::connect_service(&config.nats_url, "mesh-test-provision", &config.nats_auth)
        .await
        .expect("a client for the test's bot part");
    let js = async_nats::jetstream::new(client);
    let first = async {
        loop {
            // An unreadable registry is the listener's to report.
            let Ok(registry) = mesh_listener::registry_file::load(&follow.registry_path, &follow.allowed_hosts) else {
                return;
            };
            let done = async {
                mesh_bot::provision::ensure_mesh(&js, follow.replicas).await?;
                mesh_bot::provision::ensure_agents(&js, &registry, follow.tuning).await
            };
            if done.await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // NATS may be down on purpose (a test of the listener's own reconnects): the follower keeps trying.
    let _ = tokio::time::timeout(Duration::from_secs(5), first).await;
    tokio::spawn(mesh_bot::provision::follow(js, follow, std::future::pending()))
}

/// The consumer tuning a listener process run with `--concurrency` and
/// `--ack-wait` asks for (what a test creates its consumer with, as a bot would).
pub fn listener_tuning(concurrency: usize, ack_wait: Duration) -> mesh_protocol::layout::ConsumerTuning {
    let mut config = ListenerConfig::new("", "", Selection::All);
    config.concurrency = concurrency;
    config.ack_wait = ack_wait;
    config.tuning()
}

/// The bot's part for a listener process started without one: the streams,
/// the kill switch bucket, and `agent`'s consumer with `tuning` (created or updated).
pub async fn provision_agent(
    js: &async_nats::jetstream::Context,
    agent: &str,
    tuning: mesh_protocol::layout::ConsumerTuning,
) -> Result<(), mesh_listener::nats::NatsError> {
    mesh_bot::provision::ensure_mesh(js, mesh_protocol::layout::Replicas::Auto).await?;
    let id = AgentId::parse(agent).map_err(|e| mesh_listener::nats::NatsError::jetstream("naming the agent", e))?;
    mesh_listener::nats::bind_consumer(js, &id, tuning).await.map(|_| ())
}

/// Path of the `mesh` binary under test (cargo builds this crate's binaries
/// next to `deps/`, where the integration test executables live).
pub fn mesh_bin() -> PathBuf {
    bin("mesh-under-test")
}

/// The `mesh` binary under test, pointed at a NATS server and a registry.
pub fn mesh_command(nats_url: &str, registry: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(mesh_bin());
    command.env("NATS_URL", nats_url).env("MESH_REGISTRY", registry);
    command
}

/// Path of the `mesh-listener` binary under test.
pub fn listener_bin() -> PathBuf {
    bin("mesh-listener-under-test")
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing; run the suite with `cargo test --workspace`", path.display());
    path
}

/// Waits until an agent's consumer has nothing pending and nothing unacked.
pub async fn wait_until_settled(js: &async_nats::jetstream::Context, agent: &str, timeout: Duration) {
    let durable =
        mesh_protocol::layout::agent_consumer(&AgentId::parse(agent).expect("id"), Default::default()).durable;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
        if let Ok(info) = stream.consumer_info(&durable).await
            && info.num_pending == 0
            && info.num_ack_pending == 0
            && info.delivered.stream_sequence > 0
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "consumer {durable} did not settle within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process whose stdout and stderr are read as they come (a full
/// pipe would block it), collected for assertions.
#[derive(Debug)]
pub struct Logged {
    /// The process.
    pub child: tokio::process::Child,
    output: tokio::sync::watch::Receiver<Output>,
    readers: tokio::task::JoinHandle<()>,
}

/// What a [`Logged`] process printed so far.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    /// Both streams are closed (the process exited, usually).
    closed: bool,
}

impl Output {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Appends what `stream` prints, line by line, to the part of the output `part` picks.
async fn pump(
    stream: impl tokio::io::AsyncRead + Unpin,
    output: &tokio::sync::watch::Sender<Output>,
    part: fn(&mut Output) -> &mut String,
) {
    use tokio::io::AsyncBufReadExt;
    let mut stream = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    while matches!(stream.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        output.send_modify(|o| part(o).push_str(&String::from_utf8_lossy(&line)));
        line.clear();
    }
}

impl Logged {
    /// Spawns `command` with piped output.
    pub fn spawn(mut command: tokio::process::Command) -> Self {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning a process under test");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, output) = tokio::sync::watch::channel(Output::default());
        let readers = tokio::spawn(async move {
            tokio::join!(pump(stdout, &tx, |o| &mut o.stdout), pump(stderr, &tx, |o| &mut o.stderr));
            tx.send_modify(|o| o.closed = true);
        });
        Self { child, output, readers }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Waits until the output holds `needle`: `Err` with all of it when the
    /// process closed its output (exited) first; panics after `timeout`.
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let holds = |o: &Output| o.stdout.contains(needle) || o.stderr.contains(needle);
        let mut output = self.output.clone();
        let seen = tokio::time::timeout(timeout, output.wait_for(|o| holds(o) || o.closed)).await.is_ok();
        let output = self.output.borrow();
        match (holds(&output), seen) {
            (true, _) => Ok(()),
            (false, true) => Err(output.all()),
            (false, false) => panic!("{needle:?} not printed within {timeout:?}; output so far:\n{}", output.all()),
        }
    }

    /// Waits for the exit (sending SIGTERM first when `terminate`), then returns the status and all output.
    pub async fn finish(mut self, terminate: bool) -> (std::process::ExitStatus, String) {
        if terminate {
            let _ = std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        }
        let status = self.child.wait().await.expect("waiting for the process");
        (status, self.output_at_end().await)
    }

    /// Kills it (SIGKILL) and returns all output.
    pub async fn kill(mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.output_at_end().await
    }

    /// All output (stdout, then stderr), once both streams are closed.
    async fn output_at_end(self) -> String {
        self.readers.await.expect("output reader");
        self.output.borrow().all()
    }
}

/// Every dead letter in `MESH_DLQ`, oldest first: its headers and the original bytes.
pub async fn dead_letters(
    js: &async_nats::jetstream::Context,
) -> Vec<(mesh_protocol::dead_letter::DeadLetter, bytes::Bytes)> {
    let stream = js.get_stream("MESH_DLQ").await.expect("dlq stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(message) = stream.get_raw_message(seq).await {
            let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
            let record = mesh_protocol::dead_letter::DeadLetter::from_headers(header).expect("dead letter headers");
            out.push((record, message.payload));
        }
    }
    out
}
