//! The command grammar: [`parse`] turns one line (what follows `/mesh` in
//! Slack, `!mesh` on Discord, or `mesh` in a terminal) into a [`Command`].
//!
//! Rules for the cases that could be read two ways (also in `help`):
//!
//! - Command words (`send`, `kill soft`, `dlq replay`) ignore case; agent ids
//!   do not (`Nova` is rejected with a hint to write `nova`).
//! - Message text is everything after the one whitespace character that
//!   follows the agent (or the command word, or the priority), exactly as typed.
//! - An agent may be written bare (`nova`) or as `agent=nova`.
//! - `kill soft [duration] [agent] [reason]`: a first word shaped like a
//!   duration (`30s`, `5m`, `2h`) is the duration; then `agent=<id>`, or the
//!   next word if it is a valid agent id, is the agent; `--` ends the agent
//!   slot; the rest is the reason. `kill hard` is the same without duration.
//! - `dlq replay` is always the replay command.
//! - Terminal-only commands (`backup`, `maintenance`, `agents add`, ...) are
//!   rows of the same table, but a chat line naming one is refused with
//!   [`ParseError::TerminalOnly`]: the terminal builds them from its flags.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use mesh_protocol::{AgentId, AgentIdError, Priority};

use super::confirm;
use super::table::{self, CommandKind, CommandSpec};

/// How long `kill soft` pauses when no duration is given.
pub const DEFAULT_SOFT_KILL: Duration = Duration::from_secs(5 * 60);
/// The longest `kill soft`.
pub const MAX_SOFT_KILL: Duration = Duration::from_secs(24 * 60 * 60);
/// Dead letters `dlq replay` redelivers when no count is given.
pub const DEFAULT_REPLAY: u32 = 10;
/// The most dead letters one `dlq replay` redelivers.
pub const MAX_REPLAY: u32 = 1000;
/// Dead letters `dlq` lists when no limit is given.
pub const DEFAULT_DLQ_LIST: u32 = 20;
/// Entries `audit` shows when no count is given.
pub const DEFAULT_AUDIT: u32 = 20;
/// The most entries one `audit` shows.
pub const MAX_AUDIT: u32 = 200;

/// How hard the kill switch is pulled; also the grade of the pause in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KillGrade {
    /// A timed pause that ends by itself.
    Soft,
    /// A pause until a director resumes.
    Hard,
    /// The mesh is torn down.
    Nuclear,
}

/// What `agents add` registers (tokens are references, never values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewAgent {
    /// The new agent's id.
    pub id: String,
    /// Its wake hook URL.
    pub hooks_url: String,
    /// Reference to its hook token (`env:NAME` or `file:/path`).
    pub hooks_token: String,
    /// The gateway's `host:port` or `https://host:port`.
    pub gateway: Option<String>,
    /// Reference to the gateway's operator token.
    pub gateway_token: Option<String>,
    /// Reference to the agent's own mesh token (what it presents to `/v1/messages` and `/mcp`).
    pub mesh_token: Option<String>,
    /// `wake`, `agent` or `chat`.
    pub delivery: Option<String>,
    /// The model (chat delivery).
    pub model: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Register it inactive (no listener, no messages).
    pub inactive: bool,
    /// Deliveries in flight its consumer is set up for (default 1).
    pub concurrency: Option<u16>,
    /// At concurrency 1, how many messages its consumer hands the listener at
    /// once (default 4; 1 when listener replicas share the agent).
    pub prefetch: Option<u16>,
    /// Allow its gateway token over plain HTTP to a host that is not loopback.
    pub allow_plaintext: bool,
}

/// How often nats-server fsyncs JetStream writes (`sync_interval`).
///
/// `always` (the default) fsyncs every write before it is acknowledged, so an
/// acked message survives a power loss or an OS crash; an interval such as
/// `2m` (nats-server's own default) is faster but can lose what was acked
/// within the last interval on such a crash (Jepsen, NATS 2.12.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncInterval {
    /// fsync every write.
    Always,
    /// fsync on a timer: a Go duration made of a number and `ms`, `s`, `m` or `h`.
    Every(String),
}

impl SyncInterval {
    /// The `sync_interval` line of a `jetstream` block, with a comment, each line indented.
    pub fn conf_lines(&self, indent: &str) -> String {
        match self {
            Self::Always => format!(
                "{indent}# fsync every write before it is acknowledged (render with --nats-sync-interval 2m to relax)\n\
                 {indent}sync_interval: always"
            ),
            Self::Every(every) => format!(
                "{indent}# fsync every {every}: writes acked within the last interval can be lost on power loss\n\
                 {indent}sync_interval: \"{every}\""
            ),
        }
    }
}

impl std::str::FromStr for SyncInterval {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "always" {
            return Ok(Self::Always);
        }
        let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &text[digits.len()..];
        let positive = digits.parse::<u64>().is_ok_and(|n| n > 0);
        if positive && ["ms", "s", "m", "h"].contains(&unit) {
            Ok(Self::Every(text.to_owned()))
        } else {
            Err(format!("invalid sync interval {text:?}: use always, or a duration such as 10s or 2m"))
        }
    }
}

impl std::fmt::Display for SyncInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Every(every) => f.write_str(every),
        }
    }
}

/// Where `deploy up` finds its files and which compose project it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployUp {
    /// Output directory of the rendered files.
    pub out: PathBuf,
    /// The base compose file.
    pub compose: PathBuf,
    /// Compose project name.
    pub project: String,
    /// Compose profiles to enable.
    pub profiles: Vec<String>,
    /// How often nats-server fsyncs JetStream writes.
    pub sync: SyncInterval,
    /// The directory the containers mount as `/etc/mesh` (`MESH_CONFIG_DIR`);
    /// `None`: the registry file's directory.
    pub config_dir: Option<PathBuf>,
    /// The rendered files' directory as the compose file sees it
    /// (`MESH_GENERATED_DIR`); `None`: `out`, made absolute.
    pub generated_dir: Option<PathBuf>,
}

