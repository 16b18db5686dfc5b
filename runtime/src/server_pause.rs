//! The kill switch enforced by nats-server itself: each agent consumer's
//! `pause_until` (NATS 2.11's consumer pause, `$JS.API.CONSUMER.PAUSE`)
//! follows the pause in force for that agent, so no client holding the
//! consumer's rights (an old listener, a plain JetStream client) is handed a
//! message while the mesh is stopped. A soft pause's deadline is the server's
//! `pause_until`, so it lifts by itself; a hard or nuclear kill pauses until
//! [`PAUSED_UNTIL_RESUMED`], lifted by `mesh resume`. The listeners' own
//! pause stays (defence in depth), and is all there is on an older server.

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use mesh_protocol::AgentId;
use mesh_protocol::killswitch::{self, BUCKET, KillState, Mode, PAUSED_UNTIL_RESUMED, Scope};
use mesh_protocol::layout::{self, ConsumerTuning};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::backoff;
use crate::nats::NatsError;

/// The first nats-server version that pauses consumers.
pub const MIN_VERSION: (u64, u64) = (2, 11);

/// Whether the connected server can enforce the kill switch itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// 2.11 or later: agent consumers are paused on the server.
    Enforced,
    /// An older (or unrecognised) version: the listeners' pause alone.
    TooOld(String),
}

impl Support {
    /// What a server of `version` (its `INFO`'s `version`, `2.11.3`, `v2.10.22-beta`) can do.
    pub fn of_version(version: &str) -> Self {
        match crate::nats::major_minor(version) {
            Some(release) if release >= MIN_VERSION => Self::Enforced,
            _ => Self::TooOld(version.to_owned()),
        }
    }

    /// What the server `client` is connected to can do.
    pub fn of(client: &async_nats::Client) -> Self {
        Self::of_version(&client.server_info().version)
    }

    /// The warning for an older server, `None` when the server enforces pauses.
    pub fn warning(&self) -> Option<String> {
        match self {
            Self::Enforced => None,
            Self::TooOld(version) => Some(format!(
                "nats-server {version} cannot pause consumers (2.11 or later can): the kill switch is enforced by the \
                 listeners alone; upgrade nats-server so the server holds paused agents' messages itself"
            )),
        }
    }
}

/// An entry nobody can read counts as a hard kill (fail closed, as in the listeners).
fn decode(bytes: &[u8]) -> KillState {
    KillState::decode(bytes).unwrap_or_else(|_| KillState {
        mode: Mode::Hard,
        until: None,
        by: "unknown".to_owned(),
        reason: Some("unreadable kill switch entry".to_owned()),
        at: OffsetDateTime::now_utc(),
    })
}

/// The kill switch bucket, `None` when it does not exist (nothing was ever pulled).
async fn bucket(js: &jetstream::Context) -> Result<Option<kv::Store>, NatsError> {
    match js.get_key_value(BUCKET).await {
        Ok(store) => Ok(Some(store)),
        Err(e)
            if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket && e.to_string().contains("not found") =>
        {
            Ok(None)
        }
        Err(e) => Err(NatsError::jetstream("opening the kill switch bucket", e)),
    }
}

async fn entry(store: &kv::Store, scope: &Scope) -> Result<Option<KillState>, NatsError> {
    match store.entry(scope.key()).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => Ok(Some(decode(&entry.value))),
        Ok(_) => Ok(None),
        Err(e) => Err(NatsError::jetstream(format!("reading kill switch entry {}", scope.key()), e)),
    }
}

/// An entry as the bucket stream's leader holds it (`STREAM.MSG.GET`, never
/// a replica's direct get); `None` when deleted, purged or never written.
async fn leader_entry(stream: &jetstream::stream::Stream<()>, scope: &Scope) -> Result<Option<KillState>, NatsError> {
    let subject = format!("$KV.{BUCKET}.{}", scope.key());
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => {
            let removed = message.headers.get(KV_OPERATION).is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            Ok(if removed { None } else { Some(decode(&message.payload)) })
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(NatsError::jetstream(format!("reading kill switch entry {}", scope.key()), e)),
    }
}

/// Header marking a key-value delete or purge.
const KV_OPERATION: &str = "KV-Operation";

/// The `pause_until` the consumer of `agent` should have now.
pub async fn wanted(js: &jetstream::Context, agent: &AgentId) -> Result<Option<OffsetDateTime>, NatsError> {
    let Some(store) = bucket(js).await? else { return Ok(None) };
    let global = entry(&store, &Scope::Global).await?;
    let own = entry(&store, &Scope::Agent(agent.clone())).await?;
    let now = OffsetDateTime::now_utc();
    Ok(killswitch::server_pause_until(killswitch::effective(global.as_ref(), own.as_ref(), now)))
}

