//! Who may run what: the four roles, the platform identities (Slack users,
//! Discord users and Discord roles) they are granted to, and the one check
//! every front end calls before running a command.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::grammar::{Command, KillGrade};

/// A role, lowest first: each role may do everything the roles below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: ping, status, agents, audit, help.
    Viewer,
    /// Plus send, broadcast, ask.
    Operator,
    /// Plus kill soft, kill hard, resume from a soft kill, dead letters.
    Admin,
    /// Plus kill nuclear, and resume from or replace a hard or nuclear kill.
    Director,
}

impl Role {
    /// All roles, lowest first.
    pub const ALL: [Role; 4] = [Self::Viewer, Self::Operator, Self::Admin, Self::Director];

    /// The name used in config files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Director => "director",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PermissionsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| PermissionsError::UnknownRole(s.to_owned()))
    }
}

/// Who may run a command, as written in the command table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Anyone, including users with no role at all.
    Anyone,
    /// This role or a higher one.
    AtLeast(Role),
    /// `soft` while no pause or a soft pause is in force, `hard` while a hard
    /// (or nuclear) kill is: resuming, or replacing the entry in force with
    /// another kill, must not be easier than the kill was.
    ByPause {
        /// Role needed when nothing or a soft kill is in force.
        soft: Role,
        /// Role needed when a hard or nuclear kill is in force.
        hard: Role,
    },
}

impl Access {
    /// The lowest role that may run the command while `pause` is in force;
    /// `None` when anyone may.
    pub fn required(self, pause: Option<KillGrade>) -> Option<Role> {
        match self {
            Self::Anyone => None,
            Self::AtLeast(role) => Some(role),
            Self::ByPause { soft, hard } => match pause {
                None | Some(KillGrade::Soft) => Some(soft),
                Some(KillGrade::Hard | KillGrade::Nuclear) => Some(hard),
            },
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anyone => f.write_str("anyone"),
            Self::AtLeast(role) => write!(f, "{role}"),
            Self::ByPause { soft, hard } => write!(f, "{soft}; {hard} while a hard kill is in force"),
        }
    }
}

/// The person a command comes from, as the platform adapter saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A Slack user (`U0123ABCD`).
    Slack {
        /// The Slack user id.
        user: String,
    },
    /// A Discord user and the ids of the guild roles they hold.
    Discord {
        /// The Discord user id (a snowflake).
        user: String,
        /// The ids of the member's guild roles.
        roles: Vec<String>,
    },
    /// Whoever runs `mesh` in a terminal on the host.
    Terminal,
    /// An agent of the registry, authenticated by its `mesh_token` (the HTTP
    /// send API and the MCP tools).
    Agent {
        /// The agent's id.
        id: String,
    },
    /// A user of the web console, signed in with their token (`MESH_WEB_USERS`).
    Web {
        /// The user's name in the web users file.
        name: String,
    },
}

impl Identity {
    /// Names the person, not their roles: `slack:U123`, `discord:42`,
    /// `terminal`. Two identities with the same key are the same person.
    pub fn key(&self) -> String {
        match self {
            Self::Slack { user } => format!("slack:{user}"),
            Self::Discord { user, .. } => format!("discord:{user}"),
            Self::Terminal => "terminal".to_owned(),
            Self::Agent { id } => format!("agent:{id}"),
            Self::Web { name } => format!("web:{name}"),
        }
    }

    /// True when both name the same person, whatever roles they hold now.
    pub fn is_same_person(&self, other: &Identity) -> bool {
        self.key() == other.key()
    }

    fn principals(&self) -> Vec<Principal> {
        match self {
            Self::Slack { user } => vec![Principal::SlackUser(user.clone())],
            Self::Discord { user, roles } => std::iter::once(Principal::DiscordUser(user.clone()))
                .chain(roles.iter().map(|r| Principal::DiscordRole(r.clone())))
                .collect(),
            Self::Terminal => Vec::new(),
            Self::Agent { id } => vec![Principal::Agent(id.clone())],
            Self::Web { name } => vec![Principal::Web(name.clone())],
        }
    }
}