/// A parsed chat command, or a terminal command built from flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send `text` to one agent.
    Send {
        /// The target.
        agent: AgentId,
        /// The message, exactly as typed.
        text: String,
        /// How urgent it is (normal unless `--priority` was given).
        priority: Priority,
        /// Dropped (dead-lettered as expired) when not delivered within this (`--ttl`).
        ttl: Option<Duration>,
    },
    /// Send `text` to every active agent.
    Broadcast {
        /// How urgent it is (normal unless `--priority` was given).
        priority: Priority,
        /// The message, exactly as typed.
        text: String,
        /// Dropped when not delivered within this (`--ttl`; else the broadcast default, if set).
        ttl: Option<Duration>,
    },
    /// Send `text` to one agent and wait for its reply.
    Ask {
        /// The target.
        agent: AgentId,
        /// The message, exactly as typed.
        text: String,
        /// Dropped when not delivered within this (`--ttl`).
        ttl: Option<Duration>,
    },
    /// Health-ping every listener.
    Ping,
    /// Show the state of the mesh.
    Status,
    /// List the registered agents.
    Agents,
    /// Pause delivery for `duration`.
    KillSoft {
        /// How long (default [`DEFAULT_SOFT_KILL`], at most [`MAX_SOFT_KILL`]).
        duration: Duration,
        /// One agent, or the whole mesh when `None`.
        agent: Option<AgentId>,
        /// Why, trimmed.
        reason: Option<String>,
    },
    /// Pause delivery until a director resumes.
    KillHard {
        /// One agent, or the whole mesh when `None`.
        agent: Option<AgentId>,
        /// Why, trimmed.
        reason: Option<String>,
    },
    /// Tear the mesh down.
    KillNuclear {
        /// Also remove the project's volumes and networks.
        purge: bool,
    },
    /// End a pause.
    Resume {
        /// One agent, or the whole mesh when `None`.
        agent: Option<AgentId>,
    },
    /// Run the pending action a code was given for.
    Confirm {
        /// The code, upper case.
        code: String,
    },
    /// List dead letters.
    Dlq {
        /// One agent's, or every agent's when `None`.
        agent: Option<AgentId>,
        /// Show at most this many (chat: always [`DEFAULT_DLQ_LIST`]; the terminal has `--limit`).
        limit: u32,
    },
    /// Redeliver an agent's oldest dead letters.
    DlqReplay {
        /// Whose dead letters.
        agent: AgentId,
        /// How many (default [`DEFAULT_REPLAY`], at most [`MAX_REPLAY`]).
        count: u32,
    },
    /// Show the last audit entries.
    Audit {
        /// How many (default [`DEFAULT_AUDIT`], at most [`MAX_AUDIT`]).
        count: u32,
    },
    /// List the commands, or explain one.
    Help {
        /// A command name or first word from the table (`kill`, `kill soft`).
        topic: Option<&'static str>,
    },
    /// The maintenance window (terminal only).
    Maintenance {
        /// How long the mesh is paused.
        duration: Duration,
        /// Time between the announcement and the pause.
        lead: Duration,
        /// What the maintenance is for.
        message: Option<String>,
    },
    /// Restart one agent's listener container (terminal only).
    Restart {
        /// The agent.
        agent: AgentId,
    },
    /// Back up into a new directory (terminal only).
    Backup {
        /// The directory.
        dir: PathBuf,
    },
    /// Restore a backup (terminal only).
    Restore {
        /// The backup directory.
        dir: PathBuf,
    },
    /// List the registry file (terminal only).
    AgentsList,
    /// Register an agent (terminal only).
    AgentsAdd {
        /// The entry.
        agent: NewAgent,
        /// Check that the references resolve on this host.
        check: bool,
    },
    /// Remove an agent, or mark it inactive (terminal only).
    AgentsRemove {
        /// The agent, as typed.
        agent: String,
        /// Keep the entry, marked inactive.
        keep: bool,
        /// Delete the consumer even when it holds messages not delivered yet.
        drop_backlog: bool,
    },
    /// Point an agent at new tokens (terminal only).
    AgentsRotate {
        /// The agent, as typed.
        agent: String,
        /// The new hook token's reference.
        hooks_token: Option<String>,
        /// The new gateway token's reference.
        gateway_token: Option<String>,
        /// The new mesh token's reference.
        mesh_token: Option<String>,
        /// Check that the references resolve on this host.
        check: bool,
    },
    /// Render the deployment files (terminal only).
    DeployRender {
        /// Output directory.
        out: PathBuf,
        /// How often nats-server fsyncs JetStream writes.
        sync: SyncInterval,
    },
    /// Render, then start the stack (terminal only).
    DeployUp(DeployUp),
    /// Run the local demo mesh (terminal only).
    Up {
        /// Where NATS data and the demo registry live.
        data_dir: PathBuf,
        /// NATS client port.
        nats_port: u16,
    },
}

impl Command {
    /// Which command this is.
    pub fn kind(&self) -> CommandKind {
        match self {
            Self::Send { .. } => CommandKind::Send,
            Self::Broadcast { .. } => CommandKind::Broadcast,
            Self::Ask { .. } => CommandKind::Ask,
            Self::Ping => CommandKind::Ping,
            Self::Status => CommandKind::Status,
            Self::Agents => CommandKind::Agents,
            Self::KillSoft { .. } => CommandKind::KillSoft,
            Self::KillHard { .. } => CommandKind::KillHard,
            Self::KillNuclear { .. } => CommandKind::KillNuclear,
            Self::Resume { .. } => CommandKind::Resume,
            Self::Confirm { .. } => CommandKind::Confirm,
            Self::Dlq { .. } => CommandKind::Dlq,
            Self::DlqReplay { .. } => CommandKind::DlqReplay,
            Self::Audit { .. } => CommandKind::Audit,
            Self::Help { .. } => CommandKind::Help,
            Self::Maintenance { .. } => CommandKind::Maintenance,
            Self::Restart { .. } => CommandKind::Restart,
            Self::Backup { .. } => CommandKind::Backup,
            Self::Restore { .. } => CommandKind::Restore,
            Self::AgentsList => CommandKind::AgentsList,
            Self::AgentsAdd { .. } => CommandKind::AgentsAdd,
            Self::AgentsRemove { .. } => CommandKind::AgentsRemove,
            Self::AgentsRotate { .. } => CommandKind::AgentsRotate,
            Self::DeployRender { .. } => CommandKind::DeployRender,
            Self::DeployUp(_) => CommandKind::DeployUp,
            Self::Up { .. } => CommandKind::Up,
        }
    }

    /// This command's row of the command table.
    pub fn spec(&self) -> &'static CommandSpec {
        self.kind().spec()
    }

    /// True when it only runs after `confirm <code>`.
    pub fn needs_confirmation(&self) -> bool {
        self.spec().confirm
    }
}

