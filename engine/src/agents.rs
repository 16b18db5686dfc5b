//! Agent lifecycle: `mesh agents list|add|remove|rotate`. Each change is
//! planned on the in-memory [`Registry`] (pure, validated by the registry's
//! own parser), then written atomically: the current file is copied to
//! `<registry>.bak`, the new one written to a temp file in the same directory
//! and renamed over it, so a listener never reads half a registry and picks
//! the change up on its next poll.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use mesh_protocol::registry::RegistryErrors;
use mesh_protocol::secret::SecretError;
use mesh_protocol::{Agent, AgentId, Registry, RegistryError, SecretRef, SecretResolver};

/// What `mesh agents add` is given (the command core's [`NewAgent`]).
pub use crate::command::grammar::NewAgent as AddSpec;

/// Why a lifecycle command refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("agent {0:?} is already registered; use `mesh agents rotate` to change its token or remove it first")]
    Exists(String),
    #[error("unknown agent {id:?} (known: {known})")]
    Unknown { id: String, known: String },
    #[error(transparent)]
    Id(#[from] mesh_protocol::AgentIdError),
    #[error("{0}")]
    Invalid(#[from] RegistryErrors),
    #[error(
        "--prefetch applies to agents delivered in order (concurrency 1); at --concurrency {0} the window follows the concurrency: drop one of the two"
    )]
    PrefetchWithConcurrency(u16),
    #[error(
        "{field} must be a reference (env:NAME or file:/absolute/path), not the token itself: a token on the command line ends up in shell history"
    )]
    LiteralToken { field: &'static str },
    #[error("{field}: {source}; set it here too (or pass --no-check when it only resolves inside the containers)")]
    Unresolved { field: &'static str, source: SecretError },
    #[error(
        "the new {field} reference is the current one; give the new token a new env var or file so every listener switches at once"
    )]
    SameReference { field: &'static str },
    #[error("the new {field} has the same value as the current one; generate a new token")]
    SameToken { field: &'static str },
    #[error("writing the registry {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Load(#[from] mesh_runtime::registry_file::RegistryFileError),
    #[error("give --hooks-token, --gateway-token, --mesh-token or several: the token references to rotate to")]
    NothingToRotate,
    #[error("{0} is not a registry change")]
    NotAChange(&'static str),
    /// A consumer left over from an earlier agent of the same id could not be checked.
    #[error(
        "{id} not added: cannot check for a consumer left over from an earlier agent {id} ({source}); its messages \
         would reach the new agent: retry when NATS is reachable"
    )]
    LeftoverUnknown { id: AgentId, source: mesh_runtime::nats::Cause },
    /// The agent's consumer still holds messages not delivered.
    #[error(
        "{id} not removed: its consumer agent-{id} holds {held} messages not delivered yet (stream sequences after \
         {after}); let its listener deliver them, or run `mesh agents remove {id} --drop-backlog` to drop them"
    )]
    Backlog { id: AgentId, held: u64, after: u64 },
    /// What the agent's consumer holds could not be read.
    #[error(
        "{id} not removed: cannot check what its consumer still holds ({source}); retry when NATS is reachable, or \
         pass --drop-backlog"
    )]
    BacklogUnknown { id: AgentId, source: mesh_runtime::nats::Cause },
}

/// A reference given on the command line: `env:` or `file:` only.
fn reference(field: &'static str, raw: &str) -> Result<SecretRef, AgentsError> {
    match SecretRef::parse(raw) {
        Ok(SecretRef::Literal(_)) => Err(AgentsError::LiteralToken { field }),
        Ok(r) => Ok(r),
        Err(source) => Err(AgentsError::Unresolved { field, source }),
    }
}

/// Checks that a reference resolves with `resolver`.
fn check_resolves(field: &'static str, r: &SecretRef, resolver: &dyn SecretResolver) -> Result<(), AgentsError> {
    r.resolve(resolver).map(|_| ()).map_err(|source| AgentsError::Unresolved { field, source })
}

