//! The Slack front end end to end: the `mesh bot` binary serves signed slash
//! commands against a real nats-server and recording gateways; Slack's side
//! (`response_url`, `chat.postMessage`) is a local recorder.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_bot::slack::verify::sign;
use mesh_tests::bot::BotProcess;
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-signing-secret-0123456789";
const BOT_TOKEN: &str = "xoxb-test-bot-token-0123456789";
const POST_MESSAGE: &str = "/api/chat.postMessage";

struct Bot {
    process: BotProcess,
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
        let env = [
            ("MESH_PERMISSIONS", permissions.display().to_string()),
            ("SLACK_SIGNING_SECRET", SECRET.to_owned()),
            ("SLACK_BOT_TOKEN", BOT_TOKEN.to_owned()),
            ("SLACK_API_URL", format!("http://{}/api", slack.addr)),
            ("SLACK_RESPONSE_URL_PREFIX", format!("http://{}/", slack.addr)),
        ];
        let extra = extra_env.iter().map(|(k, v)| (*k, (*v).to_owned()));
        let process = BotProcess::start(&nats.url(), &fixture.registry, env.into_iter().chain(extra)).await;
        let url = process.url.clone();
        Self { process, url, slack, http: reqwest::Client::new() }
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

    async fn logs(self) -> String {
        self.process.stop().await.1
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
                mesh_bot::killswitch::Actor::director("slack:UADMIN"),
                Some("drill".into()),
            )
            .await
            .unwrap();
        switch
            .release(&mesh_protocol::killswitch::Scope::Global, mesh_bot::killswitch::Actor::director("slack:UADMIN"))
            .await
            .unwrap();
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

/// Slack's Socket Mode side: `apps.connections.open` hands out a WebSocket
/// URL on the same server, numbered by the call (1, 2, ...); each connection
/// the bot opens is passed to the test with that number.
struct SocketSlack {
    addr: std::net::SocketAddr,
    connections: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(usize, axum::extract::ws::WebSocket)>>,
    open_authorization: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SocketSlack {
    async fn start() -> Self {
        use axum::extract::ws::{WebSocket, WebSocketUpgrade};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, WebSocket)>();
        let open_authorization = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = open_authorization.clone();
        let app = axum::Router::new()
            .route(
                "/api/apps.connections.open",
                axum::routing::post(move |headers: axum::http::HeaderMap| async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(auth.to_owned());
                        seen.len()
                    };
                    axum::Json(serde_json::json!({"ok": true, "url": format!("ws://{addr}/socket/{n}")}))
                }),
            )
            .route(
                "/socket/{n}",
                axum::routing::get(
                    move |axum::extract::Path(n): axum::extract::Path<usize>, upgrade: WebSocketUpgrade| async move {
                        upgrade.on_upgrade(move |socket| async move {
                            let _ = tx.send((n, socket));
                        })
                    },
                ),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, connections: tokio::sync::Mutex::new(rx), open_authorization }
    }

    /// The next connection the bot opens, greeted with Slack's `hello`.
    async fn accept(&self) -> axum::extract::ws::WebSocket {
        self.accept_numbered().await.1
    }

    /// The next connection the bot opens and keeps, greeted with Slack's `hello`
    /// and answering a ping, with the number of the `apps.connections.open` call
    /// that named it. Connections closed by then (a process that exited) are passed over.
    async fn accept_numbered(&self) -> (usize, axum::extract::ws::WebSocket) {
        use axum::extract::ws::Message;
        let mut connections = self.connections.lock().await;
        loop {
            let (n, mut socket) = tokio::time::timeout(WAIT, connections.recv())
                .await
                .expect("the bot opens a socket mode connection")
                .unwrap();
            let hello = serde_json::json!({"type": "hello", "num_connections": 1,
                "connection_info": {"app_id": "A1"}, "debug_info": {"host": "test"}});
            let greeted = socket.send(Message::Text(hello.to_string().into())).await.is_ok()
                && socket.send(Message::Ping(b"alive?".to_vec().into())).await.is_ok();
            let answered = greeted
                && loop {
                    match tokio::time::timeout(WAIT, socket.recv()).await.expect("an answer to the ping in time") {
                        Some(Ok(Message::Pong(_))) => break true,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => break false,
                    }
                };
            if answered {
                return (n, socket);
            }
        }
    }

    /// How many times `apps.connections.open` was called.
    fn opened(&self) -> usize {
        self.open_authorization.lock().unwrap().len()
    }
}

