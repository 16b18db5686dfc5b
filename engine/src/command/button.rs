//! The ids buttons carry and bring back when clicked. A confirmation's
//! buttons name only the pending action's one-time code (`mesh:confirm:K7P2QX`,
//! `mesh:cancel:K7P2QX`), never the command: what runs is what was parked
//! under the code. A notification's buttons name one of a few fixed commands
//! and, at most, a validated agent id (`mesh:resume:nova`); a dead letter's
//! Replay names the agent and that dead letter's sequence in the dead-letter
//! stream (`mesh:replay:nova:42`), checked against the stream when clicked.
//! Pure; every id fits Discord's 100-character `custom_id` and Slack's
//! 255-character `action_id`.

use std::fmt;

use mesh_protocol::AgentId;

use super::confirm::normalize_code;
use super::grammar::{Command, DEFAULT_DLQ_LIST};

/// What every id starts with.
pub const PREFIX: &str = "mesh:";
/// Longest id (Discord's `custom_id` limit).
pub const MAX_ID_CHARS: usize = 100;

/// What a click asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ButtonId {
    /// Run the action pending under this code.
    Confirm(String),
    /// Drop the action pending under this code.
    Cancel(String),
    /// `resume` (a kill switch notification).
    Resume(Option<AgentId>),
    /// Replay of the one dead letter of `agent` stored at `dead_letter` in
    /// the dead-letter stream (a dead-letter notification).
    Replay {
        /// Whose dead letter it is.
        agent: AgentId,
        /// Its sequence in the dead-letter stream.
        dead_letter: u64,
    },
    /// `dlq [agent]` (a dead-letter notification's Show).
    Show(Option<AgentId>),
    /// `ping` (an agent-down notification).
    Ping,
}

/// Why a clicked id is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this button is not one this bot made ({0}); run the command by typing it instead")]
pub struct ButtonError(pub String);

impl ButtonId {
    /// Reads a clicked id.
    pub fn parse(raw: &str) -> Result<Self, ButtonError> {
        let bad = |why: &str| ButtonError(why.to_owned());
        if raw.chars().count() > MAX_ID_CHARS {
            return Err(bad("too long"));
        }
        let rest = raw.strip_prefix(PREFIX).ok_or_else(|| bad("unknown prefix"))?;
        let (verb, arg) = match rest.split_once(':') {
            Some((verb, arg)) => (verb, Some(arg)),
            None => (rest, None),
        };
        let code = |arg: Option<&str>| arg.and_then(normalize_code).ok_or_else(|| bad("no confirmation code"));
        let agent = |arg: Option<&str>| -> Result<Option<AgentId>, ButtonError> {
            arg.map(|a| AgentId::parse(a).map_err(|_| bad("invalid agent id"))).transpose()
        };
        match verb {
            "confirm" => Ok(Self::Confirm(code(arg)?)),
            "cancel" => Ok(Self::Cancel(code(arg)?)),
            "resume" => Ok(Self::Resume(agent(arg)?)),
            "replay" => {
                let (id, seq) = arg.and_then(|a| a.split_once(':')).ok_or_else(|| bad("no dead letter"))?;
                let agent = agent(Some(id))?.ok_or_else(|| bad("no agent"))?;
                let dead_letter = seq.parse().ok().filter(|s| *s > 0).ok_or_else(|| bad("invalid dead letter"))?;
                Ok(Self::Replay { agent, dead_letter })
            }
            "dlq" => Ok(Self::Show(agent(arg)?)),
            "ping" if arg.is_none() => Ok(Self::Ping),
            _ => Err(bad("unknown action")),
        }
    }

    /// The command a notification button runs, or whose permission and
    /// rate limit it takes (a Replay: `dlq replay <agent> 1`, though it
    /// replays only its one dead letter); none for Confirm and Cancel, which
    /// decide a pending action.
    pub fn command(&self) -> Option<Command> {
        match self {
            Self::Confirm(_) | Self::Cancel(_) => None,
            Self::Resume(agent) => Some(Command::Resume { agent: agent.clone() }),
            Self::Replay { agent, .. } => Some(Command::DlqReplay { agent: agent.clone(), count: 1 }),
            Self::Show(agent) => Some(Command::Dlq { agent: agent.clone(), limit: DEFAULT_DLQ_LIST }),
            Self::Ping => Some(Command::Ping),
        }
    }

    /// The line the audit trail records for a click.
    pub fn audit_line(&self) -> String {
        match self {
            Self::Confirm(code) => format!("confirm {code} (button)"),
            Self::Cancel(code) => format!("cancel {code} (button)"),
            Self::Replay { agent, dead_letter } => format!("dlq replay {agent} (dead letter {dead_letter}, button)"),
            other => format!("{} (button)", other.command().map(|c| c.to_string()).unwrap_or_default()),
        }
    }
}

impl fmt::Display for ButtonId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |a: &Option<AgentId>| a.as_ref().map(|a| format!(":{a}")).unwrap_or_default();
        match self {
            Self::Confirm(code) => write!(f, "{PREFIX}confirm:{code}"),
            Self::Cancel(code) => write!(f, "{PREFIX}cancel:{code}"),
            Self::Resume(agent) => write!(f, "{PREFIX}resume{}", opt(agent)),
            Self::Replay { agent, dead_letter } => write!(f, "{PREFIX}replay:{agent}:{dead_letter}"),
            Self::Show(agent) => write!(f, "{PREFIX}dlq{}", opt(agent)),
            Self::Ping => write!(f, "{PREFIX}ping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_strangers_are_refused() {
        let nova = AgentId::parse("nova").unwrap();
        for id in [
            ButtonId::Confirm("K7P2QX".into()),
            ButtonId::Cancel("K7P2QX".into()),
            ButtonId::Resume(None),
            ButtonId::Resume(Some(nova.clone())),
            ButtonId::Replay { agent: nova.clone(), dead_letter: 42 },
            ButtonId::Show(None),
            ButtonId::Show(Some(nova.clone())),
            ButtonId::Ping,
        ] {
            let text = id.to_string();
            assert!(text.chars().count() <= MAX_ID_CHARS, "{text}");
            assert_eq!(ButtonId::parse(&text), Ok(id), "{text}");
        }
        assert_eq!(ButtonId::parse("mesh:confirm:k7p2qx"), Ok(ButtonId::Confirm("K7P2QX".into())));
        for bad in [
            "",
            "confirm:K7P2QX",
            "mesh:confirm",
            "mesh:confirm:K7P2Q0",
            "mesh:confirm:kill hard",
            "mesh:replay",
            "mesh:replay:nova",
            "mesh:replay:nova:0",
            "mesh:replay:nova:-1",
            "mesh:replay:nova:x",
            "mesh:replay:../etc",
            "mesh:ping:nova",
            "mesh:send:nova:hi",
            &format!("mesh:dlq:{}", "a".repeat(120)),
        ] {
            assert!(ButtonId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let replay = ButtonId::Replay { agent: nova.clone(), dead_letter: 42 };
        assert_eq!(replay.to_string(), "mesh:replay:nova:42");
        assert_eq!(replay.command(), Some(Command::DlqReplay { agent: nova.clone(), count: 1 }));
        assert_eq!(replay.audit_line(), "dlq replay nova (dead letter 42, button)");
        assert_eq!(ButtonId::Confirm("K7P2QX".into()).command(), None);
        assert_eq!(ButtonId::Resume(Some(nova)).audit_line(), "resume agent=nova (button)");
        assert_eq!(ButtonId::Cancel("K7P2QX".into()).audit_line(), "cancel K7P2QX (button)");
    }
}
