//! The whole compose stack, for real, on this machine's Docker engine: images
//! built FROM scratch out of the binaries under test (`scripts/images.sh`),
//! `mesh deploy render` for the listeners and nats.conf, `docker-compose up`
//! with the demo gateway; a message sent with `mesh send` to the published
//! NATS port reaches the gateway container, and `mesh status` lists the
//! project's containers. The bot runs with Discord configured (it answers a
//! signed PING) and the Docker socket; a `mesh kill hard` run in the bot's
//! container stops this project's listeners only (the project comes from the
//! container's compose label), not another project's. The project is torn
//! down on drop, also on failure.
//! Without an engine the test is skipped, and under `CI=true` it fails.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::fixtures::{listener_bin, mesh_bin, mesh_command};

const WAIT: Duration = Duration::from_secs(90);
const TAG: &str = "meshtest";
const ADMIN_PASSWORD: &str = "admin-pw-compose";
const DEMO_HOOK_TOKEN: &str = "demo-hook-token-compose";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A docker-compose project, taken down (containers, volumes, network) on drop.
struct Compose {
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker-compose");
        command.arg("-p").arg(&self.project);
        for f in &self.files {
            command.arg("-f").arg(f);
        }
        command.args(["--profile", "demo"]).args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("docker-compose (Debian's package) is installed");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "docker-compose {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = self.command(&["logs", "--no-color", "--tail", "40"]).output()
        {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let _ = self.command(&["down", "-v", "--remove-orphans", "--timeout", "5"]).output();
    }
}