/// Sends a slash command envelope and returns the acknowledgement frame.
async fn socket_command(
    socket: &mut axum::extract::ws::WebSocket,
    envelope_id: &str,
    trigger_id: &str,
    user: &str,
    text: &str,
    response_url: &str,
) -> serde_json::Value {
    let envelope = serde_json::json!({
        "type": "slash_commands", "envelope_id": envelope_id, "accepts_response_payload": true,
        "payload": {"team_id": "T1", "channel_id": "C1", "user_id": user, "command": "/mesh", "text": text,
                    "response_url": response_url, "trigger_id": trigger_id},
    });
    socket.send(axum::extract::ws::Message::Text(envelope.to_string().into())).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.recv()).await.expect("acknowledged in time");
        if let Some(Ok(axum::extract::ws::Message::Text(text))) = frame {
            let ack: serde_json::Value = serde_json::from_str(&text).unwrap();
            if ack["envelope_id"] == envelope_id {
                return ack;
            }
        }
    }
}

#[tokio::test]
async fn socket_mode_commands_are_acknowledged_answered_and_run_once() {
    const APP_TOKEN: &str = "xapp-1-test-app-token-0123456789";
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let slack = SocketSlack::start().await;
    let api_url = format!("http://{}/api", slack.addr);
    // Socket Mode alone: no signing secret, so no HTTP slash commands.
    let bot = Bot::start_with(
        &nats,
        &fixture,
        &[("SLACK_SIGNING_SECRET", ""), ("SLACK_APP_TOKEN", APP_TOKEN), ("SLACK_API_URL", &api_url)],
    )
    .await;
    let mut socket = slack.accept().await;
    assert_eq!(slack.open_authorization.lock().unwrap()[0], format!("Bearer {APP_TOKEN}"));
    let response_url = |n: u32| format!("http://{}/commands/T1/{n}/abc", bot.slack.addr);

    // The envelope is acknowledged with the ephemeral "working" answer; the result follows on response_url.
    let text = "send nova over the socket <!channel> — שלום";
    let ack = socket_command(&mut socket, "env-1", "trigger-1", "UOPS", text, &response_url(1)).await;
    assert_eq!(ack["payload"]["response_type"], "ephemeral", "{ack}");
    assert!(ack["payload"]["text"].as_str().unwrap().starts_with("working on"), "{ack}");
    let follow = bot.slack.wait_for_path("/commands/T1/1/abc", 1, WAIT).await;
    assert!(follow_up_text(&follow[0]).contains("sent to nova"), "{}", follow_up_text(&follow[0]));

    // Slack redelivers the same command (same trigger_id) in a new envelope: it runs once.
    let again = socket_command(&mut socket, "env-2", "trigger-1", "UOPS", text, &response_url(1)).await;
    assert!(again["payload"]["text"].as_str().unwrap().contains("duplicate"), "{again}");
    // A response_url outside Slack's prefix is refused.
    let foreign = socket_command(&mut socket, "env-3", "trigger-3", "UOPS", "send nova x", "http://evil.test/x").await;
    assert!(foreign["payload"]["text"].as_str().unwrap().contains("not a Slack URL"), "{foreign}");
    // Another command: had the retry or the foreign one run, it would reach nova before this one.
    socket_command(&mut socket, "env-4", "trigger-4", "UOPS", "send nova second", &response_url(4)).await;
    let got = nova.wait_for(2, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Message from slack:UOPS: over the socket <!channel> — שלום");
    assert_eq!(got[1].text(), "[mesh] Message from slack:UOPS: second");

    // Without a signing secret the HTTP endpoint is not served.
    assert_eq!(bot.command("UOPS", "send nova http", 5).await.0, 404);
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(logs.contains("slack socket mode"), "trace logs were captured");
    for secret in [APP_TOKEN, BOT_TOKEN, "nova-hook-token"] {
        assert!(!logs.contains(secret), "a secret leaked into the bot's logs");
    }
}

/// Sends a Socket Mode `interactive` envelope: a `block_actions` click on
/// `action_id` by `user`, answered on `response_url`; returns the acknowledgement frame.
async fn socket_click(
    socket: &mut axum::extract::ws::WebSocket,
    envelope_id: &str,
    trigger_id: &str,
    user: &str,
    action_id: &str,
    response_url: &str,
) -> serde_json::Value {
    let payload = serde_json::json!({
        "type": "block_actions",
        "user": {"id": user, "username": user.to_lowercase(), "team_id": "T1"},
        "api_app_id": "A1",
        "team": {"id": "T1", "domain": "mesh"},
        "container": {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C1", "is_ephemeral": false},
        "trigger_id": trigger_id,
        "channel": {"id": "C1", "name": "ops"},
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action_id, "block_id": "mesh_actions", "value": action_id,
                     "text": {"type": "plain_text", "text": "Confirm"}, "action_ts": "1700000001.000200"}],
    });
    let envelope = serde_json::json!({"type": "interactive", "envelope_id": envelope_id,
                                      "accepts_response_payload": false, "payload": payload});
    socket.send(axum::extract::ws::Message::Text(envelope.to_string().into())).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.recv()).await.expect("acknowledged in time");
        if let Some(Ok(axum::extract::ws::Message::Text(text))) = frame {
            let ack: serde_json::Value = serde_json::from_str(&text).unwrap();
            if ack["envelope_id"] == envelope_id {
                return ack;
            }
        }
    }
}

