//! `mesh backup <dir>` and `mesh restore <dir>`: the registry, every mesh
//! stream's messages (subject, headers with `Nats-Msg-Id`, payload), each
//! agent consumer's ack floor, and the kill switch bucket.
//!
//! Restore writes the kill switch first, republishes the messages in order
//! into a fresh server, then creates each agent's consumer at the first restored message it had not
//! acked, so what was pending before the backup is delivered after the
//! restore and what was acked is not delivered again (a message acked out of
//! order above the ack floor is delivered once more: at least once). A
//! restore that failed part way resumes when run again (see [`restore`]).
//!
//! Layout of a backup directory (mode 0700; it holds the registry, so treat
//! it like the registry): `manifest.json`, `tokens.json`, `killswitch.json`,
//! `streams/<STREAM>.jsonl` (one message per line, payload in base64).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer::DeliverPolicy, kv};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use mesh_protocol::AgentId;
use mesh_protocol::killswitch::BUCKET;
use mesh_protocol::layout::{self, ConsumerTuning, MSG_ID_HEADER};
use mesh_runtime::nats::{NatsError, consumer_config};
use serde::{Deserialize, Serialize};

/// Header a restored message carries its original `Nats-Msg-Id` in.
pub const RESTORED_MSG_ID_HEADER: &str = "Mesh-Restored-Msg-Id";
/// Header naming the backup a restored message came from (its creation time).
pub const RESTORED_FROM_HEADER: &str = "Mesh-Restored-From";
/// Header carrying a restored message's sequence in the backed-up stream.
pub const RESTORED_SEQ_HEADER: &str = "Mesh-Restored-Seq";
/// Version of the backup format.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const REGISTRY: &str = "tokens.json";
const KILLSWITCH: &str = "killswitch.json";
const STREAMS: &str = "streams";

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup directory {0} exists and is not empty; choose a new directory")]
    NotEmpty(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a mesh backup: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("stream {stream} already holds {messages} messages; restore into a fresh server (or delete the stream)")]
    NotFresh { stream: String, messages: u64 },
    #[error(
        "stream {stream} already has {consumers} consumers (a listener or a sender ran); restore before starting the listeners, into a fresh server"
    )]
    HasConsumers { stream: String, consumers: usize },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

fn js_err(what: String) -> impl FnOnce(String) -> BackupError {
    move |e| BackupError::Nats(NatsError::jetstream(what, e))
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its sequence in the backed-up stream.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// Headers, in order (name, value).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Payload, base64.
    pub data: String,
}

/// An agent consumer's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerPosition {
    /// The agent.
    pub agent: String,
    /// Every message up to this stream sequence was acked.
    pub ack_floor: u64,
    /// Ack wait, seconds.
    pub ack_wait_s: u64,
    /// Messages in flight at once.
    pub max_ack_pending: i64,
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// Messages per stream.
    pub streams: BTreeMap<String, u64>,
    /// Agent consumers of the agents stream.
    pub consumers: Vec<ConsumerPosition>,
    /// Kill switch entries.
    pub killswitch: usize,
    /// Whether the registry was included.
    pub registry: bool,
}

