//! Pulling and releasing the kill switch: entries in the JetStream bucket that
//! every listener follows, plus an event for the chat channels. Listeners
//! enforce it (they stop pulling), and so does nats-server 2.11 or later:
//! every change pauses or resumes the agent consumers it covers on the
//! server (`mesh_runtime::server_pause`), so no client can pull from them
//! either; a soft kill ends at its deadline even when nothing else runs.
//!
//! The replacement rule: a pull or a release overwrites the entry of its scope,
//! so it is allowed only to someone who may resume from the entry in force
//! there (a soft pause: admin; a hard or nuclear kill: director). Scopes do
//! not replace each other: the pause in force for an agent is the harder of
//! the global entry and its own, so an agent's entry can neither lift nor
//! shorten a global kill, and a global entry leaves agents' entries alone.
//! The check and the write are one revision-checked update of the bucket, so
//! a kill pulled meanwhile is never overwritten unseen.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use mesh_protocol::event::{Event, EventKind};
use mesh_protocol::killswitch::{self, KillState, Mode, Scope};
use mesh_protocol::{AgentId, layout};
use time::OffsetDateTime;

use crate::command::{CommandKind, KillGrade, Role};

/// Errors reading or writing the switch.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error("cannot reach the kill switch bucket: {0}; check that nats-server runs with JetStream enabled (-js)")]
    Bucket(#[source] mesh_runtime::nats::Cause),
    #[error("cannot write the kill switch: {0}")]
    Write(#[source] mesh_runtime::nats::Cause),
    #[error("a soft kill lasts between 1 second and 24 hours, not {0:?}")]
    BadDuration(Duration),
    /// The entry in force may only be replaced or lifted by a higher role.
    #[error(
        "{} is in force; replacing or lifting it needs the {needed} role; you have {}",
        describe(scope, state),
        have.map_or("no role", Role::as_str)
    )]
    Held {
        /// Its scope.
        scope: Scope,
        /// The entry in force.
        state: Box<KillState>,
        /// The role that may replace it.
        needed: Role,
        /// The role of whoever tried.
        have: Option<Role>,
    },
    #[error("the kill switch of {0} kept changing while this command ran; run it again")]
    Contended(Scope),
}

/// Who changes the switch: the name recorded in the entry, and the role they act with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor<'a> {
    /// Recorded as `by` (`slack:U123`, `terminal`, `cli:ops`).
    pub by: &'a str,
    /// The role they act with; it decides which entry in force they may replace.
    pub role: Option<Role>,
}

impl<'a> Actor<'a> {
    /// Someone acting with `role`.
    pub fn new(by: &'a str, role: Option<Role>) -> Self {
        Self { by, role }
    }

    /// A director (tests, and tools run by whoever owns the host).
    pub fn director(by: &'a str) -> Self {
        Self::new(by, Some(Role::Director))
    }
}

/// The grade of a kill switch mode (`None` for not pulled).
pub fn grade(mode: Mode) -> Option<KillGrade> {
    match mode {
        Mode::None => None,
        Mode::Soft => Some(KillGrade::Soft),
        Mode::Hard => Some(KillGrade::Hard),
        Mode::Nuclear => Some(KillGrade::Nuclear),
    }
}

/// The lowest role that may replace or lift `state` at `now` (`None` when it
/// is not in force): the role `resume` needs while it is in force, from the
/// command table, so the two rules cannot drift.
pub fn role_to_replace(state: &KillState, now: OffsetDateTime) -> Option<Role> {
    if !state.in_force(now) {
        return None;
    }
    CommandKind::Resume.spec().access.required(grade(state.mode))
}

/// How long a revision-checked write keeps retrying while the entry changes
/// in between (others pulling or releasing the same scope at once).
const CONTENDED_FOR: Duration = Duration::from_secs(5);

/// The wait before retry `attempt` (0-based) of a contended write: doubling
/// from 10 ms up to 400 ms, each a random 50 to 100 % of that, so writers
/// that collided do not collide again in step.
fn retry_delay(attempt: u32, jitter: f64) -> Duration {
    let ceiling = Duration::from_millis(10).saturating_mul(1 << attempt.min(6)).min(Duration::from_millis(400));
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Longest the server-side resume before a release's write may take: the
/// release is written after it whatever happened (and applied again after
/// the write), so a cluster in turbulence delays a `mesh resume` by at most
/// this much before the entry changes.
pub const BEFORE_WRITE_BOUND: Duration = Duration::from_secs(5);

/// An entry written, and how the server-side pause fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The entry written.
    pub state: KillState,
    /// Its revision in the bucket.
    pub revision: u64,
    /// Why the consumers' server-side pause may not match the entry (the
    /// entry is written and the listeners follow it), for the reply; `None`
    /// when the server applied it, or cannot pause consumers (older than 2.11).
    pub server: Option<String>,
}

