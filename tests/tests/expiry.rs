//! Message expiry (issue 18, item 2): a message sent with `--ttl` that is
//! still waiting when its time to live ends is never delivered; the listener
//! dead-letters it with reason `expired`, `mesh dlq` shows it, and a replay
//! delivers it as a new message without the expiry.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_listener::config::Selection;
use mesh_protocol::envelope::{Arrival, EXPIRY_SKEW_TOLERANCE};
use mesh_protocol::{Envelope, Recipient};
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(20);

/// Runs `mesh` as the terminal with the director role.
async fn mesh(nats: &TestNats, fixture: &Fixture, args: &[&str]) -> (bool, String) {
    let permissions = fixture.dir().join("terminal-director.json");
    std::fs::write(&permissions, serde_json::json!({ "terminal": "director" }).to_string()).unwrap();
    let out = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(args)
        .env("MESH_PERMISSIONS", &permissions)
        .env("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project")
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The envelope stored in `MESH_AGENTS` with stream sequence `seq`.
async fn stored(js: &async_nats::jetstream::Context, seq: u64) -> Envelope {
    let message = js.get_stream("MESH_AGENTS").await.unwrap().get_raw_message(seq).await.unwrap();
    let arrival = Arrival { to: Recipient::Broadcast, fallback_id: uuid::Uuid::nil(), stored_at: message.time };
    Envelope::decode(&message.payload, &arrival).unwrap().0
}

/// The stream sequence of a `mesh send --json` answer.
fn stream_seq(said: &str) -> u64 {
    let reply: serde_json::Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    reply["data"]["stream_seq"].as_u64().unwrap_or_else(|| panic!("no stream_seq in {said}"))
}

#[tokio::test]
async fn a_message_whose_ttl_ends_while_its_agent_is_paused_is_dead_lettered_as_expired() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("a1", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, _control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let (ok, said) = mesh(&nats, &fixture, &["kill", "hard", "--agent", "a1", "--yes", "--reason", "ttl test"]).await;
    assert!(ok, "{said}");

    let (ok, said) = mesh(&nats, &fixture, &["send", "--json", "--ttl", "2s", "a1", "x"]).await;
    assert!(ok, "{said}");
    let short = stored(&js, stream_seq(&said)).await;
    let (ok, said) = mesh(&nats, &fixture, &["send", "--json", "--ttl", "1h", "a1", "still wanted"]).await;
    assert!(ok, "{said}");
    let expires_at = short.expires_at.expect("the envelope carries the expiry");
    assert_eq!(expires_at - short.sent_at, time::Duration::seconds(2));

    // Resume only once the short one's time to live (and the skew tolerance) has passed.
    let past = expires_at + EXPIRY_SKEW_TOLERANCE + Duration::from_millis(100);
    let wait = (past - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    tokio::time::sleep(wait.try_into().unwrap()).await;
    let (ok, said) = mesh(&nats, &fixture, &["resume", "--agent", "a1", "--yes"]).await;
    assert!(ok, "{said}");

    // The message within its ttl is delivered; the expired one never reaches the gateway.
    let got = gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "a1", WAIT).await;
    let texts: Vec<String> = gw.requests().iter().map(|r| r.text().to_owned()).collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(got[0].text().contains("still wanted"), "{texts:?}");
    let dead = mesh_tests::fixtures::dead_letters(&js).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].0.reason.starts_with("expired"), "{:?}", dead[0].0);

    let (_, said) = mesh(&nats, &fixture, &["dlq", "a1", "--json"]).await;
    let reply: serde_json::Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    let entries = reply["data"].as_array().unwrap_or_else(|| panic!("{said}"));
    assert_eq!(entries.len(), 1, "{said}");
    assert!(entries[0]["reason"].as_str().unwrap().starts_with("expired: its time to live ended at "), "{said}");
    assert_eq!(entries[0]["text"], "x");
    let (_, table) = mesh(&nats, &fixture, &["dlq", "a1"]).await;
    assert!(table.contains("expired"), "{table}");

    // Replayed, it is a new message without the expiry, and it is delivered.
    let (ok, said) = mesh(&nats, &fixture, &["dlq", "replay", "a1"]).await;
    assert!(ok, "{said}");
    let got = gw.wait_for(2, WAIT).await;
    assert!(got[1].text().contains('x'), "{:?}", got[1].text());
    let last = js.get_stream("MESH_AGENTS").await.unwrap().get_info().await.unwrap().state.last_sequence;
    assert_eq!(stored(&js, last).await.expires_at, None);
    listener.stop().await.unwrap();
}