/// The canonical form, for audit entries and confirmation prompts; a chat
/// command's form parses back to the same command (terminal-only commands are
/// shown the way they are typed after `mesh`).
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.spec().name;
        let opt_agent = |a: &Option<AgentId>| a.as_ref().map(|a| format!(" agent={a}")).unwrap_or_default();
        let reason = |r: &Option<String>| r.as_ref().map(|r| format!(" -- {r}")).unwrap_or_default();
        let opt = |flag: &str, v: &Option<String>| v.as_ref().map(|v| format!(" --{flag} {v}")).unwrap_or_default();
        match self {
            Self::Send { agent, text, priority, ttl } => {
                write!(f, "{name}")?;
                if *priority != Priority::Normal {
                    write!(f, " --priority {priority}")?;
                }
                write!(f, "{} {agent} {text}", ttl_flag(ttl))
            }
            Self::Ask { agent, text, ttl } => write!(f, "{name}{} {agent} {text}", ttl_flag(ttl)),
            Self::Broadcast { priority, text, ttl } => {
                write!(f, "{name} --priority {priority}{} {text}", ttl_flag(ttl))
            }
            Self::Ping
            | Self::Status
            | Self::Agents
            | Self::KillNuclear { purge: false }
            | Self::Help { topic: None } => f.write_str(name),
            Self::KillNuclear { purge: true } => write!(f, "{name} --purge"),
            Self::KillSoft { duration, agent, reason: r } => {
                write!(f, "{name} {}{}{}", format_duration(*duration), opt_agent(agent), reason(r))
            }
            Self::KillHard { agent, reason: r } => write!(f, "{name}{}{}", opt_agent(agent), reason(r)),
            Self::Resume { agent } | Self::Dlq { agent, limit: DEFAULT_DLQ_LIST } => {
                write!(f, "{name}{}", opt_agent(agent))
            }
            Self::Dlq { agent, limit } => write!(f, "{name}{} --limit {limit}", opt_agent(agent)),
            Self::Confirm { code } => write!(f, "{name} {code}"),
            Self::DlqReplay { agent, count } => write!(f, "{name} {agent} {count}"),
            Self::Audit { count } => write!(f, "{name} {count}"),
            Self::Help { topic: Some(topic) } => write!(f, "{name} {topic}"),
            Self::Maintenance { duration, lead, message } => {
                write!(f, "{name} {} --lead {}", format_duration(*duration), format_duration(*lead))?;
                message.as_ref().map_or(Ok(()), |m| write!(f, " -- {m}"))
            }
            Self::Restart { agent } => write!(f, "{name} {agent}"),
            Self::Backup { dir } | Self::Restore { dir } => write!(f, "{name} {}", dir.display()),
            Self::AgentsList => f.write_str(name),
            Self::AgentsAdd { agent: a, check } => {
                write!(f, "{name} {} --hooks-url {} --hooks-token {}", a.id, a.hooks_url, a.hooks_token)?;
                write!(f, "{}{}", opt("gateway", &a.gateway), opt("gateway-token", &a.gateway_token))?;
                write!(f, "{}", opt("mesh-token", &a.mesh_token))?;
                write!(f, "{}{}{}", opt("delivery", &a.delivery), opt("model", &a.model), opt("name", &a.name))?;
                write!(f, "{}{}", if a.inactive { " --inactive" } else { "" }, if *check { "" } else { " --no-check" })
            }
            Self::AgentsRemove { agent, keep, drop_backlog } => write!(
                f,
                "{name} {agent}{}{}",
                if *keep { " --keep" } else { "" },
                if *drop_backlog { " --drop-backlog" } else { "" }
            ),
            Self::AgentsRotate { agent, hooks_token, gateway_token, mesh_token, check } => write!(
                f,
                "{name} {agent}{}{}{}{}",
                opt("hooks-token", hooks_token),
                opt("gateway-token", gateway_token),
                opt("mesh-token", mesh_token),
                if *check { "" } else { " --no-check" }
            ),
            Self::DeployRender { out, sync } => write!(f, "{name} --out {} --nats-sync-interval {sync}", out.display()),
            Self::DeployUp(up) => {
                write!(
                    f,
                    "{name} --out {} --compose {} --project {} --nats-sync-interval {}",
                    up.out.display(),
                    up.compose.display(),
                    up.project,
                    up.sync
                )?;
                up.profiles.iter().try_for_each(|p| write!(f, " --profile {p}"))
            }
            Self::Up { data_dir, nats_port } => {
                write!(f, "{name} --demo --data-dir {} --nats-port {nats_port}", data_dir.display())
            }
        }
    }
}

/// Why a line is not a command. Every message ends with the usage line(s) of
/// the command concerned, or points at `help`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but whitespace.
    #[error("no command given; try \"help\" for the list of commands")]
    Empty,
    /// The command word (or `kill` grade) is not in the table.
    #[error("unknown command {typed:?}{}", unknown_hint(.suggestion))]
    Unknown {
        /// What was typed, shortened.
        typed: String,
        /// The nearest command name, if it looks like a typo.
        suggestion: Option<&'static str>,
    },
    /// A required argument is missing.
    #[error("missing {what}; usage: {usage}")]
    Missing {
        /// What is missing (`<text>`).
        what: &'static str,
        /// The usage line(s).
        usage: String,
    },
    /// An agent id is invalid.
    #[error("{source}; usage: {usage}")]
    BadAgent {
        /// Why, from [`AgentId::parse`].
        source: AgentIdError,
        /// The usage line.
        usage: &'static str,
    },
    /// An argument is malformed or out of range.
    #[error("{problem}; usage: {usage}")]
    BadArgument {
        /// What is wrong and what to write instead.
        problem: String,
        /// The usage line.
        usage: &'static str,
    },
    /// A terminal-only command was given in chat.
    #[error("{name} runs only in a terminal on the host: mesh {usage}")]
    TerminalOnly {
        /// The command's name.
        name: &'static str,
        /// Its usage line.
        usage: &'static str,
    },
    /// Words left over after a complete command.
    #[error("unexpected {extra:?} after {name:?}; usage: {usage}")]
    Unexpected {
        /// The first extra word, shortened.
        extra: String,
        /// The command's name.
        name: &'static str,
        /// The usage line.
        usage: &'static str,
    },
}