/// The kill switch of one mesh.
#[derive(Debug, Clone)]
pub struct KillSwitch {
    store: kv::Store,
    js: jetstream::Context,
}

/// Longest soft kill.
pub const MAX_SOFT: Duration = Duration::from_secs(24 * 3600);

impl KillSwitch {
    /// Opens the bucket (creating it when missing) with the default replicas
    /// setting (auto); the engine uses [`KillSwitch::open_with`] and the configured one.
    pub async fn open(js: &jetstream::Context) -> Result<Self, KillSwitchError> {
        Self::open_with(js, mesh_protocol::layout::Replicas::Auto).await
    }

    /// Opens the bucket (creating it when missing, scaled up to `replicas`).
    pub async fn open_with(
        js: &jetstream::Context,
        replicas: mesh_protocol::layout::Replicas,
    ) -> Result<Self, KillSwitchError> {
        let store =
            mesh_runtime::kill_bucket::open(js, replicas).await.map_err(|e| KillSwitchError::Bucket(e.into()))?;
        Ok(Self { store, js: js.clone() })
    }

    /// Pulls the switch for `scope`, replacing the entry there only if `actor`
    /// may resume from it (see the module docs).
    pub async fn pull(
        &self,
        scope: &Scope,
        mode: Mode,
        duration: Option<Duration>,
        actor: Actor<'_>,
        reason: Option<String>,
    ) -> Result<KillState, KillSwitchError> {
        self.pull_revision(scope, mode, duration, actor, reason).await.map(|written| written.state)
    }

    /// Like [`KillSwitch::pull`], also returning the revision written and any
    /// server-side failure.
    pub async fn pull_revision(
        &self,
        scope: &Scope,
        mode: Mode,
        duration: Option<Duration>,
        actor: Actor<'_>,
        reason: Option<String>,
    ) -> Result<Written, KillSwitchError> {
        let now = OffsetDateTime::now_utc();
        let until = match mode {
            Mode::Soft => {
                let d = duration.unwrap_or(killswitch::DEFAULT_SOFT);
                if d.is_zero() || d > MAX_SOFT {
                    return Err(KillSwitchError::BadDuration(d));
                }
                Some(now + d)
            }
            _ => None,
        };
        let state = KillState { mode, until, by: actor.by.to_owned(), reason, at: now };
        let (revision, server) = self.replace(scope, &state, actor.role, None).await?;
        Ok(Written { state, revision, server })
    }

    /// Releases the switch for `scope` (records who released it), if `actor`
    /// may resume from the entry in force there.
    pub async fn release(&self, scope: &Scope, actor: Actor<'_>) -> Result<(), KillSwitchError> {
        self.release_reporting(scope, actor).await.map(|_| ())
    }

    /// Like [`KillSwitch::release`], returning why the consumers may still be
    /// paused on the server (see [`Written::server`]).
    pub async fn release_reporting(&self, scope: &Scope, actor: Actor<'_>) -> Result<Option<String>, KillSwitchError> {
        let state = released(actor.by);
        self.replace(scope, &state, actor.role, None).await.map(|(_, server)| server)
    }

    /// Releases the entry written at `revision`, and only that one: when the
    /// entry changed since (someone pulled a harder kill meanwhile), nothing
    /// is written and the entry now there is returned.
    pub async fn release_written(
        &self,
        scope: &Scope,
        by: &str,
        revision: u64,
    ) -> Result<Option<KillState>, KillSwitchError> {
        let state = released(by);
        match self.replace(scope, &state, None, Some(revision)).await {
            Ok(_) => Ok(None),
            Err(KillSwitchError::Held { state, .. }) => Ok(Some(*state)),
            Err(e) => Err(e),
        }
    }

