//! Docker control against the real engine, with a tiny image built from local
//! files: status lists the project's containers, a hard kill stops the
//! listeners and resume starts them, restart hits one agent, nuclear removes
//! the project (the bot's own container excepted) and, with purge, its
//! volumes and networks. Other projects are untouched.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_bot::docker::{DockerControl, DockerError};
use mesh_tests::docker::{Project, docker_or_skip};

#[tokio::test]
async fn status_lists_the_project_and_hard_kill_stops_and_resume_starts_listeners() {
    if !docker_or_skip() {
        return;
    }
    let project = Project::new();
    let a = project.run("listener", Some("a"));
    let b = project.run("listener", Some("b"));
    let bot = project.run("bot", None);
    let docker = DockerControl::connect(&project.name).await.unwrap();

    let rows = docker.containers().await.unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, [bot.as_str(), a.as_str(), b.as_str()], "sorted by name");
    assert!(rows.iter().all(|r| r.state == "running" && r.uptime_s.is_some()), "{rows:?}");
    assert_eq!(rows[1].agent.as_deref(), Some("a"));
    assert_eq!(rows[0].role, "bot");

    let stopped = docker.stop_listeners().await.unwrap();
    assert_eq!(stopped, [a.clone(), b.clone()]);
    assert_eq!(project.inspect(&a, "{{.State.Running}}").as_deref(), Some("false"));
    assert_eq!(project.inspect(&bot, "{{.State.Running}}").as_deref(), Some("true"), "the bot keeps running");

    let started = docker.start_listeners().await.unwrap();
    assert_eq!(started, [a.clone(), b.clone()]);
    assert_eq!(project.inspect(&b, "{{.State.Running}}").as_deref(), Some("true"));
}

#[tokio::test]
async fn restart_hits_only_that_agents_listener() {
    if !docker_or_skip() {
        return;
    }
    let project = Project::new();
    let a = project.run("listener", Some("a"));
    let b = project.run("listener", Some("b"));
    let docker = DockerControl::connect(&project.name).await.unwrap();
    let (a_before, b_before) =
        (project.inspect(&a, "{{.State.StartedAt}}"), project.inspect(&b, "{{.State.StartedAt}}"));
    assert_eq!(docker.restart_listener("a").await.unwrap(), a);
    assert_ne!(project.inspect(&a, "{{.State.StartedAt}}"), a_before);
    assert_eq!(project.inspect(&b, "{{.State.StartedAt}}"), b_before);
    let missing = docker.restart_listener("zed").await.unwrap_err();
    assert!(matches!(missing, DockerError::NoListener { .. }), "{missing}");
}

#[tokio::test]
async fn nuclear_removes_the_project_but_the_bot_and_other_projects() {
    if !docker_or_skip() {
        return;
    }
    let project = Project::new();
    let other = Project::new();
    let a = project.run("listener", Some("a"));
    let nats = project.run("nats", None);
    let bot = project.run("bot", None);
    let (volume, network) = project.volume_and_network();
    let bystander = other.run("listener", Some("a"));
    let docker = DockerControl::connect(&project.name).await.unwrap();

    let bot_id = project.inspect(&bot, "{{.Id}}").unwrap();
    let report = docker.nuclear(true, Some(&bot_id)).await.unwrap();
    assert_eq!(report.removed, [a.clone(), nats.clone()]);
    assert_eq!(report.kept, std::slice::from_ref(&bot));
    assert_eq!(report.volumes, std::slice::from_ref(&volume));
    assert_eq!(report.networks, std::slice::from_ref(&network));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(project.inspect(&a, "{{.Name}}"), None);
    assert_eq!(project.inspect(&bot, "{{.State.Running}}").as_deref(), Some("true"));
    assert_eq!(
        other.inspect(&bystander, "{{.State.Running}}").as_deref(),
        Some("true"),
        "another project is untouched"
    );
}

#[tokio::test]
async fn an_unreachable_engine_says_so_quickly() {
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let port = mesh_bot::local_nats::free_port().unwrap();
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(mesh_tests::fixtures::mesh_bin())
        .args(["restart", "a"])
        .env("MESH_REGISTRY", &fixture.registry)
        .env("DOCKER_HOST", format!("tcp://127.0.0.1:{port}"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("docker engine not reachable"), "{err}");
    assert!(err.contains("transport-level pause still works"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn mesh_kill_hard_stops_listener_containers_and_resume_starts_them() {
    if !docker_or_skip() {
        return;
    }
    let nats = mesh_tests::TestNats::start().await;
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let project = Project::new();
    let listener = project.run("listener", Some("a"));
    let mesh = |args: &'static [&'static str]| {
        let mut cmd = tokio::process::Command::new(mesh_tests::fixtures::mesh_bin());
        cmd.args(args)
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_COMPOSE_PROJECT", &project.name);
        cmd
    };
    let out = mesh(&["kill", "hard", "--yes", "--reason", "drill"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("HARD") && text.contains(&format!("docker: stopped listener containers: {listener}")),
        "{text}"
    );
    assert_eq!(project.inspect(&listener, "{{.State.Running}}").as_deref(), Some("false"));

    let status = mesh(&["status"]).output().await.unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&listener) && status.contains("exited"), "{status}");
    assert!(status.contains("HARD by terminal"), "{status}");

    let out = mesh(&["resume"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("docker: started listener containers: {listener}")), "{text}");
    assert_eq!(project.inspect(&listener, "{{.State.Running}}").as_deref(), Some("true"));
}

#[tokio::test]
async fn mesh_kill_nuclear_removes_the_project_and_reports_it() {
    if !docker_or_skip() {
        return;
    }
    let nats = mesh_tests::TestNats::start().await;
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let project = Project::new();
    let listener = project.run("listener", Some("a"));
    let nats_container = project.run("nats", None);
    let out = tokio::process::Command::new(mesh_tests::fixtures::mesh_bin())
        .args(["kill", "nuclear", "--yes"])
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("MESH_COMPOSE_PROJECT", &project.name)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("NUCLEAR by terminal"), "{text}");
    assert!(text.contains(&format!("removed: {listener}, {nats_container}")), "{text}");
    assert_eq!(project.inspect(&listener, "{{.Name}}"), None);
}
