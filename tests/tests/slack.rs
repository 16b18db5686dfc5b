//! The Slack front end end to end: the `mesh bot` binary serves signed slash
//! commands against a real nats-server and recording gateways; Slack's side
//! (`response_url`, `chat.postMessage`) is a local recorder.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::process::Stdio;
use std::time::Duration;

use mesh_bot::slack::verify::sign;
use mesh_tests::fixtures::{mesh_bin, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-signing-secret-0123456789";
const BOT_TOKEN: &str = "xoxb-test-bot-token-0123456789";
const POST_MESSAGE: &str = "/api/chat.postMessage";

struct Bot {
    child: tokio::process::Child,
    output: tokio::task::JoinHandle<String>,
    url: String,
    slack: RecordingGateway,
    http: reqwest::Client,
}

impl Bot {
    async fn start(nats: &TestNats, fixture: &Fixture) -> Self {
        Self::start_with(nats, fixture, &[]).await
    }

    async fn start_with(nats: &TestNats, fixture: &Fixture, extra_env: &[(&str, &str)]) -> Self {
        let slack = RecordingGateway::start().await;
        slack.respond_with(
            POST_MESSAGE,
            serde_json::json!({"ok": true, "channel": "C1", "ts": "1700000000.000100",
                               "message": {"text": "posted", "ts": "1700000000.000100"}}),
        );
        let permissions = fixture.dir().join("permissions.json");
        std::fs::write(
            &permissions,
            serde_json::json!({"operator": ["slack:UOPS"], "admin": ["slack:UADMIN"]}).to_string(),
        )
        .unwrap();
        let port = mesh_bot::local_nats::free_port().unwrap();
        let child = tokio::process::Command::new(mesh_bin())
            .args(["bot", "--addr", &format!("127.0.0.1:{port}")])
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_PERMISSIONS", &permissions)
            .env("SLACK_SIGNING_SECRET", SECRET)
            .env("SLACK_BOT_TOKEN", BOT_TOKEN)
            .env("SLACK_API_URL", format!("http://{}/api", slack.addr))
            .env("SLACK_RESPONSE_URL_PREFIX", format!("http://{}/", slack.addr))
            .env("MESH_LOG", "trace")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mesh bot");
        let mut child = child;
        // Drain the logs as they come: a full pipe would block the bot.
        let mut stderr = child.stderr.take().expect("stderr");
        let output = tokio::spawn(async move {
            let mut logs = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut logs).await;
            logs
        });
        mesh_listener::gateway::install_tls_provider();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        while http.get(format!("{url}/health/live")).send().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "mesh bot did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, output, url, slack, http }
    }

    fn form(&self, user: &str, text: &str, n: u32) -> String {
        let response_url = format!("http://{}/commands/T1/{n}/abc", self.slack.addr);
        serde_urlencoded::to_string([
            ("token", "legacy"),
            ("team_id", "T1"),
            ("channel_id", "C1"),
            ("user_id", user),
            ("command", "/mesh"),
            ("text", text),
            ("response_url", &response_url),
            ("trigger_id", "1.2.3"),
        ])
        .unwrap()
    }

    async fn post(&self, body: &str, timestamp: i64, secret: &str) -> (u16, serde_json::Value) {
        let signature = sign(secret, &timestamp.to_string(), body.as_bytes());
        self.post_signed(body, timestamp, &signature).await
    }

    async fn post_signed(&self, body: &str, timestamp: i64, signature: &str) -> (u16, serde_json::Value) {
        let ts = timestamp.to_string();
        let response = self
            .http
            .post(format!("{}/slack/commands", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .expect("bot answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(serde_json::Value::Null))
    }

    async fn command(&self, user: &str, text: &str, n: u32) -> (u16, serde_json::Value) {
        self.post(&self.form(user, text, n), now(), SECRET).await
    }

    async fn logs(mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.output.await.expect("log reader")
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn follow_up_text(recorded: &mesh_tests::Recorded) -> String {
    recorded.body.to_string()
}

#[tokio::test]
async fn signed_slash_commands_run_once_and_answer_on_response_url() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let bot = Bot::start(&nats, &fixture).await;

    // Valid: answered at once, result on response_url, message delivered intact.
    let text = "send nova deploy <!channel> \"now\" — שלום";
    let body = bot.form("UOPS", text, 1);
    let ts = now();
    let (status, first) = bot.post(&body, ts, SECRET).await;
    assert_eq!(status, 200);
    assert_eq!(first["response_type"], "ephemeral");
    assert!(first["text"].as_str().unwrap().starts_with("working on"), "{first}");
    let follow = bot.slack.wait_for_path("/commands/T1/1/abc", 1, WAIT).await;
    assert!(follow_up_text(&follow[0]).contains("sent to nova"), "{}", follow_up_text(&follow[0]));
    let got = nova.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Message from slack:UOPS: deploy <!channel> \"now\" — שלום");

    // The same signed request again (a replay or a platform retry) runs once.
    let (status, again) = bot.post(&body, ts, SECRET).await;
    assert_eq!(status, 200);
    assert!(again["text"].as_str().unwrap().contains("duplicate"), "{again}");

    // Tampered body, wrong secret, stale timestamp: 401 and nothing runs.
    let signature = sign(SECRET, &ts.to_string(), body.as_bytes());
    let tampered = body.replace("deploy", "destroy");
    assert_eq!(bot.post_signed(&tampered, ts, &signature).await.0, 401);
    assert_eq!(bot.post(&bot.form("UOPS", "send nova x", 2), now(), "wrong-secret").await.0, 401);
    assert_eq!(bot.post(&bot.form("UOPS", "send nova y", 3), now() - 6 * 60, SECRET).await.0, 401);

    // A user without a role is told which role is needed.
    let (status, _) = bot.command("UNOBODY", "send nova hi", 4).await;
    assert_eq!(status, 200);
    let denied = bot.slack.wait_for_path("/commands/T1/4/abc", 1, WAIT).await;
    assert!(follow_up_text(&denied[0]).contains("operator"), "{}", follow_up_text(&denied[0]));

    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 1, "only the valid, first request reached the agent");

    // Every command is in the audit trail, denials included.
    let audit = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(["audit", "10", "--json"])
        .output()
        .await
        .unwrap();
    let audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let rows = audit["sections"][0]["rows"].as_array().unwrap().clone();
    let find = |who: &str| rows.iter().find(|r| r[1] == who).cloned().unwrap_or_default();
    assert_eq!(find("slack:UOPS")[3], "allowed", "{rows:?}");
    assert_eq!(find("slack:UNOBODY")[3], "denied", "{rows:?}");
    assert_eq!(find("slack:UNOBODY")[2], "send nova hi", "{rows:?}");
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(logs.contains("slack request rejected"), "trace logs were captured");
    for secret in [SECRET, BOT_TOKEN, "nova-hook-token"] {
        assert!(!logs.contains(secret), "a secret leaked into the bot's logs");
    }
}

#[tokio::test]
async fn ask_posts_the_agent_reply_in_the_thread() {
    let nats = TestNats::start().await;
    let ada = RecordingGateway::start().await;
    ada.set_chat_reply("4, and <b>bold</b> & more");
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": {"gateway": ada.addr.to_string(), "gateway_token": "ada-gateway-token", "hooks_token": "ada-hook-token",
                "hooks_url": ada.hooks_url(), "delivery": "chat", "model": "m"},
    }));
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));
    let bot = Bot::start(&nats, &fixture).await;
    let (status, _) = bot.command("UOPS", "ask ada 2+2?", 1).await;
    assert_eq!(status, 200);
    let posts = bot.slack.wait_for_path(POST_MESSAGE, 2, WAIT).await;
    assert_eq!(posts[0].authorization.as_deref(), Some(format!("Bearer {BOT_TOKEN}").as_str()));
    assert_eq!(posts[0].body["channel"], "C1");
    assert!(posts[0].body["thread_ts"].is_null());
    assert!(posts[0].body.to_string().contains("asked ada"), "{}", posts[0].body);
    assert_eq!(posts[1].body["thread_ts"], "1700000000.000100", "the reply goes in the ask's thread");
    let reply = posts[1].body.to_string();
    assert!(reply.contains("4, and &lt;b&gt;bold&lt;/b&gt; &amp; more"), "agent text is escaped: {reply}");
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(!logs.contains(BOT_TOKEN) && !logs.contains(SECRET));
}

