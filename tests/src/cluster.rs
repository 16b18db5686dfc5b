//! A three-node JetStream cluster: each node's config, rendered by the same
//! code that wrote `deploy/nats-cluster/` (a test keeps the two in step), and
//! [`TestCluster`], three nats-server processes on loopback that a test can
//! kill, restart, freeze (SIGSTOP) and thaw (SIGCONT). Like the deployment,
//! they take the users `mesh deploy render` writes (`nats-auth.conf`, here
//! for the test's registry) and authenticate their routes, so every client
//! of a test cluster logs in: as `mesh-admin` ([`TestCluster::client`],
//! [`TestCluster::admin_env`]) or as an agent's listener
//! ([`TestCluster::listener_env`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mesh_bot::deploy;
use mesh_protocol::Registry;
use mesh_protocol::access::{self, Access};
use std::net::TcpListener;
use tokio::process::{Child, Command};

/// Name of the cluster (what a server's INFO reports, and what makes
/// `MESH_REPLICAS=auto` choose 3 replicas).
pub const CLUSTER_NAME: &str = "mesh";
/// How long a node may take to accept clients and report healthy.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fresh cluster may take to form before it is started again.
pub const FORMATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh clusters [`TestCluster::start`] tries.
pub const FORMATION_ATTEMPTS: usize = 3;
/// The user routes log in as (the `authorization` block inside `cluster {}`).
pub const ROUTE_USER: &str = "mesh-route";
/// Variable with the route user's password (what a node checks routes against).
pub const ROUTE_PASSWORD_ENV: &str = "MESH_ROUTE_NATS_PASSWORD";
/// Variable with the route URLs, each carrying the route password:
/// nats-server expands no variable inside a URL and uses the cluster's own
/// credentials only for routes it discovers, not for those it is given.
pub const ROUTES_ENV: &str = "MESH_NATS_ROUTES";
/// Where a node serves monitoring (`/healthz`, `/varz`, `/connz`, `/jsz`,
/// none of which asks who is calling): only inside the node.
pub const MONITOR_HOST: &str = "127.0.0.1";

/// One node's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// `server_name`, unique in the cluster (JetStream needs it).
    pub name: String,
    /// Host the other nodes reach this one at.
    pub host: String,
    /// Client port.
    pub client_port: u16,
    /// Route (cluster) port.
    pub cluster_port: u16,
    /// Monitoring port (`/healthz`, `/jsz`, `/varz`).
    pub monitor_port: u16,
    /// JetStream store directory.
    pub store_dir: String,
}

/// The whole cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Address every node listens on.
    pub listen_host: String,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
}

impl ClusterSpec {
    /// The deployment in `deploy/nats-cluster/`: hosts `nats-1` to `nats-3`
    /// (compose service names), standard ports, one store per node.
    pub fn deploy() -> Self {
        let nodes = (1..=3)
            .map(|n| NodeSpec {
                name: format!("nats-{n}"),
                host: format!("nats-{n}"),
                client_port: 4222,
                cluster_port: 6222,
                monitor_port: 8222,
                store_dir: format!("/data/nats-{n}"),
            })
            .collect();
        Self { listen_host: "0.0.0.0".into(), nodes }
    }

    /// Three nodes on 127.0.0.1 with free ports and stores under `dir`.
    /// The nine ports are held open together while they are chosen, so no two are the same.
    pub fn loopback(dir: &Path) -> std::io::Result<Self> {
        let held = (0..9).map(|_| TcpListener::bind(("127.0.0.1", 0))).collect::<std::io::Result<Vec<_>>>()?;
        let ports = held.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<std::io::Result<Vec<_>>>()?;
        let nodes = (0..3)
            .map(|i| NodeSpec {
                name: format!("nats-{}", i + 1),
                host: "127.0.0.1".into(),
                client_port: ports[3 * i],
                cluster_port: ports[3 * i + 1],
                monitor_port: ports[3 * i + 2],
                store_dir: dir.join(format!("nats-{}", i + 1)).display().to_string(),
            })
            .collect();
        Ok(Self { listen_host: "127.0.0.1".into(), nodes })
    }

