//! Connecting to NATS, and creating the streams and consumers described in
//! [`mesh_protocol::layout`] (for the bot and the `mesh` commands: a
//! listener's NATS user may not create them, see `mesh_listener::lookup`).

use std::time::Duration;

use async_nats::jetstream::context::CreateStreamError;
use async_nats::jetstream::{self, consumer::pull, stream};
use mesh_protocol::AgentId;
use mesh_protocol::layout::{self, ConsumerSpec, ConsumerTuning, Replicas, StreamSpec};
use tracing::{info, warn};

use crate::backoff;
use crate::config::NatsAuth;

/// Environment variable with the NATS URL.
pub const NATS_URL_ENV: &str = "NATS_URL";
/// NATS URL used when none is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Environment variable with the NATS user name (with a password).
pub const NATS_USER_ENV: &str = "NATS_USER";
/// Environment variable with the NATS password.
pub const NATS_PASSWORD_ENV: &str = "NATS_PASSWORD";
/// Environment variable naming a file that holds the NATS password.
pub const NATS_PASSWORD_FILE_ENV: &str = "NATS_PASSWORD_FILE";
/// Environment variable with the inbox prefix the server's permissions expect (`_INBOX_<agent>`).
pub const INBOX_PREFIX_ENV: &str = "MESH_INBOX_PREFIX";
/// Environment variable with the stream replicas setting (`auto` or 1 to 5).
pub const REPLICAS_ENV: &str = "MESH_REPLICAS";
/// How long a command-line connect waits before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why NATS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot reach NATS at {url}: {reason}; is nats-server running? (`mesh up --demo` starts one)")]
    Unreachable { url: String, reason: String },
    #[error("NATS credentials: {0}")]
    Credentials(String),
    #[error(
        "JetStream request failed: {what}: {source}; check that nats-server runs with JetStream enabled (-js) and has \
         disk space"
    )]
    JetStream {
        /// What was being done (`opening stream MESH_AGENTS`).
        what: String,
        /// The client's error.
        #[source]
        source: Cause,
    },
    /// A stream could not be created; the text says why and what to do.
    #[error("JetStream request failed: {explained}")]
    Stream {
        /// The explanation ([`creation_error`] or a leader election's wait).
        explained: String,
        /// The client's error.
        #[source]
        source: Cause,
    },
    #[error("{REPLICAS_ENV}: {0}")]
    Replicas(String),
}

/// The error a [`NatsError`] keeps as its source.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

impl NatsError {
    /// A failed JetStream request: `what` was being done, `source` is why.
    pub fn jetstream(what: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::JetStream { what: what.into(), source: source.into() }
    }
}

/// The URL setting as it may be shown: user info (`user:password@`) becomes `***@`.
pub fn redact_url(url: &str) -> String {
    server_urls(url)
        .iter()
        .map(|u| {
            let (scheme, rest) = u.split_once("://").map_or(("", *u), |(s, r)| (s, r));
            let shown = match rest.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => rest.to_owned(),
            };
            if scheme.is_empty() { shown } else { format!("{scheme}://{shown}") }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of a URL setting: one URL, or several separated by commas
/// (the nodes of a cluster; the client fails over between them).
pub fn server_urls(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Options with the credentials and inbox prefix of `auth` (read once, at
/// start: [`crate::config::NatsAuth::from_env`]).
pub fn options(auth: &NatsAuth, name: &str) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new().name(name);
    if let Some((user, password)) = &auth.user {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(prefix) = &auth.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    options
}

/// Connects once, failing within [`CONNECT_TIMEOUT`] (for commands).
pub async fn connect_now(url: &str, name: &str, auth: &NatsAuth) -> Result<async_nats::Client, NatsError> {
    let options = options(auth, name).connection_timeout(CONNECT_TIMEOUT).max_reconnects(Some(3));
    let attempt =
        tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), options.connect(server_urls(url))).await;
    match attempt {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(NatsError::Unreachable { url: redact_url(url), reason: e.to_string() }),
        Err(_) => Err(NatsError::Unreachable { url: redact_url(url), reason: "timed out".into() }),
    }
}

/// Connects for a long-running service: returns at once and keeps
/// (re)connecting in the background for as long as the process runs.
pub async fn connect_service(url: &str, name: &str, auth: &NatsAuth) -> Result<async_nats::Client, NatsError> {
    connect_watched(url, name, auth).await.map(|(client, _)| client)
}

/// Like [`connect_service`], with a counter that goes up on every
/// (re)connection: pull loops restart their pulls when it changes, since a
/// restarted server has forgotten them.
pub async fn connect_watched(
    url: &str,
    name: &str,
    auth: &NatsAuth,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<u64>), NatsError> {
    let (connects_tx, connects) = tokio::sync::watch::channel(0u64);
    let client = options(auth, name)
        .connection_timeout(CONNECT_TIMEOUT)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let connects_tx = connects_tx.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    connects_tx.send_modify(|n| *n += 1);
                }
            }
        })
        .connect(server_urls(url))
        .await
        .map_err(|e| NatsError::Unreachable { url: redact_url(url), reason: e.to_string() })?;
    Ok((client, connects))
}

