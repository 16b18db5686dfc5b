//! `mesh up --demo`: the whole mesh on one machine from one command: a local
//! nats-server, three demo agents (one per delivery mode) behind demo gateways,
//! their listeners, and the bot's web console (signed in as `demo`, director,
//! with a token made for this run), until ctrl-c.

use std::path::PathBuf;

use anyhow::Context as _;
use mesh_listener::config::{ListenerConfig, Selection};
use mesh_protocol::Registry;

use crate::demo_gateway::{self, DemoGateway};
use crate::local_nats::LocalNats;

/// Settings of the demo stack.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Where NATS data and the demo registry live.
    pub data_dir: PathBuf,
    /// NATS client port.
    pub nats_port: u16,
}

/// Where the demo's web console listens (another free port when it is taken).
pub const WEB_ADDR: &str = "127.0.0.1:8080";
/// The demo's web user (director).
pub const WEB_USER: &str = "demo";

/// The demo agents: id, delivery mode.
const AGENTS: [(&str, &str); 3] = [("nova", "wake"), ("kaan", "agent"), ("ada", "chat")];

/// Runs the demo until `shutdown` completes.
pub async fn run(config: DemoConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let data_dir = std::path::absolute(&config.data_dir).context("resolving the data directory")?;
    let mut nats = LocalNats::start_durable(config.nats_port, &data_dir.join("nats")).await?;
    let registry_path = data_dir.join("tokens.json");
    let mut entries = serde_json::Map::new();
    for (agent, mode) in AGENTS {
        let gateway = DemoGateway {
            agent: agent.into(),
            hooks_token: format!("{agent}-demo-hook-token"),
            gateway_token: format!("{agent}-demo-gateway-token"),
        };
        let addr = demo_gateway::serve(gateway.clone()).await.context("starting a demo gateway")?;
        let mut entry = serde_json::json!({
            "gateway": addr.to_string(),
            "hooks_token": gateway.hooks_token,
            "hooks_url": format!("http://{addr}/hooks/wake"),
            "status": "active",
            "delivery": mode,
        });
        if mode == "chat" {
            entry["gateway_token"] = gateway.gateway_token.into();
            entry["model"] = "demo-echo".into();
        }
        entries.insert(agent.into(), entry);
    }
    let json = serde_json::to_string_pretty(&entries).context("writing the demo registry")?;
    Registry::parse(&json).map_err(|e| anyhow::anyhow!("demo registry is invalid: {e}"))?;
    std::fs::write(&registry_path, json + "\n").with_context(|| format!("writing {}", registry_path.display()))?;

    let mut listener = ListenerConfig::new(nats.url(), &registry_path, Selection::All);
    listener.registry_poll = std::time::Duration::from_secs(1);
    print_banner(&nats, &registry_path);
    let stop_console = tokio_util::sync::CancellationToken::new();
    let console = console(&nats.url(), &registry_path, stop_console.clone()).await?;
    // The bot's part: streams, bucket and consumers, which listeners may not create.
    let client = mesh_listener::nats::connect_service(&nats.url(), "mesh-demo", &Default::default()).await?;
    let js = async_nats::jetstream::new(client);
    let replicas = mesh_protocol::layout::Replicas::Auto;
    crate::provision::ensure_mesh(&js, replicas).await?;
    let registry = mesh_listener::registry_file::load(&registry_path, &listener.allowed_hosts)?;
    crate::provision::ensure_agents(&js, &registry, None).await?;
    let follow = crate::provision::FollowConfig {
        registry_path: registry_path.clone(),
        poll: std::time::Duration::from_secs(1),
        replicas,
        allowed_hosts: listener.allowed_hosts.clone(),
        tuning: None,
    };
    let provisioner = tokio::spawn(crate::provision::follow(js, follow, std::future::pending()));
    let result = mesh_listener::run(listener, shutdown).await;
    stop_console.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), console).await;
    provisioner.abort();
    nats.stop().await;
    println!("mesh stopped; data kept in {}", data_dir.display());
    result
}

/// Starts `mesh bot`'s server in this process with the web console, the
/// user `demo` (director) and a token made for this run, and prints how to sign in.
async fn console(
    nats_url: &str,
    registry: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use crate::command::{Permissions, Principal, Role};
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let users = crate::web::auth::WebUsers::new(vec![(WEB_USER.to_owned(), mesh_protocol::Secret::new(&token))])?;
    let permissions = Permissions::new().grant(Principal::Web(WEB_USER.to_owned()), Role::Director);
    // 8080 when free, any free port otherwise.
    let addr = match std::net::TcpListener::bind(WEB_ADDR) {
        Ok(probe) => probe.local_addr()?,
        Err(_) => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let config = crate::server::BotConfig {
        nats_url: nats_url.to_owned(),
        addr,
        engine: crate::server::engine_config(registry.to_owned(), permissions),
        slack: None,
        discord: None,
        redis_url: None,
        monitor_every: std::time::Duration::from_secs(30),
        docker: crate::docker::DockerHost {
            host: None,
            project: crate::docker::Project::Named(crate::docker::DEFAULT_PROJECT.to_owned()),
        },
        nats: Default::default(),
        web: Some(crate::web::WebConfig { users, trusted_proxies: Vec::new() }),
        backlog_warn_after: crate::backlog::DEFAULT_WARN_AFTER,
    };
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let on_bound = move |addr| {
            let _ = bound_tx.send(addr);
        };
        if let Err(e) = crate::server::run(config, stop.cancelled_owned(), on_bound).await {
            eprintln!("the demo's web console stopped: {e:#}");
        }
    });
    let addr = bound_rx.await.context("the demo's web console did not start; see the error above")?;
    println!("  console:  http://{addr}/  (sign in as {WEB_USER} with token {token})\n");
    Ok(task)
}

fn print_banner(nats: &LocalNats, registry: &std::path::Path) {
    let url = nats.url();
    let registry = registry.display();
    let env = if url == mesh_listener::nats::DEFAULT_NATS_URL { String::new() } else { format!(" NATS_URL={url}") };
    println!(
        "\nmesh is up (demo)\n\
         \x20 nats:     {url} (JetStream)\n\
         \x20 registry: {registry}\n\
         \x20 agents:   nova (wake hook), kaan (agent hook), ada (chat, replies to agent senders)\n\n\
         In another terminal, from this directory:\n\
         \x20 export MESH_REGISTRY={registry}{env}\n\
         \x20 ./target/debug/mesh send nova \"hello from the terminal\"\n\
         \x20 ./target/debug/mesh broadcast --priority high \"maintenance in 5 minutes\"\n\
         \x20 ./target/debug/mesh send --from nova ada \"what is 6 x 7?\"   # ada's reply goes to nova\n\n\
         Each delivery is printed below. Press ctrl-c to stop.\n"
    );
}
