//! The documents checked against the code (issue 22): README's configuration
//! table names exactly the environment variables the programs read, every
//! variable the compose stack passes is in the rendered `env.example`, and
//! every control in SECURITY.md names tests that exist in the tree.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mesh_tests::fixtures::mesh_command;
use mesh_tests::{Fixture, RecordingGateway};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The production sources, by path relative to the repository.
fn production_sources() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    for krate in ["protocol", "runtime", "engine", "listener", "bot"] {
        rust_files(&root().join(krate).join("src"), &mut files);
    }
    files
        .into_iter()
        .map(|f| {
            let relative = f.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/");
            (relative, std::fs::read_to_string(&f).unwrap())
        })
        .collect()
}

fn is_env_name(s: &str) -> bool {
    s.len() > 2
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The string literal right after `marker` on each occurrence in `text`.
fn literals_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .filter_map(|(at, _)| {
            let rest = &text[at + marker.len()..];
            rest.split('"').next().filter(|_| rest.contains('"'))
        })
        .collect()
}

/// The identifier (last path segment) right after `marker`.
fn idents_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .map(|(at, _)| {
            let rest = &text[at + marker.len()..];
            let path: &str = rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).next().unwrap();
            path.rsplit("::").next().unwrap()
        })
        .collect()
}

/// The environment variables the programs read, found in the sources:
/// clap's `env = "NAME"` (or a constant), the `*_ENV` constants and the
/// constants of `bot/src/config.rs`'s `env` module, and literal
/// `var("NAME")` calls in the modules that may read the environment (the
/// scan `only_config_modules_read_the_environment` keeps reads there).
fn env_read_by_code() -> BTreeSet<String> {
    let sources = production_sources();
    // Every `const NAME: &str = "VALUE";`, by constant name.
    let mut consts = BTreeMap::new();
    for text in sources.values() {
        for line in text.lines() {
            let line = line.trim_start().trim_start_matches("pub ");
            if let Some(rest) = line.strip_prefix("const ")
                && let Some((name, value)) = rest.split_once(": &str = \"")
            {
                consts.insert(name.to_owned(), value.trim_end_matches("\";").to_owned());
            }
        }
    }
    let mut read = BTreeSet::new();
    for (path, text) in &sources {
        let code: String = text.split("#[cfg(test)]").next().unwrap().to_owned();
        for literal in literals_after(&code, "env = \"") {
            read.insert(literal.to_owned());
        }
        for ident in idents_after(&code, "env = ") {
            if let Some(value) = consts.get(ident) {
                read.insert(value.clone());
            }
        }
        for line in code.lines() {
            let line = line.trim_start().trim_start_matches("pub ");
            if let Some(rest) = line.strip_prefix("const ")
                && let Some((name, value)) = rest.split_once(": &str = \"")
            {
                let value = value.trim_end_matches("\";");
                let env_module = path == "bot/src/config.rs" && name == value;
                if (name.ends_with("_ENV") || env_module) && is_env_name(value) {
                    read.insert(value.to_owned());
                }
            }
        }
        let may_read = path.ends_with("/config.rs") || path.ends_with("/main.rs") || path == "runtime/src/logging.rs";
        if may_read {
            for literal in literals_after(&code, "var(\"") {
                read.insert(literal.to_owned());
            }
        }
    }
    read.retain(|n| is_env_name(n));
    read
}

/// README's Configuration section (up to the next `## ` heading).
fn readme_configuration() -> String {
    let readme = read("README.md");
    let start = readme.find("\n## Configuration\n").expect("README has a Configuration section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_owned()
}

/// The backticked names of the configuration table's environment column.
fn readme_table_env() -> BTreeSet<String> {
    let section = readme_configuration();
    let mut names = BTreeSet::new();
    for row in section.lines().skip_while(|l| !l.starts_with("| setting |")).skip(2).take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = row.replace("\\|", "/").leak().split('|').map(str::trim).skip(1).collect();
        assert!(cells.len() >= 4, "a configuration row without four columns: {row}");
        for name in cells[2].split('`').skip(1).step_by(2) {
            assert!(is_env_name(name), "{name:?} in the environment column is not a variable name: {row}");
            names.insert(name.to_owned());
        }
    }
    assert!(names.len() > 20, "the configuration table was not found: {names:?}");
    names
}

