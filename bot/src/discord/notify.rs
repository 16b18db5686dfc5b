//! Relays mesh events (broadcasts, kill-switch changes, agent down/up, dead
//! letters) to a Discord channel, coalescing bursts so the channel gets at
//! most one post per interval, well within Discord's limit of five messages
//! per five seconds in a channel.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use mesh_protocol::event::Event;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::api::DiscordApi;
use crate::command::Reply;

/// Longest batch of events in one post.
const MAX_BATCH: usize = 40;

/// Posts events to `channel` until `stop`, at most one post per `interval`.
pub async fn relay(
    js: jetstream::Context,
    api: DiscordApi,
    channel: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let stream = match js.get_stream(crate::killswitch::events_stream()).await {
        Ok(stream) => stream,
        Err(e) => {
            warn!(error = %e, "discord notifications disabled: no events stream");
            return;
        }
    };
    let consumer = match stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
    {
        Ok(consumer) => consumer,
        Err(e) => {
            warn!(error = %e, "discord notifications disabled: cannot follow events");
            return;
        }
    };
    let Ok(mut messages) = consumer.messages().await else {
        warn!("discord notifications disabled: cannot pull events");
        return;
    };
    let mut last_post = tokio::time::Instant::now() - interval;
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => { warn!(error = %e, "event stream error"); continue; }
                None => return,
            },
        };
        let mut batch: Vec<Event> = Event::decode(&first.payload).into_iter().collect();
        // Gather whatever else arrives until the channel may be posted to again.
        let window = (last_post + interval).max(tokio::time::Instant::now() + Duration::from_millis(200));
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(window, messages.next()).await {
                Ok(Some(Ok(message))) => batch.extend(Event::decode(&message.payload)),
                _ => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = api.post(&channel, &events_reply(&batch), None).await {
            warn!(error = %e, "discord notification not posted");
        }
        last_post = tokio::time::Instant::now();
    }
}

/// One post for a batch of events.
pub fn events_reply(batch: &[Event]) -> Reply {
    let title = if batch.len() == 1 { "mesh event".to_owned() } else { format!("{} mesh events", batch.len()) };
    let lines = batch.iter().map(|e| format!("{} {}", crate::killswitch::rfc3339(e.at), e.text));
    Reply::info(title).with_lines(None, lines)
}
