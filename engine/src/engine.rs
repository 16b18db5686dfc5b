//! The command engine every front end shares, and the one road every command
//! takes: a typed [`Command`] (parsed from a chat line, or built from the
//! terminal's flags) -> front end check -> permission -> rate limit ->
//! confirmation -> execution -> audit record -> platform-neutral reply.
//! Slack, Discord and the terminal only render what it returns.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_protocol::killswitch::{Mode, Scope};
use mesh_protocol::layout::{ConsumerTuning, Replicas};
use mesh_protocol::registry::HostAllowList;
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, DeliveryMode, Envelope, Recipient, Registry};
use mesh_runtime::nats::Cause;
use time::OffsetDateTime;
use tracing::warn;

use crate::agents::AgentsError;
use crate::audit::{self, AuditRecord};
use crate::command::table::Front;
use crate::command::{
    ActionStyle, ButtonId, Command, ConfirmConfig, Confirmations, Decision, Identity, KillGrade, Permissions, Reply,
    parse,
};
use crate::containers::{Containers, DockerError, NoContainers};
use crate::killswitch;
use crate::mesh::{Mesh, NatsMesh};
use crate::publish;

/// Where a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// The `mesh` command line.
    Cli,
    /// Slack.
    Slack,
    /// Discord.
    Discord,
    /// An agent through a listener's `POST /v1/messages`.
    Http,
    /// An agent through the MCP tools.
    Mcp,
    /// The web console `mesh bot` serves.
    Web,
}

/// The refusal of a paused agent's own message: the kill (mode, who, since,
/// until, why) and what lifts it.
fn paused_refusal(id: &AgentId, state: &mesh_protocol::killswitch::KillState) -> String {
    let until = match (state.mode, state.until) {
        (Mode::Soft, Some(until)) => format!("until {}", killswitch::rfc3339(until)),
        _ => "until a director resumes it".to_owned(),
    };
    let reason = state.reason.as_deref().map(|r| format!(", reason: {r:?}")).unwrap_or_default();
    format!(
        "{id} is paused by a kill switch ({} kill of agent {id} by {} at {}, {until}{reason}): its messages are \
         refused while it is in force; `mesh resume {id}` lifts it",
        state.mode,
        state.by,
        killswitch::rfc3339(state.at)
    )
}

/// How many dead letters of a removed agent `agents remove` counts at most.
const DEAD_LETTERS_REPORTED: usize = 1000;

impl Platform {
    /// The name used in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Slack => "slack",
            Self::Discord => "discord",
            Self::Http => "http",
            Self::Mcp => "mcp",
            Self::Web => "web",
        }
    }
}

/// Sees each step of a long command as it happens (`maintenance`).
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct Request {
    /// Who gave it.
    pub who: Identity,
    /// Where.
    pub platform: Platform,
    /// In which channel, if any.
    pub channel: Option<String>,
    /// The command line for the audit trail: as typed in chat, or the
    /// terminal command's canonical form.
    pub line: String,
    /// The sender name messages carry (the terminal's `--from` or `cli:<user>`);
    /// `None`: the identity's key.
    pub from: Option<String>,
    /// Where the steps of a long command go, if anywhere.
    pub progress: Option<Progress>,
    /// The message a `send` answers (an agent's reply), if any.
    pub thread: Option<Box<crate::thread::Thread>>,
}

impl Request {
    /// A chat command line.
    pub fn chat(who: Identity, platform: Platform, channel: Option<String>, line: impl Into<String>) -> Self {
        Self { who, platform, channel, line: line.into(), from: None, progress: None, thread: None }
    }

    /// A command an agent gave through the HTTP API or the MCP tools: the
    /// messages it sends are always from that agent, whatever the input said.
    pub fn agent(id: &AgentId, platform: Platform, command: &Command) -> Self {
        Self {
            who: Identity::Agent { id: id.to_string() },
            platform,
            channel: None,
            line: command.to_string(),
            from: Some(id.to_string()),
            progress: None,
            thread: None,
        }
    }

    /// Marks the command's message as an answer to another one.
    pub fn with_thread(mut self, thread: crate::thread::Thread) -> Self {
        self.thread = Some(Box::new(thread));
        self
    }

    /// A command the terminal built from its flags, sent as `from`.
    pub fn terminal(command: &Command, from: impl Into<String>) -> Self {
        Self {
            who: Identity::Terminal,
            platform: Platform::Cli,
            channel: None,
            line: command.to_string(),
            from: Some(from.into()),
            progress: None,
            thread: None,
        }
    }

    /// The sender name of the messages it publishes.
    fn sender(&self) -> String {
        self.from.clone().unwrap_or_else(|| self.who.key())
    }
}

/// A reply that arrives later (an agent's answer to `ask`).
pub type FollowUp = Pin<Box<dyn Future<Output = Reply> + Send + 'static>>;

/// What a command produced.
pub struct Handled {
    /// The answer to show now.
    pub reply: Reply,
    /// An answer to show when it arrives (`ask`).
    pub follow_up: Option<FollowUp>,
    /// The code a dangerous command waits for (`confirm <code>`).
    pub confirmation_code: Option<String>,
    /// True when the command failed or found a fault (the terminal exits non-zero):
    /// an error reply, or a ping or maintenance with active agents missing.
    pub failed: bool,
    /// Why the audit record could not be stored, if it could not.
    pub audit_error: Option<String>,
    /// The audit trail's decision: `allowed`, `denied`, `paused` (an agent's
    /// own message while a kill for it is in force), `limited`, `invalid`,
    /// `confirmation required` (an HTTP front end maps it to a status).
    pub decision: &'static str,
}

impl Handled {
    fn reply(reply: Reply) -> Self {
        let failed = reply.tone == crate::command::Tone::Error;
        Self { reply, follow_up: None, confirmation_code: None, failed, audit_error: None, decision: "allowed" }
    }

    fn refused(decision: &'static str, reply: Reply, audit_error: Option<String>) -> Self {
        Self { audit_error, decision, ..Self::reply(reply) }
    }
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handled")
            .field("reply", &self.reply)
            .field("follow_up", &self.follow_up.is_some())
            .field("failed", &self.failed)
            .finish()
    }
}

/// What a click on a button did.
#[derive(Debug)]
pub struct Clicked {
    /// What the clicked message becomes (buttons removed): who confirmed or
    /// cancelled and when, with the result, or that it expired. `None`: the
    /// message stays as it is (a refusal, or a notification button).
    pub update: Option<Reply>,
    /// What to show besides: a refusal (ephemeral, to the clicker only), or
    /// a notification button's result.
    pub answer: Option<Reply>,
    /// The audit trail's decision: `allowed`, `cancelled`, `denied`, `limited`, `invalid`.
    pub decision: &'static str,
    /// Why the audit record could not be stored, if it could not.
    pub audit_error: Option<String>,
}

impl Clicked {
    fn answer(decision: &'static str, reply: Reply, audit_error: Option<String>) -> Self {
        Self { update: None, answer: Some(reply), decision, audit_error }
    }
}

/// The answer to a command that needs confirmation: the typed code, and
/// Confirm and Cancel buttons carrying only that code. Shown to the channel,
/// so that under the two-person rule another director can click.
fn confirmation_prompt(challenge: &crate::command::Challenge, window: time::Duration) -> Reply {
    let who = match challenge.confirmer {
        crate::command::Confirmer::SameUser => "only the person who asked may decide",
        crate::command::Confirmer::OtherDirector => "another director must confirm; the person who asked may cancel",
    };
    Reply::warn(challenge.instruction(window))
        .with_lines(
            None,
            [format!(
                "or click Confirm or Cancel below ({who}); expires at {}",
                killswitch::rfc3339(challenge.expires_at)
            )],
        )
        .with_action("Confirm", ButtonId::Confirm(challenge.code.clone()).to_string(), ActionStyle::Danger)
        .with_action("Cancel", ButtonId::Cancel(challenge.code.clone()).to_string(), ActionStyle::Plain)
}

