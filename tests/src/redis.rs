//! A real `redis-server` on a free loopback port with a temporary dir and no
//! persistence, killed on drop.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the server may take to answer `PING` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports `start` tries.
const START_ATTEMPTS: usize = 5;

/// The Redis server under test.
#[derive(Debug)]
pub struct TestRedis {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Starts a server on a free port; panics with install instructions when
    /// redis-server is missing. A free port can be taken by another test before
    /// the server binds it: then it tries another port (a few times).
    pub async fn start() -> Self {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = mesh_bot::local_nats::free_port().expect("finding a free port");
            match Self::try_start_on(port).await {
                Ok(redis) => return redis,
                Err(error) => last_error = error,
            }
        }
        panic!("redis-server did not start in {START_ATTEMPTS} attempts: {last_error}");
    }

    /// Starts a server on `port` and waits until it answers `PING`; panics if it cannot.
    pub async fn start_on(port: u16) -> Self {
        Self::try_start_on(port).await.unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts a server on `port` and waits until it answers `PING` as itself
    /// (its process id), not as another server that holds the port.
    async fn try_start_on(port: u16) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let mut child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    panic!("redis-server not found; run scripts/install.sh (installs Debian's redis-server)")
                }
                _ => panic!("starting redis-server: {e}"),
            });
        let pid = child.id().expect("redis-server's process id");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited at start ({status}); is port {port} taken?"));
            }
            if answers_ping(port).await && server_pid(port).await == Some(pid) {
                return Ok(Self { child, port, _dir: dir });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!("redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli --raw` against it and returns its output, one line per reply element.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .await
            .expect("running redis-cli (installed with redis-server)");
        assert!(output.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Every key, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> =
            self.cli(&["KEYS", "*"]).await.lines().filter(|k| !k.is_empty()).map(str::to_owned).collect();
        keys.sort();
        keys
    }

    /// Kills it now (it is killed on drop anyway).
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// True when a server on `port` answers `PING` with `+PONG`.
async fn answers_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(&reply == b"+PONG\r\n")
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Ok(true)))
}

/// The process id of the Redis server answering on `port` (`INFO server`).
async fn server_pid(port: u16) -> Option<u32> {
    let output = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "INFO", "server"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}
