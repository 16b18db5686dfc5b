//! The engine's pipeline without servers: a fake mesh and fake containers
//! record what the engine did, so each step (front end, permission, rate
//! limit, confirmation, execution, audit, follow-up) is checked on its own.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_protocol::killswitch::{KillState, Mode, Scope};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Recipient, Registry};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::*;
use crate::audit::AuditRecord;
use crate::backup::{Manifest, RestoreReport};
use crate::command::{Command, ConfirmConfig, Identity, Permissions, Principal, Role, Tone};
use crate::containers::{ContainerRow, Containers, DockerError, NuclearReport};
use crate::dlq::{DeadLetterEntry, ReplayReport};
use crate::killswitch::Actor;
use crate::limits::{Limit, LimitStore, LimitsConfig, ManualClock, RateLimits};
use crate::maintenance::{Report, Window};
use crate::mesh::{Mesh, MeshError, ReplyWait, ServerInfo};
use crate::ping::PingReport;
use crate::publish::{Prepared, Receipt};

/// What the fake mesh saw and holds.
#[derive(Debug, Default)]
struct State {
    published: Vec<Envelope>,
    kill: BTreeMap<String, KillState>,
    audit: Vec<AuditRecord>,
    audit_fails: bool,
    /// The answer channel of the last `ask`, for the test to reply on.
    asked: Option<oneshot::Sender<Envelope>>,
    /// What `server_pauses` answers (`None`: no agent consumers).
    server_pauses: Option<crate::mesh::ServerPauses>,
    /// What a kill or resume reports about the server-side pause (`None`: applied).
    server_pause_failure: Option<String>,
    /// The audit records stored when each kill was written.
    audited_before_kill: Vec<Vec<String>>,
    /// Listener containers recorded as stopped by a kill.
    stopped: Vec<String>,
    /// The engine's clock (kill entries are written at its time).
    now: Option<OffsetDateTime>,
    /// What replaying one dead letter reports (`None`: nothing stored).
    replay_one: Option<ReplayReport>,
}

#[derive(Debug, Default, Clone)]
struct FakeMesh(Arc<Mutex<State>>);

impl FakeMesh {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(async move { value })
}

impl Mesh for FakeMesh {
    fn deliver<'a>(&'a self, prepared: &'a Prepared) -> BoxFuture<'a, Result<Receipt, MeshError>> {
        let mut state = self.state();
        state.published.push(prepared.envelope.clone());
        let receipt = Receipt {
            id: prepared.envelope.id,
            stream_seq: state.published.len() as u64,
            duplicate: false,
            recipients: prepared.recipients.len(),
        };
        ready(Ok(receipt))
    }