    /// Writes `state` at `scope` with a revision-checked update: the entry
    /// read is the entry replaced. With `only` set, only that revision may be
    /// replaced; otherwise an entry in force only by someone holding the role
    /// that may resume from it. Returns the revision written and why the
    /// server-side pause may not match it.
    ///
    /// Order: a kill is written first and then applied to the server, so it
    /// holds (the listeners stop) however long the server takes, and a crash
    /// in between leaves an entry that the bot's provisioning applies, never a
    /// paused consumer without an entry. A release resumes the server first
    /// (bounded by [`BEFORE_WRITE_BOUND`]), so a listener resuming on the new
    /// entry does not pull from a still-paused consumer (nats-server leaves such
    /// a pull waiting until it expires), then writes, then applies again.
    async fn replace(
        &self,
        scope: &Scope,
        state: &KillState,
        role: Option<Role>,
        only: Option<u64>,
    ) -> Result<(u64, Option<String>), KillSwitchError> {
        let mut applied = false;
        let written = self.replace_entry(scope, state, role, only, &mut applied).await;
        if !applied {
            return written.map(|revision| (revision, None));
        }
        // Written: from the entry written (a read right after the write may be
        // answered by a replica that has not got it yet, on a cluster);
        // otherwise from what the bucket holds now.
        let planned = written.is_ok().then_some(state);
        let server = self.enforce(scope, planned).await.err();
        written.map(|revision| (revision, server))
    }

