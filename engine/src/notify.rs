//! The notifications relay shared by the chat front ends: follows the events
//! stream (broadcasts, kill-switch changes, agents down and up, dead letters)
//! and hands batches to a platform's `post`, coalescing bursts so a channel
//! gets at most one post per interval.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use mesh_protocol::event::Event;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::command::Reply;

/// Longest batch of events in one post.
const MAX_BATCH: usize = 40;

/// Posts events through `post` until `stop`, at most one post per `interval`;
/// `platform` names the front end in log lines.
pub async fn relay<P, F>(
    js: jetstream::Context,
    platform: &'static str,
    interval: Duration,
    stop: CancellationToken,
    post: P,
) where
    P: Fn(Reply) -> F,
    F: Future<Output = Result<(), String>>,
{
    let stream = match js.get_stream(crate::killswitch::events_stream()).await {
        Ok(stream) => stream,
        Err(e) => {
            warn!(platform, error = %e, "notifications disabled: no events stream");
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
            warn!(platform, error = %e, "notifications disabled: cannot follow events");
            return;
        }
    };
    let Ok(mut messages) = consumer.messages().await else {
        warn!(platform, "notifications disabled: cannot pull events");
        return;
    };
    let mut last_post = tokio::time::Instant::now() - interval;
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => { warn!(platform, error = %e, "event stream error"); continue; }
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
        if let Err(e) = post(events_reply(&batch)).await {
            warn!(platform, error = %e, "notification not posted");
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
