//! Message commands from the gateway: `!mesh <command>` in a channel, a
//! thread or a DM. Reading a [`Message`] into a [`Request`] is pure; answering
//! runs the engine and posts the rendered reply in the same channel (a thread
//! is a channel too), as a reply to the command; an `ask` answer follows as a
//! reply to the bot's "asked" message; a confirmation prompt is edited to
//! "expired" when its window passes undecided. Only the gateway handler calls this.

use std::sync::Arc;

use serenity::model::channel::Message;
use tracing::{info, warn};

use super::api::{DiscordApi, DiscordApiError};
use crate::command::Identity;
use crate::engine::{Engine, Platform, Request};

/// The prefix of a message command.
pub const PREFIX: &str = "!mesh";

/// The command in `message`, if it is one: from a person (not a bot or a
/// webhook), starting with `!mesh` as a word. Roles come from the guild
/// member of the message (none in a DM).
pub fn message_request(message: &Message) -> Option<Request> {
    if message.author.bot || message.webhook_id.is_some() {
        return None;
    }
    let rest = message.content.trim_start().strip_prefix(PREFIX)?;
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    let roles = message.member.as_ref().map(|m| m.roles.iter().map(|r| r.to_string()).collect()).unwrap_or_default();
    Some(Request::chat(
        Identity::Discord { user: message.author.id.to_string(), roles },
        Platform::Discord,
        Some(message.channel_id.to_string()),
        rest.trim(),
    ))
}

/// What answering a message did.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// Not a command: nothing done.
    Ignored,
    /// Seen before (a gateway resume replays events): nothing done.
    Duplicate,
    /// Ran and answered.
    Done,
}

/// Runs the command in `message`, if any, and answers in its channel. Runs
/// each message once, even when the gateway delivers it again.
pub async fn answer(engine: &Arc<Engine>, api: &DiscordApi, message: &Message) -> Result<Answered, DiscordApiError> {
    let Some(request) = message_request(message) else {
        return Ok(Answered::Ignored);
    };
    if !engine.first_in_fleet(&format!("discord-message:{}", message.id)).await {
        info!(user = %request.who.key(), "duplicate discord message ignored");
        return Ok(Answered::Duplicate);
    }
    let channel = message.channel_id.to_string();
    let command_id = message.id.to_string();
    let handled = engine.handle(request).await;
    let posted = api.post(&channel, &handled.reply, Some(&command_id)).await?;
    if let Some(code) = handled.confirmation_code
        && !posted.is_empty()
    {
        // The prompt is the bot's message: edited in place once its window passes undecided.
        let (api, channel, prompt) = (api.clone(), channel.clone(), posted.clone());
        crate::expiry::when_expired(engine.clone(), code, move |expired| async move {
            if let Err(e) = api.edit_message(&channel, &prompt, &expired).await {
                warn!(error = %e, "discord prompt not marked expired");
            }
        });
    }
    if let Some(follow_up) = handled.follow_up {
        let answer = follow_up.await;
        let reply_to = if posted.is_empty() { command_id } else { posted };
        if let Err(e) = api.post(&channel, &answer, Some(&reply_to)).await {
            warn!(error = %e, "discord ask reply not delivered");
            return Err(e);
        }
    }
    Ok(Answered::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serenity::model::id::{ChannelId, MessageId, RoleId, UserId};

    fn message(content: &str, roles: Option<&[u64]>) -> Message {
        let mut m = Message::default();
        m.id = MessageId::new(11);
        m.channel_id = ChannelId::new(22);
        m.author.id = UserId::new(33);
        m.content = content.to_owned();
        if let Some(roles) = roles {
            let mut member: serenity::model::guild::PartialMember =
                serde_json::from_value(serde_json::json!({"roles": [], "deaf": false, "mute": false})).unwrap();
            member.roles = roles.iter().map(|r| RoleId::new(*r)).collect();
            m.member = Some(Box::new(member));
        }
        m
    }

    #[test]
    fn prefix_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("!mesh send nova hi", Some("send nova hi")),
            ("  !mesh   status  ", Some("status")),
            ("!mesh", Some("")),
            ("!mesh\nsend nova two\nlines", Some("send nova two\nlines")),
            ("!meshy send", None),
            ("hello !mesh send", None),
            ("/mesh send", None),
        ];
        for (content, want) in cases {
            let got = message_request(&message(content, None)).map(|r| r.line);
            assert_eq!(got.as_deref(), *want, "{content:?}");
        }
    }

    #[test]
    fn identity_channel_and_bots() {
        let request = message_request(&message("!mesh ping", Some(&[100, 200]))).unwrap();
        assert_eq!(request.who, Identity::Discord { user: "33".into(), roles: vec!["100".into(), "200".into()] });
        assert_eq!(request.channel.as_deref(), Some("22"));
        assert_eq!(request.platform, Platform::Discord);
        let dm = message_request(&message("!mesh ping", None)).unwrap();
        assert_eq!(dm.who, Identity::Discord { user: "33".into(), roles: vec![] });

        let mut bot = message("!mesh ping", None);
        bot.author.bot = true;
        assert!(message_request(&bot).is_none(), "bots (this one included) are never obeyed");
        let mut hook = message("!mesh ping", None);
        hook.webhook_id = Some(serenity::model::id::WebhookId::new(5));
        assert!(message_request(&hook).is_none());
    }
}
