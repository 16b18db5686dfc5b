//! Docker control against the real engine, with a tiny image built from local
//! files: status lists the project's containers, a hard kill stops the
//! listeners and resume starts them, restart hits one agent, nuclear removes
//! the project (the bot's own container excepted) and, with purge, its
//! volumes and networks. Other projects are untouched. Each test has its own
//! project, so they run in parallel.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::{Duration, Instant};

use mesh_bot::docker::{DockerControl, DockerError};
use mesh_tests::docker::{Extras, Project};
use mesh_tests::require_docker;

#[tokio::test]
async fn status_lists_the_projects_containers_with_role_agent_state_and_uptime() {
    require_docker!();
    let project = Project::new().await;
    let other = Project::new().await;
    let a = project.run("listener", Some("a")).await;
    let b = project.run("listener", Some("b")).await;
    let bot = project.run("bot", None).await;
    let nats = project.run("nats", None).await;
    other.run("listener", Some("a")).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();
    assert_eq!(docker.project(), project.name);

    let rows = docker.containers().await.unwrap();
    let seen: Vec<(&str, &str, Option<&str>)> =
        rows.iter().map(|r| (r.name.as_str(), r.role.as_str(), r.agent.as_deref())).collect();
    assert_eq!(
        seen,
        [
            (bot.as_str(), "bot", None),
            (a.as_str(), "listener", Some("a")),
            (b.as_str(), "listener", Some("b")),
            (nats.as_str(), "nats", None),
        ],
        "sorted by name, only this project"
    );
    for row in &rows {
        assert_eq!(row.state, "running", "{row:?}");
        assert!(row.uptime_s.is_some_and(|s| s < 600), "{row:?}");
        assert_eq!((row.restarts, row.health.as_deref()), (0, None), "{row:?}");
    }

    docker.stop_listeners().await.unwrap();
    let rows = docker.containers().await.unwrap();
    let listener = rows.iter().find(|r| r.name == a).unwrap();
    assert_eq!((listener.state.as_str(), listener.uptime_s), ("exited", None), "{listener:?}");
}

#[tokio::test]
async fn hard_kill_stops_only_listeners_and_resume_starts_them_again() {
    require_docker!();
    let project = Project::new().await;
    let a = project.run("listener", Some("a")).await;
    let b = project.run("listener", Some("b")).await;
    let bot = project.run("bot", None).await;
    let nats = project.run("nats", None).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();

    assert_eq!(docker.stop_listeners().await.unwrap(), [a.clone(), b.clone()]);
    for (name, running) in [(&a, false), (&b, false), (&bot, true), (&nats, true)] {
        assert_eq!(project.running(name).await, Some(running), "{name} after stop");
    }
    // Already stopped ones were not stopped by this call.
    assert_eq!(docker.stop_listeners().await.unwrap(), Vec::<String>::new());

    let both = [a.clone(), b.clone()];
    assert_eq!(docker.start_listeners(&both).await.unwrap(), both);
    for name in [&a, &b, &bot, &nats] {
        project.wait_running(name, true).await;
    }
    // Already running counts as started; only the names given are touched.
    assert_eq!(docker.start_listeners(&both[..1]).await.unwrap(), std::slice::from_ref(&a));
}

#[tokio::test]
async fn restart_hits_only_that_agents_listener() {
    require_docker!();
    let project = Project::new().await;
    let a = project.run("listener", Some("a")).await;
    let b = project.run("listener", Some("b")).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();
    let (a_before, b_before) = (project.started_at(&a).await, project.started_at(&b).await);
    assert!(a_before.is_some() && b_before.is_some());

    assert_eq!(docker.restart_listener("a").await.unwrap(), a);
    project.wait_running(&a, true).await;
    assert_ne!(project.started_at(&a).await, a_before, "a restarted");
    assert_eq!(project.started_at(&b).await, b_before, "b untouched");

    let missing = docker.restart_listener("zed").await.unwrap_err();
    assert!(matches!(missing, DockerError::NoListener { .. }), "{missing}");
    assert!(
        missing
            .to_string()
            .contains(&format!("no listener container for agent \"zed\" in project \"{}\"", project.name))
    );
}

