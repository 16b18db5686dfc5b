//! Processes under test that listen on a port the harness picks. A free port
//! can be taken by another test before the process binds it: then the process
//! is started again on another port, as [`crate::TestNats`] and the Redis
//! server under test do, so a port race cannot fail a test.

use std::time::Duration;

use crate::fixtures::Logged;

/// What `mesh bot` prints once it listens (its info log line).
pub const BOT_LISTENING: &str = "mesh bot listening";
/// What `mesh-listener --http ADDR` prints once its endpoints listen.
pub const LISTENER_LISTENING: &str = "health and metrics endpoints up";
/// How many ports [`spawn_listening`] tries.
pub const ATTEMPTS: usize = 5;
/// How long a process may take from its start to listening.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `make(port)` on a free loopback port and waits until it prints
/// `listening` (it bound the port); returns it with the port. A process that
/// exits because the port is taken is started again on another port.
pub async fn spawn_listening(make: impl FnMut(u16) -> tokio::process::Command, listening: &str) -> (Logged, u16) {
    let ports = std::iter::repeat_with(|| mesh_bot::local_nats::free_port().expect("finding a free port"));
    spawn_listening_on(ports, make, listening).await
}

/// [`spawn_listening`] for `mesh bot`: `make` gets the address to pass as `--addr`.
pub async fn spawn_bot(mut make: impl FnMut(&str) -> tokio::process::Command) -> (Logged, u16) {
    spawn_listening(|port| make(&format!("127.0.0.1:{port}")), BOT_LISTENING).await
}

/// Like [`spawn_listening`], with the ports to try in order (at most [`ATTEMPTS`] of them).
pub async fn spawn_listening_on(
    ports: impl IntoIterator<Item = u16>,
    mut make: impl FnMut(u16) -> tokio::process::Command,
    listening: &str,
) -> (Logged, u16) {
    let mut taken = Vec::new();
    for port in ports.into_iter().take(ATTEMPTS) {
        let process = Logged::spawn(make(port));
        match process.wait_for_output(listening, LISTEN_TIMEOUT).await {
            Ok(()) => return (process, port),
            Err(output) if port_taken(&output) => {
                drop(process.kill().await);
                taken.push(port);
            }
            Err(output) => panic!("the process under test exited before it listened on port {port}:\n{output}"),
        }
    }
    panic!("the process under test found every port it tried taken: {taken:?}");
}

/// True when `output` (of a process that exited) says its port was taken.
fn port_taken(output: &str) -> bool {
    output.contains("Address already in use") || output.contains("address in use")
}
