//! The security pass end to end, against the real binaries and a real
//! nats-server: body limits on every router, subject syntax refused on every
//! input path, hostile raw payloads on every subject the services read, the
//! SSRF host allow-list, and a scan of everything the processes printed for
//! the secrets they were configured with.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_bot::slack::verify::sign;
use mesh_tests::bot::BotProcess;
use mesh_tests::fixtures::{Logged, listener_bin, mesh_command, wait_until_settled};
use mesh_tests::{Fixture, RecordingGateway, SecretScan, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const SIGNING_SECRET: &str = "sec-signing-secret-5f1e0a";
const BOT_TOKEN: &str = "xoxb-sec-bot-token-77aa10";
const NOVA_HOOK: &str = "sec-env-hook-token-91c0b3";
const KAAN_HOOK: &str = "sec-file-hook-token-3b7d55";
const NOVA_GATEWAY: &str = "sec-literal-gateway-token-c4e2";
const POST_MESSAGE: &str = "/api/chat.postMessage";

fn secrets() -> SecretScan {
    SecretScan::new(&[
        ("slack signing secret", SIGNING_SECRET),
        ("slack bot token", BOT_TOKEN),
        ("nova hook token (env:)", NOVA_HOOK),
        ("kaan hook token (file:)", KAAN_HOOK),
        ("nova gateway token (literal)", NOVA_GATEWAY),
    ])
}

/// nova: hook token from the environment, literal gateway token; kaan: hook token from a file.
fn registry(nova: &RecordingGateway, kaan: &RecordingGateway) -> Fixture {
    let fixture = Fixture::from_json(&serde_json::json!({}));
    let token_file = fixture.secret_file("kaan-hook", &format!("{KAAN_HOOK}\n"));
    let json = serde_json::json!({
        "nova": {"gateway": nova.addr.to_string(), "hooks_token": "env:MESH_TOKEN_NOVA_HOOK", "gateway_token": NOVA_GATEWAY,
                 "hooks_url": nova.hooks_url()},
        "kaan": {"hooks_token": format!("file:{}", token_file.display()), "hooks_url": kaan.hooks_url()},
    });
    std::fs::write(&fixture.registry, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    fixture
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn wait_live(http: &reqwest::Client, url: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http.get(format!("{url}/health/live")).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `mesh bot` binary with Slack configured against a local recorder, and
/// the `mesh-listener` binary for every agent, both logging at trace level.
struct Stack {
    bot: BotProcess,
    bot_url: String,
    listener: Logged,
    listener_url: String,
    slack: RecordingGateway,
    http: reqwest::Client,
}

impl Stack {
    async fn start(nats: &TestNats, fixture: &Fixture) -> Self {
        mesh_listener::gateway::install_tls_provider();
        // No pooled connections: a server closes a connection after refusing a body, and a
        // reused one would fail the next request for a reason that is not under test.
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let slack = RecordingGateway::start().await;
        slack.respond_with(
            POST_MESSAGE,
            serde_json::json!({"ok": true, "channel": "C1", "ts": "1700000000.000100",
                               "message": {"text": "posted", "ts": "1700000000.000100"}}),
        );
        let permissions = fixture.dir().join("permissions.json");
        std::fs::write(&permissions, serde_json::json!({"director": ["slack:UDIR"]}).to_string()).unwrap();
        let env = [
            ("MESH_PERMISSIONS", permissions.display().to_string()),
            ("SLACK_SIGNING_SECRET", SIGNING_SECRET.to_owned()),
            ("SLACK_BOT_TOKEN", BOT_TOKEN.to_owned()),
            ("SLACK_API_URL", format!("http://{}/api", slack.addr)),
            ("SLACK_RESPONSE_URL_PREFIX", format!("http://{}/", slack.addr)),
            ("SLACK_NOTIFY_CHANNEL", "CNOTIFY".to_owned()),
        ];
        let bot = BotProcess::start(&nats.url(), &fixture.registry, env).await;
        let bot_url = bot.url.clone();
        let make_listener = |port: u16| {
            let mut listener = tokio::process::Command::new(listener_bin());
            listener
                .arg("--all")
                .env("NATS_URL", nats.url())
                .env("MESH_REGISTRY", &fixture.registry)
                .env("MESH_TOKEN_NOVA_HOOK", NOVA_HOOK)
                .env("MESH_HTTP", format!("127.0.0.1:{port}"))
                .env("MESH_MAX_DELIVER", "2")
                .env("MESH_LOG", "trace");
            listener
        };
        let (listener, listener_port) =
            mesh_tests::ports::spawn_listening(make_listener, mesh_tests::ports::LISTENER_LISTENING).await;
        let listener_url = format!("http://127.0.0.1:{listener_port}");
        wait_live(&http, &listener_url, "mesh-listener").await;
        Self { bot, bot_url, listener, listener_url, slack, http }
    }

    /// Posts a correctly signed slash command; returns the status.
    async fn slash(&self, user: &str, text: &str, n: u32) -> u16 {
        let response_url = format!("http://{}/commands/{n}", self.slack.addr);
        let body = serde_urlencoded::to_string([
            ("user_id", user),
            ("channel_id", "C1"),
            ("command", "/mesh"),
            ("text", text),
            ("response_url", &response_url),
        ])
        .unwrap();
        let ts = now().to_string();
        let response = self
            .http
            .post(format!("{}/slack/commands", self.bot_url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", sign(SIGNING_SECRET, &ts, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }

    /// The follow-up the bot posted for slash command `n`.
    async fn follow_up(&self, n: u32) -> String {
        self.slack.wait_for_path(&format!("/commands/{n}"), 1, WAIT).await[0].body.to_string()
    }

    fn assert_running(&mut self) {
        self.bot.assert_running();
        assert!(self.listener.child.try_wait().unwrap().is_none(), "mesh-listener exited");
    }

    /// Both services still run; stopped, none of their output holds a secret.
    async fn finish_clean(mut self) {
        self.assert_running();
        let mut scan = secrets();
        self.stop(&mut scan).await;
        scan.assert_clean();
    }

    async fn stop(self, scan: &mut SecretScan) {
        let (_, bot) = self.bot.stop().await;
        let (_, listener) = self.listener.finish(true).await;
        scan.capture("mesh bot output", bot);
        scan.capture("mesh-listener output", listener);
        for recorded in self.slack.requests() {
            scan.capture("what the bot sent to Slack", recorded.body.to_string());
        }
    }
}

async fn mesh(nats: &TestNats, fixture: &Fixture, args: &[&str], scan: &mut SecretScan) -> std::process::Output {
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args(args)
        .env("MESH_TOKEN_NOVA_HOOK", NOVA_HOOK)
        .env("MESH_LOG", "trace")
        .output()
        .await
        .unwrap();
    scan.capture_output(&format!("mesh {}", args.join(" ")), &out);
    out
}

async fn messages_in(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.unwrap().state.messages,
        Err(_) => 0,
    }
}

#[tokio::test]
async fn every_router_refuses_oversize_bodies_with_413() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    let stack = Stack::start(&nats, &fixture).await;
    let big = vec![b'a'; mesh_bot::server::MAX_BODY_BYTES + 1];
    let status = |r: reqwest::Response| r.status().as_u16();
    let post = |url: String, body: Vec<u8>| stack.http.post(url).body(body).send();

    // The bot: the Slack endpoint and the health routes.
    assert_eq!(status(post(format!("{}/slack/commands", stack.bot_url), big.clone()).await.unwrap()), 413);
    let get_big = stack.http.get(format!("{}/health", stack.bot_url)).body(big.clone()).send().await.unwrap();
    assert_eq!(status(get_big), 413);
    // Just under the limit, a body is read (and refused for its missing signature, not its size).
    let small = vec![b'a'; mesh_bot::server::MAX_BODY_BYTES - 1];
    assert_eq!(status(post(format!("{}/slack/commands", stack.bot_url), small).await.unwrap()), 401);

    // The listener's health and metrics endpoints take no body at all.
    let big_listener = vec![b'a'; mesh_listener::http::MAX_BODY_BYTES + 1];
    for path in ["/health", "/metrics"] {
        let response =
            stack.http.get(format!("{}{path}", stack.listener_url)).body(big_listener.clone()).send().await.unwrap();
        assert_eq!(status(response), 413, "{path}");
    }
    assert_eq!(status(stack.http.get(format!("{}/health/live", stack.listener_url)).send().await.unwrap()), 200);

    // The demo gateway, like a real one, stops at about 256 KiB.
    let demo = mesh_bot::demo_gateway::serve(mesh_bot::demo_gateway::DemoGateway {
        agent: "demo".into(),
        hooks_token: "demo-hook".into(),
        gateway_token: "demo-gateway".into(),
    })
    .await
    .unwrap();
    let huge = vec![b'a'; mesh_bot::demo_gateway::MAX_BODY_BYTES + 1];
    let response = stack
        .http
        .post(format!("http://{demo}/hooks/wake"))
        .bearer_auth("demo-hook")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(status(response), 413);

    stack.finish_clean().await;
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_after_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    let stack = Stack::start(&nats, &fixture).await;
    let addr = stack.bot_url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Promise 1000 bytes, send 3, then stall: the handler must not wait forever.
    let head = "POST /slack/commands HTTP/1.1\r\nhost: bot\r\ncontent-length: 1000\r\n\r\nabc";
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(mesh_bot::server::REQUEST_TIMEOUT * 3, async {
        let mut buf = [0u8; 512];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await.unwrap() {
                0 => break,
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled body within three request timeouts");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= mesh_bot::server::REQUEST_TIMEOUT / 2, "answered before the timeout: {answer}");
    stack.finish_clean().await;
}

#[tokio::test]
async fn ids_with_subject_syntax_are_refused_on_every_input_path() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    let mut scan = secrets();
    let js = nats.jetstream().await;
    let hostile = ["nova.inbox", "*", ">", "agents.>", "nova inbox", "Nova", "növa", "nova\u{200b}", "$JS", ""];

    // The CLI: a clear error naming the id, nothing published.
    for id in hostile {
        let out = mesh(&nats, &fixture, &["send", id, "hello"], &mut scan).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mesh send {id:?} succeeded");
        assert!(stderr.contains("agent") || stderr.contains("id"), "{id:?}: {stderr}");
    }
    assert_eq!(messages_in(&js, "MESH_AGENTS").await, 0, "a hostile id reached the stream");

    // Slack command text: the parser refuses before anything is published.
    let mut stack = Stack::start(&nats, &fixture).await;
    for (n, id) in hostile.iter().enumerate().filter(|(_, id)| !id.is_empty() && !id.contains(' ')) {
        let n = n as u32;
        assert_eq!(stack.slash("UDIR", &format!("send {id} hello"), n).await, 200);
        let reply = stack.follow_up(n).await;
        assert!(reply.contains("agent id") || reply.contains("unknown agent"), "{id:?}: {reply}");
    }
    assert_eq!(messages_in(&js, "MESH_AGENTS").await, 0, "a hostile id reached the stream from Slack");
    stack.assert_running();
    stack.stop(&mut scan).await;

    // The registry: keys with subject syntax are refused by every loader, naming the key.
    for key in ["a.b", "*", ">", "a b", "Nova"] {
        let bad = Fixture::from_json(&serde_json::json!({
            key: {"hooks_token": "t-0123", "hooks_url": nova.hooks_url()},
        }));
        for args in [&["agents"][..], &["send", "nova", "hi"]] {
            let out = mesh(&nats, &bad, args, &mut scan).await;
            let shown = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success() && shown.contains(&format!("registry key {key:?}")), "{key:?}: {shown}");
        }
        let out = tokio::process::Command::new(listener_bin())
            .arg("--all")
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &bad.registry)
            .output()
            .await
            .unwrap();
        scan.capture_output("mesh-listener with a bad registry", &out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&format!("registry key {key:?}")), "{key:?}: {stderr}");
    }
    scan.assert_clean();
}

#[tokio::test]
async fn the_hooks_host_allow_list_is_enforced_by_every_loader() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    // The recording gateways listen on 127.0.0.1: allowing only another host refuses both agents.
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args(["send", "nova", "hi"])
        .env("MESH_TOKEN_NOVA_HOOK", NOVA_HOOK)
        .env("MESH_HOOKS_ALLOWED_HOSTS", "gateways.internal")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("agent \"nova\": field hooks_url: host \"127.0.0.1\" is not in MESH_HOOKS_ALLOWED_HOSTS"),
        "{stderr}"
    );
    assert!(stderr.contains("agent \"kaan\": field hooks_url"), "{stderr}");
    let out = tokio::process::Command::new(listener_bin())
        .arg("--all")
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("MESH_TOKEN_NOVA_HOOK", NOVA_HOOK)
        .env("MESH_HOOKS_ALLOWED_HOSTS", "gateways.internal")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is not in MESH_HOOKS_ALLOWED_HOSTS"), "{stderr}");
    // Allowed: the same registry loads and the message is delivered.
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args(["send", "nova", "hi"])
        .env("MESH_HOOKS_ALLOWED_HOSTS", "127.0.0.1")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A v1 envelope, valid but for a `reply_to` aimed at the JetStream API.
fn reply_to_injection() -> Vec<u8> {
    let to = mesh_protocol::Recipient::Agent(mesh_protocol::AgentId::parse("nova").unwrap());
    let envelope = mesh_protocol::Envelope::new("cli:mallory", to, "hi").unwrap();
    let mut json = serde_json::to_value(&envelope).unwrap();
    json["reply_to"] = "$JS.API.STREAM.DELETE.MESH_AGENTS".into();
    json["kind"] = "ask".into();
    serde_json::to_vec(&json).unwrap()
}

#[tokio::test]
async fn hostile_raw_payloads_on_every_subject_leave_the_services_answering() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    let mut scan = secrets();
    let mut stack = Stack::start(&nats, &fixture).await;
    let js = nats.jetstream().await;
    let client = nats.client().await;

    // Warm up: both listeners deliver, so their consumers exist.
    for agent in ["nova", "kaan"] {
        assert!(mesh(&nats, &fixture, &["send", agent, "warm up"], &mut scan).await.status.success());
    }
    nova.wait_for(1, WAIT).await;
    kaan.wait_for(1, WAIT).await;
    assert_eq!(nova.requests()[0].authorization.as_deref(), Some(format!("Bearer {NOVA_HOOK}").as_str()));
    assert_eq!(kaan.requests()[0].authorization.as_deref(), Some(format!("Bearer {KAAN_HOOK}").as_str()));

    let oversize = vec![b'x'; mesh_protocol::envelope::MAX_ENVELOPE_BYTES + 32 * 1024];
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0xa0]),
        ("empty", Vec::new()),
        ("over the envelope limit", oversize.clone()),
        ("deeply nested JSON", "{\"a\":".repeat(50_000).into_bytes()),
        ("wrong types", br#"{"v": 1, "id": 7, "from": ["x"], "to": {}, "text": null}"#.to_vec()),
        ("reply_to injection", reply_to_injection()),
    ];

    // Agent inbox and broadcast: every payload the stream accepts is dead-lettered, none is lost or delivered.
    for subject in ["agents.nova.inbox", "agents.broadcast"] {
        for (what, payload) in &hostile {
            js.publish(subject, payload.clone().into()).await.unwrap().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    // Over the stream's own size limit: refused at publish, never stored.
    let refused = js.publish("agents.nova.inbox", vec![b'x'; 400 * 1024].into()).await;
    let refused = match refused {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a 400 KiB message was stored");

    // Subjects the bot and listeners read besides their inboxes.
    for (what, payload) in &hostile {
        for subject in ["mesh.health.ping", "mesh.health.pong"] {
            client.publish(subject, payload.clone().into()).await.unwrap();
        }
        for subject in ["mesh.reply.0123abcd", "mesh.events.agent", "mesh.events.killswitch", "mesh.audit.slack"] {
            if let Ok(ack) = js.publish(subject, payload.clone().into()).await {
                let _ = ack.await;
            }
        }
        let _ = what;
    }
    client.flush().await.unwrap();

    // The hostile inbox messages end up as dead letters: 6 to nova's inbox,
    // 6 broadcasts for each of nova and kaan.
    let deadline = tokio::time::Instant::now() + WAIT;
    while messages_in(&js, "MESH_DLQ").await < 18 {
        assert!(tokio::time::Instant::now() < deadline, "{} of 18 dead letters", messages_in(&js, "MESH_DLQ").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until_settled(&js, "nova", WAIT).await;
    wait_until_settled(&js, "kaan", WAIT).await;
    assert_eq!(messages_in(&js, "MESH_DLQ").await, 18);
    assert_eq!(nova.requests().len(), 1, "no hostile payload reached nova's gateway");
    assert_eq!(kaan.requests().len(), 1, "no hostile payload reached kaan's gateway");

    // The kill switch bucket: undecodable entries pause (fail closed, logged), not a crash.
    let kv = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    for key in ["global", "agent.nova"] {
        kv.put(key, vec![0xff, 0x00, 0xfe].into()).await.unwrap();
        kv.put(key, "{\"mode\": \"hard\"".into()).await.unwrap();
    }

    // Everyone still answers: delivery, pings, and chat commands that read the abused streams.
    stack.assert_running();
    for kv_key in ["global", "agent.nova"] {
        kv.delete(kv_key).await.unwrap();
    }
    assert!(mesh(&nats, &fixture, &["send", "nova", "still here"], &mut scan).await.status.success());
    assert!(nova.wait_for(2, WAIT).await[1].text().contains("still here"));
    let ping = mesh(&nats, &fixture, &["ping"], &mut scan).await;
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));
    let checks = [
        ("status", "2 listeners answering"),
        ("dlq", "18 dead letters"),
        ("audit", "allowed   18 dead letters"),
        ("ping", "2 answered, 0 active agents missing"),
    ];
    for (n, (command, expected)) in checks.into_iter().enumerate() {
        let n = n as u32 + 100;
        assert_eq!(stack.slash("UDIR", command, n).await, 200, "{command}");
        let reply = stack.follow_up(n).await;
        assert!(reply.contains(expected), "{command}: {reply}");
    }
    let health = stack.http.get(format!("{}/health", stack.listener_url)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    stack.assert_running();
    stack.stop(&mut scan).await;
    scan.assert_clean();
}

#[tokio::test]
async fn no_configured_secret_appears_in_any_output_even_on_error_paths() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = registry(&nova, &kaan);
    let mut scan = secrets();
    let mut stack = Stack::start(&nats, &fixture).await;

    // Gateways that refuse the token and fail: the listener logs errors and dead-letters.
    nova.script([401, 503, 503]);
    for text in ["refused", "failing"] {
        assert!(mesh(&nats, &fixture, &["send", "nova", text], &mut scan).await.status.success());
    }
    nova.wait_for(3, WAIT).await;
    // Slack: a wrong signature, a stale one, and commands that fail.
    let body = "user_id=UDIR&text=status&response_url=http%3A%2F%2F127.0.0.1%3A1%2Fx";
    for (secret, ts) in [("not-the-secret", now()), (SIGNING_SECRET, now() - 3600)] {
        let response = stack
            .http
            .post(format!("{}/slack/commands", stack.bot_url))
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sign(secret, &ts.to_string(), body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401);
        scan.capture("the bot's 401 answer", response.text().await.unwrap());
    }
    assert_eq!(stack.slash("UDIR", "send nobody hi", 1).await, 200);
    scan.capture("follow-up", stack.follow_up(1).await);
    // The CLI on every read path, and on a registry it must refuse (same hook and gateway tokens).
    for args in [&["agents"][..], &["agents", "--json"], &["status"], &["dlq"], &["audit"]] {
        mesh(&nats, &fixture, args, &mut scan).await;
    }
    let same = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": NOVA_GATEWAY, "gateway_token": NOVA_GATEWAY, "hooks_url": nova.hooks_url()},
    }));
    let out = mesh(&nats, &same, &["send", "nova", "x"], &mut scan).await;
    assert!(!out.status.success(), "a registry with equal tokens was accepted");
    let unresolved = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "env:MESH_TOKEN_NOT_SET_ANYWHERE", "gateway_token": NOVA_GATEWAY, "hooks_url": nova.hooks_url()},
    }));
    let out = tokio::process::Command::new(listener_bin())
        .args(["--agent", "nova"])
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &unresolved.registry)
        .env("MESH_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    scan.capture_output("mesh-listener with an unresolvable token", &out);

    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    stack.assert_running();
    stack.stop(&mut scan).await;
    assert!(scan.captured_bytes() > 10_000, "trace logs were captured ({} bytes)", scan.captured_bytes());
    scan.assert_clean();
}

