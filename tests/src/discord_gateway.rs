//! A fake Discord gateway: a real WebSocket server on `127.0.0.1:0` that
//! speaks the gateway protocol (HELLO, IDENTIFY or RESUME, READY, heartbeats,
//! dispatches), so the bot's serenity client is tested against the protocol
//! it meets in production. Discord's REST side (`GET /gateway`, which names
//! this server) is answered by a [`RecordingGateway`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::RecordingGateway;

/// Gateway opcodes (Discord's `Opcode`).
pub mod op {
    /// An event (`t`, `s`, `d`).
    pub const DISPATCH: u64 = 0;
    /// A heartbeat, `d` the last sequence number the client saw.
    pub const HEARTBEAT: u64 = 1;
    /// A new session.
    pub const IDENTIFY: u64 = 2;
    /// Resuming a session.
    pub const RESUME: u64 = 6;
    /// The client should reconnect and resume.
    pub const RECONNECT: u64 = 7;
    /// The session is invalid; `d` says whether it may be resumed.
    pub const INVALID_SESSION: u64 = 9;
    /// The first frame, with the heartbeat interval.
    pub const HELLO: u64 = 10;
    /// A heartbeat acknowledged.
    pub const HEARTBEAT_ACK: u64 = 11;
}

/// How often the fake asks clients to heartbeat (Discord asks about every 41 s).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a client may take to open a session or answer.
const WAIT: Duration = Duration::from_secs(20);

/// The fake gateway; serves until the test's runtime ends.
#[derive(Debug)]
pub struct FakeDiscordGateway {
    /// Address it listens on.
    pub addr: std::net::SocketAddr,
    connections: tokio::sync::Mutex<mpsc::UnboundedReceiver<WebSocket>>,
}

impl FakeDiscordGateway {
    /// Starts the server; every WebSocket a client opens waits for [`FakeDiscordGateway::accept`].
    pub async fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<WebSocket>();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("binding the fake gateway");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move |upgrade: WebSocketUpgrade| async move {
                upgrade.on_upgrade(move |socket| async move {
                    let _ = tx.send(socket);
                })
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, connections: tokio::sync::Mutex::new(rx) }
    }

    /// The URL clients connect to (they add `?v=10`).
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Makes `rest` (Discord's REST API, at `{rest}/api/v10`) name this gateway,
    /// for `GET /gateway` and `GET /gateway/bot` alike.
    pub fn announce_on(&self, rest: &RecordingGateway) {
        rest.respond_with("/api/v10/gateway", json!({"url": self.url()}));
        rest.respond_with(
            "/api/v10/gateway/bot",
            json!({"url": self.url(), "shards": 1,
                   "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}),
        );
    }

    /// The next connection a client opens and keeps: greeted with HELLO, its
    /// first frame (IDENTIFY or RESUME) read. Connections closed before they
    /// sent one (a process that exited) are passed over.
    pub async fn accept(&self) -> Session {
        let mut connections = self.connections.lock().await;
        loop {
            let socket = tokio::time::timeout(WAIT, connections.recv())
                .await
                .expect("the client opens a gateway connection")
                .expect("the fake gateway is serving");
            let mut session = Session::run(socket);
            session.send(json!({"op": op::HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL.as_millis()}}));
            if let Some(opening) = session.next_frame().await {
                session.opening = opening;
                return session;
            }
        }
    }
}

/// What the test tells a session's task.
enum Command {
    Send(Value),
    Drop,
}

/// One client connection. A task acknowledges heartbeats (recording them)
/// as they come, so the client stays connected while the test waits for
/// something else; every other frame is handed to the test in order.
#[derive(Debug)]
pub struct Session {
    /// The client's first frame: IDENTIFY or RESUME.
    pub opening: Value,
    commands: mpsc::UnboundedSender<Command>,
    frames: mpsc::UnboundedReceiver<Value>,
    heartbeats: watch::Receiver<Vec<Value>>,
    seq: Arc<Mutex<u64>>,
}

impl Session {
    fn run(mut socket: WebSocket) -> Self {
        let (commands, mut orders) = mpsc::unbounded_channel::<Command>();
        let (to_test, frames) = mpsc::unbounded_channel::<Value>();
        let (beats, heartbeats) = watch::channel(Vec::new());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    order = orders.recv() => match order {
                        Some(Command::Send(frame)) => {
                            if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                                return;
                            }
                        }
                        // Dropped without a close frame: a lost connection.
                        Some(Command::Drop) | None => return,
                    },
                    frame = socket.recv() => {
                        let Some(Ok(Message::Text(text))) = frame else {
                            match frame {
                                Some(Ok(_)) => continue,
                                // Closed or broken: the test sees the frames end.
                                _ => return,
                            }
                        };
                        let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                        if frame["op"] == op::HEARTBEAT {
                            beats.send_modify(|b| b.push(frame["d"].clone()));
                            let ack = json!({"op": op::HEARTBEAT_ACK});
                            if socket.send(Message::Text(ack.to_string().into())).await.is_err() {
                                return;
                            }
                        } else if to_test.send(frame).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self { opening: Value::Null, commands, frames, heartbeats, seq: Arc::default() }
    }

    /// Sends a raw frame.
    pub fn send(&self, frame: Value) {
        let _ = self.commands.send(Command::Send(frame));
    }

    /// Sends the event `name` with the next sequence number, and returns that number.
    pub fn dispatch(&self, name: &str, data: Value) -> u64 {
        let seq = {
            let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            *seq += 1;
            *seq
        };
        self.send(json!({"op": op::DISPATCH, "t": name, "s": seq, "d": data}));
        seq
    }

    /// Continues the sequence numbers of an earlier session (a resumed one).
    pub fn continue_after(&self, earlier: &Session) {
        *self.seq.lock().unwrap_or_else(|p| p.into_inner()) = earlier.last_seq();
    }

    /// The last sequence number sent.
    pub fn last_seq(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// READY for a bot user, opening session `session_id`.
    pub fn ready(&self, session_id: &str, application_id: &str) -> u64 {
        let data = json!({
            "v": 10,
            "user": {"id": "4000", "username": "mesh-bot", "discriminator": "0", "global_name": null,
                     "avatar": null, "bot": true},
            "guilds": [{"id": "1", "unavailable": true}],
            "session_id": session_id,
            "resume_gateway_url": "ws://resume.invalid",
            "shard": [0, 1],
            "application": {"id": application_id, "flags": 0},
        });
        serde_json::from_value::<serenity::model::gateway::Ready>(data.clone()).expect("a READY serenity reads");
        self.dispatch("READY", data)
    }

    /// The next frame from the client other than a heartbeat; `None` when the connection ended.
    pub async fn next_frame(&mut self) -> Option<Value> {
        tokio::time::timeout(WAIT, self.frames.recv()).await.expect("a frame from the gateway client in time")
    }

    /// Waits until the client sent a heartbeat carrying `seq`; returns every heartbeat so far.
    pub async fn wait_for_heartbeat(&self, seq: u64) -> Vec<Value> {
        let mut heartbeats = self.heartbeats.clone();
        let seen = tokio::time::timeout(WAIT, heartbeats.wait_for(|b| b.iter().any(|d| *d == seq))).await;
        let got = self.heartbeats.borrow().clone();
        assert!(matches!(seen, Ok(Ok(_))), "no heartbeat with sequence {seq} within {WAIT:?}: {got:?}");
        got
    }

    /// Drops the connection without a close frame, as a network failure would.
    pub fn drop_connection(&self) {
        let _ = self.commands.send(Command::Drop);
    }
}
