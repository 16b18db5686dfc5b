//! What the engine needs from the mesh, as a trait: publishing, pings, the
//! kill switch, dead letters, the audit trail, backups and the maintenance
//! window. [`NatsMesh`] is the JetStream implementation; the engine's unit
//! tests use an in-memory fake, so the whole pipeline is tested without servers.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use futures::future::BoxFuture;
use mesh_protocol::killswitch::{KillState, Mode, Scope};
use mesh_protocol::layout::{ConsumerTuning, Replicas};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Registry};

use crate::audit::AuditRecord;
use crate::backup::{BackupError, Manifest, RestoreReport};
use crate::dlq::{DeadLetterEntry, DlqError, ReplayReport};
use crate::killswitch::{Actor, KillSwitch, KillSwitchError};
use crate::maintenance::{Report, Window};
use crate::ping::PingReport;
use crate::publish::{Prepared, Receipt, SendError};

/// Why a mesh operation failed. Each variant keeps its cause; the messages
/// are the one-line, actionable ones of the operations.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    KillSwitch(#[from] KillSwitchError),
    #[error(transparent)]
    DeadLetters(#[from] DlqError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Nats(#[from] mesh_runtime::nats::NatsError),
    #[error(transparent)]
    Ping(#[from] crate::ping::PingError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Maintenance(#[from] crate::maintenance::MaintenanceError),
    /// No subscription for an `ask`'s reply.
    #[error("cannot wait for the reply: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// Any other failure (a fake mesh's, in tests), with its cause.
    #[error(transparent)]
    Request(Box<dyn std::error::Error + Send + Sync>),
}

/// Why an `ask`'s reply did not arrive as a message.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The subscription ended before a reply came.
    #[error("the reply subscription closed")]
    Closed,
    /// The reply is not an envelope.
    #[error("not a message: {0}")]
    Decode(#[source] serde_json::Error),
}

/// The answer to an `ask`, once it arrives (the caller bounds the wait).
pub type ReplyWait = BoxFuture<'static, Result<Envelope, ReplyError>>;

/// The NATS server the engine talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// nats-server version.
    pub version: String,
    /// Its name.
    pub name: String,
}

/// The kill switch as nats-server enforces it, for `mesh status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerPauses {
    /// The server cannot pause consumers: the warning to show.
    TooOld(String),
    /// Each agent consumer's pause on the server.
    Consumers(Vec<mesh_runtime::server_pause::ConsumerPause>),
}