    fn ask<'a>(
        &'a self,
        envelope: &'a Envelope,
        _reply: &'a Subject,
        _tuning: mesh_protocol::layout::ConsumerTuning,
    ) -> BoxFuture<'a, Result<ReplyWait, MeshError>> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state();
        state.published.push(envelope.clone());
        state.asked = Some(tx);
        let wait: ReplyWait = Box::pin(async move { rx.await.map_err(|_| crate::mesh::ReplyError::Closed) });
        ready(Ok(wait))
    }

    fn ping<'a>(&'a self, registry: &'a Registry, _timeout: Duration) -> BoxFuture<'a, Result<PingReport, MeshError>> {
        ready(Ok(PingReport::build(registry, &BTreeMap::new(), Duration::ZERO)))
    }

    fn kill_get<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Result<Option<KillState>, MeshError>> {
        ready(Ok(self.state().kill.get(&scope.key()).cloned()))
    }

    fn kill_pull<'a>(
        &'a self,
        scope: &'a Scope,
        mode: Mode,
        duration: Option<Duration>,
        actor: Actor<'a>,
        reason: Option<String>,
    ) -> BoxFuture<'a, Result<(KillState, Option<String>), MeshError>> {
        let at = self.state().now.unwrap_or_else(OffsetDateTime::now_utc);
        let state = KillState { mode, until: duration.map(|d| at + d), by: actor.by.to_owned(), reason, at };
        let outcomes = self.state().audit.iter().map(|r| r.outcome.clone()).collect();
        self.state().audited_before_kill.push(outcomes);
        self.state().kill.insert(scope.key(), state.clone());
        ready(Ok((state, self.state().server_pause_failure.clone())))
    }

    fn kill_release<'a>(
        &'a self,
        scope: &'a Scope,
        _actor: Actor<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, MeshError>> {
        self.state().kill.remove(&scope.key());
        ready(Ok(self.state().server_pause_failure.clone()))
    }

    fn kill_in_force(&self) -> BoxFuture<'_, Result<Vec<(Scope, KillState)>, MeshError>> {
        let state = self.state();
        let all = state.kill.iter().filter_map(|(k, v)| Scope::from_key(k).map(|s| (s, v.clone()))).collect();
        ready(Ok(all))
    }

    fn kill_effective<'a>(
        &'a self,
        _agent: Option<&'a AgentId>,
    ) -> BoxFuture<'a, Result<Option<KillState>, MeshError>> {
        ready(Ok(self.state().kill.get(&Scope::Global.key()).cloned()))
    }

    fn stopped_record<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<(), MeshError>> {
        self.state().stopped.extend(names.iter().cloned());
        ready(Ok(()))
    }

    fn stopped_list(&self) -> BoxFuture<'_, Result<Vec<String>, MeshError>> {
        ready(Ok(self.state().stopped.clone()))
    }

    fn stopped_clear(&self) -> BoxFuture<'_, Result<(), MeshError>> {
        self.state().stopped.clear();
        ready(Ok(()))
    }

    fn dead_letters<'a>(
        &'a self,
        _agent: Option<&'a AgentId>,
        _limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterEntry>, MeshError>> {
        ready(Ok(Vec::new()))
    }

    fn dead_letter_count(&self) -> BoxFuture<'_, u64> {
        ready(0)
    }

    fn replay<'a>(
        &'a self,
        _registry: &'a Registry,
        _agent: &'a AgentId,
        _n: usize,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>> {
        ready(Ok(ReplayReport::default()))
    }

    fn replay_one<'a>(
        &'a self,
        _registry: &'a Registry,
        _agent: &'a AgentId,
        _seq: u64,
    ) -> BoxFuture<'a, Result<ReplayReport, MeshError>> {
        ready(Ok(self.state().replay_one.clone().unwrap_or_default()))
    }

    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), MeshError>> {
        let mut state = self.state();
        if state.audit_fails {
            return ready(Err(MeshError::Request("audit stream unavailable".into())));
        }
        state.audit.push(record.clone());
        ready(Ok(()))
    }

    fn audit_newest(&self, n: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, MeshError>> {
        ready(Ok(self.state().audit.iter().rev().take(n).cloned().collect()))
    }

    fn server(&self) -> ServerInfo {
        ServerInfo { version: "fake".into(), name: "fake".into() }
    }

    fn server_pauses(&self) -> BoxFuture<'_, Result<crate::mesh::ServerPauses, MeshError>> {
        let pauses = self.state().server_pauses.clone().unwrap_or(crate::mesh::ServerPauses::Consumers(Vec::new()));
        ready(Ok(pauses))
    }

    fn backup<'a>(&'a self, _registry: &'a Path, _dir: &'a Path) -> BoxFuture<'a, Result<Manifest, MeshError>> {
        ready(Err(MeshError::Request("no backups in the fake".into())))
    }

    fn restore<'a>(&'a self, _registry: &'a Path, _dir: &'a Path) -> BoxFuture<'a, Result<RestoreReport, MeshError>> {
        ready(Err(MeshError::Request("no restores in the fake".into())))
    }

    fn provision<'a>(
        &'a self,
        agents: &'a [(AgentId, mesh_protocol::layout::ConsumerTuning)],
    ) -> BoxFuture<'a, Result<String, MeshError>> {
        ready(Ok(format!("consumers in place ({} agents)", agents.len())))
    }

    fn retire<'a>(&'a self, agents: &'a [AgentId], _drop_backlog: bool) -> BoxFuture<'a, Result<String, MeshError>> {
        ready(Ok(format!("consumers deleted ({} agents)", agents.len())))
    }

    fn backlog<'a>(&'a self, _agent: &'a AgentId) -> BoxFuture<'a, Result<Option<(u64, u64)>, MeshError>> {
        ready(Ok(None))
    }

    fn maintenance<'a>(
        &'a self,
        _registry: &'a Registry,
        window: &'a Window,
        mut progress: Box<dyn FnMut(&str) + Send + 'a>,
    ) -> BoxFuture<'a, Result<Report, MeshError>> {
        progress(&format!("paused by {}", window.by));
        ready(Ok(Report { steps: vec![format!("paused by {}", window.by)], missing: 0, message_ids: Vec::new() }))
    }
}

/// Containers that only count what they were asked to do.
#[derive(Debug, Default)]
struct FakeContainers {
    calls: Mutex<Vec<String>>,
}

impl FakeContainers {
    fn called(&self, what: &str) -> BoxFuture<'_, ()> {
        self.calls.lock().unwrap().push(what.to_owned());
        ready(())
    }
}

impl Containers for FakeContainers {
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerRow>, DockerError>> {
        ready(Ok(Vec::new()))
    }

    fn restart_listener<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<String, DockerError>> {
        Box::pin(async move {
            self.called("restart").await;
            Ok(format!("listener-{agent}"))
        })
    }

    fn stop_listeners(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        Box::pin(async move {
            self.called("stop").await;
            Ok(vec!["listener-nova".into()])
        })
    }

