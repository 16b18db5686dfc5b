//! High availability on a three-node JetStream cluster (three nats-server
//! processes on loopback, configs rendered like `deploy/nats-cluster/`):
//! streams get three replicas, and every message whose publish was acked is
//! delivered while a node, then the stream leader, crash mid-stream.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use mesh_listener::nats::ensure_streams;
use mesh_protocol::layout::{self, Replicas};
use mesh_protocol::{AgentId, killswitch};
use mesh_runtime::config::replicas_from_env;
use mesh_tests::cluster::{self, ClusterSpec};
use mesh_tests::steady::{SteadyPublisher, Tally};
use mesh_tests::{Fixture, RecordingGateway, TestCluster, TestNats};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats-cluster")
}

fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client)
}

async fn replicas_of(js: &async_nats::jetstream::Context, stream: &str) -> usize {
    js.get_stream(stream).await.unwrap().info().await.unwrap().config.num_replicas
}

/// The files in `deploy/nats-cluster/` are what `ClusterSpec` renders (the
/// tests run the same rendering on loopback), and nats-server accepts them
/// with the `nats-auth.conf` that `mesh deploy render` writes beside them and
/// the variables the compose snippet gives. `MESH_BLESS=1` rewrites them
/// after a deliberate change.
#[test]
fn deploy_files_are_the_tested_config() {
    let spec = ClusterSpec::deploy();
    let registry = mesh_protocol::Registry::parse(
        r#"{"nova": {"hooks_token": "env:MESH_TOKEN_NOVA", "hooks_url": "http://nova:7002/hooks/wake"}}"#,
    )
    .unwrap();
    let users = mesh_bot::deploy::users(&registry);
    let checked = tempfile::tempdir().unwrap();
    std::fs::write(checked.path().join(mesh_bot::deploy::NATS_AUTH_CONF), mesh_bot::deploy::nats_auth(&users)).unwrap();
    let mut env: Vec<(String, String)> = users
        .iter()
        .map(|u| u.user.as_str())
        .chain([mesh_protocol::access::ADMIN_USER])
        .map(|u| (mesh_protocol::access::password_env(u), "pw".to_owned()))
        .collect();
    env.push((cluster::ROUTE_PASSWORD_ENV.into(), "route-pw".into()));
    env.push((cluster::ROUTES_ENV.into(), spec.routes("route-pw")));
    for index in 0..spec.nodes.len() {
        let path = deploy_dir().join(format!("{}.conf", spec.nodes[index].name));
        let rendered = spec.render(index);
        if std::env::var_os("MESH_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert_eq!(on_disk, rendered, "{} differs from ClusterSpec::deploy(); rerun with MESH_BLESS=1", path.display());
        let copy = checked.path().join(path.file_name().unwrap());
        std::fs::copy(&path, &copy).unwrap();
        let check = std::process::Command::new("nats-server")
            .arg("-t")
            .arg("-c")
            .arg(&copy)
            .envs(env.clone())
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "nats-server rejects {}: {}",
            path.display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// `auto` means 3 replicas on a cluster and 1 on a single server; an
/// existing single-replica stream on a cluster is scaled up, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_replicas_are_three_on_a_cluster_and_one_alone() {
    assert_eq!(replicas_from_env().unwrap(), Replicas::Auto, "the suite runs without MESH_REPLICAS");
    let single = TestNats::start().await;
    let js = single.jetstream().await;
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 1);

    let cluster = TestCluster::start().await;
    let js = jetstream(cluster.client().await);
    // Made earlier by a process told to keep one copy...
    ensure_streams(&js, Replicas::Exactly(1)).await.unwrap();
    assert_eq!(js.client().server_info().cluster.as_deref(), Some(mesh_tests::cluster::CLUSTER_NAME));
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 1);
    let nova = AgentId::parse("nova").unwrap();
    mesh_listener::nats::ensure_consumer(&js, &nova, Default::default()).await.unwrap();
    // ...then a start with the default setting scales every stream up,
    // and the agent's consumer with it.
    ensure_streams(&js, Replicas::Auto).await.unwrap();
    for spec in layout::all_streams(1) {
        assert_eq!(replicas_of(&js, spec.name).await, 3, "{}", spec.name);
    }
    let durable = layout::agent_consumer(&nova, Default::default()).durable;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stream = js.get_stream("MESH_AGENTS").await.unwrap();
        let info = stream.consumer_info(&durable).await.unwrap();
        let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len() + usize::from(c.leader.is_some()));
        if peers == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer {durable} has {peers} peers, not 3: {:?}",
            info.cluster
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh_listener::killswitch::open(&js, Replicas::Auto).await.unwrap();
    assert_eq!(replicas_of(&js, &format!("KV_{}", killswitch::BUCKET)).await, 3);
    // Asking for fewer later leaves the larger count alone.
    ensure_streams(&js, Replicas::Exactly(1)).await.unwrap();
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 3);
}