/// Takes a backup of the mesh at `js` and the registry at `registry` into `dir`.
pub async fn backup(js: &jetstream::Context, registry: &Path, dir: &Path) -> Result<Manifest, BackupError> {
    if dir.exists() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(BackupError::NotEmpty(dir.to_owned()));
    }
    create_private_dir(&dir.join(STREAMS))?;
    create_private_dir(dir)?;
    let mut manifest = Manifest {
        version: FORMAT_VERSION,
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        streams: BTreeMap::new(),
        consumers: Vec::new(),
        killswitch: 0,
        registry: false,
    };
    if registry.exists() {
        let text = std::fs::read(registry).map_err(io(registry))?;
        write_private(&dir.join(REGISTRY), &text)?;
        manifest.registry = true;
    }
    for spec in layout::all_streams(1) {
        let Ok(mut stream) = js.get_stream(spec.name).await else { continue };
        let state =
            stream.info().await.map_err(|e| js_err(format!("reading {}", spec.name))(e.to_string()))?.state.clone();
        let path = dir.join(STREAMS).join(format!("{}.jsonl", spec.name));
        let mut out = std::io::BufWriter::new(create_private(&path)?);
        let mut count = 0;
        if state.messages > 0 {
            for seq in state.first_sequence..=state.last_sequence {
                let message = match stream.get_raw_message(seq).await {
                    Ok(m) => m,
                    // Deleted or expired since the info: nothing to keep.
                    Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => continue,
                    Err(e) => return Err(js_err(format!("reading {} seq {seq}", spec.name))(e.to_string())),
                };
                let stored = StoredMessage {
                    seq,
                    subject: message.subject.to_string(),
                    headers: headers_of(&message.headers),
                    data: B64.encode(&message.payload),
                };
                let line = serde_json::to_string(&stored).map_err(|e| js_err("encoding".into())(e.to_string()))?;
                writeln!(out, "{line}").map_err(io(&path))?;
                count += 1;
            }
        }
        out.flush().map_err(io(&path))?;
        manifest.streams.insert(spec.name.to_owned(), count);
        if spec.name == layout::agents_stream(1).name {
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.map_err(|e| js_err("listing consumers".into())(e.to_string()))?;
                let Some(agent) = info.name.strip_prefix("agent-") else { continue };
                manifest.consumers.push(ConsumerPosition {
                    agent: agent.to_owned(),
                    ack_floor: info.ack_floor.stream_sequence,
                    ack_wait_s: info.config.ack_wait.as_secs(),
                    max_ack_pending: info.config.max_ack_pending,
                });
            }
            manifest.consumers.sort_by(|a, b| a.agent.cmp(&b.agent));
        }
    }
    let mut entries = BTreeMap::new();
    if let Ok(store) = js.get_key_value(BUCKET).await {
        let mut keys = store.keys().await.map_err(|e| js_err(format!("listing {BUCKET}"))(e.to_string()))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| js_err(format!("listing {BUCKET}"))(e.to_string()))?;
            if let Ok(Some(value)) = store.get(&key).await {
                entries.insert(key, String::from_utf8_lossy(&value).into_owned());
            }
        }
    }
    manifest.killswitch = entries.len();
    write_json(&dir.join(KILLSWITCH), &entries)?;
    write_json(&dir.join(MANIFEST), &manifest)?;
    Ok(manifest)
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// Messages republished per stream.
    pub streams: BTreeMap<String, u64>,
    /// Agent consumers created, with the number of messages pending for each.
    pub consumers: BTreeMap<String, u64>,
    /// Kill switch entries written.
    pub killswitch: usize,
    /// Where the registry was written, if the backup had one.
    pub registry: Option<PathBuf>,
    /// Messages a failed run of this restore had already republished, per
    /// stream (kept, not written again); empty on a first run.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub resumed: BTreeMap<String, u64>,
}