/// The async-nats stream config of a spec.
pub fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.clone(),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: spec.max_age,
        max_message_size: spec.max_msg_size,
        duplicate_window: spec.duplicate_window,
        num_replicas: spec.replicas,
        max_consumers: spec.max_consumers,
        ..Default::default()
    }
}

/// How many replicas `setting` means on the server this client is connected
/// to: auto is 3 when the server's INFO names a cluster, 1 otherwise. A
/// client still connecting (`retry_on_initial_connect`) has no INFO yet, so
/// auto first makes one JetStream request, which waits for the connection.
pub async fn resolve_replicas(js: &jetstream::Context, setting: Replicas) -> Result<usize, NatsError> {
    if setting == Replicas::Auto && js.client().server_info().server_id.is_empty() {
        js.query_account().await.map_err(|e| NatsError::jetstream("reading the JetStream account", e))?;
    }
    Ok(setting.resolve(js.client().server_info().cluster.as_deref()))
}

/// Opens the key-value bucket `config` names, creating it with the replicas
/// `setting` resolves to when it does not exist yet.
pub async fn open_or_create_bucket(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
    setting: Replicas,
) -> Result<jetstream::kv::Store, NatsError> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let num_replicas = resolve_replicas(js, setting).await?;
    let what = format!("creating the {} bucket", config.bucket);
    js.create_key_value(jetstream::kv::Config { num_replicas, ..config })
        .await
        .map_err(|e| NatsError::jetstream(what, e))
}

/// Creates every mesh stream that does not exist yet, with the replicas
/// `setting` resolves to; an existing stream with fewer replicas is scaled up
/// (never down).
pub async fn ensure_streams(js: &jetstream::Context, setting: Replicas) -> Result<(), NatsError> {
    let replicas = resolve_replicas(js, setting).await?;
    let account_limit = js.query_account().await.ok().and_then(|account| account.limits.max_consumers);
    for mut spec in layout::all_streams(replicas) {
        spec.max_consumers = fit_consumer_limit(spec.max_consumers, account_limit);
        let config = &stream_config(&spec);
        let stream = backoff::retry(spec.name, backoff::JETSTREAM, move || js.get_or_create_stream(config.clone()))
            .await
            .map_err(|e| NatsError::Stream { explained: stream_error(spec.name, replicas, &e), source: Box::new(e) })?;
        // Each change starts from the config the one before left, so a later
        // update never writes back what an earlier one changed.
        let mut info = stream.cached_info().clone();
        if let Some(updated) = widen_subjects(js, &spec, &info).await? {
            info = updated;
        }
        if let Some(updated) = raise_consumer_limit(js, &spec, &info).await {
            info = updated;
        }
        scale_up(js, &info, replicas).await;
    }
    Ok(())
}

/// Adds the subjects a stream made by an earlier version lacks (the
/// sender-bound `agents.<to>.inbox.<sender>`, `mesh.reply.<asker>.<token>.<sender>`):
/// without them an agent's messages would find no stream. Only ever adds:
/// a stream holding subjects the layout does not name is left for the
/// layout check to refuse.
async fn widen_subjects(
    js: &jetstream::Context,
    spec: &layout::StreamSpec,
    info: &stream::Info,
) -> Result<Option<stream::Info>, NatsError> {
    let have = &info.config.subjects;
    let missing: Vec<&String> = spec.subjects.iter().filter(|s| !have.contains(s)).collect();
    if missing.is_empty() || have.iter().any(|s| !spec.subjects.contains(s)) {
        return Ok(None);
    }
    let mut config = info.config.clone();
    config.subjects = spec.subjects.clone();
    let updated = js
        .update_stream(config)
        .await
        .map_err(|e| NatsError::jetstream(format!("adding subjects {missing:?} to stream {}", spec.name), e))?;
    info!(stream = spec.name, added = ?missing, "stream subjects updated to the current layout");
    Ok(Some(updated))
}

