//! Health pings: what a listener answers on `mesh.health.ping`.

use serde::{Deserialize, Serialize};

use crate::agent_id::AgentId;

/// What a listener knows of its agent's gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GatewayHealth {
    /// Not checked yet.
    #[default]
    Unknown,
    /// `GET /health` answered 2xx and deliveries are not failing.
    Ok,
    /// `GET /health` failed, or deliveries keep failing.
    Down,
}

/// One listener's answer to a ping, for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The agent.
    pub agent: AgentId,
    /// Listener version.
    pub version: String,
    /// Seconds since the listener process started.
    pub uptime_s: u64,
    /// The gateway's state.
    pub gateway: GatewayHealth,
    /// Messages waiting for this agent.
    pub pending: u64,
    /// True while the kill switch pauses this agent.
    pub paused: bool,
    /// Gateway calls that failed in a row.
    pub consecutive_failures: u64,
}

impl Pong {
    /// Encodes the pong as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pong always serializes")
    }

    /// Decodes a pong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid pong: {e}"))
    }

    /// Encodes several pongs as one JSON array (a listener serving many agents).
    pub fn encode_batch(pongs: &[Self]) -> Vec<u8> {
        serde_json::to_vec(pongs).expect("pongs always serialize")
    }

    /// Decodes one pong or a batch.
    pub fn decode_any(bytes: &[u8]) -> Result<Vec<Self>, String> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice(bytes).map_err(|e| format!("invalid pong batch: {e}")),
            _ => Self::decode(bytes).map(|pong| vec![pong]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pong_round_trips() {
        let pong = Pong {
            agent: AgentId::parse("nova").unwrap(),
            version: "0.1.0".into(),
            uptime_s: 5,
            gateway: GatewayHealth::Ok,
            pending: 2,
            paused: false,
            consecutive_failures: 0,
        };
        assert_eq!(Pong::decode(&pong.encode()).unwrap(), pong);
        assert!(Pong::decode(b"{}").is_err());
        assert_eq!(Pong::decode_any(&pong.encode()).unwrap(), std::slice::from_ref(&pong));
        let batch = Pong::encode_batch(&[pong.clone(), pong.clone()]);
        assert_eq!(Pong::decode_any(&batch).unwrap().len(), 2);
        assert!(Pong::decode_any(b"[{}]").is_err());
    }
}
