//! Connecting to NATS and creating the streams and consumers described in
//! [`mesh_protocol::layout`].

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use mesh_protocol::AgentId;
use mesh_protocol::layout::{self, ConsumerSpec, ConsumerTuning, StreamSpec};

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
        "JetStream request failed: {0}; check that nats-server runs with JetStream enabled (-js) and has disk space"
    )]
    JetStream(String),
}

/// Options with the credentials and inbox prefix from the environment
/// ([`NATS_USER_ENV`] with [`NATS_PASSWORD_ENV`] or [`NATS_PASSWORD_FILE_ENV`],
/// [`INBOX_PREFIX_ENV`]).
pub fn options_from_env(name: &str) -> Result<async_nats::ConnectOptions, NatsError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut options = async_nats::ConnectOptions::new().name(name);
    if let Some(user) = env(NATS_USER_ENV) {
        let password = match (env(NATS_PASSWORD_ENV), env(NATS_PASSWORD_FILE_ENV)) {
            (Some(p), _) => p,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map(|p| p.trim().to_owned())
                .map_err(|e| NatsError::Credentials(format!("cannot read {NATS_PASSWORD_FILE_ENV} {path}: {e}")))?,
            (None, None) => {
                return Err(NatsError::Credentials(format!(
                    "{NATS_USER_ENV} is set but neither {NATS_PASSWORD_ENV} nor {NATS_PASSWORD_FILE_ENV}"
                )));
            }
        };
        options = options.user_and_password(user, password);
    }
    if let Some(prefix) = env(INBOX_PREFIX_ENV) {
        options = options.custom_inbox_prefix(prefix);
    }
    Ok(options)
}

/// Connects once, failing within [`CONNECT_TIMEOUT`] (for commands).
pub async fn connect_now(url: &str, name: &str) -> Result<async_nats::Client, NatsError> {
    let options = options_from_env(name)?.connection_timeout(CONNECT_TIMEOUT).max_reconnects(Some(3));
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), options.connect(url)).await;
    match attempt {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(NatsError::Unreachable { url: url.to_owned(), reason: e.to_string() }),
        Err(_) => Err(NatsError::Unreachable { url: url.to_owned(), reason: "timed out".into() }),
    }
}

/// Connects for a long-running service: returns at once and keeps
/// (re)connecting in the background for as long as the process runs.
pub async fn connect_service(url: &str, name: &str) -> Result<async_nats::Client, NatsError> {
    connect_watched(url, name).await.map(|(client, _)| client)
}

/// Like [`connect_service`], with a counter that goes up on every
/// (re)connection: pull loops restart their pulls when it changes, since a
/// restarted server has forgotten them.
pub async fn connect_watched(
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<u64>), NatsError> {
    let (connects_tx, connects) = tokio::sync::watch::channel(0u64);
    let client = options_from_env(name)?
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
        .connect(url)
        .await
        .map_err(|e| NatsError::Unreachable { url: url.to_owned(), reason: e.to_string() })?;
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
        ..Default::default()
    }
}

/// Creates every mesh stream that does not exist yet.
pub async fn ensure_streams(js: &jetstream::Context, replicas: usize) -> Result<(), NatsError> {
    for spec in layout::all_streams(replicas) {
        js.get_or_create_stream(stream_config(&spec))
            .await
            .map_err(|e| NatsError::JetStream(format!("creating stream {}: {e}", spec.name)))?;
    }
    Ok(())
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
/// existing one (what a sender does before publishing).
pub async fn ensure_consumer(js: &jetstream::Context, agent: &AgentId) -> Result<(), NatsError> {
    let spec = layout::agent_consumer(agent, ConsumerTuning::default());
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::JetStream(format!("opening stream {}: {e}", spec.stream)))?;
    stream
        .get_or_create_consumer::<pull::Config>(&spec.durable, consumer_config(&spec))
        .await
        .map_err(|e| NatsError::JetStream(format!("creating consumer {}: {e}", spec.durable)))?;
    Ok(())
}

/// Creates or updates an agent's consumer with the listener's tuning. An
/// existing consumer keeps its start position (a restored one starts at a
/// sequence; the server refuses to change that).
pub async fn bind_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
    tuning: ConsumerTuning,
) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let spec = layout::agent_consumer(agent, tuning);
    let stream = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| NatsError::JetStream(format!("opening stream {}: {e}", spec.stream)))?;
    let mut config = consumer_config(&spec);
    if let Ok(existing) = stream.consumer_info(&spec.durable).await {
        config.deliver_policy = existing.config.deliver_policy;
    }
    stream
        .create_consumer(config)
        .await
        .map_err(|e| NatsError::JetStream(format!("binding consumer {}: {e}", spec.durable)))
}
