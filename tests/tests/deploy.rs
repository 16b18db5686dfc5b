//! `mesh deploy render` against a real nats-server started with the rendered
//! `nats.conf`: a listener user consumes its own agent's messages and answers
//! pings, but may not subscribe to another agent's subjects, snoop on other
//! clients' inboxes or publish where it must not; the bot user sends, pings and
//! pulls the kill switch, and the listener user creates or changes nothing in
//! JetStream (no consumer, stream or bucket): it waits for what the bot creates
//! and refuses to run on what is set up otherwise. Also: the compose and
//! Prometheus files are well formed, and every metric the alert rules use is
//! on a live scrape of a listener's and the bot's `/metrics`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use mesh_tests::fixtures::{Logged, listener_bin, mesh_command};
use mesh_tests::{Fixture, RecordingGateway};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORDS: [(&str, &str); 5] = [
    ("LISTENER_NOVA_NATS_PASSWORD", "pw-nova-1"),
    ("LISTENER_ADA_NATS_PASSWORD", "pw-ada-1"),
    ("LISTENER_KAAN_NATS_PASSWORD", "pw-kaan-1"),
    ("MESH_BOT_NATS_PASSWORD", "pw-bot-1"),
    ("MESH_ADMIN_NATS_PASSWORD", "pw-admin-1"),
];

