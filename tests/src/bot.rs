//! `mesh bot` as a process under test, the one way every end-to-end test runs
//! it: started with its environment on a free port (again on another one when
//! that was taken), waited for until it answers `/health/live`, its output
//! captured as it comes (a full pipe would block it), stopped with SIGTERM.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::fixtures::{Logged, mesh_command};

/// How long the bot may take to answer `/health/live`.
pub const START_WAIT: Duration = Duration::from_secs(20);
/// How long a stopping bot may take to exit before it is killed.
pub const STOP_WAIT: Duration = Duration::from_secs(15);

/// A running `mesh bot` process.
#[derive(Debug)]
pub struct BotProcess {
    process: Logged,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub url: String,
}

impl BotProcess {
    /// Starts `mesh bot` on a free loopback port against `nats_url` and
    /// `registry`, with `env` added (and `MESH_LOG=trace` unless `env` sets
    /// it): started again on another port when its port was taken
    /// ([`crate::ports::spawn_bot`]), then waited for until it answers
    /// `/health/live`. Panics with its output when it exits first or does not
    /// answer within [`START_WAIT`].
    pub async fn start<K, V>(nats_url: &str, registry: &Path, env: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let env: Vec<(OsString, OsString)> =
            env.into_iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())).collect();
        let (process, port) = crate::ports::spawn_bot(|addr| {
            let mut command = mesh_command(nats_url, registry);
            command.args(["bot", "--addr", addr]).env("MESH_LOG", "trace").envs(env.iter().cloned());
            command
        })
        .await;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut bot = Self { process, addr, url: format!("http://{addr}") };
        mesh_listener::gateway::install_tls_provider();
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + START_WAIT;
        while http.get(format!("{}/health/live", bot.url)).send().await.is_err() {
            if let Ok(Some(status)) = bot.process.child.try_wait() {
                panic!("mesh bot exited ({status}) before it answered:\n{}", bot.process.kill().await);
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("mesh bot did not answer within {START_WAIT:?}:\n{}", bot.process.kill().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bot
    }

    /// Waits until the bot has printed `needle` (see [`Logged::wait_for_output`]).
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.process.wait_for_output(needle, timeout).await
    }

    /// Panics when the process has exited.
    pub fn assert_running(&mut self) {
        assert!(self.process.child.try_wait().expect("process state").is_none(), "mesh bot exited");
    }

    /// Stops it with SIGTERM (killed after [`STOP_WAIT`]); returns the exit
    /// status and everything it printed.
    pub async fn stop(mut self) -> (Option<std::process::ExitStatus>, String) {
        let pid = self.process.pid().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        match tokio::time::timeout(STOP_WAIT, self.process.child.wait()).await {
            Ok(status) => {
                let status = status.ok();
                (status, self.process.kill().await)
            }
            Err(_) => (None, self.process.kill().await),
        }
    }
}

/// Posts a `/mesh` slash command to `bot_url` exactly as Slack sends it (a
/// form body signed with `secret`, v0), from `user` in channel `C1`; its
/// answer is to go to `http://<answers>/commands/<n>`. Panics unless the bot
/// answers 200.
pub async fn slack_command(bot_url: &str, secret: &str, answers: SocketAddr, user: &str, text: &str, n: u32) {
    let body = serde_urlencoded::to_string([
        ("team_id", "T1"),
        ("channel_id", "C1"),
        ("user_id", user),
        ("command", "/mesh"),
        ("text", text),
        ("response_url", &format!("http://{answers}/commands/{n}")),
        ("trigger_id", &format!("trigger.{n}")),
    ])
    .expect("a form body");
    let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let response = reqwest::Client::new()
        .post(format!("{bot_url}/slack/commands"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", &ts)
        .header("x-slack-signature", mesh_bot::slack::verify::sign(secret, &ts, body.as_bytes()))
        .body(body)
        .send()
        .await
        .expect("the bot answers");
    assert_eq!(response.status().as_u16(), 200);
}
