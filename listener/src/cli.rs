//! The `mesh-listener` command line: flags and env into a [`ListenerConfig`],
//! then [`crate::run`] until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{ListenerConfig, Selection};
use crate::nats::DEFAULT_NATS_URL;
use crate::registry_file::DEFAULT_REGISTRY;
use clap::Parser;
use mesh_protocol::AgentId;

/// Forwards mesh messages from NATS JetStream to agent gateways.
#[derive(Debug, Parser)]
#[command(name = "mesh-listener", version)]
struct Args {
    /// The agent to serve.
    #[arg(long, env = "AGENT_ID", conflicts_with = "all", required_unless_present = "all")]
    agent: Option<String>,
    /// Serve every active agent of the registry, following registry changes.
    #[arg(long)]
    all: bool,
    /// NATS server URL (several, comma separated, for a cluster).
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    nats_url: String,
    /// Registry file (tokens.json).
    #[arg(long, env = "MESH_REGISTRY", default_value = DEFAULT_REGISTRY)]
    registry: PathBuf,
    /// Deliveries in flight per agent; 1 keeps per-agent order. At most what the agent's consumer
    /// allows (its registry entry's `concurrency`, which the bot sets).
    #[arg(long, env = "MESH_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Gateway request timeout, in seconds.
    #[arg(long, env = "MESH_REQUEST_TIMEOUT", default_value_t = 30)]
    request_timeout: u64,
    /// Longest wait for in-flight deliveries at shutdown, in seconds (default: the request timeout plus 5).
    #[arg(long, env = "MESH_SHUTDOWN_GRACE")]
    shutdown_grace: Option<u64>,
    /// Ack wait expected, in seconds; the consumer's own applies (a difference is logged at start).
    #[arg(long, env = "MESH_ACK_WAIT", default_value_t = 30)]
    ack_wait: u64,
    /// Deliveries before a message is dead-lettered.
    #[arg(long, env = "MESH_MAX_DELIVER", default_value_t = 10)]
    max_deliver: u64,
    /// Chat replies stop after this many hops.
    #[arg(long, env = "MESH_MAX_HOPS", default_value_t = crate::config::DEFAULT_MAX_HOPS)]
    max_hops: u8,
    /// Stream replicas: `auto` or 1 to 5. Accepted for old deployments: a listener creates no
    /// stream (the bot and `mesh` do, reading `MESH_REPLICAS`).
    #[arg(long, env = "MESH_REPLICAS", default_value = "auto")]
    replicas: mesh_protocol::layout::Replicas,
    /// CA certificates (a PEM file) trusted for `https://` gateways besides the system's roots:
    /// a private CA or a self-signed gateway certificate.
    /// (A string, not a path: compose passes an unset one as empty, which means none.)
    #[arg(long, env = crate::gateway::CA_FILE_ENV)]
    gateway_ca_file: Option<std::ffi::OsString>,
    /// Serve /health, /metrics and the agent API (/v1/messages) on this address.
    #[arg(long, env = "MESH_HTTP")]
    http: Option<SocketAddr>,
    /// Permissions file (JSON) giving agents their role on /v1/messages and /mcp, re-read while running;
    /// without one, agents are operators. Unusable at start: the listener does not start.
    #[arg(long, env = "MESH_PERMISSIONS")]
    permissions: Option<std::ffi::OsString>,
    /// Async runtime threads (two measured best on a 2-core machine, see BENCHMARKS.md).
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: u16,
}

/// The whole `mesh-listener` program.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.worker_threads))
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(async_main(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(args: Args) -> ExitCode {
    crate::logging::init();
    let selection = match (&args.agent, args.all) {
        (_, true) => Selection::All,
        (Some(raw), false) => match AgentId::parse(raw) {
            Ok(id) => Selection::One(id),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        (None, false) => unreachable!("clap requires --agent or --all"),
    };
    let mut config = ListenerConfig::new(args.nats_url, args.registry, selection);
    config.concurrency = usize::from(args.concurrency);
    config.request_timeout = Duration::from_secs(args.request_timeout.max(1));
    config.ack_wait = Duration::from_secs(args.ack_wait.max(1));
    config.shutdown_grace = args.shutdown_grace.map(Duration::from_secs);
    config.retry.max_deliver = args.max_deliver.max(1);
    config.max_hops = args.max_hops;
    config.replicas = args.replicas;
    config.http_addr = args.http;
    // Set but empty (a compose default) means unset.
    config.gateway_ca_file = args.gateway_ca_file.filter(|p| !p.is_empty()).map(PathBuf::from);
    config.allowed_hosts = mesh_runtime::config::allowed_hosts_from_env();
    config.nats_auth = match mesh_runtime::config::NatsAuth::from_env() {
        Ok(auth) => auth,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Set but blank (a compose default) means unset, as for `mesh bot`; the file is read at start.
    config.permissions_file = crate::permissions::configured(args.permissions.as_deref());
    match crate::run(config, crate::shutdown::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", mesh_runtime::error_text::one_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compose renders `MESH_GATEWAY_CA_FILE: "${MESH_GATEWAY_CA_FILE:-}"` and
    /// the same for `MESH_PERMISSIONS`: unset there, they arrive empty, and the
    /// listener must start (none meant), not stop on "a value is required".
    #[test]
    fn empty_path_settings_as_compose_passes_them_are_accepted() {
        let args = Args::try_parse_from(["mesh-listener", "--all", "--gateway-ca-file", "", "--permissions", ""])
            .expect("empty values parse");
        assert_eq!(args.gateway_ca_file.as_deref(), Some(std::ffi::OsStr::new("")));
        assert_eq!(crate::permissions::configured(args.permissions.as_deref()), None);
    }
}