    fn start_listeners<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, DockerError>> {
        Box::pin(async move {
            self.called("start").await;
            Ok(names.to_vec())
        })
    }

    fn nuclear(&self, _purge: bool) -> BoxFuture<'_, Result<NuclearReport, DockerError>> {
        Box::pin(async move {
            self.called("nuclear").await;
            Ok(NuclearReport::default())
        })
    }
}

const REGISTRY: &str = r#"{
  "nova": {"hooks_token": "env:MESH_TOKEN_NOVA", "hooks_url": "http://nova:7002/hooks/wake"},
  "ada": {"hooks_token": "env:MESH_TOKEN_ADA", "gateway_token": "env:MESH_TOKEN_ADA_GW", "model": "m", "delivery": "chat",
          "hooks_url": "http://ada:7002/hooks/wake", "allow_plaintext": true}
}"#;

/// An engine on a fake mesh, with its clock, containers and registry file.
struct Setup {
    engine: Engine,
    mesh: FakeMesh,
    containers: Arc<FakeContainers>,
    now: Arc<Mutex<OffsetDateTime>>,
    _dir: tempfile::TempDir,
}

fn permissions() -> Permissions {
    Permissions::new()
        .grant(Principal::SlackUser("UVIEW".into()), Role::Viewer)
        .grant(Principal::SlackUser("UOP".into()), Role::Operator)
        .grant(Principal::SlackUser("UADMIN".into()), Role::Admin)
        .grant(Principal::SlackUser("UDIR".into()), Role::Director)
        .grant(Principal::SlackUser("UDIR2".into()), Role::Director)
}

fn setup_with(limits: LimitStore, two_person: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("tokens.json");
    std::fs::write(&registry_path, REGISTRY).unwrap();
    let config = EngineConfig {
        registry_path,
        permissions: permissions(),
        confirm: ConfirmConfig { two_person_nuclear: two_person, ..ConfirmConfig::default() },
        ask_timeout: Duration::from_secs(30),
        ping_timeout: Duration::from_millis(10),
        ..EngineConfig::new(std::path::PathBuf::new(), Permissions::new())
    };
    let mesh = FakeMesh::default();
    let containers = Arc::new(FakeContainers::default());
    let now = Arc::new(Mutex::new(OffsetDateTime::now_utc()));
    mesh.state().now = Some(*now.lock().unwrap());
    let clock = now.clone();
    let engine = Engine::with_mesh(config, Ok(Arc::new(mesh.clone())), limits)
        .with_containers(containers.clone())
        .with_clock(Arc::new(move || *clock.lock().unwrap()));
    Setup { engine, mesh, containers, now, _dir: dir }
}

fn setup() -> Setup {
    setup_with(LimitStore::memory(), false)
}

fn slack(user: &str, line: &str) -> Request {
    Request::chat(Identity::Slack { user: user.into() }, Platform::Slack, Some("C1".into()), line)
}

fn id(s: &str) -> AgentId {
    s.parse().unwrap()
}

impl Setup {
    fn audit(&self) -> Vec<(String, String, String)> {
        self.mesh.state().audit.iter().map(|r| (r.who.clone(), r.line.clone(), r.decision.clone())).collect()
    }

    fn published(&self) -> usize {
        self.mesh.state().published.len()
    }

    fn advance(&self, by: time::Duration) {
        *self.now.lock().unwrap() += by;
        self.mesh.state().now = Some(*self.now.lock().unwrap());
    }
}

#[tokio::test]
async fn an_allowed_command_runs_and_is_audited_with_its_message_id() {
    let s = setup();
    let handled = s.engine.handle(slack("UOP", "send nova hello")).await;
    assert_eq!((handled.reply.tone, handled.reply.title.as_str()), (Tone::Ok, "sent to nova"));
    assert!(!handled.failed);
    let state = s.mesh.state();
    assert_eq!(state.published.len(), 1);
    assert_eq!(state.published[0].from, "slack:UOP");
    assert_eq!(state.audit.len(), 1);
    let record = &state.audit[0];
    assert_eq!((record.decision.as_str(), record.line.as_str()), ("allowed", "send nova hello"));
    assert_eq!(record.message_ids, [state.published[0].id.to_string()]);
}

#[tokio::test]
async fn a_denied_command_does_nothing_and_is_audited() {
    let s = setup();
    let handled = s.engine.handle(slack("UVIEW", "send nova hello")).await;
    assert_eq!(handled.reply.tone, Tone::Error);
    assert_eq!(handled.reply.title, "\"send\" needs the operator role; you have viewer");
    assert!(handled.failed && handled.reply.ephemeral);
    assert_eq!(s.published(), 0);
    assert_eq!(s.audit(), [("slack:UVIEW".into(), "send nova hello".into(), "denied".into())]);
}

