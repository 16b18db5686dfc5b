//! The listener's side of the kill switch: read its keys (the mesh-wide one
//! and its agents') before any agent starts pulling, and follow every change
//! with plain subscriptions and direct gets, never a consumer on the bucket.
//! An entry that cannot be read pauses (fail closed), loudly, until it is
//! overwritten or deleted.
//! Creating the bucket ([`open`]) is for the bot and the `mesh` commands.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use mesh_protocol::AgentId;
use mesh_protocol::access;
use mesh_protocol::killswitch::{KillState, Mode, Scope};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::backoff::{self, Transient};
use crate::nats::NatsError;
use async_nats::RequestErrorKind;

/// Entries by scope.
pub type KillStates = BTreeMap<String, KillState>;

/// Opens the kill-switch bucket, creating it when missing (the bot and the
/// `mesh` commands; a listener only looks it up: [`crate::lookup::find_bucket`]).
pub use mesh_runtime::kill_bucket::open;

/// Who an unreadable entry's pause is attributed to.
pub const UNREADABLE_BY: &str = "mesh-listener";

/// Decodes an entry; one that cannot be decoded is a hard pause (fail closed:
/// someone meant to write something, most likely a pause), logged as an
/// error that says how to clear it. Pure but for the log line.
pub fn decode_fail_closed(key: &str, value: &[u8], now: time::OffsetDateTime) -> KillState {
    KillState::decode(value).unwrap_or_else(|e| {
        error!(key, error = %e, "unreadable kill switch entry: pausing as if pulled hard; `mesh resume` (or `mesh kill`) overwrites it");
        KillState {
            mode: Mode::Hard,
            until: None,
            by: UNREADABLE_BY.to_owned(),
            reason: Some(format!("unreadable kill switch entry {key:?} ({e}); paused until `mesh resume` overwrites it")),
            at: now,
        }
    })
}

/// How often the keys are re-read besides the notifications: a change
/// published while the connection was down, or a notification lost, must not
/// leave a listener delivering through a kill, or paused after a resume.
pub const RESYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How long one direct get may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the follower has passed on, per key: the version and the entry.
pub type Seen = BTreeMap<String, (Version, Option<KillState>)>;

/// Where an entry stands in its bucket: its revision (the stream sequence;
/// 0 when never written) and when the server stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version {
    /// The revision.
    pub revision: u64,
    /// The server's time of the write (`Nats-Time-Stamp`), when known.
    pub stored: Option<time::OffsetDateTime>,
}

impl Version {
    /// A version at `revision`, stored at `stored`.
    pub fn new(revision: u64, stored: Option<time::OffsetDateTime>) -> Self {
        Self { revision, stored }
    }

    /// True when `self` is a later write than `known`: a higher revision,
    /// or a revision not higher but stored later (the bucket was deleted and
    /// created again, so its revisions restarted at one). A lagging replica's
    /// answer is both lower and older, so it never counts as newer. A key
    /// missing from a recreated bucket (revision 0, no time) changes nothing:
    /// the last entry seen holds until someone writes the key again.
    pub fn is_newer_than(&self, known: &Version) -> bool {
        if self.revision > known.revision {
            return true;
        }
        matches!((self.stored, known.stored), (Some(new), Some(old)) if new > old)
    }
}

/// The keys a listener follows: the mesh-wide one and each served agent's.
pub fn keys_of<'a>(agents: impl IntoIterator<Item = &'a AgentId>) -> BTreeSet<String> {
    let global = Scope::Global.key();
    agents.into_iter().flat_map(access::killswitch_keys_of).chain([global]).collect()
}

/// One key as stored now, read with a direct get (the only read a
/// listener's NATS user may do on the bucket): its version (revision 0 when
/// never written) and its entry (`None` when deleted, purged or never written; an
/// unreadable entry is a hard pause, see [`decode_fail_closed`]).
pub async fn read(client: &async_nats::Client, key: &str) -> Result<(Version, Option<KillState>), NatsError> {
    read_once(client, key).await.map_err(|e| e.error)
}

