//! The listener's side of the kill switch: open the bucket, read what is in
//! force before any agent starts pulling, and follow every change.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use mesh_protocol::killswitch::{BUCKET, KillState, Scope};
use mesh_protocol::layout::Replicas;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::nats::NatsError;

/// Entries by scope.
pub type KillStates = BTreeMap<String, KillState>;

/// Opens the kill-switch bucket, creating it when missing.
pub async fn open(js: &jetstream::Context, setting: Replicas) -> Result<kv::Store, NatsError> {
    let replicas = crate::nats::resolve_replicas(js, setting).await?;
    if let Ok(store) = js.get_key_value(BUCKET).await {
        if let Ok(mut stream) = js.get_stream(&store.stream_name).await
            && let Ok(info) = stream.info().await
        {
            crate::nats::scale_up(js, info, replicas).await;
        }
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: BUCKET.to_owned(),
        description: "mesh kill switch: global and per-agent pause state".to_owned(),
        history: 16,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::JetStream(crate::nats::creation_error(&format!("KV_{BUCKET}"), replicas, &e.to_string())))
}

/// Reads every entry now.
pub async fn load(store: &kv::Store) -> Result<KillStates, NatsError> {
    let mut out = KillStates::new();
    let mut keys = store.keys().await.map_err(|e| NatsError::JetStream(format!("listing {BUCKET}: {e}")))?;
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| NatsError::JetStream(format!("listing {BUCKET}: {e}")))?;
        if let Ok(Some(value)) = store.get(&key).await {
            match KillState::decode(&value) {
                Ok(state) => {
                    out.insert(key, state);
                }
                Err(e) => warn!(key, error = %e, "ignoring a kill switch entry"),
            }
        }
    }
    Ok(out)
}

/// Sends every change (key, new entry or `None` when deleted) until `stop`.
pub async fn watch(
    store: kv::Store,
    changes: mpsc::UnboundedSender<(String, Option<KillState>)>,
    stop: CancellationToken,
) {
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
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    let state = match entry.operation {
                        kv::Operation::Put => KillState::decode(&entry.value).ok(),
                        _ => None,
                    };
                    if changes.send((entry.key, state)).is_err() {
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

/// The entry of a scope.
pub fn entry<'a>(states: &'a KillStates, scope: &Scope) -> Option<&'a KillState> {
    states.get(&scope.key())
}
