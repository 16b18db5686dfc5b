//! Runs a chat request once across the bot replicas when the platform hands
//! it to each of them (a Discord gateway message reaches every replica's
//! session; Socket Mode may redeliver on another replica's connection): the
//! first replica to create the request's key in the [`BUCKET`] bucket runs
//! it. This holds with or without Redis, as long as NATS answers (and no
//! command runs without NATS); Redis, when set, is asked first by
//! [`crate::limits::LimitStore`].

use async_nats::jetstream::{self, kv};

/// The bucket of request keys seen by any replica.
pub const BUCKET: &str = mesh_protocol::layout::DEDUP_BUCKET;

/// The shared dedup bucket.
#[derive(Debug)]
pub struct FleetDedup {
    kv: kv::Store,
}

impl FleetDedup {
    /// Opens the bucket, creating it when missing; keys expire after `ttl`.
    pub async fn open(
        js: &jetstream::Context,
        ttl: std::time::Duration,
        setting: mesh_protocol::layout::Replicas,
    ) -> Result<Self, mesh_runtime::nats::NatsError> {
        let config = kv::Config {
            bucket: BUCKET.to_owned(),
            description: "chat requests already handled by a mesh bot replica".to_owned(),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let kv = mesh_runtime::nats::open_or_create_bucket(js, config, setting).await?;
        Ok(Self { kv })
    }

    /// True for the one replica that records `key` first; true as well when
    /// the bucket cannot be written (better run than lose a command).
    pub async fn first(&self, key: &str) -> bool {
        let key = crate::limits::hashed(key);
        match self.kv.create(&key, bytes::Bytes::new()).await {
            Ok(_) => true,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Err(e) => {
                tracing::warn!(error = %e, "request dedup bucket unwritable; running the request here");
                true
            }
        }
    }
}