    /// The value of [`ROUTES_ENV`]: every node's route URL with the route
    /// user and `password` (a node skips its own).
    pub fn routes(&self, password: &str) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|peer| format!("nats-route://{ROUTE_USER}:{password}@{}:{}", peer.host, peer.cluster_port))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The config file of node `index` (0-based).
    pub fn render(&self, index: usize) -> String {
        let node = &self.nodes[index];
        let listen = &self.listen_host;
        format!(
            "# {name}: one of the {count} JetStream servers of the mesh cluster.\n\
             # Rendered by tests/src/cluster.rs (ClusterSpec); the HA tests run this same\n\
             # config on loopback, and a test checks this file matches it.\n\
             server_name: {name}\n\
             listen: {listen}:{client}\n\
             # Monitoring asks no credentials and names every client: loopback only\n\
             # (the health check and a metrics exporter run inside the node; README).\n\
             http: {MONITOR_HOST}:{monitor}\n\
             \n\
             # Clients log in as the users `mesh deploy render` writes from the registry\n\
             # ({auth}, mounted beside this file): the same users and permissions\n\
             # as the single server's nats.conf.\n\
             include \"{auth}\"\n\
             \n\
             jetstream {{\n  store_dir: \"{store}\"\n  # fsync every write before it is acknowledged (README, Delivery guarantees)\n  sync_interval: always\n}}\n\
             \n\
             cluster {{\n  name: {CLUSTER_NAME}\n  listen: {listen}:{cluster}\n\
             \x20 # A route must log in as {ROUTE_USER} with ${ROUTE_PASSWORD_ENV}.\n\
             \x20 authorization {{\n    user: {ROUTE_USER}\n    password: ${ROUTE_PASSWORD_ENV}\n  }}\n\
             \x20 # nats-server reads no variable inside a URL, so the route URLs come whole\n\
             \x20 # from the environment, each with the route password:\n\
             \x20 # {ROUTES_ENV}={example}\n\
             \x20 routes: ${ROUTES_ENV}\n}}\n",
            name = node.name,
            count = self.nodes.len(),
            client = node.client_port,
            monitor = node.monitor_port,
            store = node.store_dir,
            cluster = node.cluster_port,
            auth = deploy::NATS_AUTH_CONF,
            example = self.routes("<password>"),
        )
    }
}

/// One running (or stopped) node.
#[derive(Debug)]
struct Node {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

/// Three nats-server processes forming one JetStream cluster on loopback,
/// killed on drop.
#[derive(Debug)]
pub struct TestCluster {
    /// The rendered layout.
    pub spec: ClusterSpec,
    nodes: Vec<Node>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    /// The users of `nats-auth.conf` (listeners and the bot).
    users: Vec<Access>,
    /// What the nodes' configs read from the environment: every user's
    /// password (random per cluster), the route password and the routes.
    env: Vec<(String, String)>,
}

impl TestCluster {
    /// Starts the three nodes with the users of an empty registry (the bot
    /// and `mesh-admin`); see [`TestCluster::start_for`].
    pub async fn start() -> Self {
        Self::start_with(&Registry::parse("{}").expect("an empty registry")).await
    }

    /// Starts the three nodes with the users `mesh deploy render` writes for
    /// the registry at `registry` (a listener user per active agent).
    pub async fn start_for(registry: &Path) -> Self {
        let registry =
            mesh_listener::registry_file::load(registry, &Default::default()).expect("the test's registry loads");
        Self::start_with(&registry).await
    }

    /// Starts the three nodes and waits until the cluster has formed: every
    /// node healthy (`/healthz`: JetStream has a meta leader and this node is
    /// current) and the meta leader sees both peers current. A fresh cluster
    /// that has not formed within [`FORMATION_TIMEOUT`] (seen on a loaded
    /// 2-core machine: routes up, no meta leader elected for over a minute)
    /// is torn down and started again on new ports, up to
    /// [`FORMATION_ATTEMPTS`] times; what the tests check begins after that.
    async fn start_with(registry: &Registry) -> Self {
        let mut failures = Vec::new();
        for attempt in 1..=FORMATION_ATTEMPTS {
            let mut cluster = Self::spawn_fresh(registry);
            match cluster.formed_within(FORMATION_TIMEOUT).await {
                Ok(()) => return cluster,
                Err(why) => {
                    println!("test cluster attempt {attempt} did not form: {why}; starting a new one");
                    failures.push(why);
                }
            }
        }
        panic!("the test cluster did not form in {FORMATION_ATTEMPTS} attempts:\n{}", failures.join("\n---\n"));
    }

