//! The command table: every command's name, usage line, summary, required role,
//! confirmation flag and front ends, in one place. Parse errors and the help
//! text are built from it, so they cannot drift from each other. Chat commands
//! and terminal-only commands are rows of the same table: the same permission
//! check and the same audit apply to both.

use super::permission::{Access, Role};

/// Which command a row describes: one variant per row of [`COMMANDS`], in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `send <agent> <text>`.
    Send,
    /// `broadcast [--priority P] <text>`.
    Broadcast,
    /// `ask <agent> <text>`.
    Ask,
    /// `ping`.
    Ping,
    /// `status`.
    Status,
    /// `agents`.
    Agents,
    /// `kill soft [duration] [agent] [reason]`.
    KillSoft,
    /// `kill hard [agent] [reason]`.
    KillHard,
    /// `kill nuclear`.
    KillNuclear,
    /// `resume [agent]`.
    Resume,
    /// `confirm <code>`.
    Confirm,
    /// `dlq [agent]`.
    Dlq,
    /// `dlq replay <agent> [n]`.
    DlqReplay,
    /// `audit [n]`.
    Audit,
    /// `help [command]`.
    Help,
    /// `maintenance <duration> [message]` (terminal only).
    Maintenance,
    /// `restart <agent>` (terminal only).
    Restart,
    /// `backup <dir>` (terminal only).
    Backup,
    /// `restore <dir>` (terminal only).
    Restore,
    /// `agents list` (terminal only).
    AgentsList,
    /// `agents add <agent> ...` (terminal only).
    AgentsAdd,
    /// `agents remove <agent>` (terminal only).
    AgentsRemove,
    /// `agents rotate <agent> ...` (terminal only).
    AgentsRotate,
    /// `deploy render` (terminal only).
    DeployRender,
    /// `deploy up` (terminal only).
    DeployUp,
    /// `up --demo` (terminal only).
    Up,
}

/// Which front ends may run a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Front {
    /// Slack, Discord and the terminal.
    Any,
    /// Only the `mesh` command line on the host (it names local files or
    /// starts local processes).
    Terminal,
}

impl Front {
    /// How help shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "chat, terminal",
            Self::Terminal => "terminal",
        }
    }
}

impl CommandKind {
    /// This command's row of the table.
    pub fn spec(self) -> &'static CommandSpec {
        &COMMANDS[self as usize]
    }
}

/// One row of the command table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// The command this row describes.
    pub kind: CommandKind,
    /// The words that name it, lower case (`kill soft`).
    pub name: &'static str,
    /// The usage line (`kill soft [duration] [agent] [reason]`).
    pub usage: &'static str,
    /// What it does, in one line.
    pub summary: &'static str,
    /// Extra rules that `help <command>` shows.
    pub notes: &'static [&'static str],
    /// Who may run it.
    pub access: Access,
    /// True when it only runs after `confirm <code>`.
    pub confirm: bool,
    /// Which front ends may run it.
    pub front: Front,
}

const AGENT_NOTE: &str = "an agent may be written bare (nova) or as agent=<id> (agent=nova)";
const REPLACE_NOTE: &str = "it replaces the entry in force for the same scope (the whole mesh, or the agent), so while a \
     hard or nuclear kill is in force there only a director may run it; a kill for another scope lifts nothing";
const RESUME_CONFIRM_NOTE: &str = "ending a hard or nuclear kill asks for a one-time code first (confirm <code> \
     by the same user within the confirmation window); the two-person rule applies to pulling nuclear, not to ending it";

const TTL_NOTE: &str = "--ttl 5m (before the agent and text, 1s to 24h): not delivered by then, the message becomes a \
     dead letter with reason expired";