#[tokio::test]
async fn terminal_only_commands_are_refused_in_chat_even_to_a_director() {
    let s = setup();
    let backup = Command::Backup { dir: "/tmp/b".into() };
    let handled = s.engine.handle_command(slack("UDIR", "backup /tmp/b"), backup.clone()).await;
    assert_eq!(handled.reply.title, "backup runs only in a terminal on the host: mesh backup <dir>");
    let handled = s.engine.handle(slack("UDIR", "backup /tmp/b")).await;
    assert!(handled.reply.title.contains("runs only in a terminal"), "{}", handled.reply.title);
    let decisions: Vec<String> = s.audit().into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(decisions, ["denied", "invalid"]);
    // The same row from the terminal runs, as the terminal's role allows.
    let restart = Command::Restart { agent: id("nova") };
    let handled = s.engine.handle_command(Request::terminal(&restart, "cli:ops"), restart).await;
    assert_eq!(handled.reply.title, "restarted listener-nova");
    assert_eq!(*s.containers.calls.lock().unwrap(), ["restart"]);
}

#[tokio::test]
async fn the_terminal_role_comes_from_the_permissions() {
    let mut s = setup();
    s.engine.config.permissions = permissions().with_terminal_role(Role::Viewer);
    let send = Command::Send { agent: id("nova"), text: "hi".into(), priority: Default::default(), ttl: None };
    let handled = s.engine.handle_command(Request::terminal(&send, "cli:ops"), send).await;
    assert_eq!(handled.reply.title, "\"send\" needs the operator role; you have viewer");
    assert_eq!(s.published(), 0);
    assert_eq!(s.audit(), [("terminal".into(), "send nova hi".into(), "denied".into())]);
}

#[tokio::test]
async fn rate_limits_refuse_and_audit_the_command_over_the_limit() {
    let minute = Duration::from_secs(60);
    let config = LimitsConfig {
        rates: RateLimits { message: Limit { max: 1, window: minute }, ..RateLimits::default() },
        ..LimitsConfig::default()
    };
    let limits = LimitStore::new(config, None, Arc::new(ManualClock::new()));
    let s = setup_with(limits, false);
    assert_eq!(s.engine.handle(slack("UOP", "send nova one")).await.reply.tone, Tone::Ok);
    let second = s.engine.handle(slack("UOP", "send nova two")).await;
    assert!(second.reply.title.starts_with("rate limit: 1 message command per minute"), "{}", second.reply.title);
    assert_eq!(s.published(), 1);
    // Another user has an allowance of their own.
    assert_eq!(s.engine.handle(slack("UADMIN", "send nova three")).await.reply.tone, Tone::Ok);
    let decisions: Vec<String> = s.audit().into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(decisions, ["allowed", "limited", "allowed"]);
}

#[tokio::test]
async fn retries_of_one_platform_request_are_seen_once() {
    let s = setup();
    assert!(s.engine.limits().seen_once("slack:retry-1").await);
    assert!(!s.engine.limits().seen_once("slack:retry-1").await);
    assert!(s.engine.limits().seen_once("slack:retry-2").await);
}

#[tokio::test]
async fn a_dangerous_command_waits_for_its_code_from_the_same_person() {
    let s = setup();
    let asked = s.engine.handle(slack("UADMIN", "kill hard nova leak")).await;
    let code = asked.confirmation_code.clone().unwrap();
    assert_eq!(asked.reply.tone, Tone::Warn);
    assert!(s.mesh.state().kill.is_empty(), "nothing is pulled before the confirm");
    let stranger = s.engine.handle(slack("UDIR", &format!("confirm {code}"))).await;
    assert!(stranger.reply.title.contains("was asked for by someone else"), "{}", stranger.reply.title);
    let done = s.engine.handle(slack("UADMIN", &format!("confirm {code}"))).await;
    assert!(done.reply.title.starts_with("kill switch: agent nova: HARD by slack:UADMIN"), "{}", done.reply.title);
    assert_eq!(s.mesh.state().kill.len(), 1);
    let again = s.engine.handle(slack("UADMIN", &format!("confirm {code}"))).await;
    assert!(again.reply.title.starts_with("no action is waiting for code"), "{}", again.reply.title);
    let decisions: Vec<String> = s.audit().into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(decisions, ["confirmation required", "denied", "allowed", "denied"]);
}

