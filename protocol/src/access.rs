//! Who may publish and subscribe where: the NATS permissions of a listener
//! (its own agent's consumer, the broadcast through that consumer, its dead
//! letters, pongs, and replies only in chat mode) and of the bot, derived from
//! [`crate::subject`] and [`crate::layout`] so they cannot drift from the
//! subjects the code uses. `mesh deploy render` turns them into `nats.conf`.

use crate::agent_id::AgentId;
use crate::killswitch::{BUCKET, Scope};
use crate::layout::{self, ConsumerTuning};
use crate::registry::{Agent, DeliveryMode};
use crate::subject::{self, Subject};

/// JetStream API prefix (NATS's own).
const JS_API: &str = "$JS.API";
/// Prefix of ack subjects (NATS's own).
const JS_ACK: &str = "$JS.ACK";
/// Prefix of flow-control replies of push consumers (NATS's own).
const JS_FC: &str = "$JS.FC";

/// The stream behind the kill switch bucket.
pub fn killswitch_stream() -> String {
    format!("KV_{BUCKET}")
}

/// Subject prefix of the kill switch bucket's keys.
pub fn killswitch_keys() -> String {
    format!("$KV.{BUCKET}.>")
}

/// The subject a kill switch key's puts and deletes are published on (a
/// plain subscription to it sees every change of that key).
pub fn killswitch_key_subject(key: &str) -> String {
    format!("$KV.{BUCKET}.{key}")
}

/// The direct-get request subject for the last entry of one kill switch key
/// (the bucket's stream has `allow_direct`); the answer carries the entry's
/// revision in `Nats-Sequence`.
pub fn killswitch_direct_get(key: &str) -> String {
    format!("{JS_API}.DIRECT.GET.{}.{}", killswitch_stream(), killswitch_key_subject(key))
}

/// The kill switch keys that concern one agent: the mesh-wide one and its own.
pub fn killswitch_keys_of(agent: &AgentId) -> [String; 2] {
    [Scope::Global.key(), Scope::Agent(agent.clone()).key()]
}

/// One NATS user's permissions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// NATS user name.
    pub user: String,
    /// Inbox prefix the client must use (`MESH_INBOX_PREFIX`); replies arrive under it.
    pub inbox_prefix: String,
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may not publish to (checked after `publish`).
    pub publish_deny: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// How many replies it may send to a message it received (pongs); 0 for none.
    pub responses: u32,
}

/// NATS user name of an agent's listener.
pub fn listener_user(agent: &AgentId) -> String {
    format!("listener-{agent}")
}

/// Name of the environment variable holding a NATS user's password.
pub fn password_env(user: &str) -> String {
    let upper: String =
        user.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("{upper}_NATS_PASSWORD")
}

/// The bot's NATS user.
pub const BOT_USER: &str = "mesh-bot";
/// The operator's NATS user (the `mesh` command line on the host): no restrictions.
pub const ADMIN_USER: &str = "mesh-admin";