#[tokio::test]
async fn oversize_chat_replies_from_a_gateway_are_capped_and_the_listener_goes_on() {
    let nats = TestNats::start().await;
    let (ada, nova) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": {"gateway": ada.addr.to_string(), "gateway_token": "ada-gateway-token", "hooks_token": "ada-hook-token",
                "hooks_url": ada.hooks_url(), "delivery": "chat", "model": "test-model"},
        "nova": {"hooks_token": "nova-hook-token", "hooks_url": nova.hooks_url()},
    }));
    let js = nats.jetstream().await;
    mesh_listener::nats::ensure_consumer(&js, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    let listener =
        mesh_tests::ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));
    let ask = |text: &'static str| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command.args(["send", "ada", text]).env("MESH_FROM", "nova");
        async move { assert!(command.output().await.unwrap().status.success()) }
    };

    // 300 KiB of reply text: routed to nova, cut to half the text limit.
    ada.set_chat_reply(&"é".repeat(150 * 1024));
    ask("long answer please").await;
    let got = nova.wait_for(1, WAIT).await;
    assert!(got[0].text().ends_with("… [truncated]"), "{}", &got[0].text()[..80]);
    assert!(got[0].text().len() <= mesh_protocol::envelope::MAX_TEXT_BYTES, "{}", got[0].text().len());

    // 3 MiB: more than the listener reads from a gateway. A reply cut at the
    // read cap is no reply: the message is dead-lettered with the reason (not
    // acked with the reply silently dropped), the gateway is not asked again,
    // nothing crashes.
    ada.set_chat_reply(&"x".repeat(3 * 1024 * 1024));
    ask("flood me").await;
    let dlq = js.get_stream("MESH_DLQ").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while dlq.get_raw_message(1).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the capped reply was not dead-lettered");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let dead = dlq.get_raw_message(1).await.unwrap();
    let reason = dead.headers.get(mesh_protocol::dead_letter::REASON_HEADER).map(|v| v.as_str().to_owned());
    assert_eq!(
        reason.as_deref(),
        Some("the gateway's answer is larger than the 1 MiB the listener reads; not retried"),
        "{:?}",
        dead.headers
    );
    wait_until_settled(&js, "ada", WAIT).await;
    assert_eq!(ada.requests().len(), 2, "the capped reply is not asked for again");

    // And the listener goes on delivering.
    ada.set_chat_reply("short");
    ask("still there?").await;
    let got = nova.wait_for(2, WAIT).await;
    assert_eq!(got.last().unwrap().text(), "[mesh] Reply from ada: short");
    assert_eq!(nova.requests().len(), 2, "the capped 3 MiB reply was not routed");
    listener.stop().await.unwrap();
}