/// Raises the consumer limit of a stream made by an earlier version (or
/// with a lower limit by hand) to the layout's: on nats-server 2.15 a stream
/// without its own limit takes at most 1,000 consumers, so a mesh made before
/// could not register its 1,001st agent. A server that refuses the change
/// (before 2.12 the limit could not be edited; those servers have no default
/// limit) is logged, not fatal.
async fn raise_consumer_limit(
    js: &jetstream::Context,
    spec: &layout::StreamSpec,
    info: &stream::Info,
) -> Option<stream::Info> {
    let have = info.config.max_consumers;
    // No limit of its own means unlimited before 2.15 (and 2.10, 2.11 refuse
    // the change): only a server that defaults one needs it raised.
    let low = if have > 0 { have < spec.max_consumers } else { defaults_a_consumer_limit(&js.client()) };
    if spec.max_consumers <= 0 || !low {
        return None;
    }
    let mut config = info.config.clone();
    config.max_consumers = spec.max_consumers;
    match js.update_stream(config).await {
        Ok(updated) => {
            info!(
                stream = spec.name,
                from = have,
                to = spec.max_consumers,
                "stream consumer limit raised to the layout's"
            );
            Some(updated)
        }
        Err(e) => {
            warn!(stream = spec.name, error = %e, limit = spec.max_consumers, "cannot raise the stream's consumer limit; agents beyond the server's limit cannot be added");
            None
        }
    }
}

/// A stream's consumer limit within its account's: nats-server refuses to
/// create a stream whose limit is above the account's (error 10026).
pub fn fit_consumer_limit(wanted: i32, account: Option<i64>) -> i32 {
    match account {
        Some(limit) if limit > 0 && wanted > 0 && i64::from(wanted) > limit => i32::try_from(limit).unwrap_or(wanted),
        _ => wanted,
    }
}

/// The first nats-server release that gives a stream without a consumer
/// limit of its own a default one (1,000).
const DEFAULT_CONSUMER_LIMIT_SINCE: (u64, u64) = (2, 15);

fn defaults_a_consumer_limit(client: &async_nats::Client) -> bool {
    major_minor(&client.server_info().version).is_some_and(|release| release >= DEFAULT_CONSUMER_LIMIT_SINCE)
}