/// Kill one node mid-stream, bring it back, then kill the stream leader:
/// every acked publish reaches the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_node_crash_then_a_leader_crash() {
    let gateway = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gateway, true)]);
    let mut cluster = TestCluster::start_for(&fixture.registry).await;
    let js = jetstream(cluster.client().await);
    ensure_streams(&js, Replicas::Auto).await.unwrap();
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 3);

    let nova = AgentId::parse("nova").unwrap();
    // The bot's part: a message the server sent just before it died is
    // redelivered after one ack wait.
    let tuning = mesh_tests::fixtures::listener_tuning(1, Duration::from_secs(2));
    mesh_tests::fixtures::provision_agent(&js, "nova", tuning).await.unwrap();
    // The listener process logs in as its own NATS user, as in the rendered compose file.
    let mut listener = tokio::process::Command::new(mesh_tests::fixtures::listener_bin());
    listener
        .args(["--agent", "nova", "--ack-wait", "2"])
        .env("NATS_URL", cluster.urls())
        .env("MESH_REGISTRY", &fixture.registry)
        .env_remove("MESH_REPLICAS")
        .envs(cluster.listener_env("nova"));
    let listener = mesh_tests::fixtures::Logged::spawn(listener);

    let mut publisher = SteadyPublisher::start(js.clone(), vec![nova], "ha", Duration::from_millis(20)).await;
    publisher.wait_acked(100, Duration::from_secs(60)).await;
    let leader = cluster.wait_stream_leader(&js, "MESH_AGENTS").await;
    let follower = (leader + 1) % 3;
    println!("killing follower {}", cluster.spec.nodes[follower].name);
    cluster.kill(follower).await;
    publisher.wait_acked(200, Duration::from_secs(60)).await;
    cluster.restart(follower).await;
    cluster.wait_all_healthy().await;
    publisher.wait_acked(300, Duration::from_secs(60)).await;

    let leader = cluster.wait_stream_leader(&js, "MESH_AGENTS").await;
    println!("killing stream leader {}", cluster.spec.nodes[leader].name);
    cluster.kill(leader).await;
    publisher.wait_acked(400, Duration::from_secs(60)).await;
    let new_leader = cluster.wait_stream_leader(&js, "MESH_AGENTS").await;
    assert_ne!(new_leader, leader, "a new leader was elected");
    cluster.restart(leader).await;
    publisher.wait_acked(500, Duration::from_secs(60)).await;
    let log = publisher.stop().await;

    let tally = Tally::wait_complete(&log, &[&gateway], "ha", Duration::from_secs(60)).await;
    println!(
        "published {}, acked {}, failed attempts {}, duplicate acks {}, delivered {}, deliveries {}, duplicates {:?}",
        log.published(),
        log.acked_count(),
        log.failed_attempts,
        log.duplicate_acks,
        tally.delivered,
        tally.deliveries,
        tally.duplicates
    );
    let (status, output) = listener.finish(true).await;
    assert!(tally.lost.is_empty(), "acked but never delivered: {:?}\n{output}", tally.lost);
    assert!(tally.misrouted.is_empty());
    assert!(status.success(), "listener exit {status}: {output}");
    assert!(!output.contains("Permissions Violation"), "the listener's own rights were enough:\n{output}");
}