/// The registry with `spec` added. `resolver` (when given) must resolve the tokens.
pub fn plan_add(
    registry: &Registry,
    spec: &AddSpec,
    resolver: Option<&dyn SecretResolver>,
) -> Result<Registry, AgentsError> {
    let id = AgentId::parse(&spec.id)?;
    if registry.get(&id).is_some() {
        return Err(AgentsError::Exists(spec.id.clone()));
    }
    let hooks = reference("--hooks-token", &spec.hooks_token)?;
    let gateway = spec.gateway_token.as_deref().map(|r| reference("--gateway-token", r)).transpose()?;
    let mesh = spec.mesh_token.as_deref().map(|r| reference("--mesh-token", r)).transpose()?;
    let mut entry = serde_json::json!({
        "hooks_url": spec.hooks_url,
        "hooks_token": hooks.to_string(),
        "status": if spec.inactive { "inactive" } else { "active" },
    });
    let optional = [
        ("gateway", spec.gateway.clone()),
        ("gateway_token", gateway.as_ref().map(ToString::to_string)),
        ("mesh_token", mesh.as_ref().map(ToString::to_string)),
        ("delivery", spec.delivery.clone()),
        ("model", spec.model.clone()),
        ("name", spec.name.clone()),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            entry[key] = value.into();
        }
    }
    if let Some(concurrency) = spec.concurrency {
        entry["concurrency"] = concurrency.into();
    }
    if let Some(prefetch) = spec.prefetch {
        if let Some(concurrency) = spec.concurrency.filter(|c| *c > 1) {
            return Err(AgentsError::PrefetchWithConcurrency(concurrency));
        }
        entry["prefetch"] = prefetch.into();
    }
    if spec.allow_plaintext {
        entry["allow_plaintext"] = true.into();
    }
    let single = serde_json::json!({ id.as_str(): entry }).to_string();
    let parsed = Registry::parse(&single)?;
    let agent = parsed.get(&id).cloned().ok_or_else(|| AgentsError::Exists(spec.id.clone()))?;
    if let Some(resolver) = resolver {
        check_resolves("--hooks-token", &agent.hooks_token, resolver)?;
        if let Some(g) = &agent.gateway_token {
            check_resolves("--gateway-token", g, resolver)?;
        }
        if let Some(m) = &agent.mesh_token {
            check_resolves("--mesh-token", m, resolver)?;
        }
        agent.resolve_tokens(resolver)?;
        mesh_token_unique(registry, &agent, resolver)?;
    }
    let mut next = registry.clone();
    next.insert(agent);
    // The whole registry again: a mesh token reference another agent has is refused.
    Registry::parse(&next.to_json())?;
    Ok(next)
}

/// Refuses a mesh token whose value another agent's resolves to (different
/// references, one secret), naming both agents, never the token.
fn mesh_token_unique(registry: &Registry, agent: &Agent, resolver: &dyn SecretResolver) -> Result<(), AgentsError> {
    let Some(mine) = agent.mesh_token.as_ref().and_then(|m| m.resolve(resolver).ok()) else { return Ok(()) };
    for other in registry.agents().filter(|other| other.id != agent.id) {
        if other.mesh_token.as_ref().and_then(|m| m.resolve(resolver).ok()).is_some_and(|theirs| theirs == mine) {
            return Err(
                RegistryError::SharedMeshToken { first: other.id.to_string(), second: agent.id.to_string() }.into()
            );
        }
    }
    Ok(())
}

/// The registry without `id` (or with it marked inactive).
pub fn plan_remove(registry: &Registry, raw: &str, keep_inactive: bool) -> Result<Registry, AgentsError> {
    let agent = known(registry, raw)?;
    let mut next = registry.clone();
    if keep_inactive {
        let mut agent = agent.clone();
        agent.status = mesh_protocol::Status::Inactive;
        next.insert(agent);
    } else {
        next.remove(&agent.id);
    }
    Ok(next)
}

/// Which token `rotate` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    /// `hooks_token`.
    Hooks,
    /// `gateway_token`.
    Gateway,
    /// `mesh_token` (the agent's own credential; rotating it refuses the old one
    /// from the listeners' next registry poll on).
    Mesh,
}

impl TokenField {
    fn flag(self) -> &'static str {
        match self {
            Self::Hooks => "--hooks-token",
            Self::Gateway => "--gateway-token",
            Self::Mesh => "--mesh-token",
        }
    }
}