    /// Waits until every node is healthy and the meta leader sees both
    /// peers current; on failure, why (with the log tail of the node concerned).
    async fn formed_within(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        for index in 0..3 {
            self.healthy_by(index, deadline).await?;
        }
        loop {
            let why = match self.meta_peers_current().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if tokio::time::Instant::now() > deadline {
                return Err(format!("meta group not complete within {timeout:?}: {why}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ok when some node's `/jsz` names a meta leader whose own `/jsz` lists
    /// the two other nodes as current replicas; otherwise what it shows.
    async fn meta_peers_current(&self) -> Result<(), String> {
        let jsz = |index: usize| {
            let url = format!("http://127.0.0.1:{}/jsz", self.spec.nodes[index].monitor_port);
            async move { self.http.get(&url).send().await.ok()?.json::<serde_json::Value>().await.ok() }
        };
        let first = jsz(0).await.ok_or("no /jsz answer from nats-1")?;
        let leader = first["meta_cluster"]["leader"]
            .as_str()
            .and_then(|name| self.index_of(name))
            .ok_or_else(|| format!("no meta leader: {}", first["meta_cluster"]))?;
        let seen = jsz(leader).await.ok_or("no /jsz answer from the meta leader")?;
        let replicas = seen["meta_cluster"]["replicas"].as_array().cloned().unwrap_or_default();
        let current = replicas.iter().filter(|r| r["current"].as_bool() == Some(true)).count();
        if current == 2 { Ok(()) } else { Err(format!("meta leader sees {}", seen["meta_cluster"])) }
    }

    /// Writes the configs of three nodes on new ports and starts them.
    fn spawn_fresh(registry: &Registry) -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let spec = ClusterSpec::loopback(dir.path()).expect("finding free ports");
        let users = deploy::users(registry);
        std::fs::write(dir.path().join(deploy::NATS_AUTH_CONF), deploy::nats_auth(&users)).expect("writing the users");
        let secret = || uuid::Uuid::now_v7().simple().to_string();
        let mut env: Vec<(String, String)> = users
            .iter()
            .map(|u| u.user.as_str())
            .chain([access::ADMIN_USER])
            .map(|user| (access::password_env(user), secret()))
            .collect();
        let route_password = secret();
        env.push((ROUTES_ENV.to_owned(), spec.routes(&route_password)));
        env.push((ROUTE_PASSWORD_ENV.to_owned(), route_password));
        let mut nodes = Vec::new();
        for (index, node) in spec.nodes.iter().enumerate() {
            let config = dir.path().join(format!("{}.conf", node.name));
            std::fs::write(&config, spec.render(index)).expect("writing a node config");
            nodes.push(Node { child: None, config, log: dir.path().join(format!("{}.log", node.name)) });
        }
        mesh_listener::gateway::install_tls_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("http client");
        let mut cluster = Self { spec, nodes, http, dir, users, env };
        for index in 0..3 {
            cluster.spawn(index);
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).expect("opening a node log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&node.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); run scripts/install.sh and put .mesh/tools/bin on PATH")
            });
        node.child = Some(child);
    }

    /// Client URL of one node.
    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.spec.nodes[index].client_port)
    }

    /// All three client URLs, comma separated (what clients are given).
    pub fn urls(&self) -> String {
        (0..self.spec.nodes.len()).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The password of NATS user `user` on this cluster.
    pub fn password(&self, user: &str) -> &str {
        let var = access::password_env(user);
        self.env.iter().find(|(k, _)| *k == var).map_or_else(|| panic!("no NATS user {user}"), |(_, v)| v.as_str())
    }

    /// The route user's password on this cluster.
    pub fn route_password(&self) -> &str {
        self.env.iter().find(|(k, _)| k == ROUTE_PASSWORD_ENV).map(|(_, v)| v.as_str()).unwrap_or_default()
    }

    /// The environment of a process that logs in as `mesh-admin` (the
    /// operator's `mesh` on the host).
    pub fn admin_env(&self) -> Vec<(String, String)> {
        vec![
            ("NATS_USER".to_owned(), access::ADMIN_USER.to_owned()),
            ("NATS_PASSWORD".to_owned(), self.password(access::ADMIN_USER).to_owned()),
        ]
    }

    /// The environment of `agent`'s listener process, as the rendered
    /// compose file gives it: its own user, password and inbox prefix.
    pub fn listener_env(&self, agent: &str) -> Vec<(String, String)> {
        let user = self
            .users
            .iter()
            .find(|u| u.user == access::listener_user(&mesh_protocol::AgentId::parse(agent).expect("an agent id")))
            .unwrap_or_else(|| panic!("{agent} is not an active agent of the registry the cluster started with"));
        vec![
            ("NATS_USER".to_owned(), user.user.clone()),
            ("NATS_PASSWORD".to_owned(), self.password(&user.user).to_owned()),
            ("MESH_INBOX_PREFIX".to_owned(), user.inbox_prefix.clone()),
        ]
    }

    /// A client that knows all three nodes, logs in as `mesh-admin` and reconnects forever.
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<async_nats::ServerAddr> = (0..3).map(|i| self.url(i).parse().expect("server address")).collect();
        async_nats::ConnectOptions::new()
            .user_and_password(access::ADMIN_USER.to_owned(), self.password(access::ADMIN_USER).to_owned())
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(urls)
            .await
            .expect("connecting to the test cluster")
    }