/// Something a role can be granted to, written `slack:<user id>`,
/// `discord:<user id>` or `discord-role:<role id>` in config.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    /// A Slack user id.
    SlackUser(String),
    /// A Discord user id.
    DiscordUser(String),
    /// A Discord guild role id.
    DiscordRole(String),
    /// An agent id (`agent:nova`).
    Agent(String),
    /// A web console user (`web:alice`).
    Web(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SlackUser(id) => write!(f, "slack:{id}"),
            Self::DiscordUser(id) => write!(f, "discord:{id}"),
            Self::DiscordRole(id) => write!(f, "discord-role:{id}"),
            Self::Agent(id) => write!(f, "agent:{id}"),
            Self::Web(name) => write!(f, "web:{name}"),
        }
    }
}

impl FromStr for Principal {
    type Err = PermissionsError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = |why: &'static str| PermissionsError::BadPrincipal { raw: shown(raw), why };
        let (kind, id) = raw.split_once(':').ok_or_else(|| bad(PRINCIPAL_FORMS))?;
        let slack_ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        let snowflake_ok = (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit());
        match kind {
            "slack" if slack_ok => Ok(Self::SlackUser(id.to_owned())),
            "slack" => Err(bad("a Slack user id looks like U0123ABCD (profile, ⋮, copy member id)")),
            "discord" if snowflake_ok => Ok(Self::DiscordUser(id.to_owned())),
            "discord-role" if snowflake_ok => Ok(Self::DiscordRole(id.to_owned())),
            "discord" | "discord-role" => {
                Err(bad("a Discord id is a number such as 123456789012345678 (developer mode, copy id)"))
            }
            "agent" if mesh_protocol::AgentId::parse(id).is_ok() => Ok(Self::Agent(id.to_owned())),
            "agent" => Err(bad("an agent is named by its registry id, such as agent:nova")),
            "web" if is_web_name(id) => Ok(Self::Web(id.to_owned())),
            "web" => Err(bad("a web user is named like web:alice (a-z, 0-9, - and _, at most 32)")),
            _ => Err(bad(PRINCIPAL_FORMS)),
        }
    }
}

const PRINCIPAL_FORMS: &str =
    "use slack:<user id>, discord:<user id>, discord-role:<role id>, agent:<agent id> or web:<user name>";

/// True for a valid web console user name: 1 to 32 of `a-z`, `0-9`, `-`, `_`.
pub fn is_web_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The role of agents with no grant of their own, unless the permissions file
/// says otherwise (its `"agent"` key): agents send, broadcast and ask, nothing more.
pub const DEFAULT_AGENT_ROLE: Role = Role::Operator;

/// Why a permissions config is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionsError {
    /// A grant names something that is not a known kind of identity.
    #[error("identity {raw} is invalid: {why}")]
    BadPrincipal {
        /// The identity as written, quoted and shortened.
        raw: String,
        /// What it should look like.
        why: &'static str,
    },
    /// A role name that does not exist.
    #[error("unknown role {0:?}; use viewer, operator, admin or director")]
    UnknownRole(String),
}

/// The roles granted to platform identities.
///
/// A person with several grants (a Discord user id and two of their guild
/// roles, say) gets the highest. Unknown people get `default_role`, which is
/// none unless configured, so they may only run `help`. The terminal gets
/// `terminal_role`, director unless configured: whoever has a shell on the host
/// can stop the containers anyway.
///
/// In a config file (JSON shown; any serde format works):
///
/// ```json
/// {"default": "viewer", "director": ["slack:U0DIR"], "admin": ["discord-role:98765"]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PermissionsFile")]
pub struct Permissions {
    grants: BTreeMap<Principal, Role>,
    default_role: Option<Role>,
    terminal_role: Role,
    /// Agents with no grant of their own (`None`: only `help`).
    agent_role: Option<Role>,
}

impl Default for Permissions {
    fn default() -> Self {
        Self {
            grants: BTreeMap::new(),
            default_role: None,
            terminal_role: Role::Director,
            agent_role: Some(DEFAULT_AGENT_ROLE),
        }
    }
}

impl Permissions {
    /// No grants, no default role, director in the terminal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `role` to `principal`, keeping a higher role granted before.
    pub fn grant(mut self, principal: Principal, role: Role) -> Self {
        let entry = self.grants.entry(principal).or_insert(role);
        *entry = (*entry).max(role);
        self
    }

    /// Sets the role of people with no grant (`None`: only `help`).
    pub fn with_default_role(mut self, role: Option<Role>) -> Self {
        self.default_role = role;
        self
    }

    /// Sets the role of the terminal.
    pub fn with_terminal_role(mut self, role: Role) -> Self {
        self.terminal_role = role;
        self
    }