/// Restores `dir` into the (fresh) server at `js` and the registry to `registry`.
///
/// Order: the kill switch first (an entry missing on the server is created,
/// one there is left alone), so a listener or bot started meanwhile never
/// delivers through a backed-up kill; then the messages; then the consumers
/// (created paused when a kill is in force); then the registry.
///
/// A restore that failed part way can be run again with the same backup: it
/// resumes. Every republished message carries the backup's creation time
/// ([`RESTORED_FROM_HEADER`]) and its old sequence ([`RESTORED_SEQ_HEADER`]);
/// a stream whose newest message came from this backup continues after it,
/// and a consumer the failed run created is kept. A stream holding anything
/// else is refused, as on the first run.
pub async fn restore(
    js: &jetstream::Context,
    replicas: mesh_protocol::layout::Replicas,
    registry: &Path,
    dir: &Path,
) -> Result<RestoreReport, BackupError> {
    let manifest: Manifest = read_json(&dir.join(MANIFEST))?;
    if manifest.version != FORMAT_VERSION {
        return Err(BackupError::Format {
            path: dir.to_owned(),
            reason: format!("format version {} (this mesh reads {FORMAT_VERSION})", manifest.version),
        });
    }
    let entries: BTreeMap<String, String> = read_json(&dir.join(KILLSWITCH))?;
    mesh_runtime::nats::ensure_streams(js, replicas).await?;
    let mut report = RestoreReport {
        streams: BTreeMap::new(),
        consumers: BTreeMap::new(),
        killswitch: 0,
        registry: None,
        resumed: BTreeMap::new(),
    };
    let agents_stream = layout::agents_stream(1).name;
    // Check every stream first, so a refusal writes nothing; note how far a
    // failed run of this restore got in each.
    let mut done: BTreeMap<&str, u64> = BTreeMap::new();
    // Consumers a failed run of this restore created (kept, not created again).
    let mut kept_consumers = false;
    for spec in layout::all_streams(1) {
        let mut stream =
            js.get_stream(spec.name).await.map_err(|e| js_err(format!("opening {}", spec.name))(e.to_string()))?;
        let state =
            stream.info().await.map_err(|e| js_err(format!("reading {}", spec.name))(e.to_string()))?.state.clone();
        // The audit trail is append-only and every command (this restore too) adds to it.
        let audit = spec.name == layout::audit_stream(1).name;
        let restored = restored_upto(&stream, &manifest.created_at, audit).await?;
        if let Some(seq) = restored {
            done.insert(spec.name, seq);
        } else if state.messages > 0 && !audit {
            return Err(BackupError::NotFresh { stream: spec.name.to_owned(), messages: state.messages });
        }
        if spec.name == agents_stream && state.consumer_count > 0 {
            if restored_consumers(&stream).await? < state.consumer_count {
                return Err(BackupError::HasConsumers {
                    stream: spec.name.to_owned(),
                    consumers: state.consumer_count,
                });
            }
            kept_consumers = true;
        }
    }
    // The kill switch first: what was in force at the backup holds from now on.
    if !entries.is_empty() {
        let store = mesh_runtime::kill_bucket::open(js, replicas).await?;
        for (key, value) in &entries {
            match store.create(key, value.clone().into_bytes().into()).await {
                Ok(_) => {}
                // Written by a failed run of this restore, or since by someone: left alone.
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(js_err(format!("writing {BUCKET} {key}"))(e.to_string())),
            }
        }
    }
    report.killswitch = entries.len();
    // Old agents-stream sequence -> new one, in order.
    let mut mapping: Vec<(u64, u64)> = Vec::new();
    if done.contains_key(agents_stream) {
        let stream = js
            .get_stream(agents_stream)
            .await
            .map_err(|e| js_err("opening the agents stream".into())(e.to_string()))?;
        mapping = restored_mapping(&stream).await?;
    }
    for spec in layout::all_streams(1) {
        let path = dir.join(STREAMS).join(format!("{}.jsonl", spec.name));
        if !path.exists() {
            continue;
        }
        let skip_upto = done.get(spec.name).copied().unwrap_or(0);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let (mut count, mut skipped) = (0, 0);
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(io(&path))?;
            let stored: StoredMessage = serde_json::from_str(&line)
                .map_err(|e| BackupError::Format { path: path.clone(), reason: e.to_string() })?;
            if stored.seq <= skip_upto {
                skipped += 1;
                continue;
            }
            let payload = B64
                .decode(&stored.data)
                .map_err(|e| BackupError::Format { path: path.clone(), reason: format!("seq {}: {e}", stored.seq) })?;
            let mut headers = HeaderMap::new();
            for (name, value) in &stored.headers {
                let name =
                    if name.eq_ignore_ascii_case(MSG_ID_HEADER) { RESTORED_MSG_ID_HEADER } else { name.as_str() };
                headers.append(name, value.as_str());
            }
            headers.insert(RESTORED_FROM_HEADER, manifest.created_at.as_str());
            headers.insert(RESTORED_SEQ_HEADER, stored.seq.to_string().as_str());
            let what = format!("republishing {} seq {}", spec.name, stored.seq);
            let ack = js
                .publish_with_headers(stored.subject.clone(), headers, payload.into())
                .await
                .map_err(|e| js_err(what.clone())(e.to_string()))?
                .await
                .map_err(|e| js_err(what)(e.to_string()))?;
            if spec.name == agents_stream {
                mapping.push((stored.seq, ack.sequence));
            }
            count += 1;
        }
        report.streams.insert(spec.name.to_owned(), count + skipped);
        if skipped > 0 {
            report.resumed.insert(spec.name.to_owned(), skipped);
        }
    }
    let stream =
        js.get_stream(agents_stream).await.map_err(|e| js_err("opening the agents stream".into())(e.to_string()))?;
    let next_seq = stream.cached_info().state.last_sequence + 1;
    for position in &manifest.consumers {
        let Ok(agent) = AgentId::parse(&position.agent) else { continue };
        let tuning = ConsumerTuning {
            ack_wait: std::time::Duration::from_secs(position.ack_wait_s.max(1)),
            max_ack_pending: position.max_ack_pending.max(1),
        };
        let spec = layout::agent_consumer(&agent, tuning);
        if kept_consumers
            && let Ok(mut existing) = stream.get_consumer::<jetstream::consumer::pull::Config>(&spec.durable).await
        {
            // Created by a failed run of this restore.
            let pending = existing.info().await.map(|i| i.num_pending).unwrap_or_default();
            report.consumers.insert(position.agent.clone(), pending);
            continue;
        }
        let start = mapping.iter().find(|(old, _)| *old > position.ack_floor).map_or(next_seq, |(_, new)| *new);
        let mut config = consumer_config(&spec);
        config.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence: start };
        config.pause_until = mesh_runtime::server_pause::for_new_consumer(js, &agent).await;
        let mut consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| js_err(format!("creating consumer {}", spec.durable))(e.to_string()))?;
        let pending = consumer.info().await.map(|i| i.num_pending).unwrap_or_default();
        report.consumers.insert(position.agent.clone(), pending);
    }
    // Once more from the whole bucket (a consumer created while it could not be read).
    if let Err(e) = mesh_runtime::server_pause::sync(js, None).await {
        tracing::warn!(error = %e, "cannot pause the restored consumers on the server; the listeners' pause holds");
    }
    let saved = dir.join(REGISTRY);
    if manifest.registry && saved.exists() {
        let text = std::fs::read_to_string(&saved).map_err(io(&saved))?;
        let parsed = mesh_protocol::Registry::parse(&text)
            .map_err(|e| BackupError::Format { path: saved.clone(), reason: e.to_string() })?;
        if registry.exists() {
            crate::agents::write_atomic(registry, &parsed).map_err(|e| BackupError::Io {
                path: registry.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
        } else {
            if let Some(parent) = registry.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            write_private(registry, text.as_bytes())?;
        }
        report.registry = Some(registry.to_owned());
    }
    Ok(report)
}

/// Messages of the audit stream read back, newest first, looking for the
/// last one a failed restore wrote (commands run meanwhile add records).
const AUDIT_SCAN_BACK: u64 = 1000;

/// The highest old sequence a run of the restore of the backup created at
/// `from` republished into `stream`: from its newest message (for the audit
/// stream, the newest of the last [`AUDIT_SCAN_BACK`] that has one). `None`
/// when the stream holds no message of that backup.
async fn restored_upto(
    stream: &jetstream::stream::Stream,
    from: &str,
    audit: bool,
) -> Result<Option<u64>, BackupError> {
    let state = &stream.cached_info().state;
    if state.messages == 0 {
        return Ok(None);
    }
    let lowest = if audit {
        state.last_sequence.saturating_sub(AUDIT_SCAN_BACK).max(state.first_sequence)
    } else {
        state.last_sequence
    };
    let mut seq = state.last_sequence;
    while seq >= lowest && seq > 0 {
        match stream.get_raw_message(seq).await {
            Ok(message) => {
                if let Some(old) = restored_seq(&message.headers, from) {
                    return Ok(Some(old));
                }
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {}
            Err(e) => return Err(js_err(format!("reading {} seq {seq}", state_name(stream)))(e.to_string())),
        }
        seq -= 1;
    }
    Ok(None)
}

fn state_name(stream: &jetstream::stream::Stream) -> String {
    stream.cached_info().config.name.clone()
}

/// The old sequence of a message a restore of the backup created at `from` wrote.
fn restored_seq(headers: &HeaderMap, from: &str) -> Option<u64> {
    (headers.get(RESTORED_FROM_HEADER)?.as_str() == from)
        .then(|| headers.get(RESTORED_SEQ_HEADER)?.as_str().parse().ok())
        .flatten()
}

/// Old sequence -> new one of every restored message of the agents stream (a resumed restore).
async fn restored_mapping(stream: &jetstream::stream::Stream) -> Result<Vec<(u64, u64)>, BackupError> {
    let state = &stream.cached_info().state;
    let mut mapping = Vec::new();
    if state.messages == 0 {
        return Ok(mapping);
    }
    for seq in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(message) => {
                if let Some(old) = message.headers.get(RESTORED_SEQ_HEADER).and_then(|v| v.as_str().parse().ok()) {
                    mapping.push((old, seq));
                }
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {}
            Err(e) => return Err(js_err(format!("reading the agents stream seq {seq}"))(e.to_string())),
        }
    }
    Ok(mapping)
}

/// How many consumers of the agents stream a restore created (they start at a
/// given sequence; the bot creates its consumers otherwise).
async fn restored_consumers(stream: &jetstream::stream::Stream) -> Result<usize, BackupError> {
    let mut consumers = stream.consumers();
    let mut ours = 0;
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| js_err("listing consumers".into())(e.to_string()))?;
        if matches!(info.config.deliver_policy, DeliverPolicy::ByStartSequence { .. }) {
            ours += 1;
        }
    }
    Ok(ours)
}

fn headers_of(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| (name.to_string(), v.as_str().to_owned())))
        .collect();
    out.sort();
    out
}

fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

fn create_private(path: &Path) -> Result<std::fs::File, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut file = create_private(path)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(path))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), BackupError> {
    let text =
        serde_json::to_vec_pretty(value).map_err(|e| BackupError::Io { path: path.to_owned(), source: e.into() })?;
    write_private(path, &text)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BackupError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| BackupError::Format { path: path.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refuses_a_non_empty_directory_before_any_io() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(async {
            // Never connected: the directory check comes first.
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect("nats://127.0.0.1:1")
                .await
                .unwrap();
            backup(&jetstream::new(client), Path::new("/nonexistent"), dir.path()).await.unwrap_err()
        });
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    #[test]
    fn stored_messages_round_trip_through_json() {
        let m = StoredMessage {
            seq: 7,
            subject: "agents.nova.inbox".into(),
            headers: vec![("Nats-Msg-Id".into(), "abc".into())],
            data: B64.encode(b"\x00\xffhi"),
        };
        let back: StoredMessage = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(B64.decode(&back.data).unwrap(), b"\x00\xffhi");
    }
}
