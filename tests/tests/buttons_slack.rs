//! Slack buttons end to end: the `mesh bot` binary answers `kill hard` and
//! `kill nuclear` with Confirm and Cancel buttons; clicks arrive on
//! `POST /slack/interactions` as signed `block_actions` forms, exactly as
//! Slack sends them, against a real nats-server; the message updates go to
//! the click's `response_url` on a local recorder; the kill switch is read
//! back from its bucket.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_bot::slack::verify::sign;
use mesh_protocol::killswitch::{KillState, Mode, Scope};
use mesh_tests::bot::BotProcess;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-signing-secret-0123456789";
const BOT_TOKEN: &str = "xoxb-test-bot-token-0123456789";
const POST_MESSAGE: &str = "/api/chat.postMessage";

struct Bot {
    process: BotProcess,
    slack: RecordingGateway,
    http: reqwest::Client,
}

impl Bot {
    async fn start(nats: &TestNats, fixture: &Fixture, extra_env: &[(&str, &str)]) -> Self {
        let slack = RecordingGateway::start().await;
        slack.respond_with(
            POST_MESSAGE,
            json!({"ok": true, "channel": "CNOTIFY", "ts": "1700000000.000100",
                   "message": {"text": "posted", "ts": "1700000000.000100"}}),
        );
        let permissions = fixture.dir().join("permissions.json");
        let grants = json!({"operator": ["slack:UOPS"], "admin": ["slack:UADMIN"],
                            "director": ["slack:UDIR", "slack:UDIR2"]});
        std::fs::write(&permissions, grants.to_string()).unwrap();
        let env = [
            ("MESH_PERMISSIONS", permissions.display().to_string()),
            ("SLACK_SIGNING_SECRET", SECRET.to_owned()),
            ("SLACK_BOT_TOKEN", BOT_TOKEN.to_owned()),
            ("SLACK_API_URL", format!("http://{}/api", slack.addr)),
            ("SLACK_RESPONSE_URL_PREFIX", format!("http://{}/", slack.addr)),
            // Docker is not this test's business: a nuclear kill reports it unreachable.
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned()),
            ("MESH_COMPOSE_PROJECT", format!("buttons-{}", fastrand::u32(..))),
        ];
        let extra = extra_env.iter().map(|(k, v)| (*k, (*v).to_owned()));
        let process = BotProcess::start(&nats.url(), &fixture.registry, env.into_iter().chain(extra)).await;
        Self { process, slack, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: &str, timestamp: i64, signature: &str) -> u16 {
        self.http
            .post(format!("{}{path}", self.process.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", timestamp.to_string())
            .header("x-slack-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .expect("bot answers")
            .status()
            .as_u16()
    }

    async fn signed(&self, path: &str, body: &str) -> u16 {
        let ts = now();
        self.post(path, body, ts, &sign(SECRET, &ts.to_string(), body.as_bytes())).await
    }

    /// `/mesh <text>` by `user`; returns its answer on `response_url` (the n-th command).
    async fn command(&self, user: &str, text: &str, n: u32) -> Value {
        let response_url = format!("http://{}/commands/T1/{n}/abc", self.slack.addr);
        let body = serde_urlencoded::to_string([
            ("team_id", "T1"),
            ("channel_id", "C1"),
            ("user_id", user),
            ("command", "/mesh"),
            ("text", text),
            ("response_url", &response_url),
            ("trigger_id", &format!("cmd.{n}")),
        ])
        .unwrap();
        assert_eq!(self.signed("/slack/commands", &body).await, 200);
        self.slack.wait_for_path(&format!("/commands/T1/{n}/abc"), 1, WAIT).await[0].body.clone()
    }

    /// A `block_actions` form for a click on `action_id` by `user`, answered on `/actions/<tag>`.
    fn click_form(&self, user: &str, action_id: &str, tag: &str) -> String {
        let payload = json!({
            "type": "block_actions",
            "user": {"id": user, "username": user.to_lowercase(), "team_id": "T1"},
            "api_app_id": "A1",
            "team": {"id": "T1", "domain": "mesh"},
            "container": {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C1", "is_ephemeral": false},
            "trigger_id": format!("trigger.{tag}"),
            "channel": {"id": "C1", "name": "ops"},
            "response_url": format!("http://{}/actions/{tag}", self.slack.addr),
            "actions": [{"type": "button", "action_id": action_id, "block_id": "mesh_actions", "value": action_id,
                         "text": {"type": "plain_text", "text": "Confirm"}, "action_ts": "1700000001.000200"}],
        });
        serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap()
    }

    /// Clicks and returns what came back on the click's `response_url` once `n` answers are there.
    async fn click(&self, user: &str, action_id: &str, tag: &str, n: usize) -> Vec<Value> {
        assert_eq!(self.signed("/slack/interactions", &self.click_form(user, action_id, tag)).await, 200);
        let answers = self.slack.wait_for_path(&format!("/actions/{tag}"), n, WAIT).await;
        answers.into_iter().map(|r| r.body).collect()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The `action_id`s of the buttons in a rendered message, by label.
fn buttons(message: &Value) -> Vec<(String, String)> {
    message["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .map(|e| (e["text"]["text"].as_str().unwrap().to_owned(), e["action_id"].as_str().unwrap().to_owned()))
        .collect()
}

fn button(message: &Value, label: &str) -> String {
    buttons(message).into_iter().find(|(l, _)| l == label).unwrap_or_else(|| panic!("no {label} in {message}")).1
}

/// The kill switch entry of the whole mesh, if one is in force.
async fn kill_mode(nats: &TestNats) -> Option<Mode> {
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.ok()?;
    let bytes = bucket.get(Scope::Global.key()).await.ok()??;
    Some(KillState::decode(&bytes).ok()?.mode).filter(|m| *m != Mode::None)
}

#[tokio::test]
async fn a_directors_kill_hard_is_confirmed_or_cancelled_with_buttons() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let bot = Bot::start(&nats, &fixture, &[]).await;

    // The prompt: public, with the typed code and two buttons carrying only the code.
    let prompt = bot.command("UDIR", "kill hard -- drill", 1).await;
    assert_eq!(prompt["response_type"], "in_channel", "{prompt}");
    let (confirm, cancel) = (button(&prompt, "Confirm"), button(&prompt, "Cancel"));
    assert!(confirm.starts_with("mesh:confirm:") && cancel.starts_with("mesh:cancel:"), "{confirm} {cancel}");
    assert!(!confirm.contains("kill") && !confirm.contains("drill"), "the button names no command: {confirm}");
    assert!(prompt.to_string().contains(&format!("confirm {}", &confirm["mesh:confirm:".len()..])));

    // An operator's click, and an admin who did not ask: refused to them alone, nothing changes.
    for (user, tag, want) in [("UOPS", "ops", "admin"), ("UADMIN", "admin", "asked for by someone else")] {
        let answers = bot.click(user, &confirm, tag, 1).await;
        assert_eq!(answers[0]["response_type"], "ephemeral", "{user}: {}", answers[0]);
        assert_eq!(answers[0]["replace_original"], false, "{user}: the message stays");
        assert!(answers[0].to_string().contains(want), "{user}: {}", answers[0]);
        assert_eq!(kill_mode(&nats).await, None, "{user}'s click pulled the switch");
    }

    // Cancel by the director who asked: the message says so and loses its buttons; the mesh runs.
    let cancelled = bot.click("UDIR", &cancel, "cancel", 1).await;
    assert_eq!(cancelled[0]["replace_original"], true, "{}", cancelled[0]);
    assert!(cancelled[0].to_string().contains("cancelled by slack:UDIR at "), "{}", cancelled[0]);
    assert!(buttons(&cancelled[0]).is_empty(), "{}", cancelled[0]);
    assert_eq!(kill_mode(&nats).await, None, "a cancelled kill ran");

    // Asked again: a forged and a stale click are 401 and run nothing.
    let prompt = bot.command("UDIR", "kill hard -- drill two", 2).await;
    let (confirm, cancel) = (button(&prompt, "Confirm"), button(&prompt, "Cancel"));
    let form = bot.click_form("UDIR", &confirm, "confirm");
    let ts = now();
    let tampered = bot.click_form("UDIR", &confirm, "forged");
    assert_eq!(
        bot.post("/slack/interactions", &tampered, ts, &sign(SECRET, &ts.to_string(), form.as_bytes())).await,
        401
    );
    assert_eq!(
        bot.post("/slack/interactions", &form, ts, &sign("wrong-secret", &ts.to_string(), form.as_bytes())).await,
        401
    );
    let stale = ts - 600;
    assert_eq!(
        bot.post("/slack/interactions", &form, stale, &sign(SECRET, &stale.to_string(), form.as_bytes())).await,
        401
    );
    assert_eq!(kill_mode(&nats).await, None, "a rejected click ran");

    // Confirm by the director who asked: the switch is pulled, the message says who and when.
    let ts = now();
    let signature = sign(SECRET, &ts.to_string(), form.as_bytes());
    assert_eq!(bot.post("/slack/interactions", &form, ts, &signature).await, 200);
    let confirmed = bot.slack.wait_for_path("/actions/confirm", 1, WAIT).await;
    let update = &confirmed[0].body;
    assert_eq!(update["replace_original"], true, "{update}");
    assert!(update.to_string().contains("confirmed by slack:UDIR at "), "{update}");
    assert!(update.to_string().contains("HARD"), "{update}");
    assert!(buttons(update).is_empty(), "the buttons are gone: {update}");
    assert_eq!(kill_mode(&nats).await, Some(Mode::Hard));

    // The same signed click again (a retry or a replay), and a second click on the used buttons: run once.
    assert_eq!(bot.post("/slack/interactions", &form, ts, &signature).await, 200);
    let again = bot.click("UDIR", &cancel, "again", 1).await;
    assert!(again[0].to_string().contains("no action is waiting"), "{}", again[0]);
    assert_eq!(bot.slack.requests_to("/actions/confirm").len(), 1, "the replayed click ran again");
    assert_eq!(kill_mode(&nats).await, Some(Mode::Hard), "the cancel after the confirm changed the switch");

    // Clicks count against the same rate limit as typed commands (5 control commands a minute).
    let limited = bot.click("UDIR", &confirm, "limited", 1).await;
    assert!(limited[0].to_string().contains("rate limit"), "{}", limited[0]);

    // Typed codes still work beside the buttons.
    let prompt = bot.command("UADMIN", "kill hard agent=nova", 3).await;
    let code = &button(&prompt, "Confirm")["mesh:confirm:".len()..];
    let typed = bot.command("UADMIN", &format!("confirm {code}"), 4).await;
    assert!(typed.to_string().contains("HARD"), "{typed}");

    listener.stop().await.unwrap();
    let logs = bot.process.stop().await.1;
    assert!(!logs.contains(SECRET) && !logs.contains(BOT_TOKEN), "a secret reached the log");
}

#[tokio::test]
async fn two_person_nuclear_needs_a_second_director_and_expired_buttons_change_nothing() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start(&nats, &fixture, &[("MESH_TWO_PERSON_NUCLEAR", "true"), ("MESH_CONFIRM_WINDOW", "3s")]).await;

    let prompt = bot.command("UDIR", "kill nuclear", 1).await;
    assert!(prompt.to_string().contains("another director must"), "{prompt}");
    let confirm = button(&prompt, "Confirm");
    for (user, tag, want) in [
        ("UDIR", "self", "different director"),
        ("UADMIN", "admin", "must be confirmed by a director"),
        ("UOPS", "ops", "admin"),
    ] {
        let answers = bot.click(user, &confirm, tag, 1).await;
        assert_eq!(answers[0]["replace_original"], false, "{user}");
        assert!(answers[0].to_string().contains(want), "{user}: {}", answers[0]);
        assert_eq!(kill_mode(&nats).await, None, "{user}'s click ran the nuclear kill");
    }
    let confirmed = bot.click("UDIR2", &confirm, "second", 1).await;
    let update = confirmed[0].to_string();
    assert!(update.contains("confirmed by slack:UDIR2") && update.contains("asked by slack:UDIR)"), "{update}");
    assert_eq!(kill_mode(&nats).await, Some(Mode::Nuclear));

    // A kill hard left to expire: the click after the window changes nothing but the message.
    let prompt = bot.command("UDIR", "kill hard agent=nova", 2).await;
    let confirm = button(&prompt, "Confirm");
    // The window passes: the prompt is marked expired in place (its second message on response_url).
    let marked = bot.slack.wait_for_path("/commands/T1/2/abc", 2, WAIT).await;
    assert!(marked[1].body.to_string().contains("expired unconfirmed"), "{}", marked[1].body);
    let answers = bot.click("UDIR", &confirm, "expired", 2).await;
    let (update, answer) = match answers[0]["replace_original"].as_bool() {
        Some(true) => (&answers[0], &answers[1]),
        _ => (&answers[1], &answers[0]),
    };
    assert!(update.to_string().contains("expired unconfirmed"), "{update}");
    assert!(buttons(update).is_empty(), "{update}");
    assert!(answer.to_string().contains("expired"), "{answer}");
    let js = nats.jetstream().await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    assert_eq!(bucket.get(Scope::Agent(mesh_protocol::AgentId::parse("nova").unwrap()).key()).await.unwrap(), None);
    drop(bot.process.stop().await);
}

#[tokio::test]
async fn a_prompt_left_undecided_is_marked_expired_in_place_and_a_decided_one_is_not() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let bot = Bot::start(&nats, &fixture, &[("MESH_CONFIRM_WINDOW", "2s")]).await;

    // One prompt is confirmed at once; another, asked after it, is left alone.
    let decided = bot.command("UDIR", "kill hard agent=nova", 1).await;
    let confirmed = bot.click("UDIR", &button(&decided, "Confirm"), "decided", 1).await;
    assert!(confirmed[0].to_string().contains("confirmed by slack:UDIR"), "{}", confirmed[0]);
    let left = bot.command("UDIR", "kill hard -- left alone", 2).await;
    assert_eq!(buttons(&left).len(), 2, "{left}");

    // When its window passes, the one left alone is replaced in place: expired, no buttons.
    let answers = bot.slack.wait_for_path("/commands/T1/2/abc", 2, WAIT).await;
    let expired = &answers[1].body;
    assert_eq!(expired["replace_original"], true, "{expired}");
    assert!(expired.to_string().contains("kill hard\\\" expired unconfirmed"), "{expired}");
    assert!(buttons(expired).is_empty(), "{expired}");
    assert_eq!(kill_mode(&nats).await, None, "nothing ran");
    // The decided one (whose window ended first) keeps what the decision made it.
    assert_eq!(bot.slack.requests_to("/commands/T1/1/abc").len(), 1, "the confirmed prompt was edited again");
    assert_eq!(bot.slack.requests_to("/actions/decided").len(), 1);
    // A click after the window changes nothing but says it expired.
    let late = bot.click("UDIR", &button(&left, "Confirm"), "late", 2).await;
    assert!(late.iter().all(|a| a.to_string().contains("expired")), "{late:?}");
    assert_eq!(kill_mode(&nats).await, None);
    drop(bot.process.stop().await);
}

/// The n-th dead-letter notification posted to the channel (1-based), waited for.
async fn dead_letter_notification(bot: &Bot, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found: Vec<Value> = bot
            .slack
            .requests_to(POST_MESSAGE)
            .into_iter()
            .map(|r| r.body)
            .filter(|b| b.to_string().contains("new dead letters"))
            .collect();
        if found.len() >= n {
            return found[n - 1].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead-letter notification {n}: {:?}", bot.slack.requests());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many dead letters are stored.
async fn dead_letters(nats: &TestNats) -> u64 {
    let js = nats.jetstream().await;
    let mut stream = js.get_stream(mesh_protocol::layout::dead_letter_stream(1).name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn a_dead_letter_notifications_replay_button_replays_that_dead_letter_only() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let bot = Bot::start(&nats, &fixture, &[("SLACK_NOTIFY_CHANNEL", "CNOTIFY"), ("MESH_MONITOR_EVERY_S", "1")]).await;
    bot.process.wait_for_output("fleet monitor watching", WAIT).await.unwrap();
    bot.process.wait_for_output("notifications relay following events", WAIT).await.unwrap();

    // nova's gateway refuses two messages for good, one after the other:
    // two dead letters, each announced on its own.
    nova.script([404, 404]);
    let send = |text: &'static str| {
        let mut command = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        command.args(["send", "nova", text]);
        async move {
            let sent = command.output().await.unwrap();
            assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
        }
    };
    send("the first report").await;
    let first = dead_letter_notification(&bot, 1).await;
    send("the second report").await;
    let second = dead_letter_notification(&bot, 2).await;
    let replay = button(&second, "Replay nova");
    assert!(replay.starts_with("mesh:replay:nova:"), "{replay}");
    assert_ne!(replay, button(&first, "Replay nova"), "each notification names its own dead letter");
    assert_eq!(button(&second, "Show nova"), "mesh:dlq:nova");
    assert_eq!(dead_letters(&nats).await, 2);

    // An operator may not replay; an admin may, and nova gets the second message, not the first.
    let refused = bot.click("UOPS", &replay, "ops", 1).await;
    assert!(refused[0].to_string().contains("admin"), "{}", refused[0]);
    let done = bot.click("UADMIN", &replay, "admin", 1).await;
    assert!(done[0].to_string().contains("replayed 1 dead letters of nova"), "{}", done[0]);
    assert_eq!(done[0]["replace_original"], false, "the notification stays");
    let got = nova.wait_for(3, WAIT).await;
    assert!(got[2].text().contains("the second report"), "{}", got[2].text());
    assert_eq!(dead_letters(&nats).await, 1, "the first dead letter is still stored");

    // The same button again: that dead letter is gone, so nothing is replayed.
    let again = bot.click("UADMIN", &replay, "again", 1).await;
    assert!(again[0].to_string().contains("no longer stored"), "{}", again[0]);
    assert_eq!(dead_letters(&nats).await, 1);
    assert_eq!(nova.requests().len(), 3, "nothing more reached nova");
    listener.stop().await.unwrap();
    drop(bot.process.stop().await);
}

#[tokio::test]
async fn a_replay_button_naming_another_agents_dead_letter_is_refused_and_replays_nothing() {
    let nats = TestNats::start().await;
    let nova = RecordingGateway::start().await;
    let kaan = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true), ("kaan", &kaan, true)]);
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));
    let bot = Bot::start(&nats, &fixture, &[("SLACK_NOTIFY_CHANNEL", "CNOTIFY"), ("MESH_MONITOR_EVERY_S", "1")]).await;
    bot.process.wait_for_output("fleet monitor watching", WAIT).await.unwrap();
    bot.process.wait_for_output("notifications relay following events", WAIT).await.unwrap();
    let send = |to: &'static str, text: &'static str| {
        let mut command = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        command.args(["send", to, text]);
        async move {
            let sent = command.output().await.unwrap();
            assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
        }
    };

    // kaan's gateway refuses a message for good: one dead letter, on mesh.dlq.kaan.
    kaan.script([404]);
    send("kaan", "kaan's private report").await;
    let notification = dead_letter_notification(&bot, 1).await;
    let kaans = button(&notification, "Replay kaan");
    let seq = kaans.strip_prefix("mesh:replay:kaan:").unwrap_or_else(|| panic!("{kaans}"));
    assert_eq!(dead_letters(&nats).await, 1);

    // A correctly signed click naming nova with kaan's sequence: refused, nothing replayed.
    let forged = format!("mesh:replay:nova:{seq}");
    let refused = bot.click("UADMIN", &forged, "forged", 1).await;
    let answer = refused[0].to_string();
    assert!(answer.contains(&format!("dead letter {seq} of nova is no longer stored")), "{answer}");
    assert!(answer.contains("never nova's") && answer.contains("nothing was replayed"), "{answer}");
    assert_eq!(dead_letters(&nats).await, 1, "kaan's dead letter is still stored");
    assert_eq!(kaan.requests().len(), 1, "only the refused original reached kaan");

    // The engine audits the click as an allowed command whose outcome is the refusal.
    let audit = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(["audit", "10", "--json"])
        .output()
        .await
        .unwrap();
    let audit: Value = serde_json::from_slice(&audit.stdout).unwrap();
    let rows = audit["sections"][0]["rows"].as_array().unwrap().clone();
    let line = format!("dlq replay nova (dead letter {seq}, button)");
    let row = rows.iter().find(|r| r[2] == line.as_str()).unwrap_or_else(|| panic!("no {line:?} in {rows:?}"));
    assert_eq!(row[1], "slack:UADMIN", "{row}");
    assert_eq!(row[3], "allowed", "{row}");
    assert!(row.to_string().contains("no longer stored"), "the outcome is the refusal: {row}");

    // A replay would have been published before the answer: a message sent to nova
    // now is the first and only one nova's gateway gets.
    send("nova", "the next message for nova").await;
    let got = nova.wait_for(1, WAIT).await;
    mesh_tests::fixtures::wait_until_settled(&nats.jetstream().await, "nova", WAIT).await;
    assert_eq!(nova.requests().len(), 1, "{:?}", nova.requests());
    assert!(got[0].text().contains("the next message for nova"), "{}", got[0].text());

    // kaan's own button still replays it, to kaan.
    let done = bot.click("UADMIN", &kaans, "kaans", 1).await;
    assert!(done[0].to_string().contains("replayed 1 dead letters of kaan"), "{}", done[0]);
    let got = kaan.wait_for(2, WAIT).await;
    assert!(got[1].text().contains("kaan's private report"), "{}", got[1].text());
    assert_eq!(dead_letters(&nats).await, 0);
    assert_eq!(nova.requests().len(), 1, "nothing of kaan's reached nova");
    listener.stop().await.unwrap();
    drop(bot.process.stop().await);
}