    /// Index of the node with this server name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.spec.nodes.iter().position(|n| n.name == name)
    }

    /// Whether node `index` runs (possibly frozen).
    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].child.is_some()
    }

    /// Kills node `index` with SIGKILL (a crash, as far as JetStream knows).
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts a killed node again with its config and store, and waits until it is healthy.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index).await;
        self.spawn(index);
        self.wait_healthy(index).await;
    }

    /// Freezes node `index` (SIGSTOP): its sockets stay open, it answers nothing.
    pub fn freeze(&self, index: usize) {
        self.signal(index, "-STOP");
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn thaw(&self, index: usize) {
        self.signal(index, "-CONT");
    }

    fn signal(&self, index: usize, signal: &str) {
        if let Some(pid) = self.nodes[index].child.as_ref().and_then(Child::id) {
            let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pid} failed");
        }
    }

    /// Waits until node `index` answers `/healthz` with 200 (it has a meta
    /// leader and its streams are current); panics with its log otherwise.
    pub async fn wait_healthy(&mut self, index: usize) {
        let deadline = tokio::time::Instant::now() + NODE_READY_TIMEOUT;
        if let Err(why) = self.healthy_by(index, deadline).await {
            panic!("{why}");
        }
    }

    /// Waits until node `index` answers `/healthz` with 200, or says why not
    /// by `deadline` (its exit, its last health answer and its log tail).
    async fn healthy_by(&mut self, index: usize, deadline: tokio::time::Instant) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{}/healthz", self.spec.nodes[index].monitor_port);
        let started = tokio::time::Instant::now();
        loop {
            let answer = match self.http.get(&url).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            let exited = self.nodes[index].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.nodes[index].log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("Healthcheck failed")).collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                return Err(format!(
                    "{} not healthy within {:?} (exit: {exited:?}; last /healthz: {answer}); log tail:\n{tail}",
                    self.spec.nodes[index].name,
                    started.elapsed()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node is healthy.
    pub async fn wait_all_healthy(&mut self) {
        for index in 0..self.nodes.len() {
            if self.is_running(index) {
                self.wait_healthy(index).await;
            }
        }
    }

    /// Index of the node leading `stream` now, if it has a leader.
    pub async fn stream_leader(&self, js: &async_nats::jetstream::Context, stream: &str) -> Option<usize> {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        self.index_of(&leader)
    }

    /// Waits until `stream` has a leader and returns it.
    pub async fn wait_stream_leader(&self, js: &async_nats::jetstream::Context, stream: &str) -> usize {
        let deadline = tokio::time::Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if let Some(leader) = self.stream_leader(js, stream).await {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stream {stream} has no leader within {NODE_READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the JetStream meta group has a leader among the running
    /// nodes (as node `ask`'s `/jsz` reports it) and returns it. Stream and
    /// consumer creation go through the meta leader.
    pub async fn wait_meta_leader(&self, ask: usize) -> usize {
        let url = format!("http://127.0.0.1:{}/jsz", self.spec.nodes[ask].monitor_port);
        let deadline = tokio::time::Instant::now() + NODE_READY_TIMEOUT;
        loop {
            let jsz = match self.http.get(&url).send().await {
                Ok(response) => response.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            let leader = jsz.as_ref().and_then(|j| j["meta_cluster"]["leader"].as_str()).and_then(|n| self.index_of(n));
            if let Some(leader) = leader
                && self.is_running(leader)
            {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no JetStream meta leader among the running nodes within {NODE_READY_TIMEOUT:?}: {jsz:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the node logs and stores live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A frozen node must be thawed or killed; SIGKILL works on both.
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}
