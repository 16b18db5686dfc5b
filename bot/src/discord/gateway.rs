//! The gateway client (serenity): receives `!mesh` message commands (the
//! MESSAGE_CONTENT intent is needed to read them) and hands each to
//! [`super::messages::answer`]. Clicks on the buttons of the bot's answers
//! arrive here too, as INTERACTION_CREATE, when the application has no
//! interactions endpoint URL: each is decided like one from
//! `/discord/interactions` ([`super::interactions::click`]) and answered on
//! the interaction's callback endpoint. Reconnects are serenity's; a failed
//! start is retried every [`RETRY_EVERY`] until shutdown.

use std::sync::Arc;
use std::time::Duration;

use mesh_protocol::Secret;
use serenity::all::{ComponentInteraction, Context, EventHandler, GatewayIntents, Interaction, Message, Ready};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::DiscordApi;
use super::interactions::{ClickRef, click};
use super::messages::{self, Answered};
use crate::command::Identity;
use crate::engine::{Engine, Platform, Request};

/// Wait before starting again after the gateway failed.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);

/// The intents the bot asks for.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES | GatewayIntents::MESSAGE_CONTENT
}

/// serenity's proxy setting for an API base URL: serenity adds `/api/v10`
/// itself, so `http://127.0.0.1:9000/api/v10` becomes `http://127.0.0.1:9000`.
/// `None` for Discord itself.
pub fn serenity_proxy(api_url: &str) -> Option<String> {
    let base = api_url.trim_end_matches('/');
    if base == super::api::DEFAULT_API_URL.trim_end_matches('/') {
        return None;
    }
    Some(base.strip_suffix("/api/v10").unwrap_or(base).to_owned())
}

/// Who clicked which button, from a component interaction the gateway
/// delivered: the member's user and roles in a guild, the user in a DM.
pub fn component_click(component: &ComponentInteraction) -> (Request, ClickRef) {
    let who = match &component.member {
        Some(member) => Identity::Discord {
            user: member.user.id.to_string(),
            roles: member.roles.iter().map(|r| r.to_string()).collect(),
        },
        None => Identity::Discord { user: component.user.id.to_string(), roles: Vec::new() },
    };
    let request = Request::chat(who, Platform::Discord, Some(component.channel_id.to_string()), "");
    let clicked = ClickRef {
        custom_id: component.data.custom_id.clone(),
        interaction_id: component.id.to_string(),
        application_id: component.application_id.to_string(),
        token: component.token.clone(),
    };
    (request, clicked)
}

struct Handler {
    engine: Arc<Engine>,
    api: DiscordApi,
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn message(&self, _ctx: Context, message: Message) {
        let engine = self.engine.clone();
        let api = self.api.clone();
        // An `ask` waits for the agent: never hold up the next event.
        tokio::spawn(async move {
            match messages::answer(&engine, &api, &message).await {
                Ok(Answered::Ignored | Answered::Done | Answered::Duplicate) => {}
                Err(e) => warn!(error = %e, "discord message command not answered"),
            }
        });
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let Interaction::Component(component) = interaction else { return };
        let (request, clicked) = component_click(&component);
        let (engine, api) = (self.engine.clone(), self.api.clone());
        tokio::spawn(async move {
            let (interaction_id, token) = (clicked.interaction_id.clone(), clicked.token.clone());
            let (status, answer) = click(engine, api.clone(), request, clicked).await;
            if !status.is_success() {
                warn!(status = status.as_u16(), "discord gateway click not handled");
                return;
            }
            if let Err(e) = api.interaction_callback(&interaction_id, &token, answer).await {
                warn!(error = %e, "discord gateway click not answered");
            }
        });
    }

    async fn ready(&self, _ctx: Context, ready: Ready) {
        info!(user = %ready.user.name, guilds = ready.guilds.len(), "discord gateway ready");
    }
}

/// Runs the gateway client until `stop`.
pub async fn run(token: Secret, api_url: String, engine: Arc<Engine>, api: DiscordApi, stop: CancellationToken) {
    loop {
        let mut http = serenity::http::HttpBuilder::new(token.expose());
        if let Some(proxy) = serenity_proxy(&api_url) {
            // serenity's own rate limiter ignores the proxy: with one, the proxy limits.
            http = http.proxy(proxy).ratelimiter_disabled(true);
        }
        let built = serenity::client::ClientBuilder::new_with_http(http.build(), intents())
            .event_handler(Handler { engine: engine.clone(), api: api.clone() });
        let mut client = match built.await {
            Ok(client) => client,
            Err(e) => {
                warn!(error = %e, "discord gateway client not built");
                return;
            }
        };
        let shards = client.shard_manager.clone();
        tokio::select! {
            result = client.start() => {
                if let Err(e) = result {
                    warn!(error = %e, retry_in = ?RETRY_EVERY, "discord gateway stopped");
                }
            }
            _ = stop.cancelled() => {
                shards.shutdown_all().await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_follows_the_api_url() {
        assert_eq!(serenity_proxy("https://discord.com/api/v10"), None);
        assert_eq!(serenity_proxy("http://127.0.0.1:9000/api/v10/").as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(serenity_proxy("http://proxy.internal").as_deref(), Some("http://proxy.internal"));
        assert!(intents().contains(GatewayIntents::MESSAGE_CONTENT));
    }
}