fn unknown_hint(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(name) => format!("; did you mean {name:?}? usage: {}", table::usage_of(name)),
        None => "; try \"help\" for the list of commands".to_owned(),
    }
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let mut c = Cursor { rest: line };
    let first = c.word().ok_or(ParseError::Empty)?.to_lowercase();
    let kind = match first.as_str() {
        "send" => CommandKind::Send,
        "broadcast" => CommandKind::Broadcast,
        "ask" => CommandKind::Ask,
        "ping" => CommandKind::Ping,
        "status" => CommandKind::Status,
        "agents" => CommandKind::Agents,
        "kill" => {
            let grade = c
                .word()
                .ok_or_else(|| ParseError::Missing { what: "soft, hard or nuclear", usage: table::usage_of("kill") })?;
            match grade.to_lowercase().as_str() {
                "soft" => CommandKind::KillSoft,
                "hard" => CommandKind::KillHard,
                "nuclear" => CommandKind::KillNuclear,
                other => return Err(unknown(&format!("kill {other}"))),
            }
        }
        "resume" => CommandKind::Resume,
        "confirm" => CommandKind::Confirm,
        "dlq" if c.peek().is_some_and(|w| w.eq_ignore_ascii_case("replay")) => {
            c.word();
            CommandKind::DlqReplay
        }
        "dlq" => CommandKind::Dlq,
        "audit" => CommandKind::Audit,
        "help" => CommandKind::Help,
        "maintenance" => CommandKind::Maintenance,
        "restart" => CommandKind::Restart,
        "backup" => CommandKind::Backup,
        "restore" => CommandKind::Restore,
        "up" => CommandKind::Up,
        "deploy" => match c.word().map(str::to_lowercase).as_deref() {
            Some("up") => CommandKind::DeployUp,
            _ => CommandKind::DeployRender,
        },
        _ => return Err(unknown(&first)),
    };
    let kind = match (kind, c.peek().map(str::to_lowercase).as_deref()) {
        (CommandKind::Agents, Some("list")) => CommandKind::AgentsList,
        (CommandKind::Agents, Some("add")) => CommandKind::AgentsAdd,
        (CommandKind::Agents, Some("remove")) => CommandKind::AgentsRemove,
        (CommandKind::Agents, Some("rotate")) => CommandKind::AgentsRotate,
        (kind, _) => kind,
    };
    let spec = kind.spec();
    if spec.front == table::Front::Terminal {
        return Err(ParseError::TerminalOnly { name: spec.name, usage: spec.usage });
    }
    let usage = spec.usage;
    let missing = |what| ParseError::Missing { what, usage: usage.to_owned() };
    let command = match kind {
        CommandKind::Send => {
            let MessageOptions { priority, ttl } = message_options(&mut c, usage, true)?;
            let agent = agent(c.word().ok_or_else(|| missing("<agent>"))?, usage)?;
            let text = c.text().ok_or_else(|| missing("<text>"))?.to_owned();
            Command::Send { agent, text, priority, ttl }
        }
        CommandKind::Ask => {
            let MessageOptions { ttl, .. } = message_options(&mut c, usage, false)?;
            let agent = agent(c.word().ok_or_else(|| missing("<agent>"))?, usage)?;
            Command::Ask { agent, text: c.text().ok_or_else(|| missing("<text>"))?.to_owned(), ttl }
        }
        CommandKind::Broadcast => {
            let MessageOptions { priority, ttl } = message_options(&mut c, usage, true)?;
            Command::Broadcast { priority, text: c.text().ok_or_else(|| missing("<text>"))?.to_owned(), ttl }
        }
        CommandKind::Ping => Command::Ping,
        CommandKind::Status => Command::Status,
        CommandKind::Agents => Command::Agents,
        CommandKind::KillNuclear => {
            let purge = c.peek().is_some_and(|w| w.eq_ignore_ascii_case("--purge"));
            if purge {
                c.word();
            }
            Command::KillNuclear { purge }
        }
        CommandKind::KillSoft => {
            let given = c.peek().filter(|w| is_duration_shaped(w));
            let duration = match given {
                Some(word) => {
                    c.word();
                    parse_duration(word).map_err(|problem| ParseError::BadArgument { problem, usage })?
                }
                None => DEFAULT_SOFT_KILL,
            };
            let agent = kill_agent(&mut c, usage)?;
            let reason = c.reason();
            if given.is_none()
                && agent.is_some()
                && let Some(word) = reason.as_deref().and_then(|r| r.split_whitespace().next())
                && is_duration_shaped(word)
            {
                let problem =
                    format!("put the duration first: kill soft {word} {}", agent.as_ref().map_or("", |a| a.as_str()));
                return Err(ParseError::BadArgument { problem, usage });
            }
            Command::KillSoft { duration, agent, reason }
        }
        CommandKind::KillHard => {
            if let Some(word) = c.peek().filter(|w| is_duration_shaped(w)) {
                let problem = format!(
                    "kill hard takes no duration ({word:?}): it lasts until a director resumes, so use kill soft {word} for a timed pause"
                );
                return Err(ParseError::BadArgument { problem, usage });
            }
            let agent = kill_agent(&mut c, usage)?;
            Command::KillHard { agent, reason: c.reason() }
        }
        CommandKind::Resume => Command::Resume { agent: c.word().map(|w| agent(w, usage)).transpose()? },
        CommandKind::Dlq => {
            Command::Dlq { agent: c.word().map(|w| agent(w, usage)).transpose()?, limit: DEFAULT_DLQ_LIST }
        }
        CommandKind::Confirm => {
            let raw = c.word().ok_or_else(|| missing("<code>"))?;
            let code = confirm::normalize_code(raw).ok_or_else(|| ParseError::BadArgument {
                problem: format!(
                    "{} is not a confirmation code; codes are 6 letters and digits such as K7P2QX",
                    shown(raw)
                ),
                usage,
            })?;
            Command::Confirm { code }
        }
        CommandKind::DlqReplay => {
            let agent = agent(c.word().ok_or_else(|| missing("<agent>"))?, usage)?;
            let count = c.word().map(|w| count(w, MAX_REPLAY, usage)).transpose()?.unwrap_or(DEFAULT_REPLAY);
            Command::DlqReplay { agent, count }
        }
        CommandKind::Audit => {
            Command::Audit { count: c.word().map(|w| count(w, MAX_AUDIT, usage)).transpose()?.unwrap_or(DEFAULT_AUDIT) }
        }
        CommandKind::Help => {
            let words: Vec<String> = std::iter::from_fn(|| c.word()).map(str::to_lowercase).collect();
            if words.is_empty() {
                Command::Help { topic: None }
            } else {
                let wanted = words.join(" ");
                Command::Help { topic: Some(table::topic(&wanted).ok_or_else(|| unknown(&wanted))?) }
            }
        }
        CommandKind::Maintenance
        | CommandKind::Restart
        | CommandKind::Backup
        | CommandKind::Restore
        | CommandKind::AgentsList
        | CommandKind::AgentsAdd
        | CommandKind::AgentsRemove
        | CommandKind::AgentsRotate
        | CommandKind::DeployRender
        | CommandKind::DeployUp
        | CommandKind::Up => return Err(ParseError::TerminalOnly { name: spec.name, usage }),
    };
    if let Some(extra) = c.word() {
        return Err(ParseError::Unexpected { extra: shown_plain(extra), name: spec.name, usage });
    }
    Ok(command)
}

