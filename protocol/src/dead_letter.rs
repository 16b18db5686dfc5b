//! Dead letters: a message a listener gave up on is stored byte for byte on
//! `mesh.dlq.<agent>`, with why it failed carried in headers.

use crate::agent_id::AgentId;

/// Header: the agent the message was for.
pub const AGENT_HEADER: &str = "Mesh-Dlq-Agent";
/// Header: why delivery was given up.
pub const REASON_HEADER: &str = "Mesh-Dlq-Reason";
/// Header: the last HTTP status from the gateway, if any.
pub const STATUS_HEADER: &str = "Mesh-Dlq-Status";
/// Header: how many deliveries were attempted.
pub const ATTEMPTS_HEADER: &str = "Mesh-Dlq-Attempts";
/// Header: the subject the message was published on.
pub const SUBJECT_HEADER: &str = "Mesh-Dlq-Subject";
/// Header: the message's sequence in the agents stream.
pub const STREAM_SEQ_HEADER: &str = "Mesh-Dlq-Stream-Seq";
/// Longest reason kept, in bytes.
pub const MAX_REASON_LEN: usize = 512;

/// What is known about a message given up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The agent it was for.
    pub agent: AgentId,
    /// Why it was given up.
    pub reason: String,
    /// The gateway's last HTTP status.
    pub status: Option<u16>,
    /// Deliveries attempted.
    pub attempts: u64,
    /// The subject it was published on.
    pub subject: String,
    /// Its sequence in the agents stream.
    pub stream_seq: u64,
}

impl DeadLetter {
    /// The dedup id of the dead-letter publish: a crash between storing the
    /// dead letter and acking the original cannot store it twice.
    pub fn msg_id(&self) -> String {
        format!("dlq-{}-{}", self.agent, self.stream_seq)
    }

    /// Header pairs, values made header-safe (one line, bounded).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (AGENT_HEADER, self.agent.to_string()),
            (REASON_HEADER, header_safe(&self.reason)),
            (ATTEMPTS_HEADER, self.attempts.to_string()),
            (SUBJECT_HEADER, header_safe(&self.subject)),
            (STREAM_SEQ_HEADER, self.stream_seq.to_string()),
        ];
        if let Some(status) = self.status {
            out.push((STATUS_HEADER, status.to_string()));
        }
        out
    }

    /// Reads a dead letter back from its headers.
    pub fn from_headers(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        Some(Self {
            agent: AgentId::parse(&get(AGENT_HEADER)?).ok()?,
            reason: get(REASON_HEADER).unwrap_or_default(),
            status: get(STATUS_HEADER).and_then(|s| s.parse().ok()),
            attempts: get(ATTEMPTS_HEADER).and_then(|s| s.parse().ok()).unwrap_or(0),
            subject: get(SUBJECT_HEADER).unwrap_or_default(),
            stream_seq: get(STREAM_SEQ_HEADER).and_then(|s| s.parse().ok()).unwrap_or(0),
        })
    }
}

fn header_safe(raw: &str) -> String {
    let mut out: String = raw.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if out.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_stay_on_one_line() {
        let dl = DeadLetter {
            agent: AgentId::parse("nova").unwrap(),
            reason: "gateway said 404\r\nInjected: yes".into(),
            status: Some(404),
            attempts: 1,
            subject: "agents.nova.inbox".into(),
            stream_seq: 42,
        };
        let headers = dl.headers();
        assert!(headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])));
        let back = DeadLetter::from_headers(|k| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap();
        assert_eq!(back.status, Some(404));
        assert_eq!(back.reason, "gateway said 404  Injected: yes");
        assert_eq!(dl.msg_id(), "dlq-nova-42");
    }
}
