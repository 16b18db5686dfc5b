//! The `mesh` command line: global options, subcommands, and exit codes.
//! Errors are one line on stderr and a non-zero exit.

use mesh_runtime::error_text::one_line;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_listener::nats::{self, DEFAULT_NATS_URL};
use mesh_listener::registry_file::DEFAULT_REGISTRY;
use mesh_protocol::{AgentId, Priority};

use crate::command::grammar::NewAgent;
use crate::config::Settings;
use crate::engine::{Engine, Progress, Request};
use crate::helpers::DeployAction;
use crate::limits::LimitStore;

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

/// The subcommands. Each one that acts on the mesh is a row of the command
/// table ([`crate::command::COMMANDS`]) and runs through the engine; `bot`,
/// `deploy probe`, `deploy demo-gateway` and `completions` are a service and
/// helpers, not commands on the mesh.
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
        #[arg(long, default_value_t = crate::command::grammar::DEFAULT_DLQ_LIST)]
        limit: u32,
        #[command(subcommand)]
        action: Option<DlqAction>,
    },
    /// Run the chat bot server (Slack and Discord commands, health, metrics, notifications).
    Bot {
        /// Address to listen on.
        #[arg(long, env = "MESH_BOT_ADDR", default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Seconds between two pings of the fleet for agent down/up notifications.
        #[arg(long, env = "MESH_MONITOR_EVERY_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        monitor_every_s: u64,
    },
    /// The mesh's MCP tools over stdio for an agent's MCP host: bridges to a listener's /mcp with the agent's MESH_TOKEN.
    Mcp {
        /// The listener's MCP endpoint, http://listener-<agent>:9100/mcp.
        #[arg(long, env = "MESH_MCP_URL")]
        url: String,
    },
    /// Show the kill switch, the listeners answering, and dead letters.
    Status,
    /// List the registry's agents (with the listeners' view), or change the registry.
    Agents {
        #[command(subcommand)]
        action: Option<AgentsAction>,
    },
    /// Ask a chat-mode agent and wait for its reply.
    Ask {
        /// The agent's id.
        agent: String,
        /// The question (several words are joined with spaces; after `--` everything is text).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// Time to live (30s, 5m, 2h): not delivered by then, it is a dead letter (reason "expired").
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Pull the kill switch: listeners stop pulling; messages wait in JetStream.
    Kill {
        #[command(subcommand)]
        grade: KillGrade,
    },
    /// Release the kill switch (the whole mesh, or one agent); ending a hard
    /// or nuclear kill asks for a confirmation code, as the kill did.
    Resume {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Confirm without the prompt (ending a hard or nuclear kill).
        #[arg(long)]
        yes: bool,
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
        #[arg(default_value_t = crate::command::grammar::DEFAULT_AUDIT)]
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
        action: DeployAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), made from these definitions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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
    /// The message (several words are joined with spaces; `-` reads standard input; after `--` everything is text).
    #[arg(required = true, num_args = 1..)]
    text: Vec<String>,
    /// low, normal, high or urgent (high and urgent wake the agent now).
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Sender name (an agent id, so replies reach its inbox, or a label).
    #[arg(long, env = "MESH_FROM")]
    from: Option<String>,
    /// Time to live (30s, 5m, 2h; at most 24h): not delivered by then, it is a dead letter (reason "expired").
    /// A broadcast without it takes MESH_BROADCAST_TTL, if set.
    #[arg(long)]
    ttl: Option<String>,
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
        n: u32,
    },
}

