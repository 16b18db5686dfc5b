//! README promises about the `mesh` command line and the two-person rule,
//! checked end to end (issue 22): every command's `--json` answer is one JSON
//! object; an invalid registry is a one-line error; under
//! `MESH_TWO_PERSON_NUCLEAR` the terminal cannot run `kill nuclear`, while in
//! chat one director asks and only another director's confirmation runs it;
//! chat rate limits per user refuse and publish nothing; in chat `resume`
//! from a hard or nuclear kill needs a director, and sends say they are queued;
//! a typed `confirm <code>` runs only for the asker and only within its window.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use mesh_tests::bot::BotProcess;
use mesh_tests::fixtures::mesh_command;
use mesh_tests::{Fixture, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-signing-secret-0123456789";
/// Docker is never reached from these tests: the kill switch's container part says so and goes on.
const NO_DOCKER: &str = "unix:///nonexistent/docker.sock";

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn every_command_answers_one_json_object_under_json() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let out_dir = fixture.dir().join("generated");
    let backup_dir = fixture.dir().join("backup");
    let (out_dir, backup_dir) = (out_dir.to_str().unwrap(), backup_dir.to_str().unwrap());
    // Each command, and whether it succeeds here (no Docker, no listener).
    let commands: &[(&[&str], bool)] = &[
        (&["send", "nova", "hi"], true),
        (&["broadcast", "all"], true),
        (&["status"], true),
        (&["ping", "--timeout-ms", "200"], false),
        (&["agents"], true),
        (&["agents", "list"], true),
        (&["audit", "5"], true),
        (&["dlq"], true),
        (&["dlq", "replay", "nova"], true),
        (&["kill", "soft", "--for", "1m"], true),
        (&["kill", "hard", "--yes", "--reason", "drill"], true),
        (&["resume", "--yes"], true),
        (&["maintenance", "1s", "--lead", "1s", "db"], false),
        (&["restart", "nova"], false),
        (&["deploy", "render", "--out", out_dir], true),
        (&["backup", backup_dir], true),
        (&["kill", "nuclear", "--yes", "--purge"], true),
        (&["resume", "--yes"], true),
    ];
    for (args, succeeds) in commands {
        let out = mesh_command(&nats.url(), &fixture.registry)
            .args(*args)
            .arg("--json")
            .env("DOCKER_HOST", NO_DOCKER)
            .env("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "mesh {args:?} --json printed more than one line:\n{}", said(&out));
        let reply: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("mesh {args:?} --json: {e}:\n{}", said(&out)));
        assert!(reply["title"].is_string() && reply["tone"].is_string(), "mesh {args:?}: {reply}");
        if *succeeds {
            assert!(out.status.success(), "mesh {args:?} failed: {}", said(&out));
        }
    }
}

