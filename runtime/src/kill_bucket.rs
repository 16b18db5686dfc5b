//! The kill switch's JetStream bucket: opened (created when missing, scaled
//! up to the replicas in force) the same way by the bot and the listeners.

use async_nats::jetstream::{self, kv};
use mesh_protocol::killswitch::BUCKET;
use mesh_protocol::layout::Replicas;

use crate::nats::NatsError;

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
    .map_err(|e| NatsError::Stream {
        explained: crate::nats::creation_error(&format!("KV_{BUCKET}"), replicas, &e.to_string()),
        source: Box::new(e),
    })
}
