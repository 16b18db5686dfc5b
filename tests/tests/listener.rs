//! The listener against a real nats-server and recording gateways: each
//! outcome class, dead letters, crashes, server restarts, slow gateways,
//! order under failures, chat replies and the loop guard, and `--all`
//! following registry changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use mesh_listener::config::Selection;
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::{Priority, Registry};
use mesh_tests::fixtures::{dead_letters, listener_bin, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn load(fixture: &Fixture) -> Registry {
    mesh_listener::registry_file::load(&fixture.registry, &Default::default()).expect("registry")
}

async fn send(js: &jetstream::Context, fixture: &Fixture, from: &str, to: &str, text: &str) -> uuid::Uuid {
    mesh_bot::publish::send(js, &load(fixture), from, to, text, Priority::Normal).await.expect("send").id
}

async fn wait_for_dead_letters(js: &jetstream::Context, n: usize) -> Vec<(DeadLetter, bytes::Bytes)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = dead_letters(js).await;
        if found.len() >= n {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} of {n} dead letters within {WAIT:?}", found.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn final_client_errors_are_dead_lettered_at_once_with_the_reason() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let statuses = [400u16, 401, 403, 404, 413];
    gw.script(statuses);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let mut ids = Vec::new();
    for status in statuses {
        ids.push(send(&js, &fixture, "kaan", "nova", &format!("will get {status}")).await);
    }
    let found = wait_for_dead_letters(&js, statuses.len()).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), statuses.len(), "final errors are not retried");
    for ((record, payload), (status, id)) in found.iter().zip(statuses.iter().zip(&ids)) {
        assert_eq!(record.agent.as_str(), "nova");
        assert_eq!(record.status, Some(*status));
        assert_eq!(record.attempts, 1);
        assert_eq!(record.subject, "agents.nova.inbox.kaan");
        assert_eq!(record.reason, format!("gateway answered HTTP {status}; not retried"));
        let original: serde_json::Value = serde_json::from_slice(payload).expect("original payload kept");
        assert_eq!(original["id"], id.to_string());
        assert_eq!(original["text"], format!("will get {status}"));
    }
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn retryable_errors_are_retried_then_dead_lettered_when_exhausted() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    // 408, 425, 429 and 5xx are retried; the third delivery is the last.
    gw.script([408, 425, 429, 502, 503, 504]);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.max_deliver = 3;
    let listener = ListenerHandle::spawn(config);
    send(&js, &fixture, "kaan", "nova", "first").await;
    send(&js, &fixture, "kaan", "nova", "second").await;
    let found = wait_for_dead_letters(&js, 2).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 6, "three deliveries each");
    assert_eq!(found[0].0.status, Some(429));
    assert_eq!(found[0].0.attempts, 3);
    assert_eq!(found[0].0.reason, "gateway answered HTTP 429; gave up after 3 deliveries");
    assert_eq!(found[1].0.status, Some(504));
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn unreachable_gateways_and_undecodable_payloads_are_handled() {
    let nats = TestNats::start().await;
    let closed_port = mesh_bot::local_nats::free_port().expect("port");
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "nova-hook-token", "hooks_url": format!("http://127.0.0.1:{closed_port}/hooks/wake")}
    }));
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.max_deliver = 2;
    let listener = ListenerHandle::spawn(config);
    send(&js, &fixture, "kaan", "nova", "nobody home").await;
    js.publish("agents.nova.inbox", bytes::Bytes::from_static(&[0xff, 0xfe, 0x00])).await.unwrap().await.unwrap();
    let found = wait_for_dead_letters(&js, 2).await;
    let reasons: BTreeSet<_> = found.iter().map(|(r, _)| r.reason.clone()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("gateway unreachable") && r.ends_with("gave up after 2 deliveries")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.starts_with("undecodable payload: payload is not UTF-8")), "{reasons:?}");
    let raw = found.iter().find(|(r, _)| r.reason.starts_with("undecodable")).expect("raw").1.clone();
    assert_eq!(&raw[..], &[0xff, 0xfe, 0x00], "the original bytes are kept");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn messages_waiting_for_a_slot_are_kept_alive_not_redelivered() {
    // Above concurrency 1 the listener holds up to `concurrency` extra messages
    // waiting for a slot; here each waits longer than the ack wait.
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(1500));
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.ack_wait = Duration::from_secs(1);
    config.concurrency = 2;
    config.request_timeout = Duration::from_secs(10);
    let listener = ListenerHandle::spawn(config);
    for i in 0..6 {
        send(&js, &fixture, "kaan", "nova", &format!("slow {i}")).await;
    }
    gw.wait_for(6, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let mut texts: Vec<String> = gw.requests().iter().map(|r| r.text().to_owned()).collect();
    texts.sort();
    let expected: Vec<String> = (0..6).map(|i| format!("[mesh] Message from kaan: slow {i}")).collect();
    assert_eq!(texts, expected, "each message once, none redelivered while it waited");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_slow_gateway_gets_in_progress_acks_not_a_duplicate() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(3500));
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.ack_wait = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(10);
    let listener = ListenerHandle::spawn(config);
    send(&js, &fixture, "kaan", "nova", "take your time").await;
    gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 1, "the gateway took 3.5x the ack wait and still got one request");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_thousand_messages_with_random_failures_arrive_once_each_in_order() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_failure_rate(0.1, 42);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    mesh_listener::nats::ensure_consumer(&js, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..1000 {
        let envelope = mesh_protocol::Envelope::new(
            "kaan",
            mesh_protocol::Recipient::Agent("nova".parse().unwrap()),
            format!("{i}"),
        )
        .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
        acks.push(
            js.publish_with_headers("agents.nova.inbox", headers, envelope.encode().unwrap().into()).await.unwrap(),
        );
    }
    for ack in acks {
        ack.await.expect("publish acked");
    }
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.base = Duration::from_millis(5);
    config.retry.max = Duration::from_millis(20);
    config.retry.max_deliver = 50;
    let listener = ListenerHandle::spawn(config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while gw.successes().len() < 1000 {
        assert!(tokio::time::Instant::now() < deadline, "{} of 1000 delivered", gw.successes().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until_settled(&js, "nova", WAIT).await;
    let delivered: Vec<u32> =
        gw.successes().iter().map(|r| r.text().rsplit(' ').next().unwrap().parse().unwrap()).collect();
    let failures = gw.requests().len() - delivered.len();
    let unique: BTreeSet<_> = delivered.iter().collect();
    let duplicates = delivered.len() - unique.len();
    println!("1000 messages: {failures} scripted 500s, {duplicates} duplicate deliveries");
    assert!(failures > 50, "the failure script ran ({failures} failures)");
    assert_eq!(duplicates, 0);
    assert_eq!(delivered, (0..1000).collect::<Vec<_>>(), "order kept at concurrency 1");
    assert!(dead_letters(&js).await.is_empty());
    listener.stop().await.expect("stop");
}

fn chat_agent(gw: &RecordingGateway, name: &str) -> serde_json::Value {
    serde_json::json!({
        "gateway": gw.addr.to_string(),
        "gateway_token": format!("{name}-gateway-token"),
        "hooks_token": format!("{name}-hook-token"),
        "hooks_url": gw.hooks_url(),
        "delivery": "chat",
        "model": "test-model",
    })
}

#[tokio::test]
async fn a_chat_reply_reaches_the_sender_inbox() {
    let nats = TestNats::start().await;
    let (ada_gw, nova_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    ada_gw.set_chat_reply("4");
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": chat_agent(&ada_gw, "ada"),
        "nova": {"hooks_token": "nova-hook-token", "hooks_url": nova_gw.hooks_url()},
    }));
    let js = nats.jetstream().await;
    // Every registered agent has its consumer (a reply to one without is refused).
    mesh_listener::nats::ensure_consumer(&js, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, Selection::All));
    let id = send(&js, &fixture, "nova", "ada", "2+2?").await;
    let asked = ada_gw.wait_for(1, WAIT).await;
    assert_eq!(asked[0].path, "/v1/chat/completions");
    assert_eq!(asked[0].authorization.as_deref(), Some("Bearer ada-gateway-token"));
    assert_eq!(asked[0].body["model"], "test-model");
    let replied = nova_gw.wait_for(1, WAIT).await;
    assert_eq!(replied[0].text(), "[mesh] Reply from ada: 4");
    wait_until_settled(&js, "nova", WAIT).await;
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    let reply = stream.get_last_raw_message_by_subject("agents.nova.inbox.ada").await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!((reply["kind"].as_str(), reply["hops"].as_u64()), (Some("reply"), Some(1)));
    assert_eq!(reply["metadata"]["in_reply_to"], id.to_string());
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn the_loop_guard_stops_two_chat_agents_answering_each_other() {
    let nats = TestNats::start().await;
    let (a_gw, b_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    a_gw.set_chat_reply("ping");
    b_gw.set_chat_reply("pong");
    let fixture = Fixture::from_json(&serde_json::json!({"a": chat_agent(&a_gw, "a"), "b": chat_agent(&b_gw, "b")}));
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::All);
    config.max_hops = 3;
    mesh_listener::nats::ensure_consumer(&js, &"a".parse().unwrap(), Default::default()).await.unwrap();
    let listener = ListenerHandle::spawn(config);
    send(&js, &fixture, "a", "b", "start").await;
    // b answers (hop 1), a answers (hop 2), b answers (hop 3), a's answer would be hop 4: stopped.
    b_gw.wait_for(2, WAIT).await;
    a_gw.wait_for(2, WAIT).await;
    wait_until_settled(&js, "a", WAIT).await;
    wait_until_settled(&js, "b", WAIT).await;
    assert_eq!((a_gw.requests().len(), b_gw.requests().len()), (2, 2), "the conversation stopped at the hop limit");
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 4, "start plus three replies");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn all_mode_follows_registry_changes_and_token_rotation() {
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova_gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    send(&js, &fixture, "cli:t", "nova", "one").await;
    nova_gw.wait_for(1, WAIT).await;

    // Add kaan at run time.
    let write = |agents: serde_json::Value| std::fs::write(&fixture.registry, agents.to_string()).unwrap();
    let nova = serde_json::json!({"hooks_token": "nova-hook-token", "hooks_url": nova_gw.hooks_url()});
    write(serde_json::json!({"nova": nova, "kaan": {"hooks_token": "kaan-old", "hooks_url": kaan_gw.hooks_url()}}));
    send(&js, &fixture, "cli:t", "kaan", "welcome").await;
    let got = kaan_gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer kaan-old"));

    // Rotate kaan's token: the next request uses the new one.
    write(serde_json::json!({"nova": nova, "kaan": {"hooks_token": "kaan-new", "hooks_url": kaan_gw.hooks_url()}}));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Counted before sending: the delivery can beat the next line.
        let n = kaan_gw.requests().len() + 1;
        send(&js, &fixture, "cli:t", "kaan", "after rotation").await;
        let last = kaan_gw.wait_for(n, WAIT).await.pop().unwrap();
        if last.authorization.as_deref() == Some("Bearer kaan-new") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "rotated token not used within {WAIT:?}");
    }
    let before = kaan_gw.requests().len();
    send(&js, &fixture, "cli:t", "kaan", "once more").await;
    let after = kaan_gw.wait_for(before + 1, WAIT).await;
    assert_eq!(
        after.last().unwrap().authorization.as_deref(),
        Some("Bearer kaan-new"),
        "the old token is used no more"
    );

    // Remove nova: its loop stops, and the bot (the harness's part) deletes its
    // consumer, so a nova added back later starts afresh (issue 20, item 11).
    write(serde_json::json!({"kaan": {"hooks_token": "kaan-new", "hooks_url": kaan_gw.hooks_url()}}));
    let deadline = tokio::time::Instant::now() + WAIT;
    while control.fleet.get(&"nova".parse().unwrap()).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "nova's listener did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It held nothing: the bot deletes it (one holding a backlog it keeps, see agents.rs).
    let deadline = tokio::time::Instant::now() + WAIT;
    while js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "a removed agent's consumer was not deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nova_before = nova_gw.requests().len();
    js.publish("agents.nova.inbox", "left for later".into()).await.unwrap().await.unwrap();
    let kaan_before = kaan_gw.requests().len();
    send(&js, &fixture, "cli:t", "kaan", "still here").await;
    let got = kaan_gw.wait_for(kaan_before + 1, WAIT).await;
    assert!(got.last().unwrap().text().ends_with("still here"));
    wait_until_settled(&js, "kaan", WAIT).await;
    assert_eq!(nova_gw.requests().len(), nova_before, "a removed agent gets nothing");
    assert!(js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.is_err());

    listener.stop().await.expect("listener stops cleanly");
}