/// Formats a duration the way the grammar reads it: the largest whole unit.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The leading options of a message: `--priority P` and `--ttl D`.
#[derive(Debug, Default)]
struct MessageOptions {
    priority: Priority,
    ttl: Option<Duration>,
}

/// Leading `--priority P` (or `--priority=P`, where `with_priority`) and
/// `--ttl D` (or `--ttl=D`), in either order, each once; the first other word
/// (or a flag seen already) starts the agent, or the text.
fn message_options(c: &mut Cursor<'_>, usage: &'static str, with_priority: bool) -> Result<MessageOptions, ParseError> {
    let mut options = MessageOptions::default();
    let (mut priority_seen, mut ttl_seen) = (!with_priority, false);
    loop {
        if !priority_seen && let Some(value) = flag_value(c, "--priority", "the priority after --priority", usage)? {
            priority_seen = true;
            options.priority =
                value.to_lowercase().parse().map_err(|problem| ParseError::BadArgument { problem, usage })?;
        } else if !ttl_seen && let Some(value) = flag_value(c, "--ttl", "the time to live after --ttl", usage)? {
            ttl_seen = true;
            options.ttl = Some(
                parse_duration(value)
                    .map_err(|problem| ParseError::BadArgument { problem: format!("--ttl: {problem}"), usage })?,
            );
        } else {
            return Ok(options);
        }
    }
}

/// The value of a leading `<flag> V` or `<flag>=V`, consumed; `None` when the
/// next word is not that flag.
fn flag_value<'a>(
    c: &mut Cursor<'a>,
    flag: &str,
    what: &'static str,
    usage: &'static str,
) -> Result<Option<&'a str>, ParseError> {
    let Some(word) = c.peek() else { return Ok(None) };
    match word.strip_prefix(flag) {
        Some("") => {
            c.word();
            c.word().map(Some).ok_or_else(|| ParseError::Missing { what, usage: usage.to_owned() })
        }
        Some(eq) => Ok(eq.strip_prefix('=').inspect(|_| {
            c.word();
        })),
        None => Ok(None),
    }
}

/// ` --ttl D` when set.
fn ttl_flag(ttl: &Option<Duration>) -> String {
    ttl.map(|d| format!(" --ttl {}", format_duration(d))).unwrap_or_default()
}

fn unknown(typed: &str) -> ParseError {
    ParseError::Unknown { typed: shown_plain(typed), suggestion: table::suggest(typed) }
}

fn agent(raw: &str, usage: &'static str) -> Result<AgentId, ParseError> {
    let raw = raw.strip_prefix("agent=").unwrap_or(raw);
    AgentId::parse(raw).map_err(|source| ParseError::BadAgent { source, usage })
}

/// The optional agent of `kill soft` and `kill hard`: `agent=<id>` (checked),
/// a bare word that is a valid id, or nothing; a `--` after it (or in its
/// place) is consumed so the reason can start with any word.
fn kill_agent(c: &mut Cursor<'_>, usage: &'static str) -> Result<Option<AgentId>, ParseError> {
    let found = match c.peek() {
        Some("--") => {
            c.word();
            return Ok(None);
        }
        Some(word) if word.starts_with("agent=") => Some(agent(word, usage)?),
        Some(word) => AgentId::parse(word).ok(),
        None => None,
    };
    if found.is_some() {
        c.word();
        if c.peek() == Some("--") {
            c.word();
        }
    }
    Ok(found)
}

fn count(raw: &str, max: u32, usage: &'static str) -> Result<u32, ParseError> {
    match raw.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ParseError::BadArgument {
            problem: format!("count {} is invalid; use a whole number from 1 to {max}", shown(raw)),
            usage,
        }),
    }
}

/// Digits followed by one unit letter: `30s`, `5m`, `2h` (any case).
fn is_duration_shaped(word: &str) -> bool {
    let Some(digits) = word.strip_suffix(['s', 'm', 'h', 'S', 'M', 'H']) else { return false };
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `30s`, `5m` or `2h` (1 second to 24 hours).
pub fn parse_duration(word: &str) -> Result<Duration, String> {
    if !is_duration_shaped(word) {
        return Err(format!("duration {word:?} is not like 30s, 5m or 2h"));
    }
    let (digits, unit) = word.split_at(word.len() - 1);
    let per = match unit.to_ascii_lowercase().as_str() {
        "s" => 1,
        "m" => 60,
        _ => 3600,
    };
    let secs = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(per));
    match secs {
        Some(0) => Err(format!("duration {word:?} is zero; use at least 1s")),
        Some(s) if s <= MAX_SOFT_KILL.as_secs() => Ok(Duration::from_secs(s)),
        _ => Err(format!("duration {word:?} is longer than the {} maximum", format_duration(MAX_SOFT_KILL))),
    }
}

/// Quotes user input for an error message, shortened so a hostile megabyte
/// stays a short error.
fn shown(raw: &str) -> String {
    format!("{:?}", shown_plain(raw))
}

fn shown_plain(raw: &str) -> String {
    const SHOWN: usize = 40;
    let mut out: String = raw.chars().take(SHOWN).collect();
    if out.len() < raw.len() {
        out.push_str("...");
    }
    out
}