#[test]
fn the_configuration_table_names_exactly_the_variables_the_code_reads() {
    let code = env_read_by_code();
    let table = readme_table_env();
    let section = readme_configuration();
    // The scan finds what it should (a scan that finds nothing proves nothing).
    for known in ["NATS_URL", "AGENT_ID", "MESH_HOOKS_ALLOWED_HOSTS", "SLACK_SIGNING_SECRET", "MESH_LOG", "DOCKER_HOST"]
    {
        assert!(code.contains(known), "the source scan missed {known}: {code:?}");
    }
    // Code -> README: every variable read is documented in the section (the
    // table, or for USER the `--from` default `cli:$USER`).
    let undocumented: Vec<&String> =
        code.iter().filter(|n| !section.contains(&format!("`{n}`")) && !section.contains(&format!("${n}"))).collect();
    assert!(undocumented.is_empty(), "read by the code but not in README's Configuration: {undocumented:?}");
    // README -> code: every variable of the table is read by some program.
    let unread: Vec<&String> = table.iter().filter(|n| !code.contains(*n)).collect();
    assert!(unread.is_empty(), "in README's configuration table but read by no program: {unread:?}");
}

/// `${NAME...}` references of a compose file.
fn compose_references(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .map(|r| r.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        .filter(|n| !n.is_empty())
        .collect()
}

#[tokio::test]
async fn every_variable_the_compose_stack_passes_is_in_env_example() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let out_dir = fixture.dir().join("generated");
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry)
        .args(["deploy", "render", "--out", out_dir.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env_example = std::fs::read_to_string(out_dir.join("env.example")).unwrap();
    let listed: BTreeSet<String> = env_example
        .lines()
        .map(|l| l.trim_start_matches("# "))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.to_owned()))
        .filter(|n| is_env_name(n))
        .collect();
    let rendered = std::fs::read_to_string(out_dir.join("docker-compose.agents.yml")).unwrap();
    let mut composes = vec![("docker-compose.agents.yml (rendered)".to_owned(), rendered.clone())];
    for entry in std::fs::read_dir(root().join("deploy")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("docker-compose") && (name.ends_with(".yml") || name.ends_with(".yaml")) {
            composes.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(composes.len() >= 2, "deploy/docker-compose.yml not found");
    for (name, text) in &composes {
        let missing: Vec<String> = compose_references(text).difference(&listed).cloned().collect();
        assert!(missing.is_empty(), "{name} passes {missing:?}, which env.example does not list:\n{env_example}");
    }
    // The settings a compose deployment must be able to turn on without editing files.
    let base: serde_json::Value = serde_norway::from_str(&read("deploy/docker-compose.yml")).unwrap();
    let bot = &base["services"]["bot"]["environment"];
    for var in ["MESH_HOOKS_ALLOWED_HOSTS", "MESH_TWO_PERSON_NUCLEAR", "MESH_PERMISSIONS"] {
        assert!(bot[var].is_string(), "the bot service does not pass {var}");
    }
    let agents: serde_json::Value = serde_norway::from_str(&rendered).unwrap();
    for listener in ["listener-nova", "listener-kaan"] {
        let env = &agents["services"][listener]["environment"];
        assert_eq!(env["MESH_HOOKS_ALLOWED_HOSTS"], "${MESH_HOOKS_ALLOWED_HOSTS:-}", "{listener}");
    }
}

/// `fn name` somewhere in `text` (a test, or a property inside `proptest!`).
fn defines(text: &str, name: &str) -> bool {
    text.contains(&format!("fn {name}(")) || text.contains(&format!("fn {name}<"))
}

#[test]
fn every_security_control_names_tests_that_exist() {
    let security = read("SECURITY.md");
    let start = security.find("## Controls and the tests that verify them").expect("SECURITY.md has the control map");
    let section = &security[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let all_sources: Vec<(String, String)> = {
        let mut files = Vec::new();
        for dir in ["protocol", "runtime", "engine", "listener", "bot", "tests", "fuzz"] {
            rust_files(&root().join(dir), &mut files);
        }
        files
            .into_iter()
            .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
            .map(|f| {
                (f.strip_prefix(root()).unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&f).unwrap())
            })
            .collect()
    };
    let mut rows = 0;
    let mut faults = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| control |")) {
        let Some((control, verified)) = row.rsplit_once(" | ") else { continue };
        rows += 1;
        let control: String = control.chars().take(60).collect();
        let mut files: Vec<String> = Vec::new();
        let mut named = 0;
        let mut words = verified.split('`').enumerate().peekable();
        while let Some((i, token)) = words.next() {
            if i % 2 == 0 {
                // Outside backticks: "fuzz target" introduces a target name.
                if token.trim_end().ends_with("fuzz target")
                    && let Some((_, target)) = words.peek()
                {
                    if root().join("fuzz/fuzz_targets").join(format!("{target}.rs")).exists() {
                        named += 1;
                    } else {
                        faults.push(format!("{control}: no fuzz target {target}"));
                    }
                    words.next();
                }
                continue;
            }
            if token.ends_with(".rs") && token.contains('/') {
                if root().join(token).exists() {
                    files.push(token.to_owned());
                    named += 1;
                } else {
                    faults.push(format!("{control}: no file {token}"));
                }
            } else if token.contains('_')
                && token.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                // A test name: in a file the cell names before it, else anywhere.
                let found = if files.is_empty() {
                    all_sources.iter().any(|(_, text)| defines(text, token))
                } else {
                    files.iter().any(|f| defines(&read(f), token))
                };
                if found {
                    named += 1;
                } else {
                    faults.push(format!("{control}: no fn {token} in {files:?} (or the tree)"));
                }
            }
        }
        if named == 0 {
            faults.push(format!("{control}: names no test"));
        }
    }
    assert!(rows > 30, "the control map was not found ({rows} rows)");
    assert!(faults.is_empty(), "SECURITY.md's control map names what does not exist:\n{}", faults.join("\n"));
}

