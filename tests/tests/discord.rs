//! The Discord front end end to end: the `mesh bot` binary serves signed
//! interactions against a real nats-server and recording gateways, Discord's
//! REST API is a local recorder, and gateway message commands run through the
//! same code the serenity handler calls, with a serenity `Message` built here,
//! and through the bot's serenity client connected to a fake Discord gateway.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mesh_bot::discord::api::DiscordApi;
use mesh_bot::discord::messages::{self, Answered};
use mesh_bot::discord::verify::{public_key_hex, sign};
use mesh_tests::bot::BotProcess;
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};
use serde_json::{Value, json};
use serenity::model::channel::Message;
use serenity::model::id::{ChannelId, MessageId, RoleId, UserId};

const WAIT: Duration = Duration::from_secs(20);
const BOT_TOKEN: &str = "discord-test-bot-token-0123456789";
const APP: &str = "4242";
const API: &str = "/api/v10";

fn signing_key() -> SigningKey {
    let mut seed = [0u8; 32];
    seed.iter_mut().for_each(|b| *b = fastrand::u8(..));
    SigningKey::from_bytes(&seed)
}

fn permissions_file(fixture: &Fixture) -> std::path::PathBuf {
    let path = fixture.dir().join("permissions.json");
    std::fs::write(&path, json!({"operator": ["discord-role:100"], "admin": ["discord:7"]}).to_string()).unwrap();
    path
}

struct Bot {
    process: BotProcess,
    url: String,
    discord: RecordingGateway,
    key: SigningKey,
    http: reqwest::Client,
}

impl Bot {
    async fn start(nats: &TestNats, fixture: &Fixture, extra_env: &[(&str, &str)]) -> Self {
        Self::start_with(nats, fixture, extra_env, RecordingGateway::start().await).await
    }

    /// Starts the bot with `discord` as Discord's REST API.
    async fn start_with(
        nats: &TestNats,
        fixture: &Fixture,
        extra_env: &[(&str, &str)],
        discord: RecordingGateway,
    ) -> Self {
        let key = signing_key();
        let env = [
            ("MESH_PERMISSIONS", permissions_file(fixture).display().to_string()),
            ("DISCORD_PUBLIC_KEY", public_key_hex(&key)),
            ("DISCORD_BOT_TOKEN", BOT_TOKEN.to_owned()),
            ("DISCORD_APPLICATION_ID", APP.to_owned()),
            ("DISCORD_API_URL", format!("http://{}{API}", discord.addr)),
            ("DISCORD_GATEWAY", "off".to_owned()),
        ];
        let extra = extra_env.iter().map(|(k, v)| (*k, (*v).to_owned()));
        let process = BotProcess::start(&nats.url(), &fixture.registry, env.into_iter().chain(extra)).await;
        let url = process.url.clone();
        Self { process, url, discord, key, http: reqwest::Client::new() }
    }

    /// An application command interaction for `/mesh <line>`.
    fn interaction(user: &str, roles: &[&str], line: &str, token: &str) -> String {
        json!({
            "type": 2, "id": format!("9{token}"), "application_id": APP, "token": token,
            "guild_id": "1", "channel_id": "900",
            "member": {"user": {"id": user, "username": "someone"}, "roles": roles},
            "data": {"id": "77", "name": "mesh", "type": 1,
                     "options": [{"name": "command", "type": 3, "value": line}]},
        })
        .to_string()
    }

    async fn post_raw(&self, body: &str, headers: &[(&str, String)]) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/discord/interactions", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("bot answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_signed(&self, body: &str, timestamp: i64, key: &SigningKey) -> (u16, Value) {
        let ts = timestamp.to_string();
        let signature = sign(key, &ts, body.as_bytes());
        self.post_raw(body, &[("x-signature-ed25519", signature), ("x-signature-timestamp", ts)]).await
    }

    async fn post(&self, body: &str) -> (u16, Value) {
        self.post_signed(body, now(), &self.key).await
    }

    fn original(token: &str) -> String {
        format!("{API}/webhooks/{APP}/{token}/messages/@original")
    }