/// Every command, in the order help lists them.
pub const COMMANDS: [CommandSpec; 26] = [
    CommandSpec {
        kind: CommandKind::Send,
        name: "send",
        usage: "send <agent> <text>",
        summary: "send a message to one agent",
        notes: &["the text is sent exactly as typed: quotes, mentions, emoji and spacing included", TTL_NOTE],
        access: Access::AtLeast(Role::Operator),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Broadcast,
        name: "broadcast",
        usage: "broadcast [--priority low|normal|high|urgent] <text>",
        summary: "send a message to every active agent",
        notes: &[
            "--priority (or --priority=P) must come first; the rest of the line is the text",
            "the priority defaults to normal; high and urgent wake agents at once",
            TTL_NOTE,
        ],
        access: Access::AtLeast(Role::Operator),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Ask,
        name: "ask",
        usage: "ask <agent> <text>",
        summary: "send a message to one agent and show its reply",
        notes: &["the text is sent exactly as typed", TTL_NOTE],
        access: Access::AtLeast(Role::Operator),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Ping,
        name: "ping",
        usage: "ping",
        summary: "health-ping every listener and show who answered",
        notes: &[],
        access: Access::AtLeast(Role::Viewer),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Status,
        name: "status",
        usage: "status",
        summary: "show NATS, the listeners and the kill switch",
        notes: &[],
        access: Access::AtLeast(Role::Viewer),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Agents,
        name: "agents",
        usage: "agents",
        summary: "list the agents in the registry",
        notes: &[],
        access: Access::AtLeast(Role::Viewer),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::KillSoft,
        name: "kill soft",
        usage: "kill soft [duration] [agent] [reason]",
        summary: "pause delivery for a while, then resume by itself",
        notes: &[
            "duration: a whole number and s, m or h (30s, 5m, 2h); default 5m, at most 24h; it comes first",
            "agent: agent=<id>, or the next word if it is a valid agent id; without an agent the whole mesh pauses",
            "reason: the rest of the line; write -- before it when its first word could be taken for an agent (kill soft 10m -- deploy fix)",
            AGENT_NOTE,
            REPLACE_NOTE,
        ],
        access: Access::ByPause { soft: Role::Admin, hard: Role::Director },
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::KillHard,
        name: "kill hard",
        usage: "kill hard [agent] [reason]",
        summary: "pause delivery until a director resumes it",
        notes: &[
            "agent: agent=<id>, or the first word if it is a valid agent id; without an agent the whole mesh pauses",
            "reason: the rest of the line; write -- before it when its first word could be taken for an agent (kill hard -- gateway leak)",
            "takes no duration: use kill soft for a timed pause",
            REPLACE_NOTE,
        ],
        access: Access::ByPause { soft: Role::Admin, hard: Role::Director },
        confirm: true,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::KillNuclear,
        name: "kill nuclear",
        usage: "kill nuclear [--purge]",
        summary: "tear the whole mesh down: containers (with --purge also volumes and networks)",
        notes: &["with the two-person rule on, a different director must confirm"],
        access: Access::AtLeast(Role::Director),
        confirm: true,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Resume,
        name: "resume",
        usage: "resume [agent]",
        summary: "end a pause, for the whole mesh or one agent",
        notes: &[AGENT_NOTE, RESUME_CONFIRM_NOTE],
        access: Access::ByPause { soft: Role::Admin, hard: Role::Director },
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Confirm,
        name: "confirm",
        usage: "confirm <code>",
        summary: "run the dangerous action a confirmation code was given for",
        notes: &["only the user who asked may confirm, except kill nuclear under the two-person rule"],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Dlq,
        name: "dlq",
        usage: "dlq [agent]",
        summary: "list dead letters, of every agent or one",
        notes: &[
            "\"dlq replay\" is always the replay command: list an agent named replay with dlq agent=replay",
            AGENT_NOTE,
        ],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::DlqReplay,
        name: "dlq replay",
        usage: "dlq replay <agent> [n]",
        summary: "redeliver an agent's oldest n dead letters (default 10, at most 1000)",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Audit,
        name: "audit",
        usage: "audit [n]",
        summary: "show the last n audit entries (default 20, at most 200)",
        notes: &[],
        access: Access::AtLeast(Role::Viewer),
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Help,
        name: "help",
        usage: "help [command]",
        summary: "list the commands, or explain one (help kill, help kill soft)",
        notes: &[],
        access: Access::Anyone,
        confirm: false,
        front: Front::Any,
    },
    CommandSpec {
        kind: CommandKind::Maintenance,
        name: "maintenance",
        usage: "maintenance <duration> [--lead 5m] [message]",
        summary: "announce, wait, pause the mesh for the duration, resume, ping, announce again",
        notes: &["the pause is a soft kill by the terminal user; each step is printed as it happens"],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::Restart,
        name: "restart",
        usage: "restart <agent>",
        summary: "restart one agent's listener container (Docker)",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::Backup,
        name: "backup",
        usage: "backup <dir>",
        summary: "back up the registry, stream messages, consumer positions and the kill switch",
        notes: &["the directory is created and must not hold anything yet"],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::Restore,
        name: "restore",
        usage: "restore <dir>",
        summary: "restore a backup into a fresh NATS server and write the registry back",
        notes: &["stop the listeners first"],
        access: Access::AtLeast(Role::Director),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::AgentsList,
        name: "agents list",
        usage: "agents list",
        summary: "list the registry file's agents with where their tokens come from",
        notes: &[],
        access: Access::AtLeast(Role::Viewer),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::AgentsAdd,
        name: "agents add",
        usage: "agents add <agent> --hooks-url <url> --hooks-token <ref> [...]",
        summary: "register an agent (tokens are env:NAME or file:/path references)",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::AgentsRemove,
        name: "agents remove",
        usage: "agents remove <agent> [--keep] [--drop-backlog]",
        summary: "remove an agent from the registry (or mark it inactive)",
        notes: &[],
        access: Access::AtLeast(Role::Director),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::AgentsRotate,
        name: "agents rotate",
        usage: "agents rotate <agent> --hooks-token <ref> | --gateway-token <ref>",
        summary: "point an agent at a new token",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::DeployRender,
        name: "deploy render",
        usage: "deploy render [--out dir] [--nats-sync-interval always|2m]",
        summary: "render nats.conf, the listener services and Prometheus targets from the registry",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::DeployUp,
        name: "deploy up",
        usage: "deploy up [--out dir] [--compose file] [--project p] [--profile p] [--nats-sync-interval always|2m]",
        summary: "render, then start the stack with docker-compose",
        notes: &[],
        access: Access::AtLeast(Role::Admin),
        confirm: false,
        front: Front::Terminal,
    },
    CommandSpec {
        kind: CommandKind::Up,
        name: "up",
        usage: "up --demo [--data-dir dir] [--nats-port port]",
        summary: "run a local demo mesh: nats-server, demo gateways, listeners",
        notes: &["checked like every command; not audited, since it creates the mesh the audit trail lives in"],
        access: Access::AtLeast(Role::Operator),
        confirm: false,
        front: Front::Terminal,
    },
];