/// nats-server with the rendered config on free ports, killed on drop.
struct ConfiguredNats {
    _child: tokio::process::Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl ConfiguredNats {
    async fn start(conf: &Path) -> Self {
        let store = tempfile::tempdir().unwrap();
        let port = mesh_bot::local_nats::free_port().unwrap();
        let monitor = mesh_bot::local_nats::free_port().unwrap();
        let mut command = tokio::process::Command::new("nats-server");
        command
            .arg("-c")
            .arg(conf)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-sd"])
            .arg(store.path())
            .envs(PASSWORDS)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("nats-server (run scripts/install.sh)");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(child.try_wait().unwrap().is_none(), "nats-server refused the rendered config");
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { _child: child, port, _store: store }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Speaks the NATS protocol directly: connects as `user`, sends `lines`, then
/// PING, and returns everything the server said up to the PONG.
async fn raw(port: u16, user: &str, pass: &str, lines: &[String]) -> String {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut info = String::new();
    read.read_line(&mut info).await.unwrap();
    let connect = serde_json::json!({"verbose": false, "pedantic": false, "user": user, "pass": pass, "headers": true, "protocol": 1});
    let mut out = format!("CONNECT {connect}\r\n");
    for line in lines {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("PING\r\n");
    write.write_all(out.as_bytes()).await.unwrap();
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, read.read_line(&mut line)).await.unwrap().unwrap();
        said.push_str(&line);
        if n == 0 || line.starts_with("PONG") || said.contains("Authorization Violation") {
            return said;
        }
    }
}

fn sub(subject: &str, sid: u32) -> String {
    format!("SUB {subject} {sid}")
}

fn publish(subject: &str) -> String {
    format!("PUB {subject} 2\r\nhi")
}

/// A JetStream API request as a listener would send it (reply under its own inbox prefix).
fn request(subject: &str, payload: &serde_json::Value) -> String {
    let body = payload.to_string();
    format!("PUB {subject} _INBOX_nova.r1 {}\r\n{body}", body.len())
}

#[tokio::test]
async fn rendered_permissions_hold_on_a_real_server() {
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"gateway": nova_gw.addr.to_string(), "hooks_token": "nova-hook-token", "hooks_url": nova_gw.hooks_url()},
        "kaan": {"hooks_token": "kaan-hook-token", "hooks_url": kaan_gw.hooks_url()},
        "ada": {"hooks_token": "ada-hook-token", "gateway_token": "ada-gw-token", "delivery": "chat", "model": "m",
                "hooks_url": kaan_gw.hooks_url()},
    }));
    let out_dir = fixture.dir().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry)
        .args(["deploy", "render", "--out", out_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in ["nats.conf", "docker-compose.agents.yml", "prometheus-listeners.json", "env.example"] {
        let text = std::fs::read_to_string(out_dir.join(file)).unwrap();
        for (_, pw) in PASSWORDS {
            assert!(!text.contains(pw));
        }
        assert!(!text.contains("nova-hook-token"), "{file} holds a token");
    }
    let env_example = std::fs::read_to_string(out_dir.join("env.example")).unwrap();
    for (var, _) in PASSWORDS {
        assert!(env_example.contains(&format!("{var}=\n")), "{env_example}");
    }
    let nats = ConfiguredNats::start(&out_dir.join("nats.conf")).await;
    let port = nats.port;

    // Wrong password, and no credentials at all: refused.
    assert!(raw(port, "listener-nova", "wrong", &[]).await.contains("Authorization Violation"));
    assert!(raw(port, "", "", &[]).await.contains("Authorization Violation"));

    // The listener user: allowed where it must be, refused elsewhere.
    let nova = |lines: Vec<String>| async move { raw(port, "listener-nova", "pw-nova-1", &lines).await };
    let ok = nova(vec![
        sub("mesh.health.ping", 1),
        sub("_INBOX_nova.x.>", 2),
        sub("$KV.mesh_killswitch.global", 3),
        sub("$KV.mesh_killswitch.agent.nova", 4),
        publish("mesh.dlq.nova"),
        publish("mesh.health.pong"),
        request("$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.agent.nova", &serde_json::json!({})),
    ])
    .await;
    assert!(!ok.contains("-ERR"), "{ok}");
    for (line, what) in [
        (sub("agents.kaan.inbox", 1), "Subscription to \"agents.kaan.inbox\""),
        (sub("agents.nova.inbox", 1), "Subscription to \"agents.nova.inbox\""),
        (sub("agents.>", 1), "Subscription to \"agents.>\""),
        (sub("_INBOX.>", 1), "Subscription to \"_INBOX.>\""),
        (sub("_INBOX_kaan.>", 1), "Subscription to \"_INBOX_kaan.>\""),
        (publish("agents.kaan.inbox"), "Publish to \"agents.kaan.inbox\""),
        (publish("agents.broadcast"), "Publish to \"agents.broadcast\""),
        (publish("mesh.dlq.kaan"), "Publish to \"mesh.dlq.kaan\""),
        (publish("$JS.API.CONSUMER.MSG.NEXT.MESH_AGENTS.agent-kaan"), "agent-kaan"),
        (publish("$JS.API.STREAM.DELETE.MESH_AGENTS"), "STREAM.DELETE"),
        (publish("$KV.mesh_killswitch.global"), "$KV.mesh_killswitch.global"),
        (sub("$KV.mesh_killswitch.agent.kaan", 1), "Subscription to \"$KV.mesh_killswitch.agent.kaan\""),
        (sub("$KV.mesh_killswitch.>", 1), "Subscription to \"$KV.mesh_killswitch.>\""),
    ] {
        let said = nova(vec![line.clone()]).await;
        assert!(said.contains("Permissions Violation") && said.contains(what), "{line}: {said}");
    }
    // Issue 19: the listener may not create or update its consumer (with
    // `agents.*.inbox` it would read every inbox), any stream, or the kill switch bucket.
    let wildcard = serde_json::json!({"stream_name": "MESH_AGENTS", "config": {
        "durable_name": "agent-nova", "ack_policy": "explicit", "deliver_policy": "all",
        "filter_subjects": ["agents.*.inbox", "agents.broadcast"]}});
    let evil = serde_json::json!({"stream_name": "KV_mesh_killswitch", "config": {
        "name": "evil", "deliver_subject": "agents.a2.inbox", "ack_policy": "none", "deliver_policy": "all"}});
    let stream = |name: &str, subjects: &[&str], max_age: u64| serde_json::json!({"name": name, "subjects": subjects, "max_age": max_age, "storage": "file"});
    for (subject, payload) in [
        ("$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-nova", wildcard.clone()),
        ("$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-nova.agents.>", wildcard.clone()),
        ("$JS.API.CONSUMER.DURABLE.CREATE.MESH_AGENTS.agent-nova", wildcard.clone()),
        ("$JS.API.CONSUMER.CREATE.MESH_AGENTS", wildcard.clone()),
        ("$JS.API.STREAM.CREATE.MESH_AGENTS", stream("MESH_AGENTS", &["agents.>"], 0)),
        ("$JS.API.STREAM.UPDATE.MESH_AGENTS", stream("MESH_AGENTS", &["agents.>"], 0)),
        ("$JS.API.STREAM.CREATE.MESH_DLQ", stream("MESH_DLQ", &["mesh.dlq.*"], 1_000_000_000)),
        (
            "$JS.API.STREAM.CREATE.KV_mesh_killswitch",
            stream("KV_mesh_killswitch", &["$KV.mesh_killswitch.>"], 1_000_000_000),
        ),
        (
            "$JS.API.STREAM.UPDATE.KV_mesh_killswitch",
            stream("KV_mesh_killswitch", &["$KV.mesh_killswitch.>"], 1_000_000_000),
        ),
        // Review of `sec`: a consumer of any kind on the bucket's stream, pushed
        // at any subject, amplified every kill switch entry there.
        ("$JS.API.CONSUMER.CREATE.KV_mesh_killswitch.evil", evil.clone()),
        ("$JS.API.CONSUMER.CREATE.KV_mesh_killswitch", evil.clone()),
        ("$JS.API.CONSUMER.DELETE.KV_mesh_killswitch.evil", serde_json::json!({})),
        ("$JS.API.STREAM.MSG.GET.KV_mesh_killswitch", serde_json::json!({"seq": 1})),
        ("$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.agent.kaan", serde_json::json!({})),
        // Issue 18: the server-side pause of the kill switch. A listener may
        // neither lift it (an empty request resumes) nor set one.
        ("$JS.API.CONSUMER.PAUSE.MESH_AGENTS.agent-nova", serde_json::json!({})),
        ("$JS.API.CONSUMER.PAUSE.MESH_AGENTS.agent-nova", serde_json::json!({"pause_until": "2999-01-01T00:00:00Z"})),
        ("$JS.API.CONSUMER.PAUSE.MESH_AGENTS.agent-kaan", serde_json::json!({})),
        (
            "$JS.API.DIRECT.GET.KV_mesh_killswitch",
            serde_json::json!({"last_by_subj": "$KV.mesh_killswitch.agent.kaan"}),
        ),
    ] {
        let said = nova(vec![request(subject, &payload)]).await;
        assert!(said.contains("Permissions Violation") && said.contains(subject), "{subject}: {said}");
    }
    // Only a chat-mode listener may publish replies into other agents' inboxes,
    // and look up (never create) their consumers before it does.
    let said = raw(
        port,
        "listener-ada",
        "pw-ada-1",
        &[
            publish("agents.nova.inbox.ada"),
            publish("mesh.reply.bot.abc.ada"),
            publish("$JS.API.CONSUMER.INFO.MESH_AGENTS.agent-nova"),
        ],
    )
    .await;
    assert!(!said.contains("-ERR"), "{said}");
    let said =
        raw(port, "listener-ada", "pw-ada-1", &[publish("$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-nova")]).await;
    assert!(said.contains("Permissions Violation") && said.contains("CONSUMER.CREATE"), "{said}");
    let said = nova(vec![publish("$JS.API.CONSUMER.INFO.MESH_AGENTS.agent-kaan")]).await;
    assert!(said.contains("Permissions Violation") && said.contains("agent-kaan"), "{said}");
    // The bot may not delete a stream either.
    let said = raw(port, "mesh-bot", "pw-bot-1", &[publish("$JS.API.STREAM.DELETE.MESH_AGENTS")]).await;
    assert!(said.contains("Permissions Violation"), "{said}");

    // The real listener, as its user, consumes its agent's messages sent by the bot user.
    let mut listener = tokio::process::Command::new(listener_bin());
    listener
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("AGENT_ID", "nova")
        .env("NATS_USER", "listener-nova")
        .env("NATS_PASSWORD", "pw-nova-1")
        .env("MESH_INBOX_PREFIX", "_INBOX_nova");
    let listener = Logged::spawn(listener);
    let bot = |args: &'static [&'static str]| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command
            .args(args)
            .env("NATS_USER", "mesh-bot")
            .env("NATS_PASSWORD", "pw-bot-1")
            .env("MESH_INBOX_PREFIX", "_INBOX_bot");
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.success(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    let (ok, said) = bot(&["send", "nova", "through the permissions"]).await;
    assert!(ok, "{said}");
    let got = nova_gw.wait_for(1, WAIT).await;
    assert!(got[0].text().contains("through the permissions"));
    let (ok, said) = bot(&["broadcast", "to everyone"]).await;
    assert!(ok, "{said}");
    nova_gw.wait_for(2, WAIT).await;
    // Pings reach the listener and its pong comes back (allow_responses); the
    // kill switch reaches it through its read-only watch of the bucket.
    let nova_state = |said: &str| -> Option<String> {
        let report: serde_json::Value = serde_json::from_str(said.lines().next()?).ok()?;
        let row = report["data"]["rows"].as_array()?.iter().find(|r| r["agent"] == "nova")?.clone();
        row["rtt_ms"].is_number().then(|| row["state"].as_str().unwrap_or_default().to_owned())
    };
    let wait_state = |want: &'static [&'static str]| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, said) = bot(&["ping", "--json", "--timeout-ms", "500"]).await;
            if nova_state(&said).is_some_and(|s| want.contains(&s.as_str())) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "nova never reported {want:?}: {said}");
        }
    };
    wait_state(&["ok", "gateway unknown"]).await;
    let (ok, said) = bot(&["kill", "soft", "--for", "1m", "--reason", "permission test"]).await;
    assert!(ok, "{said}");
    wait_state(&["paused"]).await;
    let (ok, said) = bot(&["resume", "--yes"]).await;
    assert!(ok, "{said}");
    wait_state(&["ok", "gateway unknown"]).await;
    // Without a consumer on the bucket, a hard kill and the resume still reach
    // it through its two key subscriptions, well before its 5 s re-read.
    let pulled = std::time::Instant::now();
    let (ok, said) = bot(&["kill", "hard", "--agent", "nova", "--reason", "permission test", "--yes"]).await;
    assert!(ok, "{said}");
    wait_state(&["paused"]).await;
    let paused_after = pulled.elapsed();
    // The bot user may pause the consumer on the server, and read it back.
    let (_, status) = bot(&["status"]).await;
    assert!(status.contains("agent-nova: paused until resumed"), "{status}");
    let resumed = std::time::Instant::now();
    let (ok, said) = bot(&["resume", "--agent", "nova", "--yes"]).await;
    assert!(ok, "{said}");
    wait_state(&["ok", "gateway unknown"]).await;
    let resumed_after = resumed.elapsed();
    let (_, status) = bot(&["status"]).await;
    assert!(status.contains("agent-nova: not paused"), "{status}");
    assert!(
        paused_after < mesh_listener::killswitch::RESYNC_EVERY
            && resumed_after < mesh_listener::killswitch::RESYNC_EVERY,
        "paused after {paused_after:?}, resumed after {resumed_after:?}: the change was not followed live"
    );
    // A message the gateway refuses becomes a dead letter (the listener may publish mesh.dlq.nova).
    nova_gw.script([400]);
    let (ok, said) = bot(&["send", "nova", "refused on purpose"]).await;
    assert!(ok, "{said}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, said) = bot(&["dlq", "nova", "--json"]).await;
        if said.contains("refused on purpose") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter for nova: {said}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, said) = bot(&["dlq"]).await;
    assert!(ok, "{said}");
    let log = listener.kill().await;
    assert!(!log.contains("Permissions Violation") && !log.contains("permissions violation"), "{log}");
    assert!(!log.contains("pw-nova-1"), "the password reached a log");
}

