//! The notifications relay shared by the chat front ends: follows the events
//! stream (broadcasts, kill-switch changes, agents down and up, dead letters)
//! through one durable consumer per platform, shared by every bot replica,
//! and hands batches to a platform's `post`, coalescing bursts so a channel
//! gets at most one post per interval. A batch is acknowledged only once
//! posted: a failed post is retried with backoff (waiting out `Retry-After`),
//! and events published while no bot runs are posted once one starts.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use mesh_protocol::event::{Event, EventKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::command::{ActionStyle, ButtonId, Reply};

/// Longest batch of events in one post.
const MAX_BATCH: usize = 40;
/// How long the server waits for a batch's ack before handing it to another
/// replica (kept alive with in-progress acks while a post is retried).
pub const ACK_WAIT: Duration = Duration::from_secs(120);
/// First wait after a failed post; doubles up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between two attempts at a post (a longer `Retry-After` is cut to it).
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// Wait before trying again to set up the consumer.
const SETUP_RETRY: Duration = Duration::from_secs(2);
/// Longest fallback text (what phones show in a notification).
const MAX_FALLBACK_CHARS: usize = 300;

/// One notification: the reply to render and a plain-text summary of its
/// content for the platform's fallback text.
#[derive(Debug, Clone)]
pub struct Notification {
    /// What the channel shows.
    pub reply: Reply,
    /// The events' text, plain (renderers escape it), at most [`MAX_FALLBACK_CHARS`].
    pub text: String,
}

/// Why a post failed, and how long the platform asked us to wait.
#[derive(Debug, Clone)]
pub struct PostFailure {
    /// What went wrong (no token, no URL).
    pub detail: String,
    /// The platform's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl PostFailure {
    /// A failure without a `Retry-After`.
    pub fn new(detail: impl Into<String>) -> Self {
        Self { detail: detail.into(), retry_after: None }
    }
}

/// The durable consumer of a platform's relay (shared by every replica).
pub fn durable_name(platform: &str) -> String {
    format!("mesh-notify-{platform}")
}

/// The wait before attempt `retry + 1` of a post: the platform's
/// `Retry-After` when given, else doubling from one second; at most [`MAX_RETRY_WAIT`].
pub fn retry_wait(retry: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = FIRST_RETRY_WAIT.saturating_mul(2u32.saturating_pow(retry.min(16)));
    retry_after.unwrap_or(backoff).min(MAX_RETRY_WAIT)
}

/// Posts events through `post` until `stop`, at most one post per `interval`;
/// `platform` names the front end in log lines and its durable consumer.
pub async fn relay<P, F>(
    js: jetstream::Context,
    platform: &'static str,
    interval: Duration,
    stop: CancellationToken,
    post: P,
) where
    P: Fn(Notification) -> F,
    F: Future<Output = Result<(), PostFailure>>,
{
    let Some(consumer) = open_consumer(&js, platform, &stop).await else { return };
    let mut messages = loop {
        match consumer.messages().await {
            Ok(messages) => break messages,
            Err(e) => {
                warn!(platform, error = %e, "cannot pull events yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(SETUP_RETRY) => {}
                }
            }
        }
    };
    info!(platform, durable = %durable_name(platform), "notifications relay following events");
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
        let mut held = vec![first];
        // Gather whatever else arrives until the channel may be posted to again.
        let window = (last_post + interval).max(tokio::time::Instant::now() + Duration::from_millis(200));
        while held.len() < MAX_BATCH {
            match tokio::time::timeout_at(window, messages.next()).await {
                Ok(Some(Ok(message))) => held.push(message),
                _ => break,
            }
        }
        let batch: Vec<Event> = held.iter().filter_map(|m| Event::decode(&m.payload).ok()).collect();
        if !batch.is_empty() && !post_until_done(platform, &post, &batch, &held, &stop).await {
            // Stopping: hand the batch back at once (another replica, or this bot's next start, posts it).
            for message in &held {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
            return;
        }
        for message in &held {
            if let Err(e) = message.ack().await {
                warn!(platform, error = %e, "event posted but not acknowledged; it may be posted again");
            }
        }
        last_post = tokio::time::Instant::now();
    }
}

