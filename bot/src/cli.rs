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
    /// NATS server URL (several, comma separated, for a cluster).
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
        #[command(flatten)]
        message: MessageArgs,
    },
    /// Send a message to every active agent.
    Broadcast {
        #[command(flatten)]
        message: MessageArgs,
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
    /// Run the chat bot server (Slack slash commands, health, metrics, notifications).
    Bot {
        /// Address to listen on.
        #[arg(long, env = "MESH_BOT_ADDR", default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
    },
    /// Show the kill switch, the listeners answering, and dead letters.
    Status,
    /// List the registry's agents (with the listeners' view), or change the registry.
    Agents {
        #[command(subcommand)]
        action: Option<crate::agents::AgentsAction>,
    },
    /// Ask a chat-mode agent and wait for its reply.
    Ask {
        /// The agent's id.
        agent: String,
        /// The question (several words are joined with spaces).
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Pull the kill switch: listeners stop pulling; messages wait in JetStream.
    Kill {
        #[command(subcommand)]
        grade: KillGrade,
    },
    /// Release the kill switch (the whole mesh, or one agent).
    Resume {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Maintenance window: announce, wait, soft-pause, resume, ping, announce again.
    Maintenance {
        /// How long the mesh is paused: 30s, 10m, 2h.
        duration: String,
        /// What the maintenance is for.
        message: Vec<String>,
        /// Time between the announcement and the pause.
        #[arg(long, default_value = "5m")]
        lead: String,
        /// Who runs it.
        #[arg(long, env = "MESH_FROM")]
        from: Option<String>,
    },
    /// Restart one agent's listener container (Docker).
    Restart {
        /// The agent.
        agent: String,
    },
    /// Show the newest audit records.
    Audit {
        /// How many.
        #[arg(default_value_t = 20)]
        n: u32,
    },
    /// Back up the registry, the stream messages, consumer positions and the kill switch into a new directory.
    Backup {
        /// The directory (created; must not hold anything yet).
        dir: PathBuf,
    },
    /// Restore a backup into a fresh NATS server (stop the listeners first) and write the registry back.
    Restore {
        /// The backup directory.
        dir: PathBuf,
    },
    /// Deployment: render nats.conf and the listener services from the registry; container helpers.
    Deploy {
        #[command(subcommand)]
        action: crate::deploy::DeployAction,
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

/// The message of `send` and `broadcast`.
#[derive(Debug, clap::Args)]
pub struct MessageArgs {
    /// The message (several words are joined with spaces; `-` reads standard input).
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    text: Vec<String>,
    /// low, normal, high or urgent (high and urgent wake the agent now).
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Sender name (an agent id, so replies reach its inbox, or a label).
    #[arg(long, env = "MESH_FROM")]
    from: Option<String>,
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

/// The global options, once the subcommand is taken out.
#[derive(Debug)]
struct Globals {
    nats_url: String,
    registry: PathBuf,
    json: bool,
}

/// Kill switch grades.
#[derive(Debug, Subcommand)]
pub enum KillGrade {
    /// Pause for a while (default 5m), then resume by itself.
    Soft {
        /// How long: 30s, 5m, 2h (at most 24h).
        #[arg(long = "for")]
        duration: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Why (shown in status and notifications).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Pause until a director resumes.
    Hard {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Confirm without the prompt.
        #[arg(long)]
        yes: bool,
    },
    /// Tear the mesh down (director only).
    Nuclear {
        /// Confirm without the prompt.
        #[arg(long)]
        yes: bool,
        /// Also remove the project's volumes and networks.
        #[arg(long)]
        purge: bool,
    },
}

/// The command line the engine parses for a kill.
fn kill_line(grade: &KillGrade) -> (String, bool) {
    let target = |agent: &Option<String>, reason: &Option<String>| {
        let agent = agent.as_ref().map(|a| format!(" agent={a}")).unwrap_or_default();
        let reason = reason.as_ref().map(|r| format!(" -- {r}")).unwrap_or_default();
        format!("{agent}{reason}")
    };
    match grade {
        KillGrade::Soft { duration, agent, reason } => {
            let duration = duration.as_ref().map(|d| format!(" {d}")).unwrap_or_default();
            (format!("kill soft{duration}{}", target(agent, reason)), false)
        }
        KillGrade::Hard { agent, reason, yes } => (format!("kill hard{}", target(agent, reason)), *yes),
        KillGrade::Nuclear { yes, .. } => ("kill nuclear".to_owned(), *yes),
    }
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
    let Args { nats_url, registry, json, command } = args;
    let args = Globals { nats_url, registry, json };
    match command {
        Command::Send { agent, message } => {
            let registry = registry_file::load(&args.registry)?;
            let (from, text) = (message.from.unwrap_or_else(default_sender), message_text(message.text)?);
            let prepared = publish::prepare_send(&registry, &from, &agent, &text, message.priority)?;
            let receipt = deliver_now(&args.nats_url, &prepared).await?;
            print_receipt(&receipt, &agent, args.json);
        }
        Command::Broadcast { message } => {
            let registry = registry_file::load(&args.registry)?;
            let (from, text) = (message.from.unwrap_or_else(default_sender), message_text(message.text)?);
            let prepared = publish::prepare_broadcast(&registry, &from, &text, message.priority)?;
            let receipt = deliver_now(&args.nats_url, &prepared).await?;
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
        Command::Bot { addr } => {
            mesh_listener::logging::init();
            let permissions = crate::server::permissions_from_env()?;
            let config = crate::server::BotConfig {
                nats_url: args.nats_url.clone(),
                addr,
                engine: crate::server::engine_config(args.registry.clone(), permissions),
                slack: crate::server::slack_from_env()?,
                discord: crate::server::discord_from_env()?,
                redis_url: std::env::var(crate::server::env::REDIS_URL).ok().filter(|u| !u.is_empty()),
                monitor_every: Duration::from_secs(30),
            };
            crate::server::run(config, mesh_listener::shutdown::shutdown_signal(), |_| {}).await?;
        }
        Command::Maintenance { duration, message, lead, from } => {
            let registry = registry_file::load(&args.registry)?;
            let parse = |d: &str| crate::command::grammar::parse_duration(d).map_err(anyhow::Error::msg);
            let window = crate::maintenance::Window {
                duration: parse(&duration)?,
                lead: parse(&lead)?,
                message: (!message.is_empty()).then(|| message.join(" ")),
                by: from.unwrap_or_else(default_sender),
                role: terminal_permissions().role_of(&crate::command::Identity::Terminal),
            };
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let report = crate::maintenance::run(&client, &registry, &window, |step| println!("{step}"))
                .await
                .map_err(anyhow::Error::msg)?;
            let record = crate::audit::AuditRecord {
                at: time::OffsetDateTime::now_utc(),
                who: window.by.clone(),
                platform: "cli".into(),
                channel: None,
                line: crate::audit::clip(&format!("maintenance {duration} --lead {lead}")),
                decision: "allowed".into(),
                outcome: report.steps.last().cloned().unwrap_or_default(),
                message_ids: Vec::new(),
            };
            if let Err(e) = crate::audit::append(&async_nats::jetstream::new(client.clone()), &record).await {
                eprintln!("warning: maintenance not recorded in the audit trail: {e}");
            }
            if report.missing > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status => return terminal(&args, "status".into(), None).await,
        Command::Agents { action: None } => return terminal(&args, "agents".into(), None).await,
        Command::Agents { action: Some(action) } => {
            let added = action.added_active();
            crate::agents::run(&args.registry, action, args.json)?;
            if let Some(id) = added {
                // Its consumer exists from now on, so nothing sent before its listener runs is lost.
                let registry = registry_file::load(&args.registry)?;
                let agents: Vec<_> = registry.get(&id).into_iter().collect();
                match crate::provision::after_change(&args.nats_url, &agents).await {
                    Ok(done) => println!("{done}"),
                    Err(e) => eprintln!(
                        "warning: consumer agent-{id} not created yet ({e}); the bot (`mesh bot`) creates it when \
                         it runs, and the listener waits for it until then"
                    ),
                }
            }
        }
        Command::Audit { n } => return terminal(&args, format!("audit {n}"), None).await,
        Command::Resume { agent } => {
            let line = agent.as_ref().map_or_else(|| "resume".to_owned(), |a| format!("resume agent={a}"));
            return terminal(&args, line, None).await;
        }
        Command::Kill { grade } => {
            let (line, yes) = kill_line(&grade);
            let code = terminal(&args, line, Some(yes)).await?;
            if let KillGrade::Nuclear { purge: true, .. } = grade
                && code == ExitCode::SUCCESS
            {
                let docker =
                    crate::docker::DockerControl::connect(&crate::docker::DockerControl::project_from_env()).await?;
                let report = docker.nuclear(true, crate::docker::own_container_id().as_deref()).await?;
                println!(
                    "purged volumes: {:?}, networks: {:?}, failed: {:?}",
                    report.volumes, report.networks, report.failed
                );
            }
            return Ok(code);
        }
        Command::Restart { agent } => {
            let registry = registry_file::load(&args.registry)?;
            crate::publish::resolve_any(&registry, &agent)?;
            let docker =
                crate::docker::DockerControl::connect(&crate::docker::DockerControl::project_from_env()).await?;
            let name = docker.restart_listener(&agent).await?;
            println!("restarted {name}");
        }
        Command::Ask { agent, text, timeout_s } => {
            let text = message_text(text)?;
            let mut config = crate::server::engine_config(args.registry.clone(), terminal_permissions());
            config.ask_timeout = Duration::from_secs(timeout_s);
            return terminal_with(&args, config, format!("ask {agent} {text}"), None).await;
        }
        Command::Backup { dir } => {
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let manifest = crate::backup::backup(&async_nats::jetstream::new(client), &args.registry, &dir).await?;
            if args.json {
                println!("{}", serde_json::to_string(&manifest)?);
            } else {
                println!(
                    "backup in {}: messages {:?}, {} agent consumers, {} kill switch entries, registry {}",
                    dir.display(),
                    manifest.streams,
                    manifest.consumers.len(),
                    manifest.killswitch,
                    if manifest.registry { "included" } else { "not found" }
                );
            }
        }
        Command::Restore { dir } => {
            let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
            let report = crate::backup::restore(&async_nats::jetstream::new(client), &args.registry, &dir).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "restored messages {:?}; pending per agent {:?}; {} kill switch entries; registry {}",
                    report.streams,
                    report.consumers,
                    report.killswitch,
                    report.registry.as_ref().map_or("not in the backup".into(), |p| p.display().to_string())
                );
            }
        }
        Command::Deploy { action } => {
            let up = matches!(action, crate::deploy::DeployAction::Up { .. });
            crate::deploy::run(&args.registry, action).await?;
            if up {
                let registry = registry_file::load(&args.registry)?;
                let agents: Vec<_> = registry.active().collect();
                match crate::provision::after_change(&args.nats_url, &agents).await {
                    Ok(done) => println!("{done}"),
                    Err(e) => println!("the bot container creates the agents' consumers when it starts ({e})"),
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

/// Connects, creates the streams and the bucket if missing, and delivers one prepared message.
async fn deliver_now(nats_url: &str, prepared: &publish::Prepared) -> anyhow::Result<Receipt> {
    let client = nats::connect_now(nats_url, "mesh-cli").await?;
    let js = async_nats::jetstream::new(client);
    crate::provision::ensure_mesh(&js, nats::replicas_from_env()?).await?;
    Ok(publish::deliver(&js, prepared).await?)
}

/// Whoever runs `mesh` on the host: a director unless `MESH_PERMISSIONS` says otherwise.
fn terminal_permissions() -> crate::command::Permissions {
    crate::server::permissions_from_env().unwrap_or_else(|_| crate::command::Permissions::new())
}

async fn terminal(args: &Globals, line: String, confirm: Option<bool>) -> anyhow::Result<ExitCode> {
    let config = crate::server::engine_config(args.registry.clone(), terminal_permissions());
    terminal_with(args, config, line, confirm).await
}

/// Runs one command through the engine as the terminal user and prints the reply.
async fn terminal_with(
    args: &Globals,
    config: crate::engine::EngineConfig,
    line: String,
    confirm: Option<bool>,
) -> anyhow::Result<ExitCode> {
    use crate::engine::{Engine, Platform, Request};
    let client = nats::connect_now(&args.nats_url, "mesh-cli").await?;
    let engine = Engine::new(config, client, crate::limits::LimitStore::memory()).await?;
    let request = |line: String| Request {
        who: crate::command::Identity::Terminal,
        platform: Platform::Cli,
        channel: None,
        line,
    };
    let mut handled = engine.handle(request(line)).await;
    if let Some(code) = handled.confirmation_code.clone() {
        let confirmed = match confirm {
            Some(true) => true,
            _ => prompt_confirmation(&handled.reply.title, &code)?,
        };
        if !confirmed {
            anyhow::bail!("not confirmed; nothing was done");
        }
        handled = engine.handle(request(format!("confirm {code}"))).await;
    }
    let failed = handled.reply.tone == crate::command::Tone::Error;
    print_reply(&handled.reply, args.json)?;
    if let Some(follow_up) = handled.follow_up {
        let answer = follow_up.await;
        print_reply(&answer, args.json)?;
        if answer.tone != crate::command::Tone::Info {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_reply(reply: &crate::command::Reply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(reply)?);
    } else {
        print!("{}", crate::command::render_text::render(reply));
    }
    Ok(())
}

/// Asks on the terminal for the confirmation code; false when stdin is not a terminal.
fn prompt_confirmation(instruction: &str, code: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{instruction}; stdin is not a terminal, so rerun with --yes to confirm");
    }
    eprint!("{instruction}\ntype {code} to confirm: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim().eq_ignore_ascii_case(code))
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