    /// Sets the role of agents with no grant of their own (`None`: only `help`).
    pub fn with_agent_role(mut self, role: Option<Role>) -> Self {
        self.agent_role = role;
        self
    }

    /// The highest role `who` holds, if any.
    pub fn role_of(&self, who: &Identity) -> Option<Role> {
        if matches!(who, Identity::Terminal) {
            return Some(self.terminal_role);
        }
        let granted = who.principals().iter().filter_map(|p| self.grants.get(p).copied()).max();
        // An agent's own grant wins (viewer included); the default for people is not an agent's.
        match who {
            Identity::Agent { .. } => granted.or(self.agent_role),
            _ => granted.or(self.default_role),
        }
    }

    /// Checks that `who` may run `command` while `pause` is in force, and
    /// returns the role they act with (`None` for a person with no role
    /// running a command open to anyone).
    pub fn check(&self, who: &Identity, command: &Command, pause: Option<KillGrade>) -> Result<Option<Role>, Denied> {
        let have = self.role_of(who);
        let spec = command.spec();
        match spec.access.required(pause) {
            Some(needed) if have < Some(needed) => Err(Denied {
                command: spec.name,
                needed,
                have,
                who: who.key(),
                while_pause: pause.filter(|p| {
                    matches!(spec.access, Access::ByPause { .. }) && matches!(p, KillGrade::Hard | KillGrade::Nuclear)
                }),
            }),
            _ => Ok(have),
        }
    }
}

/// Config-file form of [`Permissions`]: role names as keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    #[serde(default)]
    default: Option<Role>,
    #[serde(default)]
    terminal: Option<Role>,
    /// The role of agents with no grant; `null` for none.
    #[serde(default = "default_agent_role")]
    agent: Option<Role>,
    #[serde(default)]
    viewer: Vec<String>,
    #[serde(default)]
    operator: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    director: Vec<String>,
}

impl TryFrom<PermissionsFile> for Permissions {
    type Error = PermissionsError;
    fn try_from(file: PermissionsFile) -> Result<Self, Self::Error> {
        let mut out = Permissions::new().with_default_role(file.default).with_agent_role(file.agent);
        if let Some(role) = file.terminal {
            out = out.with_terminal_role(role);
        }
        for (role, list) in [
            (Role::Viewer, file.viewer),
            (Role::Operator, file.operator),
            (Role::Admin, file.admin),
            (Role::Director, file.director),
        ] {
            for raw in list {
                out = out.grant(raw.parse()?, role);
            }
        }
        Ok(out)
    }
}

fn default_agent_role() -> Option<Role> {
    Some(DEFAULT_AGENT_ROLE)
}

/// Why a person may not run a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Denied {
    /// The command's name (`kill hard`).
    pub command: &'static str,
    /// The lowest role that may run it now.
    pub needed: Role,
    /// The role the person has, if any.
    pub have: Option<Role>,
    /// Who asked (`slack:U123`), so an admin knows what to grant.
    pub who: String,
    /// The grade of the kill in force when the command needs more because of
    /// it (hard or nuclear).
    pub while_pause: Option<KillGrade>,
}

impl Denied {
    fn message(&self) -> String {
        let when = match self.while_pause {
            Some(KillGrade::Nuclear) => " while a nuclear kill is in force",
            Some(_) => " while a hard kill is in force",
            None => "",
        };
        let have = match self.have {
            Some(role) => format!("you have {role}"),
            None => format!("you have no role, so ask a director to grant one to {}", self.who),
        };
        format!("{:?} needs the {} role{when}; {have}", self.command, self.needed)
    }
}