/// The major and minor release of a nats-server version (its `INFO`'s
/// `version`: `2.11.3`, `v2.10.22-beta`).
pub fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut numbers = version.trim_start_matches('v').split(['.', '-']).map(|p| p.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// What to say when looking up or creating a stream failed. A timeout is not
/// a placement problem: on a cluster it is typically the seconds after a node
/// was lost, until its streams have new leaders (already retried for
/// [`backoff::JETSTREAM`]'s bound).
fn stream_error(name: &str, replicas: usize, failure: &backoff::Failure<CreateStreamError>) -> String {
    match failure {
        backoff::Failure::GaveUp { last, waited, .. } => format!(
            "stream {name}: JetStream did not answer ({last}) for {}s; right after a cluster node is lost this \
             lasts until its streams have new leaders (seconds): check that the NATS servers run, then retry",
            waited.as_secs()
        ),
        backoff::Failure::Permanent(error) => creation_error(name, replicas, &error.to_string()),
    }
}

/// What to say when creating a stream (or bucket) failed.
pub fn creation_error(name: &str, replicas: usize, error: &str) -> String {
    if replicas > 1 {
        format!(
            "creating stream {name} with {replicas} replicas: {error}; a cluster needs {replicas} JetStream servers \
             up to place it (or set {REPLICAS_ENV}=1)"
        )
    } else {
        format!("creating stream {name}: {error}")
    }
}

/// Brings an existing stream (made earlier with another setting) up to
/// `replicas`. Failing to do so is logged, not fatal: the stream still works
/// with the replicas it has. A stream with more replicas is left alone.
pub async fn scale_up(js: &jetstream::Context, info: &stream::Info, replicas: usize) {
    let name = info.config.name.as_str();
    let have = info.config.num_replicas.max(1);
    if have >= replicas {
        if have > replicas {
            info!(stream = name, have, want = replicas, "stream keeps its larger replica count");
        }
        return;
    }
    let mut config = info.config.clone();
    config.num_replicas = replicas;
    match js.update_stream(config).await {
        Ok(_) => info!(stream = name, from = have, to = replicas, "stream scaled up"),
        Err(e) => warn!(
            stream = name,
            have,
            want = replicas,
            error = %e,
            "cannot scale the stream up; it keeps working with {have} replica(s); start every cluster node or set {REPLICAS_ENV}={have}"
        ),
    }
}

/// The async-nats consumer config of a spec.
pub fn consumer_config(spec: &ConsumerSpec) -> pull::Config {
    pull::Config {
        durable_name: Some(spec.durable.clone()),
        description: Some("mesh listener".into()),
        filter_subjects: spec.filter_subjects.clone(),
        deliver_policy: jetstream::consumer::DeliverPolicy::New,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.tuning.ack_wait,
        max_deliver: -1,
        max_ack_pending: spec.tuning.max_ack_pending,
        ..Default::default()
    }
}

/// Makes sure an agent's durable consumer exists without changing an
/// existing one (what a sender does before publishing), creating it with
/// `tuning` (the agent's registry entry's, [`mesh_protocol::registry::Agent::consumer_tuning`]).
pub async fn ensure_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
    tuning: ConsumerTuning,
) -> Result<(), NatsError> {
    let spec = layout::agent_consumer(agent, tuning);
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    // Only a consumer the server says is missing is created: a look-up that
    // failed otherwise (no answer in time under load, no responders during
    // an election) is asked again, never answered by a create, which a
    // listener's NATS user may not do (a permissions violation).
    let (stream_ref, durable) = (&stream, spec.durable.as_str());
    let exists = backoff::retry(durable, backoff::JETSTREAM, move || async move {
        match stream_ref.consumer_info(durable).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| NatsError::jetstream(format!("looking up consumer {durable}"), e))?;
    if exists {
        return Ok(());
    }
    // A consumer created during a kill starts paused on the server.
    let mut config = consumer_config(&spec);
    config.pause_until = crate::server_pause::for_new_consumer(js, agent).await;
    // Idempotent (looked up first, created with the same config): safe to retry.
    let (stream, spec, config) = (&stream, &spec, &config);
    backoff::retry(&spec.durable, backoff::JETSTREAM, move || {
        stream.get_or_create_consumer::<pull::Config>(&spec.durable, config.clone())
    })
    .await
    .map_err(|e| NatsError::jetstream(format!("creating consumer {}", spec.durable), e))?;
    Ok(())
}

/// Whether an agent's consumer exists with `tuning` and the layout's filters.
/// One made by an earlier version (without the sender-bound filters) does
/// not, so the caller binds it to the current layout.
pub async fn consumer_current(
    js: &jetstream::Context,
    agent: &AgentId,
    tuning: ConsumerTuning,
) -> Result<bool, NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    match stream.consumer_info(&spec.durable).await {
        Ok(info) => {
            let have = ConsumerTuning { ack_wait: info.config.ack_wait, max_ack_pending: info.config.max_ack_pending };
            Ok(have == tuning && same_filters(&spec.filter_subjects, &info.config.filter_subjects))
        }
        Err(e) if e.to_string().contains("not found") || e.to_string().contains("10014") => Ok(false),
        Err(e) => Err(NatsError::jetstream(format!("looking up consumer {}", spec.durable), e)),
    }
}

/// Whether a consumer's filters are the layout's (in any order), or are not
/// ours to change: only a consumer whose filters are a part of the layout's
/// (one made before the sender-bound subjects) is brought up to date; one
/// reading anything else is left for the layout check to refuse.
fn same_filters(want: &[String], have: &[String]) -> bool {
    let upgrade = have.iter().all(|s| want.contains(s)) && have.len() < want.len();
    !upgrade
}

/// What [`delete_consumer`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// There was no consumer.
    None,
    /// Deleted; it held this many messages not delivered (pending and unacked).
    Deleted { held: u64 },
    /// Kept: it holds `held` messages not delivered, those after stream
    /// sequence `after` (its ack floor), and dropping them was not allowed.
    Kept { held: u64, after: u64 },
    /// Kept: it was created after the removal was seen (the agent was added
    /// back meanwhile).
    Newer,
}