/// The `action_id` of the button labelled `label` in a rendered message.
fn action_id(message: &serde_json::Value, label: &str) -> String {
    let blocks = message["blocks"].as_array().cloned().unwrap_or_default();
    let elements = blocks.iter().filter(|b| b["type"] == "actions").flat_map(|b| b["elements"].as_array().unwrap());
    let found = elements.into_iter().find(|e| e["text"]["text"] == label);
    found.and_then(|e| e["action_id"].as_str()).unwrap_or_else(|| panic!("no {label} button in {message}")).to_owned()
}

#[tokio::test]
async fn socket_mode_clicks_are_acknowledged_run_once_and_update_the_message() {
    const APP_TOKEN: &str = "xapp-1-test-app-token-0123456789";
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let slack = SocketSlack::start().await;
    let api_url = format!("http://{}/api", slack.addr);
    let permissions = fixture.dir().join("directors.json");
    let grants = serde_json::json!({"operator": ["slack:UOPS"], "director": ["slack:UDIR"]});
    std::fs::write(&permissions, grants.to_string()).unwrap();
    let project = format!("socket-click-{}", fastrand::u32(..));
    let bot = Bot::start_with(
        &nats,
        &fixture,
        &[
            ("SLACK_SIGNING_SECRET", ""),
            ("SLACK_APP_TOKEN", APP_TOKEN),
            ("SLACK_API_URL", &api_url),
            ("MESH_PERMISSIONS", &permissions.display().to_string()),
            // Docker is not this test's business.
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
            ("MESH_COMPOSE_PROJECT", &project),
        ],
    )
    .await;
    let mut socket = slack.accept().await;
    let url = |path: &str| format!("http://{}/{path}", bot.slack.addr);

    // A director's `kill hard` over the socket answers with Confirm and Cancel.
    socket_command(&mut socket, "env-1", "trigger-1", "UDIR", "kill hard agent=nova", &url("commands/T1/1/abc")).await;
    let prompt = bot.slack.wait_for_path("/commands/T1/1/abc", 1, WAIT).await[0].body.clone();
    let confirm = action_id(&prompt, "Confirm");
    assert!(confirm.starts_with("mesh:confirm:"), "{confirm}");

    // An operator's click is acknowledged, refused, and changes nothing.
    let ack = socket_click(&mut socket, "env-2", "click-ops", "UOPS", &confirm, &url("actions/ops")).await;
    assert_eq!(ack["envelope_id"], "env-2");
    let refused = bot.slack.wait_for_path("/actions/ops", 1, WAIT).await;
    assert_eq!(refused[0].body["replace_original"], false, "{}", refused[0].body);
    assert!(refused[0].body.to_string().contains("admin role"), "{}", refused[0].body);

    // The director's click is acknowledged at once; the message then says who confirmed, without buttons.
    let ack = socket_click(&mut socket, "env-3", "click-dir", "UDIR", &confirm, &url("actions/dir")).await;
    assert_eq!(ack["envelope_id"], "env-3");
    let update = bot.slack.wait_for_path("/actions/dir", 1, WAIT).await[0].body.clone();
    assert_eq!(update["replace_original"], true, "{update}");
    assert!(update.to_string().contains("confirmed by slack:UDIR"), "{update}");
    assert!(!update.to_string().contains("mesh:confirm:"), "the buttons are gone: {update}");
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    let key = mesh_protocol::killswitch::Scope::Agent(mesh_protocol::AgentId::parse("nova").unwrap()).key();
    let state = mesh_protocol::killswitch::KillState::decode(&bucket.get(key).await.unwrap().unwrap()).unwrap();
    assert_eq!(state.mode, mesh_protocol::killswitch::Mode::Hard);

    // Slack redelivers the click (same trigger_id) in a new envelope: acknowledged, run once.
    let again = socket_click(&mut socket, "env-4", "click-dir", "UDIR", &confirm, &url("actions/dir")).await;
    assert_eq!(again["envelope_id"], "env-4");
    // A later click: had the redelivery run, its "unknown code" answer would come first.
    socket_command(&mut socket, "env-5", "trigger-5", "UDIR", "kill hard", &url("commands/T1/5/abc")).await;
    let prompt = bot.slack.wait_for_path("/commands/T1/5/abc", 1, WAIT).await[0].body.clone();
    let cancel = action_id(&prompt, "Cancel");
    socket_click(&mut socket, "env-6", "click-cancel", "UDIR", &cancel, &url("actions/cancel")).await;
    let cancelled = bot.slack.wait_for_path("/actions/cancel", 1, WAIT).await;
    assert!(cancelled[0].body.to_string().contains("cancelled by slack:UDIR"), "{}", cancelled[0].body);
    assert_eq!(bot.slack.requests_to("/actions/dir").len(), 1, "the redelivered click ran again");
    let logs = bot.logs().await;
    assert!(logs.contains("duplicate slack click ignored"), "the redelivery was seen as one");
    for secret in [APP_TOKEN, BOT_TOKEN] {
        assert!(!logs.contains(secret), "a secret leaked into the bot's logs");
    }
}