/// The `pause_until` a consumer created now for `agent` starts with: the
/// pause in force for it, so an agent added during a kill starts paused.
/// `None` on an older server, or (logged) when the bucket cannot be read: the
/// listeners' pause still holds, and the bot's provisioning corrects it.
pub async fn for_new_consumer(js: &jetstream::Context, agent: &AgentId) -> Option<OffsetDateTime> {
    if Support::of(&js.client()) != Support::Enforced {
        return None;
    }
    match wanted(js, agent).await {
        Ok(until) => until,
        Err(e) => {
            warn!(agent = %agent, error = %e, "cannot read the kill switch; the new consumer starts unpaused on the server");
            None
        }
    }
}

/// Pauses the consumer of `agent` on the server until `until`, or resumes it (`None`).
pub async fn set(js: &jetstream::Context, agent: &AgentId, until: Option<OffsetDateTime>) -> Result<(), NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    let (stream, durable) = (&stream, spec.durable.as_str());
    // Idempotent (the same pause_until again): safe to retry.
    let done = backoff::retry(durable, backoff::JETSTREAM, move || async move {
        match until {
            Some(until) => stream.pause_consumer(durable, until).await,
            None => stream.resume_consumer(durable).await,
        }
    })
    .await;
    let what = if until.is_some() { "pausing" } else { "resuming" };
    done.map(|_| ()).map_err(|e| NatsError::jetstream(format!("{what} consumer {durable} on the server"), e))
}

/// One agent consumer's pause on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPause {
    /// The agent.
    pub agent: AgentId,
    /// Paused until then (`None`: not paused).
    pub until: Option<OffsetDateTime>,
}

impl ConsumerPause {
    /// `agent-nova: paused until resumed`, `... paused until <time>`, `... not paused`.
    pub fn describe(&self) -> String {
        let state = match self.until {
            None => "not paused".to_owned(),
            Some(until) if killswitch::until_resumed(until) => "paused until resumed".to_owned(),
            Some(until) => {
                let until = until.replace_nanosecond(0).unwrap_or(until);
                let until = until.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
                format!("paused until {until}")
            }
        };
        format!("agent-{}: {state}", self.agent)
    }
}

/// The server-side pause of every agent consumer, by agent.
pub async fn list(js: &jetstream::Context) -> Result<Vec<ConsumerPause>, NatsError> {
    let name = layout::agents_stream(1).name;
    let stream =
        js.get_stream_no_info(name).await.map_err(|e| NatsError::jetstream(format!("opening stream {name}"), e))?;
    let infos: Vec<_> = match stream.consumers().try_collect().await {
        Ok(infos) => infos,
        // No agents stream yet: no agent consumers either.
        Err(e) if e.to_string().contains("not found") => Vec::new(),
        Err(e) => return Err(NatsError::jetstream(format!("listing the consumers of {name}"), e)),
    };
    let mut out: Vec<ConsumerPause> = infos.iter().filter_map(pause_of).collect();
    out.sort_by(|a, b| a.agent.cmp(&b.agent));
    Ok(out)
}

/// The server-side pause of one agent's consumer, `None` when it has none.
async fn one(js: &jetstream::Context, agent: &AgentId) -> Result<Option<ConsumerPause>, NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    match stream.consumer_info(&spec.durable).await {
        Ok(info) => Ok(pause_of(&info)),
        Err(e) if e.to_string().contains("not found") => Ok(None),
        Err(e) => Err(NatsError::jetstream(format!("looking up consumer {}", spec.durable), e)),
    }
}

/// An agent consumer's pause as its info tells it (`None` for another consumer).
fn pause_of(info: &jetstream::consumer::Info) -> Option<ConsumerPause> {
    let agent = AgentId::parse(info.name.strip_prefix("agent-")?).ok()?;
    let now = OffsetDateTime::now_utc();
    let until = info.config.pause_until.filter(|until| info.paused && *until > now);
    Some(ConsumerPause { agent, until })
}

/// What [`sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    /// Consumers paused (or given a new deadline).
    pub paused: Vec<AgentId>,
    /// Consumers resumed.
    pub resumed: Vec<AgentId>,
}

/// Makes the server-side pause of the agent consumers (of `only`, or all of
/// them) match the kill switch as it is now. Reads the entries rather than
/// taking the one just written, so two writers applying out of order still
/// end on the entry in force. Nothing on an older server.
pub async fn sync(js: &jetstream::Context, only: Option<&AgentId>) -> Result<Synced, NatsError> {
    sync_planned(js, only, None).await
}

