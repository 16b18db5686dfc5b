//! Dead letters: a message a listener gave up on is stored byte for byte on
//! `mesh.dlq.<agent>`, with why it failed carried in headers.

use time::OffsetDateTime;
use uuid::Uuid;

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
/// Header: the message's id (its envelope id, or the id derived for a body without one).
pub const MESSAGE_ID_HEADER: &str = "Mesh-Dlq-Message-Id";
/// Header: when the agents stream stored the message (Unix time in nanoseconds).
pub const STORED_AT_HEADER: &str = "Mesh-Dlq-Stored-At";
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
    /// Its sequence in the agents stream (informative: sequences restart
    /// after a restore, so nothing is keyed on it).
    pub stream_seq: u64,
    /// Its id: the envelope id, or for a body without one the id the
    /// listener derived from its sequence and store time.
    pub message_id: Uuid,
    /// When the agents stream stored it (a restore stores it anew, later).
    pub stored_at: OffsetDateTime,
}

impl DeadLetter {
    /// The dedup id of the dead-letter publish: `dlq-<agent>-<message id>-<stored at, ns>`.
    /// It names one stored message for one agent, so a crash between storing
    /// the dead letter and terminating the original cannot store it twice
    /// (within the stream's 2-minute duplicate window),
    /// and JetStream answering `duplicate` means this very dead letter is
    /// stored already. It does not use the stream sequence: sequences
    /// restart after `mesh restore`, and a new dead letter must not be taken
    /// for a restored one inside the duplicate window.
    pub fn msg_id(&self) -> String {
        format!("dlq-{}-{}-{}", self.agent, self.message_id, self.stored_at.unix_timestamp_nanos())
    }

    /// Header pairs, values made header-safe (one line, bounded).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (AGENT_HEADER, self.agent.to_string()),
            (REASON_HEADER, header_safe(&self.reason)),
            (ATTEMPTS_HEADER, self.attempts.to_string()),
            (SUBJECT_HEADER, header_safe(&self.subject)),
            (STREAM_SEQ_HEADER, self.stream_seq.to_string()),
            (MESSAGE_ID_HEADER, self.message_id.to_string()),
            (STORED_AT_HEADER, self.stored_at.unix_timestamp_nanos().to_string()),
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
            // Dead letters stored before these headers existed: nil and the epoch.
            message_id: get(MESSAGE_ID_HEADER).and_then(|s| s.parse().ok()).unwrap_or_default(),
            stored_at: get(STORED_AT_HEADER)
                .and_then(|s| s.parse::<i128>().ok())
                .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
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
            message_id: Uuid::from_u128(7),
            stored_at: OffsetDateTime::from_unix_timestamp_nanos(1_764_500_000_123_456_789).unwrap(),
        };
        let headers = dl.headers();
        assert!(headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])));
        let back = DeadLetter::from_headers(|k| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap();
        assert_eq!(back.status, Some(404));
        assert_eq!(back.reason, "gateway said 404  Injected: yes");
        assert_eq!((back.message_id, back.stored_at), (dl.message_id, dl.stored_at));
        assert_eq!(dl.msg_id(), "dlq-nova-00000000-0000-0000-0000-000000000007-1764500000123456789");
    }

    #[test]
    fn the_dedup_id_names_the_stored_message_not_its_sequence() {
        let at = |ns: i128| OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap();
        let dl = |seq, ns| DeadLetter {
            agent: AgentId::parse("nova").unwrap(),
            reason: "x".into(),
            status: None,
            attempts: 1,
            subject: "agents.nova.inbox".into(),
            stream_seq: seq,
            message_id: Uuid::from_u128(9),
            stored_at: at(ns),
        };
        // A redelivery of the same stored message: the same id.
        assert_eq!(dl(5, 100).msg_id(), DeadLetter { attempts: 3, reason: "y".into(), ..dl(5, 100) }.msg_id());
        // Restored (stored anew, later) under the same or another sequence: another id.
        assert_ne!(dl(5, 100).msg_id(), dl(5, 200).msg_id());
        assert_eq!(dl(5, 100).msg_id(), dl(1, 100).msg_id(), "the sequence plays no part");
    }
}
