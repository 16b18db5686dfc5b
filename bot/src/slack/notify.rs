//! Relays mesh events to a Slack channel through [`crate::notify::relay`]
//! (Slack allows about one post per second per channel).

use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use super::api::SlackApi;

/// Posts events to `channel` until `stop`, at most one post per `interval`.
pub async fn relay(
    js: jetstream::Context,
    api: SlackApi,
    channel: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let post = |reply| {
        let (api, channel) = (api.clone(), channel.clone());
        async move { api.post(&channel, &reply, None).await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    crate::notify::relay(js, "slack", interval, stop, post).await;
}