#[tokio::test]
async fn an_invalid_registry_is_one_line_naming_every_problem() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "env:MESH_TOKEN_NOVA_HOOK", "hooks_url": "ftp://nova/hooks/wake"},
        "kaan": {"hooks_token": "env:MESH_TOKEN_KAAN_HOOK", "hooks_url": gw.hooks_url(), "status": "sleeping"},
    }));
    let out = mesh_command("nats://127.0.0.1:1", &fixture.registry).args(["agents", "list"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // One error line (a warning that the audit record was not stored may precede it: NATS is down here).
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("warning: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].starts_with("error: registry ") && errors[0].contains("is invalid: "), "{stderr}");
    assert!(
        errors[0].contains("agent \"nova\"") && errors[0].contains("; agent \"kaan\"")
            || errors[0].contains("; agent \"nova\""),
        "{stderr}"
    );
}

/// A signed Slack slash command from `user`; its answer goes to `/commands/<n>` on `slack`.
async fn slash(bot: &BotProcess, slack: &RecordingGateway, user: &str, text: &str, n: u32) -> String {
    mesh_tests::bot::slack_command(&bot.url, SECRET, slack.addr, user, text, n).await;
    slack.wait_for_path(&format!("/commands/{n}"), 1, WAIT).await[0].body.to_string()
}

/// The global kill switch entry's mode, if any.
async fn global_mode(nats: &TestNats) -> Option<String> {
    let js = nats.jetstream().await;
    let bucket = js.get_key_value("mesh_killswitch").await.ok()?;
    let entry = bucket.get("global").await.unwrap()?;
    let state: serde_json::Value = serde_json::from_slice(&entry).ok()?;
    state["mode"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_person_rule_holds_from_the_terminal_and_from_chat() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(
        &permissions,
        serde_json::json!({"director": ["slack:UDIRA", "slack:UDIRB"], "admin": ["slack:UADMIN"]}).to_string(),
    )
    .unwrap();
    // The terminal (director when no "terminal" key) cannot: it would confirm its own code.
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args(["kill", "nuclear", "--yes"])
        .env("MESH_PERMISSIONS", &permissions)
        .env("MESH_TWO_PERSON_NUCLEAR", "1")
        .env("DOCKER_HOST", NO_DOCKER)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("must be confirmed by a different director"), "{}", said(&out));
    assert_eq!(global_mode(&nats).await, None, "a refused nuclear kill paused the mesh");

    // In chat: director A asks, A's own confirm and an admin's are refused, director B's runs it.
    let slack = RecordingGateway::start().await;
    let bot = BotProcess::start(
        &nats.url(),
        &fixture.registry,
        [
            ("MESH_PERMISSIONS", permissions.to_str().unwrap()),
            ("MESH_TWO_PERSON_NUCLEAR", "true"),
            ("SLACK_SIGNING_SECRET", SECRET),
            ("SLACK_RESPONSE_URL_PREFIX", &format!("http://{}/", slack.addr)),
            ("DOCKER_HOST", NO_DOCKER),
            ("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project"),
        ],
    )
    .await;
    let asked = slash(&bot, &slack, "UDIRA", "kill nuclear", 1).await;
    let at = asked.find("confirm ").unwrap_or_else(|| panic!("no code in {asked}")) + "confirm ".len();
    let code = asked[at..at + 6].to_owned();
    let own = slash(&bot, &slack, "UDIRA", &format!("confirm {code}"), 2).await;
    assert!(own.contains("must be confirmed by a different director"), "{own}");
    let admin = slash(&bot, &slack, "UADMIN", &format!("confirm {code}"), 3).await;
    assert!(admin.contains("must be confirmed by a director; you have admin"), "{admin}");
    assert_eq!(global_mode(&nats).await, None, "refused confirmations paused the mesh");
    let other = slash(&bot, &slack, "UDIRB", &format!("confirm {code}"), 4).await;
    assert!(other.contains("NUCLEAR"), "{other}");
    assert_eq!(global_mode(&nats).await.as_deref(), Some("nuclear"));
    bot.stop().await;
}

/// Replaces the registry file atomically (a reader never sees half a file).
fn rewrite_registry(fixture: &Fixture, json: &serde_json::Value) {
    let tmp = fixture.dir().join("tokens.json.new");
    std::fs::write(&tmp, serde_json::to_string_pretty(json).unwrap()).unwrap();
    std::fs::rename(&tmp, &fixture.registry).unwrap();
}

/// SECURITY.md: the host allow-list holds on a registry reload too. A running
/// listener keeps its last good registry when an edit points an agent outside
/// `MESH_HOOKS_ALLOWED_HOSTS` (it goes on delivering to the allowed host), and
/// the bot creates no consumer for an agent added outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_holds_when_the_registry_is_reloaded() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture.registry).unwrap()).unwrap();
    let bot = BotProcess::start(&nats.url(), &fixture.registry, [("MESH_HOOKS_ALLOWED_HOSTS", "127.0.0.1")]).await;
    bot.wait_for_output("agent consumers in place", WAIT).await.unwrap();
    let listener = mesh_tests::fixtures::Logged::spawn({
        let mut command = tokio::process::Command::new(mesh_tests::fixtures::listener_bin());
        command
            .arg("--all")
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_HOOKS_ALLOWED_HOSTS", "127.0.0.1")
            .env("MESH_LOG", "info");
        command
    });
    let send = |text: &'static str| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command.args(["send", "nova", text]).env("MESH_HOOKS_ALLOWED_HOSTS", "127.0.0.1");
        command
    };
    assert!(send("before").output().await.unwrap().status.success());
    gw.wait_for(1, WAIT).await;

    // nova moved to a host outside the list, and kaan added there.
    let mut edited = original.clone();
    edited["nova"]["hooks_url"] = "http://evil.example:7002/hooks/wake".into();
    edited["nova"]["gateway"] = "evil.example:7002".into();
    edited["kaan"] =
        serde_json::json!({"hooks_token": "kaan-hook-token", "hooks_url": "http://evil.example:7003/hooks/wake"});
    rewrite_registry(&fixture, &edited);
    listener.wait_for_output("is not in MESH_HOOKS_ALLOWED_HOSTS", WAIT).await.unwrap();
    bot.wait_for_output("is not in MESH_HOOKS_ALLOWED_HOSTS", WAIT).await.unwrap();
    let js = nats.jetstream().await;
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    assert!(stream.consumer_info("agent-kaan").await.is_err(), "the bot created a consumer for a refused agent");

    // The listener still delivers nova's messages to the allowed gateway: the
    // last good registry. (`mesh send` refuses the edited registry: publish directly.)
    let body = serde_json::json!({"from": "test", "message": "after"}).to_string();
    js.publish("agents.nova.inbox", body.into()).await.unwrap().await.unwrap();
    gw.wait_for(2, WAIT).await;
    assert_eq!(gw.requests_to("/hooks/wake").len(), 2);
    let output = listener.kill().await;
    assert!(!output.contains("evil.example:7002/hooks"), "the listener called the refused host:\n{output}");
    bot.stop().await;
}

