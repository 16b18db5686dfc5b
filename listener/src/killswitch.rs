//! The listener's side of the kill switch: read what is in force before any
//! agent starts pulling, and follow every change. An entry that cannot be
//! read pauses (fail closed), loudly, until it is overwritten or deleted.
//! Creating the bucket ([`open`]) is for the bot and the `mesh` commands.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use futures::StreamExt;
use mesh_protocol::killswitch::{BUCKET, KillState, Mode, Scope};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::nats::NatsError;

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

/// Reads every entry now.
pub async fn load(store: &kv::Store) -> Result<KillStates, NatsError> {
    let mut out = KillStates::new();
    let mut keys = store.keys().await.map_err(|e| NatsError::JetStream(format!("listing {BUCKET}: {e}")))?;
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| NatsError::JetStream(format!("listing {BUCKET}: {e}")))?;
        if let Ok(Some(value)) = store.get(&key).await {
            let state = decode_fail_closed(&key, &value, time::OffsetDateTime::now_utc());
            out.insert(key, state);
        }
    }
    Ok(out)
}

/// How often the bucket is re-read besides the watch: a watch that stalls
/// without an error (its stream losing a leader mid-watch on a cluster) must
/// not leave a listener delivering through a kill, or paused after a resume.
pub const RESYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the watcher has passed on, per key: the revision and the entry.
type Seen = BTreeMap<String, (u64, Option<KillState>)>;

/// Sends every change (key, new entry or `None` when deleted) until `stop`,
/// from the watch and from a re-read every [`RESYNC_EVERY`]; an entry older
/// than one already passed on (a lagging replica's answer) is ignored.
pub async fn watch(
    store: kv::Store,
    changes: mpsc::UnboundedSender<(String, Option<KillState>)>,
    stop: CancellationToken,
) {
    let mut seen = Seen::new();
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut watch = match store.watch_all().await {
            Ok(watch) => watch,
            Err(e) => {
                warn!(error = %e, "cannot watch the kill switch; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return,
                _ = resync.tick() => {
                    if !reread(&store, &mut seen, &changes).await {
                        return;
                    }
                    continue;
                }
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    if !pass_on(&mut seen, entry, &changes) {
                        return;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "kill switch watch failed; rewatching");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Passes an entry on when it is newer than what was passed on for its key;
/// false when the receiver is gone.
fn pass_on(seen: &mut Seen, entry: kv::Entry, changes: &mpsc::UnboundedSender<(String, Option<KillState>)>) -> bool {
    if seen.get(&entry.key).is_some_and(|(revision, _)| *revision >= entry.revision) {
        return true;
    }
    let state = match entry.operation {
        kv::Operation::Put => Some(decode_fail_closed(&entry.key, &entry.value, entry.created)),
        _ => None,
    };
    let changed = seen.get(&entry.key).is_none_or(|(_, known)| *known != state);
    seen.insert(entry.key.clone(), (entry.revision, state.clone()));
    !changed || changes.send((entry.key, state)).is_ok()
}

/// Re-reads every key (those listed now and those seen before); false when
/// the receiver is gone. A failed read is left to the next round.
async fn reread(
    store: &kv::Store,
    seen: &mut Seen,
    changes: &mpsc::UnboundedSender<(String, Option<KillState>)>,
) -> bool {
    let mut keys: Vec<String> = seen.keys().cloned().collect();
    if let Ok(mut listed) = store.keys().await {
        while let Some(Ok(key)) = listed.next().await {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    for key in keys {
        if let Ok(Some(entry)) = store.entry(key.as_str()).await
            && !pass_on(seen, entry, changes)
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

    fn entry(revision: u64, state: Option<&KillState>) -> kv::Entry {
        kv::Entry {
            bucket: BUCKET.into(),
            key: "global".into(),
            value: state.map(|s| s.encode().into()).unwrap_or_default(),
            revision,
            delta: 0,
            created: OffsetDateTime::UNIX_EPOCH,
            operation: if state.is_some() { kv::Operation::Put } else { kv::Operation::Delete },
            seen_current: true,
        }
    }

    #[test]
    fn only_newer_changes_are_passed_on() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hard =
            KillState { mode: Mode::Hard, until: None, by: "d".into(), reason: None, at: OffsetDateTime::UNIX_EPOCH };
        let mut seen = Seen::new();
        assert!(pass_on(&mut seen, entry(2, Some(&hard)), &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), Some(hard.clone())));
        // The watch and a re-read both saw revision 2: passed on once.
        assert!(pass_on(&mut seen, entry(2, Some(&hard)), &tx));
        assert!(rx.try_recv().is_err());
        // A lagging replica's older answer does not undo the kill.
        assert!(pass_on(&mut seen, entry(1, None), &tx));
        assert!(rx.try_recv().is_err());
        // A newer delete (a resume) is passed on.
        assert!(pass_on(&mut seen, entry(3, None), &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), None));
        drop(rx);
        assert!(!pass_on(&mut seen, entry(4, Some(&hard)), &tx), "the receiver is gone");
    }

    #[test]
    fn an_unreadable_entry_pauses_hard_until_deleted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut seen = Seen::new();
        let mut garbage = entry(5, None);
        garbage.operation = kv::Operation::Put;
        garbage.value = "{not a kill state".into();
        assert!(pass_on(&mut seen, garbage, &tx));
        let (key, state) = rx.try_recv().unwrap();
        let state = state.expect("an unreadable entry is a pause, not a deletion");
        assert_eq!(
            (key.as_str(), state.mode, state.until, state.by.as_str()),
            ("global", Mode::Hard, None, UNREADABLE_BY)
        );
        assert!(state.reason.as_deref().unwrap().contains("unreadable kill switch entry \"global\""));
        assert!(state.in_force(OffsetDateTime::now_utc()));
        // Deleting it resumes.
        assert!(pass_on(&mut seen, entry(6, None), &tx));
        assert_eq!(rx.try_recv().unwrap(), ("global".to_owned(), None));
    }
}
