//! The `mesh deploy` subcommands: `render` and `up` become typed commands for
//! the engine; `probe` (the containers' health check) and `demo-gateway` are
//! helpers that run no command on the mesh.

use std::path::PathBuf;

use crate::deploy::{DEFAULT_COMPOSE, DEFAULT_OUT, SyncInterval, probe};

/// `mesh deploy <action>`.
#[derive(Debug, clap::Subcommand)]
pub enum DeployAction {
    /// Render nats.conf, the listener services and the Prometheus targets from the registry.
    Render {
        /// Output directory.
        #[arg(long, default_value = DEFAULT_OUT)]
        out: PathBuf,
        /// How often nats-server fsyncs JetStream writes: always, or a duration such as 2m.
        #[arg(long, default_value = "always")]
        nats_sync_interval: SyncInterval,
    },
    /// Render, then start the stack: docker-compose up -d with the base file and the rendered listeners.
    Up {
        /// Output directory of the rendered files.
        #[arg(long, default_value = DEFAULT_OUT)]
        out: PathBuf,
        /// The base compose file.
        #[arg(long, default_value = DEFAULT_COMPOSE)]
        compose: PathBuf,
        /// Compose project name.
        #[arg(long, env = crate::docker::PROJECT_ENV, default_value = crate::docker::DEFAULT_PROJECT)]
        project: String,
        /// Compose profiles to enable (demo, monitoring).
        #[arg(long)]
        profile: Vec<String>,
        /// How often nats-server fsyncs JetStream writes: always, or a duration such as 2m.
        #[arg(long, default_value = "always")]
        nats_sync_interval: SyncInterval,
        /// The directory the containers mount as /etc/mesh (default: the registry file's directory).
        #[arg(long, env = "MESH_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        /// The rendered files' directory as compose sees it (default: --out, made absolute).
        #[arg(long, env = "MESH_GENERATED_DIR")]
        generated_dir: Option<PathBuf>,
    },
    /// Exit 0 when a service answers (http://... 2xx, or tcp://host:port): the containers' health check.
    Probe {
        /// What to check.
        url: String,
    },
    /// Run a demo agent gateway that prints every hook call (token from an environment variable).
    DemoGateway {
        /// The agent it stands for.
        #[arg(long)]
        agent: String,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7002")]
        addr: std::net::SocketAddr,
        /// Environment variable holding the hook token it accepts.
        #[arg(long, default_value = "HOOKS_TOKEN")]
        token_env: String,
    },
}

/// Runs the `mesh deploy` helpers that are no command on the mesh: the
/// containers' health probe and the demo gateway.
pub async fn run_helper(action: DeployAction) -> anyhow::Result<()> {
    match action {
        DeployAction::Render { .. } | DeployAction::Up { .. } => {
            anyhow::bail!("deploy render and deploy up run through the command engine")
        }
        DeployAction::Probe { url } => probe(&url).await?,
        DeployAction::DemoGateway { agent, addr, token_env } => {
            let token = crate::config::secret_var(&token_env)
                .ok_or_else(|| anyhow::anyhow!("set {token_env} to the hook token this gateway accepts"))?;
            let gateway = crate::demo_gateway::DemoGateway {
                agent,
                hooks_token: token.expose().to_owned(),
                gateway_token: format!("{}-unused", uuid::Uuid::now_v7()),
            };
            let listener = tokio::net::TcpListener::bind(addr).await?;
            println!("demo gateway for {} on {}", gateway.agent, listener.local_addr()?);
            crate::demo_gateway::serve_on(listener, gateway);
            mesh_listener::shutdown::shutdown_signal().await;
        }
    }
    Ok(())
}