/// Issue 19.3: a registry editor cannot point a token at the mesh's own
/// secrets and have the listener send it to a gateway: `env:` names only
/// `MESH_TOKEN_*` variables, `file:` only files in a secrets directory.
#[tokio::test]
async fn a_token_reference_cannot_reach_the_meshs_own_secrets() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let listener = |fixture: &Fixture, env: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(listener_bin());
        command.args(["--agent", "nova"]).env("NATS_URL", nats.url()).env("MESH_REGISTRY", &fixture.registry);
        for (k, v) in env {
            command.env(k, v);
        }
        // A listener that accepted the reference would run on: bounded, it fails here.
        command.kill_on_drop(true);
        async move { tokio::time::timeout(WAIT, command.output()).await.expect("the listener accepted the reference") }
    };

    // env: the admin's NATS password, set in the listener's environment.
    let env_ref = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "env:MESH_ADMIN_NATS_PASSWORD", "hooks_url": gw.hooks_url()},
    }));
    let out = listener(&env_ref, &[("MESH_ADMIN_NATS_PASSWORD", "admin-pw-7f3a")]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the listener ran with env:MESH_ADMIN_NATS_PASSWORD");
    assert!(stderr.contains("not a token variable") && stderr.contains("MESH_TOKEN_"), "{stderr}");
    let out = mesh_command(&nats.url(), &env_ref.registry)
        .args(["deploy", "render", "--out", env_ref.dir().join("generated").to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "deploy render passed the admin password to a listener");

    // file: a file beside the registry but outside its secrets directory.
    let file_ref = Fixture::from_json(&serde_json::json!({}));
    let outside = file_ref.dir().join("nats-password");
    std::fs::write(&outside, "admin-pw-7f3a\n").unwrap();
    let json = serde_json::json!({"nova": {"hooks_token": format!("file:{}", outside.display()), "hooks_url": gw.hooks_url()}});
    std::fs::write(&file_ref.registry, json.to_string()).unwrap();
    let out = listener(&file_ref, &[]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the listener ran with a token file outside the secrets directory");
    assert!(stderr.contains("outside the secrets directories"), "{stderr}");
    assert!(!stderr.contains("admin-pw-7f3a"), "the secret leaked into the error");
    assert!(gw.requests().is_empty(), "the gateway was called");
}
