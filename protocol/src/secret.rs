//! Tokens and other secrets: a [`Secret`] never shows in `Debug` or `Display`;
//! a [`SecretRef`] says where a secret comes from (`env:NAME`, `file:/path`, or a
//! literal kept for compatibility with old registries). Resolving a reference is
//! I/O, so it goes through a [`SecretResolver`] the caller provides.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret value. Its `Debug` shows `***`; it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that must send it (an HTTP header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// The value itself, as old registries stored tokens.
    Literal(Secret),
    /// `env:NAME`: the value of an environment variable.
    Env(String),
    /// `file:/path`: the contents of a file, without a trailing newline.
    File(PathBuf),
}

/// Why a secret reference did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read secret file {path}: {reason}")]
    FileUnreadable { path: String, reason: String },
    #[error("secret file {0} is empty")]
    FileEmpty(String),
    #[error("the value is empty")]
    Empty,
    #[error("malformed reference {0:?}: use env:MESH_TOKEN_NAME (letters, digits, '_') or file:/absolute/path")]
    Malformed(String),
    #[error(
        "env:{0} is not a token variable: token variables are named {ENV_PREFIX}<NAME> (for example env:{ENV_PREFIX}{0}), so a registry entry cannot send the mesh's own settings to a gateway"
    )]
    EnvNotAllowed(String),
}

/// The prefix every `env:` token variable carries: a registry entry can name
/// only these, never `NATS_PASSWORD`, `SLACK_BOT_TOKEN` or another setting.
pub const ENV_PREFIX: &str = "MESH_TOKEN_";

/// Reads environment variables and files for [`SecretRef::resolve`].
pub trait SecretResolver {
    /// The value of an environment variable, if set.
    fn env_var(&self, name: &str) -> Option<String>;
    /// The contents of a file.
    fn read_file(&self, path: &std::path::Path) -> std::io::Result<String>;
}

impl SecretRef {
    /// Parses `env:NAME`, `file:/path` or a literal.
    pub fn parse(raw: &str) -> Result<Self, SecretError> {
        if let Some(name) = raw.strip_prefix("env:") {
            let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            return if !valid {
                Err(SecretError::Malformed(raw.chars().take(80).collect()))
            } else if name.len() <= ENV_PREFIX.len() || !name.starts_with(ENV_PREFIX) {
                Err(SecretError::EnvNotAllowed(name.to_owned()))
            } else {
                Ok(Self::Env(name.to_owned()))
            };
        }
        if let Some(path) = raw.strip_prefix("file:") {
            return if path.starts_with('/') {
                Ok(Self::File(PathBuf::from(path)))
            } else {
                Err(SecretError::Malformed(raw.chars().take(80).collect()))
            };
        }
        if raw.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self::Literal(Secret::new(raw)))
    }

    /// Resolves the reference to its value.
    pub fn resolve(&self, resolver: &dyn SecretResolver) -> Result<Secret, SecretError> {
        match self {
            Self::Literal(secret) => Ok(secret.clone()),
            Self::Env(name) => match resolver.env_var(name) {
                None => Err(SecretError::EnvMissing(name.clone())),
                Some(v) if v.trim().is_empty() => Err(SecretError::EnvEmpty(name.clone())),
                Some(v) => Ok(Secret::new(v.trim())),
            },
            Self::File(path) => {
                let shown = path.display().to_string();
                let text = resolver
                    .read_file(path)
                    .map_err(|e| SecretError::FileUnreadable { path: shown.clone(), reason: e.to_string() })?;
                let value = text.trim();
                if value.is_empty() { Err(SecretError::FileEmpty(shown)) } else { Ok(Secret::new(value)) }
            }
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Shows where the secret comes from, never a literal value.
impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Literal(_) => f.write_str("literal(***)"),
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// Writes the reference back as the registry stores it (literals included:
/// the registry file is where they live).
impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Literal(secret) => s.serialize_str(secret.expose()),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A resolver over fixed maps, for tests and for callers that already hold the values.
#[derive(Debug, Default, Clone)]
pub struct MapResolver {
    /// Environment variables by name.
    pub env: std::collections::BTreeMap<String, String>,
    /// File contents by path.
    pub files: std::collections::BTreeMap<PathBuf, String>,
}

impl SecretResolver for MapResolver {
    fn env_var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn read_file(&self, path: &std::path::Path) -> std::io::Result<String> {
        self.files.get(path).cloned().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_a_literal() {
        let r = SecretRef::parse("hunter2-token").unwrap();
        assert!(!format!("{r:?} {r}").contains("hunter2"));
        let s = Secret::new("hunter2-token");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn parses_references() {
        assert_eq!(
            SecretRef::parse("env:MESH_TOKEN_NOVA_TOKEN").unwrap(),
            SecretRef::Env("MESH_TOKEN_NOVA_TOKEN".into())
        );
        assert_eq!(SecretRef::parse("file:/run/secrets/x").unwrap(), SecretRef::File("/run/secrets/x".into()));
        assert!(SecretRef::parse("env:").is_err());
        assert!(SecretRef::parse("env:MESH_TOKEN_A-B").is_err());
        assert!(SecretRef::parse("file:relative").is_err());
        // Only token variables: a registry entry cannot name the mesh's own settings.
        for name in ["MESH_ADMIN_NATS_PASSWORD", "NATS_PASSWORD", "SLACK_BOT_TOKEN", "MESH_TOKEN_"] {
            let e = SecretRef::parse(&format!("env:{name}")).unwrap_err();
            assert_eq!(e, SecretError::EnvNotAllowed(name.into()));
            assert!(e.to_string().contains("token variables are named MESH_TOKEN_<NAME>"), "{e}");
        }
        assert!(SecretRef::parse("").is_err());
    }

    #[test]
    fn resolves_and_reports_what_is_missing() {
        let mut res = MapResolver::default();
        res.env.insert("MESH_TOKEN_SET".into(), "abc\n".into());
        res.env.insert("MESH_TOKEN_BLANK".into(), " ".into());
        res.files.insert("/s/tok".into(), "filetok\n".into());
        let get = |raw: &str| SecretRef::parse(raw).unwrap().resolve(&res);
        assert_eq!(get("env:MESH_TOKEN_SET").unwrap().expose(), "abc");
        assert_eq!(get("file:/s/tok").unwrap().expose(), "filetok");
        assert_eq!(get("lit").unwrap().expose(), "lit");
        assert_eq!(
            get("env:MESH_TOKEN_NOPE").unwrap_err().to_string(),
            "environment variable MESH_TOKEN_NOPE is not set"
        );
        assert_eq!(
            get("env:MESH_TOKEN_BLANK").unwrap_err().to_string(),
            "environment variable MESH_TOKEN_BLANK is empty"
        );
        assert!(get("file:/s/none").unwrap_err().to_string().contains("cannot read secret file /s/none"));
    }
}
