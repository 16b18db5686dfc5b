//! A real `nats-server` with JetStream on a free loopback port and a temporary
//! store, killed on drop.

use mesh_bot::local_nats::{LocalNats, free_port};
use mesh_protocol::layout::Replicas;

/// The server under test.
#[derive(Debug)]
pub struct TestNats {
    /// The child process.
    pub server: LocalNats,
    _store: tempfile::TempDir,
}

impl TestNats {
    /// Starts a server; panics with install instructions when nats-server is missing.
    /// A free port can be taken by another test's outgoing connection before the
    /// server binds it: then it tries another port (a few times).
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts a server that fsyncs every JetStream write before acking it
    /// (`sync_interval: always`, what the mesh's own configs run).
    pub async fn start_durable() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> Self {
        let store = tempfile::tempdir().expect("creating a temp dir");
        let mut attempts = 0;
        loop {
            let port = free_port().expect("finding a free port");
            let started = if durable {
                LocalNats::start_durable(port, store.path()).await
            } else {
                LocalNats::start(port, store.path()).await
            };
            match started {
                Ok(server) => return Self { server, _store: store },
                Err(mesh_bot::local_nats::LocalNatsError::PortInUse(_)) if attempts < 5 => attempts += 1,
                Err(e) => panic!("{e} (run scripts/install.sh to install nats-server)"),
            }
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A connected client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connecting to the test nats-server")
    }

    /// A JetStream context with the mesh streams created.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let js = async_nats::jetstream::new(self.client().await);
        mesh_listener::nats::ensure_streams(&js, Replicas::Auto).await.expect("creating streams");
        js
    }
}