#[tokio::test]
async fn an_expired_code_runs_nothing() {
    let s = setup();
    let code = s.engine.handle(slack("UADMIN", "kill hard")).await.confirmation_code.unwrap();
    s.advance(time::Duration::seconds(61));
    let late = s.engine.handle(slack("UADMIN", &format!("confirm {code}"))).await;
    assert!(late.reply.title.contains("expired 1s ago"), "{}", late.reply.title);
    assert!(s.mesh.state().kill.is_empty());
    assert!(s.containers.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_two_person_rule_needs_a_second_director() {
    let s = setup_with(LimitStore::memory(), true);
    let asked = s.engine.handle(slack("UDIR", "kill nuclear")).await;
    assert!(asked.reply.title.starts_with("two-person rule: another director must type"), "{}", asked.reply.title);
    let code = asked.confirmation_code.unwrap();
    let same = s.engine.handle(slack("UDIR", &format!("confirm {code}"))).await;
    assert!(same.reply.title.contains("must be confirmed by a different director"), "{}", same.reply.title);
    let admin = s.engine.handle(slack("UADMIN", &format!("confirm {code}"))).await;
    assert_eq!(admin.reply.tone, Tone::Error, "{}", admin.reply.title);
    assert!(s.containers.calls.lock().unwrap().is_empty());
    let second = s.engine.handle(slack("UDIR2", &format!("confirm {code}"))).await;
    assert!(second.reply.title.contains("NUCLEAR by slack:UDIR2"), "{}", second.reply.title);
    assert_eq!(*s.containers.calls.lock().unwrap(), ["nuclear"]);
}

/// Issue 21.5: a nuclear kill takes NATS (and with --purge its data) away, so
/// its audit record is stored before the kill is written or anything removed.
#[tokio::test]
async fn a_nuclear_kill_is_audited_before_its_side_effects() {
    let s = setup();
    let asked = s.engine.handle(slack("UDIR", "kill nuclear --purge")).await;
    let code = asked.confirmation_code.unwrap();
    let done = s.engine.handle(slack("UDIR", &format!("confirm {code}"))).await;
    assert!(done.reply.title.contains("NUCLEAR by slack:UDIR"), "{}", done.reply.title);
    let before = s.mesh.state().audited_before_kill.clone();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].last().map(String::as_str), Some("starting: kill nuclear --purge"), "{before:?}");
    let outcomes: Vec<String> = s.mesh.state().audit.iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(outcomes.len(), 3, "asked, starting, done: {outcomes:?}");
}

#[tokio::test]
async fn an_error_is_audited_and_a_lost_audit_record_is_reported() {
    let s = setup();
    let handled = s.engine.handle(slack("UOP", "send nvoa hi")).await;
    assert_eq!(handled.reply.tone, Tone::Error);
    assert!(handled.reply.title.contains("did you mean \"nova\""), "{}", handled.reply.title);
    assert!(handled.failed);
    let record = s.mesh.state().audit[0].clone();
    assert_eq!((record.decision.as_str(), record.outcome.as_str()), ("allowed", handled.reply.title.as_str()));
    s.mesh.state().audit_fails = true;
    let handled = s.engine.handle(slack("UOP", "send nova hi")).await;
    assert_eq!(handled.reply.tone, Tone::Ok, "the command still ran");
    assert_eq!(handled.audit_error.as_deref(), Some("audit stream unavailable"));
}

#[tokio::test]
async fn without_a_mesh_local_commands_run_and_say_the_audit_was_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("new").join("tokens.json");
    let config = EngineConfig {
        registry_path: registry_path.clone(),
        permissions: Permissions::new(),
        confirm: ConfirmConfig::default(),
        ask_timeout: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(10),
        ..EngineConfig::new(std::path::PathBuf::new(), Permissions::new())
    };
    let engine = Engine::offline(config, "cannot reach NATS".into(), LimitStore::memory());
    let add = Command::AgentsAdd {
        agent: crate::command::grammar::NewAgent {
            id: "nova".into(),
            hooks_url: "http://nova:7002/hooks/wake".into(),
            hooks_token: "env:MESH_TOKEN_NOVA_HOOK".into(),
            ..Default::default()
        },
        check: false,
    };
    // Adding needs NATS (a consumer left over from an earlier nova goes first): refused, nothing written.
    let handled = engine.handle_command(Request::terminal(&add, "cli:ops"), add.clone()).await;
    assert!(handled.reply.title.starts_with("nova not added"), "{}", handled.reply.title);
    assert!(!registry_path.exists());
    crate::agents::change(&registry_path, &Default::default(), &add).unwrap();
    let rotate = Command::AgentsRotate {
        agent: "nova".into(),
        hooks_token: Some("env:MESH_TOKEN_NOVA_HOOK_2".into()),
        gateway_token: None,
        mesh_token: None,
        check: false,
    };
    let handled = engine.handle_command(Request::terminal(&rotate, "cli:ops"), rotate).await;
    assert_eq!(handled.reply.tone, Tone::Ok, "{}", handled.reply.title);
    assert_eq!(handled.audit_error.as_deref(), Some("cannot reach NATS"));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(registry_path.parent().unwrap()), mode(&registry_path)), (0o700, 0o600));
    let send = Command::Send { agent: id("nova"), text: "hi".into(), priority: Default::default(), ttl: None };
    let handled = engine.handle_command(Request::terminal(&send, "cli:ops"), send).await;
    assert_eq!(handled.reply.title, "cannot reach NATS");
}

