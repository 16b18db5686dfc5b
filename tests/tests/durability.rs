//! The nats-server configs the mesh writes fsync every JetStream write before
//! it is acknowledged (`sync_interval: always`), unless told otherwise. The
//! rendered `nats.conf` is checked on a real nats-server's `/varz`; the cluster
//! files are checked as text (ha.rs runs them and checks they match ClusterSpec).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mesh_bot::deploy::{SyncInterval, render};
use mesh_protocol::registry::Registry;

const WAIT: Duration = Duration::from_secs(20);
const REGISTRY: &str =
    r#"{"nova": {"hooks_token": "env:MESH_TOKEN_NOVA_HOOK", "hooks_url": "http://nova-gw:7002/hooks/wake"}}"#;

/// Starts nats-server with `conf` (passwords set) and returns what `/varz`
/// says of its JetStream config.
async fn jetstream_config_of(conf: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, conf).unwrap();
    let port = mesh_bot::local_nats::free_port().unwrap();
    let monitor = mesh_bot::local_nats::free_port().unwrap();
    let mut child = tokio::process::Command::new("nats-server")
        .arg("-c")
        .arg(&path)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-sd"])
        .arg(dir.path().join("store"))
        .envs([
            ("LISTENER_NOVA_NATS_PASSWORD", "pw-1"),
            ("MESH_BOT_NATS_PASSWORD", "pw-2"),
            ("MESH_ADMIN_NATS_PASSWORD", "pw-3"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server (run scripts/install.sh)");
    mesh_listener::gateway::install_tls_provider();
    let url = format!("http://127.0.0.1:{monitor}/varz");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(child.try_wait().unwrap().is_none(), "nats-server refused the rendered config");
        if let Ok(answer) = reqwest::get(&url).await
            && let Ok(varz) = answer.json::<serde_json::Value>().await
        {
            return varz["jetstream"]["config"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "nats-server's /varz did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_rendered_nats_conf_fsyncs_every_write() {
    let rendered = render(&Registry::parse(REGISTRY).unwrap(), &SyncInterval::Always);
    let config = jetstream_config_of(&rendered.nats_conf).await;
    assert_eq!(config["sync_always"], true, "{config}");
}

#[tokio::test]
async fn a_relaxed_sync_interval_is_what_the_server_runs() {
    let rendered = render(&Registry::parse(REGISTRY).unwrap(), &"2m".parse().unwrap());
    let config = jetstream_config_of(&rendered.nats_conf).await;
    assert_ne!(config["sync_always"], true, "{config}");
    assert_eq!(config["sync_interval"], 120_000_000_000u64, "{config}");
}

#[tokio::test]
async fn the_cluster_configs_fsync_every_write() {
    for node in ["nats-1", "nats-2", "nats-3"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/nats-cluster/{node}.conf"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n  sync_interval: always\n"), "{} does not fsync every write", path.display());
    }
}