/// A compose volume line as (source, target, read-only); the source may hold
/// a `${VAR:-default}` with a colon of its own.
fn mount(line: &str) -> (String, String, bool) {
    let parts: Vec<&str> = line.rsplitn(3, ':').collect();
    match parts.as_slice() {
        ["ro", target, source] => ((*source).to_owned(), (*target).to_owned(), true),
        [mode, target, source] if mode.len() <= 2 => ((*source).to_owned(), (*target).to_owned(), false),
        [target, source, head] => (format!("{head}:{source}"), (*target).to_owned(), false),
        [target, source] => ((*source).to_owned(), (*target).to_owned(), false),
        _ => (String::new(), line.to_owned(), false),
    }
}

/// Where prometheus.yml reads the listener targets.
fn prometheus_targets_path(deploy: &Path) -> String {
    let prometheus = yaml(&deploy.join("prometheus/prometheus.yml"));
    let jobs = prometheus["scrape_configs"].as_array().unwrap();
    let listener = jobs.iter().find(|j| j["job_name"] == "listener").unwrap();
    listener["file_sd_configs"][0]["files"][0].as_str().unwrap().to_owned()
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not well-formed YAML: {e}", path.display()))
}

/// The metric names the alert rules' expressions use (histogram suffixes
/// dropped), by rule.
fn alert_metrics(deploy: &Path) -> Vec<(String, String)> {
    let alerts = yaml(&deploy.join("prometheus/alerts.yml"));
    let mut used = Vec::new();
    for rule in alerts["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("mesh_")) {
            let metric = word.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            used.push((rule["alert"].as_str().unwrap().to_owned(), metric.to_owned()));
        }
    }
    used
}