#[tokio::test(start_paused = true)]
async fn the_answer_to_ask_follows_later_or_times_out() {
    let s = setup();
    let handled = s.engine.handle(slack("UOP", "ask ada what is 6 x 7?")).await;
    assert_eq!(handled.reply.title, "asked ada; the reply will follow");
    let follow_up = handled.follow_up.unwrap();
    let asked = s.mesh.state().published[0].clone();
    assert_eq!(asked.text, "what is 6 x 7?");
    let answer = Envelope::new("ada", Recipient::Sender("slack:UOP".into()), "42").unwrap();
    let waiting = tokio::spawn(follow_up);
    tokio::time::sleep(Duration::from_secs(10)).await;
    s.mesh.state().asked.take().unwrap().send(answer).unwrap();
    let reply = waiting.await.unwrap();
    assert_eq!(reply.title, "ada replied");
    assert_eq!(reply.sections, crate::command::Reply::info("").with_lines(None, ["42"]).sections);

    let handled = s.engine.handle(slack("UOP", "ask ada anyone there?")).await;
    let reply = handled.follow_up.unwrap().await;
    assert_eq!((reply.tone, reply.title.as_str()), (Tone::Warn, "ada did not reply within 30s"));
    // With a time to live, the silence may be an expiry: the reply says where to look.
    let handled = s.engine.handle(slack("UOP", "ask --ttl 5s ada anyone there?")).await;
    let reply = crate::command::render_text::render(&handled.follow_up.unwrap().await);
    assert!(reply.contains("time to live of 5s") && reply.contains("`mesh dlq ada` lists it as expired"), "{reply}");
    let refused = s.engine.handle(slack("UOP", "ask nova hi")).await;
    assert!(refused.reply.title.starts_with("ask needs an agent with \"delivery\": \"chat\""));
}

#[tokio::test]
async fn a_mesh_wide_hard_kill_stops_the_listeners_and_resume_starts_them() {
    let s = setup();
    let hard = Command::KillHard { agent: None, reason: None };
    let asked = s.engine.handle_command(Request::terminal(&hard, "cli:ops"), hard).await;
    let confirm = Command::Confirm { code: asked.confirmation_code.unwrap() };
    let done = s.engine.handle_command(Request::terminal(&confirm, "cli:ops"), confirm).await;
    assert!(done.reply.title.contains("HARD by terminal"), "{}", done.reply.title);
    let resume = Command::Resume { agent: None };
    let asked = s.engine.handle_command(Request::terminal(&resume, "cli:ops"), resume).await;
    assert_eq!(*s.containers.calls.lock().unwrap(), ["stop"], "asking runs nothing");
    let confirm = Command::Confirm { code: asked.confirmation_code.expect("ending a hard kill asks for a code") };
    let resumed = s.engine.handle_command(Request::terminal(&confirm, "cli:ops"), confirm).await;
    assert_eq!(resumed.reply.title, "resumed the whole mesh");
    assert_eq!(*s.containers.calls.lock().unwrap(), ["stop", "start"]);
}

/// Issue 15: `resume` from a hard kill asks for a confirmation as the kill
/// did (same code, same rules: only the asker confirms); from a soft pause,
/// which ends by itself anyway, it runs at once.
#[tokio::test]
async fn resume_from_a_hard_kill_asks_for_a_code_and_from_a_soft_one_does_not() {
    let s = setup();
    s.engine.handle(slack("UADMIN", "kill soft 10m nova")).await;
    let soft = s.engine.handle(slack("UADMIN", "resume nova")).await;
    assert!(soft.confirmation_code.is_none(), "{:?}", soft.reply);
    assert_eq!(soft.reply.title, "resumed agent nova");

    let hard = s.engine.handle(slack("UDIR", "kill hard nova")).await;
    let confirm = format!("confirm {}", hard.confirmation_code.unwrap());
    s.engine.handle(slack("UDIR", &confirm)).await;
    let asked = s.engine.handle(slack("UDIR", "resume nova")).await;
    let code = asked.confirmation_code.expect("ending a hard kill asks for a code");
    assert_eq!(asked.decision, "confirmation required");
    assert!(s.mesh.state().kill.contains_key(&Scope::Agent(id("nova")).key()), "nothing resumed yet");
    let stranger = s.engine.handle(slack("UDIR2", &format!("confirm {code}"))).await;
    assert_eq!(stranger.decision, "denied", "{:?}", stranger.reply);
    let resumed = s.engine.handle(slack("UDIR", &format!("confirm {code}"))).await;
    assert_eq!(resumed.reply.title, "resumed agent nova", "{:?}", resumed.reply);
    assert!(!s.mesh.state().kill.contains_key(&Scope::Agent(id("nova")).key()));
}