/// Waits until the bot closes `socket` (a close frame or the end of the stream).
async fn closed_by_the_bot(socket: &mut axum::extract::ws::WebSocket) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await.expect("the bot closes the old connection") {
            Some(Ok(axum::extract::ws::Message::Close(_)) | Err(_)) | None => return,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn socket_mode_reconnects_after_a_disconnect_and_a_dropped_connection_and_runs_commands_once() {
    const APP_TOKEN: &str = "xapp-1-test-app-token-0123456789";
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let slack = SocketSlack::start().await;
    let api_url = format!("http://{}/api", slack.addr);
    let bot = Bot::start_with(
        &nats,
        &fixture,
        &[("SLACK_SIGNING_SECRET", ""), ("SLACK_APP_TOKEN", APP_TOKEN), ("SLACK_API_URL", &api_url)],
    )
    .await;
    let response_url = |n: u32| format!("http://{}/commands/T1/{n}/abc", bot.slack.addr);
    let recorder = &bot.slack;
    let ran = |n: u32| {
        let path = format!("/commands/T1/{n}/abc");
        async move { recorder.wait_for_path(&path, 1, WAIT).await }
    };
    // The client keeps two connections (the second a few seconds after the first).
    let (first, mut a) = slack.accept_numbered().await;
    let (second, mut b) = slack.accept_numbered().await;
    assert_eq!((first, second), (1, 2));

    let ack = socket_command(&mut a, "env-1", "trigger-1", "UOPS", "send nova one", &response_url(1)).await;
    assert!(ack["payload"]["text"].as_str().unwrap().starts_with("working on"), "{ack}");
    assert!(follow_up_text(&ran(1).await[0]).contains("sent to nova"));

    // Slack asks the client to reconnect: it opens a new connection and closes the old one.
    let disconnect = serde_json::json!({"type": "disconnect", "reason": "refresh_requested",
                                        "debug_info": {"host": "test"}});
    a.send(axum::extract::ws::Message::Text(disconnect.to_string().into())).await.unwrap();
    let (third, mut c) = slack.accept_numbered().await;
    assert_eq!(third, 3, "apps.connections.open was called again");
    closed_by_the_bot(&mut a).await;
    let ack = socket_command(&mut c, "env-2", "trigger-2", "UOPS", "send nova two", &response_url(2)).await;
    assert!(ack["payload"]["text"].as_str().unwrap().starts_with("working on"), "{ack}");
    ran(2).await;
    // The first command, redelivered on the other connection (Slack retries unacknowledged envelopes): runs once.
    let again = socket_command(&mut b, "env-1", "trigger-1", "UOPS", "send nova one", &response_url(1)).await;
    assert!(again["payload"]["text"].as_str().unwrap().contains("duplicate"), "{again}");

    // The connection drops without a close frame: the client opens another.
    drop(c);
    let (fourth, mut d) = slack.accept_numbered().await;
    assert_eq!(fourth, 4, "apps.connections.open was called again");
    let ack = socket_command(&mut d, "env-3", "trigger-3", "UOPS", "send nova three", &response_url(3)).await;
    assert!(ack["payload"]["text"].as_str().unwrap().starts_with("working on"), "{ack}");
    ran(3).await;

    // Each command ran once, in order; every connection was opened with the app token.
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    let got: Vec<String> = nova.requests().iter().map(|r| r.text().to_owned()).collect();
    let from = |text: &str| format!("[mesh] Message from slack:UOPS: {text}");
    assert_eq!(got, [from("one"), from("two"), from("three")]);
    assert_eq!(bot.slack.requests_to("/commands/T1/1/abc").len(), 1, "one answer to the first command");
    assert_eq!(slack.opened(), 4, "no connection was opened but the two replacements");
    assert!(slack.open_authorization.lock().unwrap().iter().all(|a| *a == format!("Bearer {APP_TOKEN}")));
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    for secret in [APP_TOKEN, BOT_TOKEN, "nova-hook-token"] {
        assert!(!logs.contains(secret), "a secret leaked into the bot's logs");
    }
}

/// Waits until the bot's notifications relay follows the events stream.
async fn relay_following(bot: &Bot) {
    bot.process.wait_for_output("notifications relay following events", WAIT).await.unwrap();
}

async fn broadcast(nats: &TestNats, fixture: &Fixture, text: &str) {
    let sent = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(["broadcast", text])
        .output()
        .await
        .unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
}

#[tokio::test]
async fn a_rate_limited_notification_is_posted_after_retry_after() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start_with(&nats, &fixture, &[("SLACK_NOTIFY_CHANNEL", "CNOTIFY")]).await;
    relay_following(&bot).await;
    bot.slack.set_retry_after(2);
    bot.slack.script([429]);
    broadcast(&nats, &fixture, "maintenance tonight").await;
    let posts = bot.slack.wait_for_path(POST_MESSAGE, 2, WAIT).await;
    assert_eq!((posts[0].status, posts[1].status), (429, 200));
    let waited = posts[1].at - posts[0].at;
    assert!(waited >= Duration::from_secs(2), "Retry-After: 2 was waited out ({waited:?})");
    assert_eq!(posts[0].body, posts[1].body, "the same notification, posted again");
    let text = posts[1].body["text"].as_str().unwrap();
    assert!(text.contains("maintenance tonight") && text.starts_with("broadcast from"), "fallback text: {text}");
    drop(bot.logs().await);
}