/// Everything the engine does to the mesh.
pub trait Mesh: Send + Sync + std::fmt::Debug {
    /// Creates the recipients' consumers, publishes, waits for the ack.
    fn deliver<'a>(&'a self, prepared: &'a Prepared) -> BoxFuture<'a, Result<Receipt, MeshError>>;
    /// Subscribes to `reply`, then publishes `envelope` (whose `reply_to` is `reply`).
    fn ask<'a>(
        &'a self,
        envelope: &'a Envelope,
        reply: &'a Subject,
        tuning: ConsumerTuning,
    ) -> BoxFuture<'a, Result<ReplyWait, MeshError>>;
    /// Pings the fleet.
    fn ping<'a>(&'a self, registry: &'a Registry, timeout: Duration) -> BoxFuture<'a, Result<PingReport, MeshError>>;
    /// The kill switch entry of one scope.
    fn kill_get<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Result<Option<KillState>, MeshError>>;
    /// Pulls the kill switch; with why the server-side pause may not match
    /// (see [`crate::killswitch::Written::server`]).
    fn kill_pull<'a>(
        &'a self,
        scope: &'a Scope,
        mode: Mode,
        duration: Option<Duration>,
        actor: Actor<'a>,
        reason: Option<String>,
    ) -> BoxFuture<'a, Result<(KillState, Option<String>), MeshError>>;
    /// Releases the kill switch; returns why the consumers may still be paused on the server.
    fn kill_release<'a>(
        &'a self,
        scope: &'a Scope,
        actor: Actor<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, MeshError>>;
    /// Every pause in force.
    fn kill_in_force(&self) -> BoxFuture<'_, Result<Vec<(Scope, KillState)>, MeshError>>;
    /// The pause in force for one agent (or the global one).
    fn kill_effective<'a>(&'a self, agent: Option<&'a AgentId>) -> BoxFuture<'a, Result<Option<KillState>, MeshError>>;
    /// Records listener containers a hard kill stopped (added to the record).
    fn stopped_record<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<(), MeshError>>;
    /// The listener containers recorded as stopped by a kill.
    fn stopped_list(&self) -> BoxFuture<'_, Result<Vec<String>, MeshError>>;
    /// Forgets the record (the containers were started again).
    fn stopped_clear(&self) -> BoxFuture<'_, Result<(), MeshError>>;
    /// Dead letters, oldest first.
    fn dead_letters<'a>(
        &'a self,
        agent: Option<&'a AgentId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterEntry>, MeshError>>;
    /// How many dead letters are stored.
    fn dead_letter_count(&self) -> BoxFuture<'_, u64>;
    /// Replays an agent's oldest dead letters.
    fn replay<'a>(
        &'a self,
        registry: &'a Registry,
        agent: &'a AgentId,
        n: usize,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>>;
    /// Replays the one dead letter of `agent` stored at `seq` in the
    /// dead-letter stream; an empty report when it is no longer there or not `agent`'s.
    fn replay_one<'a>(
        &'a self,
        registry: &'a Registry,
        agent: &'a AgentId,
        seq: u64,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>>;
    /// Appends an audit record.
    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), MeshError>>;
    /// The newest audit records, newest first.
    fn audit_newest(&self, n: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, MeshError>>;
    /// The server.
    fn server(&self) -> ServerInfo;
    /// Each agent consumer's pause on the server (or why the server has none).
    fn server_pauses(&self) -> BoxFuture<'_, Result<ServerPauses, MeshError>>;
    /// Backs up into `dir`.
    fn backup<'a>(&'a self, registry: &'a Path, dir: &'a Path) -> BoxFuture<'a, Result<Manifest, MeshError>>;
    /// Restores `dir`.
    fn restore<'a>(&'a self, registry: &'a Path, dir: &'a Path) -> BoxFuture<'a, Result<RestoreReport, MeshError>>;
    /// Creates the streams, the kill switch bucket and the consumers of
    /// `agents` (listeners may not); says what is in place.
    fn provision<'a>(&'a self, agents: &'a [(AgentId, ConsumerTuning)]) -> BoxFuture<'a, Result<String, MeshError>>;
    /// Deletes the consumers of `agents` (removed, made inactive, or about to
    /// be registered afresh); says what each still held. One holding messages
    /// not delivered is kept unless `drop_backlog`.
    fn retire<'a>(&'a self, agents: &'a [AgentId], drop_backlog: bool) -> BoxFuture<'a, Result<String, MeshError>>;
    /// How many messages `agent`'s consumer holds not delivered and its ack
    /// floor (stream sequence); `None` without a consumer.
    fn backlog<'a>(&'a self, agent: &'a AgentId) -> BoxFuture<'a, Result<Option<(u64, u64)>, MeshError>>;
    /// Runs a maintenance window; `progress` sees each step.
    fn maintenance<'a>(
        &'a self,
        registry: &'a Registry,
        window: &'a Window,
        progress: Box<dyn FnMut(&str) + Send + 'a>,
    ) -> BoxFuture<'a, Result<Report, MeshError>>;
}

/// The mesh over NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsMesh {
    client: async_nats::Client,
    js: jetstream::Context,
    kill: KillSwitch,
    replicas: Replicas,
}

impl NatsMesh {
    /// Creates the streams and the kill switch bucket when missing, with `replicas`.
    pub async fn open(client: async_nats::Client, replicas: Replicas) -> Result<Self, MeshError> {
        let js = jetstream::new(client.clone());
        mesh_runtime::nats::ensure_streams(&js, replicas).await?;
        let kill = KillSwitch::open_with(&js, replicas).await?;
        Ok(Self { client, js, kill, replicas })
    }
}

