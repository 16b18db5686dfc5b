//! Two `mesh bot` replicas against one nats-server and one redis-server, with
//! Slack's API a local recorder: each event (a broadcast, a kill switch
//! change, an agent going down and coming back) is posted once in the notify
//! channel, and a confirmation code asked for on one replica is confirmed on
//! the other, once.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_tests::bot::BotProcess;
use mesh_tests::fixtures::mesh_command;
use mesh_tests::redis::TestRedis;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "test-signing-secret-0123456789";
const POST_MESSAGE: &str = "/api/chat.postMessage";

/// One `mesh bot` process, started by the suite's one bot harness.
struct Replica {
    bot: BotProcess,
    url: String,
}

async fn replica(nats: &TestNats, fixture: &Fixture, slack: &RecordingGateway, redis: &TestRedis) -> Replica {
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(&permissions, serde_json::json!({"admin": ["slack:UADMIN"]}).to_string()).unwrap();
    let bot = BotProcess::start(
        &nats.url(),
        &fixture.registry,
        [
            ("MESH_PERMISSIONS", permissions.into_os_string()),
            ("REDIS_URL", redis.url().into()),
            ("SLACK_SIGNING_SECRET", SECRET.into()),
            ("SLACK_BOT_TOKEN", "xoxb-test-bot-token-0123456789".into()),
            ("SLACK_API_URL", format!("http://{}/api", slack.addr).into()),
            ("SLACK_RESPONSE_URL_PREFIX", format!("http://{}/", slack.addr).into()),
            ("SLACK_NOTIFY_CHANNEL", "CNOTIFY".into()),
            ("MESH_MONITOR_EVERY_S", "1".into()),
            ("MESH_LOG", "debug".into()),
        ],
    )
    .await;
    let url = bot.url.clone();
    Replica { bot, url }
}

impl Replica {
    /// Sends a signed slash command; its answer goes to `/commands/<n>` on the Slack recorder.
    async fn command(&self, slack: &RecordingGateway, text: &str, n: u32) {
        mesh_tests::bot::slack_command(&self.url, SECRET, slack.addr, "UADMIN", text, n).await;
    }
}

/// The answer to slash command `n`, as JSON text.
async fn answer(slack: &RecordingGateway, n: u32) -> String {
    slack.wait_for_path(&format!("/commands/{n}"), 1, WAIT).await[0].body.to_string()
}

/// How many notify posts hold `needle`.
fn posts_with(slack: &RecordingGateway, needle: &str) -> usize {
    slack
        .requests_to(POST_MESSAGE)
        .iter()
        .filter(|p| p.body["channel"] == "CNOTIFY")
        .map(|p| p.body["blocks"].to_string().matches(needle).count())
        .sum()
}

async fn wait_for_post(slack: &RecordingGateway, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while posts_with(slack, needle) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no post holds {needle:?}: {:?}", slack.requests());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every consumer of the events stream (the relays') has
/// acknowledged everything in it: a relay acknowledges an event once posted.
async fn wait_until_relayed(js: &async_nats::jetstream::Context) {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream("MESH_EVENTS").await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let consumers: Vec<_> = stream.consumers().collect::<Vec<_>>().await.into_iter().map(Result::unwrap).collect();
        let settled = |c: &async_nats::jetstream::consumer::Info| {
            c.num_pending == 0 && c.num_ack_pending == 0 && c.delivered.stream_sequence >= last
        };
        if !consumers.is_empty() && consumers.iter().all(settled) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the events were not all relayed within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The code in a "type \"confirm K7P2QX\"" answer.
fn code_in(answer: &str) -> String {
    let at = answer.find("confirm ").expect("the answer names a code") + "confirm ".len();
    answer[at..at + 6].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_post_each_event_once_and_share_confirmation_codes() {
    let nats = TestNats::start().await;
    let redis = TestRedis::start().await;
    let nova = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &nova, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let slack = RecordingGateway::start().await;
    slack.respond_with(
        POST_MESSAGE,
        serde_json::json!({"ok": true, "channel": "CNOTIFY", "ts": "1700000000.000100",
                           "message": {"text": "posted", "ts": "1700000000.000100"}}),
    );
    let a = replica(&nats, &fixture, &slack, &redis).await;
    let b = replica(&nats, &fixture, &slack, &redis).await;
    let js = nats.jetstream().await;
    // Both relays are pulling, and both monitors have seen nova up.
    for bot in [&a, &b] {
        bot.bot.wait_for_output("notifications relay following events", WAIT).await.unwrap();
        bot.bot.wait_for_output("fleet monitor watching", WAIT).await.unwrap();
    }

    // A broadcast from the terminal.
    let sent = mesh_command(&nats.url(), &fixture.registry).args(["broadcast", "maintenance tonight"]).output().await;
    assert!(sent.unwrap().status.success());
    wait_for_post(&slack, "maintenance tonight").await;

    // A code asked for on one replica, confirmed on the other, once.
    a.command(&slack, "kill hard -- drill", 1).await;
    let code = code_in(&answer(&slack, 1).await);
    b.command(&slack, &format!("confirm {code}"), 2).await;
    let confirmed = answer(&slack, 2).await;
    assert!(confirmed.contains("HARD"), "the other replica ran it: {confirmed}");
    a.command(&slack, &format!("confirm {code}"), 3).await;
    let again = answer(&slack, 3).await;
    assert!(again.contains("no action is waiting for code"), "a code works once across replicas: {again}");
    wait_for_post(&slack, "kill switch pulled").await;
    let resumed = mesh_command(&nats.url(), &fixture.registry).args(["resume", "--yes"]).output().await.unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    wait_for_post(&slack, "kill switch released").await;

    // nova's listener goes away, then comes back.
    listener.stop().await.unwrap();
    wait_for_post(&slack, "agent nova is down").await;
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    wait_for_post(&slack, "agent nova is back").await;
    // Both replicas saw it come back (each logs the changes it sees), so each had its chance to post.
    for bot in [&a, &b] {
        bot.bot.wait_for_output("agent nova is back", WAIT).await.unwrap();
    }
    wait_until_relayed(&js).await;

    for needle in [
        "maintenance tonight",
        "kill switch pulled",
        "kill switch released",
        "agent nova is down",
        "agent nova is back",
    ] {
        assert_eq!(posts_with(&slack, needle), 1, "{needle:?} posted once: {:?}", slack.requests_to(POST_MESSAGE));
    }
    listener.stop().await.unwrap();
    drop((a.bot.stop().await, b.bot.stop().await));
}
