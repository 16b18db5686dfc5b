//! A real headless Chromium under test, driven over WebDriver: Debian's
//! `chromedriver` started on a free loopback port (again on another when it
//! was taken), a fantoccini client on it, screenshots saved under
//! `target/web-screenshots/` for a reviewer to look at.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use crate::fixtures::Logged;

/// Where Debian's `chromium-driver` puts the driver (`MESH_CHROMEDRIVER` overrides).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Where Debian's `chromium` puts the browser (`MESH_CHROMIUM` overrides).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// What chromedriver prints once it listens.
const LISTENING: &str = "started successfully";
/// How long a wait for an element or a condition may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A browser session, its driver killed on drop.
#[derive(Debug)]
pub struct Browser {
    /// The WebDriver client.
    pub client: Client,
    driver: Option<Logged>,
}

fn path_from_env(var: &str, default: &str) -> String {
    std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (1280x900). Panics with a
    /// line saying how to install them when they are missing.
    pub async fn start() -> Self {
        let driver_bin = path_from_env("MESH_CHROMEDRIVER", CHROMEDRIVER);
        let chromium = path_from_env("MESH_CHROMIUM", CHROMIUM);
        for bin in [&driver_bin, &chromium] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: run ./scripts/install.sh (apt-get install chromium chromium-driver)"
            );
        }
        let (driver, port) = crate::ports::spawn_listening(
            |port| {
                let mut command = tokio::process::Command::new(&driver_bin);
                command.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
                command
            },
            LISTENING,
        )
        .await;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--no-first-run", "--disable-extensions"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("starting a headless chromium session");
        Self { client, driver: Some(driver) }
    }

    /// Saves a PNG of the page as `target/web-screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("creating the screenshots directory");
        let png = self.client.screenshot().await.expect("taking a screenshot");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("writing the screenshot");
        path
    }

    /// Waits until the element at `css` exists.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} within {WAIT:?}: {e}"))
    }

    /// Waits until `script` (a JavaScript expression) is true; panics after [`WAIT`].
    pub async fn wait_until(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.client.execute(&format!("return !!({script});"), Vec::new()).await;
            if matches!(value, Ok(serde_json::Value::Bool(true))) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let body = self.client.source().await.unwrap_or_default();
                panic!("{what}: not true within {WAIT:?} ({script}); page:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        if let Some(driver) = self.driver.take() {
            drop(driver.kill().await);
        }
    }
}

/// `target/web-screenshots` of the workspace (or of `CARGO_TARGET_DIR`).
pub fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("web-screenshots")
}