impl Mesh for NatsMesh {
    fn deliver<'a>(&'a self, prepared: &'a Prepared) -> BoxFuture<'a, Result<Receipt, MeshError>> {
        Box::pin(async move {
            let receipt = crate::publish::deliver(&self.js, prepared).await?;
            if matches!(prepared.envelope.to, mesh_protocol::Recipient::Broadcast) && !receipt.duplicate {
                // Announced in the chat channels too; the message id keeps a retried broadcast to one post.
                let envelope = &prepared.envelope;
                let text =
                    format!("broadcast from {} to {} agents: {}", envelope.from, receipt.recipients, envelope.text);
                let event = mesh_protocol::event::Event::now(mesh_protocol::event::EventKind::Broadcast, text);
                crate::events::publish_once(&self.js, &event, &format!("broadcast:{}", envelope.id)).await;
            }
            Ok(receipt)
        })
    }

    fn ask<'a>(
        &'a self,
        envelope: &'a Envelope,
        reply: &'a Subject,
        tuning: ConsumerTuning,
    ) -> BoxFuture<'a, Result<ReplyWait, MeshError>> {
        Box::pin(async move {
            let mesh_protocol::Recipient::Agent(asked) = &envelope.to else {
                return Err(SendError::NoInbox.into());
            };
            // Only the asked agent's listener may publish on the answer subject
            // naming it (`mesh.reply.<asker>.<token>.<asked>`); the answer's
            // `from` and `in_reply_to` are checked too.
            let answers = reply.sent_by(asked).ok_or(SendError::NoInbox)?;
            let mut replies = self.client.subscribe(answers.to_string()).await.map_err(MeshError::Subscribe)?;
            mesh_runtime::nats::ensure_consumer(&self.js, asked, tuning).await.map_err(SendError::from)?;
            crate::publish::publish(&self.js, envelope).await?;
            let (asked, question) = (asked.to_string(), envelope.id);
            let wait: ReplyWait = Box::pin(async move {
                loop {
                    let message = replies.next().await.ok_or(ReplyError::Closed)?;
                    let answer = serde_json::from_slice::<Envelope>(&message.payload).map_err(ReplyError::Decode)?;
                    match crate::thread::check_answer(&answer, &asked, question) {
                        Ok(()) => return Ok(answer),
                        Err(why) => {
                            tracing::warn!(agent = %asked, msg_id = %question, subject = %message.subject, "ask answer refused, still waiting: {why}")
                        }
                    }
                }
            });
            Ok(wait)
        })
    }

    fn ping<'a>(&'a self, registry: &'a Registry, timeout: Duration) -> BoxFuture<'a, Result<PingReport, MeshError>> {
        Box::pin(async move { crate::ping::ping(&self.client, registry, timeout).await.map_err(MeshError::from) })
    }

    fn kill_get<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Result<Option<KillState>, MeshError>> {
        Box::pin(async move { Ok(self.kill.get(scope).await?) })
    }

    fn kill_pull<'a>(
        &'a self,
        scope: &'a Scope,
        mode: Mode,
        duration: Option<Duration>,
        actor: Actor<'a>,
        reason: Option<String>,
    ) -> BoxFuture<'a, Result<(KillState, Option<String>), MeshError>> {
        Box::pin(async move {
            let written = self.kill.pull_revision(scope, mode, duration, actor, reason).await?;
            Ok((written.state, written.server))
        })
    }

    fn kill_release<'a>(
        &'a self,
        scope: &'a Scope,
        actor: Actor<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, MeshError>> {
        Box::pin(async move { Ok(self.kill.release_reporting(scope, actor).await?) })
    }

    fn kill_in_force(&self) -> BoxFuture<'_, Result<Vec<(Scope, KillState)>, MeshError>> {
        Box::pin(async move { Ok(self.kill.in_force().await?) })
    }

    fn kill_effective<'a>(&'a self, agent: Option<&'a AgentId>) -> BoxFuture<'a, Result<Option<KillState>, MeshError>> {
        Box::pin(async move { Ok(self.kill.effective(agent).await?) })
    }

    fn stopped_record<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<(), MeshError>> {
        Box::pin(async move { Ok(self.kill.record_stopped(names).await?) })
    }

    fn stopped_list(&self) -> BoxFuture<'_, Result<Vec<String>, MeshError>> {
        Box::pin(async move { Ok(self.kill.stopped().await?) })
    }

    fn stopped_clear(&self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move { Ok(self.kill.clear_stopped().await?) })
    }

    fn dead_letters<'a>(
        &'a self,
        agent: Option<&'a AgentId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterEntry>, MeshError>> {
        Box::pin(async move { Ok(crate::dlq::list(&self.js, agent, limit).await?) })
    }

    fn dead_letter_count(&self) -> BoxFuture<'_, u64> {
        Box::pin(async move {
            match self.js.get_stream(mesh_protocol::layout::dead_letter_stream(1).name).await {
                Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            }
        })
    }

    fn replay<'a>(
        &'a self,
        registry: &'a Registry,
        agent: &'a AgentId,
        n: usize,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>> {
        Box::pin(async move { Ok(crate::dlq::replay(&self.js, registry, agent.as_str(), n).await?) })
    }

    fn replay_one<'a>(
        &'a self,
        registry: &'a Registry,
        agent: &'a AgentId,
        seq: u64,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>> {
        Box::pin(async move { Ok(crate::dlq::replay_one(&self.js, registry, agent.as_str(), seq).await?) })
    }

    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), MeshError>> {
        Box::pin(async move { crate::audit::append(&self.js, record).await.map_err(MeshError::from) })
    }

    fn audit_newest(&self, n: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, MeshError>> {
        Box::pin(async move { crate::audit::newest(&self.js, n).await.map_err(MeshError::from) })
    }

    fn server(&self) -> ServerInfo {
        let info = self.client.server_info();
        ServerInfo { version: info.version.clone(), name: info.server_name.clone() }
    }

    fn server_pauses(&self) -> BoxFuture<'_, Result<ServerPauses, MeshError>> {
        Box::pin(async move {
            use mesh_runtime::server_pause::{self, Support};
            let support = Support::of(&self.client);
            if let Some(warning) = support.warning() {
                return Ok(ServerPauses::TooOld(warning));
            }
            Ok(ServerPauses::Consumers(server_pause::list(&self.js).await?))
        })
    }

    fn backup<'a>(&'a self, registry: &'a Path, dir: &'a Path) -> BoxFuture<'a, Result<Manifest, MeshError>> {
        Box::pin(async move { Ok(crate::backup::backup(&self.js, registry, dir).await?) })
    }

    fn restore<'a>(&'a self, registry: &'a Path, dir: &'a Path) -> BoxFuture<'a, Result<RestoreReport, MeshError>> {
        Box::pin(async move { Ok(crate::backup::restore(&self.js, self.replicas, registry, dir).await?) })
    }

    fn provision<'a>(&'a self, agents: &'a [(AgentId, ConsumerTuning)]) -> BoxFuture<'a, Result<String, MeshError>> {
        Box::pin(async move {
            crate::provision::ensure_mesh(&self.js, self.replicas).await?;
            for (id, tuning) in agents {
                mesh_runtime::nats::ensure_consumer(&self.js, id, *tuning).await?;
            }
            let names = agents.iter().map(|(a, _)| format!("agent-{a}")).collect::<Vec<_>>();
            Ok(match names.as_slice() {
                [] => "streams and kill switch bucket in place".to_owned(),
                _ => format!(
                    "consumers in place ({}): messages sent from now on wait for the listener",
                    names.join(", ")
                ),
            })
        })
    }

    fn retire<'a>(&'a self, agents: &'a [AgentId], drop_backlog: bool) -> BoxFuture<'a, Result<String, MeshError>> {
        Box::pin(async move { Ok(crate::provision::retire(&self.js, agents, drop_backlog, None).await?) })
    }

    fn backlog<'a>(&'a self, agent: &'a AgentId) -> BoxFuture<'a, Result<Option<(u64, u64)>, MeshError>> {
        Box::pin(async move { Ok(mesh_runtime::nats::consumer_backlog(&self.js, agent).await?) })
    }

    fn maintenance<'a>(
        &'a self,
        registry: &'a Registry,
        window: &'a Window,
        progress: Box<dyn FnMut(&str) + Send + 'a>,
    ) -> BoxFuture<'a, Result<Report, MeshError>> {
        Box::pin(async move {
            crate::maintenance::run(&self.client, self.replicas, registry, window, progress)
                .await
                .map_err(MeshError::from)
        })
    }
}