/// A failed direct get, and whether asking again shortly may succeed: no
/// answer in time, no responder (a bucket just created, or a cluster
/// electing the stream's leader), or a 503 "not now".
#[derive(Debug)]
struct ReadError {
    error: NatsError,
    transient: bool,
}

impl ReadError {
    fn new(key: &str, cause: impl Into<crate::nats::Cause>, transient: bool) -> Self {
        Self { error: NatsError::jetstream(format!("reading kill switch key {key}"), cause), transient }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl Transient for ReadError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

async fn read_once(client: &async_nats::Client, key: &str) -> Result<(Version, Option<KillState>), ReadError> {
    let request = client.request(access::killswitch_direct_get(key), bytes::Bytes::new());
    let answer = tokio::time::timeout(READ_TIMEOUT, request)
        .await
        .map_err(|_| ReadError::new(key, format!("no answer in {READ_TIMEOUT:?}"), true))?
        .map_err(|e| {
            let transient = matches!(e.kind(), RequestErrorKind::TimedOut | RequestErrorKind::NoResponders);
            ReadError::new(key, e, transient)
        })?;
    if answer.status == Some(async_nats::StatusCode::NOT_FOUND) {
        return Ok((Version::default(), None));
    }
    if let Some(status) = answer.status.filter(|s| !s.is_success()) {
        let why = answer.description.unwrap_or_default();
        let transient = matches!(status, async_nats::StatusCode::NO_RESPONDERS | async_nats::StatusCode::TIMEOUT);
        return Err(ReadError::new(key, format!("{status} {why}"), transient));
    }
    let headers = answer.headers.unwrap_or_default();
    let revision = headers
        .get(SEQUENCE_HEADER)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or_else(|| ReadError::new(key, "answer without a revision", false))?;
    let stored = headers
        .get(TIMESTAMP_HEADER)
        .and_then(|v| time::OffsetDateTime::parse(v.as_str(), &time::format_description::well_known::Rfc3339).ok());
    let revision = Version::new(revision, stored);
    let removed = headers.get(OPERATION_HEADER).is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
    if removed || answer.payload.is_empty() {
        return Ok((revision, None));
    }
    Ok((revision, Some(decode_fail_closed(key, &answer.payload, time::OffsetDateTime::now_utc()))))
}

/// Header of a direct get answer carrying the entry's stream sequence (its revision).
const SEQUENCE_HEADER: &str = "Nats-Sequence";
/// Header of a direct get answer carrying when the server stored the entry.
const TIMESTAMP_HEADER: &str = "Nats-Time-Stamp";
/// Header marking a key-value delete or purge.
const OPERATION_HEADER: &str = "KV-Operation";

/// Reads `keys` now: what is in force before any agent starts pulling.
pub async fn load(client: &async_nats::Client, keys: &BTreeSet<String>) -> Result<(KillStates, Seen), NatsError> {
    let (mut states, mut seen) = (KillStates::new(), Seen::new());
    for key in keys {
        // Before any agent pulls, a moment without an answer (a bucket just
        // created, a cluster electing leaders) is waited out, not fatal.
        let (revision, state) = backoff::retry(key, backoff::JETSTREAM, || read_once(client, key)).await.map_err(
            |failure| match failure {
                backoff::Failure::Permanent(e) => e.error,
                gave_up => NatsError::jetstream(
                    "reading the kill switch at start",
                    format!("{gave_up}; or check that this listener's NATS user may read the kill switch bucket"),
                ),
            },
        )?;
        if let Some(state) = &state {
            states.insert(key.clone(), state.clone());
        }
        seen.insert(key.clone(), (revision, state));
    }
    Ok((states, seen))
}

/// Sends every change of the followed keys (key, new entry or `None` when
/// deleted) until `stop`. Each key's subject is subscribed to (a put or a
/// delete is a publish there); a notification, a change of `keys` and a
/// re-read every [`RESYNC_EVERY`] all lead to a direct get, and only an
/// entry newer than the one passed on for its key is passed on (a lagging
/// replica's answer, or a rejected write's notification, changes nothing;
/// a bucket deleted and created again is noticed by the server's write
/// times: [`Version::is_newer_than`]).
pub async fn follow(
    client: async_nats::Client,
    mut seen: Seen,
    mut keys: watch::Receiver<BTreeSet<String>>,
    changes: mpsc::UnboundedSender<(String, Option<KillState>)>,
    stop: CancellationToken,
) {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut subscribed: Option<futures::stream::SelectAll<async_nats::Subscriber>> = None;
    loop {
        let notifications = match subscribed.as_mut() {
            Some(notifications) => notifications,
            None => {
                let wanted = keys.borrow_and_update().clone();
                match subscribe(&client, &wanted).await {
                    Ok(subs) => subscribed = Some(subs),
                    Err(e) => {
                        warn!(error = %e, "cannot follow the kill switch; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                        }
                    }
                }
                // Whatever changed while not subscribed.
                if !reread(&client, &wanted, &mut seen, &changes).await {
                    return;
                }
                continue;
            }
        };
        let wake = tokio::select! {
            _ = stop.cancelled() => Wake::Stop,
            changed = keys.changed() => if changed.is_ok() { Wake::Keys } else { Wake::Stop },
            _ = resync.tick() => Wake::Resync,
            message = notifications.next() => match message {
                Some(message) => Wake::Notified(message.subject.to_string()),
                None => Wake::Ended,
            },
        };
        match wake {
            Wake::Stop => return,
            Wake::Keys | Wake::Ended => subscribed = None,
            Wake::Resync => {
                let wanted = keys.borrow().clone();
                if !reread(&client, &wanted, &mut seen, &changes).await {
                    return;
                }
            }
            Wake::Notified(subject) => {
                let prefix = access::killswitch_key_subject("");
                let Some(key) = subject.strip_prefix(&prefix).filter(|k| keys.borrow().contains(*k)) else {
                    continue;
                };
                if !read_change(&client, key, &mut seen, &changes).await {
                    return;
                }
            }
        }
    }
}

/// Reads a key after a notification. The notification can arrive before the
/// stream has stored the write (or before the replica answering has it), so
/// a revision not newer than the one passed on is read again a few times,
/// briefly; a write the stream refused stays at the old revision, and the
/// next re-read settles anything left. False when the receiver is gone.
async fn read_change(
    client: &async_nats::Client,
    key: &str,
    seen: &mut Seen,
    changes: &mpsc::UnboundedSender<(String, Option<KillState>)>,
) -> bool {
    let known = seen.get(key).map_or_else(Version::default, |(version, _)| *version);
    for attempt in 0..NOTIFIED_READS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        match read(client, key).await {
            Ok((version, state)) if version.is_newer_than(&known) => {
                return pass_on(seen, key, version, state, changes);
            }
            Ok(_) => {}
            Err(e) => warn!(key, error = %e, "cannot read a changed kill switch key; the next re-read retries"),
        }
    }
    true
}

/// Reads of a key after one notification, at most.
const NOTIFIED_READS: u32 = 5;

/// What woke the follower.
enum Wake {
    Stop,
    Keys,
    Resync,
    Notified(String),
    Ended,
}

async fn subscribe(
    client: &async_nats::Client,
    keys: &BTreeSet<String>,
) -> Result<futures::stream::SelectAll<async_nats::Subscriber>, async_nats::SubscribeError> {
    let mut all = futures::stream::SelectAll::new();
    for key in keys {
        all.push(client.subscribe(access::killswitch_key_subject(key)).await?);
    }
    Ok(all)
}

/// Passes an entry on when it is newer than what was passed on for its key;
/// false when the receiver is gone.
fn pass_on(
    seen: &mut Seen,
    key: &str,
    version: Version,
    state: Option<KillState>,
    changes: &mpsc::UnboundedSender<(String, Option<KillState>)>,
) -> bool {
    if seen.get(key).is_some_and(|(known, _)| !version.is_newer_than(known)) {
        return true;
    }
    let changed = seen.get(key).is_none_or(|(_, known)| *known != state);
    seen.insert(key.to_owned(), (version, state.clone()));
    !changed || changes.send((key.to_owned(), state)).is_ok()
}

/// Re-reads every followed key; false when the receiver is gone. A failed
/// read is left to the next round.
async fn reread(
    client: &async_nats::Client,
    keys: &BTreeSet<String>,
    seen: &mut Seen,
    changes: &mpsc::UnboundedSender<(String, Option<KillState>)>,
) -> bool {
    for key in keys {
        if let Ok((version, state)) = read(client, key).await
            && !pass_on(seen, key, version, state, changes)
        {
            return false;
        }
    }
    true
}

/// The entry of a scope.
pub fn entry<'a>(states: &'a KillStates, scope: &Scope) -> Option<&'a KillState> {
    states.get(&scope.key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::killswitch::Mode;
    use time::OffsetDateTime;

    /// A version stored `revision` seconds after the epoch (later revisions, later writes).
    fn v(revision: u64) -> Version {
        Version::new(revision, Some(OffsetDateTime::UNIX_EPOCH + std::time::Duration::from_secs(revision)))
    }

    #[test]
    fn a_recreated_bucket_is_noticed_by_the_write_time() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hard =
            KillState { mode: Mode::Hard, until: None, by: "d".into(), reason: None, at: OffsetDateTime::UNIX_EPOCH };
        let mut seen = Seen::new();
        assert!(pass_on(&mut seen, "global", v(40), None, &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), None));
        // The bucket was deleted and created again: revision 1, written later.
        let later = Version::new(1, Some(OffsetDateTime::UNIX_EPOCH + std::time::Duration::from_secs(100)));
        assert!(pass_on(&mut seen, "global", later, Some(hard.clone()), &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), Some(hard.clone())));
        // A key missing from the new bucket leaves the last entry in force.
        assert!(pass_on(&mut seen, "global", Version::default(), None, &tx));
        assert!(rx.try_recv().is_err());
        // An answer without a write time counts by revision alone.
        assert!(!Version::new(1, None).is_newer_than(&v(40)));
        assert!(Version::new(41, None).is_newer_than(&v(40)));
    }

    #[test]
    fn only_newer_changes_are_passed_on() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hard =
            KillState { mode: Mode::Hard, until: None, by: "d".into(), reason: None, at: OffsetDateTime::UNIX_EPOCH };
        let mut seen = Seen::new();
        assert!(pass_on(&mut seen, "global", v(2), Some(hard.clone()), &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), Some(hard.clone())));
        // A notification and a re-read both saw revision 2: passed on once.
        assert!(pass_on(&mut seen, "global", v(2), Some(hard.clone()), &tx));
        assert!(rx.try_recv().is_err());
        // A lagging replica's older answer does not undo the kill.
        assert!(pass_on(&mut seen, "global", v(1), None, &tx));
        assert!(rx.try_recv().is_err());
        // A newer delete (a resume) is passed on.
        assert!(pass_on(&mut seen, "global", v(3), None, &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), None));
        drop(rx);
        assert!(!pass_on(&mut seen, "global", v(4), Some(hard), &tx), "the receiver is gone");
    }

    #[test]
    fn a_listener_follows_the_global_key_and_its_agents() {
        let ids: Vec<AgentId> = ["nova", "kaan"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(keys_of(&ids).into_iter().collect::<Vec<_>>(), ["agent.kaan", "agent.nova", "global"]);
        assert_eq!(keys_of(&[]).into_iter().collect::<Vec<_>>(), ["global"]);
    }

    #[test]
    fn an_unreadable_entry_pauses_hard_until_deleted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut seen = Seen::new();
        let garbage = decode_fail_closed("global", b"{not a kill state", OffsetDateTime::now_utc());
        assert!(pass_on(&mut seen, "global", v(5), Some(garbage), &tx));
        let (key, state) = rx.try_recv().unwrap();
        let state = state.expect("an unreadable entry is a pause, not a deletion");
        assert_eq!(
            (key.as_str(), state.mode, state.until, state.by.as_str()),
            ("global", Mode::Hard, None, UNREADABLE_BY)
        );
        assert!(state.reason.as_deref().unwrap().contains("unreadable kill switch entry \"global\""));
        assert!(state.in_force(OffsetDateTime::now_utc()));
        // Deleting it resumes.
        assert!(pass_on(&mut seen, "global", v(6), None, &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), None));
    }
}