    /// The revision-checked write of [`KillSwitch::replace`]; sets `applied`
    /// once the entry about to be written was applied to the server.
    async fn replace_entry(
        &self,
        scope: &Scope,
        state: &KillState,
        role: Option<Role>,
        only: Option<u64>,
        applied: &mut bool,
    ) -> Result<u64, KillSwitchError> {
        let key = scope.key();
        let give_up = tokio::time::Instant::now() + CONTENDED_FOR;
        for attempt in 0.. {
            if attempt > 0 {
                let delay = retry_delay(attempt - 1, fastrand::f64());
                if tokio::time::Instant::now() + delay > give_up {
                    break;
                }
                tokio::time::sleep(delay).await;
            }
            let entry = self.store.entry(key.as_str()).await.map_err(|e| KillSwitchError::Bucket(e.into()))?;
            let (revision, current) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    // An entry nobody can read is treated as a hard kill: fail closed.
                    let current = KillState::decode(&entry.value).unwrap_or_else(|_| unreadable());
                    (entry.revision, Some(current))
                }
                Some(entry) => (entry.revision, None),
                None => (0, None),
            };
            let now = OffsetDateTime::now_utc();
            if let Some(current) = current {
                let changed = only.is_some_and(|r| r != revision);
                let needed = role_to_replace(&current, now);
                let refused = match only {
                    Some(_) => changed && needed.is_some(),
                    None => needed.is_some_and(|needed| role < Some(needed)),
                };
                if refused {
                    return Err(KillSwitchError::Held {
                        scope: scope.clone(),
                        state: Box::new(current),
                        needed: needed.unwrap_or(Role::Director),
                        have: role,
                    });
                }
                if changed {
                    // Changed, but nothing in force there now: nothing to release.
                    return Ok(revision);
                }
            }
            // Allowed. A release resumes the server first (bounded), so listeners
            // resuming on the entry find their consumers resumed; a kill is
            // written first (see `replace`).
            if state.mode == Mode::None {
                let resumed = tokio::time::timeout(BEFORE_WRITE_BOUND, self.enforce(scope, Some(state))).await;
                if resumed.is_err() {
                    tracing::warn!(scope = %scope, bound_s = BEFORE_WRITE_BOUND.as_secs(), "resuming the consumers on the server takes long; writing the release first");
                }
            }
            *applied = true;
            match self.store.update(key.as_str(), state.encode().into(), revision).await {
                Ok(written) => {
                    self.announce(scope, state).await;
                    return Ok(written);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(KillSwitchError::Write(e.into())),
            }
        }
        Err(KillSwitchError::Contended(scope.clone()))
    }

    /// Pauses or resumes the consumers `scope` covers on the server to match
    /// the entries in force, with `planned` in place of the entry of `scope`
    /// (`mesh_runtime::server_pause`). A failure is logged and returned as
    /// the warning for the reply: the entry is written and the listeners
    /// follow it; the bot's provisioning applies the server-side pause again
    /// within [`crate::provision::RECHECK_EVERY`].
    async fn enforce(&self, scope: &Scope, planned: Option<&KillState>) -> Result<(), String> {
        let only = match scope {
            Scope::Global => None,
            Scope::Agent(id) => Some(id),
        };
        let planned = planned.map(|state| (scope, state));
        mesh_runtime::server_pause::sync_planned(&self.js, only, planned).await.map(|_| ()).map_err(|e| {
            tracing::warn!(scope = %scope, error = %e, "cannot apply the kill switch on the server; the listeners' pause holds");
            format!(
                "the server-side pause of {scope} was not applied ({e}); the listeners follow the kill switch, and \
                 the bot (`mesh bot`) applies it again within 30 s; `mesh status` shows each consumer's pause"
            )
        })
    }

    async fn announce(&self, scope: &Scope, state: &KillState) {
        let text = match state.mode {
            Mode::None => format!("kill switch released for {scope} by {}", state.by),
            _ => format!("{PULLED_EVENT}: {}", describe(scope, state)),
        };
        let event = match scope {
            Scope::Agent(id) => Event::now(EventKind::Killswitch, text).about(id.to_string()),
            Scope::Global => Event::now(EventKind::Killswitch, text),
        };
        crate::events::publish(&self.js, &event).await;
    }

    /// Adds `names` to the listener containers a kill stopped (see
    /// [`killswitch::DOCKER_STOPPED_KEY`]); a second kill that found them
    /// stopped already keeps the first one's record.
    pub async fn record_stopped(&self, names: &[String]) -> Result<(), KillSwitchError> {
        let mut all = self.stopped().await?;
        all.extend(names.iter().cloned());
        all.sort();
        all.dedup();
        let value = serde_json::to_vec(&all).map_err(|e| KillSwitchError::Write(e.into()))?;
        self.store
            .put(killswitch::DOCKER_STOPPED_KEY, value.into())
            .await
            .map_err(|e| KillSwitchError::Write(e.into()))?;
        Ok(())
    }

    /// The listener containers recorded as stopped by a kill (none when no record).
    pub async fn stopped(&self) -> Result<Vec<String>, KillSwitchError> {
        match self.store.get(killswitch::DOCKER_STOPPED_KEY).await {
            Ok(Some(bytes)) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(KillSwitchError::Bucket(e.into())),
        }
    }

    /// Forgets the record of stopped containers (they were started again).
    pub async fn clear_stopped(&self) -> Result<(), KillSwitchError> {
        self.store.purge(killswitch::DOCKER_STOPPED_KEY).await.map_err(|e| KillSwitchError::Write(e.into()))
    }

    /// The entry of one scope, if any. An entry that cannot be decoded is a
    /// hard kill, as the listeners read it (fail closed): resuming from it
    /// needs a director and a confirmation, and an agent under it cannot send.
    pub async fn get(&self, scope: &Scope) -> Result<Option<KillState>, KillSwitchError> {
        match self.store.get(scope.key()).await {
            Ok(Some(bytes)) if bytes.is_empty() => Ok(None),
            Ok(Some(bytes)) => Ok(Some(KillState::decode(&bytes).unwrap_or_else(|e| KillState {
                mode: Mode::Hard,
                until: None,
                by: "unreadable entry".to_owned(),
                reason: Some(format!("unreadable kill switch entry ({e}); listeners pause until it is overwritten")),
                at: OffsetDateTime::UNIX_EPOCH,
            }))),
            Ok(None) => Ok(None),
            Err(e) => Err(KillSwitchError::Bucket(e.into())),
        }
    }

    /// Every entry in force now.
    pub async fn in_force(&self) -> Result<Vec<(Scope, KillState)>, KillSwitchError> {
        let now = OffsetDateTime::now_utc();
        let mut keys = self.store.keys().await.map_err(|e| KillSwitchError::Bucket(e.into()))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| KillSwitchError::Bucket(e.into()))?;
            let Some(scope) = Scope::from_key(&key) else { continue };
            if let Some(state) = self.get(&scope).await?
                && state.in_force(now)
            {
                out.push((scope, state));
            }
        }
        Ok(out)
    }

    /// The pause in force for an agent (or, with `None`, the global one).
    pub async fn effective(&self, agent: Option<&AgentId>) -> Result<Option<KillState>, KillSwitchError> {
        let global = self.get(&Scope::Global).await?;
        let own = match agent {
            Some(id) => self.get(&Scope::Agent(id.clone())).await?,
            None => None,
        };
        Ok(killswitch::effective(global.as_ref(), own.as_ref(), OffsetDateTime::now_utc()).cloned())
    }
}