#[tokio::test]
async fn nuclear_removes_the_project_but_the_bots_own_container_and_other_projects() {
    require_docker!();
    let project = Project::new().await;
    let other = Project::new().await;
    let volume = project.volume().await;
    let network = project.network().await;
    let a = project.run_with("listener", Some("a"), Extras { volume: Some(&volume), network: Some(&network) }).await;
    let nats = project.run_with("nats", None, Extras { volume: None, network: Some(&network) }).await;
    let bot = project.run("bot", None).await;
    let other_volume = other.volume().await;
    let bystander = other.run_with("listener", Some("a"), Extras { volume: Some(&other_volume), network: None }).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();

    let bot_id = project.id(&bot).await;
    let report = docker.nuclear(true, Some(&bot_id)).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.stopped, [a.clone(), nats.clone()]);
    assert_eq!(report.removed, [a.clone(), nats.clone()]);
    assert_eq!(report.kept, std::slice::from_ref(&bot));
    assert_eq!(report.volumes, std::slice::from_ref(&volume));
    assert_eq!(report.networks, std::slice::from_ref(&network));

    assert_eq!(project.inspect(&a).await.map(|i| i.id), None, "removed");
    assert_eq!(project.inspect(&nats).await.map(|i| i.id), None, "removed");
    assert_eq!(project.running(&bot).await, Some(true), "the bot's own container keeps running");
    assert!(!project.volume_exists(&volume).await && !project.network_exists(&network).await);
    assert_eq!(other.running(&bystander).await, Some(true), "another project is untouched");
    assert!(other.volume_exists(&other_volume).await, "another project's volume is untouched");

    // Again, the bot known by its short id (its default hostname): nothing left but the bot.
    let again = docker.nuclear(false, Some(&bot_id[..12])).await.unwrap();
    assert_eq!((again.stopped.len(), again.removed.len(), again.kept.clone()), (0, 0, vec![bot.clone()]));
}

#[tokio::test]
async fn nuclear_without_purge_keeps_volumes_and_networks() {
    require_docker!();
    let project = Project::new().await;
    let volume = project.volume().await;
    let network = project.network().await;
    let a = project.run_with("listener", Some("a"), Extras { volume: Some(&volume), network: Some(&network) }).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();

    let report = docker.nuclear(false, None).await.unwrap();
    assert_eq!((report.removed, report.kept), (vec![a], vec![]));
    assert!(report.volumes.is_empty() && report.networks.is_empty() && report.failed.is_empty());
    assert!(project.volume_exists(&volume).await && project.network_exists(&network).await);
}

#[tokio::test]
async fn an_unreachable_engine_gives_a_clear_error_quickly() {
    let port = mesh_bot::local_nats::free_port().unwrap();
    let host = format!("tcp://127.0.0.1:{port}");
    let started = Instant::now();
    let err = DockerControl::connect_to(Some(&host), "mesh").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(matches!(err, DockerError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("docker engine not reachable at {host}: ")), "{text}");
    assert!(text.ends_with("; the transport-level pause still works"), "{text}");
}

#[tokio::test]
async fn mesh_restart_with_an_unreachable_engine_says_so_quickly() {
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let port = mesh_bot::local_nats::free_port().unwrap();
    let started = Instant::now();
    let out = tokio::process::Command::new(mesh_tests::fixtures::mesh_bin())
        .args(["restart", "a"])
        .env("MESH_REGISTRY", &fixture.registry)
        .env("DOCKER_HOST", format!("tcp://127.0.0.1:{port}"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("docker engine not reachable at tcp://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("transport-level pause still works"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn mesh_kill_hard_stops_listener_containers_and_resume_starts_them() {
    require_docker!();
    let nats = mesh_tests::TestNats::start().await;
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let project = Project::new().await;
    let listener = project.run("listener", Some("a")).await;
    let mesh = |args: &'static [&'static str]| {
        let mut cmd = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        cmd.args(args).env("MESH_COMPOSE_PROJECT", &project.name);
        cmd
    };
    let out = mesh(&["kill", "hard", "--yes", "--reason", "drill"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("HARD") && text.contains(&format!("docker: stopped listener containers: {listener}")),
        "{text}"
    );
    assert_eq!(project.running(&listener).await, Some(false));

    let status = mesh(&["status"]).output().await.unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&listener) && status.contains("exited"), "{status}");
    assert!(status.contains("HARD by terminal"), "{status}");

    let out = mesh(&["resume", "--yes"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("docker: started listener containers: {listener}")), "{text}");
    project.wait_running(&listener, true).await;
}

#[tokio::test]
async fn mesh_kill_nuclear_removes_the_project_and_reports_it() {
    require_docker!();
    let nats = mesh_tests::TestNats::start().await;
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true)]);
    let project = Project::new().await;
    let listener = project.run("listener", Some("a")).await;
    let nats_container = project.run("nats", None).await;
    let out = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(["kill", "nuclear", "--yes"])
        .env("MESH_COMPOSE_PROJECT", &project.name)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("NUCLEAR by terminal"), "{text}");
    assert!(text.contains(&format!("removed: {listener}, {nats_container}")), "{text}");
    assert_eq!(project.inspect(&listener).await.map(|i| i.id), None);
}

