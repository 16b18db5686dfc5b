//! A real `redis-server` on a free loopback port with a temporary dir, killed
//! on drop.

use std::process::Stdio;
use std::time::{Duration, Instant};

/// The Redis server under test.
#[derive(Debug)]
pub struct TestRedis {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Starts a server; panics with install instructions when redis-server is missing.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = mesh_bot::local_nats::free_port().expect("free port");
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server not found ({e}); run scripts/install.sh (installs Debian's redis-server)")
            });
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, port, _dir: dir }
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it now.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}