/// The value of the sample `series` (name and labels, as rendered) in a
/// Prometheus text scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET path` on a local port: the body of a 200, else `None`.
async fn get(http: &reqwest::Client, port: u16, path: &str) -> Option<String> {
    let response = http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// Scrapes until `ready` holds on the scrape (the gauges are set on timers), panicking after [`WAIT`].
async fn scrape_until(http: &reqwest::Client, port: u16, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let scrape = get(http, port, "/metrics").await.unwrap_or_default();
        if ready(&scrape) {
            return scrape;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}'s /metrics never showed it:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 21.7 live: the `mesh-listener` binary with `--http` after a delivery,
/// and `mesh bot` with a kill in force and a message waiting, serve every
/// metric the alert rules use, with values that reflect what happened.
#[tokio::test]
async fn a_live_scrape_of_a_listener_and_the_bot_shows_every_metric_the_alerts_use() {
    use mesh_listener::config::Selection;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy");
    let nats = mesh_tests::TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova_gw, true), ("kaan", &kaan_gw, true)]);
    let provisioner = mesh_tests::fixtures::provision(&fixture.listener_config(&nats, Selection::All)).await;
    // kaan is hard-killed (no listener either): its message waits.
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args(["kill", "hard", "--agent", "kaan", "--yes"])
        .env_remove("MESH_PERMISSIONS")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    for (to, text) in [("kaan", "waits"), ("nova", "arrives")] {
        mesh_bot::publish::send(&js, &registry, "cli:test", to, text, Default::default()).await.unwrap();
    }

    let listener_port = mesh_bot::local_nats::free_port().unwrap();
    let listener = Logged::spawn({
        let mut command = tokio::process::Command::new(listener_bin());
        command
            .args(["--agent", "nova", "--http", &format!("127.0.0.1:{listener_port}")])
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry);
        command
    });
    nova_gw.wait_for(1, WAIT).await;
    mesh_tests::fixtures::wait_until_settled(&js, "nova", WAIT).await;
    let bot = mesh_tests::bot::BotProcess::start(&nats.url(), &fixture.registry, [("MESH_MONITOR_EVERY_S", "1")]).await;
    let bot_port = bot.addr.port();

    mesh_listener::gateway::install_tls_provider();
    let http = reqwest::Client::new();
    let pending = r#"mesh_pending_messages{agent="nova"}"#;
    let listener_scrape = scrape_until(&http, listener_port, "the listener", |s| sample(s, pending) == Some(0.0)).await;
    let value = |series: &str| sample(&listener_scrape, series);
    assert_eq!(value(r#"mesh_deliveries_total{agent="nova",outcome="delivered"}"#), Some(1.0), "{listener_scrape}");
    assert_eq!(value(r#"mesh_deliveries_total{agent="nova",outcome="retry"}"#), Some(0.0), "{listener_scrape}");
    assert_eq!(value(r#"mesh_deliveries_total{agent="nova",outcome="dead_letter"}"#), Some(0.0), "{listener_scrape}");
    assert_eq!(value("mesh_publish_to_gateway_seconds_count"), Some(1.0), "{listener_scrape}");
    assert_eq!(value("mesh_gateway_request_seconds_count"), Some(1.0), "{listener_scrape}");
    assert_eq!(value(r#"mesh_paused{agent="nova"}"#), Some(0.0), "{listener_scrape}");

    let kill = r#"mesh_kill_in_force{agent="kaan",mode="hard"}"#;
    let waiting = r#"mesh_backlog_oldest_age_seconds{agent="kaan"}"#;
    let bot_scrape = scrape_until(&http, bot_port, "the bot", |s| {
        sample(s, kill) == Some(1.0) && sample(s, waiting).is_some_and(|age| age > 0.0)
    })
    .await;
    assert_eq!(sample(&bot_scrape, r#"mesh_backlog_oldest_age_seconds{agent="nova"}"#), Some(0.0), "{bot_scrape}");

    for (alert, metric) in alert_metrics(&deploy) {
        let scraped = |scrape: &str| scrape.lines().any(|l| l.starts_with(&metric) && !l.starts_with('#'));
        assert!(
            scraped(&listener_scrape) || scraped(&bot_scrape),
            "{alert} uses {metric}, which no live scrape shows:\n{listener_scrape}\n{bot_scrape}"
        );
    }
    let _ = bot.stop().await;
    let _ = listener.finish(true).await;
    provisioner.abort();
}

#[test]
fn compose_and_monitoring_files_are_well_formed() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy");
    // Alert rules: each with an expression over metrics the code exports
    // (the listener's, and the bot's kill switch gauge).
    let alerts = yaml(&deploy.join("prometheus/alerts.yml"));
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "NatsDown",
            "ListenerDown",
            "GatewayUnreachable",
            "DeliveryLatencyHigh",
            "BacklogAboutToExpire",
            "DeadLettersGrowing",
            "PendingBacklog",
            "PauseLongerThanPlanned"
        ]
    );
    use mesh_listener::metrics as m;
    let exported = [
        m::DELIVERIES,
        m::LATENCY,
        m::GATEWAY_DURATION,
        m::PENDING,
        m::PAUSED,
        m::REPLIES,
        m::LOOP_GUARD,
        m::BACKLOG_OLDEST_AGE,
        mesh_bot::kill_gauge::KILL_IN_FORCE,
    ];
    let expr_of = |name: &str| rules[names.iter().position(|n| *n == name).unwrap()]["expr"].as_str().unwrap();
    for (name, metric) in alert_metrics(&deploy) {
        assert!(
            exported.contains(&metric.as_str()),
            "{name} uses {metric}, which neither the listener nor the bot exports"
        );
    }
    for rule in rules {
        assert!(rule["annotations"]["summary"].is_string());
    }
    // Issue 21.7: a hard kill stops every listener on purpose: no ListenerDown then.
    let listener_down = expr_of("ListenerDown");
    assert!(
        listener_down.contains("unless") && listener_down.contains(mesh_bot::kill_gauge::KILL_IN_FORCE),
        "{listener_down}"
    );
    assert!(expr_of("PendingBacklog").contains(m::PENDING));
    assert!(expr_of("PauseLongerThanPlanned").contains(m::PAUSED));
    let prometheus = yaml(&deploy.join("prometheus/prometheus.yml"));
    let jobs: Vec<&str> =
        prometheus["scrape_configs"].as_array().unwrap().iter().map(|j| j["job_name"].as_str().unwrap()).collect();
    assert_eq!(jobs, ["nats", "listener", "bot"]);
    // Compose: every service unprivileged, read-only, restarting; published ports on loopback only.
    let compose = yaml(&deploy.join("docker-compose.yml"));
    let services = compose["services"].as_object().unwrap();
    for (name, service) in services {
        assert!(service["user"].is_string(), "{name} runs as root");
        assert_eq!(service["read_only"], true, "{name}");
        assert_eq!(service["restart"], "unless-stopped", "{name}");
        for port in service["ports"].as_array().into_iter().flatten() {
            assert!(port.as_str().unwrap().starts_with("127.0.0.1:"), "{name} publishes {port} beyond loopback");
        }
    }
    for name in ["bot", "nats-exporter", "prometheus"] {
        assert_eq!(services[name]["depends_on"]["nats"]["condition"], "service_healthy", "{name}");
    }
    // Issue 21.4: every service rotates its logs; the bot runs every front end
    // and takes its project from its own container's label, not from a variable.
    for (name, service) in services {
        assert_eq!(service["logging"]["driver"], "json-file", "{name}");
        assert!(service["logging"]["options"]["max-size"].is_string(), "{name} does not rotate its logs");
    }
    let bot_env = services["bot"]["environment"].as_object().unwrap();
    for key in
        ["SLACK_APP_TOKEN", "SLACK_BOT_TOKEN", "DISCORD_BOT_TOKEN", "DISCORD_APPLICATION_ID", "DISCORD_PUBLIC_KEY"]
    {
        assert!(bot_env.contains_key(key), "the bot gets no {key}");
    }
    assert!(!bot_env.contains_key("MESH_COMPOSE_PROJECT"), "a fixed project would act on another stack");
    // The monitoring profile starts on a fresh checkout: no mount point inside
    // a read-only bind (Docker cannot create it there), no log file on
    // Grafana's read-only root, and Prometheus reads the targets where they are mounted.
    for name in ["prometheus", "grafana"] {
        let mounts: Vec<(String, bool)> = services[name]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let (source, target, ro) = mount(v.as_str().unwrap());
                let bind = source.starts_with('.') || source.starts_with('/') || source.starts_with("${");
                (target, ro && bind)
            })
            .collect();
        for (inner, _) in &mounts {
            for (outer, read_only_bind) in &mounts {
                let nested = inner != outer && inner.starts_with(&format!("{outer}/"));
                assert!(!(nested && *read_only_bind), "{name}: {inner} is mounted inside the read-only bind {outer}");
            }
        }
    }
    assert_eq!(services["grafana"]["environment"]["GF_LOG_MODE"], "console");
    let targets = prometheus_targets_path(&deploy);
    let mounted = services["prometheus"]["volumes"].as_array().unwrap().iter().any(|v| {
        let (source, target, _) = mount(v.as_str().unwrap());
        source.contains("generated") && targets.starts_with(&format!("{target}/"))
    });
    assert!(mounted, "prometheus.yml reads {targets}, which no volume provides");
    for name in ["prometheus", "grafana", "nats-exporter"] {
        assert_eq!(services[name]["profiles"][0], "monitoring", "{name}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("grafana/dashboards/mesh.json")).unwrap()).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 4);
}

/// A listener process with its output in a file, so a test can wait for a line.
struct LoggedToFile {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl LoggedToFile {
    fn spawn(fixture: &Fixture, nats_url: &str, agent: &str) -> Self {
        let log = fixture.dir().join(format!("listener-{agent}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(listener_bin())
            .args(["--agent", agent])
            .env("NATS_URL", nats_url)
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_line(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.text().contains(line) {
            assert!(tokio::time::Instant::now() < deadline, "never logged {line:?}:\n{}", self.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit (bounded) and returns whether it succeeded.
    async fn exit(&mut self) -> bool {
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.unwrap().success(),
            Err(_) => panic!("the listener kept running:\n{}", self.text()),
        }
    }
}

/// Issue 19/20: a listener creates nothing. It waits, saying so, for the
/// streams and for its consumer, and runs once the bot's part created them.
#[tokio::test]
async fn a_listener_waits_for_what_the_bot_creates_and_creates_nothing() {
    let nats = mesh_tests::TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let mut listener = LoggedToFile::spawn(&fixture, &nats.url(), "nova");
    listener
        .wait_for_line("stream MESH_AGENTS does not exist yet; the bot (`mesh bot`) or `mesh agents add` creates it")
        .await;
    let js = async_nats::jetstream::new(nats.client().await);
    assert!(js.get_stream("MESH_AGENTS").await.is_err(), "the listener created a stream");
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    listener
        .wait_for_line("consumer agent-nova does not exist yet; the bot (`mesh bot`) or `mesh agents add` creates it")
        .await;
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    assert!(stream.consumer_info("agent-nova").await.is_err(), "the listener created its consumer");
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::provision::ensure_agents(&js, &registry, None).await.unwrap();
    mesh_bot::publish::send(&js, &registry, "cli:t", "nova", "once the bot made the consumer", Default::default())
        .await
        .unwrap();
    let got = gw.wait_for(1, WAIT).await;
    assert!(got[0].text().ends_with("once the bot made the consumer"));
    let _ = std::process::Command::new("kill").args(["-TERM", &listener.child.id().unwrap().to_string()]).status();
    assert!(listener.exit().await, "{}", listener.text());
}

/// Issue 19: a consumer that reads every inbox (what the listener's old
/// create-or-update right allowed), or a stream set up otherwise than the
/// layout says, makes the listener refuse to run, and it changes nothing.
#[tokio::test]
async fn a_listener_refuses_to_run_on_a_consumer_or_stream_set_up_otherwise() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let nats = mesh_tests::TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    let wildcard = vec!["agents.*.inbox".to_owned(), "agents.broadcast".to_owned()];
    stream
        .create_consumer(pull::Config {
            durable_name: Some("agent-nova".into()),
            filter_subjects: wildcard.clone(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut listener = LoggedToFile::spawn(&fixture, &nats.url(), "nova");
    assert!(!listener.exit().await, "the listener ran on a consumer reading every inbox");
    let log = listener.text();
    assert!(
        log.contains(
            "error: consumer agent-nova is not set up as this listener expects (filters [\"agents.*.inbox\", \
             \"agents.broadcast\"], expected [\"agents.broadcast\", \"agents.broadcast.from.*\", \"agents.nova.inbox\", \
             \"agents.nova.inbox.*\"]); refusing to run"
        ),
        "{log}"
    );
    let info = stream.consumer_info("agent-nova").await.unwrap();
    assert_eq!(info.config.filter_subjects, wildcard, "the listener changed nothing");

    // The agents stream with its messages expiring after ten minutes instead of a week.
    let mut config = stream.cached_info().config.clone();
    config.max_age = Duration::from_secs(600);
    js.update_stream(config).await.unwrap();
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::provision::ensure_agents(&js, &registry, None).await.unwrap();
    let mut listener = LoggedToFile::spawn(&fixture, &nats.url(), "kaan");
    assert!(!listener.exit().await, "the listener ran on a stream set up otherwise");
    let log = listener.text();
    assert!(log.contains("error: stream MESH_AGENTS is not set up as this listener expects (max_age 600s"), "{log}");
    assert!(gw.requests().is_empty());
}

/// Review of `sec`: settings the check missed. A subject transform on the
/// agents stream (`agents.*.inbox` -> `agents.a1.inbox`) stored every inbox
/// as a1's, and one on the bucket hid `global` from listeners; listeners
/// and the bot refuse both, naming the stream and the setting.
#[tokio::test]
async fn a_subject_transform_on_a_stream_or_the_bucket_is_refused_by_listeners_and_the_bot() {
    use async_nats::jetstream::stream::SubjectTransform;
    let nats = mesh_tests::TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("a1", &gw, true), ("a2", &gw, true)]);
    let js = nats.jetstream().await;
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::provision::ensure_agents(&js, &registry, None).await.unwrap();
    mesh_bot::provision::verify(&js, &registry).await.unwrap();

    let mut agents = js.get_stream("MESH_AGENTS").await.unwrap().cached_info().config.clone();
    agents.subject_transform =
        Some(SubjectTransform { source: "agents.*.inbox".into(), destination: "agents.a1.inbox".into() });
    js.update_stream(agents.clone()).await.unwrap();
    let mut listener = LoggedToFile::spawn(&fixture, &nats.url(), "a1");
    assert!(!listener.exit().await, "the listener ran on a stream that stores a2's messages as a1's");
    let log = listener.text();
    assert!(
        log.contains("error: stream MESH_AGENTS is not set up as this listener expects (subject_transform \"agents.*.inbox\" -> \"agents.a1.inbox\", expected none)"),
        "{log}"
    );
    let err = mesh_bot::provision::verify(&js, &registry).await.unwrap_err();
    assert!(
        err.is_fatal()
            && err.to_string().contains("stream MESH_AGENTS")
            && err.to_string().contains("subject_transform"),
        "{err}"
    );
    agents.subject_transform = None;
    js.update_stream(agents).await.unwrap();

    let mut bucket = js.get_stream("KV_mesh_killswitch").await.unwrap().cached_info().config.clone();
    bucket.subject_transform = Some(SubjectTransform {
        source: "$KV.mesh_killswitch.global".into(),
        destination: "$KV.mesh_killswitch.hidden".into(),
    });
    js.update_stream(bucket).await.unwrap();
    let mut listener = LoggedToFile::spawn(&fixture, &nats.url(), "a2");
    assert!(!listener.exit().await, "the listener ran on a bucket that hides the global kill");
    let log = listener.text();
    assert!(
        log.contains(
            "error: kill switch bucket mesh_killswitch is not set up as this listener expects (subject_transform"
        ),
        "{log}"
    );
    let err = mesh_bot::provision::verify(&js, &registry).await.unwrap_err().to_string();
    assert!(err.contains("kill switch bucket mesh_killswitch") && err.contains("subject_transform"), "{err}");
    assert!(gw.requests().is_empty());
}

/// Issue 14: the listener of an agent with a `mesh_token` may send for it
/// through the engine (`POST /v1/messages`: any inbox, the broadcast, its
/// audit records, consumer look-ups) and nothing more; a listener of an agent
/// without one still may not.
#[tokio::test]
async fn a_mesh_token_gives_the_listener_exactly_the_rights_to_send_for_its_agent() {
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "nova-hook-token", "mesh_token": "nova-mesh-token", "hooks_url": nova_gw.hooks_url()},
        "kaan": {"hooks_token": "kaan-hook-token", "hooks_url": kaan_gw.hooks_url()},
    }));
    let out_dir = fixture.dir().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry)
        .args(["deploy", "render", "--out", out_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nats = ConfiguredNats::start(&out_dir.join("nats.conf")).await;
    let port = nats.port;
    let nova = |lines: Vec<String>| async move { raw(port, "listener-nova", "pw-nova-1", &lines).await };
    let ok = nova(vec![
        publish("agents.zed.inbox.nova"),
        publish("agents.broadcast.from.nova"),
        publish("agents.broadcast.x"),
        publish("mesh.audit.http"),
        publish("mesh.audit.mcp"),
        request("$JS.API.CONSUMER.INFO.MESH_AGENTS.agent-kaan", &serde_json::json!({})),
        request("$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.agent.kaan", &serde_json::json!({})),
    ])
    .await;
    // agents.broadcast.x is no subject of ours: only nova's own broadcast subject is allowed.
    assert!(ok.contains("Permissions Violation") && ok.contains("agents.broadcast.x"), "{ok}");
    assert_eq!(ok.matches("Permissions Violation").count(), 1, "{ok}");
    for (line, what) in [
        (publish("$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-kaan"), "CONSUMER.CREATE"),
        (publish("$JS.API.STREAM.MSG.GET.MESH_AGENTS"), "STREAM.MSG.GET"),
        (publish("mesh.audit.slack"), "mesh.audit.slack"),
        (publish("mesh.reply.bot.abc.nova"), "mesh.reply.bot.abc.nova"),
        (publish("agents.zed.inbox"), "Publish to \"agents.zed.inbox\""),
        (publish("$KV.mesh_killswitch.global"), "$KV.mesh_killswitch.global"),
        (sub("agents.kaan.inbox", 1), "Subscription to \"agents.kaan.inbox\""),
        (sub("mesh.audit.>", 1), "Subscription to \"mesh.audit.>\""),
    ] {
        let said = nova(vec![line.clone()]).await;
        assert!(said.contains("Permissions Violation") && said.contains(what), "{line}: {said}");
    }
    for line in [publish("agents.nova.inbox"), publish("mesh.audit.http")] {
        let said = raw(port, "listener-kaan", "pw-kaan-1", std::slice::from_ref(&line)).await;
        assert!(said.contains("Permissions Violation"), "kaan has no mesh token: {line}: {said}");
    }

    // For real: the bot creates the streams and consumers, both listeners run
    // as their users, and nova sends to kaan through its listener's API.
    let bot = |args: &'static [&'static str]| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command
            .args(args)
            .env("NATS_USER", "mesh-bot")
            .env("NATS_PASSWORD", "pw-bot-1")
            .env("MESH_INBOX_PREFIX", "_INBOX_bot");
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.success(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    for args in [&["send", "nova", "first"][..], &["send", "kaan", "first"][..]] {
        let (ok, said) = bot(args).await;
        assert!(ok, "{said}");
    }
    let http = mesh_bot::local_nats::free_port().unwrap();
    let listener = |agent: &str, password: &str, http: Option<u16>| {
        let mut command = tokio::process::Command::new(listener_bin());
        command
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("AGENT_ID", agent)
            .env("NATS_USER", format!("listener-{agent}"))
            .env("NATS_PASSWORD", password)
            .env("MESH_INBOX_PREFIX", format!("_INBOX_{agent}"));
        if let Some(port) = http {
            command.env("MESH_HTTP", format!("127.0.0.1:{port}"));
        }
        Logged::spawn(command)
    };
    let nova_listener = listener("nova", "pw-nova-1", Some(http));
    let kaan_listener = listener("kaan", "pw-kaan-1", None);
    kaan_gw.wait_for(1, WAIT).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (status, body) = loop {
        let sent = client
            .post(format!("http://127.0.0.1:{http}/v1/messages"))
            .bearer_auth("nova-mesh-token")
            .json(&serde_json::json!({"to": "kaan", "text": "through the agent api"}))
            .send()
            .await;
        match sent {
            Ok(response) => break (response.status().as_u16(), response.text().await.unwrap_or_default()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("nova's listener API never answered: {e}; its output:\n{}", nova_listener.kill().await)
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "{body}");
    let got = kaan_gw.wait_for(2, WAIT).await;
    assert_eq!(got[1].text(), "[mesh] Message from nova: through the agent api");
    let (ok, said) = bot(&["audit", "--json"]).await;
    assert!(ok && said.contains("\"who\":\"agent:nova\"") && said.contains("\"platform\":\"http\""), "{said}");
    for log in [nova_listener.kill().await, kaan_listener.kill().await] {
        assert!(!log.contains("Permissions Violation") && !log.contains("permissions violation"), "{log}");
        assert!(!log.contains("nova-mesh-token"), "the mesh token reached a log");
    }
}

/// Connects with the async client as a rendered user (its own inbox prefix).
async fn client_as(nats: &ConfiguredNats, user: &str, password: &str, prefix: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(prefix)
        .connect(nats.url())
        .await
        .unwrap()
}

/// Issue 19.4 and issue 14: under the rendered permissions an agent sends and
/// answers only as itself. Its listener's user may publish only on subjects
/// naming its agent as the sender; a forged `from` on them is dead-lettered
/// by the receiving listener; correct messages, chat replies and an MCP `ask`
/// (whose answer the asking listener may now subscribe to) still flow; an
/// ask answer with a wrong `from` or `in_reply_to` is not shown to the asker.
#[tokio::test]
async fn an_agent_sends_and_answers_only_as_itself_under_the_rendered_permissions() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (nova_gw, ada_gw, kaan_gw) =
        (RecordingGateway::start().await, RecordingGateway::start().await, RecordingGateway::start().await);
    ada_gw.set_chat_reply("42, said ada");
    let chat = |gw: &RecordingGateway, id: &str| {
        serde_json::json!({"gateway": gw.addr.to_string(), "hooks_token": format!("{id}-hook-token"),
            "gateway_token": format!("{id}-gw-token"), "hooks_url": gw.hooks_url(), "delivery": "chat", "model": "m"})
    };
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "nova-hook-token", "mesh_token": "nova-mesh-token", "hooks_url": nova_gw.hooks_url()},
        "ada": chat(&ada_gw, "ada"),
        "kaan": chat(&kaan_gw, "kaan"),
    }));
    let out_dir = fixture.dir().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry)
        .args(["deploy", "render", "--out", out_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nats = ConfiguredNats::start(&out_dir.join("nats.conf")).await;
    let port = nats.port;

    // NATS itself: a listener writes messages only on subjects naming its agent.
    let nova = |lines: Vec<String>| async move { raw(port, "listener-nova", "pw-nova-1", &lines).await };
    let ok = nova(vec![
        publish("agents.ada.inbox.nova"),
        publish("agents.broadcast.from.nova"),
        sub("mesh.reply.nova.*.*", 1),
    ])
    .await;
    assert!(!ok.contains("-ERR"), "{ok}");
    for (line, what) in [
        (publish("agents.ada.inbox"), "Publish to \"agents.ada.inbox\""),
        (publish("agents.ada.inbox.kaan"), "Publish to \"agents.ada.inbox.kaan\""),
        (publish("agents.broadcast"), "Publish to \"agents.broadcast\""),
        (publish("agents.broadcast.from.ada"), "Publish to \"agents.broadcast.from.ada\""),
        (publish("mesh.reply.bot.t1.ada"), "Publish to \"mesh.reply.bot.t1.ada\""),
        (sub("mesh.reply.bot.*.*", 1), "Subscription to \"mesh.reply.bot.*.*\""),
        (sub("mesh.reply.ada.*.*", 1), "Subscription to \"mesh.reply.ada.*.*\""),
        (sub("mesh.reply.>", 1), "Subscription to \"mesh.reply.>\""),
    ] {
        let said = nova(vec![line.clone()]).await;
        assert!(said.contains("Permissions Violation") && said.contains(what), "{line}: {said}");
    }
    let said =
        raw(port, "listener-ada", "pw-ada-1", &[publish("mesh.reply.bot.t1.ada"), publish("agents.nova.inbox.ada")])
            .await;
    assert!(!said.contains("-ERR"), "a chat agent answers as itself: {said}");
    for line in [publish("mesh.reply.bot.t1.kaan"), publish("mesh.reply.bot.t1"), publish("agents.nova.inbox")] {
        let said = raw(port, "listener-ada", "pw-ada-1", std::slice::from_ref(&line)).await;
        assert!(said.contains("Permissions Violation"), "{line}: {said}");
    }

    // The bot creates streams and consumers; nova's and ada's listeners run as their users.
    let bot = |args: Vec<&'static str>| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command
            .args(args)
            .env("NATS_USER", "mesh-bot")
            .env("NATS_PASSWORD", "pw-bot-1")
            .env("MESH_INBOX_PREFIX", "_INBOX_bot");
        command
    };
    let run = |args: Vec<&'static str>| {
        let mut command = bot(args);
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.success(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    for agent in ["nova", "ada", "kaan"] {
        let (ok, said) = run(vec!["send", agent, "first"]).await;
        assert!(ok, "{said}");
    }
    let http = mesh_bot::local_nats::free_port().unwrap();
    let listener = |agent: &str, http: Option<u16>| {
        let mut command = tokio::process::Command::new(listener_bin());
        command
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("AGENT_ID", agent)
            .env("NATS_USER", format!("listener-{agent}"))
            .env("NATS_PASSWORD", format!("pw-{agent}-1"))
            .env("MESH_INBOX_PREFIX", format!("_INBOX_{agent}"));
        if let Some(port) = http {
            command.env("MESH_HTTP", format!("127.0.0.1:{port}"));
        }
        Logged::spawn(command)
    };
    let nova_listener = listener("nova", Some(http));
    let ada_listener = listener("ada", None);
    nova_gw.wait_for(1, WAIT).await;
    ada_gw.wait_for(1, WAIT).await;

    // Forged senders on nova's own subject: stored (NATS allows the subject), but
    // ada's listener dead-letters them before its gateway is called.
    let as_nova = client_as(&nats, "listener-nova", "pw-nova-1", "_INBOX_nova").await;
    let js = async_nats::jetstream::new(as_nova);
    let ada: mesh_protocol::AgentId = "ada".parse().unwrap();
    for from in ["slack:Udirector", "kaan"] {
        let forged =
            mesh_protocol::Envelope::new(from, mesh_protocol::Recipient::Agent(ada.clone()), "forged order").unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", forged.id.to_string().as_str());
        js.publish_with_headers("agents.ada.inbox.nova", headers, forged.encode().unwrap().into())
            .await
            .unwrap()
            .await
            .expect("the subject is nova's own: stored");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, said) = run(vec!["dlq", "ada", "--json"]).await;
        if said.matches("sender mismatch").count() >= 2 {
            assert!(said.contains("slack:Udirector") && said.contains("\\\"kaan\\\""), "{said}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sender-mismatch dead letters for ada: {said}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ada_gw.requests().len(), 1, "a forged message reached ada's gateway");

    // A correct message flows; ada's chat reply reaches nova on ada's own subject.
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (status, body) = loop {
        let sent = client
            .post(format!("http://127.0.0.1:{http}/v1/messages"))
            .bearer_auth("nova-mesh-token")
            .json(&serde_json::json!({"to": "ada", "text": "hello ada"}))
            .send()
            .await;
        match sent {
            Ok(response) => break (response.status().as_u16(), response.text().await.unwrap_or_default()),
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("nova's listener API never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(status, 200, "{body}");
    let got = ada_gw.wait_for(2, WAIT).await;
    assert!(got[1].body.to_string().contains("hello ada"), "{}", got[1].body);
    let got = nova_gw.wait_for(2, WAIT).await;
    assert!(got[1].text().contains("Reply from ada") && got[1].text().contains("42, said ada"), "{}", got[1].text());

    // MCP `ask` through nova's listener: it may subscribe to the answers to its own asks.
    let config = rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(format!(
        "http://127.0.0.1:{http}/mcp"
    ))
    .auth_header("nova-mesh-token".to_owned());
    use rmcp::ServiceExt;
    let mcp = ().serve(rmcp::transport::StreamableHttpClientTransport::from_config(config)).await.unwrap();
    let serde_json::Value::Object(args) = serde_json::json!({"to": "ada", "text": "what is 6 x 7?"}) else {
        unreachable!()
    };
    let asked = mcp.call_tool(rmcp::model::CallToolRequestParams::new("ask").with_arguments(args)).await.unwrap();
    assert_eq!(asked.is_error, Some(false), "{asked:?}");
    assert_eq!(asked.structured_content.unwrap()["answer"], "42, said ada");

    // A human's ask of kaan, whose listener user (played here) answers wrongly
    // first: another `from`, then another question's id. Neither is shown.
    let mut asking = bot(vec!["ask", "kaan", "are you there", "--timeout-s", "15"]);
    let asking = asking.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let admin = async_nats::jetstream::new(client_as(&nats, "mesh-admin", "pw-admin-1", "_INBOX_admin").await);
    let agents_stream = admin.get_stream("MESH_AGENTS").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let question = loop {
        if let Ok(stored) = agents_stream.get_last_raw_message_by_subject("agents.kaan.inbox").await {
            let question: mesh_protocol::Envelope = serde_json::from_slice(&stored.payload).unwrap();
            if question.text == "are you there" {
                break question;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the question never reached the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let answer_subject = format!("{}.kaan", question.reply_to.clone().unwrap());
    let as_kaan = client_as(&nats, "listener-kaan", "pw-kaan-1", "_INBOX_kaan").await;
    for (from, in_reply_to, text) in [
        ("slack:Udirector", question.id, "forged answer"),
        ("kaan", uuid::Uuid::now_v7(), "misthreaded answer"),
        ("kaan", question.id, "the real answer"),
    ] {
        let mut answer =
            mesh_protocol::Envelope::new(from, mesh_protocol::Recipient::Sender("cli:x".into()), text).unwrap();
        answer.metadata.insert("in_reply_to".into(), in_reply_to.to_string());
        as_kaan.publish(answer_subject.clone(), answer.encode().unwrap().into()).await.unwrap();
    }
    as_kaan.flush().await.unwrap();
    let out = tokio::time::timeout(WAIT, asking.wait_with_output()).await.unwrap().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("the real answer"), "{said}");
    assert!(!said.contains("forged answer") && !said.contains("misthreaded answer"), "{said}");

    for log in [nova_listener.kill().await, ada_listener.kill().await] {
        assert!(!log.contains("Permissions Violation") && !log.contains("permissions violation"), "{log}");
    }
}

/// Issue 14 review: a listener run with the environment `deploy render` gives
/// it (the bot's `MESH_PERMISSIONS`, the registry directory at `/etc/mesh`)
/// applies the permissions file to its agents: a viewer agent's send is
/// refused; a change to the file is applied without a restart; a file made
/// invalid refuses agents' calls until fixed (fail closed); a listener does
/// not start on an invalid file.
#[tokio::test]
async fn a_rendered_listener_applies_the_permissions_file_and_follows_its_changes() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "nova-hook-token", "mesh_token": "nova-mesh-token", "hooks_url": nova_gw.hooks_url()},
        "kaan": {"hooks_token": "kaan-hook-token", "hooks_url": kaan_gw.hooks_url()},
    }));
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(&permissions, r#"{"viewer": ["agent:nova"]}"#).unwrap();
    let out_dir = fixture.dir().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry)
        .args(["deploy", "render", "--out", out_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nats = ConfiguredNats::start(&out_dir.join("nats.conf")).await;
    let mut provision = mesh_command(&nats.url(), &fixture.registry);
    provision
        .args(["send", "kaan", "first"])
        .env("NATS_USER", "mesh-bot")
        .env("NATS_PASSWORD", "pw-bot-1")
        .env("MESH_INBOX_PREFIX", "_INBOX_bot");
    let sent = provision.output().await.unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));

    // listener-nova's environment as rendered, resolved the way docker-compose
    // would with the bot's MESH_PERMISSIONS set, and the container's paths
    // and addresses mapped to this test's.
    let compose = yaml(&out_dir.join("docker-compose.agents.yml"));
    let environment = compose["services"]["listener-nova"]["environment"].as_object().unwrap().clone();
    assert_eq!(environment["MESH_PERMISSIONS"], "${MESH_PERMISSIONS:-}", "the listener gets the bot's file");
    let http = mesh_bot::local_nats::free_port().unwrap();
    let deployment = |name: &str| match name {
        "MESH_PERMISSIONS" => "/etc/mesh/permissions.json".to_owned(),
        "LISTENER_NOVA_NATS_PASSWORD" => "pw-nova-1".to_owned(),
        _ => String::new(),
    };
    let resolved: Vec<(String, String)> = environment
        .iter()
        .map(|(key, value)| {
            let value = value.as_str().unwrap();
            let value = match value.strip_prefix("${") {
                Some(reference) => deployment(reference.split([':', '}']).next().unwrap()),
                None => value.to_owned(),
            };
            let value = match value.strip_prefix("/etc/mesh/") {
                Some(file) => fixture.dir().join(file).to_string_lossy().into_owned(),
                None => {
                    value.replace("nats://nats:4222", &nats.url()).replace("0.0.0.0:9100", &format!("127.0.0.1:{http}"))
                }
            };
            (key.clone(), value)
        })
        .collect();
    let listener = || {
        let mut command = tokio::process::Command::new(listener_bin());
        command.env_clear().envs(resolved.clone());
        Logged::spawn(command)
    };
    let nova_listener = listener();
    let client = reqwest::Client::new();
    let send = |text: &'static str| {
        let request = client
            .post(format!("http://127.0.0.1:{http}/v1/messages"))
            .bearer_auth("nova-mesh-token")
            .json(&serde_json::json!({"to": "kaan", "text": text}));
        async move {
            let response = request.send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.json::<serde_json::Value>().await.unwrap_or_default()))
        }
    };
    // Polls until the answer is `status` (the file is re-read on the registry poll, 2 s).
    let until = |status: u16, text: &'static str| {
        let send = &send;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match send(text).await {
                    Some((got, body)) if got == status => break body,
                    answer => assert!(tokio::time::Instant::now() < deadline, "still {answer:?}, not {status}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let body = until(403, "as a viewer").await;
    assert_eq!(body["error"], "\"send\" needs the operator role; you have viewer", "{body}");

    std::fs::write(&permissions, r#"{"operator": ["agent:nova"]}"#).unwrap();
    let body = until(200, "now an operator").await;
    assert!(body["stream_seq"].as_u64().unwrap_or_default() > 1, "{body}");

    std::fs::write(&permissions, r#"{"operator": ["agent:nova"], "oops"#).unwrap();
    let body = until(403, "with a broken file").await;
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("permissions.json (MESH_PERMISSIONS) is invalid") && error.contains("refused until"),
        "{body}"
    );
    let log = nova_listener.kill().await;
    assert!(log.contains("permissions file unusable"), "the listener says so loudly:\n{log}");

    // Started on the broken file, the listener does not start (as `mesh bot`).
    let (status, output) =
        tokio::time::timeout(WAIT, listener().finish(false)).await.expect("the listener stops on a broken file");
    assert!(!status.success(), "{output}");
    assert!(output.contains("permissions.json (MESH_PERMISSIONS) is invalid"), "{output}");
}