/// Review of issue 15: a resume confirmed (typed or by button) after the
/// kill was pulled again is refused: the code was given for another kill.
#[tokio::test]
async fn a_resume_confirmed_after_a_newer_kill_is_refused_typed_or_clicked() {
    // Six control commands by one director: above the default rate limit.
    let roomy = Limit { max: 100, window: Duration::from_secs(60) };
    let config =
        LimitsConfig { rates: RateLimits { control: roomy, ..RateLimits::default() }, ..LimitsConfig::default() };
    let s = setup_with(LimitStore::new(config, None, Arc::new(ManualClock::new())), false);
    let pull = async |who: &str| {
        let asked = s.engine.handle(slack(who, "kill hard")).await;
        s.engine.handle(slack(who, &format!("confirm {}", asked.confirmation_code.unwrap()))).await;
    };
    pull("UDIR").await;
    let typed = s.engine.handle(slack("UDIR", "resume")).await.confirmation_code.unwrap();
    let clicked = s.engine.handle(slack("UDIR", "resume")).await.confirmation_code.unwrap();
    s.advance(time::Duration::seconds(1));
    pull("UDIR2").await;
    let refused = s.engine.handle(slack("UDIR", &format!("confirm {typed}"))).await;
    assert!(refused.reply.title.contains("kill switch changed since the resume was asked for"), "{:?}", refused.reply);
    let click = s.engine.click(slack("UDIR", "(button)"), &format!("mesh:confirm:{clicked}")).await;
    let answer = click.answer.expect("a refusal is answered");
    assert!(answer.title.contains("kill switch changed since the resume was asked for"), "{answer:?}");
    assert_eq!(s.mesh.state().kill.get(&Scope::Global.key()).map(|k| k.by.clone()).as_deref(), Some("slack:UDIR2"));
}

#[tokio::test]
async fn a_replay_button_that_replayed_nothing_answers_an_error_saying_why() {
    let s = setup();
    let why = "payload does not decode to a message; inspect it and fix the sender";
    s.mesh.state().replay_one = Some(ReplayReport { skipped: vec![(7, why.into())], ..ReplayReport::default() });
    let click = s.engine.click(slack("UDIR", "(button)"), "mesh:replay:nova:7").await;
    let answer = click.answer.expect("a replay is answered");
    assert_eq!(answer.tone, Tone::Error, "{answer:?}");
    assert_eq!(answer.title, "dead letter 7 of nova was not replayed (it is kept)");
    let text = crate::command::render_text::render(&answer);
    assert!(text.contains(&format!("dead letter 7 skipped: {why}")), "{text}");
    // A publish that failed is not a replay either.
    let failed = "NATS unreachable; the dead letter is kept: replay it again";
    s.mesh.state().replay_one = Some(ReplayReport { failed: vec![(7, failed.into())], ..ReplayReport::default() });
    let click = s.engine.click(slack("UDIR", "(button)"), "mesh:replay:nova:7").await;
    assert_eq!(click.answer.expect("answered").tone, Tone::Error);
    // One replayed is ok.
    let replayed = ReplayReport { replayed: vec![(7, "id-1".into())], ..ReplayReport::default() };
    s.mesh.state().replay_one = Some(replayed);
    let click = s.engine.click(slack("UDIR", "(button)"), "mesh:replay:nova:7").await;
    let answer = click.answer.expect("answered");
    assert_eq!((answer.tone, answer.title.as_str()), (Tone::Ok, "replayed 1 dead letters of nova"));
}

#[tokio::test]
async fn a_failed_command_keeps_its_typed_cause_and_its_one_line_message() {
    use std::error::Error as _;
    let s = setup();
    let request = slack("UDIR", "send nvoa hi");
    let send =
        Command::Send { agent: id("nvoa"), text: "hi".into(), priority: mesh_protocol::Priority::Normal, ttl: None };
    let Err(e) = s.engine.execute(&request, Some(crate::command::Role::Director), send).await else {
        panic!("an unknown agent must fail")
    };
    assert!(matches!(e, CommandError::Send(publish::SendError::UnknownAgent { .. })), "{e:?}");
    assert!(e.to_string().starts_with("unknown agent \"nvoa\""), "{e}");

    // A registry that cannot be read: the I/O error stays reachable as the source.
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig::new(dir.path().to_owned(), permissions());
    let engine = Engine::with_mesh(config, Ok(Arc::new(FakeMesh::default())), LimitStore::memory());
    let Err(e) = engine.execute(&request, Some(crate::command::Role::Director), Command::Ping).await else {
        panic!("a directory is no registry")
    };
    assert!(matches!(e, CommandError::Registry(_)), "{e:?}");
    assert!(e.to_string().starts_with("cannot read registry"), "{e}");
    assert!(e.source().is_some_and(|cause| cause.is::<std::io::Error>()), "the cause is kept: {e:?}");
}

