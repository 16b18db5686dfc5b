//! The old-style Python listener `mesh-bench` compares against
//! (`tests/bench/old_listener.py`: core NATS, one blocking HTTP POST per
//! message): its venv set up on first use, and its process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

/// The script, next to this crate's sources.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/old_listener.py")
}

/// Makes the venv `dir` with `nats-py` and `requests` unless it has them
/// already, with python3's own `venv` and `pip`; returns its python.
pub fn ensure_venv(dir: &Path) -> anyhow::Result<PathBuf> {
    let python = dir.join("bin/python");
    let ready = |python: &Path| {
        std::process::Command::new(python)
            .args(["-c", "import nats, requests"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    let run = |command: &mut std::process::Command, what: &str| -> anyhow::Result<()> {
        let out = command.output().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        anyhow::ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    };
    run(std::process::Command::new("python3").arg("-m").arg("venv").arg(dir), "python3 -m venv")?;
    run(
        std::process::Command::new(dir.join("bin/pip")).args(["install", "--quiet", "nats-py", "requests"]),
        "pip install nats-py requests",
    )?;
    anyhow::ensure!(ready(&python), "the venv at {} cannot import nats and requests", dir.display());
    Ok(python)
}

/// The old-style listener process for one agent's inbox.
#[derive(Debug)]
pub struct OldListener {
    child: tokio::process::Child,
}

impl OldListener {
    /// Starts it and waits until it is subscribed.
    pub async fn start(python: &Path, nats_url: &str, subject: &str, hook_url: &str) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(python)
            .arg(script())
            .env("NATS_URL", nats_url)
            .env("SUBJECT", subject)
            .env("HOOK_URL", hook_url)
            .env("GATEWAY_TOKEN", "bench-token-0")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    return true;
                }
            }
            false
        });
        anyhow::ensure!(ready.await.unwrap_or(false), "the old-style listener did not subscribe within 30 s");
        Ok(Self { child })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