/// A bot answering signed Slack slash commands, with these grants.
async fn slack_bot(nats: &TestNats, fixture: &Fixture, grants: serde_json::Value) -> (BotProcess, RecordingGateway) {
    let permissions = fixture.dir().join("slack-permissions.json");
    std::fs::write(&permissions, grants.to_string()).unwrap();
    let slack = RecordingGateway::start().await;
    let bot = BotProcess::start(
        &nats.url(),
        &fixture.registry,
        [
            ("MESH_PERMISSIONS", permissions.to_str().unwrap()),
            ("SLACK_SIGNING_SECRET", SECRET),
            ("SLACK_RESPONSE_URL_PREFIX", &format!("http://{}/", slack.addr)),
            ("DOCKER_HOST", NO_DOCKER),
            ("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project"),
        ],
    )
    .await;
    (bot, slack)
}

/// Messages stored in the agents' stream.
async fn stored(nats: &TestNats) -> u64 {
    let js = nats.jetstream().await;
    js.get_stream("MESH_AGENTS").await.unwrap().get_info().await.unwrap().state.messages
}

/// README (Rate limits): per user and command class, messages 20 a minute.
/// Through the engine from Slack: one user's 21st message command in the
/// window is refused with the limit and the wait named, and publishes
/// nothing; another user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rate_limits_refuse_one_user_and_publish_nothing_while_another_goes_on() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let (bot, slack) = slack_bot(&nats, &fixture, serde_json::json!({"operator": ["slack:UONE", "slack:UTWO"]})).await;
    for n in 1..=20 {
        let answer = slash(&bot, &slack, "UONE", &format!("send nova message {n}"), n).await;
        assert!(answer.contains("sent to nova"), "message {n}: {answer}");
    }
    assert_eq!(stored(&nats).await, 20);
    let refused = slash(&bot, &slack, "UONE", "send nova one too many", 21).await;
    assert!(refused.contains("rate limit: 20 message commands per minute; try again in "), "{refused}");
    assert_eq!(stored(&nats).await, 20, "the refused command published");
    let other = slash(&bot, &slack, "UTWO", "send nova from someone else", 22).await;
    assert!(other.contains("sent to nova"), "{other}");
    assert_eq!(stored(&nats).await, 21);
    bot.stop().await;
}