/// The registry with one of `id`'s tokens replaced by `new_ref`. The new
/// reference must differ from the current one (a listener reloads when the
/// registry changes) and, when both resolve, so must the value.
pub fn plan_rotate(
    registry: &Registry,
    raw: &str,
    field: TokenField,
    new_ref: &str,
    resolver: Option<&dyn SecretResolver>,
) -> Result<Registry, AgentsError> {
    let flag = field.flag();
    let mut agent = known(registry, raw)?.clone();
    let new = reference(flag, new_ref)?;
    let old = match field {
        TokenField::Hooks => Some(std::mem::replace(&mut agent.hooks_token, new.clone())),
        TokenField::Gateway => agent.gateway_token.replace(new.clone()),
        TokenField::Mesh => agent.mesh_token.replace(new.clone()),
    };
    if old.as_ref() == Some(&new) {
        return Err(AgentsError::SameReference { field: flag });
    }
    if let Some(resolver) = resolver {
        let value = new.resolve(resolver).map_err(|source| AgentsError::Unresolved { field: flag, source })?;
        if old.is_some_and(|old| old.resolve(resolver).is_ok_and(|v| v == value)) {
            return Err(AgentsError::SameToken { field: flag });
        }
        agent.resolve_tokens(resolver)?;
        mesh_token_unique(registry, &agent, resolver)?;
    }
    // Re-validate the whole entry through the parser.
    let mut next = registry.clone();
    next.insert(agent);
    Registry::parse(&next.to_json())?;
    Ok(next)
}

impl From<mesh_protocol::RegistryError> for AgentsError {
    fn from(e: mesh_protocol::RegistryError) -> Self {
        Self::Invalid(RegistryErrors(vec![e]))
    }
}

fn known<'a>(registry: &'a Registry, raw: &str) -> Result<&'a Agent, AgentsError> {
    let id = AgentId::parse(raw)?;
    registry.get(&id).ok_or_else(|| AgentsError::Unknown { id: raw.to_owned(), known: registry.known_ids() })
}

/// One row of `mesh agents list`: never a token, only where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentRow {
    /// Agent id.
    pub id: String,
    /// `active` or `inactive`.
    pub status: String,
    /// `wake`, `agent` or `chat`.
    pub delivery: String,
    /// The hook URL.
    pub hooks_url: String,
    /// `env:NAME`, `file:/path` or `literal(***)`.
    pub hooks_token: String,
}

/// The registry as rows.
pub fn rows(registry: &Registry) -> Vec<AgentRow> {
    let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    registry
        .agents()
        .map(|a| AgentRow {
            id: a.id.to_string(),
            status: lower(&a.status),
            delivery: lower(&a.delivery),
            hooks_url: a.hooks_url.to_string(),
            hooks_token: a.hooks_token.to_string(),
        })
        .collect()
}

/// Path of the backup kept next to the registry.
pub fn backup_path(registry: &Path) -> PathBuf {
    let mut name = registry.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "tokens.json".into());
    name.push(".bak");
    registry.with_file_name(name)
}