/// The rows a help topic or usage hint covers: the command named `topic`, and
/// the commands it is the first word of (`kill` covers the three kill commands).
pub fn family(topic: &str) -> impl Iterator<Item = &'static CommandSpec> + '_ {
    COMMANDS.iter().filter(move |s| s.name == topic || s.name.strip_prefix(topic).is_some_and(|r| r.starts_with(' ')))
}

/// The usage lines of a topic's family, joined with ` | `.
pub fn usage_of(topic: &str) -> String {
    family(topic).map(|s| s.usage).collect::<Vec<_>>().join(" | ")
}

/// The canonical topic `topic` names (a command name or a first word), if any.
pub fn topic(topic: &str) -> Option<&'static str> {
    candidates().find(|c| *c == topic)
}

/// The command name or first word nearest to what was typed, if it looks like
/// a typo (at most two edits, or a prefix of at least two characters).
pub fn suggest(typed: &str) -> Option<&'static str> {
    let len = typed.chars().count();
    candidates()
        .enumerate()
        .filter_map(|(order, c)| {
            let score = if len >= 2 && c.starts_with(typed) { 1 } else { edit_distance(c, typed) };
            (score <= 2 && score < len).then_some((score, order, c))
        })
        .min()
        .map(|(_, _, c)| c)
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(row[j]).min(row[j + 1]) };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Every command name and every first word of a multi-word name, table order.
pub(crate) fn candidates() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().flat_map(|s| {
        let first = s.name.split(' ').next().filter(|f| *f != s.name);
        first.into_iter().chain(std::iter::once(s.name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_their_rows() {
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert_eq!(spec.kind as usize, i, "{} is out of order", spec.name);
            assert_eq!(spec.kind.spec().name, spec.name);
            assert!(spec.usage.starts_with(spec.name), "{} usage {:?}", spec.name, spec.usage);
            assert!(!spec.summary.ends_with('.'), "{}", spec.name);
        }
    }

    #[track_caller]
    fn check(typed: &str, want: Option<&str>) {
        assert_eq!(suggest(typed), want, "suggestion for {typed:?}");
    }

    #[test]
    fn suggests_near_names() {
        check("sned", Some("send"));
        check("snd", Some("send"));
        check("broad", Some("broadcast"));
        check("stats", Some("status"));
        check("agent", Some("agents"));
        check("kil", Some("kill"));
        check("kill sfot", Some("kill soft"));
        check("kill nuke", None);
        check("dql", Some("dlq"));
        check("hlep", Some("help"));
        check("x", None);
        check("deploy", Some("deploy"));
        check("zzzzzz", None);
        check("", None);
    }

    #[test]
    fn families_and_usage() {
        assert_eq!(usage_of("send"), "send <agent> <text>");
        assert_eq!(
            usage_of("kill"),
            "kill soft [duration] [agent] [reason] | kill hard [agent] [reason] | kill nuclear [--purge]"
        );
        assert_eq!(usage_of("dlq"), "dlq [agent] | dlq replay <agent> [n]");
        assert_eq!(usage_of("kill soft"), "kill soft [duration] [agent] [reason]");
        assert_eq!(topic("kill"), Some("kill"));
        assert_eq!(topic("dlq replay"), Some("dlq replay"));
        assert_eq!(topic("ki"), None);
        assert_eq!(
            usage_of("agents"),
            "agents | agents list | agents add <agent> --hooks-url <url> --hooks-token <ref> [...] | agents remove <agent> [--keep] [--drop-backlog] | agents rotate <agent> --hooks-token <ref> | --gateway-token <ref>"
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("nova", "nova"), 0);
        assert_eq!(edit_distance("nova", "nvoa"), 2);
        assert_eq!(edit_distance("nova", "novas"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