/// README (Kill switch, Permissions): `resume` needs admin, and director
/// while a hard or nuclear kill is in force; through the engine from Slack an
/// admin's resume is refused and leaves the kill in force, a director's lifts
/// it. A message sent from chat meanwhile is accepted and the answer says it
/// is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chat_resume_from_a_hard_or_nuclear_kill_needs_a_director_and_sends_say_queued() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let grants = serde_json::json!({"director": ["slack:UDIR", "slack:UDIR2"], "admin": ["slack:UADMIN"], "operator": ["slack:UOPS"]});
    let (bot, slack) = slack_bot(&nats, &fixture, grants).await;
    let mut n = 0;
    let mut slash_as = async |user: &str, text: &str| {
        n += 1;
        slash(&bot, &slack, user, text, n).await
    };
    let sent = slash_as("UOPS", "send nova before").await;
    assert!(sent.contains("sent to nova") && !sent.contains("queued"), "{sent}");
    // One director per grade: a kill, the resume and their confirms are 4 of the 5 control commands a minute.
    for (grade, director) in [("hard", "UDIR"), ("nuclear", "UDIR2")] {
        let asked = slash_as(director, &format!("kill {grade}")).await;
        let at = asked.find("confirm ").unwrap_or_else(|| panic!("no code in {asked}")) + "confirm ".len();
        let code = asked[at..at + 6].to_owned();
        slash_as(director, &format!("confirm {code}")).await;
        assert_eq!(global_mode(&nats).await.as_deref(), Some(grade));

        let queued = slash_as("UOPS", &format!("send nova during the {grade} kill")).await;
        assert!(queued.contains("queued and delivered when the pause ends"), "{queued}");
        let refused = slash_as("UADMIN", "resume").await;
        let want = format!("\\\"resume\\\" needs the director role while a {grade} kill is in force; you have admin");
        assert!(refused.contains(&want), "{refused}");
        assert_eq!(global_mode(&nats).await.as_deref(), Some(grade), "an admin's resume lifted a {grade} kill");

        // A director's resume asks for a code as the kill did; the confirm lifts it.
        let asked = slash_as(director, "resume").await;
        let at = asked.find("confirm ").unwrap_or_else(|| panic!("no code in {asked}")) + "confirm ".len();
        assert_eq!(global_mode(&nats).await.as_deref(), Some(grade), "lifted before the confirm: {asked}");
        let resumed = slash_as(director, &format!("confirm {}", &asked[at..at + 6])).await;
        assert_eq!(global_mode(&nats).await.filter(|m| m != "none"), None, "{resumed}");
    }
    assert_eq!(stored(&nats).await, 3, "every send was stored");
    bot.stop().await;
}

/// README (Slack): a typed `confirm <code>` runs only for whoever asked
/// (another director's is refused and changes nothing; the code still works
/// for the asker), and only within `MESH_CONFIRM_WINDOW`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_confirm_codes_in_slack_work_only_for_the_asker_and_only_within_the_window() {
    const WINDOW: Duration = Duration::from_secs(4);
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let permissions = fixture.dir().join("directors.json");
    std::fs::write(&permissions, serde_json::json!({"director": ["slack:UDIRA", "slack:UDIRB"]}).to_string()).unwrap();
    let slack = RecordingGateway::start().await;
    let bot = BotProcess::start(
        &nats.url(),
        &fixture.registry,
        [
            ("MESH_PERMISSIONS", permissions.to_str().unwrap()),
            ("MESH_CONFIRM_WINDOW", "4s"),
            ("SLACK_SIGNING_SECRET", SECRET),
            ("SLACK_RESPONSE_URL_PREFIX", &format!("http://{}/", slack.addr)),
            ("DOCKER_HOST", NO_DOCKER),
            ("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project"),
        ],
    )
    .await;
    let code_in = |answer: &str| {
        let at = answer.find("confirm ").unwrap_or_else(|| panic!("no code in {answer}")) + "confirm ".len();
        answer[at..at + 6].to_owned()
    };
    let in_force = async || global_mode(&nats).await.filter(|m| m != "none");

    let code = code_in(&slash(&bot, &slack, "UDIRA", "kill hard", 1).await);
    let other = slash(&bot, &slack, "UDIRB", &format!("confirm {code}"), 2).await;
    assert!(other.contains("was asked for by someone else; only they can confirm it"), "{other}");
    assert_eq!(in_force().await, None, "another director's confirm pulled the switch");
    let own = slash(&bot, &slack, "UDIRA", &format!("confirm {code}"), 3).await;
    assert!(own.contains("HARD"), "{own}");
    assert_eq!(in_force().await.as_deref(), Some("hard"));
    // Ending the hard kill asks for a code too.
    let resume_code = code_in(&slash(&bot, &slack, "UDIRB", "resume", 4).await);
    let resumed = slash(&bot, &slack, "UDIRB", &format!("confirm {resume_code}"), 40).await;
    assert_eq!(in_force().await, None, "{resumed}");

    // A code left past its window: the asker's own confirm is refused, nothing runs.
    let asked = slash(&bot, &slack, "UDIRB", "kill hard", 5).await;
    let expires_by = tokio::time::Instant::now() + WINDOW + Duration::from_secs(1);
    let code = code_in(&asked);
    // The behaviour under test is what a confirm does after the window: wait it out.
    tokio::time::sleep_until(expires_by).await;
    let late = slash(&bot, &slack, "UDIRB", &format!("confirm {code}"), 6).await;
    assert!(late.contains("expired"), "{late}");
    assert_eq!(in_force().await, None, "an expired code pulled the switch");
    bot.stop().await;
}