#[tokio::test]
async fn a_message_crosses_the_compose_stack_to_a_gateway_container() {
    mesh_tests::require_docker!();
    let built = Command::new(root().join("scripts/images.sh"))
        .env("MESH_BIN", mesh_bin())
        .env("MESH_LISTENER_BIN", listener_bin())
        .env("MESH_IMAGE_TAG", TAG)
        .output()
        .unwrap();
    assert!(built.status.success(), "scripts/images.sh failed: {}", String::from_utf8_lossy(&built.stderr));

    // The operator's files: a registry with the demo agent, rendered into the deployment.
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let registry = config.join("tokens.json");
    // demo's token is a file in its own secrets/demo/; peer's entry points at
    // demo's file, which peer's listener container must not see.
    std::fs::write(
        &registry,
        r#"{"demo": {"hooks_token": "file:/etc/mesh/secrets/demo/hook", "hooks_url": "http://demo-gateway:7002/hooks/wake"},
            "peer": {"hooks_token": "file:/etc/mesh/secrets/demo/hook", "hooks_url": "http://demo-gateway:7002/hooks/wake"}}"#,
    )
    .unwrap();
    let demo_secrets = config.join("secrets/demo");
    std::fs::create_dir_all(&demo_secrets).unwrap();
    std::fs::write(demo_secrets.join("hook"), DEMO_HOOK_TOKEN).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for dir in [work.path(), config.as_path(), &config.join("secrets"), &demo_secrets] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(demo_secrets.join("hook"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let generated = work.path().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &registry)
        .args(["deploy", "render", "--out", generated.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The bot gets the Docker socket (its group, as the bot is not root) the way README says.
    use std::os::unix::fs::MetadataExt;
    let socket = "/var/run/docker.sock";
    let socket_gid = std::fs::metadata(socket).expect("the engine's socket").gid();
    let docker_override = work.path().join("docker-compose.docker.yml");
    std::fs::write(
        &docker_override,
        format!("services:\n  bot:\n    group_add: [\"{socket_gid}\"]\n    volumes:\n      - {socket}:{socket}\n"),
    )
    .unwrap();
    let discord_key = ed25519_dalek::SigningKey::from_bytes(&[fastrand::u8(..); 32]);

    let free = || mesh_bot::local_nats::free_port().unwrap().to_string();
    let bot_port = free();
    let nats_port = free();
    let project = format!("meshtest-{}", uuid::Uuid::now_v7().simple());
    let env = [
        ("MESH_IMAGE_TAG", TAG.to_owned()),
        ("MESH_CONFIG_DIR", config.display().to_string()),
        ("MESH_GENERATED_DIR", generated.display().to_string()),
        ("MESH_NATS_PORT", nats_port.clone()),
        ("MESH_NATS_MONITOR_PORT", free()),
        ("MESH_BOT_PORT", bot_port.clone()),
        // Discord interactions (the endpoint Discord posts to); no bot token: nothing to reach.
        ("DISCORD_PUBLIC_KEY", mesh_bot::discord::verify::public_key_hex(&discord_key)),
        ("DISCORD_APPLICATION_ID", "4242".to_owned()),
        ("LISTENER_DEMO_NATS_PASSWORD", "listener-pw-compose".to_owned()),
        ("LISTENER_PEER_NATS_PASSWORD", "peer-pw-compose".to_owned()),
        ("MESH_BOT_NATS_PASSWORD", "bot-pw-compose".to_owned()),
        ("MESH_ADMIN_NATS_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("MESH_TOKEN_DEMO_HOOKS", DEMO_HOOK_TOKEN.to_owned()),
    ];
    let compose = Compose {
        project: project.clone(),
        files: vec![
            root().join("deploy/docker-compose.yml"),
            generated.join("docker-compose.agents.yml"),
            docker_override.clone(),
        ],
        env: env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    };
    // The one command: render from the registry, then docker-compose up.
    let mut up = mesh_command("nats://127.0.0.1:1", &registry);
    up.args(["deploy", "up", "--profile", "demo", "--project", &project, "--out"])
        .arg(&generated)
        .arg("--compose")
        .arg(root().join("deploy/docker-compose.yml"))
        .envs(env.iter().map(|(k, v)| (*k, v)));
    let out = up.output().await.unwrap();
    assert!(
        out.status.success(),
        "mesh deploy up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // `mesh deploy up` takes the compose files it renders; the Docker socket
    // comes on top, as an operator would add it.
    compose.run(&["up", "-d", "bot"]);

    // `mesh send` from the host against the published port, as the operator's NATS user.
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let text = format!("hello through compose {}", uuid::Uuid::now_v7().simple());
    let mesh = |args: Vec<String>| {
        let mut command = mesh_command(&nats_url, &registry);
        command
            .args(args)
            .env("NATS_USER", "mesh-admin")
            .env("NATS_PASSWORD", ADMIN_PASSWORD)
            .env("MESH_COMPOSE_PROJECT", &project);
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.success(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    let (ok, said) = mesh(vec!["send".into(), "demo".into(), text.clone()]).await;
    assert!(ok, "mesh send: {said}");

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs = compose.run(&["logs", "--no-color", "demo-gateway"]);
        if logs.contains(&text) {
            assert!(logs.contains("/hooks/wake"), "{logs}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the demo gateway never logged the message:\n{logs}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Each listener container holds only its own agent's token directory
    // (issue 19.7): peer's listener, pointed at demo's token file, cannot read it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs = compose.run(&["logs", "--no-color", "listener-peer"]);
        if logs.contains("cannot read secret file /etc/mesh/secrets/demo/hook") {
            assert!(logs.contains("No such file"), "{logs}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "peer's listener never reported demo's token file missing:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The bot sees the registry but no token file: secrets/ is masked.
    let bot = format!("{project}_bot_1");
    let inspect =
        Command::new("docker").args(["inspect", "--format", "{{json .HostConfig.Tmpfs}}", &bot]).output().unwrap();
    let tmpfs = String::from_utf8_lossy(&inspect.stdout);
    assert!(tmpfs.contains("\"/etc/mesh/secrets\""), "the bot's secrets/ is not masked: {tmpfs}");

    let (_, status) = mesh(vec!["status".into()]).await;
    for service in ["nats", "redis", "bot", "listener-demo", "demo-gateway"] {
        let name = format!("{project}_{service}_1");
        let row = status.lines().find(|l| l.contains(&name)).unwrap_or_else(|| panic!("{name} missing in:\n{status}"));
        assert!(row.contains("running"), "{row}");
        if service == "nats" {
            assert!(row.contains("healthy"), "nats passed its health check before the listener started: {row}");
        }
    }
    assert!(status.contains("listener") && status.contains("gateway"), "{status}");

    // `mesh restart` finds the listener by its labels; a message sent meanwhile arrives after it.
    let (ok, said) = mesh(vec!["restart".into(), "demo".into()]).await;
    assert!(ok && said.contains("listener-demo"), "mesh restart: {said}");
    let again = format!("after the restart {}", uuid::Uuid::now_v7().simple());
    let (ok, said) = mesh(vec!["send".into(), "demo".into(), again.clone()]).await;
    assert!(ok, "mesh send: {said}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !compose.run(&["logs", "--no-color", "demo-gateway"]).contains(&again) {
        assert!(tokio::time::Instant::now() < deadline, "the message sent across the restart never arrived");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Discord is configured: a signed PING to the published bot port gets PONG.
    mesh_listener::gateway::install_tls_provider();
    let http = reqwest::Client::new();
    let ping = serde_json::json!({"type": 1, "id": "1", "application_id": "4242", "token": "ping-token"}).to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
        let signature = mesh_bot::discord::verify::sign(&discord_key, &ts, ping.as_bytes());
        let answer = http
            .post(format!("http://127.0.0.1:{bot_port}/discord/interactions"))
            .header("content-type", "application/json")
            .header("x-signature-ed25519", signature)
            .header("x-signature-timestamp", ts)
            .body(ping.clone())
            .send()
            .await;
        if let Ok(answer) = answer {
            assert_eq!(answer.status().as_u16(), 200, "the bot's Discord endpoint");
            assert_eq!(answer.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"type": 1}));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the bot never answered on port {bot_port}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Another project's listener (a default-named stack on the same engine, say) must survive.
    let other = mesh_tests::docker::Project::new().await;
    let other_listener = other.run("listener", Some("demo")).await;

    // `kill hard` in the bot's container: the bot's project comes from its own
    // container's label (no MESH_COMPOSE_PROJECT there), and only its listeners stop.
    let killed = Command::new("docker")
        .args(["exec", &bot, "mesh", "kill", "hard", "--yes", "--reason", "compose drill"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&killed.stdout), String::from_utf8_lossy(&killed.stderr));
    assert!(killed.status.success(), "mesh kill hard in the bot container: {said}");
    assert!(said.contains(&format!("{project}_listener-demo_1")), "{said}");
    let state = |service: &str| {
        let name = format!("{project}_{service}_1");
        let out = Command::new("docker").args(["inspect", "--format", "{{.State.Running}}", &name]).output().unwrap();
        (name, String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // (listener-peer restarts in a loop above, its token unreadable: not asserted.)
    let (name, running) = state("listener-demo");
    assert_eq!(running, "false", "{name} still runs after the hard kill: {said}");
    for service in ["nats", "redis", "bot", "demo-gateway"] {
        let (name, running) = state(service);
        assert_eq!(running, "true", "{name} stopped by the hard kill: {said}");
    }
    assert_eq!(other.running(&other_listener).await, Some(true), "another project's listener was stopped: {said}");
    drop(compose);
}