/// Like [`sync`], as if the entry of `planned`'s scope were already
/// `planned`'s state: the kill switch applies a change to the server just
/// before writing it, so a listener that resumes on the new entry pulls
/// from a consumer already resumed (nats-server does not serve a pull that
/// waited on a paused consumer when it is resumed; it would wait out its
/// expiry), and then [`sync`]s again from what was written.
///
/// Two writers at once: a slow set could land after the other writer's sync
/// (an agent soft on the server while a global hard kill is in force). So the
/// bucket's last revision is read before the entries and again after the
/// sets; when anything was written in between, the sync is done again (up to
/// [`SYNC_ROUNDS`] times, then the bot's next check puts it right).
pub async fn sync_planned(
    js: &jetstream::Context,
    only: Option<&AgentId>,
    planned: Option<(&Scope, &KillState)>,
) -> Result<Synced, NatsError> {
    let mut synced = Synced::default();
    if Support::of(&js.client()) != Support::Enforced {
        return Ok(synced);
    }
    for _ in 0..SYNC_ROUNDS {
        let before = bucket_revision(js).await?;
        let round = sync_round(js, only, planned).await?;
        synced.paused.extend(round.paused);
        synced.resumed.extend(round.resumed);
        if bucket_revision(js).await? == before {
            break;
        }
        info!("the kill switch changed while it was applied on the server; applying it again");
    }
    Ok(synced)
}

/// How many times [`sync_planned`] applies the bucket while it keeps changing.
pub const SYNC_ROUNDS: usize = 5;

/// The last revision written to the kill switch bucket (0: no bucket).
async fn bucket_revision(js: &jetstream::Context) -> Result<u64, NatsError> {
    let name = mesh_protocol::access::killswitch_stream();
    match js.get_stream(&name).await {
        Ok(stream) => Ok(stream.cached_info().state.last_sequence),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(0)
        }
        Err(e) => Err(NatsError::jetstream(format!("reading stream {name}"), e)),
    }
}

/// One pass of [`sync_planned`].
async fn sync_round(
    js: &jetstream::Context,
    only: Option<&AgentId>,
    planned: Option<(&Scope, &KillState)>,
) -> Result<Synced, NatsError> {
    let mut synced = Synced::default();
    // No bucket (never created, deleted, or a not-found answered while the
    // bucket's stream elects a leader): the consumers are left as they are.
    // Reading "no entries" from it would resume every consumer, hard kills
    // included; the next sync (a change, the bot's 30 s check) finds it again.
    let Some(store) = bucket(js).await? else {
        warn!("the kill switch bucket was not found; the consumers' server-side pause is left as it is");
        return Ok(synced);
    };
    // Entries are read from the bucket stream's leader: a direct get may be
    // answered by a replica that has not stored the write that woke this
    // sync, and the revision check below (the leader's) would not see it.
    let stream = js
        .get_stream_no_info(&store.stream_name)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", store.stream_name), e))?;
    let read = |scope: Scope| {
        let stream = stream.clone();
        async move {
            if let Some((planned_scope, state)) = planned
                && *planned_scope == scope
            {
                return Ok(Some(state.clone()));
            }
            leader_entry(&stream, &scope).await
        }
    };
    let global = read(Scope::Global).await?;
    let consumers = match only {
        Some(agent) => one(js, agent).await?.into_iter().collect(),
        None => list(js).await?,
    };
    for consumer in consumers {
        let own = read(Scope::Agent(consumer.agent.clone())).await?;
        let now = OffsetDateTime::now_utc();
        let want = killswitch::server_pause_until(killswitch::effective(global.as_ref(), own.as_ref(), now));
        let seconds = |t: Option<OffsetDateTime>| t.map(OffsetDateTime::unix_timestamp);
        if seconds(want) == seconds(consumer.until) {
            continue;
        }
        set(js, &consumer.agent, want).await?;
        match want {
            Some(until) => {
                let until = if until == PAUSED_UNTIL_RESUMED { "resumed".to_owned() } else { until.to_string() };
                info!(agent = %consumer.agent, until, "consumer paused on the server");
                synced.paused.push(consumer.agent);
            }
            None => {
                info!(agent = %consumer.agent, "consumer resumed on the server");
                synced.resumed.push(consumer.agent);
            }
        }
    }
    Ok(synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_from_2_11_pause_consumers() {
        for version in ["2.11.0", "v2.11.3", "2.12.1", "2.15.1", "3.0.0", "2.11.0-RC.1"] {
            assert_eq!(Support::of_version(version), Support::Enforced, "{version}");
        }
        for version in ["2.10.22", "v2.9.0", "2.10.0-beta", "", "nonsense", "2"] {
            let support = Support::of_version(version);
            assert_eq!(support, Support::TooOld(version.to_owned()), "{version}");
            assert!(support.warning().unwrap().contains("listeners alone"), "{version}");
        }
        assert_eq!(Support::Enforced.warning(), None);
    }

    #[test]
    fn consumer_pauses_describe_themselves() {
        let agent = AgentId::parse("nova").unwrap();
        let pause = |until| ConsumerPause { agent: agent.clone(), until }.describe();
        assert_eq!(pause(None), "agent-nova: not paused");
        assert_eq!(pause(Some(PAUSED_UNTIL_RESUMED)), "agent-nova: paused until resumed");
        let soft = time::macros::datetime!(2026-11-30 15:40:02.5 UTC);
        assert_eq!(pause(Some(soft)), "agent-nova: paused until 2026-11-30T15:40:02Z");
    }
}