    async fn logs(self) -> String {
        self.process.stop().await.1
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[tokio::test]
async fn signed_interactions_run_once_and_edit_the_deferred_answer() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let bot = Bot::start(&nats, &fixture, &[]).await;

    // The /mesh command is registered on start, with the bot token.
    let registered = bot.discord.wait_for_path(&format!("{API}/applications/{APP}/commands"), 1, WAIT).await;
    assert_eq!(registered[0].authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    assert_eq!(registered[0].body["name"], "mesh");
    assert_eq!(registered[0].body["options"][0]["name"], "command");

    // PING gets PONG.
    let ping = json!({"type": 1, "id": "1", "application_id": APP, "token": "ping-token-1"}).to_string();
    assert_eq!(bot.post(&ping).await, (200, json!({"type": 1})));

    // Missing headers, a bad signature, another key, a tampered body, a stale timestamp: 401.
    assert_eq!(bot.post_raw(&ping, &[]).await.0, 401);
    assert_eq!(bot.post_raw(&ping, &[("x-signature-timestamp", now().to_string())]).await.0, 401);
    assert_eq!(bot.post_raw(&ping, &[("x-signature-ed25519", "00".repeat(64))]).await.0, 401);
    let ts = now().to_string();
    let bad = [("x-signature-ed25519", "ab".repeat(64)), ("x-signature-timestamp", ts.clone())];
    assert_eq!(bot.post_raw(&ping, &bad).await.0, 401);
    assert_eq!(bot.post_signed(&ping, now(), &signing_key()).await.0, 401);
    let send = Bot::interaction("5", &["100"], "send nova deploy @everyone *now* — שלום", "itok-send-1");
    let signature = sign(&bot.key, &ts, send.as_bytes());
    let tampered = send.replace("deploy", "destroy");
    let headers = [("x-signature-ed25519", signature), ("x-signature-timestamp", ts)];
    assert_eq!(bot.post_raw(&tampered, &headers).await.0, 401);
    assert_eq!(bot.post_signed(&send, now() - 6 * 60, &bot.key).await.0, 401);

    // A valid command: deferred at once (public), then the original answer is edited.
    let (status, first) = bot.post_raw(&send, &headers).await;
    assert_eq!((status, &first), (200, &json!({"type": 5, "data": {}})));
    let edit = bot.discord.wait_for_path(&Bot::original("itok-send-1"), 1, WAIT).await;
    assert_eq!(edit[0].body["allowed_mentions"], json!({"parse": []}));
    assert!(edit[0].body["content"].is_null(), "no content that could mention anyone");
    assert!(edit[0].body["embeds"][0]["title"].as_str().unwrap().contains("sent to nova"), "{}", edit[0].body);
    let got = nova.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Message from discord:5: deploy @everyone *now* — שלום");

    // The same signed request again (a replay or a retry) runs once.
    let (status, again) = bot.post_raw(&send, &headers).await;
    assert_eq!(status, 200);
    assert_eq!(again["type"], 4);
    assert_eq!(again["data"]["flags"], 64);
    assert!(again["data"]["content"].as_str().unwrap().contains("duplicate"), "{again}");
    // Spelled otherwise (upper-case hex) or signed anew at another second, it is
    // the same interaction (the signed body's id): still once.
    let upper = [("x-signature-ed25519", headers[0].1.to_uppercase()), headers[1].clone()];
    let (status, again) = bot.post_raw(&send, &upper).await;
    assert_eq!(status, 200);
    assert!(again["data"]["content"].as_str().unwrap().contains("duplicate"), "{again}");
    let (status, again) = bot.post_signed(&send, now() - 1, &bot.key).await;
    assert_eq!(status, 200);
    assert!(again["data"]["content"].as_str().unwrap().contains("duplicate"), "{again}");

    // A member without the role: an ephemeral deferral, the needed role named, nothing sent.
    let denied = Bot::interaction("6", &["999"], "send nova hi", "itok-denied-2");
    assert_eq!(bot.post(&denied).await, (200, json!({"type": 5, "data": {"flags": 64}})));
    let edit = bot.discord.wait_for_path(&Bot::original("itok-denied-2"), 1, WAIT).await;
    assert!(edit[0].body.to_string().contains("operator"), "{}", edit[0].body);
    assert_eq!(edit[0].body["embeds"][0]["color"], 0xE74C3C);

    // Every command is deferred, whatever it takes (ping waits for pongs): the edit follows.
    let slow = Bot::interaction("5", &["100"], "ping", "itok-ping-3");
    let (status, deferred) = bot.post(&slow).await;
    assert_eq!((status, deferred["type"].as_u64()), (200, Some(5)));
    let edit = bot.discord.wait_for_path(&Bot::original("itok-ping-3"), 1, WAIT).await;
    assert!(edit[0].body.to_string().contains("nova"), "{}", edit[0].body);

    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 1, "only the valid, first request reached the agent");

    // Every command is in the audit trail, denials included.
    let audit = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(["audit", "10", "--json"])
        .output()
        .await
        .unwrap();
    let audit: Value = serde_json::from_slice(&audit.stdout).unwrap();
    let rows = audit["sections"][0]["rows"].as_array().unwrap().clone();
    let find = |who: &str, what: &str| rows.iter().find(|r| r[1] == who && r[2] == what).cloned().unwrap_or_default();
    assert_eq!(find("discord:5", "send nova deploy @everyone *now* — שלום")[3], "allowed", "{rows:?}");
    assert_eq!(find("discord:6", "send nova hi")[3], "denied", "{rows:?}");
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(logs.contains("discord request rejected"), "trace logs were captured");
    for secret in [BOT_TOKEN, "itok-send-1", "itok-denied-2", "itok-ping-3", "nova-hook-token"] {
        assert!(!logs.contains(secret), "a secret ({secret}) leaked into the bot's logs");
    }
}

#[tokio::test]
async fn ask_answer_arrives_as_a_follow_up() {
    let nats = TestNats::start().await;
    let ada = RecordingGateway::start().await;
    ada.set_chat_reply("4, and **bold** @everyone");
    let fixture = Fixture::from_json(&json!({
        "ada": {"gateway": ada.addr.to_string(), "gateway_token": "ada-gateway-token", "hooks_token": "ada-hook-token",
                "hooks_url": ada.hooks_url(), "delivery": "chat", "model": "m"},
    }));
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));
    let bot = Bot::start(&nats, &fixture, &[]).await;
    let (status, deferred) = bot.post(&Bot::interaction("5", &["100"], "ask ada 2+2?", "itok-ask-1")).await;
    assert_eq!((status, deferred["type"].as_u64()), (200, Some(5)));
    let edit = bot.discord.wait_for_path(&Bot::original("itok-ask-1"), 1, WAIT).await;
    assert!(edit[0].body.to_string().contains("asked ada"), "{}", edit[0].body);
    let follow = bot.discord.wait_for_path(&format!("{API}/webhooks/{APP}/itok-ask-1"), 1, WAIT).await;
    let answer = &follow[0].body;
    assert_eq!(answer["allowed_mentions"], json!({"parse": []}));
    assert!(answer.to_string().contains(r"4, and \\*\\*bold\\*\\* @everyone"), "agent markdown is escaped: {answer}");
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(!logs.contains(BOT_TOKEN) && !logs.contains("itok-ask-1"));
}

