//! `mesh deploy render` against a real nats-server started with the rendered
//! `nats.conf`: a listener user consumes its own agent's messages and answers
//! pings, but may not subscribe to another agent's subjects, snoop on other
//! clients' inboxes or publish where it must not; the bot user sends, pings and
//! pulls the kill switch, and the listener user creates or changes nothing in
//! JetStream (no consumer, stream or bucket): it waits for what the bot creates
//! and refuses to run on what is set up otherwise. Also: the compose and
//! Prometheus files are well formed.
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
            publish("agents.nova.inbox"),
            publish("mesh.reply.abc"),
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
    let (ok, said) = bot(&["resume"]).await;
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
    let (ok, said) = bot(&["resume", "--agent", "nova"]).await;
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

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not well-formed YAML: {e}", path.display()))
}

#[test]
fn compose_and_monitoring_files_are_well_formed() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy");
    // Alert rules: the five alerts, each with an expression over metrics the code exports.
    let alerts = yaml(&deploy.join("prometheus/alerts.yml"));
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(names, ["NatsDown", "ListenerDown", "GatewayUnreachable", "DeliveryLatencyHigh", "DeadLettersGrowing"]);
    let exported = [mesh_listener::metrics::DELIVERIES, mesh_listener::metrics::LATENCY];
    for rule in rules {
        let expr = rule["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("mesh_")) {
            let metric = word.trim_end_matches("_bucket");
            assert!(exported.contains(&metric), "{} uses {word}, which the listener does not export", names[0]);
        }
        assert!(rule["annotations"]["summary"].is_string());
    }
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
             \"agents.broadcast\"], expected [\"agents.broadcast\", \"agents.nova.inbox\"]); refusing to run"
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
        publish("agents.zed.inbox"),
        publish("agents.broadcast.x"),
        publish("mesh.audit.http"),
        publish("mesh.audit.mcp"),
        request("$JS.API.CONSUMER.INFO.MESH_AGENTS.agent-kaan", &serde_json::json!({})),
        request("$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.agent.kaan", &serde_json::json!({})),
    ])
    .await;
    // agents.broadcast.x is no subject of ours: only the broadcast itself is allowed.
    assert!(ok.contains("Permissions Violation") && ok.contains("agents.broadcast.x"), "{ok}");
    assert_eq!(ok.matches("Permissions Violation").count(), 1, "{ok}");
    for (line, what) in [
        (publish("$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-kaan"), "CONSUMER.CREATE"),
        (publish("$JS.API.STREAM.MSG.GET.MESH_AGENTS"), "STREAM.MSG.GET"),
        (publish("mesh.audit.slack"), "mesh.audit.slack"),
        (publish("mesh.reply.abc"), "mesh.reply.abc"),
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
