//! Discord buttons end to end: the `mesh bot` binary answers `/mesh kill hard`
//! with Confirm and Cancel components; clicks arrive on
//! `POST /discord/interactions` as signed message component interactions
//! (type 3), exactly as Discord sends them, against a real nats-server; the
//! bot answers with type 7 (the message updated in place, components
//! emptied) or an ephemeral type 4 refusal; the kill switch is read back
//! from its bucket.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use ed25519_dalek::SigningKey;
use mesh_bot::discord::verify::{public_key_hex, sign};
use mesh_protocol::killswitch::{KillState, Mode, Scope};
use mesh_tests::bot::BotProcess;
use mesh_tests::{Fixture, RecordingGateway, TestNats};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const BOT_TOKEN: &str = "discord-test-bot-token-0123456789";
const APP: &str = "4242";
const API: &str = "/api/v10";

struct Bot {
    process: BotProcess,
    discord: RecordingGateway,
    key: SigningKey,
    http: reqwest::Client,
}

impl Bot {
    async fn start(nats: &TestNats, fixture: &Fixture) -> Self {
        Self::start_with(nats, fixture, &[]).await
    }

    async fn start_with(nats: &TestNats, fixture: &Fixture, extra_env: &[(&str, &str)]) -> Self {
        let mut seed = [0u8; 32];
        seed.iter_mut().for_each(|b| *b = fastrand::u8(..));
        let key = SigningKey::from_bytes(&seed);
        let discord = RecordingGateway::start().await;
        let permissions = fixture.dir().join("permissions.json");
        let grants = json!({"operator": ["discord-role:100"], "admin": ["discord:7"], "director": ["discord:8"]});
        std::fs::write(&permissions, grants.to_string()).unwrap();
        let env = [
            ("MESH_PERMISSIONS", permissions.display().to_string()),
            ("DISCORD_PUBLIC_KEY", public_key_hex(&key)),
            ("DISCORD_BOT_TOKEN", BOT_TOKEN.to_owned()),
            ("DISCORD_APPLICATION_ID", APP.to_owned()),
            ("DISCORD_API_URL", format!("http://{}{API}", discord.addr)),
            ("DISCORD_GATEWAY", "off".to_owned()),
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned()),
        ];
        let extra = extra_env.iter().map(|(k, v)| (*k, (*v).to_owned()));
        let process = BotProcess::start(&nats.url(), &fixture.registry, env.into_iter().chain(extra)).await;
        Self { process, discord, key, http: reqwest::Client::new() }
    }

    async fn post_signed(&self, body: &str, timestamp: i64, key: &SigningKey) -> (u16, Value) {
        let ts = timestamp.to_string();
        let response = self
            .http
            .post(format!("{}/discord/interactions", self.process.url))
            .header("content-type", "application/json")
            .header("x-signature-ed25519", sign(key, &ts, body.as_bytes()))
            .header("x-signature-timestamp", ts)
            .body(body.to_owned())
            .send()
            .await
            .expect("bot answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, body: &str) -> (u16, Value) {
        self.post_signed(body, now(), &self.key).await
    }

    /// `/mesh <line>` by `user`; returns the message that replaced the deferred answer.
    async fn command(&self, user: &str, line: &str, token: &str) -> Value {
        let body = json!({
            "type": 2, "id": format!("9{token}"), "application_id": APP, "token": token,
            "guild_id": "1", "channel_id": "900",
            "member": {"user": {"id": user, "username": "someone"}, "roles": []},
            "data": {"id": "77", "name": "mesh", "type": 1,
                     "options": [{"name": "command", "type": 3, "value": line}]},
        });
        let (status, answer) = self.post(&body.to_string()).await;
        assert_eq!((status, answer["type"].as_u64()), (200, Some(5)), "{answer}");
        let path = format!("{API}/webhooks/{APP}/{token}/messages/@original");
        self.discord.wait_for_path(&path, 1, WAIT).await[0].body.clone()
    }

    /// A click on `custom_id` by `user` (with `roles`), as Discord sends it.
    fn click(user: &str, roles: &[&str], custom_id: &str, id: &str) -> String {
        json!({
            "type": 3, "id": id, "application_id": APP, "token": format!("click-{id}"),
            "guild_id": "1", "channel_id": "900",
            "member": {"user": {"id": user, "username": "someone"}, "roles": roles},
            "message": {"id": "5550", "channel_id": "900", "content": "", "components": []},
            "data": {"component_type": 2, "custom_id": custom_id},
        })
        .to_string()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn custom_id(message: &Value, label: &str) -> String {
    message["components"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().unwrap().clone())
        .find(|b| b["label"] == label)
        .unwrap_or_else(|| panic!("no {label} in {message}"))["custom_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn kill_mode(nats: &TestNats) -> Option<Mode> {
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.ok()?;
    let bytes = bucket.get(Scope::Global.key()).await.ok()??;
    Some(KillState::decode(&bytes).ok()?.mode).filter(|m| *m != Mode::None)
}

#[tokio::test]
async fn component_clicks_confirm_cancel_and_refuse_with_updates_in_place() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start(&nats, &fixture).await;

    let prompt = bot.command("8", "kill hard -- drill", "t1").await;
    assert_eq!(prompt["allowed_mentions"], json!({"parse": []}));
    let (confirm, cancel) = (custom_id(&prompt, "Confirm"), custom_id(&prompt, "Cancel"));
    assert!(confirm.starts_with("mesh:confirm:") && confirm.len() <= 100, "{confirm}");

    // An operator's click: an ephemeral refusal (type 4, flag 64), the message untouched.
    let (status, refused) = bot.post(&Bot::click("3", &["100"], &confirm, "c1")).await;
    assert_eq!(status, 200);
    assert_eq!(refused["type"], 4, "{refused}");
    assert_eq!(refused["data"]["flags"], 64, "{refused}");
    assert_eq!(refused["data"]["allowed_mentions"], json!({"parse": []}));
    assert!(refused.to_string().contains("admin"), "{refused}");
    assert_eq!(kill_mode(&nats).await, None);

    // Cancel by the director who asked: type 7, who and when, components emptied; the mesh runs.
    let (_, cancelled) = bot.post(&Bot::click("8", &[], &cancel, "c2")).await;
    assert_eq!(cancelled["type"], 7, "{cancelled}");
    assert!(cancelled.to_string().contains("cancelled by discord:8 at "), "{cancelled}");
    assert_eq!(cancelled["data"]["components"], json!([]));
    assert_eq!(cancelled["data"]["allowed_mentions"], json!({"parse": []}));
    assert_eq!(kill_mode(&nats).await, None);

    // Asked again; a forged and a stale click are 401 and run nothing.
    let prompt = bot.command("8", "kill hard -- drill two", "t2").await;
    let confirm = custom_id(&prompt, "Confirm");
    let body = Bot::click("8", &[], &confirm, "c3");
    let mut other_seed = [7u8; 32];
    other_seed[0] = 1;
    assert_eq!(bot.post_signed(&body, now(), &SigningKey::from_bytes(&other_seed)).await.0, 401);
    assert_eq!(bot.post_signed(&body, now() - 600, &bot.key).await.0, 401);
    assert_eq!(kill_mode(&nats).await, None, "a rejected click ran");

    // Confirm by the director: the switch is pulled, the message says who.
    let (_, confirmed) = bot.post(&body).await;
    assert_eq!(confirmed["type"], 7, "{confirmed}");
    assert!(confirmed.to_string().contains("confirmed by discord:8 at "), "{confirmed}");
    assert_eq!(confirmed["data"]["components"], json!([]));
    assert_eq!(confirmed["data"]["allowed_mentions"], json!({"parse": []}));
    assert_eq!(kill_mode(&nats).await, Some(Mode::Hard));

    // The same interaction again runs once; a new click on the used button finds nothing.
    let (_, replayed) = bot.post(&body).await;
    assert!(replayed.to_string().contains("duplicate"), "{replayed}");
    let (_, again) = bot.post(&Bot::click("8", &[], &confirm, "c4")).await;
    assert_eq!(again["type"], 4);
    assert!(again.to_string().contains("no action is waiting"), "{again}");
    assert_eq!(kill_mode(&nats).await, Some(Mode::Hard));
    drop(bot.process.stop().await);
}

#[tokio::test]
async fn a_prompt_left_undecided_is_edited_to_expired() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start_with(&nats, &fixture, &[("MESH_CONFIRM_WINDOW", "2s")]).await;

    let prompt = bot.command("8", "kill hard -- left alone", "t1").await;
    custom_id(&prompt, "Confirm");
    // When the window passes, the interaction's answer (the prompt) is edited: expired, components emptied.
    let original = format!("{API}/webhooks/{APP}/t1/messages/@original");
    let edits = bot.discord.wait_for_path(&original, 2, WAIT).await;
    let expired = &edits[1].body;
    assert!(expired.to_string().contains("kill hard\\\" expired unconfirmed"), "{expired}");
    assert_eq!(expired["components"], json!([]), "{expired}");
    assert_eq!(expired["allowed_mentions"], json!({"parse": []}), "{expired}");
    assert_eq!(kill_mode(&nats).await, None);
    drop(bot.process.stop().await);
}