#[tokio::test]
async fn events_while_the_bot_is_down_are_posted_once_it_starts() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let env = [("SLACK_NOTIFY_CHANNEL", "CNOTIFY")];
    let bot = Bot::start_with(&nats, &fixture, &env).await;
    relay_following(&bot).await;
    drop(bot.logs().await);
    broadcast(&nats, &fixture, "while the bot restarts").await;
    let bot = Bot::start_with(&nats, &fixture, &env).await;
    let posts = bot.slack.wait_for_path(POST_MESSAGE, 1, WAIT).await;
    assert!(posts[0].body["blocks"].to_string().contains("while the bot restarts"), "{}", posts[0].body);
    drop(bot.logs().await);
}

#[tokio::test]
async fn a_long_ask_answer_is_split_over_thread_posts() {
    let nats = TestNats::start().await;
    let ada = RecordingGateway::start().await;
    let lines: Vec<String> = (0..250).map(|i| format!("line {i:05} {}", "x".repeat(100))).collect();
    ada.set_chat_reply(&lines.join("\n"));
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": {"gateway": ada.addr.to_string(), "gateway_token": "ada-gateway-token", "hooks_token": "ada-hook-token",
                "hooks_url": ada.hooks_url(), "delivery": "chat", "model": "m"},
    }));
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));
    let bot = Bot::start(&nats, &fixture).await;
    let (status, _) = bot.command("UOPS", "ask ada tell me everything", 1).await;
    assert_eq!(status, 200);
    // The "asked" post, then the answer in its thread over three posts at least.
    let posts = bot.slack.wait_for_path(POST_MESSAGE, 4, WAIT).await;
    let answer = &posts[1..];
    let mut all = String::new();
    for post in answer {
        assert_eq!(post.body["thread_ts"], "1700000000.000100", "every part goes in the ask's thread");
        let blocks = post.body["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50, "{} blocks", blocks.len());
        assert!(post.body.to_string().chars().count() < 40_000);
        all.push_str(&post.body["blocks"].to_string());
    }
    for i in 0..250 {
        assert_eq!(all.matches(&format!("line {i:05} ")).count(), 1, "line {i} posted once: {answer:?}");
    }
    assert!(!all.contains("(truncated)"));
    listener.stop().await.unwrap();
    drop(bot.logs().await);
}

#[tokio::test]
async fn a_failed_follow_up_is_retried_then_sent_as_plain_text() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let bot = Bot::start(&nats, &fixture).await;
    // Slack refuses the follow-up twice (blocks it will not take, say).
    bot.slack.script([500, 500]);
    let (status, _) = bot.command("UOPS", "send nova <hi>", 1).await;
    assert_eq!(status, 200);
    let follow = bot.slack.wait_for_path("/commands/T1/1/abc", 3, WAIT).await;
    assert_eq!(follow.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 200]);
    assert_eq!(follow[0].body, follow[1].body, "tried again as it was");
    assert!(follow[2].body["blocks"].is_null(), "then in plain text: {}", follow[2].body);
    let text = follow[2].body["text"].as_str().unwrap();
    assert!(text.starts_with("sent to nova") && text.contains("message id"), "{text}");
    listener.stop().await.unwrap();
    drop(bot.logs().await);
}
