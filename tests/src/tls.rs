//! TLS for the tests: a throwaway CA and a server certificate it signed for
//! `localhost` and `127.0.0.1`, made with the `openssl` command in a temp dir
//! (nothing is checked in, nothing expires between runs), and an axum
//! listener that does the server side of the handshake.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A CA and a server certificate for `localhost` / `127.0.0.1` (P-256 keys, one day).
#[derive(Debug)]
pub struct TestTls {
    dir: tempfile::TempDir,
}

impl TestTls {
    /// Makes the CA and the server certificate with `openssl`; panics with
    /// its output when it fails.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .expect("writing the extensions file");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let steps: [Vec<&str>; 3] = [
            [&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1"]]
                .concat()
                .into_iter()
                .chain(["-subj", "/CN=mesh test CA", "-addext", "basicConstraints=critical,CA:TRUE"])
                .collect(),
            [&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat(),
            vec![
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "server.ext",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(&args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl command is installed");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Self { dir }
    }

    /// The CA certificate (PEM): what a client must trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A rustls server config with the server certificate and its key.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        mesh_listener::gateway::install_tls_provider();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(self.path("server.pem"))
            .expect("server.pem")
            .collect::<Result<_, _>>()
            .expect("server.pem holds certificates");
        let key = PrivateKeyDer::from_pem_file(self.path("server.key")).expect("server.key holds a key");
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the server certificate and key match");
        Arc::new(config)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP listener whose connections are TLS (for `axum::serve`); a failed or
/// slow handshake drops that connection and the next one is accepted.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl TlsListener {
    /// Serves TLS with `config` on `tcp`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self { tcp, acceptor: TlsAcceptor::from(config) }
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("tcp", &self.tcp).finish_non_exhaustive()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
