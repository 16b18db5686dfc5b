//! Slack Socket Mode (when `SLACK_APP_TOKEN` is set): slash commands arrive
//! over a WebSocket that slack-morphism opens with `apps.connections.open`,
//! so the bot needs no public HTTPS endpoint. Each command is handled like
//! one from `POST /slack/commands`: the envelope is acknowledged at once with
//! the ephemeral "working" answer and the result follows on `response_url`.
//! Button clicks arrive as `interactive` envelopes holding the same
//! `block_actions` payload as `POST /slack/interactions`; each is
//! acknowledged at once and decided like one from HTTP.
//! Slack redelivers an unacknowledged envelope, possibly on another
//! connection: the command's or click's `trigger_id` makes such a retry run once.

use std::sync::Arc;

use slack_morphism::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{HyperConnector, SlackApiError, web_client};
use super::commands::{Refused, SlackState, SlashCommand, start};
use super::interactions::{Click, start as start_click};

/// Serves slash commands over Socket Mode until `stop`.
pub async fn serve(
    state: SlackState,
    api_url: &str,
    app_token: &mesh_protocol::Secret,
    stop: CancellationToken,
) -> Result<(), SlackApiError> {
    let client = web_client(api_url)?;
    let environment =
        Arc::new(SlackClientEventsListenerEnvironment::new(client).with_error_handler(on_error).with_user_state(state));
    let callbacks =
        SlackSocketModeListenerCallbacks::new().with_command_events(on_command).with_interaction_events(on_interaction);
    let listener = SlackClientSocketModeListener::new(&SlackClientSocketModeConfig::new(), environment, callbacks);
    let token = SlackApiToken::new(SlackApiTokenValue(app_token.expose().to_owned()));
    tokio::time::timeout(super::api::CALL_TIMEOUT, listener.listen_for(&token))
        .await
        .map_err(|_| SlackApiError::TimedOut(super::api::CALL_TIMEOUT))?
        .map_err(|e| SlackApiError::Post(format!("socket mode: {e}")))?;
    listener.start().await;
    info!("slack socket mode connected");
    stop.cancelled().await;
    listener.shutdown().await;
    Ok(())
}

async fn on_command(
    event: SlackCommandEvent,
    _client: Arc<SlackClient<HyperConnector>>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<SlackCommandEventResponse> {
    let state = states.read().await.get_user_state::<SlackState>().cloned().ok_or("slack state missing")?;
    let dedup_key = format!("slack:trigger:{}", event.trigger_id.0);
    let command = SlashCommand {
        user_id: event.user_id.0,
        channel_id: Some(event.channel_id.0),
        text: event.text.unwrap_or_default(),
        response_url: event.response_url.0.to_string(),
    };
    let text = match start(&state, command, &dedup_key).await {
        Ok(text) => text,
        Err(Refused::ForeignResponseUrl) => "response_url is not a Slack URL; command not run".to_owned(),
    };
    Ok(SlackCommandEventResponse::new(SlackMessageContent::new().with_text(text))
        .with_response_type(SlackMessageResponseType::Ephemeral))
}

/// A click over Socket Mode: slack-morphism acknowledges the envelope when
/// this returns, and the click runs on its own task like one from HTTP.
async fn on_interaction(
    event: SlackInteractionEvent,
    _client: Arc<SlackClient<HyperConnector>>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<()> {
    let SlackInteractionEvent::BlockActions(actions) = event else { return Ok(()) };
    let state = states.read().await.get_user_state::<SlackState>().cloned().ok_or("slack state missing")?;
    let (Some(user), Some(response_url), Some(action)) =
        (actions.user, actions.response_url, actions.actions.and_then(|a| a.into_iter().next()))
    else {
        warn!("slack socket mode click without a user, response_url or action; ignored");
        return Ok(());
    };
    let click = Click {
        user_id: user.id.0,
        channel_id: actions.channel.map(|c| c.id.0),
        action_id: action.action_id.0,
        response_url: response_url.0.to_string(),
        trigger_id: actions.trigger_id.0,
    };
    if let Err(e) = start_click(&state, click).await {
        warn!(error = e, "slack socket mode click refused");
    }
    Ok(())
}

/// Logs what went wrong without the frame itself (it holds a `response_url`).
fn on_error(
    error: Box<dyn std::error::Error + Send + Sync>,
    _client: Arc<SlackClient<HyperConnector>>,
    _states: SlackClientEventsUserState,
) -> HttpStatusCode {
    let text = error.to_string();
    warn!(error = %text.split(['\n', '{']).next().unwrap_or_default().trim(), "slack socket mode error");
    HttpStatusCode::OK
}