#[tokio::test]
async fn a_send_whose_ttl_ends_before_the_pause_says_it_will_expire() {
    let s = setup();
    s.engine.handle(slack("UADMIN", "kill soft 10m")).await;
    let short = crate::command::render_text::render(&s.engine.handle(slack("UOP", "send --ttl 2s nova x")).await.reply);
    assert!(short.contains("expires undelivered unless the pause ends before"), "{short}");
    let long = crate::command::render_text::render(&s.engine.handle(slack("UOP", "send --ttl 1h nova x")).await.reply);
    assert!(long.contains("queued and delivered when the pause ends"), "{long}");
}

#[tokio::test]
async fn a_kill_or_resume_the_server_did_not_apply_says_so_in_a_warning() {
    let s = setup();
    s.mesh.state().server_pause_failure = Some("pausing consumer agent-nova on the server: timed out".to_owned());
    let kill = s.engine.handle(slack("UADMIN", "kill soft 5m nova")).await.reply;
    assert_eq!(kill.tone, Tone::Warn);
    assert!(crate::command::render_text::render(&kill).contains("timed out"), "{kill:?}");
    let resume = s.engine.handle(slack("UADMIN", "resume nova")).await.reply;
    assert_eq!(resume.tone, Tone::Warn, "{resume:?}");
    assert_eq!(resume.title, "resumed agent nova in the kill switch; the server may still pause it");
    assert!(crate::command::render_text::render(&resume).contains("timed out"), "{resume:?}");
}

#[tokio::test]
async fn a_ttl_from_chat_or_the_broadcast_default_sets_the_expiry() {
    let mut s = setup();
    s.engine.handle(slack("UOP", "send --ttl 2s nova x")).await;
    s.engine.handle(slack("UOP", "ask --ttl 1m ada x")).await;
    s.engine.handle(slack("UOP", "broadcast x")).await;
    let ttls: Vec<_> = s.mesh.state().published.iter().map(|e| e.expires_at.map(|at| at - e.sent_at)).collect();
    assert_eq!(ttls, [Some(time::Duration::seconds(2)), Some(time::Duration::minutes(1)), None]);

    // With a default for broadcasts: a broadcast without --ttl takes it, --ttl overrides it, a send has none.
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("tokens.json");
    std::fs::write(&registry_path, REGISTRY).unwrap();
    let config = EngineConfig {
        registry_path,
        permissions: permissions(),
        confirm: ConfirmConfig::default(),
        ask_timeout: Duration::from_secs(30),
        ping_timeout: Duration::from_millis(10),
        broadcast_ttl: Some(Duration::from_secs(300)),
        ..EngineConfig::new(std::path::PathBuf::new(), Permissions::new())
    };
    s.mesh = FakeMesh::default();
    s.engine = Engine::with_mesh(config, Ok(Arc::new(s.mesh.clone())), LimitStore::memory());
    for line in ["broadcast maintenance in 5 minutes", "broadcast --ttl 10s x", "send nova x"] {
        let handled = s.engine.handle(slack("UOP", line)).await;
        assert_eq!(handled.reply.tone, Tone::Ok, "{line}: {:?}", handled.reply);
    }
    let ttls: Vec<_> = s.mesh.state().published.iter().map(|e| e.expires_at.map(|at| at - e.sent_at)).collect();
    assert_eq!(ttls, [Some(time::Duration::minutes(5)), Some(time::Duration::seconds(10)), None]);
    let audit = s.audit();
    assert_eq!(audit[1].1, "broadcast --ttl 10s x", "the audit line carries the ttl");
}

#[tokio::test]
async fn status_shows_each_consumers_server_side_pause_or_that_the_server_is_too_old() {
    use mesh_runtime::server_pause::{ConsumerPause, Support};
    let s = setup();
    let paused = |agent: &str, until| ConsumerPause { agent: id(agent), until };
    s.mesh.state().server_pauses = Some(crate::mesh::ServerPauses::Consumers(vec![
        paused("ada", Some(mesh_protocol::killswitch::PAUSED_UNTIL_RESUMED)),
        paused("nova", None),
    ]));
    let text = crate::command::render_text::render(&s.engine.handle(slack("UOP", "status")).await.reply);
    assert!(text.contains("server-side pause"), "{text}");
    assert!(text.contains("agent-ada: paused until resumed") && text.contains("agent-nova: not paused"), "{text}");
    // ada is paused on the server with no entry in force: flagged, in a warning tone.
    let reply = s.engine.handle(slack("UOP", "status")).await.reply;
    assert_eq!(reply.tone, Tone::Warn);
    assert!(text.contains("mismatch: agent-ada is paused on the server but no kill switch entry"), "{text}");

    let warning = Support::of_version("2.10.22").warning().unwrap();
    s.mesh.state().server_pauses = Some(crate::mesh::ServerPauses::TooOld(warning.clone()));
    let reply = s.engine.handle(slack("UOP", "status")).await.reply;
    assert_eq!(reply.tone, Tone::Warn);
    assert!(crate::command::render_text::render(&reply).contains(&warning));
}