/// What a confirmation prompt becomes once its window passed undecided.
fn expired_update(command: &str) -> Reply {
    Reply::warn(format!("{command:?} expired unconfirmed: nothing was run; run {command:?} again for a new code"))
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The registry file, read for every command (so edits apply at once).
    pub registry_path: PathBuf,
    /// Who may do what.
    pub permissions: Permissions,
    /// Confirmation window and two-person rule.
    pub confirm: ConfirmConfig,
    /// How long `ask` waits for the agent's reply.
    pub ask_timeout: Duration,
    /// How long `ping` and `status` wait for pongs.
    pub ping_timeout: Duration,
    /// Stream replicas (`MESH_REPLICAS`, read once at start).
    pub replicas: Replicas,
    /// The hosts the registry's URLs may point at (`MESH_HOOKS_ALLOWED_HOSTS`,
    /// read once at start; empty allows any).
    pub allowed_hosts: HostAllowList,
    /// The time to live of a broadcast sent without `--ttl` (`MESH_BROADCAST_TTL`); `None`: never expires.
    pub broadcast_ttl: Option<Duration>,
}

impl EngineConfig {
    /// The defaults for a registry and permissions: confirmation window of
    /// [`crate::command::confirm::CONFIRM_WINDOW`] without the two-person rule,
    /// `ask` waits 120 s, pings 2 s, auto replicas, any host.
    pub fn new(registry_path: PathBuf, permissions: Permissions) -> Self {
        Self {
            registry_path,
            permissions,
            confirm: ConfirmConfig { window: crate::command::confirm::CONFIRM_WINDOW, two_person_nuclear: false },
            ask_timeout: Duration::from_secs(120),
            ping_timeout: Duration::from_secs(2),
            replicas: Replicas::Auto,
            allowed_hosts: HostAllowList::default(),
            broadcast_ttl: None,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
}

/// Why a command failed. The reply shows its `Display`: one line that says
/// what to do; each variant keeps its cause (`source`).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The mesh cannot be reached (why, in words); only commands on local files run.
    #[error("{0}")]
    Offline(String),
    #[error(transparent)]
    Registry(#[from] mesh_runtime::registry_file::RegistryFileError),
    #[error(transparent)]
    Send(#[from] publish::SendError),
    #[error(transparent)]
    Envelope(#[from] mesh_protocol::envelope::EnvelopeError),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Agents(#[from] crate::agents::AgentsError),
    #[error(transparent)]
    Deploy(#[from] crate::deploy::DeployError),
    #[error(transparent)]
    Thread(#[from] crate::thread::ThreadError),
    /// `ask` of an agent that does not reply.
    #[error("ask needs an agent with \"delivery\": \"chat\"; {agent} answers nobody back (use send)")]
    NotChat {
        /// The agent asked.
        agent: AgentId,
    },
    /// `confirm` reached execution without a pending action.
    #[error("nothing to confirm")]
    NothingToConfirm,
    /// `mesh up` is only admitted by the engine; the terminal runs it.
    #[error("mesh up runs in the terminal itself; it is only admitted here")]
    UpNotHere,
}

/// The clock the engine reads (confirmation windows, audit times).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The engine.
pub struct Engine {
    config: EngineConfig,
    /// The mesh, or why it cannot be reached (commands that edit local files
    /// still run; their audit record is then reported as not stored).
    mesh: Result<Arc<dyn Mesh>, String>,
    containers: Arc<dyn Containers>,
    confirmations: Mutex<Confirmations>,
    /// Codes shared with the other bot replicas (none without NATS, or in tests).
    shared_confirmations: Option<crate::confirm_store::SharedConfirmations>,
    /// Requests already handled by any replica (none without NATS, or in tests).
    fleet_dedup: Option<crate::fleet_dedup::FleetDedup>,
    limits: crate::limits::LimitStore,
    clock: Clock,
    /// Permissions that change while the engine runs (a listener re-reads its
    /// file); `None`: `config.permissions`, fixed.
    live_permissions: Option<LivePermissions>,
}

/// Permissions kept current by whoever reads the file: the last valid ones,
/// or why the file is unusable now (then every command is refused with that
/// reason: fail closed, never a fallback to the defaults).
pub type LivePermissions = tokio::sync::watch::Receiver<Result<Arc<Permissions>, String>>;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("mesh", &self.mesh)
            .field("containers", &self.containers)
            .finish_non_exhaustive()
    }
}

/// What running a command did, for the reply and the audit trail.
struct Executed {
    reply: Reply,
    message_ids: Vec<String>,
    follow_up: Option<FollowUp>,
    /// A fault that is no error (active agents missing from a ping).
    failed: bool,
}

impl Executed {
    fn reply(reply: Reply) -> Self {
        Self { reply, message_ids: Vec::new(), follow_up: None, failed: false }
    }

    fn with_ids(reply: Reply, message_ids: Vec<String>) -> Self {
        Self { reply, message_ids, follow_up: None, failed: false }
    }
}

impl Engine {
    /// Connects the engine to the mesh (for one process: the terminal, a
    /// listener's agent API). The bot adds [`Engine::shared_with_replicas`].
    pub async fn new(
        config: EngineConfig,
        client: async_nats::Client,
        limits: crate::limits::LimitStore,
    ) -> Result<Self, EngineError> {
        let mesh = NatsMesh::open(client, config.replicas).await?;
        Ok(Self::with_mesh(config, Ok(Arc::new(mesh)), limits))
    }

    /// Shares confirmation codes and request dedup with the other bot
    /// replicas (the buckets `mesh_confirm` and `mesh_dedup`, created when
    /// missing); without them (NATS trouble) both stay in this process.
    pub async fn shared_with_replicas(mut self, client: async_nats::Client) -> Self {
        let window =
            std::time::Duration::try_from(self.config.confirm.window).unwrap_or(std::time::Duration::from_secs(60));
        let js = async_nats::jetstream::new(client);
        self.shared_confirmations = crate::confirm_store::SharedConfirmations::open(&js, window, self.config.replicas)
            .await
            .inspect_err(|e| warn!(error = %e, "confirmation codes stay on this replica"))
            .ok();
        self.fleet_dedup =
            crate::fleet_dedup::FleetDedup::open(&js, self.limits.config().dedup_ttl, self.config.replicas)
                .await
                .inspect_err(|e| warn!(error = %e, "request dedup stays on this replica (and Redis when set)"))
                .ok();
        self
    }

    /// An engine on any [`Mesh`] (a fake in tests), or with none: `Err`
    /// says why, and then only commands that edit local files run (checked as
    /// usual; no audit record can be stored). Containers: none until
    /// [`Engine::with_containers`].
    pub fn with_mesh(
        config: EngineConfig,
        mesh: Result<Arc<dyn Mesh>, String>,
        limits: crate::limits::LimitStore,
    ) -> Self {
        let confirmations = Mutex::new(Confirmations::new(config.confirm));
        let clock: Clock = Arc::new(OffsetDateTime::now_utc);
        let containers = Arc::new(NoContainers);
        Self {
            config,
            mesh,
            containers,
            confirmations,
            shared_confirmations: None,
            fleet_dedup: None,
            limits,
            clock,
            live_permissions: None,
        }
    }

    /// Takes each command's permissions from `live` instead of the config's
    /// (a listener that follows its permissions file).
    pub fn with_live_permissions(mut self, live: LivePermissions) -> Self {
        self.live_permissions = Some(live);
        self
    }

    /// An engine with no mesh (NATS cannot be reached, or does not exist yet).
    pub fn offline(config: EngineConfig, reason: String, limits: crate::limits::LimitStore) -> Self {
        Self::with_mesh(config, Err(reason), limits)
    }

    /// Sets the containers the engine stops, starts, restarts and lists.
    pub fn with_containers(mut self, containers: Arc<dyn Containers>) -> Self {
        self.containers = containers;
        self
    }

    /// Sets the clock (tests move it to expire confirmation codes).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Rate limits and retry dedup.
    pub fn limits(&self) -> &crate::limits::LimitStore {
        &self.limits
    }

    /// True the first time any bot replica sees `key` (a platform's id of a
    /// request) within the dedup TTL: this process's memory, then Redis when
    /// set, then the NATS dedup bucket, so a request handed to every replica
    /// runs once with or without Redis.
    pub async fn first_in_fleet(&self, key: &str) -> bool {
        if !self.limits.seen_once(key).await {
            return false;
        }
        match &self.fleet_dedup {
            Some(dedup) => dedup.first(key).await,
            None => true,
        }
    }

    fn mesh(&self) -> Result<&dyn Mesh, CommandError> {
        self.mesh.as_deref().map_err(|reason| CommandError::Offline(reason.clone()))
    }

    /// The kill switch entries in force, read through the engine's mesh:
    /// its bucket, opened once when the engine started (the web console's
    /// banner reads it every few seconds).
    pub async fn kill_in_force(&self) -> Result<Vec<(Scope, mesh_protocol::killswitch::KillState)>, CommandError> {
        Ok(self.mesh()?.kill_in_force().await?)
    }

    /// Runs one chat command line: parses it, then takes the one road.
    pub async fn handle(&self, request: Request) -> Handled {
        match parse(&request.line) {
            Ok(command) => self.handle_command(request, command).await,
            Err(e) => {
                let reply = Reply::error(e.to_string()).ephemeral();
                let audit_error = self.audit(&request, "invalid", &reply, &[]).await;
                Handled::refused("invalid", reply, audit_error)
            }
        }
    }

    /// The checks before execution: front end, permission, rate limit. A
    /// refusal is audited and returned as the reply to show; otherwise the role
    /// the person acts with. `mesh up` takes only this part (it creates the mesh).
    pub async fn admit(&self, request: &Request, command: &Command) -> Result<Option<crate::command::Role>, Handled> {
        let spec = command.spec();
        if spec.front == Front::Terminal && request.platform != Platform::Cli {
            let reply = Reply::error(format!("{} runs only in a terminal on the host: mesh {}", spec.name, spec.usage))
                .ephemeral();
            let audit_error = self.audit(request, "denied", &reply, &[]).await;
            return Err(Handled::refused("denied", reply, audit_error));
        }
        let pause = self.pause_grade(command).await;
        let live = self.live_permissions.as_ref().map(|live| live.borrow().clone());
        let checked = match &live {
            Some(Err(unusable)) => Err(unusable.clone()),
            Some(Ok(permissions)) => permissions.check(&request.who, command, pause).map_err(|d| d.to_string()),
            None => self.config.permissions.check(&request.who, command, pause).map_err(|d| d.to_string()),
        };
        let role = match checked {
            Ok(role) => role,
            Err(denied) => {
                let reply = Reply::error(denied).ephemeral();
                let audit_error = self.audit(request, "denied", &reply, &[]).await;
                return Err(Handled::refused("denied", reply, audit_error));
            }
        };
        if let Some(reply) = self.own_pause(request, command).await {
            let audit_error = self.audit(request, "paused", &reply, &[]).await;
            return Err(Handled::refused("paused", reply, audit_error));
        }
        if let crate::limits::Decision::Limited { message } = self.limits.check(&request.who.key(), command).await {
            let reply = Reply::error(message).ephemeral();
            let audit_error = self.audit(request, "limited", &reply, &[]).await;
            return Err(Handled::refused("limited", reply, audit_error));
        }
        Ok(role)
    }

    /// Runs one typed command: the chat's parsed line, or what the terminal
    /// built from its flags.
    pub async fn handle_command(&self, request: Request, command: Command) -> Handled {
        let now = (self.clock)();
        let role = match self.admit(&request, &command).await {
            Ok(role) => role,
            Err(refused) => return refused,
        };
        if command.needs_confirmation() || self.resume_from_a_kill(&command).await {
            let parked = command.clone();
            let challenge = self.lock_confirmations().request(&request.who, command, now, os_random_u64());
            if let Some(shared) = &self.shared_confirmations {
                let action = crate::command::PendingAction {
                    command: parked,
                    requested_by: request.who.clone(),
                    requested_at: now,
                    expires_at: challenge.expires_at,
                };
                shared.share(&challenge.code, &action).await;
            }
            let reply = confirmation_prompt(&challenge, self.config.confirm.window);
            let audit_error = self.audit(&request, "confirmation required", &reply, &[]).await;
            return Handled {
                confirmation_code: Some(challenge.code),
                ..Handled::refused("confirmation required", reply, audit_error)
            };
        }
        let command = match command {
            Command::Confirm { code } => match self.take(&request.who, role, &code, now, Decision::Confirm).await {
                Ok(action) => match self.kill_changed_since(&action).await {
                    None => action.command,
                    Some(why) => {
                        let reply = Reply::error(why).ephemeral();
                        let audit_error = self.audit(&request, "denied", &reply, &[]).await;
                        return Handled::refused("denied", reply, audit_error);
                    }
                },
                Err(e) => {
                    let reply = Reply::error(e.to_string()).ephemeral();
                    let audit_error = self.audit(&request, "denied", &reply, &[]).await;
                    return Handled::refused("denied", reply, audit_error);
                }
            },
            other => other,
        };
        // A command that can take the audit trail down with it (a nuclear
        // kill removes NATS, with --purge its data) is recorded before it runs.
        let before = match &command {
            Command::KillNuclear { .. } => {
                let starting = Reply::warn(format!("starting: {}", command_line(&command)));
                self.audit(&request, "allowed", &starting, &[]).await
            }
            _ => None,
        };
        let executed = match self.execute(&request, role, command).await {
            Ok(executed) => executed,
            Err(e) => Executed::reply(Reply::error(e.to_string())),
        };
        let audit_error = self.audit(&request, "allowed", &executed.reply, &executed.message_ids).await.or(before);
        let failed = executed.failed || executed.reply.tone == crate::command::Tone::Error;
        Handled {
            reply: executed.reply,
            follow_up: executed.follow_up,
            confirmation_code: None,
            failed,
            audit_error,
            decision: "allowed",
        }
    }

    /// Handles a click on one of the engine's buttons, by `request.who` on
    /// `request.platform`, the way the typed command would be: the same
    /// permission, rate limit, confirmation rules and audit record. A
    /// Confirm or Cancel decides the action pending under the button's code
    /// (Cancel takes the permission of `confirm`); a notification button runs
    /// its fixed command. `request.line` is replaced by the click's audit line.
    pub async fn click(&self, mut request: Request, button: &str) -> Clicked {
        let button = match ButtonId::parse(button) {
            Ok(button) => button,
            Err(e) => {
                request.line = format!("{} (button)", button.chars().take(100).collect::<String>());
                let reply = Reply::from_error(&e);
                let audit_error = self.audit(&request, "invalid", &reply, &[]).await;
                return Clicked::answer("invalid", reply, audit_error);
            }
        };
        request.line = button.audit_line();
        let (code, decision) = match &button {
            ButtonId::Confirm(code) => (code.clone(), Decision::Confirm),
            ButtonId::Cancel(code) => (code.clone(), Decision::Cancel),
            ButtonId::Replay { agent, dead_letter } => {
                let command = button.command().expect("a replay button takes the permission of dlq replay");
                if let Err(refused) = self.admit(&request, &command).await {
                    return Clicked::answer(refused.decision, refused.reply, refused.audit_error);
                }
                let executed = match self.replay_one(agent, *dead_letter).await {
                    Ok(executed) => executed,
                    Err(e) => Executed::reply(Reply::error(e.to_string())),
                };
                let audit_error = self.audit(&request, "allowed", &executed.reply, &executed.message_ids).await;
                return Clicked::answer("allowed", executed.reply, audit_error);
            }
            other => {
                let command = other.command().expect("notification buttons name a command");
                let handled = self.handle_command(request, command).await;
                return Clicked {
                    update: None,
                    decision: handled.decision,
                    audit_error: handled.audit_error,
                    answer: Some(handled.reply),
                };
            }
        };
        let now = (self.clock)();
        let role = match self.admit(&request, &Command::Confirm { code: code.clone() }).await {
            Ok(role) => role,
            Err(refused) => return Clicked::answer(refused.decision, refused.reply, refused.audit_error),
        };
        let action = match self.take(&request.who, role, &code, now, decision).await {
            Ok(action) => action,
            Err(e) => {
                let reply = Reply::from_error(&e);
                let audit_error = self.audit(&request, "denied", &reply, &[]).await;
                let update = match &e {
                    crate::command::ConfirmError::Expired { command, .. } => Some(expired_update(command)),
                    _ => None,
                };
                return Clicked { update, ..Clicked::answer("denied", reply, audit_error) };
            }
        };
        let at = killswitch::rfc3339(now);
        let name = action.command.spec().name;
        if decision == Decision::Cancel {
            let reply = Reply::info(format!("{name:?} cancelled by {} at {at}: nothing was run", request.who.key()));
            let audit_error = self.audit(&request, "cancelled", &reply, &[]).await;
            return Clicked { update: Some(reply), answer: None, decision: "cancelled", audit_error };
        }
        if let Some(why) = self.kill_changed_since(&action).await {
            let reply = Reply::error(why).ephemeral();
            let audit_error = self.audit(&request, "denied", &reply, &[]).await;
            let spent = Reply::warn(format!("{name:?} not run: the kill switch changed since it was asked for"));
            return Clicked { update: Some(spent), ..Clicked::answer("denied", reply, audit_error) };
        }
        let executed = match self.execute(&request, role, action.command).await {
            Ok(executed) => executed,
            Err(e) => Executed::reply(Reply::error(e.to_string())),
        };
        let audit_error = self.audit(&request, "allowed", &executed.reply, &executed.message_ids).await;
        let mut update = executed.reply;
        update.ephemeral = false;
        update.actions.clear();
        update.sections.insert(
            0,
            crate::command::Section::Text {
                heading: None,
                lines: vec![format!(
                    "{name:?} confirmed by {} at {at} (asked by {})",
                    request.who.key(),
                    action.requested_by.key()
                )],
            },
        );
        Clicked { update: Some(update), answer: None, decision: "allowed", audit_error }
    }

    /// How long a confirmation code stays open.
    pub fn confirm_window(&self) -> Duration {
        Duration::try_from(self.config.confirm.window).unwrap_or(Duration::ZERO)
    }

    /// What the prompt of `code` becomes once its window has passed without
    /// a decision ("expired", no buttons), for the front end that posted the
    /// prompt to edit it in place; `None` when it was confirmed or cancelled
    /// (here, or on another replica: the shared code is gone), or is still open.
    pub async fn expire(&self, code: &str) -> Option<Reply> {
        let now = (self.clock)();
        let command = self.lock_confirmations().lapse(code, now)?;
        if let (Some(shared), Some(code)) = (&self.shared_confirmations, crate::command::confirm::normalize_code(code))
            && shared.wrote(&code)
        {
            match shared.fetch(&code).await {
                // Still shared: this replica ends it for the fleet, unless another replica takes it first.
                Ok(Some((_, revision))) => {
                    if !shared.take(&code, revision).await {
                        return None;
                    }
                }
                // Taken by another replica: decided (or already said to be expired) there.
                Ok(None) => return None,
                Err(e) => warn!(error = %e, "shared confirmation codes unreadable; expiring this replica's code"),
            }
        }
        Some(expired_update(command))
    }

    /// Replays the one dead letter a Replay button (a notification's, or a
    /// console row's) names, if it is stored and `agent`'s; an error, and
    /// nothing done, if not (replayed already, removed, or a forged sequence).
    async fn replay_one(&self, agent: &AgentId, dead_letter: u64) -> Result<Executed, CommandError> {
        let registry = self.registry()?;
        let report = self.mesh()?.replay_one(&registry, agent, dead_letter).await?;
        if report.is_empty() {
            return Ok(Executed::reply(
                Reply::error(format!(
                    "dead letter {dead_letter} of {agent} is no longer stored (replayed already, removed, or never \
                     {agent}'s): nothing was replayed; list the dead letters again (dlq {agent})"
                ))
                .with_data(&report),
            ));
        }
        if report.replayed.is_empty() && report.already_removed.is_empty() {
            // Skipped (does not decode) or failed: kept, and said so as an error.
            let reply = Reply::error(format!("dead letter {dead_letter} of {agent} was not replayed (it is kept)"));
            return Ok(Executed::reply(reply.with_lines(None, report.lines()).with_data(&report)));
        }
        Ok(replayed(agent, &report))
    }

    /// Takes a pending action (the lock is released before anything awaits):
    /// one this replica issued, or one another replica shared; a shared one
    /// runs on the replica whose delete from the bucket lands, nowhere else.
    /// Without the bucket (NATS trouble) a code works on its own replica only.
    async fn take(
        &self,
        who: &Identity,
        role: Option<crate::command::Role>,
        code: &str,
        now: OffsetDateTime,
        decision: Decision,
    ) -> Result<crate::command::PendingAction, crate::command::ConfirmError> {
        let (Some(shared), Some(code)) = (&self.shared_confirmations, crate::command::confirm::normalize_code(code))
        else {
            return self.lock_confirmations().decide(who, role, code, now, decision);
        };
        let found = shared.fetch(&code).await;
        match &found {
            Ok(Some((action, _))) => self.lock_confirmations().adopt(&code, action.clone()),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "shared confirmation codes unreadable; this replica's codes only"),
        }
        let decided = self.lock_confirmations().decide(who, role, &code, now, decision);
        let action = match decided {
            Ok(action) => action,
            Err(e) => {
                // An expired code is gone for every replica, not only here.
                if let (crate::command::ConfirmError::Expired { .. }, Ok(Some((_, revision)))) = (&e, &found) {
                    shared.take(&code, *revision).await;
                }
                return Err(e);
            }
        };
        let taken_here = match found {
            Ok(Some((_, revision))) => shared.take(&code, revision).await,
            // Shared by this replica and gone from the bucket: another replica ran it.
            Ok(None) => !shared.wrote(&code),
            Err(_) => true,
        };
        if taken_here { Ok(action) } else { Err(crate::command::ConfirmError::Unknown(code)) }
    }

    fn lock_confirmations(&self) -> std::sync::MutexGuard<'_, Confirmations> {
        self.confirmations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The grade of the pause a `resume` would lift (its permission depends on it).
    async fn pause_grade(&self, command: &Command) -> Option<KillGrade> {
        let agent = match command {
            Command::Resume { agent } | Command::KillSoft { agent, .. } | Command::KillHard { agent, .. } => agent,
            _ => return None,
        };
        let scope = scope_of(agent);
        match self.mesh().ok()?.kill_get(&scope).await {
            Ok(Some(state)) if state.in_force((self.clock)()) => killswitch::grade(state.mode),
            _ => None,
        }
    }

    /// True for a `resume` that would end a hard or nuclear kill: it asks for
    /// a confirmation code first (a soft pause ends by itself anyway). An
    /// entry that cannot be read counts as a hard kill (fail closed, as the
    /// listeners do).
    async fn resume_from_a_kill(&self, command: &Command) -> bool {
        let Command::Resume { agent } = command else { return false };
        let scope = scope_of(agent);
        let Ok(mesh) = self.mesh() else { return true };
        match mesh.kill_get(&scope).await {
            Ok(Some(state)) => {
                state.in_force((self.clock)())
                    && matches!(killswitch::grade(state.mode), Some(KillGrade::Hard | KillGrade::Nuclear))
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// For a confirmed `resume`: why it must not run when the kill it would
    /// lift was pulled after the resume was asked for (the confirmation was
    /// given for another kill), or when the kill switch cannot be read;
    /// `None` otherwise.
    async fn kill_changed_since(&self, action: &crate::command::PendingAction) -> Option<String> {
        let Command::Resume { agent } = &action.command else { return None };
        let scope = scope_of(agent);
        match self.mesh().ok()?.kill_get(&scope).await {
            Ok(Some(state)) if state.at > action.requested_at => Some(format!(
                "not resumed: the kill switch changed since the resume was asked for ({}); run resume again to \
                 lift the kill in force now",
                killswitch::describe(&scope, &state)
            )),
            Ok(_) => None,
            // Fail closed, as the unconfirmed resume does: it may be another kill.
            Err(e) => Some(format!(
                "not resumed: the kill switch cannot be read ({e}), so whether it changed since the resume was                  asked for is unknown; nothing was changed: run resume again once NATS answers"
            )),
        }
    }

    /// Why an agent's own message is refused: a kill switch entry for the
    /// agent's own scope is in force (operators paused it; its sends would
    /// reach agents that are not paused). `None` for people, for commands
    /// that send nothing, and under a mesh-wide pause only (those sends are
    /// queued as for anyone). A kill switch that cannot be read refuses too:
    /// an agent that may be paused does not get through on a read error.
    async fn own_pause(&self, request: &Request, command: &Command) -> Option<Reply> {
        let Identity::Agent { id } = &request.who else { return None };
        if !matches!(command, Command::Send { .. } | Command::Broadcast { .. } | Command::Ask { .. }) {
            return None;
        }
        let id = AgentId::parse(id).ok()?;
        // No mesh: the command fails on its own, saying so.
        let mesh = self.mesh().ok()?;
        let state = match mesh.kill_get(&Scope::Agent(id.clone())).await {
            Ok(Some(state)) if state.in_force((self.clock)()) => state,
            Ok(_) => return None,
            Err(e) => {
                return Some(
                    Reply::error(format!(
                        "the kill switch could not be read ({e}): {id}'s messages are refused until it can be; try \
                         again in a moment"
                    ))
                    .ephemeral(),
                );
            }
        };
        Some(Reply::error(paused_refusal(&id, &state)).ephemeral())
    }

    /// Appends the audit record; returns why it was not stored, if it was not.
    async fn audit(&self, request: &Request, decision: &str, reply: &Reply, message_ids: &[String]) -> Option<String> {
        let record = AuditRecord {
            at: (self.clock)(),
            who: request.who.key(),
            platform: request.platform.as_str().to_owned(),
            channel: request.channel.clone(),
            line: audit::clip(&request.line),
            decision: decision.to_owned(),
            outcome: reply.title.clone(),
            message_ids: message_ids.to_vec(),
        };
        let stored = match &self.mesh {
            Ok(mesh) => mesh.audit(&record).await.map_err(|e| e.to_string()),
            Err(reason) => Err(reason.clone()),
        };
        stored.err().inspect(|e| warn!(error = %e, who = %record.who, "audit record not stored"))
    }

    fn registry(&self) -> Result<Registry, CommandError> {
        Ok(mesh_runtime::registry_file::load(&self.config.registry_path, &self.config.allowed_hosts)?)
    }

    async fn execute(
        &self,
        request: &Request,
        role: Option<crate::command::Role>,
        command: Command,
    ) -> Result<Executed, CommandError> {
        // Messages carry the sender name; the kill switch records who pulled it, and the role decides
        // which entry in force they may replace.
        let (from, by) = (request.sender(), request.who.key());
        let actor = killswitch::Actor::new(&by, role);
        match command {
            Command::Send { agent, text, priority, ttl } => {
                let registry = self.registry()?;
                let mut prepared = publish::prepare_send(&registry, &from, agent.as_str(), &text, priority)
                    .and_then(|p| p.with_ttl(ttl))?;
                if let Some(thread) = &request.thread {
                    thread.stamp(&mut prepared.envelope)?;
                }
                let receipt = self.mesh()?.deliver(&prepared).await?;
                let queued = self.queued_note(Some(&agent), prepared.envelope.expires_at).await;
                let mut reply = Reply::ok(format!("sent to {agent}"))
                    .with_lines(None, [format!("message id {} (stream seq {})", receipt.id, receipt.stream_seq)])
                    .with_data(receipt_data(&receipt, agent.as_str(), queued.as_deref()));
                if let Some(note) = queued {
                    reply = reply.with_lines(None, [note]);
                }
                Ok(Executed::with_ids(reply, vec![receipt.id.to_string()]))
            }
            Command::Broadcast { priority, text, ttl } => {
                let registry = self.registry()?;
                let mut prepared = publish::prepare_broadcast(&registry, &from, &text, priority)
                    .and_then(|p| p.with_ttl(ttl.or(self.config.broadcast_ttl)))?;
                if let Some(thread) = &request.thread {
                    thread.stamp(&mut prepared.envelope)?;
                }
                let receipt = self.mesh()?.deliver(&prepared).await?;
                let queued = self.queued_note(None, prepared.envelope.expires_at).await;
                let mut reply = Reply::ok(format!("broadcast to {} active agents", receipt.recipients))
                    .with_lines(None, [format!("message id {} (stream seq {})", receipt.id, receipt.stream_seq)])
                    .with_data(receipt_data(&receipt, "*", queued.as_deref()));
                if let Some(note) = queued {
                    reply = reply.with_lines(None, [note]);
                }
                Ok(Executed::with_ids(reply, vec![receipt.id.to_string()]))
            }
            Command::Ask { agent, text, ttl } => self.ask(&from, &agent, &text, ttl).await,
            Command::Ping => {
                let registry = self.registry()?;
                let report = self.mesh()?.ping(&registry, self.config.ping_timeout).await?;
                let rows = report
                    .rows
                    .iter()
                    .map(|r| {
                        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
                        vec![r.agent.clone(), r.state.to_owned(), opt(r.rtt_ms), opt(r.pending)]
                    })
                    .collect();
                let answered = report.rows.iter().filter(|r| r.rtt_ms.is_some()).count();
                let title = format!("{answered} answered, {} active agents missing", report.missing);
                let reply = if report.missing == 0 { Reply::ok(title) } else { Reply::warn(title) };
                let failed = report.missing > 0;
                let reply = reply.with_table(None, ["agent", "state", "rtt ms", "pending"], rows).with_data(&report);
                Ok(Executed { failed, ..Executed::reply(reply) })
            }
            Command::Status => self.status().await,
            Command::Agents => {
                let registry = self.registry()?;
                let rows = registry
                    .agents()
                    .map(|a| {
                        let mode = match a.delivery {
                            DeliveryMode::Wake => "wake",
                            DeliveryMode::Agent => "agent",
                            DeliveryMode::Chat => "chat",
                        };
                        let status = if a.is_active() { "active" } else { "inactive" };
                        vec![
                            a.id.to_string(),
                            status.to_owned(),
                            mode.to_owned(),
                            a.hooks_url.host_str().unwrap_or("").to_owned(),
                        ]
                    })
                    .collect();
                Ok(Executed::reply(Reply::info(format!("{} agents", registry.len())).with_table(
                    None,
                    ["agent", "status", "delivery", "gateway host"],
                    rows,
                )))
            }
            Command::KillSoft { duration, agent, reason } => {
                let scope = self.scope(agent)?;
                let (state, server) = self.mesh()?.kill_pull(&scope, Mode::Soft, Some(duration), actor, reason).await?;
                let reply = Reply::warn(format!("kill switch: {}", killswitch::describe(&scope, &state)));
                Ok(Executed::reply(with_server_warning(reply, server)))
            }
            Command::KillHard { agent, reason } => {
                let scope = self.scope(agent)?;
                let (state, server) = self.mesh()?.kill_pull(&scope, Mode::Hard, None, actor, reason).await?;
                let reply = Reply::warn(format!("kill switch: {}", killswitch::describe(&scope, &state)));
                let reply = with_server_warning(reply, server);
                let docker = match scope {
                    Scope::Global => self.stop_listener_containers().await,
                    Scope::Agent(_) => {
                        vec![
                            "docker: containers left running (a per-agent pause is enforced by the listeners)"
                                .to_owned(),
                        ]
                    }
                };
                Ok(Executed::reply(reply.with_lines(None, docker)))
            }
            Command::KillNuclear { purge } => {
                let (state, server) = self.mesh()?.kill_pull(&Scope::Global, Mode::Nuclear, None, actor, None).await?;
                let reply = Reply::warn(format!("kill switch: {}", killswitch::describe(&Scope::Global, &state)));
                let reply = with_server_warning(reply, server);
                let lines = match self.containers.nuclear(purge).await {
                    Ok(report) => {
                        let mut lines = vec![
                            format!("stopped: {}", list_or_none(&report.stopped)),
                            format!("removed: {}", list_or_none(&report.removed)),
                            format!("kept (this bot): {}", list_or_none(&report.kept)),
                            format!("failed: {}", list_or_none(&report.failed)),
                        ];
                        if purge {
                            lines.push(format!("purged volumes: {}", list_or_none(&report.volumes)));
                            lines.push(format!("purged networks: {}", list_or_none(&report.networks)));
                        }
                        lines
                    }
                    Err(e) => vec![e.to_string()],
                };
                Ok(Executed::reply(reply.with_lines(Some("docker"), lines)))
            }
            Command::Resume { agent } => {
                let scope = self.scope(agent)?;
                let mesh = self.mesh()?;
                let server = mesh.kill_release(&scope, actor).await?;
                let mut reply = match server {
                    None => Reply::ok(format!("resumed {scope}")),
                    // Written, but the server may still hold the messages.
                    Some(_) => {
                        Reply::warn(format!("resumed {scope} in the kill switch; the server may still pause it"))
                    }
                };
                reply = with_server_warning(reply, server);
                if scope == Scope::Global {
                    reply = reply.with_lines(None, [self.start_stopped_containers(mesh).await]);
                }
                if let Ok(others) = mesh.kill_in_force().await
                    && !others.is_empty()
                {
                    reply = reply
                        .with_lines(Some("still in force"), others.iter().map(|(s, st)| killswitch::describe(s, st)));
                }
                Ok(Executed::reply(reply))
            }
            Command::Confirm { .. } => Err(CommandError::NothingToConfirm),
            Command::Dlq { agent, limit } => {
                if let Some(agent) = &agent {
                    publish::resolve_any(&self.registry()?, agent.as_str())?;
                }
                let entries = self.mesh()?.dead_letters(agent.as_ref(), limit as usize).await?;
                if entries.is_empty() {
                    return Ok(Executed::reply(Reply::ok("no dead letters").with_data(&entries)));
                }
                let rows = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.dlq_seq.to_string(),
                            killswitch::rfc3339(e.at),
                            e.agent.clone(),
                            e.attempts.to_string(),
                            e.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                            e.reason.clone(),
                            e.text.clone().unwrap_or_else(|| "<undecodable>".into()),
                        ]
                    })
                    .collect();
                Ok(Executed::reply(
                    Reply::warn(format!("{} dead letters", entries.len()))
                        .with_table(None, ["#", "at", "agent", "attempts", "http", "reason", "text"], rows)
                        .with_data(&entries),
                ))
            }
            Command::DlqReplay { agent, count } => {
                let registry = self.registry()?;
                let report = self.mesh()?.replay(&registry, &agent, count as usize).await?;
                if report.is_empty() {
                    return Ok(Executed::reply(Reply::ok(format!("no dead letters for {agent}")).with_data(&report)));
                }
                Ok(replayed(&agent, &report))
            }
            Command::Audit { count } => {
                let records = self.mesh()?.audit_newest(count as usize).await?;
                let rows = records
                    .iter()
                    .map(|r| {
                        vec![
                            killswitch::rfc3339(r.at),
                            r.who.clone(),
                            r.line.clone(),
                            r.decision.clone(),
                            r.outcome.clone(),
                        ]
                    })
                    .collect();
                Ok(Executed::reply(
                    Reply::info(format!("last {} commands", records.len()))
                        .with_table(None, ["at", "who", "command", "decision", "outcome"], rows)
                        .with_data(&records),
                ))
            }
            Command::Help { topic } => Ok(Executed::reply(crate::command::help::help(topic))),
            Command::Maintenance { duration, lead, message } => {
                let registry = self.registry()?;
                let window = crate::maintenance::Window { duration, lead, message, by: from, role };
                let progress = request.progress.clone();
                let report = self
                    .mesh()?
                    .maintenance(
                        &registry,
                        &window,
                        Box::new(move |step: &str| {
                            if let Some(Progress(p)) = &progress {
                                p(step);
                            }
                        }),
                    )
                    .await?;
                let title = report.steps.last().cloned().unwrap_or_else(|| "maintenance done".to_owned());
                let reply = if report.missing == 0 { Reply::ok(title) } else { Reply::warn(title) };
                let failed = report.missing > 0;
                let ids = report.message_ids.clone();
                Ok(Executed { failed, ..Executed::with_ids(reply.with_data(&report), ids) })
            }
            Command::Restart { agent } => {
                publish::resolve_any(&self.registry()?, agent.as_str())?;
                let name = self.containers.restart_listener(agent.as_str()).await?;
                Ok(Executed::reply(Reply::ok(format!("restarted {name}"))))
            }
            Command::Backup { dir } => {
                let manifest = self.mesh()?.backup(&self.config.registry_path, &dir).await?;
                let title = format!(
                    "backup in {}: messages {:?}, {} agent consumers, {} kill switch entries, registry {}",
                    dir.display(),
                    manifest.streams,
                    manifest.consumers.len(),
                    manifest.killswitch,
                    if manifest.registry { "included" } else { "not found" }
                );
                Ok(Executed::reply(Reply::ok(title).with_data(&manifest)))
            }
            Command::Restore { dir } => {
                let report = self.mesh()?.restore(&self.config.registry_path, &dir).await?;
                let title = format!(
                    "restored messages {:?}; pending per agent {:?}; {} kill switch entries; registry {}",
                    report.streams,
                    report.consumers,
                    report.killswitch,
                    report.registry.as_ref().map_or("not in the backup".into(), |p| p.display().to_string())
                );
                Ok(Executed::reply(Reply::ok(title).with_data(&report)))
            }
            Command::AgentsList => {
                let path = &self.config.registry_path;
                let registry = mesh_runtime::registry_file::load(path, &self.config.allowed_hosts)?;
                let rows = crate::agents::rows(&registry);
                let table = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.status.clone(),
                            r.delivery.clone(),
                            r.hooks_url.clone(),
                            r.hooks_token.clone(),
                        ]
                    })
                    .collect();
                let title = if rows.is_empty() {
                    format!("no agents in {}", path.display())
                } else {
                    format!("{} agents in {}", rows.len(), path.display())
                };
                Ok(Executed::reply(
                    Reply::info(title)
                        .with_table(None, ["agent", "status", "delivery", "hooks url", "token"], table)
                        .with_data(&rows),
                ))
            }
            command @ (Command::AgentsAdd { .. } | Command::AgentsRemove { .. } | Command::AgentsRotate { .. }) => {
                let path = &self.config.registry_path;
                // Held from reading the registry to renaming the new one in.
                let _lock = crate::agents::lock(path)?;
                let planned = crate::agents::plan(path, &self.config.allowed_hosts, &command)?;
                let mut lines = Vec::new();
                let mut create = None;
                match &command {
                    // A new registration starts afresh: a consumer left over from an
                    // earlier agent of the same id (its backlog, old broadcasts) goes
                    // first, before the registry lets anyone send to the new agent.
                    Command::AgentsAdd { agent, .. } => {
                        let id = AgentId::parse(&agent.id).map_err(AgentsError::from)?;
                        let retired = match self.mesh() {
                            Ok(mesh) => mesh.retire(std::slice::from_ref(&id), true).await.map_err(Cause::from),
                            Err(e) => Err(Cause::from(e)),
                        };
                        lines.push(retired.map_err(|source| AgentsError::LeftoverUnknown { id: id.clone(), source })?);
                        create = (!agent.inactive).then_some(id);
                    }
                    // Nothing not delivered is dropped unless asked for.
                    Command::AgentsRemove { agent, drop_backlog: false, .. } => {
                        let id = AgentId::parse(agent).map_err(AgentsError::from)?;
                        let backlog = match self.mesh() {
                            Ok(mesh) => mesh.backlog(&id).await.map_err(Cause::from),
                            Err(e) => Err(Cause::from(e)),
                        };
                        match backlog {
                            Ok(Some((held, after))) if held > 0 => {
                                return Err(AgentsError::Backlog { id, held, after }.into());
                            }
                            Ok(_) => {}
                            Err(source) => return Err(AgentsError::BacklogUnknown { id, source }.into()),
                        }
                    }
                    _ => {}
                }
                let changed = crate::agents::commit(path, planned)?;
                drop(_lock);
                let kept = match &changed.backup {
                    Some(backup) => format!("previous version kept as {}", backup.display()),
                    None => "a new file".to_owned(),
                };
                let title = format!("{} in {} ({kept})", changed.done, changed.registry.display());
                let mut reply = Reply::ok(title).with_data(&changed);
                if !lines.is_empty() {
                    reply = reply.with_lines(None, lines);
                }
                // The consumer of a removed or inactive agent goes (with its
                // backlog only when --drop-backlog said so).
                if let Command::AgentsRemove { agent, drop_backlog, .. } = &command {
                    let id = AgentId::parse(agent).map_err(AgentsError::from)?;
                    let retired = match self.mesh() {
                        Ok(mesh) => {
                            mesh.retire(std::slice::from_ref(&id), *drop_backlog).await.map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let line = match retired {
                        Ok(done) => done,
                        Err(e) => format!(
                            "warning: consumer agent-{id} not deleted ({e}); the bot (`mesh bot`) deletes it when it \
                             sees the change, once it holds nothing not delivered"
                        ),
                    };
                    reply = reply.with_lines(None, [line]);
                    // Its dead letters stay (30 days): say so, a re-used id could replay them.
                    if let Ok(mesh) = self.mesh()
                        && let Ok(left) = mesh.dead_letters(Some(&id), DEAD_LETTERS_REPORTED).await
                        && !left.is_empty()
                    {
                        let n = if left.len() >= DEAD_LETTERS_REPORTED {
                            format!("{}+", left.len())
                        } else {
                            left.len().to_string()
                        };
                        reply = reply.with_lines(None, [format!(
                            "warning: {n} dead letters of {id} stay in the dead-letter stream (30 days); `mesh dlq {id}` \
                             lists them, and `mesh dlq replay {id}` would deliver them to any agent registered as {id} later"
                        )]);
                    }
                }
                if let Some(id) = create {
                    // Its consumer exists from now on, so nothing sent before its listener runs is lost.
                    let tuning = self.registry()?.get(&id).map(|a| a.consumer_tuning()).unwrap_or_default();
                    let line = match self.provision(&[(id.clone(), tuning)]).await {
                        Ok(done) => done,
                        Err(e) => format!(
                            "warning: consumer agent-{id} not created yet ({e}); the bot (`mesh bot`) creates it \
                             when it runs, and the listener waits for it until then"
                        ),
                    };
                    reply = reply.with_lines(None, [line]);
                }
                Ok(Executed::reply(reply))
            }
            Command::DeployRender { out, sync } => {
                let report =
                    crate::deploy::render_into(&self.config.registry_path, &self.config.allowed_hosts, &out, &sync)?;
                Ok(Executed::reply(render_reply(
                    format!("rendered {} listener services into {}", report.listeners, out.display()),
                    &report,
                )))
            }
            Command::DeployUp(up) => {
                let report = crate::deploy::up(&self.config.registry_path, &self.config.allowed_hosts, &up).await?;
                let title = format!(
                    "mesh up as compose project {:?}: {} listeners; `mesh status` lists the containers",
                    up.project, report.listeners
                );
                let agents: Vec<_> = self.registry()?.active().map(|a| (a.id.clone(), a.consumer_tuning())).collect();
                let line = match self.provision(&agents).await {
                    Ok(done) => done,
                    Err(e) => format!("the bot container creates the agents' consumers when it starts ({e})"),
                };
                Ok(Executed::reply(render_reply(title, &report).with_lines(None, [line])))
            }
            Command::Up { .. } => Err(CommandError::UpNotHere),
        }
    }

    /// Creates the streams, the bucket and these agents' consumers, when the mesh is reachable.
    async fn provision(&self, agents: &[(AgentId, ConsumerTuning)]) -> Result<String, CommandError> {
        Ok(self.mesh()?.provision(agents).await?)
    }

    fn scope(&self, agent: Option<AgentId>) -> Result<Scope, CommandError> {
        match agent {
            None => Ok(Scope::Global),
            Some(id) => {
                let registry = self.registry()?;
                publish::resolve_any(&registry, id.as_str())?;
                Ok(Scope::Agent(id))
            }
        }
    }

    /// "queued until ..." when a pause holds messages for `agent` (or everyone).
    async fn queued_note(&self, agent: Option<&AgentId>, expires_at: Option<time::OffsetDateTime>) -> Option<String> {
        let state = self.mesh().ok()?.kill_effective(agent).await.ok()??;
        let until = match (state.mode, state.until) {
            (Mode::Soft, Some(until)) => format!("until {}", killswitch::rfc3339(until)),
            _ => "until a director resumes".to_owned(),
        };
        // A time to live that ends before the pause can: it expires undelivered.
        if let Some(at) = expires_at
            && state.until.is_none_or(|until| until > at)
        {
            return Some(format!(
                "the mesh is paused ({}, {until}): the message is queued, but its time to live ends at {} and it \
                 expires undelivered unless the pause ends before (then `mesh dlq` lists it as expired)",
                state.mode,
                killswitch::rfc3339(at)
            ));
        }
        Some(format!(
            "the mesh is paused ({}): the message is queued and delivered when the pause ends, {until}",
            state.mode
        ))
    }

    async fn ask(
        &self,
        from: &str,
        agent: &AgentId,
        text: &str,
        ttl: Option<Duration>,
    ) -> Result<Executed, CommandError> {
        let registry = self.registry()?;
        let target = publish::resolve_target(&registry, agent.as_str())?;
        if target.delivery != DeliveryMode::Chat {
            return Err(CommandError::NotChat { agent: agent.clone() });
        }
        let reply_subject = Subject::new_reply_for(from);
        let mut envelope = Envelope::new(from, Recipient::Agent(agent.clone()), text)?.with_reply_to(&reply_subject);
        if let Some(ttl) = ttl {
            envelope = envelope.with_ttl(ttl)?;
        }
        let tuning = target.consumer_tuning();
        let answer = self.mesh()?.ask(&envelope, &reply_subject, tuning).await?;
        let timeout = self.config.ask_timeout;
        let queued = self.queued_note(Some(agent), envelope.expires_at).await;
        let asked = agent.clone();
        let follow_up: FollowUp = Box::pin(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(answer)) => {
                    Reply::info(format!("{asked} replied")).with_lines(None, answer.text.lines().map(str::to_owned))
                }
                Ok(Err(e)) => Reply::error(format!("{asked} sent a reply that is not a message: {e}")),
                Err(_) => {
                    let reply = Reply::warn(format!("{asked} did not reply within {}s", timeout.as_secs()));
                    // A question with a time to live may have expired undelivered: say where to look.
                    match ttl {
                        Some(ttl) => reply.with_lines(
                            None,
                            [format!(
                                "the question had a time to live of {}s: if it expired before reaching {asked}, \
                             `mesh dlq {asked}` lists it as expired",
                                ttl.as_secs()
                            )],
                        ),
                        None => reply,
                    }
                }
            }
        });
        let mut reply = Reply::ok(format!("asked {agent}; the reply will follow"))
            .with_lines(None, [format!("message id {}", envelope.id)]);
        if let Some(note) = queued {
            reply = reply.with_lines(None, [note]);
        }
        Ok(Executed { follow_up: Some(follow_up), ..Executed::with_ids(reply, vec![envelope.id.to_string()]) })
    }

    async fn status(&self) -> Result<Executed, CommandError> {
        let registry = self.registry()?;
        let mesh = match self.mesh() {
            Ok(mesh) => mesh,
            Err(e) => return Ok(self.status_offline(&registry, &e.to_string()).await),
        };
        let mut reply = Reply::info("mesh status");
        let kills = mesh.kill_in_force().await?;
        let kill_lines: Vec<String> = if kills.is_empty() {
            vec!["not pulled".to_owned()]
        } else {
            kills.iter().map(|(scope, state)| killswitch::describe(scope, state)).collect()
        };
        if !kills.is_empty() {
            reply.tone = crate::command::Tone::Warn;
        }
        reply = reply.with_lines(Some("kill switch"), kill_lines);
        let pause_lines = match mesh.server_pauses().await {
            Ok(crate::mesh::ServerPauses::TooOld(warning)) => {
                reply.tone = crate::command::Tone::Warn;
                vec![warning]
            }
            Ok(crate::mesh::ServerPauses::Consumers(rows)) if rows.is_empty() => vec!["no agent consumers".to_owned()],
            Ok(crate::mesh::ServerPauses::Consumers(rows)) => {
                let mismatches = killswitch::pause_mismatches(&kills, &rows, (self.clock)());
                if !mismatches.is_empty() {
                    reply.tone = crate::command::Tone::Warn;
                }
                rows.iter().map(|r| r.describe()).chain(mismatches).collect()
            }
            Err(e) => vec![format!("cannot read the consumers' pause: {e}")],
        };
        reply = reply.with_lines(Some("server-side pause"), pause_lines);
        let report = mesh.ping(&registry, self.config.ping_timeout).await?;
        let answered = report.rows.iter().filter(|r| r.rtt_ms.is_some()).count();
        let active = registry.active().count();
        let dead = mesh.dead_letter_count().await;
        let server = mesh.server();
        reply = self.containers_section(reply).await;
        reply = reply.with_lines(
            Some("mesh"),
            [
                format!("nats {} ({})", server.version, server.name),
                format!("agents: {} registered, {active} active, {answered} listeners answering", registry.len()),
                format!("dead letters: {dead}"),
            ],
        );
        Ok(Executed::reply(reply))
    }

    /// A mesh-wide hard kill's Docker part: stops the running listener
    /// containers and records which (so `resume` starts those and no other).
    async fn stop_listener_containers(&self) -> Vec<String> {
        let stopped = self.containers.stop_listeners().await;
        let names = match &stopped {
            Ok(names) => names.clone(),
            Err(DockerError::Partial { done, .. }) => done.clone(),
            Err(_) => Vec::new(),
        };
        let mut lines = vec![match stopped {
            Ok(names) if names.is_empty() => "docker: no running listener container to stop".to_owned(),
            other => docker_line("stopped listener containers", other),
        }];
        if names.is_empty() {
            return lines;
        }
        let recorded = match self.mesh() {
            Ok(mesh) => mesh.stopped_record(&names).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = recorded {
            lines.push(format!(
                "docker: the stopped containers were not recorded ({e}); `mesh resume` will not start them: `docker start {}`",
                names.join(" ")
            ));
        }
        lines
    }

    /// A mesh-wide resume's Docker part: starts the listener containers a
    /// kill stopped (as recorded), and only those.
    async fn start_stopped_containers(&self, mesh: &dyn Mesh) -> String {
        let names = match mesh.stopped_list().await {
            Ok(names) => names,
            Err(e) => return format!("docker: cannot read which containers the kill stopped ({e}); none started"),
        };
        if names.is_empty() {
            return match self.containers.start_listeners(&[]).await {
                Err(DockerError::NotInUse) => "docker: not in use for this mesh".to_owned(),
                _ => "docker: no listener container was stopped by a kill; none started".to_owned(),
            };
        }
        let started = self.containers.start_listeners(&names).await;
        if started.is_ok()
            && let Err(e) = mesh.stopped_clear().await
        {
            warn!(error = %e, "cannot clear the record of the containers the kill stopped");
        }
        docker_line("started listener containers", started)
    }

    /// `status` when NATS cannot be reached (the runbook's first step then):
    /// what can be known without it, the containers and the registry, and
    /// why the rest is missing. Reported as failed, so scripts notice.
    async fn status_offline(&self, registry: &Registry, why: &str) -> Executed {
        let mut reply = Reply::warn("mesh status: NATS unreachable").with_lines(
            Some("nats"),
            [
                format!("NATS unreachable: {why}"),
                "kill switch, server-side pause, listeners answering and dead letters are unknown until it is back"
                    .to_owned(),
            ],
        );
        reply = self.containers_section(reply).await;
        let active = registry.active().count();
        let agents = registry.agents().map(|a| a.id.to_string()).collect::<Vec<_>>().join(", ");
        reply = reply.with_lines(
            Some("registry"),
            [format!("agents: {} registered, {active} active ({agents})", registry.len())],
        );
        Executed { failed: true, ..Executed::reply(reply) }
    }

    /// The containers of the mesh as a section of `reply`.
    async fn containers_section(&self, reply: Reply) -> Reply {
        match self.containers.list().await {
            Ok(rows) if rows.is_empty() => {
                reply.with_lines(Some("containers"), ["none: Docker is not in use for this mesh"])
            }
            Ok(rows) => {
                let rows = rows
                    .into_iter()
                    .map(|c| {
                        vec![
                            c.name,
                            c.role,
                            c.state,
                            c.health.unwrap_or_else(|| "-".into()),
                            c.restarts.to_string(),
                            c.uptime_s.map(crate::containers::format_uptime).unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                reply.with_table(Some("containers"), ["name", "role", "state", "health", "restarts", "uptime"], rows)
            }
            Err(e) => reply.with_lines(Some("containers"), [e.to_string()]),
        }
    }
}

/// The command as a line for the audit trail's "starting" record.
/// The answer to a replay that found dead letters: one line each, the new message ids.
fn replayed(agent: &AgentId, report: &crate::dlq::ReplayReport) -> Executed {
    let ids: Vec<String> = report.replayed.iter().chain(&report.already_removed).map(|(_, id)| id.clone()).collect();
    let head = format!("replayed {} dead letters of {agent}", ids.len());
    let reply = if report.failed.is_empty() {
        Reply::ok(head)
    } else {
        Reply::warn(format!("{head}, {} failed (kept; see below)", report.failed.len()))
    };
    Executed::with_ids(reply.with_lines(None, report.lines()).with_data(report), ids)
}

fn command_line(command: &Command) -> String {
    match command {
        Command::KillNuclear { purge: true } => "kill nuclear --purge".to_owned(),
        other => other.kind().spec().name.to_owned(),
    }
}

/// One line saying what a Docker action did, or why it did not happen.
fn docker_line(what: &str, done: Result<Vec<String>, DockerError>) -> String {
    match done {
        Ok(names) if names.is_empty() => {
            "docker: no listener containers (Docker is not in use for this mesh)".to_owned()
        }
        Ok(names) => format!("docker: {what}: {}", names.join(", ")),
        Err(DockerError::NotInUse) => "docker: not in use for this mesh".to_owned(),
        Err(e) => format!("docker: {e}"),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".to_owned() } else { items.join(", ") }
}

/// The `--json` data of `send` and `broadcast`; `queued` says why delivery
/// waits (a kill switch in force), when it does.
fn receipt_data(receipt: &publish::Receipt, to: &str, queued: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "id": receipt.id.to_string(),
        "to": to,
        "stream_seq": receipt.stream_seq,
        "duplicate": receipt.duplicate,
        "recipients": receipt.recipients,
        "queued": queued.is_some(),
        "queued_note": queued,
    })
}

/// `reply` with the server-side pause's failure (if any) as a warning line.
fn with_server_warning(mut reply: Reply, server: Option<String>) -> Reply {
    if let Some(warning) = server {
        reply.tone = crate::command::Tone::Warn;
        reply = reply.with_lines(Some("warning"), [warning]);
    }
    reply
}

/// The reply of `deploy render` and `deploy up`: the warnings and the files written.
fn render_reply(title: String, report: &crate::deploy::RenderReport) -> Reply {
    let mut reply = Reply::ok(title);
    if !report.warnings.is_empty() {
        reply = reply.with_lines(Some("warnings"), report.warnings.iter().cloned());
    }
    reply.with_lines(Some("files"), report.files.iter().map(|f| f.display().to_string())).with_data(report)
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

/// 64 bits from the operating system's generator (through `uuid`'s v4, which
/// uses `getrandom`): confirmation codes must not be guessable from earlier ones.
fn os_random_u64() -> u64 {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    // v4 fixes 4 version bits in `high` and 2 variant bits in `low`.
    high.rotate_left(17) ^ low
}

/// The kill switch scope a command's optional agent names: that agent, or the whole mesh.
fn scope_of(agent: &Option<AgentId>) -> Scope {
    agent.clone().map_or(Scope::Global, Scope::Agent)
}