/// Issue 21.5: `resume` starts the listener containers the hard kill stopped,
/// not one an operator had stopped on purpose before it.
#[tokio::test]
async fn resume_starts_only_the_listener_containers_the_kill_stopped() {
    require_docker!();
    let nats = mesh_tests::TestNats::start().await;
    let gw = mesh_tests::RecordingGateway::start().await;
    let fixture = mesh_tests::Fixture::registry(&[("a", &gw, true), ("b", &gw, true)]);
    let project = Project::new().await;
    let a = project.run("listener", Some("a")).await;
    let b = project.run("listener", Some("b")).await;
    let docker = DockerControl::connect_to(mesh_tests::docker::host().as_deref(), &project.name).await.unwrap();
    // The operator stops b's listener by hand (b's gateway is being moved).
    assert_eq!(docker.stop_listeners().await.unwrap().len(), 2);
    assert_eq!(docker.start_listeners(std::slice::from_ref(&a)).await.unwrap(), std::slice::from_ref(&a));
    project.wait_running(&a, true).await;
    let mesh = |args: &'static [&'static str]| {
        let mut cmd = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        cmd.args(args).env("MESH_COMPOSE_PROJECT", &project.name);
        cmd
    };
    let out = mesh(&["kill", "hard", "--yes"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("docker: stopped listener containers: {a}\n")), "{text}");
    // A second kill finds nothing running and keeps the first one's record.
    let out = mesh(&["kill", "hard", "--yes"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mesh(&["resume", "--yes"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("docker: started listener containers: {a}\n")), "{text}");
    project.wait_running(&a, true).await;
    assert_eq!(project.running(&b).await, Some(false), "b was stopped before the kill: it stays stopped");
    // The record is spent: another resume starts nothing.
    let out = mesh(&["resume", "--yes"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no listener container was stopped by a kill"), "{text}");
}

/// Issue 21.4: a bot in a container acts on its own container's compose
/// project (label `com.docker.compose.project`), never on a default one; a
/// container without the label refuses Docker actions with a clear error.
#[tokio::test]
async fn the_bot_takes_its_project_from_its_own_containers_label() {
    require_docker!();
    let staging = Project::new().await;
    let production = Project::new().await;
    let bot = staging.run("bot", None).await;
    let own = staging.id(&bot).await;
    let staging_listener = staging.run("listener", Some("a")).await;
    let production_listener = production.run("listener", Some("a")).await;
    let host = mesh_tests::docker::host();
    let docker = DockerControl::for_container(host.as_deref(), &own).await.unwrap();
    assert_eq!(docker.project(), staging.name);
    assert_eq!(docker.stop_listeners().await.unwrap(), std::slice::from_ref(&staging_listener));
    assert_eq!(production.running(&production_listener).await, Some(true), "another project is untouched");

    // Through the engine's Containers: the own container's project, or a refusal.
    use mesh_bot::containers::Containers;
    let from_label = mesh_bot::docker::DockerHost {
        host: host.clone(),
        project: mesh_bot::docker::Project::OwnContainer(own.clone()),
    };
    let names: Vec<String> = from_label.list().await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, [bot.clone(), staging_listener.clone()]);
    let unknown =
        mesh_bot::docker::DockerHost { host, project: mesh_bot::docker::Project::OwnContainer("0".repeat(64)) };
    let e = unknown.stop_listeners().await.unwrap_err();
    assert!(matches!(e, DockerError::ProjectUnknown(_)), "{e}");
    assert!(e.to_string().contains("set MESH_COMPOSE_PROJECT"), "{e}");
    assert_eq!(production.running(&production_listener).await, Some(true));
}