/// The listener of one agent: reads only its own consumer (its inbox and the
/// broadcast) and its two kill switch keys, writes its dead letters and
/// pongs, and, in chat mode only, replies to other agents' inboxes and to
/// asks (looking up, never creating, the target agent's consumer first).
/// Every subject it may write a message on names its agent as the sender
/// (`agents.<to>.inbox.<id>`, `mesh.reply.<asker>.<token>.<id>`): it cannot
/// publish a message as a human or as another agent.
///
/// It creates and changes nothing in JetStream: no stream, no consumer, not
/// the kill switch bucket. Its own consumer's create-or-update right would let
/// it set any filter (`agents.*.inbox`) and read every inbox, and a stream or
/// bucket it created would carry its own limits. The bot and the `mesh`
/// commands create them; the listener looks them up and checks them.
pub fn listener(agent: &Agent) -> Access {
    let id = &agent.id;
    let consumer = layout::agent_consumer(id, ConsumerTuning::default());
    let (stream, durable) = (consumer.stream, consumer.durable);
    let kv = killswitch_stream();
    // Streams and the kill switch bucket: look them up only.
    let mut publish: Vec<String> = layout::all_streams(1)
        .iter()
        .map(|s| s.name.to_owned())
        .chain([kv.clone()])
        .map(|name| format!("{JS_API}.STREAM.INFO.{name}"))
        .collect();
    // Its own durable consumer: look it up, pull, ack. Never create or update it.
    publish.extend([
        format!("{JS_API}.CONSUMER.INFO.{stream}.{durable}"),
        format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"),
        format!("{JS_ACK}.{stream}.{durable}.>"),
    ]);
    // The kill switch: its two keys only, read with direct gets and followed
    // with plain subscriptions. No consumer on the bucket's stream: one could
    // be pointed (push) at any subject and amplify every entry there.
    let keys = killswitch_keys_of(id);
    publish.extend(keys.iter().map(|key| killswitch_direct_get(key)));
    publish.push(Subject::DeadLetter(id.clone()).to_string());
    publish.push(Subject::HealthPong.to_string());
    if agent.delivery == DeliveryMode::Chat {
        // Replies only as itself: the sender-bound inbox and answer subjects
        // carrying its own id (the receiver checks `from` against it).
        publish.push(sent_inboxes(id));
        publish.push(sent_answers(id));
        // Before replying to an agent, look its consumer up (read-only): a
        // reply into an inbox nobody consumes is refused, not lost. NATS
        // wildcards are whole tokens, so `agent-*` cannot be written; the
        // stream holds only agent consumers.
        publish.push(format!("{JS_API}.CONSUMER.INFO.{stream}.*"));
    }
    let mut subscribe: Vec<String> = [Subject::HealthPing.to_string(), format!("_INBOX_{id}.>")]
        .into_iter()
        .chain(keys.iter().map(|key| killswitch_key_subject(key)))
        .collect();
    if agent.mesh_token.is_some() {
        for right in agent_api_rights(id, stream, &kv) {
            if !publish.contains(&right) {
                publish.push(right);
            }
        }
        // `ask`: the answers to its own asks only (`mesh.reply.<id>.<token>.<sender>`).
        subscribe.push(own_answers(id));
    }
    let inbox_prefix = format!("_INBOX_{id}");
    Access { user: listener_user(id), subscribe, inbox_prefix, publish, publish_deny: Vec::new(), responses: 16 }
}

/// Every agent's inbox, written by `id`: `agents.*.inbox.<id>`.
fn sent_inboxes(id: &AgentId) -> String {
    format!("agents.*.inbox.{id}")
}

/// Answers to any ask, written by `id`: `mesh.reply.*.*.<id>`.
fn sent_answers(id: &AgentId) -> String {
    format!("mesh.reply.*.*.{id}")
}

/// Answers to the asks of `id`, from any agent: `mesh.reply.<id>.*.*`.
fn own_answers(id: &AgentId) -> String {
    format!("mesh.reply.{id}.*.*")
}

/// Front ends an agent reaches the engine through (their audit subjects).
pub const AGENT_FRONT_ENDS: [&str; 2] = ["http", "mcp"];

/// What a listener serving an agent with a `mesh_token` adds, so the agent
/// can send through it (the engine's road, `POST /v1/messages`): publish into
/// any agent's inbox and the broadcast as itself only (the sender-bound
/// subjects carrying its id, `agents.*.inbox.<id>` and
/// `agents.broadcast.from.<id>`), subscribe to the answers to its own asks
/// (`mesh.reply.<id>.*.*`), look up (never create) the target's
/// consumer, read any agent's kill switch entry (to say a message is queued),
/// and append its audit records. Nothing that creates or changes anything in
/// JetStream, no subscription to another agent's subjects.
fn agent_api_rights(id: &AgentId, stream: &str, kv: &str) -> Vec<String> {
    let mut rights = vec![
        sent_inboxes(id),
        Subject::BroadcastFrom(id.clone()).to_string(),
        format!("{JS_API}.CONSUMER.INFO.{stream}.*"),
        format!("{JS_API}.DIRECT.GET.{kv}.{}", killswitch_keys()),
    ];
    rights.extend(AGENT_FRONT_ENDS.iter().filter_map(|front| Subject::audit(front).ok()).map(|s| s.to_string()));
    rights
}