/// Creates (or binds to) the platform's durable consumer, retrying until `stop`.
async fn open_consumer(
    js: &jetstream::Context,
    platform: &'static str,
    stop: &CancellationToken,
) -> Option<consumer::Consumer<consumer::pull::Config>> {
    let durable = durable_name(platform);
    let config = consumer::pull::Config {
        durable_name: Some(durable.clone()),
        description: Some(format!("{platform} notifications relay of the mesh bots")),
        // Only events from the first bot's start on; later restarts resume where the fleet left off.
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        ..Default::default()
    };
    let mut warned = false;
    loop {
        let opened = async {
            let stream = js.get_stream(crate::killswitch::events_stream()).await.map_err(|e| e.to_string())?;
            stream.get_or_create_consumer(&durable, config.clone()).await.map_err(|e| e.to_string())
        };
        match opened.await {
            Ok(consumer) => return Some(consumer),
            Err(e) if !warned => {
                warn!(platform, error = %e, "notifications waiting for the events stream; retrying");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(SETUP_RETRY) => {}
        }
    }
}

/// Posts `batch` until it is posted (true) or `stop` (false), keeping the
/// held messages from being redelivered meanwhile.
async fn post_until_done<P, F>(
    platform: &'static str,
    post: &P,
    batch: &[Event],
    held: &[jetstream::Message],
    stop: &CancellationToken,
) -> bool
where
    P: Fn(Notification) -> F,
    F: Future<Output = Result<(), PostFailure>>,
{
    let notification = events_notification(batch);
    for retry in 0u32.. {
        let failure = tokio::select! {
            _ = stop.cancelled() => return false,
            posted = post(notification.clone()) => match posted {
                Ok(()) => return true,
                Err(failure) => failure,
            },
        };
        let wait = retry_wait(retry, failure.retry_after);
        warn!(platform, error = %failure.detail, retry_in = ?wait, events = batch.len(), "notification not posted yet");
        for message in held {
            let _ = message.ack_with(AckKind::Progress).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    false
}

/// One notification for a batch of events: the reply, and the events' text
/// as the fallback (what a phone shows), not a generic title.
pub fn events_notification(batch: &[Event]) -> Notification {
    let joined = batch.iter().map(|e| e.text.as_str()).collect::<Vec<_>>().join("; ");
    let text = if batch.len() == 1 { joined } else { format!("{} mesh events: {joined}", batch.len()) };
    let text = if text.chars().count() > MAX_FALLBACK_CHARS {
        let mut cut: String = text.chars().take(MAX_FALLBACK_CHARS - 1).collect();
        cut.push('…');
        cut
    } else {
        text
    };
    Notification { reply: events_reply(batch), text }
}

/// One post for a batch of events, with the buttons its events call for.
pub fn events_reply(batch: &[Event]) -> Reply {
    let title = if batch.len() == 1 { "mesh event".to_owned() } else { format!("{} mesh events", batch.len()) };
    let lines = batch.iter().map(|e| format!("{} {}", crate::killswitch::rfc3339(e.at), e.text));
    let mut reply = Reply::info(title).with_lines(None, lines);
    for (label, id, style) in batch.iter().flat_map(event_buttons) {
        let id = id.to_string();
        if reply.actions.len() < MAX_BUTTONS && !reply.actions.iter().any(|a| a.id == id) {
            reply = reply.with_action(label, id, style);
        }
    }
    reply
}

/// Most buttons on one notification (one Discord action row).
const MAX_BUTTONS: usize = 5;

/// The buttons of one event: a kill switch pulled -> Resume; an agent down
/// -> Ping; dead letters -> Replay (of the newest dead letter, that one
/// only, named by its sequence) and Show. A click runs that command through the engine as the clicker, with
/// the clicker's role (`resume` of a hard pause still needs a director).
fn event_buttons(event: &Event) -> Vec<(String, ButtonId, ActionStyle)> {
    let agent = event.agent.as_deref().and_then(|a| mesh_protocol::AgentId::parse(a).ok());
    let named = |verb: &str| match &agent {
        Some(agent) => format!("{verb} {agent}"),
        None => verb.to_owned(),
    };
    match event.kind {
        EventKind::Killswitch if event.text.starts_with(crate::killswitch::PULLED_EVENT) => {
            vec![(named("Resume"), ButtonId::Resume(agent), ActionStyle::Primary)]
        }
        EventKind::Agent if agent.is_some() && event.text.contains(crate::events::DOWN_EVENT) => {
            vec![("Ping".to_owned(), ButtonId::Ping, ActionStyle::Plain)]
        }
        EventKind::Dlq => match (agent, event.dead_letter) {
            (Some(agent), Some(dead_letter)) => vec![
                (
                    format!("Replay {agent}"),
                    ButtonId::Replay { agent: agent.clone(), dead_letter },
                    ActionStyle::Primary,
                ),
                (format!("Show {agent}"), ButtonId::Show(Some(agent)), ActionStyle::Plain),
            ],
            (Some(agent), None) => vec![(format!("Show {agent}"), ButtonId::Show(Some(agent)), ActionStyle::Plain)],
            (None, _) => vec![("Show".to_owned(), ButtonId::Show(None), ActionStyle::Plain)],
        },
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_text_carries_the_events() {
        let one = events_notification(&[Event::now(EventKind::Broadcast, "broadcast: maintenance tonight")]);
        assert_eq!(one.text, "broadcast: maintenance tonight");
        let two = events_notification(&[
            Event::now(EventKind::Killswitch, "SOFT pause"),
            Event::now(EventKind::Agent, "agent nova is back"),
        ]);
        assert_eq!(two.text, "2 mesh events: SOFT pause; agent nova is back");
        let long = events_notification(&[Event::now(EventKind::Broadcast, "x".repeat(1000))]);
        assert_eq!(long.text.chars().count(), MAX_FALLBACK_CHARS);
    }

    #[test]
    fn notifications_carry_the_buttons_their_events_call_for() {
        let ids = |batch: &[Event]| events_reply(batch).actions.into_iter().map(|a| a.id).collect::<Vec<_>>();
        let pulled = format!("{} HARD pause of agent nova", crate::killswitch::PULLED_EVENT);
        assert_eq!(ids(&[Event::now(EventKind::Killswitch, pulled.clone()).about("nova")]), ["mesh:resume:nova"]);
        assert_eq!(ids(&[Event::now(EventKind::Killswitch, pulled)]), ["mesh:resume"]);
        assert!(ids(&[Event::now(EventKind::Killswitch, "kill switch released for the mesh by x")]).is_empty());
        let down = format!("agent nova {} (no pong)", crate::events::DOWN_EVENT);
        assert_eq!(ids(&[Event::now(EventKind::Agent, down).about("nova")]), ["mesh:ping"]);
        assert!(ids(&[Event::now(EventKind::Agent, "agent nova is back").about("nova")]).is_empty());
        let dead = Event::now(EventKind::Dlq, "1 new dead letters (1 stored); see `dlq`");
        assert_eq!(ids(&[dead.clone().about("nova").dead_letter(42)]), ["mesh:replay:nova:42", "mesh:dlq:nova"]);
        assert_eq!(ids(&[dead.clone().about("nova")]), ["mesh:dlq:nova"], "no dead letter named: nothing to replay");
        assert_eq!(ids(&[dead.clone(), dead.clone()]), ["mesh:dlq"], "one button per id");
        assert_eq!(ids(&[dead.about("../x")]), ["mesh:dlq"], "an invalid agent names none");
        assert!(ids(&[Event::now(EventKind::Broadcast, "hello")]).is_empty());
    }

    #[test]
    fn retries_wait_out_retry_after_or_back_off() {
        assert_eq!(retry_wait(0, None), Duration::from_secs(1));
        assert_eq!(retry_wait(3, None), Duration::from_secs(8));
        assert_eq!(retry_wait(30, None), MAX_RETRY_WAIT);
        assert_eq!(retry_wait(0, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(retry_wait(0, Some(Duration::from_secs(3600))), MAX_RETRY_WAIT);
    }
}