#[tokio::test]
async fn kill_9_mid_delivery_then_restart_redelivers() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(500));
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let spawn = || {
        tokio::process::Command::new(listener_bin())
            .args(["--agent", "nova", "--ack-wait", "2"])
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("listener")
    };
    let tuning = mesh_tests::fixtures::listener_tuning(1, Duration::from_secs(2));
    mesh_tests::fixtures::provision_agent(&js, "nova", tuning).await.unwrap();
    let mut first = spawn();
    let id = send(&js, &fixture, "kaan", "nova", "survive a crash").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.requests().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "first delivery never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.start_kill().expect("kill -9");
    first.wait().await.expect("reaped");
    let mut second = spawn();
    let got = gw.wait_for(2, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert!(got.iter().all(|r| r.idempotency_key.as_deref() == Some(format!("nova:{id}").as_str())));
    assert_eq!(got.len(), 2, "one interrupted delivery, one redelivery: {got:?}");
    second.start_kill().unwrap();
}

#[tokio::test]
async fn a_nats_restart_mid_stream_loses_nothing() {
    let mut nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    // A message the old server sent but the listener never got waits one ack
    // wait before redelivery; a short one keeps the test short.
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.ack_wait = Duration::from_secs(3);
    let listener = ListenerHandle::spawn(config);
    let publisher =
        async_nats::ConnectOptions::new().retry_on_initial_connect().connect(nats.url()).await.expect("publisher");
    let js = jetstream::new(publisher);
    mesh_listener::nats::ensure_streams(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    mesh_listener::nats::ensure_consumer(&js, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    let mut acked = BTreeMap::new();
    for i in 0..300u32 {
        if i == 150 {
            nats.server.restart().await.expect("restart on the same store");
        }
        let envelope = mesh_protocol::Envelope::new(
            "kaan",
            mesh_protocol::Recipient::Agent("nova".parse().unwrap()),
            format!("{i}"),
        )
        .unwrap();
        // A publish whose ack was lost is retried with the same id: JetStream deduplicates.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
            let published =
                js.publish_with_headers("agents.nova.inbox", headers, envelope.encode().unwrap().into()).await;
            if let Ok(ack) = published
                && ack.await.is_ok()
            {
                acked.insert(i, envelope.id);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "publish {i} never acked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: BTreeSet<u32> =
            gw.successes().iter().filter_map(|r| r.text().rsplit(' ').next()?.parse().ok()).collect();
        if acked.keys().all(|i| delivered.contains(i)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acked messages delivered",
            delivered.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = gw.successes().len();
    println!("nats restart: {} acked, {total} deliveries ({} duplicates)", acked.len(), total - acked.len());
    listener.stop().await.expect("stop");
}
