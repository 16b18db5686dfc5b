//! The `mesh` command line: global options, subcommands, and exit codes.
//! Errors are one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_listener::nats::{self, DEFAULT_NATS_URL};
use mesh_listener::registry_file::{self, DEFAULT_REGISTRY};
use mesh_protocol::Priority;

use crate::publish::{self, Receipt};

/// Drive the agent mesh from a terminal.
#[derive(Debug, Parser)]
#[command(name = "mesh", version, about)]
pub struct Args {
    /// NATS server URL.
    #[arg(long, global = true, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// Registry file (tokens.json).
    #[arg(long, global = true, env = "MESH_REGISTRY", default_value = DEFAULT_REGISTRY)]
    pub registry: PathBuf,
    /// Print results as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a message to one agent.
    Send {
        /// The agent's id.
        agent: String,
        /// The message (several words are joined with spaces; `-` reads standard input).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
        /// low, normal, high or urgent (high and urgent wake the agent now).
        #[arg(long, default_value = "normal")]
        priority: Priority,
        /// Sender name (an agent id, so replies reach its inbox, or a label).
        #[arg(long, env = "MESH_FROM")]
        from: Option<String>,
    },
    /// Send a message to every active agent.
    Broadcast {
        /// The message (several words are joined with spaces; `-` reads standard input).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
        /// low, normal, high or urgent (high and urgent wake the agents now).
        #[arg(long, default_value = "normal")]
        priority: Priority,
        /// Sender name.
        #[arg(long, env = "MESH_FROM")]
        from: Option<String>,
    },
    /// Ping every listener; one row per registry agent. Exits 1 when an active agent did not answer.
    Ping {
        /// How long to wait for pongs, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// List dead letters (all agents, or one), or replay them.
    #[command(args_conflicts_with_subcommands = true)]
    Dlq {
        /// Only this agent's dead letters.
        agent: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(subcommand)]
        action: Option<DlqAction>,
    },
    /// Run the mesh locally.
    Up {
        /// The embedded default: local nats-server, demo agents and gateways.
        #[arg(long, required = true)]
        demo: bool,
        /// Where NATS data and the demo registry live.
        #[arg(long, default_value = ".mesh/demo")]
        data_dir: PathBuf,
        /// NATS client port.
        #[arg(long, default_value_t = 4222)]
        nats_port: u16,
    },
}

/// What to do with dead letters.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Re-publish an agent's oldest dead letters as new messages, then remove them.
    Replay {
        /// The agent.
        agent: String,
        /// How many (oldest first).
        #[arg(default_value_t = 1)]
        n: usize,
    },
}

/// The whole `mesh` program.
pub fn main() -> ExitCode {
    let args = Args::parse();
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> ExitCode {
    match execute(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The message text: the words joined, or standard input for `-`.
fn message_text(words: Vec<String>) -> anyhow::Result<String> {
    if words.len() == 1 && words[0] == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| anyhow::anyhow!("cannot read the message from standard input: {e}"))?;
        return Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned());
    }
    Ok(words.join(" "))
}

fn default_sender() -> String {
    let user: String = std::env::var("USER")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    // Always "cli:<name>": never a valid agent id, so agent replies are not
    // routed to an inbox nobody reads.
    if user.is_empty() { "cli:terminal".into() } else { format!("cli:{user}") }
}

async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Send { agent, text, priority, from } => {
            let registry = registry_file::load(&args.registry)?;
            publish::resolve_target(&registry, &agent)?;
            let from = from.unwrap_or_else(default_sender);
            let text = message_text(text)?;
            mesh_protocol::Envelope::new(from.as_str(), mesh_protocol::Recipient::Broadcast, text.as_str())?;
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let js = async_nats::jetstream::new(client);
            let receipt = publish::send(&js, &registry, &from, &agent, &text, priority).await?;
            print_receipt(&receipt, &agent, args.json);
        }
        Command::Broadcast { text, priority, from } => {
            let registry = registry_file::load(&args.registry)?;
            let from = from.unwrap_or_else(default_sender);
            let text = message_text(text)?;
            mesh_protocol::Envelope::new(from.as_str(), mesh_protocol::Recipient::Broadcast, text.as_str())?;
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let js = async_nats::jetstream::new(client);
            let receipt = publish::broadcast(&js, &registry, &from, &text, priority).await?;
            print_receipt(&receipt, "*", args.json);
        }
        Command::Ping { timeout_ms } => {
            let registry = registry_file::load(&args.registry)?;
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let report = crate::ping::ping(&client, &registry, Duration::from_millis(timeout_ms))
                .await
                .map_err(anyhow::Error::msg)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            if report.missing > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Dlq { agent, limit, action } => {
            let registry = registry_file::load(&args.registry)?;
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let js = async_nats::jetstream::new(client);
            match action {
                Some(DlqAction::Replay { agent, n }) => {
                    let report = crate::dlq::replay(&js, &registry, &agent, n).await?;
                    if args.json {
                        println!("{}", serde_json::to_string(&report)?);
                    } else {
                        for (seq, id) in &report.replayed {
                            println!("dead letter {seq} replayed as {id}");
                        }
                        for (seq, why) in &report.skipped {
                            println!("dead letter {seq} skipped: {why}");
                        }
                        if report.replayed.is_empty() && report.skipped.is_empty() {
                            println!("no dead letters for {agent}");
                        }
                    }
                }
                None => {
                    let id = match &agent {
                        Some(raw) => Some(crate::publish::resolve_any(&registry, raw)?),
                        None => None,
                    };
                    let entries = crate::dlq::list(&js, id.as_ref(), limit).await?;
                    if args.json {
                        println!("{}", serde_json::to_string(&entries)?);
                    } else if entries.is_empty() {
                        println!("no dead letters");
                    } else {
                        for e in &entries {
                            let status = e.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
                            let text = e.text.as_deref().unwrap_or("<undecodable payload>");
                            println!(
                                "#{} {} {} attempts={}{status}: {}
    {}",
                                e.dlq_seq, e.at, e.agent, e.attempts, e.reason, text
                            );
                        }
                    }
                }
            }
        }
        Command::Up { demo: _, data_dir, nats_port } => {
            mesh_listener::logging::init();
            let config = crate::demo::DemoConfig { data_dir, nats_port };
            crate::demo::run(config, mesh_listener::shutdown::shutdown_signal()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_receipt(receipt: &Receipt, to: &str, json: bool) {
    if json {
        let value = serde_json::json!({
            "id": receipt.id.to_string(),
            "to": to,
            "stream_seq": receipt.stream_seq,
            "duplicate": receipt.duplicate,
            "recipients": receipt.recipients,
        });
        println!("{value}");
    } else if to == "*" {
        println!(
            "{} broadcast to {} active agents (stream seq {})",
            receipt.id, receipt.recipients, receipt.stream_seq
        );
    } else {
        println!("{} sent to {to} (stream seq {})", receipt.id, receipt.stream_seq);
    }
}