/// A stream that cannot get the replicas asked for (5 on a 3-node cluster):
/// an existing one keeps working with what it has, so start-up does not
/// fail; a missing one fails with an error that says why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_the_cluster_cannot_place_give_a_clear_error_or_keep_existing_streams() {
    let cluster = TestCluster::start().await;
    let js = jetstream(cluster.client().await);
    ensure_streams(&js, Replicas::Exactly(1)).await.unwrap();
    ensure_streams(&js, Replicas::Exactly(5)).await.expect("existing streams are used as they are");
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 1, "5 replicas cannot be placed on 3 servers");

    js.delete_stream("MESH_EVENTS").await.unwrap();
    let err = ensure_streams(&js, Replicas::Exactly(5)).await.unwrap_err().to_string();
    assert!(err.contains("creating stream MESH_EVENTS with 5 replicas"), "{err}");
    assert!(err.contains("a cluster needs 5 JetStream servers up") && err.contains("MESH_REPLICAS=1"), "{err}");
    ensure_streams(&js, Replicas::Auto).await.unwrap();
    assert_eq!(replicas_of(&js, "MESH_EVENTS").await, 3);
}

/// `mesh send` and a listener process given all three URLs work while the
/// first node of the list is down. The streams exist first (a new
/// 3-replica stream cannot be placed while a node is missing, which
/// `replicas_the_cluster_cannot_place...` covers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_given_every_url_work_with_the_first_node_down() {
    let gateway = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gateway, true)]);
    let mut cluster = TestCluster::start_for(&fixture.registry).await;
    // The mesh as the bot leaves it (streams, kill switch bucket, nova's
    // consumer), made while all three nodes run: a 3-replica bucket cannot be
    // placed on two (a run that left the bucket to `mesh send` failed so).
    let js = jetstream(cluster.client().await);
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    mesh_tests::fixtures::provision_agent(&js, "nova", Default::default()).await.unwrap();
    cluster.kill(0).await;
    // What `mesh send` depends on: the meta leader (it creates consumers) and
    // each stream's leader (it answers lookups and stores publishes), both
    // re-elected among the survivors. The product retries while they are not
    // (see `retry.rs`); waiting here keeps this test about the URL list.
    cluster.wait_meta_leader(1).await;
    let js = jetstream(cluster.client().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let kill_bucket = format!("KV_{}", mesh_protocol::killswitch::BUCKET);
    let streams = mesh_protocol::layout::all_streams(3).into_iter().map(|spec| spec.name.to_owned());
    for name in streams.chain([kill_bucket]) {
        while !cluster.stream_leader(&js, &name).await.is_some_and(|leader| cluster.is_running(leader)) {
            assert!(tokio::time::Instant::now() < deadline, "{name} has no live leader 60 s after a node died");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut listener = tokio::process::Command::new(mesh_tests::fixtures::listener_bin());
    listener
        .args(["--agent", "nova"])
        .env("NATS_URL", cluster.urls())
        .env("MESH_REGISTRY", &fixture.registry)
        .envs(cluster.listener_env("nova"));
    let listener = mesh_tests::fixtures::Logged::spawn(listener);
    let sent = mesh_tests::fixtures::mesh_command(&cluster.urls(), &fixture.registry)
        .args(["send", "nova", "hello cluster"])
        .env_remove("MESH_REPLICAS")
        .envs(cluster.admin_env())
        .output()
        .await
        .unwrap();
    assert!(sent.status.success(), "mesh send failed: {}", String::from_utf8_lossy(&sent.stderr));
    let got = match gateway.try_wait_for(1, Duration::from_secs(30)).await {
        Ok(got) => got,
        Err(_) => panic!("nova's gateway got nothing within 30 s; the listener said:\n{}", listener.kill().await),
    };
    assert!(got[0].text().ends_with("hello cluster"), "{got:?}");
    let js = jetstream(cluster.client().await);
    assert_eq!(replicas_of(&js, "MESH_AGENTS").await, 3, "the agents stream keeps its 3 replicas");
    let (status, output) = listener.finish(true).await;
    assert!(status.success(), "listener exit {status}: {output}");
}

/// The server-side pause of the kill switch on the cluster (issue 18): a
/// hard kill pauses the 3-replica consumer, the pause survives the loss of
/// the consumer's leader, a plain client on the survivors pulls nothing, and
/// `resume` lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_kill_holds_on_the_cluster_through_the_loss_of_the_consumers_leader() {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    use mesh_bot::killswitch::{Actor, KillSwitch};
    use mesh_protocol::killswitch::{Mode, PAUSED_UNTIL_RESUMED, Scope};

    let mut cluster = TestCluster::start().await;
    let js = jetstream(cluster.client().await);
    let gateway = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gateway, true)]);
    mesh_tests::fixtures::provision_agent(&js, "nova", Default::default()).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let consumer_info = || async { js.get_stream("MESH_AGENTS").await.ok()?.consumer_info("agent-nova").await.ok() };
    // The kill is written first, then applied; the consumer's replicas take the pause a moment later.
    let info = loop {
        let info = consumer_info().await.unwrap();
        if info.paused {
            break info;
        }
        assert!(tokio::time::Instant::now() < deadline, "agent-nova not paused 60 s after the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((info.paused, info.config.pause_until), (true, Some(PAUSED_UNTIL_RESUMED)));
    assert_eq!(info.cluster.as_ref().map(|c| c.replicas.len()), Some(2), "a 3-replica consumer");
    let leader = info.cluster.and_then(|c| c.leader).and_then(|l| cluster.index_of(&l)).unwrap();
    println!("killing the consumer's leader {}", cluster.spec.nodes[leader].name);
    cluster.kill(leader).await;
    // A new leader among the survivors, still paused.
    loop {
        if let Some(info) = consumer_info().await
            && info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.as_deref())
                .and_then(|l| cluster.index_of(l))
                .is_some_and(|l| l != leader)
        {
            assert!(info.paused, "the pause was lost with the leader");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "agent-nova has no new leader 60 s after its leader died");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::publish::send(&js, &registry, "cli:t", "nova", "held by the cluster", mesh_protocol::Priority::Normal)
        .await
        .unwrap();
    let fetch = |expires: Duration| {
        let js = js.clone();
        async move {
            let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> =
                js.get_stream("MESH_AGENTS").await.unwrap().get_consumer("agent-nova").await.unwrap();
            let mut batch = consumer.fetch().max_messages(1).expires(expires).messages().await.unwrap();
            let mut got = 0;
            while let Some(message) = batch.next().await {
                message.unwrap().ack().await.unwrap();
                got += 1;
            }
            got
        }
    };
    assert_eq!(fetch(Duration::from_secs(2)).await, 0, "a plain client pulled from a paused consumer");
    switch.release(&Scope::Global, Actor::director("cli:t")).await.unwrap();
    assert!(!consumer_info().await.unwrap().paused);
    assert_eq!(fetch(Duration::from_secs(20)).await, 1);
    cluster.restart(leader).await;
}

/// Speaks the NATS protocol to `port`: CONNECT (with `user` and `pass` when
/// given), `lines`, PING; returns what the server said up to PONG or an
/// authorization error.
async fn raw(port: u16, login: Option<(&str, &str)>, lines: &[String]) -> String {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut info = String::new();
    read.read_line(&mut info).await.unwrap();
    let mut connect = serde_json::json!({"verbose": false, "pedantic": false, "headers": true, "protocol": 1});
    if let Some((user, pass)) = login {
        connect["user"] = user.into();
        connect["pass"] = pass.into();
    }
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
        let n = tokio::time::timeout(Duration::from_secs(20), read.read_line(&mut line)).await.unwrap().unwrap();
        said.push_str(&line);
        if n == 0 || line.starts_with("PONG") || said.contains("Authorization Violation") {
            return said;
        }
    }
}