/// Secrets never come from flags: no option of `mesh bot`, `mesh mcp`, the
/// global options or `mesh-listener` takes a token, secret or password
/// (`mesh agents add|rotate --hooks-token` and its kin take references,
/// refused when literal: `tests/tests/agents.rs`).
#[tokio::test]
async fn secrets_are_never_flags() {
    let helps: Vec<(String, String)> = {
        let mut out = Vec::new();
        for args in [&["--help"][..], &["bot", "--help"], &["mcp", "--help"], &["deploy", "demo-gateway", "--help"]] {
            let run = mesh_command("nats://127.0.0.1:1", Path::new("/nonexistent")).args(args).output().await.unwrap();
            out.push((format!("mesh {args:?}"), String::from_utf8_lossy(&run.stdout).into_owned()));
        }
        let listener = tokio::process::Command::new(mesh_tests::fixtures::listener_bin()).arg("--help").output().await;
        out.push(("mesh-listener --help".into(), String::from_utf8_lossy(&listener.unwrap().stdout).into_owned()));
        out
    };
    for (what, help) in &helps {
        assert!(help.contains("--"), "{what} printed no options: {help}");
        for word in help.split_whitespace().filter(|w| w.starts_with("--")) {
            let flag = word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_ascii_lowercase();
            // `--token-env NAME` names the variable holding the demo gateway's token, not the token.
            let secret =
                ["token", "secret", "password", "key"].iter().any(|s| flag.contains(s)) && flag != "--token-env";
            assert!(!secret, "{what} takes a secret as a flag: {word}");
        }
    }
}