/// Review of #18, item 1: an expiry at the end of the calendar once made the
/// listener's expiry check panic, killing the agent's loop for good (and the
/// redelivered message killed it again after each restart). Now the message is
/// refused as undecodable and dead-lettered, and the next one is delivered.
#[tokio::test]
async fn an_expiry_in_year_9999_is_dead_lettered_and_the_agent_keeps_receiving() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("a1", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, _control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;

    // A hostile publisher with the right to write to a1's inbox.
    let hostile = r#"{"v":1,"id":"0190b0a0-0000-7000-8000-000000000001","from":"kaan","to":"a1","text":"never","sent_at":"2026-01-01T00:00:00Z","expires_at":"9999-12-31T23:59:59Z"}"#;
    let inbox = mesh_protocol::subject::Subject::Inbox(mesh_protocol::AgentId::parse("a1").unwrap());
    js.publish(inbox.to_string(), hostile.into()).await.unwrap().await.unwrap();
    let (ok, said) = mesh(&nats, &fixture, &["send", "a1", "after the hostile one"]).await;
    assert!(ok, "{said}");

    let got = gw.wait_for(1, WAIT).await;
    assert!(got[0].text().contains("after the hostile one"), "{:?}", got[0].text());
    wait_until_settled(&js, "a1", WAIT).await;
    let dead = mesh_tests::fixtures::dead_letters(&js).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.reason.contains("expires_at is more than 24 hours after sent_at"), "{:?}", dead[0].0);
    assert_eq!(gw.requests().len(), 1, "the hostile message never reaches the gateway");
    listener.stop().await.unwrap();
}

/// Review of #18, item 5: a typo in `MESH_BROADCAST_TTL` once made every
/// `mesh` command fail, `mesh kill` and `mesh resume` included. Only a
/// broadcast reads it now (and refuses to run on the typo).
#[tokio::test]
async fn a_bad_broadcast_ttl_setting_blocks_only_broadcasts() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("a1", &gw, true)]);
    let permissions = fixture.dir().join("terminal-director.json");
    std::fs::write(&permissions, serde_json::json!({ "terminal": "director" }).to_string()).unwrap();
    let run = |args: &'static [&'static str]| {
        let mut command = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        command
            .args(args)
            .env("MESH_PERMISSIONS", &permissions)
            .env("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project")
            .env("MESH_BROADCAST_TTL", "5 minutes");
        async move {
            let out = command.output().await.unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        }
    };
    let (ok, said) = run(&["kill", "hard", "--agent", "a1", "--yes", "--reason", "typo test"]).await;
    assert!(ok, "a kill runs whatever the broadcast default says: {said}");
    let (ok, said) = run(&["resume", "--agent", "a1", "--yes"]).await;
    assert!(ok, "{said}");
    let (ok, said) = run(&["broadcast", "hello"]).await;
    assert!(!ok, "a broadcast refuses to guess its ttl: {said}");
    assert!(said.contains("MESH_BROADCAST_TTL"), "{said}");
}

/// Issue 22: `MESH_AGENTS` keeps a message 7 days. One held that long by a
/// pause or a missing listener would age out without a dead letter, so the
/// bot warns first: an event for the notify channels, once per message, and
/// `mesh_backlog_oldest_age_seconds` on its `/metrics` for the alert
/// `BacklogAboutToExpire`. (Here the warning comes after 1 s instead of 6 days.)
#[tokio::test]
async fn a_message_about_to_age_out_undelivered_raises_an_event_and_a_metric() {
    use futures::StreamExt;
    let nats = TestNats::start().await;
    let (gw_nova, gw_kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &gw_nova, true), ("kaan", &gw_kaan, true)]);
    // kaan's listener runs and takes everything; nova has none: its message waits.
    let kaan = ListenerHandle::one(&fixture, &nats, "kaan");
    let client = nats.client().await;
    let mut events = client.subscribe("mesh.events.>").await.unwrap();
    let (ok, said) = mesh(&nats, &fixture, &["send", "nova", "held"]).await;
    assert!(ok, "{said}");
    let (ok, said) = mesh(&nats, &fixture, &["send", "kaan", "taken"]).await;
    assert!(ok, "{said}");
    gw_kaan.wait_for(1, WAIT).await;
    wait_until_settled(&nats.jetstream().await, "kaan", WAIT).await;
    let bot = mesh_tests::bot::BotProcess::start(
        &nats.url(),
        &fixture.registry,
        [("MESH_BACKLOG_WARN_AFTER_S", "1"), ("MESH_MONITOR_EVERY_S", "1")],
    )
    .await;
    let warning = tokio::time::timeout(WAIT, async {
        loop {
            let message = events.next().await.unwrap();
            let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let text = event["text"].as_str().unwrap_or_default().to_owned();
            if text.contains("ages out of MESH_AGENTS") {
                return text;
            }
        }
    })
    .await
    .expect("no warning event about nova's waiting message");
    assert!(warning.starts_with("agent nova: 1 messages waiting"), "{warning}");
    assert!(warning.contains("without a dead letter"), "{warning}");
    // The metric: nova's oldest message has an age, kaan (nothing waiting) 0.
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        let text = http.get(format!("{}/metrics", bot.url)).send().await.unwrap().text().await.unwrap();
        if text.contains("mesh_backlog_oldest_age_seconds{agent=\"kaan\"}") {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "no backlog metric:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let age = |agent: &str| -> f64 {
        let prefix = format!("mesh_backlog_oldest_age_seconds{{agent=\"{agent}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap().parse().unwrap()
    };
    assert!(age("nova") >= 1.0, "{metrics}");
    assert_eq!(age("kaan"), 0.0, "{metrics}");
    // Once per message: the next rounds publish no second warning for it.
    let repeat = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let message = events.next().await.unwrap();
            if String::from_utf8_lossy(&message.payload).contains("ages out of MESH_AGENTS") {
                return;
            }
        }
    })
    .await;
    assert!(repeat.is_err(), "the warning was published twice");
    kaan.stop().await.unwrap();
    bot.stop().await;
}