/// `mesh agents <action>`.
#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// List the registry's agents (from the file; no NATS needed). Tokens show as references.
    List,
    /// Register an agent (creating the registry file when there is none). Tokens are references: env:MESH_TOKEN_<NAME> or file:<registry dir>/secrets/<file> (or /run/secrets/<file>).
    Add {
        /// The new agent's id.
        id: String,
        /// The gateway's wake hook, http(s)://host:port/hooks/wake.
        #[arg(long)]
        hooks_url: String,
        /// The hook token's reference.
        #[arg(long)]
        hooks_token: String,
        /// The gateway's host:port (agent and chat delivery).
        #[arg(long)]
        gateway: Option<String>,
        /// The gateway operator token's reference (chat delivery).
        #[arg(long)]
        gateway_token: Option<String>,
        /// The agent's own mesh token's reference: what it presents to a listener's /v1/messages and /mcp to send.
        #[arg(long)]
        mesh_token: Option<String>,
        /// wake (default), agent or chat.
        #[arg(long)]
        delivery: Option<String>,
        /// The model named in chat completions.
        #[arg(long)]
        model: Option<String>,
        /// A display name.
        #[arg(long)]
        name: Option<String>,
        /// Register it inactive (no listener, no messages).
        #[arg(long)]
        inactive: bool,
        /// Deliveries in flight its consumer is set up for: 1 (default, in order) to 1024.
        #[arg(long)]
        concurrency: Option<u16>,
        /// At concurrency 1, messages its consumer hands the listener at once: 4 (default) or 1 when listener replicas share the agent.
        #[arg(long)]
        prefetch: Option<u16>,
        /// Let a chat agent's gateway token travel over plain HTTP to a host that is not loopback (a private network you trust); otherwise use --gateway https://host:port.
        #[arg(long)]
        allow_plaintext: bool,
        /// Do not check that the references resolve here (they only resolve inside the containers).
        #[arg(long)]
        no_check: bool,
    },
    /// Remove an agent from the registry (its listener stops on the next registry poll).
    Remove {
        /// The agent.
        id: String,
        /// Keep the entry, marked inactive.
        #[arg(long)]
        keep: bool,
        /// Delete its consumer even when it still holds messages not delivered
        /// (they are dropped; without it the removal is refused).
        #[arg(long)]
        drop_backlog: bool,
    },
    /// Point an agent at a new token; listeners use it from their next registry poll on.
    Rotate {
        /// The agent.
        id: String,
        /// The new hook token's reference (a new env var or file).
        #[arg(long, required_unless_present_any = ["gateway_token", "mesh_token"])]
        hooks_token: Option<String>,
        /// The new gateway token's reference.
        #[arg(long)]
        gateway_token: Option<String>,
        /// The new mesh token's reference (the old token is refused from the listeners' next registry poll on).
        #[arg(long)]
        mesh_token: Option<String>,
        /// Do not check that the reference resolves here.
        #[arg(long)]
        no_check: bool,
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

/// The whole `mesh` program.
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // Under --json an argument error is the same error object as every other error.
        Err(e) if e.use_stderr() && wants_json(std::env::args_os()) => {
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
            let title = lines.next().unwrap_or("invalid arguments");
            let reply = crate::command::Reply::error(title.strip_prefix("error: ").unwrap_or(title).to_owned())
                .with_lines(None, lines.map(str::to_owned));
            print_json_error(&reply);
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => e.exit(),
    };
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> ExitCode {
    let json = args.json;
    match execute(args).await {
        Ok(code) => code,
        Err(e) if json => {
            print_json_error(&crate::command::Reply::error(one_line(e.chain())));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", one_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}

/// True when `--json` is among the options (not in the text after `--`).
fn wants_json(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    args.into_iter().skip(1).take_while(|a| a != "--").any(|a| a == "--json")
}

/// An error raised before or around the engine, as the `--json` error object on stdout.
fn print_json_error(reply: &crate::command::Reply) {
    match serde_json::to_string(reply) {
        Ok(line) => println!("{line}"),
        Err(_) => eprintln!("error: {}", reply.title),
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

fn default_sender(user: Option<&str>) -> String {
    let user: String = user
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
    let (command, options) = match command {
        Command::Bot { addr, monitor_every_s } => return bot(&args, addr, Duration::from_secs(monitor_every_s)).await,
        Command::Mcp { url } => {
            crate::mcp_stdio::bridge(&url, &crate::config::token_from_env()?).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completions { shell } => {
            let mut definitions = <Args as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut definitions, "mesh", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Deploy { action: action @ (DeployAction::Probe { .. } | DeployAction::DemoGateway { .. }) } => {
            crate::helpers::run_helper(action).await?;
            return Ok(ExitCode::SUCCESS);
        }
        other => typed(other)?,
    };
    let settings = Settings::from_env()?;
    // Fail closed: a permissions file that is set but broken stops every command that needs a role.
    let permissions = match crate::config::permissions_from_env() {
        Ok(permissions) => permissions,
        Err(e) if command.spec().access.required(None).is_some() => return Err(e.into()),
        Err(_) => crate::command::Permissions::new().with_terminal_role(crate::command::Role::Viewer),
    };
    let mut config = settings.engine_config(args.registry.clone(), permissions);
    // Only a broadcast reads the default ttl: a typo in it must not block `mesh kill` or `mesh resume`.
    if matches!(command, crate::command::Command::Broadcast { .. }) {
        config.broadcast_ttl = settings.broadcast_ttl.clone().map_err(|e| anyhow::anyhow!(e))?;
    }
    if let Some(timeout) = options.ping_timeout {
        config.ping_timeout = timeout;
    }
    if let Some(timeout) = options.ask_timeout {
        config.ask_timeout = timeout;
    }
    let from = options.from.unwrap_or_else(|| default_sender(settings.user.as_deref()));
    if let crate::command::Command::Up { data_dir, nats_port } = &command {
        // `mesh up` creates the mesh: it is admitted like every command, with nothing to audit into yet.
        let engine = Engine::offline(config, "the demo mesh is not running yet".into(), LimitStore::memory());
        if let Err(refused) = engine.admit(&Request::terminal(&command, &from), &command).await {
            print_reply(&refused.reply, args.json)?;
            return Ok(ExitCode::FAILURE);
        }
        mesh_listener::logging::init();
        let config = crate::demo::DemoConfig { data_dir: data_dir.clone(), nats_port: *nats_port };
        crate::demo::run(config, mesh_listener::shutdown::shutdown_signal()).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let engine = connect_engine(&args.nats_url, &settings, config, &command).await?;
    run_terminal(&engine, command, &from, options.yes, args.json).await
}

/// What the terminal adds to a typed command: timeouts, the sender, `--yes`.
#[derive(Debug, Default)]
struct TerminalOptions {
    from: Option<String>,
    ping_timeout: Option<Duration>,
    ask_timeout: Option<Duration>,
    yes: bool,
}

fn agent_id(raw: &str) -> anyhow::Result<AgentId> {
    Ok(AgentId::parse(raw)?)
}

fn duration(raw: &str) -> anyhow::Result<Duration> {
    crate::command::grammar::parse_duration(raw).map_err(anyhow::Error::msg)
}

/// Maps the flags of one subcommand straight to the typed command (no line is
/// formatted and parsed again).
fn typed(command: Command) -> anyhow::Result<(crate::command::Command, TerminalOptions)> {
    use crate::command::Command as C;
    let mut options = TerminalOptions::default();
    let command = match command {
        Command::Send { agent, message } => {
            options.from = message.from;
            C::Send {
                agent: agent_id(&agent)?,
                text: message_text(message.text)?,
                priority: message.priority,
                ttl: message.ttl.as_deref().map(duration).transpose()?,
            }
        }
        Command::Broadcast { message } => {
            options.from = message.from;
            C::Broadcast {
                priority: message.priority,
                text: message_text(message.text)?,
                ttl: message.ttl.as_deref().map(duration).transpose()?,
            }
        }
        Command::Ping { timeout_ms } => {
            options.ping_timeout = Some(Duration::from_millis(timeout_ms));
            C::Ping
        }
        Command::Dlq { action: Some(DlqAction::Replay { agent, n }), .. } => {
            C::DlqReplay { agent: agent_id(&agent)?, count: n }
        }
        Command::Dlq { agent, limit, action: None } => {
            C::Dlq { agent: agent.as_deref().map(agent_id).transpose()?, limit }
        }
        Command::Status => C::Status,
        Command::Agents { action: None } => C::Agents,
        Command::Agents { action: Some(AgentsAction::List) } => C::AgentsList,
        Command::Agents {
            action:
                Some(AgentsAction::Add {
                    id,
                    hooks_url,
                    hooks_token,
                    gateway,
                    gateway_token,
                    mesh_token,
                    delivery,
                    model,
                    name,
                    inactive,
                    concurrency,
                    prefetch,
                    allow_plaintext,
                    no_check,
                }),
        } => {
            let agent = NewAgent {
                id,
                hooks_url,
                hooks_token,
                gateway,
                gateway_token,
                mesh_token,
                delivery,
                model,
                name,
                inactive,
                concurrency,
                prefetch,
                allow_plaintext,
            };
            C::AgentsAdd { agent, check: !no_check }
        }
        Command::Agents { action: Some(AgentsAction::Remove { id, keep, drop_backlog }) } => {
            C::AgentsRemove { agent: id, keep, drop_backlog }
        }
        Command::Agents {
            action: Some(AgentsAction::Rotate { id, hooks_token, gateway_token, mesh_token, no_check }),
        } => C::AgentsRotate { agent: id, hooks_token, gateway_token, mesh_token, check: !no_check },
        Command::Ask { agent, text, timeout_s, ttl } => {
            options.ask_timeout = Some(Duration::from_secs(timeout_s));
            C::Ask {
                agent: agent_id(&agent)?,
                text: message_text(text)?,
                ttl: ttl.as_deref().map(duration).transpose()?,
            }
        }
        Command::Kill { grade: KillGrade::Soft { duration: d, agent, reason } } => C::KillSoft {
            duration: d.as_deref().map(duration).transpose()?.unwrap_or(crate::command::grammar::DEFAULT_SOFT_KILL),
            agent: agent.as_deref().map(agent_id).transpose()?,
            reason,
        },
        Command::Kill { grade: KillGrade::Hard { agent, reason, yes } } => {
            options.yes = yes;
            C::KillHard { agent: agent.as_deref().map(agent_id).transpose()?, reason }
        }
        Command::Kill { grade: KillGrade::Nuclear { yes, purge } } => {
            options.yes = yes;
            C::KillNuclear { purge }
        }
        Command::Resume { agent, yes } => {
            options.yes = yes;
            C::Resume { agent: agent.as_deref().map(agent_id).transpose()? }
        }
        Command::Maintenance { duration: d, message, lead, from } => {
            options.from = from;
            C::Maintenance {
                duration: duration(&d)?,
                lead: duration(&lead)?,
                message: (!message.is_empty()).then(|| message.join(" ")),
            }
        }
        Command::Restart { agent } => C::Restart { agent: agent_id(&agent)? },
        Command::Audit { n } => C::Audit { count: n },
        Command::Backup { dir } => C::Backup { dir },
        Command::Restore { dir } => C::Restore { dir },
        Command::Deploy { action: DeployAction::Render { out, nats_sync_interval } } => {
            C::DeployRender { out, sync: nats_sync_interval }
        }
        Command::Deploy {
            action: DeployAction::Up { out, compose, project, profile, nats_sync_interval, config_dir, generated_dir },
        } => C::DeployUp(crate::command::grammar::DeployUp {
            out,
            compose,
            project,
            profiles: profile,
            sync: nats_sync_interval,
            config_dir,
            generated_dir,
        }),
        Command::Up { demo: _, data_dir, nats_port } => C::Up { data_dir, nats_port },
        Command::Bot { .. } | Command::Mcp { .. } | Command::Deploy { .. } | Command::Completions { .. } => {
            anyhow::bail!("not a command on the mesh")
        }
    };
    Ok((command, options))
}

/// `mesh bot`: refuses to start on a broken permissions file.
async fn bot(args: &Globals, addr: std::net::SocketAddr, monitor_every: Duration) -> anyhow::Result<ExitCode> {
    mesh_listener::logging::init();
    let settings = Settings::from_env()?;
    let permissions = crate::config::permissions_from_env()?;
    let config = crate::server::BotConfig {
        nats_url: args.nats_url.clone(),
        addr,
        engine: {
            // The bot refuses to start on a malformed default ttl (it would apply it to every broadcast).
            settings.broadcast_ttl.clone().map_err(|e| anyhow::anyhow!(e))?;
            settings.engine_config(args.registry.clone(), permissions)
        },
        slack: crate::config::slack_from_env()?,
        discord: crate::config::discord_from_env()?,
        redis_url: settings.redis_url,
        monitor_every,
        docker: settings.docker,
        nats: settings.nats,
        web: crate::config::web_from_env()?,
        backlog_warn_after: settings.backlog_warn_after,
    };
    crate::server::run(config, mesh_listener::shutdown::shutdown_signal(), |_| {}).await?;
    Ok(ExitCode::SUCCESS)
}

/// Commands that touch only local files or Docker: they run (and say their
/// audit record was not stored) when NATS cannot be reached, since that is
/// when an operator may need them most. `status` reports what it can then
/// (containers, registry) and says NATS is unreachable.
fn works_offline(command: &crate::command::Command) -> bool {
    use crate::command::CommandKind as K;
    matches!(
        command.kind(),
        K::AgentsList
            | K::AgentsAdd
            | K::AgentsRemove
            | K::AgentsRotate
            | K::DeployRender
            | K::DeployUp
            | K::Restart
            | K::Status
            | K::Help
    )
}

/// The engine, connected to the mesh; offline for commands that work without it.
async fn connect_engine(
    nats_url: &str,
    settings: &Settings,
    config: crate::engine::EngineConfig,
    command: &crate::command::Command,
) -> anyhow::Result<Engine> {
    let connected = match nats::connect_now(nats_url, "mesh-cli", &settings.nats).await {
        Ok(client) => Engine::new(config.clone(), client, LimitStore::memory()).await.map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    let engine = match connected {
        Ok(engine) => engine,
        Err(e) if works_offline(command) => Engine::offline(config, one_line(e.chain()), LimitStore::memory()),
        Err(e) => return Err(e),
    };
    Ok(engine.with_containers(std::sync::Arc::new(settings.docker.clone())))
}

/// Runs one typed command through the engine as the terminal user and prints the reply.
async fn run_terminal(
    engine: &Engine,
    command: crate::command::Command,
    from: &str,
    yes: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = |command: &crate::command::Command| {
        let mut request = Request::terminal(command, from);
        if !json {
            request.progress = Some(Progress(std::sync::Arc::new(|step: &str| println!("{step}"))));
        }
        request
    };
    let mut handled = engine.handle_command(request(&command), command).await;
    if let Some(code) = handled.confirmation_code.clone() {
        let confirmed = yes || prompt_confirmation(&handled.reply.title, &code)?;
        if !confirmed {
            anyhow::bail!("not confirmed; nothing was done");
        }
        let confirm = crate::command::Command::Confirm { code };
        handled = engine.handle_command(request(&confirm), confirm).await;
    }
    if let Some(e) = &handled.audit_error {
        eprintln!("warning: not recorded in the audit trail: {e}");
    }
    print_reply(&handled.reply, json)?;
    if let Some(follow_up) = handled.follow_up {
        let answer = follow_up.await;
        print_reply(&answer, json)?;
        if answer.tone != crate::command::Tone::Info {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(if handled.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The reply as text (errors on stderr), or as the one `--json` schema on stdout.
fn print_reply(reply: &crate::command::Reply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(reply)?);
    } else if reply.tone == crate::command::Tone::Error {
        eprint!("{}", crate::command::render_text::render(reply));
    } else {
        print!("{}", crate::command::render_text::render(reply));
    }
    Ok(())
}

/// Asks on the terminal for the confirmation code; false when stdin is not a terminal.
fn prompt_confirmation(instruction: &str, code: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("this command needs confirmation and stdin is not a terminal: rerun it with --yes to confirm");
    }
    eprint!("{instruction}\ntype {code} to confirm: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim().eq_ignore_ascii_case(code))
}
