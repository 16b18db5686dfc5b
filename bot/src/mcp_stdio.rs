//! `mesh mcp`: the mesh's MCP tools over stdio, for MCP hosts that start a
//! server as a child process. It holds no NATS credential and no registry: it
//! relays each JSON-RPC message between stdin/stdout and a listener's `/mcp`
//! (Streamable HTTP, sessions and all, through the official `rmcp` SDK),
//! presenting the agent's `MESH_TOKEN`; the listener authenticates it and runs
//! every tool through the engine.

use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, Transport};

/// One message moved, or an end.
enum Relayed {
    FromHost(Option<rmcp::model::ClientJsonRpcMessage>),
    FromListener(Option<rmcp::model::ServerJsonRpcMessage>),
}

/// Relays stdin/stdout to `url` until either side ends.
pub async fn bridge(url: &str, token: &str) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned());
    let mut listener = StreamableHttpClientTransport::from_config(config);
    let (stdin, stdout) = rmcp::transport::stdio();
    let mut host = AsyncRwTransport::<rmcp::RoleServer, _, _>::new_server(stdin, stdout);
    loop {
        let relayed = tokio::select! {
            message = host.receive() => Relayed::FromHost(message),
            message = listener.receive() => Relayed::FromListener(message),
        };
        match relayed {
            Relayed::FromHost(Some(message)) => {
                listener.send(message).await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
            }
            Relayed::FromListener(Some(message)) => {
                host.send(message).await.map_err(|e| anyhow::anyhow!("writing to stdout: {e}"))?;
            }
            Relayed::FromHost(None) | Relayed::FromListener(None) => break,
        }
    }
    let _ = listener.close().await;
    Ok(())
}