/// The bot: sends, broadcasts, pings, runs the kill switch, reads and replays
/// dead letters and writes the audit trail; it may not delete or purge a stream.
pub fn bot() -> Access {
    let inbox_prefix = "_INBOX_bot".to_owned();
    Access {
        user: BOT_USER.to_owned(),
        publish: [format!("{JS_API}.>"), format!("{JS_ACK}.>"), format!("{JS_FC}.>"), killswitch_keys()]
            .into_iter()
            .chain(layout::all_streams(1).into_iter().flat_map(|s| s.subjects))
            .chain([Subject::HealthPing.to_string()])
            // The replicas' shared state: fleet events, confirmation codes, handled requests.
            .chain(layout::BOT_BUCKETS.iter().map(|bucket| format!("$KV.{bucket}.>")))
            .collect(),
        publish_deny: vec![format!("{JS_API}.STREAM.DELETE.>"), format!("{JS_API}.STREAM.PURGE.>")],
        subscribe: vec![
            format!("{inbox_prefix}.>"),
            Subject::HealthPong.to_string(),
            subject::ALL_EVENTS.to_owned(),
            subject::ALL_REPLIES.to_owned(),
        ],
        inbox_prefix,
        responses: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn agent(delivery: &str) -> Agent {
        let json = format!(
            r#"{{"nova": {{"hooks_token": "env:MESH_TOKEN_A", "gateway_token": "env:MESH_TOKEN_B", "model": "m", "hooks_url": "http://g/hooks/wake", "delivery": "{delivery}", "allow_plaintext": true}}}}"#
        );
        Registry::parse(&json).unwrap().agents().next().unwrap().clone()
    }

    #[test]
    fn a_listener_reads_only_its_own_consumer() {
        let access = listener(&agent("wake"));
        assert_eq!(access.user, "listener-nova");
        assert!(access.publish.contains(&"$JS.API.CONSUMER.MSG.NEXT.MESH_AGENTS.agent-nova".to_owned()));
        assert!(access.publish.contains(&"mesh.dlq.nova".to_owned()));
        assert!(access.publish.iter().all(|s| !s.contains("agents.") && !s.ends_with("$JS.API.>")));
        // Nothing that creates or changes a stream, a consumer of the agents' stream, or the bucket.
        for s in &access.publish {
            let changes = ["STREAM.CREATE", "STREAM.UPDATE", "CONSUMER.DURABLE"].iter().any(|bad| s.contains(bad));
            assert!(!changes, "{s}");
            assert!(!s.contains("CONSUMER.CREATE") && !s.contains("CONSUMER.DELETE") && !s.contains("$JS.FC"), "{s}");
            assert!(!s.contains("CONSUMER.PAUSE"), "a listener may not lift the server-side pause: {s}");
            let kv_ok =
                s.ends_with("STREAM.INFO.KV_mesh_killswitch") || s.ends_with(".global") || s.ends_with(".agent.nova");
            assert!(!s.contains("KV_mesh_killswitch") || kv_ok, "{s}");
        }
        assert!(
            access.publish.contains(&"$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.agent.nova".to_owned())
        );
        assert_eq!(
            access.subscribe,
            ["mesh.health.ping", "_INBOX_nova.>", "$KV.mesh_killswitch.global", "$KV.mesh_killswitch.agent.nova"]
        );
        let chat = listener(&agent("chat"));
        assert!(chat.publish.contains(&"agents.*.inbox.nova".to_owned()));
        assert!(chat.publish.contains(&"mesh.reply.*.*.nova".to_owned()));
    }

    #[test]
    fn a_listener_writes_messages_only_on_subjects_naming_its_agent() {
        let json = r#"{"nova": {"hooks_token": "env:MESH_TOKEN_A", "gateway_token": "env:MESH_TOKEN_B", "mesh_token": "env:MESH_TOKEN_M", "model": "m", "hooks_url": "http://g/hooks/wake", "delivery": "chat", "allow_plaintext": true}}"#;
        let access = listener(Registry::parse(json).unwrap().agents().next().unwrap());
        for s in access.publish.iter().filter(|s| s.starts_with("agents.") || s.starts_with("mesh.reply")) {
            assert!(s.ends_with(".nova"), "{s} lets the listener write as someone else");
        }
        assert!(
            !access.publish.iter().any(|s| s == "agents.*.inbox" || s == "agents.broadcast" || s == "mesh.reply.*")
        );
        assert!(access.subscribe.contains(&"mesh.reply.nova.*.*".to_owned()), "{:?}", access.subscribe);
        assert!(!access.subscribe.iter().any(|s| s.starts_with("mesh.reply.*")));
    }

    #[test]
    fn only_a_chat_listener_looks_up_other_agents_consumers_and_creates_none() {
        let lookup = "$JS.API.CONSUMER.INFO.MESH_AGENTS.*".to_owned();
        let chat = listener(&agent("chat"));
        assert!(chat.publish.contains(&lookup), "{:?}", chat.publish);
        for delivery in ["wake", "agent"] {
            let access = listener(&agent(delivery));
            assert!(!access.publish.contains(&lookup), "{delivery}");
            assert!(access.publish.iter().all(|s| !s.starts_with("$JS.API.CONSUMER.INFO.MESH_AGENTS.*")));
        }
        // Creating stays limited to its own consumer.
        let creates: Vec<_> =
            chat.publish.iter().filter(|s| s.starts_with("$JS.API.CONSUMER.CREATE.MESH_AGENTS")).collect();
        assert!(creates.iter().all(|s| s.contains(".agent-nova")), "{creates:?}");
    }

    #[test]
    fn a_mesh_token_adds_exactly_the_rights_to_send_and_audit() {
        let json = r#"{"nova": {"hooks_token": "env:MESH_TOKEN_A", "mesh_token": "env:MESH_TOKEN_M", "hooks_url": "http://g/hooks/wake"}}"#;
        let with = listener(Registry::parse(json).unwrap().agents().next().unwrap());
        let without = listener(&agent("wake"));
        let added: Vec<_> = with.publish.iter().filter(|s| !without.publish.contains(s)).cloned().collect();
        assert_eq!(
            added,
            [
                "agents.*.inbox.nova",
                "agents.broadcast.from.nova",
                "$JS.API.CONSUMER.INFO.MESH_AGENTS.*",
                "$JS.API.DIRECT.GET.KV_mesh_killswitch.$KV.mesh_killswitch.>",
                "mesh.audit.http",
                "mesh.audit.mcp",
            ]
        );
        let subscribed: Vec<_> = with.subscribe.iter().filter(|s| !without.subscribe.contains(s)).collect();
        assert_eq!(subscribed, ["mesh.reply.nova.*.*"], "only the answers to its own asks");
        assert!(with.publish.iter().all(|s| !s.contains("CREATE") && !s.contains("UPDATE") && !s.contains("DELETE")));
    }

    #[test]
    fn the_bot_writes_the_replicas_shared_buckets() {
        let access = bot();
        for bucket in ["mesh_fleet", "mesh_confirm", "mesh_dedup"] {
            assert!(access.publish.contains(&format!("$KV.{bucket}.>")), "{bucket}: {:?}", access.publish);
        }
    }

    #[test]
    fn the_bot_may_pause_and_resume_agent_consumers() {
        let bot = bot();
        assert!(bot.publish.contains(&"$JS.API.>".to_owned()));
        assert!(bot.publish_deny.iter().all(|s| !s.contains("CONSUMER")), "{:?}", bot.publish_deny);
    }

    #[test]
    fn password_variables_are_shell_names() {
        assert_eq!(password_env("listener-nova_2"), "LISTENER_NOVA_2_NATS_PASSWORD");
        assert_eq!(password_env(BOT_USER), "MESH_BOT_NATS_PASSWORD");
    }
}