/// How many messages an agent's consumer holds not delivered (pending and
/// unacked) and its ack floor (stream sequence), `None` without a consumer.
pub async fn consumer_backlog(js: &jetstream::Context, agent: &AgentId) -> Result<Option<(u64, u64)>, NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    match stream.consumer_info(&spec.durable).await {
        Ok(info) => Ok(Some((info.num_pending + info.num_ack_pending as u64, info.ack_floor.stream_sequence))),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(NatsError::jetstream(format!("looking up consumer {}", spec.durable), e)),
    }
}

/// Deletes an agent's durable consumer, when it has one (an agent removed or
/// made inactive: re-activated, the id starts afresh with a new consumer and
/// receives nothing older). A consumer still holding messages not delivered
/// is deleted only when `drop_backlog` allows it (the messages stay in the
/// stream until they age out; nobody will deliver them); otherwise it is
/// kept. A message arriving between the look-up and the deletion is dropped
/// with it.
///
/// `created_before`: delete only a consumer created before that time (the
/// moment a removal was seen), never one an `agents add` created since.
pub async fn delete_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
    drop_backlog: bool,
    created_before: Option<time::OffsetDateTime>,
) -> Result<Retired, NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    let info = match stream.consumer_info(&spec.durable).await {
        Ok(info) => info.clone(),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => return Ok(Retired::None),
        Err(e) => return Err(NatsError::jetstream(format!("looking up consumer {}", spec.durable), e)),
    };
    let (held, after) = (info.num_pending + info.num_ack_pending as u64, info.ack_floor.stream_sequence);
    if created_before.is_some_and(|seen| info.created >= seen) {
        return Ok(Retired::Newer);
    }
    if held > 0 && !drop_backlog {
        return Ok(Retired::Kept { held, after });
    }
    match stream.delete_consumer(&spec.durable).await {
        Ok(_) => Ok(Retired::Deleted { held }),
        Err(e) if e.to_string().contains("not found") => Ok(Retired::None),
        Err(e) => Err(NatsError::jetstream(format!("deleting consumer {}", spec.durable), e)),
    }
}

/// Creates or updates an agent's consumer with `tuning` (the admin side:
/// restores, test harnesses; a listener never calls it). An existing consumer
/// keeps its start position (a restored one starts at a sequence; the server
/// refuses to change that).
pub async fn bind_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
    tuning: ConsumerTuning,
) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let spec = layout::agent_consumer(agent, tuning);
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::jetstream(format!("opening stream {}", spec.stream), e))?;
    let mut config = consumer_config(&spec);
    match stream.consumer_info(&spec.durable).await {
        Ok(existing) => {
            config.deliver_policy = existing.config.deliver_policy;
            // An update leaves the server-side pause as it is.
            config.pause_until = existing.config.pause_until;
        }
        Err(_) => config.pause_until = crate::server_pause::for_new_consumer(js, agent).await,
    }
    stream
        .create_consumer(config)
        .await
        .map_err(|e| NatsError::jetstream(format!("binding consumer {}", spec.durable), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(redact_url("nats://admin:s3cret@a:4222"), "nats://***@a:4222");
        assert_eq!(redact_url("nats://tok@a:1, nats://b:2"), "nats://***@a:1,nats://b:2");
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
        assert_eq!(redact_url("nats://a:4222"), "nats://a:4222");
    }

    #[test]
    fn a_url_setting_names_one_or_several_servers() {
        assert_eq!(server_urls("nats://a:4222"), ["nats://a:4222"]);
        assert_eq!(server_urls("nats://a:1, nats://b:2,,nats://c:3 "), ["nats://a:1", "nats://b:2", "nats://c:3"]);
    }

    #[test]
    fn a_streams_consumer_limit_stays_within_its_accounts() {
        assert_eq!(fit_consumer_limit(100_000, None), 100_000);
        assert_eq!(fit_consumer_limit(100_000, Some(5_000)), 5_000);
        assert_eq!(fit_consumer_limit(100_000, Some(200_000)), 100_000);
        assert_eq!(fit_consumer_limit(0, Some(5_000)), 0);
        assert_eq!(fit_consumer_limit(100_000, Some(0)), 100_000);
    }

    #[test]
    fn server_versions_are_read_by_major_and_minor() {
        assert_eq!(major_minor("2.15.1"), Some((2, 15)));
        assert_eq!(major_minor("v2.10.22-beta"), Some((2, 10)));
        assert_eq!(major_minor("2"), None);
        assert_eq!(major_minor(""), None);
    }
}
