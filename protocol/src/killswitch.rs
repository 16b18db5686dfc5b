//! The kill switch's state as stored in the JetStream key-value bucket
//! [`BUCKET`]: one entry for the whole mesh ([`GLOBAL_KEY`]) and one per
//! agent (`agent.<id>`). Which pause is in force for an agent is decided
//! here, purely, from both entries and the current time.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::agent_id::AgentId;

/// Key-value bucket holding the kill switch.
pub const BUCKET: &str = "mesh_killswitch";
/// Key of the mesh-wide entry.
pub const GLOBAL_KEY: &str = "global";
/// Key (not a scope: listeners never read it) recording the listener
/// containers a mesh-wide hard kill stopped, as a JSON array of names, so
/// `resume` starts those and no container an operator stopped on purpose.
pub const DOCKER_STOPPED_KEY: &str = "docker.stopped";
/// Default length of a soft kill.
pub const DEFAULT_SOFT: Duration = Duration::from_secs(5 * 60);

/// How hard the switch is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Not pulled.
    #[default]
    None,
    /// Paused until `until`, then resumes by itself.
    Soft,
    /// Paused until a director resumes.
    Hard,
    /// Torn down; paused until a director resumes.
    Nuclear,
}

impl Mode {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Soft => "soft",
            Self::Hard => "hard",
            Self::Nuclear => "nuclear",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which part of the mesh an entry covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every agent.
    Global,
    /// One agent.
    Agent(AgentId),
}

impl Scope {
    /// The bucket key of this scope.
    pub fn key(&self) -> String {
        match self {
            Self::Global => GLOBAL_KEY.to_owned(),
            Self::Agent(id) => format!("agent.{id}"),
        }
    }

    /// The scope of a bucket key.
    pub fn from_key(key: &str) -> Option<Self> {
        if key == GLOBAL_KEY {
            return Some(Self::Global);
        }
        key.strip_prefix("agent.").and_then(|id| AgentId::parse(id).ok()).map(Self::Agent)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("the whole mesh"),
            Self::Agent(id) => write!(f, "agent {id}"),
        }
    }
}

/// One entry of the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillState {
    /// How hard.
    pub mode: Mode,
    /// When a soft kill ends.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    /// Who pulled it.
    pub by: String,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl KillState {
    /// Encodes the entry as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a kill state always serializes")
    }

    /// Decodes an entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid kill switch entry: {e}"))
    }

    /// True while this entry pauses at `now` (a soft kill past `until` does not).
    pub fn in_force(&self, now: OffsetDateTime) -> bool {
        match self.mode {
            Mode::None => false,
            Mode::Soft => self.until.is_some_and(|until| now < until),
            Mode::Hard | Mode::Nuclear => true,
        }
    }
}

/// The pause in force for one agent, if any: the harder of the global and
/// the agent's own entry (for equal grades, the one that lasts longer).
pub fn effective<'a>(
    global: Option<&'a KillState>,
    agent: Option<&'a KillState>,
    now: OffsetDateTime,
) -> Option<&'a KillState> {
    let live = |s: Option<&'a KillState>| s.filter(|s| s.in_force(now));
    match (live(global), live(agent)) {
        (Some(g), Some(a)) => {
            if (a.mode, a.until.unwrap_or(OffsetDateTime::UNIX_EPOCH))
                > (g.mode, g.until.unwrap_or(OffsetDateTime::UNIX_EPOCH))
            {
                Some(a)
            } else {
                Some(g)
            }
        }
        (g, a) => g.or(a),
    }
}

/// The `pause_until` a hard or nuclear kill gives an agent's consumer on the
/// server: far enough ahead to mean "until resumed" (only `mesh resume`
/// lifts it), within what nats-server parses.
pub const PAUSED_UNTIL_RESUMED: OffsetDateTime = time::macros::datetime!(2999-01-01 0:00 UTC);

/// The `pause_until` an agent's consumer should have on the server while
/// `effective` (see [`effective`]) is in force: a soft pause's deadline (the
/// server lifts it by itself then), [`PAUSED_UNTIL_RESUMED`] for a hard or
/// nuclear kill, `None` (not paused) otherwise.
pub fn server_pause_until(effective: Option<&KillState>) -> Option<OffsetDateTime> {
    let state = effective?;
    match state.mode {
        Mode::None => None,
        Mode::Soft => state.until,
        Mode::Hard | Mode::Nuclear => Some(PAUSED_UNTIL_RESUMED),
    }
}

/// True when a consumer's `pause_until` means "until resumed" (a hard or nuclear kill).
pub fn until_resumed(pause_until: OffsetDateTime) -> bool {
    pause_until >= PAUSED_UNTIL_RESUMED - time::Duration::days(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(mode: Mode, until_s: Option<i64>) -> KillState {
        KillState {
            mode,
            until: until_s.map(|s| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)),
            by: "slack:U1".into(),
            reason: None,
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)
    }

    #[test]
    fn effective_pause_table() {
        let soft100 = state(Mode::Soft, Some(100));
        let soft200 = state(Mode::Soft, Some(200));
        let hard = state(Mode::Hard, None);
        let none = state(Mode::None, None);
        let mode =
            |g: Option<&KillState>, a: Option<&KillState>, now| effective(g, a, at(now)).map(|s| (s.mode, s.until));
        assert_eq!(mode(None, None, 0), None);
        assert_eq!(mode(Some(&soft100), None, 50), Some((Mode::Soft, soft100.until)));
        assert_eq!(mode(Some(&soft100), None, 100), None, "a soft kill ends at until by itself");
        assert_eq!(mode(Some(&soft100), Some(&soft200), 50), Some((Mode::Soft, soft200.until)));
        assert_eq!(mode(Some(&soft100), Some(&hard), 150), Some((Mode::Hard, None)));
        assert_eq!(mode(Some(&hard), Some(&soft200), 50), Some((Mode::Hard, None)));
        assert_eq!(mode(Some(&none), Some(&none), 50), None);
        assert_eq!(mode(None, Some(&soft100), 99), Some((Mode::Soft, soft100.until)));
    }

    #[test]
    fn server_pause_follows_the_pause_in_force() {
        let soft = state(Mode::Soft, Some(100));
        assert_eq!(server_pause_until(None), None);
        assert_eq!(server_pause_until(Some(&state(Mode::None, None))), None);
        assert_eq!(server_pause_until(Some(&soft)), soft.until, "a soft pause lifts at its deadline");
        for mode in [Mode::Hard, Mode::Nuclear] {
            let until = server_pause_until(Some(&state(mode, None))).unwrap();
            assert_eq!(until, PAUSED_UNTIL_RESUMED);
            assert!(until_resumed(until), "{mode}");
        }
        assert!(!until_resumed(at(100)));
    }

    #[test]
    fn scopes_and_entries_round_trip() {
        let nova = Scope::Agent(AgentId::parse("nova").unwrap());
        assert_eq!(Scope::from_key(&nova.key()), Some(nova));
        assert_eq!(Scope::from_key("global"), Some(Scope::Global));
        assert_eq!(Scope::from_key("agent.No"), None);
        let s = state(Mode::Soft, Some(5));
        assert_eq!(KillState::decode(&s.encode()).unwrap(), s);
    }
}