/// Walks a command line word by word without losing the text as typed.
#[derive(Debug, Clone, Copy)]
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    /// The next whitespace-separated word.
    fn word(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start();
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let (word, rest) = s.split_at(end);
        self.rest = rest;
        (!word.is_empty()).then_some(word)
    }

    /// The next word, left in place.
    fn peek(&self) -> Option<&'a str> {
        let mut ahead = *self;
        ahead.word()
    }

    /// The rest of the line as typed, minus the one whitespace character that
    /// separates it from the word before; `None` when only whitespace is left.
    fn text(&mut self) -> Option<&'a str> {
        let rest = std::mem::take(&mut self.rest);
        if rest.trim().is_empty() {
            return None;
        }
        let mut chars = rest.chars();
        match chars.next() {
            Some(c) if c.is_whitespace() => Some(chars.as_str()),
            _ => Some(rest),
        }
    }

    /// The rest of the line, trimmed; `None` when empty.
    fn reason(&mut self) -> Option<String> {
        self.text().map(|t| t.trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    fn send(agent: &str, text: &str) -> Command {
        Command::Send { agent: id(agent), text: text.into(), priority: Priority::Normal, ttl: None }
    }

    fn soft(secs: u64, agent: Option<&str>, reason: Option<&str>) -> Command {
        Command::KillSoft { duration: Duration::from_secs(secs), agent: agent.map(id), reason: reason.map(Into::into) }
    }

    fn hard(agent: Option<&str>, reason: Option<&str>) -> Command {
        Command::KillHard { agent: agent.map(id), reason: reason.map(Into::into) }
    }

    /// Parses `line`: `Ok` must equal the command (and round-trip through its
    /// canonical form); `Err` must equal the whole error message.
    #[track_caller]
    fn check(line: &str, want: Result<Command, &str>) {
        match (parse(line), want) {
            (Ok(got), Ok(want)) => {
                assert_eq!(got, want, "{line:?}");
                let canonical = got.to_string();
                assert_eq!(parse(&canonical).as_ref(), Ok(&got), "{line:?} -> {canonical:?} does not round-trip");
            }
            (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "{line:?}"),
            (got, want) => panic!("{line:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn message_text_is_kept_as_typed() {
        check("send nova hello", Ok(send("nova", "hello")));
        check("  send   nova hello", Ok(send("nova", "hello")));
        check("SEND nova hello", Ok(send("nova", "hello")));
        check("send nova   two  spaces inside  ", Ok(send("nova", "  two  spaces inside  ")));
        check("send nova \"quoted\" 'single'", Ok(send("nova", "\"quoted\" 'single'")));
        check(
            "send nova <!channel> hi <@U123> & <https://x|x>",
            Ok(send("nova", "<!channel> hi <@U123> & <https://x|x>")),
        );
        check("send nova שלום עולם \u{202e}abc", Ok(send("nova", "שלום עולם \u{202e}abc")));
        check("send nova héllo 👋🏽 ünïcode", Ok(send("nova", "héllo 👋🏽 ünïcode")));
        check("send nova\nline one\nline two", Ok(send("nova", "line one\nline two")));
        check("send nova\tkill hard", Ok(send("nova", "kill hard")));
        check("send agent=nova hi", Ok(send("nova", "hi")));
        check(
            "send --priority high nova deploy done",
            Ok(Command::Send { agent: id("nova"), text: "deploy done".into(), priority: Priority::High, ttl: None }),
        );
        check("send nova hi --priority high", Ok(send("nova", "hi --priority high")));
        check("ask kaan what is 2+2?", Ok(Command::Ask { agent: id("kaan"), text: "what is 2+2?".into(), ttl: None }));
        check("send nova", Err("missing <text>; usage: send <agent> <text>"));
        check("send nova    ", Err("missing <text>; usage: send <agent> <text>"));
        check("send", Err("missing <agent>; usage: send <agent> <text>"));
        check(
            "send Nova hi",
            Err(
                "agent id \"Nova\" has upper case letters; use \"nova\" (an agent id is 1 to 32 characters: lowercase letters a-z, digits, '-' and '_', starting with a letter or digit); usage: send <agent> <text>",
            ),
        );
        check(
            "ask agents.* hi",
            Err(
                "agent id \"agents.*\" contains '.' (a NATS subject separator); an agent id is 1 to 32 characters: lowercase letters a-z, digits, '-' and '_', starting with a letter or digit; usage: ask <agent> <text>",
            ),
        );
    }

    #[test]
    fn broadcast_priority() {
        let b = |priority, text: &str| Command::Broadcast { priority, text: text.into(), ttl: None };
        check("broadcast maintenance in 5 minutes", Ok(b(Priority::Normal, "maintenance in 5 minutes")));
        check("broadcast --priority high back   up", Ok(b(Priority::High, "back   up")));
        check("broadcast --priority=URGENT stop", Ok(b(Priority::Urgent, "stop")));
        check("broadcast hi --priority high", Ok(b(Priority::Normal, "hi --priority high")));
        check("broadcast --prio high x", Ok(b(Priority::Normal, "--prio high x")));
        check(
            "broadcast --priority",
            Err("missing the priority after --priority; usage: broadcast [--priority low|normal|high|urgent] <text>"),
        );
        check(
            "broadcast --priority high",
            Err("missing <text>; usage: broadcast [--priority low|normal|high|urgent] <text>"),
        );
        check(
            "broadcast --priority max hi",
            Err(
                "unknown priority \"max\"; use low, normal, high or urgent; usage: broadcast [--priority low|normal|high|urgent] <text>",
            ),
        );
        check("broadcast", Err("missing <text>; usage: broadcast [--priority low|normal|high|urgent] <text>"));
    }

    #[test]
    fn message_time_to_live() {
        let ttl = |s| Some(Duration::from_secs(s));
        let send = |priority, ttl, text: &str| Command::Send { agent: id("nova"), text: text.into(), priority, ttl };
        check("send --ttl 2s nova x", Ok(send(Priority::Normal, ttl(2), "x")));
        check("send --ttl=5M nova x", Ok(send(Priority::Normal, ttl(300), "x")));
        check("send --priority high --ttl 1h nova x", Ok(send(Priority::High, ttl(3600), "x")));
        check("send --ttl 1h --priority=high nova x", Ok(send(Priority::High, ttl(3600), "x")));
        check("send nova x --ttl 2s", Ok(send(Priority::Normal, None, "x --ttl 2s")));
        check(
            "ask --ttl 30s kaan still there?",
            Ok(Command::Ask { agent: id("kaan"), text: "still there?".into(), ttl: ttl(30) }),
        );
        let b = |priority, ttl, text: &str| Command::Broadcast { priority, text: text.into(), ttl };
        check(
            "broadcast --ttl 5m maintenance in 5 minutes",
            Ok(b(Priority::Normal, ttl(300), "maintenance in 5 minutes")),
        );
        check("broadcast --ttl 5m --priority high back", Ok(b(Priority::High, ttl(300), "back")));
        // A flag given once already starts the text, as a second --priority always did.
        check("broadcast --ttl 5m --ttl 6m x", Ok(b(Priority::Normal, ttl(300), "--ttl 6m x")));
        check("broadcast --ttlx 5m", Ok(b(Priority::Normal, None, "--ttlx 5m")));
        let usage = "usage: send <agent> <text>";
        check("send --ttl", Err(&format!("missing the time to live after --ttl; {usage}")));
        check("send --ttl soon nova x", Err(&format!("--ttl: duration \"soon\" is not like 30s, 5m or 2h; {usage}")));
        check("send --ttl 0s nova x", Err(&format!("--ttl: duration \"0s\" is zero; use at least 1s; {usage}")));
        check(
            "send --ttl 25h nova x",
            Err(&format!("--ttl: duration \"25h\" is longer than the 24h maximum; {usage}")),
        );
        // The canonical form (audit records, confirmations) carries the ttl.
        assert_eq!(send(Priority::Normal, ttl(120), "x").to_string(), "send --ttl 2m nova x");
        assert_eq!(b(Priority::Normal, ttl(5), "x").to_string(), "broadcast --priority normal --ttl 5s x");
    }

    #[test]
    fn kill_switch_grammar() {
        let usage = "usage: kill soft [duration] [agent] [reason]";
        check("kill soft", Ok(soft(300, None, None)));
        check("Kill Soft 30s", Ok(soft(30, None, None)));
        check("kill soft 2h", Ok(soft(7200, None, None)));
        check("kill soft 24h", Ok(soft(86_400, None, None)));
        check("kill soft 90M nova", Ok(soft(5400, Some("nova"), None)));
        check("kill soft nova", Ok(soft(300, Some("nova"), None)));
        check("kill soft 10m nova gateway is   looping", Ok(soft(600, Some("nova"), Some("gateway is   looping"))));
        check("kill soft 10m agent=nova looping", Ok(soft(600, Some("nova"), Some("looping"))));
        check("kill soft 10m -- deploy fix", Ok(soft(600, None, Some("deploy fix"))));
        check("kill soft -- deploy", Ok(soft(300, None, Some("deploy"))));
        check("kill soft 10m nova -- nova acting up", Ok(soft(600, Some("nova"), Some("nova acting up"))));
        check("kill soft 10m Deploying fix", Ok(soft(600, None, Some("Deploying fix"))));
        check("kill soft 10m 🔥 on fire", Ok(soft(600, None, Some("🔥 on fire"))));
        check("kill soft agent=5m", Ok(soft(300, Some("5m"), None)));
        check("kill soft 0s", Err(&format!("duration \"0s\" is zero; use at least 1s; {usage}")));
        check("kill soft 25h", Err(&format!("duration \"25h\" is longer than the 24h maximum; {usage}")));
        check(
            "kill soft 99999999999999999999h",
            Err(&format!("duration \"99999999999999999999h\" is longer than the 24h maximum; {usage}")),
        );
        check("kill soft nova 5m", Err(&format!("put the duration first: kill soft 5m nova; {usage}")));
        check(
            "kill soft agent=Nova",
            Err(&format!(
                "agent id \"Nova\" has upper case letters; use \"nova\" (an agent id is 1 to 32 characters: lowercase letters a-z, digits, '-' and '_', starting with a letter or digit); {usage}"
            )),
        );

        check("kill hard", Ok(hard(None, None)));
        check("kill hard nova", Ok(hard(Some("nova"), None)));
        check("kill hard nova leaking tokens", Ok(hard(Some("nova"), Some("leaking tokens"))));
        check("kill hard -- leaking tokens", Ok(hard(None, Some("leaking tokens"))));
        check("kill hard Leak!", Ok(hard(None, Some("Leak!"))));
        check(
            "kill hard 5m",
            Err(
                "kill hard takes no duration (\"5m\"): it lasts until a director resumes, so use kill soft 5m for a timed pause; usage: kill hard [agent] [reason]",
            ),
        );
        check("kill nuclear", Ok(Command::KillNuclear { purge: false }));
        check("kill nuclear --purge", Ok(Command::KillNuclear { purge: true }));
        check("kill nuclear now", Err("unexpected \"now\" after \"kill nuclear\"; usage: kill nuclear [--purge]"));
        check(
            "kill",
            Err(
                "missing soft, hard or nuclear; usage: kill soft [duration] [agent] [reason] | kill hard [agent] [reason] | kill nuclear [--purge]",
            ),
        );
        check(
            "kill sfot",
            Err(
                "unknown command \"kill sfot\"; did you mean \"kill soft\"? usage: kill soft [duration] [agent] [reason]",
            ),
        );
    }

    #[test]
    fn small_commands() {
        check("ping", Ok(Command::Ping));
        check("status", Ok(Command::Status));
        check("agents", Ok(Command::Agents));
        check("status nova", Err("unexpected \"nova\" after \"status\"; usage: status"));
        check("resume", Ok(Command::Resume { agent: None }));
        check("resume nova", Ok(Command::Resume { agent: Some(id("nova")) }));
        check("resume agent=nova", Ok(Command::Resume { agent: Some(id("nova")) }));
        check("resume nova kaan", Err("unexpected \"kaan\" after \"resume\"; usage: resume [agent]"));
        check("confirm k7p2qx", Ok(Command::Confirm { code: "K7P2QX".into() }));
        check("confirm", Err("missing <code>; usage: confirm <code>"));
        check(
            "confirm 12",
            Err(
                "\"12\" is not a confirmation code; codes are 6 letters and digits such as K7P2QX; usage: confirm <code>",
            ),
        );
        check("dlq", Ok(Command::Dlq { agent: None, limit: DEFAULT_DLQ_LIST }));
        check("dlq nova", Ok(Command::Dlq { agent: Some(id("nova")), limit: DEFAULT_DLQ_LIST }));
        check("dlq agent=replay", Ok(Command::Dlq { agent: Some(id("replay")), limit: DEFAULT_DLQ_LIST }));
        check("dlq replay nova", Ok(Command::DlqReplay { agent: id("nova"), count: DEFAULT_REPLAY }));
        check("DLQ Replay nova 3", Ok(Command::DlqReplay { agent: id("nova"), count: 3 }));
        check("dlq replay", Err("missing <agent>; usage: dlq replay <agent> [n]"));
        check(
            "dlq replay nova 0",
            Err("count \"0\" is invalid; use a whole number from 1 to 1000; usage: dlq replay <agent> [n]"),
        );
        check("audit", Ok(Command::Audit { count: DEFAULT_AUDIT }));
        check("audit 200", Ok(Command::Audit { count: 200 }));
        check("audit 201", Err("count \"201\" is invalid; use a whole number from 1 to 200; usage: audit [n]"));
        check("audit -1", Err("count \"-1\" is invalid; use a whole number from 1 to 200; usage: audit [n]"));
        check("help", Ok(Command::Help { topic: None }));
        check("help kill", Ok(Command::Help { topic: Some("kill") }));
        check("help KILL  soft", Ok(Command::Help { topic: Some("kill soft") }));
        check("help sned", Err("unknown command \"sned\"; did you mean \"send\"? usage: send <agent> <text>"));
    }

    #[test]
    fn unknown_commands_suggest_the_nearest() {
        check("sned nova hi", Err("unknown command \"sned\"; did you mean \"send\"? usage: send <agent> <text>"));
        check(
            "kil hard",
            Err(
                "unknown command \"kil\"; did you mean \"kill\"? usage: kill soft [duration] [agent] [reason] | kill hard [agent] [reason] | kill nuclear [--purge]",
            ),
        );
        check(
            "deploy",
            Err(
                "deploy render runs only in a terminal on the host: mesh deploy render [--out dir] [--nats-sync-interval always|2m]",
            ),
        );
        check("backup /tmp/x", Err("backup runs only in a terminal on the host: mesh backup <dir>"));
        check(
            "agents add kaan",
            Err(
                "agents add runs only in a terminal on the host: mesh agents add <agent> --hooks-url <url> --hooks-token <ref> [...]",
            ),
        );
        check(
            "depoly",
            Err(
                "unknown command \"depoly\"; did you mean \"deploy\"? usage: deploy render [--out dir] [--nats-sync-interval always|2m] | deploy up [--out dir] [--compose file] [--project p] [--profile p] [--nats-sync-interval always|2m]",
            ),
        );
        check("", Err("no command given; try \"help\" for the list of commands"));
        check(" \t ", Err("no command given; try \"help\" for the list of commands"));
        let long = parse(&"x".repeat(100_000)).unwrap_err().to_string();
        assert!(long.len() < 120, "{long}");
    }

    #[test]
    fn every_table_name_parses_to_its_kind() {
        for spec in table::COMMANDS.iter() {
            if spec.front == table::Front::Terminal {
                let refused = parse(spec.name).map(|c| c.kind());
                assert_eq!(refused, Err(ParseError::TerminalOnly { name: spec.name, usage: spec.usage }));
                continue;
            }
            let line = match spec.kind {
                CommandKind::Send | CommandKind::Ask => format!("{} nova hi", spec.name),
                CommandKind::Broadcast => "broadcast hi".to_owned(),
                CommandKind::Confirm => "confirm ABCDEF".to_owned(),
                CommandKind::DlqReplay => "dlq replay nova".to_owned(),
                _ => spec.name.to_owned(),
            };
            assert_eq!(parse(&line).map(|c| c.kind()), Ok(spec.kind), "{line}");
        }
    }

    #[test]
    fn durations_format_in_the_largest_unit() {
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(DEFAULT_SOFT_KILL), "5m");
        assert!(KillGrade::Soft < KillGrade::Hard && KillGrade::Hard < KillGrade::Nuclear);
    }
}

/// Property tests: the parser never panics, message text passes through as
/// typed, and every command's canonical form parses back to the command.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn agent_id() -> impl Strategy<Value = AgentId> + Clone {
        "[a-z0-9][a-z0-9_-]{0,31}".prop_map(|s| AgentId::parse(&s).expect("the pattern is a valid id"))
    }

    /// Any text with something besides whitespace in it (unicode, quotes, `*`, `>`, `.` and newlines included).
    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,20}[^\\s]\\PC{0,20}(\n\\PC{0,10})?"
    }

    fn reason() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(
            "[^\\s]\\PC{0,30}".prop_map(|r| r.trim().to_owned()).prop_filter("non-empty", |r| !r.is_empty()),
        )
    }

    fn ttl() -> impl Strategy<Value = Option<Duration>> {
        proptest::option::of((1..=MAX_SOFT_KILL.as_secs()).prop_map(Duration::from_secs))
    }

    fn command() -> impl Strategy<Value = Command> {
        let agent = proptest::option::of(agent_id());
        let code =
            proptest::collection::vec(proptest::sample::select(confirm::CODE_ALPHABET.to_vec()), confirm::CODE_LEN)
                .prop_map(|b| String::from_utf8(b).expect("ascii"));
        let topic = proptest::sample::select(table::candidates().collect::<Vec<_>>());
        let priority = proptest::sample::select(Priority::ALL.to_vec());
        prop_oneof![
            (agent_id(), text(), priority.clone(), ttl()).prop_map(|(agent, text, priority, ttl)| Command::Send {
                agent,
                text,
                priority,
                ttl
            }),
            (agent_id(), text(), ttl()).prop_map(|(agent, text, ttl)| Command::Ask { agent, text, ttl }),
            (priority.clone(), text(), ttl()).prop_map(|(priority, text, ttl)| Command::Broadcast {
                priority,
                text,
                ttl
            }),
            Just(Command::Ping),
            Just(Command::Status),
            Just(Command::Agents),
            any::<bool>().prop_map(|purge| Command::KillNuclear { purge }),
            (1..=MAX_SOFT_KILL.as_secs(), agent.clone(), reason()).prop_map(|(s, agent, reason)| Command::KillSoft {
                duration: Duration::from_secs(s),
                agent,
                reason
            }),
            (agent.clone(), reason()).prop_map(|(agent, reason)| Command::KillHard { agent, reason }),
            agent.clone().prop_map(|agent| Command::Resume { agent }),
            agent.prop_map(|agent| Command::Dlq { agent, limit: DEFAULT_DLQ_LIST }),
            code.prop_map(|code| Command::Confirm { code }),
            (agent_id(), 1..=MAX_REPLAY).prop_map(|(agent, count)| Command::DlqReplay { agent, count }),
            (1..=MAX_AUDIT).prop_map(|count| Command::Audit { count }),
            proptest::option::of(topic).prop_map(|topic| Command::Help { topic }),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(line in "\\PC{0,80}|(send|kill soft|kill hard|broadcast|dlq replay|help) \\PC{0,40}") {
            if let Err(e) = parse(&line) {
                prop_assert!(e.to_string().len() < 2_000, "error messages stay short");
            }
        }

        #[test]
        fn canonical_form_round_trips(command in command()) {
            let line = command.to_string();
            prop_assert_eq!(parse(&line), Ok(command), "{:?}", line);
        }

        #[test]
        fn message_text_passes_through_intact(agent in agent_id(), text in text(), word in "(send|SEND|Send|ask)") {
            let parsed = parse(&format!("{word} {agent} {text}")).expect("a well-formed send parses");
            let (got_agent, got_text) = match parsed {
                Command::Send { agent, text, .. } | Command::Ask { agent, text, .. } => (agent, text),
                other => panic!("parsed as {other:?}"),
            };
            prop_assert_eq!(got_agent, agent);
            prop_assert_eq!(got_text, text);
        }

        #[test]
        fn ids_with_subject_syntax_never_parse(prefix in "[a-z]{0,4}", bad in "[.*>]|\\s|[A-Z]|[^\\x00-\\x7f]", suffix in "[a-z]{0,4}") {
            let id = format!("{prefix}{bad}{suffix}");
            let line = format!("send {id} hello");
            if let Ok(Command::Send { agent, .. }) = parse(&line) {
                // Only whitespace can split off a valid id; the id itself never carries subject syntax.
                prop_assert!(!agent.as_str().contains(['.', '*', '>']) && agent.as_str().is_ascii(), "{:?}", agent);
            }
        }
    }
}