/// A server that tries to join the cluster through node 0's route port with
/// `password`; returns it (killed on drop) and the file it logs to.
fn route_to_node0(cluster: &TestCluster, name: &str, password: &str) -> (tokio::process::Child, PathBuf) {
    let conf = cluster.dir().join(format!("{name}.conf"));
    let log = cluster.dir().join(format!("{name}.log"));
    let route =
        format!("nats-route://{}:{password}@127.0.0.1:{}", cluster::ROUTE_USER, cluster.spec.nodes[0].cluster_port);
    std::fs::write(
        &conf,
        format!(
            "server_name: {name}\nlisten: 127.0.0.1:-1\ncluster {{\n  name: {}\n  listen: 127.0.0.1:-1\n  routes: [{route}]\n}}\n",
            cluster::CLUSTER_NAME
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, log)
}

/// The names of the servers routed to node 0 (its `/routez`).
async fn routed_to_node0(cluster: &TestCluster) -> Vec<String> {
    let url = format!("http://127.0.0.1:{}/routez", cluster.spec.nodes[0].monitor_port);
    let routez: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    routez["routes"].as_array().unwrap().iter().filter_map(|r| r["remote_name"].as_str().map(str::to_owned)).collect()
}

/// The cluster configs authenticate (issue 19.5): a node refuses a client
/// without credentials or with a wrong password, a listener's user gets only
/// its rendered rights there (no other agent's inbox, no consumer creation),
/// a server whose route does not carry the route password cannot join while
/// one that does can, and monitoring listens on loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_refuse_clients_and_routes_without_credentials() {
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova_gw, true), ("kaan", &kaan_gw, true)]);
    let cluster = TestCluster::start_for(&fixture.registry).await;
    let port = cluster.spec.nodes[1].client_port;

    let anonymous = raw(port, None, &[]).await;
    assert!(anonymous.contains("Authorization Violation"), "a client without credentials got in: {anonymous}");
    let wrong = raw(port, Some(("mesh-admin", "not-the-password")), &[]).await;
    assert!(wrong.contains("Authorization Violation"), "a wrong password got in: {wrong}");
    let admin = raw(port, Some(("mesh-admin", cluster.password("mesh-admin"))), &["SUB agents.> 1".into()]).await;
    assert!(admin.contains("PONG") && !admin.contains("-ERR"), "{admin}");

    let nova = cluster.listener_env("nova");
    let login = Some((nova[0].1.as_str(), nova[1].1.as_str()));
    let allowed = raw(port, login, &["SUB mesh.health.ping 1".into()]).await;
    assert!(allowed.contains("PONG") && !allowed.contains("-ERR"), "nova's own rights: {allowed}");
    let body =
        r#"{"stream_name":"MESH_AGENTS","config":{"durable_name":"agent-nova","filter_subjects":["agents.*.inbox"]}}"#;
    for (line, what) in [
        ("SUB agents.kaan.inbox 1".to_owned(), "Subscription to \"agents.kaan.inbox\""),
        (
            format!("PUB $JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-nova _INBOX_nova.r1 {}\r\n{body}", body.len()),
            "Publish to \"$JS.API.CONSUMER.CREATE.MESH_AGENTS.agent-nova\"",
        ),
    ] {
        let said = raw(port, login, &[line]).await;
        assert!(said.contains(&format!("Permissions Violation for {what}")), "nova may not: {what}\n{said}");
    }

    // Routes: the password or nothing.
    let (_rogue, rogue_log) = route_to_node0(&cluster, "rogue", "not-the-route-password");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&rogue_log).unwrap_or_default().contains("Authorization Violation") {
        assert!(tokio::time::Instant::now() < deadline, "node 0 never refused the route without the password");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_peer, _) = route_to_node0(&cluster, "peer", cluster.route_password());
    while !routed_to_node0(&cluster).await.contains(&"peer".to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "a route with the password never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routed = routed_to_node0(&cluster).await;
    assert!(!routed.contains(&"rogue".to_owned()), "the route without the password joined: {routed:?}");

    // Monitoring is reachable on loopback only: the configs bind it there.
    for index in 0..3 {
        assert!(
            cluster.spec.render(index).contains(&format!("http: 127.0.0.1:{}", cluster.spec.nodes[index].monitor_port))
        );
    }
    assert!(ClusterSpec::deploy().render(0).contains("http: 127.0.0.1:8222\n"));
}