#[tokio::test]
async fn events_are_relayed_to_the_notify_channel_with_slack_alongside() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    // Slack configured too: both front ends run in the one `mesh bot`.
    let env = [("DISCORD_NOTIFY_CHANNEL", "777"), ("SLACK_SIGNING_SECRET", "slack-secret-0123456789")];
    let bot = Bot::start(&nats, &fixture, &env).await;
    let slack = bot.http.post(format!("{}/slack/commands", bot.url)).body("text=ping").send().await.unwrap();
    assert_eq!(slack.status().as_u16(), 401, "the Slack endpoint is served (and checks signatures)");
    assert_eq!(bot.post(&json!({"type": 1}).to_string()).await, (200, json!({"type": 1})));
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
    let global = mesh_protocol::killswitch::Scope::Global;
    switch
        .pull(
            &global,
            mesh_protocol::killswitch::Mode::Soft,
            None,
            mesh_bot::killswitch::Actor::director("discord:7"),
            Some("drill".into()),
        )
        .await
        .unwrap();
    switch.release(&global, mesh_bot::killswitch::Actor::director("discord:7")).await.unwrap();
    let path = format!("{API}/channels/777/messages");
    let deadline = tokio::time::Instant::now() + WAIT;
    let posts = loop {
        let posts = bot.discord.requests_to(&path);
        if posts.iter().map(|p| p.body.to_string().matches("kill switch").count()).sum::<usize>() >= 2 {
            break posts;
        }
        assert!(tokio::time::Instant::now() < deadline, "events not relayed: {posts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(posts.iter().all(|p| p.authorization.as_deref() == Some(&format!("Bot {BOT_TOKEN}"))));
    assert!(posts.iter().all(|p| p.body["allowed_mentions"] == json!({"parse": []})));
    assert!(posts[0].body.to_string().contains("SOFT pause by discord:7"), "{}", posts[0].body);
    drop(bot.logs().await);
}

/// A guild message as the gateway would hand it to the handler.
fn gateway_message(id: u64, author: u64, roles: &[u64], content: &str) -> Message {
    let mut message = Message::default();
    message.id = MessageId::new(id);
    message.channel_id = ChannelId::new(22);
    message.author.id = UserId::new(author);
    message.content = content.to_owned();
    let mut member: serenity::model::guild::PartialMember =
        serde_json::from_value(json!({"roles": [], "deaf": false, "mute": false})).unwrap();
    member.roles = roles.iter().map(|r| RoleId::new(*r)).collect();
    message.member = Some(Box::new(member));
    message
}

#[tokio::test]
async fn gateway_message_commands_round_trip() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let discord = RecordingGateway::start().await;
    discord.respond_with(&format!("{API}/channels/22/messages"), json!({"id": "555", "channel_id": "22"}));
    let permissions: mesh_bot::command::Permissions =
        serde_json::from_str(&std::fs::read_to_string(permissions_file(&fixture)).unwrap()).unwrap();
    let engine = mesh_bot::engine::Engine::new(
        mesh_bot::server::engine_config(fixture.registry.clone(), permissions),
        nats.client().await,
        mesh_bot::limits::LimitStore::memory(),
    )
    .await
    .unwrap();
    let engine = Arc::new(engine);
    let api = DiscordApi::new(
        &format!("http://{}{API}", discord.addr),
        Some(mesh_protocol::Secret::new(BOT_TOKEN)),
        Some(APP.into()),
    )
    .unwrap();
    let path = format!("{API}/channels/22/messages");

    // An operator's command: delivered, answered in the channel as a reply to it.
    let command = gateway_message(11, 5, &[100], "!mesh send nova hello <@&1> @here");
    assert_eq!(messages::answer(&engine, &api, &command).await.unwrap(), Answered::Done);
    let posts = discord.wait_for_path(&path, 1, WAIT).await;
    assert_eq!(posts[0].authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    assert_eq!(posts[0].body["message_reference"]["message_id"], "11");
    assert_eq!(posts[0].body["allowed_mentions"], json!({"parse": []}));
    assert!(posts[0].body.to_string().contains("sent to nova"), "{}", posts[0].body);
    let got = nova.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Message from discord:5: hello <@&1> @here");

    // Delivered again by the gateway (a resume): runs once.
    assert_eq!(messages::answer(&engine, &api, &command).await.unwrap(), Answered::Duplicate);
    // Not a command, or from a bot: ignored.
    let chatter = gateway_message(12, 5, &[100], "nice work");
    assert_eq!(messages::answer(&engine, &api, &chatter).await.unwrap(), Answered::Ignored);
    let mut from_bot = gateway_message(13, 5, &[100], "!mesh send nova loop");
    from_bot.author.bot = true;
    assert_eq!(messages::answer(&engine, &api, &from_bot).await.unwrap(), Answered::Ignored);

    // A member without the role is told which role is needed; nothing is sent.
    let denied = gateway_message(14, 6, &[999], "!mesh send nova hi");
    assert_eq!(messages::answer(&engine, &api, &denied).await.unwrap(), Answered::Done);
    let posts = discord.wait_for_path(&path, 2, WAIT).await;
    assert_eq!(posts[1].body["message_reference"]["message_id"], "14");
    assert!(posts[1].body.to_string().contains("operator"), "{}", posts[1].body);

    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 1, "only the operator's command reached the agent");
    assert_eq!(discord.requests_to(&path).len(), 2, "one answer per command, none for chatter");

    // The serenity gateway client asks the configured API (here the recorder, which
    // names a closed local port as the gateway) with the bot token, and stops on shutdown.
    discord.respond_with(&format!("{API}/gateway"), json!({"url": "ws://127.0.0.1:9"}));
    let stop = tokio_util::sync::CancellationToken::new();
    let gateway = tokio::spawn(mesh_bot::discord::gateway::run(
        mesh_protocol::Secret::new(BOT_TOKEN),
        format!("http://{}{API}", discord.addr),
        engine.clone(),
        api.clone(),
        stop.clone(),
    ));
    let asked = discord.wait_for(3, WAIT).await;
    let asked = &asked[2];
    assert!(asked.path.starts_with(&format!("{API}/gateway")), "{asked:?}");
    assert_eq!(asked.authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    stop.cancel();
    tokio::time::timeout(WAIT, gateway).await.expect("the gateway task stops on shutdown").unwrap();
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limits_and_early_edits_are_retried() {
    let discord = RecordingGateway::start().await;
    let path = format!("{API}/channels/22/messages");
    discord.respond_with(&path, json!({"id": "556", "retry_after": 0.05, "global": false}));
    discord.script([429]);
    let api =
        DiscordApi::new(&format!("http://{}{API}", discord.addr), Some(mesh_protocol::Secret::new(BOT_TOKEN)), None)
            .unwrap();
    let reply = mesh_bot::command::Reply::ok("after a 429");
    assert_eq!(api.post("22", &reply, None).await.unwrap(), "556");
    let posts = discord.requests_to(&path);
    assert_eq!(posts.iter().map(|p| p.status).collect::<Vec<_>>(), vec![429, 200], "one retry after the 429");
    assert_eq!(posts[0].body, posts[1].body, "the same message again");

    // An edit that meets 404 (Discord has not taken the deferred answer yet) is tried again.
    let original = format!("{API}/webhooks/{APP}/itok-early/messages/@original");
    discord.script([404]);
    api.edit_original(APP, "itok-early", &reply).await.unwrap();
    let edits = discord.requests_to(&original);
    assert_eq!(edits.iter().map(|p| p.status).collect::<Vec<_>>(), vec![404, 200]);
    // Other failures are reported, not retried.
    discord.script([403]);
    let error = api.edit_original(APP, "itok-late", &reply).await.unwrap_err().to_string();
    assert!(error.contains("HTTP 403") && !error.contains("itok-late"), "{error}");

    // Without a bot token nothing is sent and the error says what to set.
    let api = DiscordApi::new(&format!("http://{}{API}", discord.addr), None, None).unwrap();
    let error = api.post("22", &reply, None).await.unwrap_err().to_string();
    assert!(error.contains("DISCORD_BOT_TOKEN"), "{error}");
    assert!(api.register_command().await.unwrap_err().to_string().contains("DISCORD_APPLICATION_ID"));
    assert_eq!(discord.requests_to(&path).len(), 2);
}

/// The intents the bot must ask for to read `!mesh` in guild channels and DMs:
/// GUILD_MESSAGES (1 << 9), DIRECT_MESSAGES (1 << 12), MESSAGE_CONTENT (1 << 15).
const MESSAGE_COMMAND_INTENTS: u64 = (1 << 9) | (1 << 12) | (1 << 15);

#[tokio::test]
async fn the_gateway_client_runs_message_commands_once_across_resumes_and_a_new_session() {
    use mesh_tests::discord_gateway::{FakeDiscordGateway, op};
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let gateway = FakeDiscordGateway::start().await;
    let rest = RecordingGateway::start().await;
    gateway.announce_on(&rest);
    let replies = format!("{API}/channels/22/messages");
    rest.respond_with(&replies, json!({"id": "555", "channel_id": "22"}));
    let bot = Bot::start_with(&nats, &fixture, &[("DISCORD_GATEWAY", "on")], rest).await;
    let command = |id: u64, text: &str| serde_json::to_value(gateway_message(id, 5, &[100], text)).unwrap();
    let wait_for_reply = |n: usize| bot.discord.wait_for_path(&replies, n, WAIT);

    // A new session: the client asked the REST API where the gateway is, with the bot token.
    let first = gateway.accept().await;
    // (serenity 0.12's `Client::start` asks `GET /gateway`; `/gateway/bot` is for autosharding.)
    let asked = bot.discord.requests().into_iter().find(|r| r.path.starts_with(&format!("{API}/gateway"))).unwrap();
    assert_eq!(asked.path, format!("{API}/gateway"));
    assert_eq!(asked.authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    // (Frames are not printed on failure: IDENTIFY and RESUME carry the token.)
    assert_eq!(first.opening["op"], op::IDENTIFY);
    let identify = &first.opening["d"];
    assert_eq!(identify["token"], format!("Bot {BOT_TOKEN}"));
    assert_eq!(identify["intents"], MESSAGE_COMMAND_INTENTS, "the intents `!mesh` needs, and no more");
    assert_eq!(identify["shard"], json!([0, 1]));
    first.ready("session-1", APP);
    // Heartbeats come at the interval HELLO set, carrying the last sequence number, and are acknowledged.
    first.wait_for_heartbeat(1).await;

    // A command: delivered to nova, answered as a reply to it.
    first.dispatch("MESSAGE_CREATE", command(11, "!mesh send nova hello"));
    assert_eq!(nova.wait_for(1, WAIT).await[0].text(), "[mesh] Message from discord:5: hello");
    let posted = wait_for_reply(1).await;
    assert_eq!(posted[0].authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    assert_eq!(posted[0].body["message_reference"]["message_id"], "11");
    assert!(posted[0].body.to_string().contains("sent to nova"), "{}", posted[0].body);
    first.wait_for_heartbeat(2).await;

    // The connection drops: the client resumes the session where it was.
    first.drop_connection();
    let second = gateway.accept().await;
    assert_eq!(second.opening["op"], op::RESUME);
    assert_eq!(second.opening["d"]["session_id"], "session-1");
    assert_eq!(second.opening["d"]["seq"], 2);
    assert_eq!(second.opening["d"]["token"], format!("Bot {BOT_TOKEN}"));
    second.continue_after(&first);
    // Discord may deliver an event again on a resume: it runs once.
    second.dispatch("MESSAGE_CREATE", command(11, "!mesh send nova hello"));
    second.dispatch("RESUMED", json!({}));
    let after_resume = second.dispatch("MESSAGE_CREATE", command(12, "!mesh send nova after the resume"));
    assert_eq!(nova.wait_for(2, WAIT).await[1].text(), "[mesh] Message from discord:5: after the resume");
    assert_eq!(wait_for_reply(2).await[1].body["message_reference"]["message_id"], "12");
    second.wait_for_heartbeat(after_resume).await;

    // Discord ends the session (not resumable): the client identifies anew.
    second.send(json!({"op": op::INVALID_SESSION, "d": false}));
    let third = gateway.accept().await;
    assert_eq!(third.opening["op"], op::IDENTIFY);
    assert_eq!(third.opening["d"]["intents"], MESSAGE_COMMAND_INTENTS);
    third.ready("session-2", APP);
    third.dispatch("MESSAGE_CREATE", command(13, "!mesh send nova in a new session"));
    assert_eq!(nova.wait_for(3, WAIT).await[2].text(), "[mesh] Message from discord:5: in a new session");
    assert_eq!(wait_for_reply(3).await[2].body["message_reference"]["message_id"], "13");
    third.wait_for_heartbeat(2).await;

    // Discord asks the client to reconnect (op 7, routine in production): it resumes the new session.
    third.send(json!({"op": op::RECONNECT, "d": null}));
    let fourth = gateway.accept().await;
    assert_eq!(fourth.opening["op"], op::RESUME);
    assert_eq!(fourth.opening["d"]["session_id"], "session-2");
    assert_eq!(fourth.opening["d"]["seq"], 2);
    fourth.continue_after(&third);
    fourth.dispatch("RESUMED", json!({}));
    fourth.dispatch("MESSAGE_CREATE", command(14, "!mesh send nova after a reconnect"));
    assert_eq!(nova.wait_for(4, WAIT).await[3].text(), "[mesh] Message from discord:5: after a reconnect");
    assert_eq!(wait_for_reply(4).await[3].body["message_reference"]["message_id"], "14");

    // Each command ran once: four deliveries, four replies, one per command.
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 4);
    let references: Vec<Value> =
        bot.discord.requests_to(&replies).iter().map(|r| r.body["message_reference"]["message_id"].clone()).collect();
    assert_eq!(references, [json!("11"), json!("12"), json!("13"), json!("14")]);
    listener.stop().await.unwrap();
    let logs = bot.logs().await;
    assert!(logs.contains("discord gateway ready"), "the handler saw READY");
    assert!(!logs.contains(BOT_TOKEN), "the bot token leaked into the bot's logs");
}

/// A click on the button `custom_id` of the bot's message 555 in channel 22,
/// by `user` with `roles`, as the gateway delivers it (INTERACTION_CREATE).
fn gateway_click(id: &str, token: &str, user: &str, roles: &[&str], custom_id: &str) -> Value {
    let mut message = serde_json::to_value(gateway_message(555, 4000, &[], "")).unwrap();
    message["author"]["bot"] = json!(true);
    message["member"] = Value::Null;
    let click = json!({
        "id": id, "application_id": APP, "type": 3, "token": token, "version": 1,
        "guild_id": "1", "channel_id": "22", "channel": {"id": "22", "type": 0},
        "member": {"user": {"id": user, "username": "someone", "discriminator": "0", "global_name": null,
                            "avatar": null},
                   "roles": roles, "joined_at": "2026-01-01T00:00:00Z", "deaf": false, "mute": false, "flags": 0},
        "message": message,
        "data": {"custom_id": custom_id, "component_type": 2},
        "locale": "en-US", "app_permissions": "0", "entitlements": [], "authorizing_integration_owners": {},
        "context": 0, "attachment_size_limit": 8388608,
    });
    serde_json::from_value::<serenity::model::application::Interaction>(click.clone())
        .expect("an INTERACTION_CREATE serenity reads");
    click
}

#[tokio::test]
async fn buttons_on_gateway_answers_are_clicked_over_the_gateway() {
    use mesh_tests::discord_gateway::FakeDiscordGateway;
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let gateway = FakeDiscordGateway::start().await;
    let rest = RecordingGateway::start().await;
    gateway.announce_on(&rest);
    let replies = format!("{API}/channels/22/messages");
    rest.respond_with(&replies, json!({"id": "555", "channel_id": "22"}));
    let permissions = fixture.dir().join("directors.json");
    std::fs::write(&permissions, json!({"operator": ["discord-role:100"], "director": ["discord:8"]}).to_string())
        .unwrap();
    let env = [
        ("DISCORD_GATEWAY", "on"),
        ("MESH_PERMISSIONS", &permissions.display().to_string()),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    ];
    let bot = Bot::start_with(&nats, &fixture, &env, rest).await;
    let session = gateway.accept().await;
    session.ready("session-1", APP);
    let callback = |id: &str, token: &str| format!("{API}/interactions/{id}/{token}/callback");

    // A director's `!mesh kill hard` is answered in the channel with Confirm and Cancel.
    let command = serde_json::to_value(gateway_message(11, 8, &[], "!mesh kill hard agent=nova")).unwrap();
    session.dispatch("MESSAGE_CREATE", command);
    let prompt = bot.discord.wait_for_path(&replies, 1, WAIT).await[0].body.clone();
    let buttons: Vec<Value> = prompt["components"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
        .collect();
    let confirm = buttons.iter().find(|b| b["label"] == "Confirm").unwrap_or_else(|| panic!("no Confirm: {prompt}"));
    let confirm = confirm["custom_id"].as_str().unwrap().to_owned();

    // An operator's click over the gateway: refused on the callback, only to them; nothing runs.
    session.dispatch("INTERACTION_CREATE", gateway_click("7001", "gtok-ops", "5", &["100"], &confirm));
    let refused = bot.discord.wait_for_path(&callback("7001", "gtok-ops"), 1, WAIT).await[0].body.clone();
    assert_eq!(refused["type"], 4, "{refused}");
    assert_eq!(refused["data"]["flags"], 64, "{refused}");
    assert!(refused.to_string().contains("admin role"), "{refused}");

    // The director's click: the message becomes who confirmed, its buttons gone (type 7).
    session.dispatch("INTERACTION_CREATE", gateway_click("7002", "gtok-dir", "8", &[], &confirm));
    let update = bot.discord.wait_for_path(&callback("7002", "gtok-dir"), 1, WAIT).await[0].body.clone();
    assert_eq!(update["type"], 7, "{update}");
    assert_eq!(update["data"]["components"], json!([]), "{update}");
    assert_eq!(update["data"]["allowed_mentions"], json!({"parse": []}), "{update}");
    assert!(update.to_string().contains("confirmed by discord:8"), "{update}");
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    let key = mesh_protocol::killswitch::Scope::Agent(mesh_protocol::AgentId::parse("nova").unwrap()).key();
    let state = mesh_protocol::killswitch::KillState::decode(&bucket.get(key).await.unwrap().unwrap()).unwrap();
    assert_eq!(state.mode, mesh_protocol::killswitch::Mode::Hard);

    // The gateway delivers the click again (a resume): it runs once.
    session.dispatch("INTERACTION_CREATE", gateway_click("7002", "gtok-dir", "8", &[], &confirm));
    let answers = bot.discord.wait_for_path(&callback("7002", "gtok-dir"), 2, WAIT).await;
    assert!(answers[1].body.to_string().contains("duplicate"), "{}", answers[1].body);
    let logs = bot.logs().await;
    // (At MESH_LOG=trace, which the harness sets, tungstenite logs every frame it receives, the
    // interaction token included; only the bot's own lines are checked here.)
    let own = logs.lines().filter(|l| !l.contains("tungstenite::protocol"));
    for secret in [BOT_TOKEN, "gtok-dir"] {
        let leaked: Vec<&str> = own.clone().filter(|l| l.contains(secret)).map(|l| &l[..l.len().min(300)]).collect();
        assert!(leaked.is_empty(), "a secret leaked into the bot's logs: {leaked:?}");
    }
}

#[tokio::test]
async fn a_gateway_prompt_left_undecided_is_edited_to_expired() {
    use mesh_tests::discord_gateway::FakeDiscordGateway;
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let gateway = FakeDiscordGateway::start().await;
    let rest = RecordingGateway::start().await;
    gateway.announce_on(&rest);
    let replies = format!("{API}/channels/22/messages");
    rest.respond_with(&replies, json!({"id": "555", "channel_id": "22"}));
    let permissions = fixture.dir().join("directors.json");
    std::fs::write(&permissions, json!({"director": ["discord:8"]}).to_string()).unwrap();
    let env = [
        ("DISCORD_GATEWAY", "on"),
        ("MESH_PERMISSIONS", &permissions.display().to_string()),
        ("MESH_CONFIRM_WINDOW", "2s"),
    ];
    let bot = Bot::start_with(&nats, &fixture, &env, rest).await;
    let session = gateway.accept().await;
    session.ready("session-1", APP);

    let command = serde_json::to_value(gateway_message(11, 8, &[], "!mesh kill hard -- left alone")).unwrap();
    session.dispatch("MESSAGE_CREATE", command);
    let prompt = bot.discord.wait_for_path(&replies, 1, WAIT).await[0].body.clone();
    assert!(prompt.to_string().contains("mesh:confirm:"), "{prompt}");
    // When the window passes, the bot's message (555) is edited: expired, components emptied.
    let edited = bot.discord.wait_for_path(&format!("{replies}/555"), 1, WAIT).await;
    assert_eq!(edited[0].authorization.as_deref(), Some(format!("Bot {BOT_TOKEN}").as_str()));
    let expired = &edited[0].body;
    assert!(expired.to_string().contains("kill hard\\\" expired unconfirmed"), "{expired}");
    assert_eq!(expired["components"], json!([]), "{expired}");
    assert_eq!(expired["allowed_mentions"], json!({"parse": []}), "{expired}");
    drop(bot.logs().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_command_reaching_two_replicas_runs_once_without_redis() {
    use mesh_tests::discord_gateway::FakeDiscordGateway;
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let gateway = FakeDiscordGateway::start().await;
    let rest = RecordingGateway::start().await;
    gateway.announce_on(&rest);
    let replies = format!("{API}/channels/22/messages");
    rest.respond_with(&replies, json!({"id": "555", "channel_id": "22"}));
    // Two replicas with one bot token: Discord hands every message to each replica's session.
    let a = Bot::start_with(&nats, &fixture, &[("DISCORD_GATEWAY", "on")], rest.clone()).await;
    let first = gateway.accept().await;
    first.ready("session-a", APP);
    let b = Bot::start_with(&nats, &fixture, &[("DISCORD_GATEWAY", "on")], rest.clone()).await;
    let second = gateway.accept().await;
    second.ready("session-b", APP);
    for session in [&first, &second] {
        let message = serde_json::to_value(gateway_message(11, 5, &[100], "!mesh send nova hello")).unwrap();
        session.dispatch("MESSAGE_CREATE", message);
    }
    assert_eq!(nova.wait_for(1, WAIT).await[0].text(), "[mesh] Message from discord:5: hello");
    // One replica runs it and the other says it was a duplicate, or (the fault) both run it.
    const DUPLICATE: &str = "duplicate discord message ignored";
    tokio::select! {
        _ = nova.wait_for(2, WAIT) => {}
        _ = a.process.wait_for_output(DUPLICATE, WAIT) => {}
        _ = b.process.wait_for_output(DUPLICATE, WAIT) => {}
    }
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 1, "the command ran on one replica only");
    assert_eq!(rest.wait_for_path(&replies, 1, WAIT).await.len(), 1, "one answer in the channel");
    listener.stop().await.unwrap();
    drop((a.logs().await, b.logs().await));
}

#[tokio::test]
async fn long_output_continues_in_follow_up_messages() {
    let discord = RecordingGateway::start().await;
    let channel = format!("{API}/channels/22/messages");
    discord.respond_with(&channel, json!({"id": "555", "channel_id": "22"}));
    let api = DiscordApi::new(
        &format!("http://{}{API}", discord.addr),
        Some(mesh_protocol::Secret::new(BOT_TOKEN)),
        Some(APP.into()),
    )
    .unwrap();
    let lines: Vec<String> = (0..200).map(|i| format!("line {i:05} {}", "x".repeat(100))).collect();
    let reply = mesh_bot::command::Reply::info("ada replied").with_lines(None, lines);

    // In a channel: each message answers the one before, so they read as one thread.
    assert_eq!(api.post("22", &reply, Some("11")).await.unwrap(), "555");
    let posts = discord.requests_to(&channel);
    assert!(posts.len() >= 4, "{} messages", posts.len());
    assert_eq!(posts[0].body["message_reference"]["message_id"], "11");
    assert!(posts[1..].iter().all(|p| p.body["message_reference"]["message_id"] == "555"));
    // An interaction: the original answer, then follow-ups.
    api.edit_original(APP, "itok-long", &reply).await.unwrap();
    let edits = discord.requests_to(&format!("{API}/webhooks/{APP}/itok-long/messages/@original"));
    let follow_ups = discord.requests_to(&format!("{API}/webhooks/{APP}/itok-long"));
    assert_eq!((edits.len(), follow_ups.len()), (1, posts.len() - 1));
    for sent in [posts, [edits, follow_ups].concat()] {
        let all: String = sent.iter().map(|p| p.body["embeds"].to_string()).collect();
        for i in 0..200 {
            assert_eq!(all.matches(&format!("line {i:05} ")).count(), 1, "line {i} sent once");
        }
        assert!(!all.contains("(truncated)"));
    }
    // An answer only its asker sees stays so in its follow-ups.
    api.edit_original(APP, "itok-private", &reply.clone().ephemeral()).await.unwrap();
    let follow_ups = discord.requests_to(&format!("{API}/webhooks/{APP}/itok-private"));
    assert!(!follow_ups.is_empty());
    assert!(follow_ups.iter().all(|p| p.body["flags"] == 64), "ephemeral follow-ups");
}

/// `/mesh <line>` by `user` with `roles`; the message that replaced the deferred answer.
async fn run(bot: &Bot, user: &str, roles: &[&str], line: &str, token: &str) -> String {
    let (status, deferred) = bot.post(&Bot::interaction(user, roles, line, token)).await;
    assert_eq!((status, deferred["type"].as_u64()), (200, Some(5)), "{deferred}");
    bot.discord.wait_for_path(&Bot::original(token), 1, WAIT).await[0].body.to_string()
}

/// The confirmation code in an answer that asks for one.
fn code_in(answer: &str) -> String {
    let at = answer.find("confirm ").unwrap_or_else(|| panic!("no code in {answer}")) + "confirm ".len();
    answer[at..at + 6].to_owned()
}

async fn global_kill(nats: &TestNats) -> Option<mesh_protocol::killswitch::Mode> {
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.ok()?;
    let bytes = bucket.get(mesh_protocol::killswitch::Scope::Global.key()).await.ok()??;
    let mode = mesh_protocol::killswitch::KillState::decode(&bytes).ok()?.mode;
    Some(mode).filter(|m| *m != mesh_protocol::killswitch::Mode::None)
}

/// README (Discord, Slack): a typed `confirm <code>` from Discord goes through
/// the engine with Slack's rules: only whoever asked may confirm (another
/// director's `confirm` is refused and changes nothing, the code still works
/// for the asker), and a code past `MESH_CONFIRM_WINDOW` is refused.
#[tokio::test]
async fn typed_confirm_codes_work_only_for_the_asker_and_only_within_the_window() {
    const WINDOW: Duration = Duration::from_secs(4);
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let permissions = fixture.dir().join("directors.json");
    std::fs::write(&permissions, json!({"director": ["discord:8", "discord:9"]}).to_string()).unwrap();
    let env = [
        ("MESH_PERMISSIONS", permissions.to_str().unwrap()),
        ("MESH_CONFIRM_WINDOW", "4s"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project"),
    ];
    let bot = Bot::start(&nats, &fixture, &env).await;

    let asked = run(&bot, "8", &[], "kill hard -- drill", "itok-ask-1").await;
    let code = code_in(&asked);
    let other = run(&bot, "9", &[], &format!("confirm {code}"), "itok-other-2").await;
    assert!(other.contains("was asked for by someone else; only they can confirm it"), "{other}");
    assert_eq!(global_kill(&nats).await, None, "another director's confirm pulled the switch");
    let own = run(&bot, "8", &[], &format!("confirm {code}"), "itok-own-3").await;
    assert!(own.contains("HARD"), "{own}");
    assert_eq!(global_kill(&nats).await, Some(mesh_protocol::killswitch::Mode::Hard));
    // Ending the hard kill asks for a code too (another director, for the rate limit of control commands).
    let resume_code = code_in(&run(&bot, "9", &[], "resume", "itok-resume-4").await);
    let resumed = run(&bot, "9", &[], &format!("confirm {resume_code}"), "itok-resume-4b").await;
    assert_eq!(global_kill(&nats).await, None, "{resumed}");

    // A code left past its window: the asker's own confirm is refused, nothing runs.
    let asked = run(&bot, "8", &[], "kill hard -- late", "itok-ask-5").await;
    let expires_by = tokio::time::Instant::now() + WINDOW + Duration::from_secs(1);
    let code = code_in(&asked);
    // The behaviour under test is what a confirm does after the window: wait it out.
    tokio::time::sleep_until(expires_by).await;
    let late = run(&bot, "8", &[], &format!("confirm {code}"), "itok-late-6").await;
    assert!(late.contains("expired"), "{late}");
    assert_eq!(global_kill(&nats).await, None, "an expired code pulled the switch");
    drop(bot.logs().await);
}

/// README (Rate limits): from Discord too, through the engine: one member's
/// 21st message command in a minute is refused with the limit named and
/// publishes nothing; another member is not affected.
#[tokio::test]
async fn a_members_message_commands_beyond_the_rate_limit_are_refused_and_publish_nothing() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start(&nats, &fixture, &[]).await;
    let js = nats.jetstream().await;
    let stored = async || js.get_stream("MESH_AGENTS").await.unwrap().get_info().await.unwrap().state.messages;
    for n in 1..=20 {
        let answer = run(&bot, "5", &["100"], &format!("send nova message {n}"), &format!("itok-rl-{n}")).await;
        assert!(answer.contains("sent to nova"), "message {n}: {answer}");
    }
    assert_eq!(stored().await, 20);
    let refused = run(&bot, "5", &["100"], "send nova one too many", "itok-rl-21").await;
    assert!(refused.contains("rate limit: 20 message commands per minute; try again in "), "{refused}");
    assert_eq!(stored().await, 20, "the refused command published");
    let other = run(&bot, "6", &["100"], "send nova from someone else", "itok-rl-22").await;
    assert!(other.contains("sent to nova"), "{other}");
    assert_eq!(stored().await, 21);
    drop(bot.logs().await);
}
