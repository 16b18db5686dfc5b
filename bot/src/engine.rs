//! The command engine every front end shares: parse the line, check the
//! permission, ask for confirmation of dangerous actions, run the command
//! against the mesh, audit it, and hand back a platform-neutral reply.
//! Slack, Discord and the terminal only render what it returns.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use mesh_protocol::killswitch::{Mode, Scope};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, DeliveryMode, Envelope, Priority, Recipient, Registry};
use time::OffsetDateTime;
use tracing::warn;

use crate::audit::{self, AuditRecord};
use crate::command::{Command, ConfirmConfig, Confirmations, Identity, KillGrade, Permissions, Reply, parse};
use crate::killswitch::{self, KillSwitch};
use crate::{dlq, ping, publish};

/// Where a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// The `mesh` command line.
    Cli,
    /// Slack.
    Slack,
    /// Discord.
    Discord,
}

impl Platform {
    /// The name used in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Slack => "slack",
            Self::Discord => "discord",
        }
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
    /// The command line (what follows `/mesh` or `!mesh`).
    pub line: String,
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
}

impl Handled {
    fn reply(reply: Reply) -> Self {
        Self { reply, follow_up: None, confirmation_code: None }
    }
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handled").field("reply", &self.reply).field("follow_up", &self.follow_up.is_some()).finish()
    }
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
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Nats(#[from] mesh_listener::nats::NatsError),
    #[error(transparent)]
    KillSwitch(#[from] killswitch::KillSwitchError),
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    kill: KillSwitch,
    confirmations: Mutex<Confirmations>,
    limits: crate::limits::LimitStore,
}

/// What running a command did, for the reply and the audit trail.
struct Executed {
    reply: Reply,
    message_ids: Vec<String>,
    follow_up: Option<FollowUp>,
}

impl Executed {
    fn reply(reply: Reply) -> Self {
        Self { reply, message_ids: Vec::new(), follow_up: None }
    }
}

impl Engine {
    /// Connects the engine to the mesh.
    pub async fn new(
        config: EngineConfig,
        client: async_nats::Client,
        limits: crate::limits::LimitStore,
    ) -> Result<Self, EngineError> {
        let js = jetstream::new(client.clone());
        mesh_listener::nats::ensure_streams(&js, mesh_listener::nats::replicas_from_env()?).await?;
        let kill = KillSwitch::open(&js).await?;
        let confirmations = Mutex::new(Confirmations::new(config.confirm));
        Ok(Self { config, client, js, kill, confirmations, limits })
    }

    /// The JetStream context (for adapters that publish events).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Rate limits and retry dedup.
    pub fn limits(&self) -> &crate::limits::LimitStore {
        &self.limits
    }

    /// The kill switch.
    pub fn kill_switch(&self) -> &KillSwitch {
        &self.kill
    }

    /// Runs one command line.
    pub async fn handle(&self, request: Request) -> Handled {
        match parse(&request.line) {
            Ok(command) => self.handle_command(request, command).await,
            Err(e) => {
                let reply = Reply::error(e.to_string()).ephemeral();
                self.audit(&request, "invalid", &reply, &[]).await;
                Handled::reply(reply)
            }
        }
    }

    /// Runs one already parsed command (the terminal builds commands from flags).
    pub async fn handle_command(&self, request: Request, command: Command) -> Handled {
        let now = OffsetDateTime::now_utc();
        let pause = self.pause_grade(&command).await;
        let role = match self.config.permissions.check(&request.who, &command, pause) {
            Ok(role) => role,
            Err(denied) => {
                let reply = Reply::error(denied.to_string()).ephemeral();
                self.audit(&request, "denied", &reply, &[]).await;
                return Handled::reply(reply);
            }
        };
        if let crate::limits::Decision::Limited { message } = self.limits.check(&request.who.key(), &command).await {
            let reply = Reply::error(message).ephemeral();
            self.audit(&request, "limited", &reply, &[]).await;
            return Handled::reply(reply);
        }
        if command.needs_confirmation() {
            let challenge = self.lock_confirmations().request(&request.who, command, now, fastrand::u64(..));
            let reply = Reply::warn(challenge.instruction(self.config.confirm.window)).ephemeral();
            self.audit(&request, "confirmation required", &reply, &[]).await;
            return Handled { reply, follow_up: None, confirmation_code: Some(challenge.code) };
        }
        let command = match command {
            Command::Confirm { code } => match self.confirm(&request.who, role, &code, now) {
                Ok(action) => action.command,
                Err(e) => {
                    let reply = Reply::error(e.to_string()).ephemeral();
                    self.audit(&request, "denied", &reply, &[]).await;
                    return Handled::reply(reply);
                }
            },
            other => other,
        };
        let executed = match self.execute(&request, role, command).await {
            Ok(executed) => executed,
            Err(message) => Executed::reply(Reply::error(message)),
        };
        self.audit(&request, "allowed", &executed.reply, &executed.message_ids).await;
        Handled { reply: executed.reply, follow_up: executed.follow_up, confirmation_code: None }
    }

    /// Takes a pending action (the lock is released before anything awaits).
    fn confirm(
        &self,
        who: &Identity,
        role: Option<crate::command::Role>,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<crate::command::PendingAction, crate::command::ConfirmError> {
        self.lock_confirmations().confirm(who, role, code, now)
    }

    fn lock_confirmations(&self) -> std::sync::MutexGuard<'_, Confirmations> {
        self.confirmations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The grade of the pause in force where a `resume` or a kill would
    /// replace the entry (their permission depends on it).
    async fn pause_grade(&self, command: &Command) -> Option<KillGrade> {
        let agent = match command {
            Command::Resume { agent } | Command::KillSoft { agent, .. } | Command::KillHard { agent, .. } => agent,
            _ => return None,
        };
        let scope = agent.clone().map_or(Scope::Global, Scope::Agent);
        match self.kill.get(&scope).await {
            Ok(Some(state)) if state.in_force(OffsetDateTime::now_utc()) => killswitch::grade(state.mode),
            _ => None,
        }
    }

    async fn audit(&self, request: &Request, decision: &str, reply: &Reply, message_ids: &[String]) {
        let record = AuditRecord {
            at: OffsetDateTime::now_utc(),
            who: request.who.key(),
            platform: request.platform.as_str().to_owned(),
            channel: request.channel.clone(),
            line: audit::clip(&request.line),
            decision: decision.to_owned(),
            outcome: reply.title.clone(),
            message_ids: message_ids.to_vec(),
        };
        if let Err(e) = audit::append(&self.js, &record).await {
            warn!(error = %e, who = %record.who, "audit record not stored");
        }
    }

    fn registry(&self) -> Result<Registry, String> {
        mesh_listener::registry_file::load(&self.config.registry_path).map_err(|e| e.to_string())
    }

    async fn execute(
        &self,
        request: &Request,
        role: Option<crate::command::Role>,
        command: Command,
    ) -> Result<Executed, String> {
        let from = request.who.key();
        let actor = killswitch::Actor::new(&from, role);
        match command {
            Command::Send { agent, text } => {
                let registry = self.registry()?;
                let receipt = publish::send(&self.js, &registry, &from, agent.as_str(), &text, Priority::Normal)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut reply =
                    Reply::ok(format!("sent to {agent}")).with_lines(None, [format!("message id {}", receipt.id)]);
                if let Some(note) = self.queued_note(Some(&agent)).await {
                    reply = reply.with_lines(None, [note]);
                }
                Ok(Executed { reply, message_ids: vec![receipt.id.to_string()], follow_up: None })
            }
            Command::Broadcast { priority, text } => {
                let registry = self.registry()?;
                let receipt =
                    publish::broadcast(&self.js, &registry, &from, &text, priority).await.map_err(|e| e.to_string())?;
                let mut reply = Reply::ok(format!("broadcast to {} active agents", receipt.recipients))
                    .with_lines(None, [format!("message id {}", receipt.id)]);
                if let Some(note) = self.queued_note(None).await {
                    reply = reply.with_lines(None, [note]);
                }
                Ok(Executed { reply, message_ids: vec![receipt.id.to_string()], follow_up: None })
            }
            Command::Ask { agent, text } => self.ask(&from, &agent, &text).await,
            Command::Ping => {
                let registry = self.registry()?;
                let report = ping::ping(&self.client, &registry, self.config.ping_timeout).await?;
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
                Ok(Executed::reply(reply.with_table(None, ["agent", "state", "rtt ms", "pending"], rows)))
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
                let state = self
                    .kill
                    .pull(&scope, Mode::Soft, Some(duration), actor, reason)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Executed::reply(Reply::warn(format!("kill switch: {}", killswitch::describe(&scope, &state)))))
            }
            Command::KillHard { agent, reason } => {
                let scope = self.scope(agent)?;
                let state = self.kill.pull(&scope, Mode::Hard, None, actor, reason).await.map_err(|e| e.to_string())?;
                let reply = Reply::warn(format!("kill switch: {}", killswitch::describe(&scope, &state)));
                let docker = match scope {
                    Scope::Global => {
                        let control = docker_control().await.map(|d| async move { d.stop_listeners().await });
                        docker_line("stopped listener containers", control).await
                    }
                    Scope::Agent(_) => {
                        "docker: containers left running (a per-agent pause is enforced by the listeners)".to_owned()
                    }
                };
                Ok(Executed::reply(reply.with_lines(None, [docker])))
            }
            Command::KillNuclear => {
                let state = self
                    .kill
                    .pull(&Scope::Global, Mode::Nuclear, None, actor, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = Reply::warn(format!("kill switch: {}", killswitch::describe(&Scope::Global, &state)));
                let lines = match docker_control().await {
                    Ok(docker) => match docker.nuclear(false, crate::docker::own_container_id().as_deref()).await {
                        Ok(report) => vec![
                            format!("stopped: {}", list_or_none(&report.stopped)),
                            format!("removed: {}", list_or_none(&report.removed)),
                            format!("kept (this bot): {}", list_or_none(&report.kept)),
                            format!("failed: {}", list_or_none(&report.failed)),
                        ],
                        Err(e) => vec![e.to_string()],
                    },
                    Err(e) => vec![e.to_string()],
                };
                Ok(Executed::reply(reply.with_lines(Some("docker"), lines)))
            }
            Command::Resume { agent } => {
                let scope = self.scope(agent)?;
                self.kill.release(&scope, actor).await.map_err(|e| e.to_string())?;
                let mut reply = Reply::ok(format!("resumed {scope}"));
                if scope == Scope::Global {
                    let line = docker_line(
                        "started listener containers",
                        docker_control().await.map(|d| async move { d.start_listeners().await }),
                    )
                    .await;
                    reply = reply.with_lines(None, [line]);
                }
                if let Ok(others) = self.kill.in_force().await
                    && !others.is_empty()
                {
                    reply = reply
                        .with_lines(Some("still in force"), others.iter().map(|(s, st)| killswitch::describe(s, st)));
                }
                Ok(Executed::reply(reply))
            }
            Command::Confirm { .. } => Err("nothing to confirm".to_owned()),
            Command::Dlq { agent } => {
                let entries = dlq::list(&self.js, agent.as_ref(), 20).await.map_err(|e| e.to_string())?;
                if entries.is_empty() {
                    return Ok(Executed::reply(Reply::ok("no dead letters")));
                }
                let rows = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.dlq_seq.to_string(),
                            e.agent.clone(),
                            e.attempts.to_string(),
                            e.reason.clone(),
                            e.text.clone().unwrap_or_else(|| "<undecodable>".into()),
                        ]
                    })
                    .collect();
                Ok(Executed::reply(Reply::warn(format!("{} dead letters", entries.len())).with_table(
                    None,
                    ["#", "agent", "attempts", "reason", "text"],
                    rows,
                )))
            }
            Command::DlqReplay { agent, count } => {
                let registry = self.registry()?;
                let report = dlq::replay(&self.js, &registry, agent.as_str(), count as usize)
                    .await
                    .map_err(|e| e.to_string())?;
                let ids: Vec<String> = report.replayed.iter().map(|(_, id)| id.clone()).collect();
                let lines = report
                    .replayed
                    .iter()
                    .map(|(seq, id)| format!("dead letter {seq} replayed as {id}"))
                    .chain(report.skipped.iter().map(|(seq, why)| format!("dead letter {seq} skipped: {why}")));
                let reply =
                    Reply::ok(format!("replayed {} dead letters of {agent}", ids.len())).with_lines(None, lines);
                Ok(Executed { reply, message_ids: ids, follow_up: None })
            }
            Command::Audit { count } => {
                let records = audit::newest(&self.js, count as usize).await?;
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
                Ok(Executed::reply(Reply::info(format!("last {} commands", records.len())).with_table(
                    None,
                    ["at", "who", "command", "decision", "outcome"],
                    rows,
                )))
            }
            Command::Help { topic } => Ok(Executed::reply(crate::command::help::help(topic))),
        }
    }

    fn scope(&self, agent: Option<AgentId>) -> Result<Scope, String> {
        match agent {
            None => Ok(Scope::Global),
            Some(id) => {
                let registry = self.registry()?;
                publish::resolve_any(&registry, id.as_str()).map_err(|e| e.to_string())?;
                Ok(Scope::Agent(id))
            }
        }
    }

    /// "queued until ..." when a pause holds messages for `agent` (or everyone).
    async fn queued_note(&self, agent: Option<&AgentId>) -> Option<String> {
        let state = self.kill.effective(agent).await.ok()??;
        let until = match (state.mode, state.until) {
            (Mode::Soft, Some(until)) => format!("until {}", killswitch::rfc3339(until)),
            _ => "until a director resumes".to_owned(),
        };
        Some(format!(
            "the mesh is paused ({}): the message is queued and delivered when the pause ends, {until}",
            state.mode
        ))
    }

    async fn ask(&self, from: &str, agent: &AgentId, text: &str) -> Result<Executed, String> {
        let registry = self.registry()?;
        let target = publish::resolve_target(&registry, agent.as_str()).map_err(|e| e.to_string())?;
        if target.delivery != DeliveryMode::Chat {
            return Err(format!(
                "ask needs an agent with \"delivery\": \"chat\"; {agent} answers nobody back (use send)"
            ));
        }
        let reply_subject = Subject::new_reply();
        let mut replies = self
            .client
            .subscribe(reply_subject.to_string())
            .await
            .map_err(|e| format!("cannot wait for the reply: {e}"))?;
        let envelope = Envelope::new(from, Recipient::Agent(agent.clone()), text)
            .map_err(|e| e.to_string())?
            .with_reply_to(&reply_subject);
        mesh_listener::nats::ensure_consumer(&self.js, agent, target.consumer_tuning())
            .await
            .map_err(|e| e.to_string())?;
        publish::publish(&self.js, &envelope).await.map_err(|e| e.to_string())?;
        let timeout = self.config.ask_timeout;
        let queued = self.queued_note(Some(agent)).await;
        let asked = agent.clone();
        let follow_up: FollowUp = Box::pin(async move {
            match tokio::time::timeout(timeout, replies.next()).await {
                Ok(Some(message)) => match serde_json::from_slice::<Envelope>(&message.payload) {
                    Ok(answer) => {
                        Reply::info(format!("{asked} replied")).with_lines(None, answer.text.lines().map(str::to_owned))
                    }
                    Err(e) => Reply::error(format!("{asked} sent a reply that is not a message: {e}")),
                },
                _ => Reply::warn(format!("{asked} did not reply within {}s", timeout.as_secs())),
            }
        });
        let mut reply = Reply::ok(format!("asked {agent}; the reply will follow"))
            .with_lines(None, [format!("message id {}", envelope.id)]);
        if let Some(note) = queued {
            reply = reply.with_lines(None, [note]);
        }
        Ok(Executed { reply, message_ids: vec![envelope.id.to_string()], follow_up: Some(follow_up) })
    }

    async fn status(&self) -> Result<Executed, String> {
        let registry = self.registry()?;
        let mut reply = Reply::info("mesh status");
        let kills = self.kill.in_force().await.map_err(|e| e.to_string())?;
        let kill_lines: Vec<String> = if kills.is_empty() {
            vec!["not pulled".to_owned()]
        } else {
            kills.iter().map(|(scope, state)| killswitch::describe(scope, state)).collect()
        };
        if !kills.is_empty() {
            reply.tone = crate::command::Tone::Warn;
        }
        reply = reply.with_lines(Some("kill switch"), kill_lines);
        let report = ping::ping(&self.client, &registry, self.config.ping_timeout).await?;
        let answered = report.rows.iter().filter(|r| r.rtt_ms.is_some()).count();
        let active = registry.active().count();
        let dead = match self.js.get_stream(mesh_protocol::layout::dead_letter_stream(1).name).await {
            Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        let server = self.client.server_info();
        match docker_control().await {
            Ok(docker) => match docker.containers().await {
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
                                c.uptime_s.map(crate::docker::format_uptime).unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect();
                    reply = reply.with_table(
                        Some("containers"),
                        ["name", "role", "state", "health", "restarts", "uptime"],
                        rows,
                    );
                }
                Err(e) => reply = reply.with_lines(Some("containers"), [e.to_string()]),
            },
            Err(e) => reply = reply.with_lines(Some("containers"), [e.to_string()]),
        }
        reply = reply.with_lines(
            Some("mesh"),
            [
                format!("nats {} ({})", server.version, server.server_name),
                format!("agents: {} registered, {active} active, {answered} listeners answering", registry.len()),
                format!("dead letters: {dead}"),
            ],
        );
        Ok(Executed::reply(reply))
    }
}

/// The mesh's Docker project, if the engine answers.
async fn docker_control() -> Result<crate::docker::DockerControl, crate::docker::DockerError> {
    crate::docker::DockerControl::connect(&crate::docker::DockerControl::project_from_env()).await
}

/// One line saying what a Docker action did, or why it did not happen.
async fn docker_line<F>(what: &str, action: Result<F, crate::docker::DockerError>) -> String
where
    F: Future<Output = Result<Vec<String>, crate::docker::DockerError>>,
{
    match action {
        Ok(action) => match action.await {
            Ok(names) => format!("docker: {what}: {}", list_or_none(&names)),
            Err(e) => format!("docker: {e}"),
        },
        Err(e) => format!("docker: {e}"),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".to_owned() } else { items.join(", ") }
}
