//! The mesh as MCP tools, driven by the official Rust SDK's client (`rmcp`,
//! which no one here wrote) over Streamable HTTP against a listener's `/mcp`,
//! with a real nats-server and recording gateways: nova's token lists the
//! tools, `send` reaches kaan from nova, `ask` returns ada's answer, kaan's
//! `reply` reaches nova threaded and nova's `inbox` shows it; no token or a
//! wrong one is 401, a browser Origin is refused, a viewer agent cannot send
//! (the error names the role), and all of it is in the audit trail as `mcp`.

use std::time::Duration;

use mesh_listener::config::Selection;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

type Client = RunningService<rmcp::RoleClient, ()>;

async fn connect(url: &str, token: &str) -> Client {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned());
    ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("an MCP session")
}

async fn call(client: &Client, tool: &'static str, args: Value) -> CallToolResult {
    let Value::Object(args) = args else { panic!("arguments are an object") };
    client.call_tool(CallToolRequestParams::new(tool).with_arguments(args)).await.expect("the tool answers")
}

fn structured(result: &CallToolResult) -> Value {
    result.structured_content.clone().unwrap_or(Value::Null)
}

#[tokio::test]
async fn an_mcp_client_sends_asks_replies_and_reads_its_inbox_through_the_engine() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw, ada_gw, vera_gw) = (
        RecordingGateway::start().await,
        RecordingGateway::start().await,
        RecordingGateway::start().await,
        RecordingGateway::start().await,
    );
    ada_gw.set_chat_reply("42, said ada");
    let wake = |gw: &RecordingGateway, id: &str| json!({"hooks_token": format!("{id}-hook-token"), "mesh_token": format!("{id}-mesh-token"), "hooks_url": gw.hooks_url()});
    let fixture = Fixture::from_json(&json!({
        "nova": wake(&nova_gw, "nova"),
        "kaan": wake(&kaan_gw, "kaan"),
        "vera": wake(&vera_gw, "vera"),
        "ada": {"gateway": ada_gw.addr.to_string(), "hooks_token": "ada-hook-token", "gateway_token": "ada-gw-token",
                "hooks_url": ada_gw.hooks_url(), "delivery": "chat", "model": "m"},
    }));
    let mut config = fixture.listener_config(&nats, Selection::All);
    config.http_addr = Some("127.0.0.1:0".parse().expect("an address"));
    config.permissions = serde_json::from_value(json!({"viewer": ["agent:vera"]})).expect("permissions");
    let (_listener, control) = ListenerHandle::spawn_with_control(config).await;
    let url = format!("http://{}/mcp", control.http.expect("--http is served"));

    // Without the agent's token: 401 before anything else; a browser's Origin: refused.
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "curl", "version": "1"}}});
    for token in [None, Some("wrong"), Some("nova-hook-token")] {
        let mut request = http.post(&url).json(&init).header("Accept", "application/json, text/event-stream");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.expect("an answer").status().as_u16(), 401, "{token:?}");
    }
    let browser = http
        .post(&url)
        .json(&init)
        .header("Accept", "application/json, text/event-stream")
        .header("Origin", "http://evil.example")
        .bearer_auth("nova-mesh-token")
        .send()
        .await
        .expect("an answer");
    assert_eq!(browser.status().as_u16(), 403, "a request with an Origin is refused");

    let nova = connect(&url, "nova-mesh-token").await;
    let tools = nova.list_all_tools().await.expect("tools");
    let mut names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(names, ["agents", "ask", "broadcast", "inbox", "ping", "reply", "send", "status"]);
    assert!(tools.iter().all(|t| t.description.as_ref().is_some_and(|d| d.len() > 40)));
    assert!(tools.iter().all(|t| t.input_schema.get("type") == Some(&json!("object"))));

    // send: kaan's gateway gets it from nova, with the id it can answer.
    let sent = call(&nova, "send", json!({"to": "kaan", "text": "hello kaan"})).await;
    assert_eq!(sent.is_error, Some(false), "{sent:?}");
    let id = structured(&sent)["id"].as_str().expect("an id").to_owned();
    assert_eq!(structured(&sent)["queued"], false);
    let got = kaan_gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), format!("[mesh] Message from nova (id {id}): hello kaan"));

    // ask: ada's answer is the tool's result.
    let asked = call(&nova, "ask", json!({"to": "ada", "text": "what is 6 x 7?"})).await;
    assert_eq!(asked.is_error, Some(false), "{asked:?}");
    assert_eq!(structured(&asked)["answer"], "42, said ada");

    // reply: kaan answers nova's message; nova reads it threaded, and in its inbox.
    let kaan = connect(&url, "kaan-mesh-token").await;
    let replied = call(&kaan, "reply", json!({"in_reply_to": id, "text": "hello nova"})).await;
    assert_eq!(replied.is_error, Some(false), "{replied:?}");
    let reply_id = structured(&replied)["id"].as_str().expect("an id").to_owned();
    let got = nova_gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), format!("[mesh] Reply from kaan (id {reply_id}, in reply to {id}): hello nova"));
    let inbox = call(&nova, "inbox", json!({"n": 5})).await;
    let messages = structured(&inbox)["messages"].clone();
    assert_eq!(messages[0]["id"], reply_id.as_str(), "{messages}");
    assert_eq!((messages[0]["from"].clone(), messages[0]["in_reply_to"].clone()), (json!("kaan"), json!(id)));

    // Reading tools, and what a viewer may not do.
    let agents = call(&nova, "agents", json!({})).await;
    let listed = structured(&agents).to_string();
    assert!(listed.contains("\"ada\"") && listed.contains("chat") && !listed.contains("http://"), "{listed}");
    let vera = connect(&url, "vera-mesh-token").await;
    let refused = call(&vera, "send", json!({"to": "kaan", "text": "let me"})).await;
    assert_eq!(refused.is_error, Some(true));
    assert_eq!(structured(&refused)["error"], "\"send\" needs the operator role; you have viewer");
    let status = call(&vera, "status", json!({})).await;
    assert_eq!(status.is_error, Some(false), "a viewer reads the status: {status:?}");

    let audit = mesh_bot::audit::newest(&nats.jetstream().await, 100).await.expect("audit");
    let mcp: Vec<_> =
        audit.iter().filter(|r| r.platform == "mcp").map(|r| (r.who.as_str(), r.decision.as_str())).collect();
    for want in [("agent:nova", "allowed"), ("agent:kaan", "allowed"), ("agent:vera", "denied")] {
        assert!(mcp.contains(&want), "{want:?} not in {mcp:?}");
    }
    assert!(audit.iter().any(|r| r.platform == "mcp" && r.line.starts_with("ask ada")), "{audit:#?}");
    // A kill switch pulled: the send is accepted and queued, and the result says so.
    let switch = mesh_bot::killswitch::KillSwitch::open(&nats.jetstream().await).await.expect("kill switch");
    let scope = mesh_protocol::killswitch::Scope::Global;
    let director = mesh_bot::killswitch::Actor::director("cli:t");
    switch.pull(&scope, mesh_protocol::killswitch::Mode::Hard, None, director, None).await.expect("pull");
    let held = call(&nova, "broadcast", json!({"text": "while paused"})).await;
    assert_eq!((held.is_error, structured(&held)["queued"].clone()), (Some(false), json!(true)), "{held:?}");
    assert!(structured(&held)["note"].as_str().unwrap_or_default().contains("queued"), "{held:?}");
    switch.release(&scope, mesh_bot::killswitch::Actor::director("cli:t")).await.expect("release");

    // `mesh mcp` over stdio, under the same client: kaan's token, relayed to the listener's /mcp.
    let mut command = tokio::process::Command::new(mesh_tests::fixtures::mesh_bin());
    command.args(["mcp", "--url", &url]).env("MESH_TOKEN", "kaan-mesh-token").stderr(std::process::Stdio::null());
    let child = rmcp::transport::TokioChildProcess::new(command).expect("mesh mcp starts");
    let stdio = ().serve(child).await.expect("an MCP session over stdio");
    assert_eq!(stdio.list_all_tools().await.expect("tools over stdio").len(), 8);
    let sent = call(&stdio, "send", json!({"to": "nova", "text": "over stdio"})).await;
    assert_eq!(sent.is_error, Some(false), "{sent:?}");
    let id = structured(&sent)["id"].as_str().expect("an id").to_owned();
    // nova has the reply, the broadcast released by the resume, and this.
    let got = nova_gw.wait_for(3, WAIT).await;
    let want = format!("[mesh] Message from kaan (id {id}): over stdio");
    assert!(got.iter().any(|r| r.text() == want), "{:?}", got.iter().map(|r| r.text()).collect::<Vec<_>>());
    let _ = stdio.cancel().await;
    for client in [nova, kaan, vera] {
        let _ = client.cancel().await;
    }
}