#[tokio::test]
async fn events_are_relayed_to_the_notify_channel_coalesced() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start_with(&nats, &fixture, &[("SLACK_NOTIFY_CHANNEL", "CNOTIFY")]).await;
    // The relay follows events from when it started; wait until it is subscribed.
    let js = nats.jetstream().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = js.get_stream("MESH_EVENTS").await.unwrap();
        if stream.get_info().await.unwrap().state.consumer_count > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switch = mesh_bot::killswitch::KillSwitch::open(&js).await.unwrap();
    // A burst of six changes within a second.
    for _ in 0..3 {
        switch
            .pull(
                &mesh_protocol::killswitch::Scope::Global,
                mesh_protocol::killswitch::Mode::Soft,
                None,
                "slack:UADMIN",
                Some("drill".into()),
            )
            .await
            .unwrap();
        switch.release(&mesh_protocol::killswitch::Scope::Global, "slack:UADMIN").await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let (posts, lines) = loop {
        let posts = bot.slack.requests_to(POST_MESSAGE);
        let lines = posts.iter().map(|p| p.body["blocks"].to_string().matches("kill switch").count()).sum::<usize>();
        if lines >= 6 {
            break (posts, lines);
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines} of 6 events relayed: {posts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(posts.iter().all(|p| p.body["channel"] == "CNOTIFY"));
    assert!(posts.len() <= 2, "six events in a burst were coalesced into {} posts", posts.len());
    assert!(posts[0].body.to_string().contains("SOFT pause by slack:UADMIN"), "{}", posts[0].body);
    assert_eq!(lines, 6);
    drop(bot.logs().await);
}