/// The agent consumers whose server-side pause does not match the kill switch
/// entries in force (`kills`), one line each saying what to do: a consumer
/// paused with no entry behind it (a crash between the two, a hand-made
/// pause), or an entry the server does not hold (a failed pause, a consumer
/// created unpaused). Deadlines compare to the second.
pub fn pause_mismatches(
    kills: &[(Scope, KillState)],
    consumers: &[mesh_runtime::server_pause::ConsumerPause],
    now: OffsetDateTime,
) -> Vec<String> {
    let find = |scope: &Scope| kills.iter().find(|(s, _)| s == scope).map(|(_, state)| state);
    let global = find(&Scope::Global);
    let seconds = |t: Option<OffsetDateTime>| t.map(OffsetDateTime::unix_timestamp);
    consumers
        .iter()
        .filter_map(|consumer| {
            let own = find(&Scope::Agent(consumer.agent.clone()));
            let want = killswitch::server_pause_until(killswitch::effective(global, own, now));
            if seconds(want) == seconds(consumer.until) {
                return None;
            }
            let id = &consumer.agent;
            Some(match want {
                None => format!(
                    "mismatch: agent-{id} is paused on the server but no kill switch entry is in force for it; \
                     `mesh resume --agent {id}` lifts it (the bot also does within 30 s)"
                ),
                Some(_) => format!(
                    "mismatch: the kill switch pauses {id} but its consumer is {} on the server; \
                     the bot (`mesh bot`) applies it within 30 s, or pull the kill again",
                    consumer.describe().trim_start_matches(&format!("agent-{id}: "))
                ),
            })
        })
        .collect()
}

/// The entry a release writes.
fn released(by: &str) -> KillState {
    KillState { mode: Mode::None, until: None, by: by.to_owned(), reason: None, at: OffsetDateTime::now_utc() }
}

/// What an entry that does not decode counts as.
fn unreadable() -> KillState {
    KillState {
        mode: Mode::Hard,
        until: None,
        by: "unknown".to_owned(),
        reason: Some("unreadable kill switch entry".to_owned()),
        at: OffsetDateTime::now_utc(),
    }
}

/// A one-line description of a pause, for replies.
pub fn describe(scope: &Scope, state: &KillState) -> String {
    let reason = state.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    match (state.mode, state.until) {
        (Mode::Soft, Some(until)) => format!("{scope}: SOFT pause by {} until {}{reason}", state.by, rfc3339(until)),
        (mode, _) => {
            format!("{scope}: {} by {} until a director resumes{reason}", mode.as_str().to_uppercase(), state.by)
        }
    }
}

/// How the event of a pulled kill switch starts (its notification gets a Resume button).
pub const PULLED_EVENT: &str = "kill switch pulled";

/// A timestamp as RFC 3339 (seconds).
pub fn rfc3339(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Stream name of the events relayed to chat.
pub fn events_stream() -> &'static str {
    layout::events_stream(1).name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contended_writes_back_off_with_jitter_within_bounds() {
        assert_eq!(retry_delay(0, 1.0), Duration::from_millis(10));
        assert_eq!(retry_delay(0, 0.0), Duration::from_millis(5));
        assert_eq!(retry_delay(3, 1.0), Duration::from_millis(80));
        assert_eq!(retry_delay(30, 1.0), Duration::from_millis(400));
        assert_eq!(retry_delay(30, 7.0), Duration::from_millis(400), "jitter is clamped");
        let total: Duration = (0..20).map(|a| retry_delay(a, 1.0)).sum();
        assert!(total > CONTENDED_FOR, "the deadline, not the attempt count, ends the retries");
    }

    #[test]
    fn consumers_paused_otherwise_than_the_entries_are_flagged() {
        use mesh_runtime::server_pause::ConsumerPause;
        let now = OffsetDateTime::now_utc();
        let id = |s: &str| AgentId::parse(s).unwrap();
        let pause = |agent: &str, until| ConsumerPause { agent: id(agent), until };
        let kill = |mode, until| KillState { mode, until, by: "t".into(), reason: None, at: now };
        let soft_until = (now + Duration::from_secs(300)).replace_nanosecond(0).unwrap();
        let kills = vec![
            (Scope::Agent(id("hard")), kill(Mode::Hard, None)),
            (Scope::Agent(id("soft")), kill(Mode::Soft, Some(soft_until))),
        ];
        let consumers = vec![
            pause("hard", Some(killswitch::PAUSED_UNTIL_RESUMED)),
            pause("soft", Some(soft_until + Duration::from_millis(1))),
            pause("free", None),
            pause("orphan", Some(killswitch::PAUSED_UNTIL_RESUMED)),
        ];
        let lines = pause_mismatches(&kills, &consumers, now);
        assert_eq!(
            lines,
            [
                "mismatch: agent-orphan is paused on the server but no kill switch entry is in force for it; `mesh resume --agent orphan` lifts it (the bot also does within 30 s)"
            ]
        );
        let unpaused = vec![pause("hard", None)];
        let lines = pause_mismatches(&kills, &unpaused, now);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("pauses hard but its consumer is not paused on the server"), "{lines:?}");
        // A global hard kill covers every consumer.
        let global = vec![(Scope::Global, kill(Mode::Hard, None))];
        assert_eq!(pause_mismatches(&global, &consumers[2..], now).len(), 1, "free is not paused");
    }
}