/// Writes `registry` to `path` atomically, keeping the previous file as
/// [`backup_path`] and its permissions and owner. Returns the backup's path (none when
/// the file is new: it is then created mode 0600, in a directory created mode 0700).
pub fn write_atomic(path: &Path, registry: &Registry) -> Result<Option<PathBuf>, AgentsError> {
    let err = |source| AgentsError::Write { path: path.to_owned(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (permissions, owner, backup) = match std::fs::metadata(path) {
        Ok(meta) => {
            let backup = backup_path(path);
            std::fs::copy(path, &backup).map_err(err)?;
            (meta.permissions(), Some((meta.uid(), meta.gid())), Some(backup))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_private_dir(dir).map_err(err)?;
            (private_file_permissions(), None, None)
        }
        Err(e) => return Err(err(e)),
    };
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    temp.write_all(registry.to_json().as_bytes()).map_err(err)?;
    temp.as_file().sync_all().map_err(err)?;
    std::fs::set_permissions(temp.path(), permissions).map_err(err)?;
    if let Some((uid, gid)) = owner {
        // The registry is read by listeners running as another user: keep its owner.
        let mine = std::fs::metadata(temp.path()).map_err(err)?;
        if (mine.uid(), mine.gid()) != (uid, gid) {
            std::os::unix::fs::chown(temp.path(), Some(uid), Some(gid)).map_err(err)?;
        }
    }
    temp.persist(path).map_err(|e| err(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(backup)
}

/// Creates `dir` (and its parents) readable by the owner only, when missing.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn private_file_permissions() -> std::fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o600)
}

/// What a registry change did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Changed {
    /// One line saying what changed and what happens next.
    pub done: String,
    /// The registry file.
    pub registry: PathBuf,
    /// The previous version, when there was one.
    pub backup: Option<PathBuf>,
}

/// The lock file next to the registry (`<registry>.lock`).
pub fn lock_path(registry: &Path) -> PathBuf {
    let mut name = registry.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    registry.with_file_name(name)
}

/// An exclusive lock on the registry for `mesh agents` changes: held from
/// reading the file to renaming the new one in, so two changes at once
/// cannot lose one another. Released when dropped.
#[derive(Debug)]
pub struct RegistryLock {
    _file: std::fs::File,
}

/// Takes the [`RegistryLock`] (waits for another change to finish).
pub fn lock(path: &Path) -> Result<RegistryLock, AgentsError> {
    let lock = lock_path(path);
    let err = |source| AgentsError::Write { path: lock.clone(), source };
    let dir = lock.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_private_dir(dir).map_err(err)?;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock).map_err(err)?;
    file.lock().map_err(err)?;
    Ok(RegistryLock { _file: file })
}

/// A registry change planned, not written yet.
#[derive(Debug, Clone)]
pub struct Planned {
    next: Registry,
    done: String,
}

/// Applies one registry change (`agents add|remove|rotate`) to the file at
/// `path`, under the [`RegistryLock`]. `agents add` creates the file when it
/// does not exist yet.
pub fn change(
    path: &Path,
    allowed: &mesh_protocol::registry::HostAllowList,
    command: &crate::command::Command,
) -> Result<Changed, AgentsError> {
    let _lock = lock(path)?;
    commit(path, plan(path, allowed, command)?)
}

/// Writes a planned change (hold the [`RegistryLock`] since [`plan`]).
pub fn commit(path: &Path, planned: Planned) -> Result<Changed, AgentsError> {
    let backup = write_atomic(path, &planned.next)?;
    Ok(Changed { done: planned.done, registry: path.to_owned(), backup })
}

/// Reads the registry at `path` and plans one change, validated, without writing it.
pub fn plan(
    path: &Path,
    allowed: &mesh_protocol::registry::HostAllowList,
    command: &crate::command::Command,
) -> Result<Planned, AgentsError> {
    use crate::command::Command;
    let registry = match mesh_runtime::registry_file::load(path, allowed) {
        Ok(registry) => registry,
        Err(mesh_runtime::registry_file::RegistryFileError::Missing { .. })
            if matches!(command, Command::AgentsAdd { .. }) =>
        {
            Registry::default()
        }
        Err(e) => return Err(e.into()),
    };
    let registry_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    let host = HostResolver { registry_dir };
    let resolver = |check: bool| check.then_some(&host as &dyn SecretResolver);
    let (next, done) = match command {
        Command::AgentsAdd { agent, check } => {
            let done = format!("added {}; `mesh deploy up` starts its listener and NATS user", agent.id);
            (plan_add(&registry, agent, resolver(*check))?, done)
        }
        Command::AgentsRemove { agent, keep, .. } => {
            let done = if *keep { format!("marked {agent} inactive") } else { format!("removed {agent}") };
            let done = format!("{done}; its listener stops pulling now, `mesh deploy up` removes its container");
            (plan_remove(&registry, agent, *keep)?, done)
        }
        Command::AgentsRotate { agent, hooks_token, gateway_token, mesh_token, check } => {
            if hooks_token.is_none() && gateway_token.is_none() && mesh_token.is_none() {
                return Err(AgentsError::NothingToRotate);
            }
            let mut next = registry.clone();
            if let Some(r) = hooks_token {
                next = plan_rotate(&next, agent, TokenField::Hooks, r, resolver(*check))?;
            }
            if let Some(r) = gateway_token {
                next = plan_rotate(&next, agent, TokenField::Gateway, r, resolver(*check))?;
            }
            if let Some(r) = mesh_token {
                next = plan_rotate(&next, agent, TokenField::Mesh, r, resolver(*check))?;
            }
            (next, format!("rotated {agent}'s token; listeners use the new one from their next registry poll"))
        }
        other => return Err(AgentsError::NotAChange(other.spec().name)),
    };
    // What every loader will refuse is not written: the new entry's hosts against MESH_HOOKS_ALLOWED_HOSTS.
    next.check_hosts(allowed)?;
    Ok(Planned { next, done })
}

/// Resolves references as the containers will: a file under the directory
/// the registry is mounted at (`/etc/mesh/...`) is read from the registry's
/// own directory on this host; everything else from the environment and disk.
#[derive(Debug, Clone)]
pub struct HostResolver {
    /// The registry's directory on this host.
    pub registry_dir: PathBuf,
}

impl SecretResolver for HostResolver {
    fn env_var(&self, name: &str) -> Option<String> {
        mesh_runtime::secrets::OsSecrets::for_registry(&self.registry_dir.join("tokens.json")).env_var(name)
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        // The listener reads token files only from its secrets directories
        // (`secrets/` beside the registry, `/run/secrets`): check the same here.
        let dirs = mesh_runtime::secrets::secrets_dirs(&self.registry_dir.join("tokens.json"));
        match path.strip_prefix(crate::deploy::CONFIG_DIR_IN_CONTAINER) {
            Ok(rest) => mesh_runtime::secrets::read_confined(&self.registry_dir.join(rest), &dirs),
            Err(_) => mesh_runtime::secrets::read_confined(path, &dirs),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mesh_protocol::secret::MapResolver;

    const REG: &str =
        r#"{"nova": {"hooks_token": "env:MESH_TOKEN_NOVA_HOOK", "hooks_url": "http://nova:7002/hooks/wake"}}"#;

    fn resolver() -> MapResolver {
        let mut r = MapResolver::default();
        for (k, v) in [
            ("MESH_TOKEN_NOVA_HOOK", "n1"),
            ("MESH_TOKEN_NOVA_HOOK_2", "n2"),
            ("MESH_TOKEN_KAAN_HOOK", "k1"),
            ("MESH_TOKEN_SAME", "n1"),
        ] {
            r.env.insert(k.into(), v.into());
        }
        r
    }

    fn spec(id: &str, token: &str) -> AddSpec {
        AddSpec {
            id: id.into(),
            hooks_url: format!("http://{id}:7002/hooks/wake"),
            hooks_token: token.into(),
            ..Default::default()
        }
    }

    #[test]
    fn add_validates_before_changing_anything() {
        let reg = Registry::parse(REG).unwrap();
        let r = resolver();
        let next = plan_add(&reg, &spec("kaan", "env:MESH_TOKEN_KAAN_HOOK"), Some(&r)).unwrap();
        assert_eq!(next.len(), 2);
        let busy = AddSpec { concurrency: Some(8), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        let next = plan_add(&reg, &busy, Some(&r)).unwrap();
        assert_eq!(next.get(&"kaan".parse().unwrap()).unwrap().concurrency, 8);
        let too_many = AddSpec { concurrency: Some(2000), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        assert!(plan_add(&reg, &too_many, Some(&r)).unwrap_err().to_string().contains("concurrency"));
        let ordered_replicas = AddSpec { prefetch: Some(1), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        let next = plan_add(&reg, &ordered_replicas, Some(&r)).unwrap();
        assert_eq!(next.get(&"kaan".parse().unwrap()).unwrap().prefetch, 1);
        let no_window = AddSpec { prefetch: Some(0), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        assert!(plan_add(&reg, &no_window, Some(&r)).unwrap_err().to_string().contains("prefetch"));
        let ignored = AddSpec { prefetch: Some(2), concurrency: Some(8), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        assert!(plan_add(&reg, &ignored, Some(&r)).unwrap_err().to_string().starts_with("--prefetch applies"));
        let cases: [(AddSpec, &str); 6] = [
            (spec("nova", "env:MESH_TOKEN_KAAN_HOOK"), "already registered"),
            (spec("Bad.Id", "env:MESH_TOKEN_KAAN_HOOK"), "an agent id is"),
            (spec("kaan", "plain-secret"), "must be a reference"),
            (spec("kaan", "env:MESH_TOKEN_MISSING"), "MISSING is not set"),
            (
                AddSpec { hooks_url: "http://k/h?token=x".into(), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") },
                "query string",
            ),
            (
                AddSpec { delivery: Some("chat".into()), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") },
                "needs gateway_token",
            ),
        ];
        for (spec, want) in cases {
            let err = plan_add(&reg, &spec, Some(&r)).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(!err.contains("plain-secret"), "{err}");
        }
        // Without a resolver, an unresolvable reference is accepted (--no-check).
        assert!(plan_add(&reg, &spec("kaan", "env:MESH_TOKEN_MISSING"), None).is_ok());
    }

    #[test]
    fn remove_deletes_or_marks_inactive() {
        let reg = Registry::parse(REG).unwrap();
        assert!(plan_remove(&reg, "nova", false).unwrap().is_empty());
        let kept = plan_remove(&reg, "nova", true).unwrap();
        assert_eq!(kept.active().count(), 0);
        assert_eq!(kept.len(), 1);
        assert!(plan_remove(&reg, "nvoa", false).unwrap_err().to_string().contains("known: nova"));
    }

    #[test]
    fn rotate_needs_a_new_reference_and_a_new_value() {
        let reg = Registry::parse(REG).unwrap();
        let r = resolver();
        let next = plan_rotate(&reg, "nova", TokenField::Hooks, "env:MESH_TOKEN_NOVA_HOOK_2", Some(&r)).unwrap();
        let nova = next.get(&"nova".parse().unwrap()).unwrap();
        assert_eq!(nova.hooks_token.to_string(), "env:MESH_TOKEN_NOVA_HOOK_2");
        let err = |to: &str| plan_rotate(&reg, "nova", TokenField::Hooks, to, Some(&r)).unwrap_err().to_string();
        assert!(err("env:MESH_TOKEN_NOVA_HOOK").contains("is the current one"));
        assert!(err("env:MESH_TOKEN_SAME").contains("same value"));
        assert!(err("n2-literal").contains("must be a reference"));
        assert!(err("env:MESH_TOKEN_NOPE").contains("NOPE is not set"));
    }

    #[test]
    fn a_mesh_token_is_added_and_rotated_like_the_others() {
        let reg = Registry::parse(REG).unwrap();
        let mut r = resolver();
        r.env.insert("MESH_TOKEN_KAAN_MESH".into(), "km1".into());
        r.env.insert("MESH_TOKEN_KAAN_MESH_2".into(), "km2".into());
        let add =
            AddSpec { mesh_token: Some("env:MESH_TOKEN_KAAN_MESH".into()), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        let next = plan_add(&reg, &add, Some(&r)).unwrap();
        let kaan = next.get(&"kaan".parse().unwrap()).unwrap();
        assert_eq!(kaan.mesh_token.as_ref().map(ToString::to_string).as_deref(), Some("env:MESH_TOKEN_KAAN_MESH"));
        // The hook's token may not double as the mesh token, by reference or by value.
        for same in ["env:MESH_TOKEN_KAAN_HOOK", "env:MESH_TOKEN_KAAN_MESH_SAME"] {
            r.env.insert("MESH_TOKEN_KAAN_MESH_SAME".into(), "k1".into());
            let add = AddSpec { mesh_token: Some(same.into()), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
            let err = plan_add(&reg, &add, Some(&r)).unwrap_err().to_string();
            assert!(err.contains("mesh_token is the same as its hooks_token"), "{same}: {err}");
        }
        let literal = AddSpec { mesh_token: Some("km-literal".into()), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        let err = plan_add(&reg, &literal, Some(&r)).unwrap_err().to_string();
        assert!(err.contains("--mesh-token must be a reference") && !err.contains("km-literal"), "{err}");
        let rotated = plan_rotate(&next, "kaan", TokenField::Mesh, "env:MESH_TOKEN_KAAN_MESH_2", Some(&r)).unwrap();
        let kaan = rotated.get(&"kaan".parse().unwrap()).unwrap();
        assert_eq!(kaan.mesh_token.as_ref().map(ToString::to_string).as_deref(), Some("env:MESH_TOKEN_KAAN_MESH_2"));
        let err =
            plan_rotate(&next, "kaan", TokenField::Mesh, "env:MESH_TOKEN_KAAN_MESH", Some(&r)).unwrap_err().to_string();
        assert!(err.contains("--mesh-token") && err.contains("is the current one"), "{err}");
    }

    #[test]
    fn a_mesh_token_is_one_agents_by_reference_and_by_value() {
        let mut r = resolver();
        for (var, value) in
            [("MESH_TOKEN_KAAN_MESH", "km1"), ("MESH_TOKEN_ZED_HOOK", "zh"), ("MESH_TOKEN_ZED_MESH", "km1")]
        {
            r.env.insert(var.into(), value.into());
        }
        let add =
            AddSpec { mesh_token: Some("env:MESH_TOKEN_KAAN_MESH".into()), ..spec("kaan", "env:MESH_TOKEN_KAAN_HOOK") };
        let reg = plan_add(&Registry::parse(REG).unwrap(), &add, Some(&r)).unwrap();
        // The same reference (checked with or without resolving), or another reference to the same value.
        let same_reference = "env:MESH_TOKEN_KAAN_MESH";
        let cases: [(&str, Option<&dyn SecretResolver>); 3] =
            [(same_reference, Some(&r)), (same_reference, None), ("env:MESH_TOKEN_ZED_MESH", Some(&r))];
        for (zed_mesh, resolver) in cases {
            let add = AddSpec { mesh_token: Some(zed_mesh.into()), ..spec("zed", "env:MESH_TOKEN_ZED_HOOK") };
            {
                let err = plan_add(&reg, &add, resolver).unwrap_err().to_string();
                assert!(
                    err.contains("have the same mesh_token") && err.contains("\"kaan\"") && err.contains("\"zed\""),
                    "{zed_mesh}: {err}"
                );
                assert!(!err.contains("km1"), "the token is never shown: {err}");
            }
        }
        let err =
            plan_rotate(&reg, "nova", TokenField::Mesh, "env:MESH_TOKEN_ZED_MESH", Some(&r)).unwrap_err().to_string();
        assert!(err.contains("\"kaan\" and \"nova\" have the same mesh_token"), "{err}");
    }

    #[test]
    fn container_paths_are_checked_in_the_registry_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/nova-2"), "n-two\n").unwrap();
        let host = HostResolver { registry_dir: dir.path().to_owned() };
        let reg = Registry::parse(REG).unwrap();
        // The reference names the container's path; the check reads the host's copy.
        let r = SecretRef::parse("file:/etc/mesh/secrets/nova-2").unwrap();
        assert_eq!(r.resolve(&host).unwrap().expose(), "n-two");
        assert!(plan_rotate(&reg, "nova", TokenField::Hooks, "file:/etc/mesh/secrets/nova-2", Some(&host)).is_ok());
        assert!(SecretRef::parse("file:/etc/mesh/secrets/none").unwrap().resolve(&host).is_err());
        // Outside the secrets directory (the registry itself, say): refused, with the reason.
        std::fs::write(dir.path().join("tokens.json"), "{}").unwrap();
        let e = SecretRef::parse("file:/etc/mesh/tokens.json").unwrap().resolve(&host).unwrap_err();
        assert!(e.to_string().contains("outside the secrets directories"), "{e}");
    }

    #[test]
    fn writes_atomically_and_keeps_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, REG).unwrap();
        let reg = Registry::parse(REG).unwrap();
        let next = plan_remove(&reg, "nova", true).unwrap();
        let backup = write_atomic(&path, &next).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), REG);
        assert_eq!(Registry::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(), next);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "only the registry and its backup: {leftovers:?}");
    }

    #[test]
    fn a_change_keeps_the_owner_and_mode_and_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, REG).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        // Owned by another user (a listener's), when this runs as root.
        let owner = if std::fs::metadata(&path).unwrap().uid() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            (65534, 65534)
        } else {
            let meta = std::fs::metadata(&path).unwrap();
            (meta.uid(), meta.gid())
        };
        let held = lock(&path).unwrap();
        let other = std::fs::File::open(lock_path(&path)).unwrap();
        assert!(other.try_lock().is_err(), "a second change waits for the first");
        drop(held);
        let command = crate::command::Command::AgentsRemove { agent: "nova".into(), keep: true, drop_backlog: false };
        change(&path, &Default::default(), &command).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (owner.0, owner.1, 0o640));
        assert!(other.try_lock().is_ok(), "the lock is released after the change");
    }
}
