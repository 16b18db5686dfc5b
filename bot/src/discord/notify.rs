//! Relays mesh events to a Discord channel through [`crate::notify::relay`]:
//! at most one post per interval, well within Discord's limit of five
//! messages per five seconds in a channel.

use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use super::api::DiscordApi;

/// Posts events to `channel` until `stop`, at most one post per `interval`.
pub async fn relay(
    js: jetstream::Context,
    api: DiscordApi,
    channel: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let post = |reply| {
        let (api, channel) = (api.clone(), channel.clone());
        async move { api.post(&channel, &reply, None).await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    crate::notify::relay(js, "discord", interval, stop, post).await;
}