/// Quotes config input for an error, shortened.
fn shown(raw: &str) -> String {
    let cut: String = raw.chars().take(60).collect();
    if cut.len() < raw.len() { format!("{:?}...", cut) } else { format!("{cut:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::grammar::parse;

    fn slack(user: &str) -> Identity {
        Identity::Slack { user: user.into() }
    }

    fn discord(user: &str, roles: &[&str]) -> Identity {
        Identity::Discord { user: user.into(), roles: roles.iter().map(|r| r.to_string()).collect() }
    }

    fn perms() -> Permissions {
        serde_json::from_str(
            r#"{
                "viewer": ["slack:UVIEW"],
                "operator": ["slack:UOPS", "discord-role:100"],
                "admin": ["slack:UADM", "discord:7", "discord-role:200"],
                "director": ["slack:UDIR", "discord-role:300"]
            }"#,
        )
        .unwrap()
    }

    #[track_caller]
    fn check(who: &Identity, line: &str, pause: Option<KillGrade>, want: Result<Option<Role>, &str>) {
        let command = parse(line).unwrap();
        match (perms().check(who, &command, pause), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{line}"),
            (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "{line}"),
            (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn matrix() {
        use KillGrade::*;
        let v = Some(Role::Viewer);
        let o = Some(Role::Operator);
        let a = Some(Role::Admin);
        let d = Some(Role::Director);
        let (viewer, ops, admin, dir) = (slack("UVIEW"), slack("UOPS"), slack("UADM"), slack("UDIR"));
        let nobody = slack("UNEW");

        check(&nobody, "help", None, Ok(None));
        check(&nobody, "help kill", None, Ok(None));
        check(
            &nobody,
            "ping",
            None,
            Err("\"ping\" needs the viewer role; you have no role, so ask a director to grant one to slack:UNEW"),
        );
        for line in ["ping", "status", "agents", "audit", "audit 5", "help"] {
            check(&viewer, line, None, Ok(v));
        }
        check(&viewer, "send nova hi", None, Err("\"send\" needs the operator role; you have viewer"));
        for line in ["send nova hi", "broadcast hi", "ask nova hi", "status"] {
            check(&ops, line, None, Ok(o));
        }
        check(&ops, "kill soft", None, Err("\"kill soft\" needs the admin role; you have operator"));
        check(&ops, "dlq", None, Err("\"dlq\" needs the admin role; you have operator"));
        for line in ["kill soft", "kill hard", "dlq", "dlq nova", "dlq replay nova 3", "confirm ABCDEF"] {
            check(&admin, line, None, Ok(a));
        }
        check(&admin, "resume", None, Ok(a));
        check(&admin, "resume", Some(Soft), Ok(a));
        check(
            &admin,
            "resume nova",
            Some(Hard),
            Err("\"resume\" needs the director role while a hard kill is in force; you have admin"),
        );
        check(&admin, "kill nuclear", None, Err("\"kill nuclear\" needs the director role; you have admin"));
        check(&dir, "kill nuclear", None, Ok(d));
        check(&dir, "resume", Some(Hard), Ok(d));
        check(&dir, "resume", Some(Nuclear), Ok(d));
        check(&ops, "resume", Some(Soft), Err("\"resume\" needs the admin role; you have operator"));
        // A kill may replace the entry in force only for whoever may resume from it.
        check(&admin, "kill soft 1s", Some(Soft), Ok(a));
        check(&admin, "kill hard", Some(Soft), Ok(a));
        check(
            &admin,
            "kill soft 1s",
            Some(Hard),
            Err("\"kill soft\" needs the director role while a hard kill is in force; you have admin"),
        );
        check(
            &admin,
            "kill hard nova",
            Some(Nuclear),
            Err("\"kill hard\" needs the director role while a nuclear kill is in force; you have admin"),
        );
        check(&dir, "kill soft 1s", Some(Hard), Ok(d));
        check(&dir, "kill hard", Some(Nuclear), Ok(d));
    }

    #[test]
    fn discord_users_get_their_highest_role() {
        let p = perms();
        assert_eq!(p.role_of(&discord("1", &["100"])), Some(Role::Operator));
        assert_eq!(p.role_of(&discord("1", &["100", "300", "200"])), Some(Role::Director));
        assert_eq!(p.role_of(&discord("7", &["100"])), Some(Role::Admin));
        assert_eq!(p.role_of(&discord("8", &["999"])), None);
        // A Slack id never matches a Discord grant, and the other way round.
        assert_eq!(p.role_of(&slack("7")), None);
        let twice = Permissions::new()
            .grant(Principal::SlackUser("U1".into()), Role::Director)
            .grant(Principal::SlackUser("U1".into()), Role::Viewer);
        assert_eq!(twice.role_of(&slack("U1")), Some(Role::Director));
    }

    #[test]
    fn defaults_for_unknown_people_and_the_terminal() {
        let p = perms();
        assert_eq!(p.role_of(&slack("UNEW")), None);
        assert_eq!(p.role_of(&Identity::Terminal), Some(Role::Director));
        let p = p.with_default_role(Some(Role::Viewer)).with_terminal_role(Role::Admin);
        assert_eq!(p.role_of(&slack("UNEW")), Some(Role::Viewer));
        assert_eq!(p.role_of(&slack("UOPS")), Some(Role::Operator));
        assert_eq!(p.role_of(&Identity::Terminal), Some(Role::Admin));
        let file: Permissions = serde_json::from_str(r#"{"default": "operator", "terminal": "viewer"}"#).unwrap();
        assert_eq!(file.role_of(&discord("5", &[])), Some(Role::Operator));
        assert_eq!(file.role_of(&Identity::Terminal), Some(Role::Viewer));
    }

    #[test]
    fn config_errors_say_what_to_write() {
        let err = |json: &str| serde_json::from_str::<Permissions>(json).unwrap_err().to_string();
        assert!(err(r#"{"admin": ["alice"]}"#).contains("identity \"alice\" is invalid: use slack:<user id>"));
        assert!(err(r#"{"admin": ["slack:alice"]}"#).contains("looks like U0123ABCD"));
        assert!(err(r#"{"admin": ["discord:bob"]}"#).contains("a Discord id is a number"));
        assert!(err(r#"{"admin": ["irc:bob"]}"#).contains("discord-role:<role id>"));
        assert!(err(r#"{"root": []}"#).contains("unknown field `root`"));
        assert!(err(r#"{"default": "god"}"#).contains("unknown variant `god`"));
        assert_eq!("slack:U1".parse::<Principal>().unwrap().to_string(), "slack:U1");
        assert_eq!("discord-role:42".parse::<Principal>().unwrap(), Principal::DiscordRole("42".into()));
        assert_eq!(
            "boss".parse::<Role>().unwrap_err().to_string(),
            "unknown role \"boss\"; use viewer, operator, admin or director"
        );
    }

    #[test]
    fn agents_get_their_grant_or_the_agent_role() {
        let nova = Identity::Agent { id: "nova".into() };
        let kaan = Identity::Agent { id: "kaan".into() };
        assert_eq!(nova.key(), "agent:nova");
        // No file: agents are operators, people have no role.
        assert_eq!(Permissions::new().role_of(&nova), Some(Role::Operator));
        let file: Permissions =
            serde_json::from_str(r#"{"default": "director", "agent": "viewer", "admin": ["agent:nova"]}"#).unwrap();
        assert_eq!(file.role_of(&nova), Some(Role::Admin));
        // The default for people never reaches an agent.
        assert_eq!(file.role_of(&kaan), Some(Role::Viewer));
        let denied = file.check(&kaan, &parse("send nova hi").unwrap(), None).unwrap_err().to_string();
        assert_eq!(denied, "\"send\" needs the operator role; you have viewer");
        let none: Permissions = serde_json::from_str(r#"{"agent": null, "viewer": ["agent:kaan"]}"#).unwrap();
        assert_eq!(none.role_of(&nova), None);
        assert_eq!(none.role_of(&kaan), Some(Role::Viewer));
        // A Slack user named like an agent is not that agent.
        assert_eq!(file.role_of(&slack("NOVA")), Some(Role::Director));
        let err = serde_json::from_str::<Permissions>(r#"{"admin": ["agent:No.va"]}"#).unwrap_err().to_string();
        assert!(err.contains("agent:nova"), "{err}");
    }

    #[test]
    fn web_users_get_their_grant_or_the_default() {
        let file: Permissions =
            serde_json::from_str(r#"{"default": "viewer", "admin": ["web:alice"], "operator": ["slack:ALICE"]}"#)
                .unwrap();
        let alice = Identity::Web { name: "alice".into() };
        assert_eq!(alice.key(), "web:alice");
        assert_eq!(file.role_of(&alice), Some(Role::Admin));
        assert_eq!(file.role_of(&Identity::Web { name: "bob".into() }), Some(Role::Viewer));
        assert_eq!("web:alice".parse::<Principal>().unwrap().to_string(), "web:alice");
        for bad in ["web:", "web:Alice", "web:a b", "web:<script>"] {
            let e = bad.parse::<Principal>().unwrap_err().to_string();
            assert!(e.contains("web:alice"), "{bad}: {e}");
        }
    }

    #[test]
    fn roles_are_ordered_and_identities_compare_by_person() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin && Role::Admin < Role::Director);
        assert!(discord("1", &["100"]).is_same_person(&discord("1", &["300"])));
        assert!(!discord("1", &[]).is_same_person(&slack("1")));
        assert_eq!(
            Access::ByPause { soft: Role::Admin, hard: Role::Director }.to_string(),
            "admin; director while a hard kill is in force"
        );
    }
}
