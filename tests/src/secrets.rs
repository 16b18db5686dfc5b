//! The secret scan: tests register every token and secret they configure and
//! every piece of output their processes produced (logs, stdout, stderr, HTTP
//! answers), then [`SecretScan::assert_clean`] fails if any secret shows up.
//! A failure names the secret by its label and where it leaked, never by value.

/// Secrets and the output captured while they were configured.
#[derive(Debug, Default)]
pub struct SecretScan {
    secrets: Vec<(String, String)>,
    captured: Vec<(String, String)>,
}

impl SecretScan {
    /// A scan for `secrets`, given as `(label, value)`.
    pub fn new(secrets: &[(&str, &str)]) -> Self {
        let secrets = secrets.iter().map(|(label, value)| ((*label).to_owned(), (*value).to_owned())).collect();
        Self { secrets, captured: Vec::new() }
    }

    /// Records one piece of output, labelled by where it came from.
    pub fn capture(&mut self, source: &str, output: impl AsRef<str>) {
        self.captured.push((source.to_owned(), output.as_ref().to_owned()));
    }

    /// Records stdout and stderr of a finished command.
    pub fn capture_output(&mut self, source: &str, output: &std::process::Output) {
        self.capture(&format!("{source} (stdout)"), String::from_utf8_lossy(&output.stdout));
        self.capture(&format!("{source} (stderr)"), String::from_utf8_lossy(&output.stderr));
    }

    /// Total bytes captured (a scan of nothing proves nothing).
    pub fn captured_bytes(&self) -> usize {
        self.captured.iter().map(|(_, o)| o.len()).sum()
    }

    /// Panics when any secret appears in any captured output, or when nothing was captured.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(self.captured_bytes() > 0, "the secret scan captured no output");
        let leaks: Vec<String> = self
            .secrets
            .iter()
            .flat_map(|(label, value)| {
                self.captured
                    .iter()
                    .filter(move |(_, output)| output.contains(value.as_str()))
                    .map(move |(source, _)| format!("{label} leaked into {source}"))
            })
            .collect();
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "hook token leaked into listener log")]
    fn a_leak_is_reported_by_label() {
        let mut scan = SecretScan::new(&[("hook token", "s3cr3t-value")]);
        scan.capture("listener log", "calling gateway with s3cr3t-value");
        scan.assert_clean();
    }

    #[test]
    #[should_panic(expected = "captured no output")]
    fn an_empty_scan_fails() {
        SecretScan::new(&[("x", "y")]).assert_clean();
    }
}
