//! `mesh-bench`: measures the mesh on this machine and prints a table plus
//! JSON. It starts its own nats-server, a fast sink gateway and listener
//! processes. A benchmark: it reports figures, it asserts nothing.
//!
//! Usage: `mesh-bench [--quick] [--forward-only] [--sync-always] [--no-python] [--json PATH]` (build with `--release`);
//! `mesh-bench --soak [--messages N] [--rate MSGS_PER_S] [--concurrency C]`
//! runs only the soak (default 1,000,000 messages, up to 2,500/s, concurrency 1).

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_tests::TestNats;
use mesh_tests::bench::{self, ListenerProcess, Row, Sink};
use mesh_tests::soak::{self, SoakConfig};

const BACKLOG: usize = 20_000;
const USAGE: &str = "usage: mesh-bench [--quick] [--forward-only] [--sync-always] [--no-python] [--json PATH]
       mesh-bench --soak [--messages N] [--rate MSGS_PER_S] [--concurrency C]

Measures the mesh on this machine (build with --release; needs nats-server on PATH):
ceilings (JetStream publish, fetch+ack, the sink with 32 connections and with one
sequential keep-alive client), backlog forwarding and live bursts at concurrency 1 and 32,
an old-style Python listener (nats-py + requests, installed into target/bench-venv on
first use; --no-python skips it), latency, idle memory, fan-out and ping at 100, 1,000
and 3,000 agents. --quick runs a tenth of everything; --forward-only stops after the
backlog rows; --sync-always fsyncs every JetStream write; --json PATH writes the figures.";
const KNOWN: [&str; 9] = [
    "--quick",
    "--forward-only",
    "--sync-always",
    "--no-python",
    "--json",
    "--soak",
    "--messages",
    "--rate",
    "--concurrency",
];
/// Soak defaults: messages, rate, messages between RSS samples.
const SOAK: SoakConfig = SoakConfig { messages: 1_000_000, rate: 2_500.0, sample_every: 50_000 };

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    if let Some(unknown) = args.iter().skip(1).find(|a| a.starts_with('-') && !KNOWN.contains(&a.as_str())) {
        anyhow::bail!("unknown option {unknown:?}; {USAGE}");
    }
    if nats_version().is_empty() {
        anyhow::bail!("nats-server is not on PATH; run scripts/install.sh, or put .mesh/tools/bin on PATH");
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let scale = if quick { 10 } else { 1 };
    let forward_only = args.iter().any(|a| a == "--forward-only");
    mesh_listener::gateway::install_tls_provider();

    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    // `--sync-always`: the server fsyncs every write, as the mesh's configs do (README).
    let sync_always = args.iter().any(|a| a == "--sync-always");
    let nats = if sync_always { TestNats::start_durable().await } else { TestNats::start().await };
    println!("nats-server sync_interval: {}", if sync_always { "always" } else { "default (2 min)" });
    let js = nats.jetstream().await;
    let mut rows = Vec::new();

    if args.iter().any(|a| a == "--soak") {
        let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
        let config = SoakConfig {
            messages: flag("--messages").map(|v| v.parse()).transpose()?.unwrap_or(SOAK.messages),
            rate: flag("--rate").map(|v| v.parse()).transpose()?.unwrap_or(SOAK.rate),
            ..SOAK
        };
        let concurrency: usize = flag("--concurrency").map(|v| v.parse()).transpose()?.unwrap_or(1);
        let row = soak_row(&js, &sink, dir.path(), &nats, config, concurrency).await?;
        print_table(std::slice::from_ref(&row), f64::NAN);
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"machine": machine(), "rows": [row]}))?);
        return Ok(());
    }

    // Ceilings.
    let n = BACKLOG / scale;
    let broker_publish = publish_ceiling(&js, n).await?;
    let broker_fetch = fetch_ack_ceiling(&js, n).await?;
    let sink_rate = sink_ceiling(&sink, n).await?;
    let sequential = sequential_ceiling(&sink, n / 4).await?;
    let broker = broker_publish.min(broker_fetch);
    let ceiling = broker.min(sink_rate);
    rows.push(
        Row::new("ceiling: JetStream publish", "async publish, 256 acks in flight, file storage, msgs/s")
            .with("msgs_per_s", broker_publish),
    );
    rows.push(
        Row::new("ceiling: JetStream fetch+ack", "pull consumer, batches of 256, ack each, msgs/s")
            .with("msgs_per_s", broker_fetch),
    );
    rows.push(
        Row::new("ceiling: sink via plain HTTP client", "reqwest, 32 concurrent keep-alive connections, msgs/s")
            .with("msgs_per_s", sink_rate),
    );
    rows.push(
        Row::new(
            "ceiling: sequential HTTP client",
            "reqwest, one keep-alive connection, one request at a time (the limit for ordered delivery), msgs/s",
        )
        .with("msgs_per_s", sequential),
    );
    sink.reset();

    // Forward throughput.
    let one = bench::write_registry(dir.path(), &sink, 1)?;
    for concurrency in [1usize, 32] {
        let agent = "a0";
        bench::ensure_consumer(&js, agent, concurrency).await?;
        bench::publish_backlog(&js, agent, n).await?;
        sink.reset();
        let listener =
            ListenerProcess::start(&nats, &one, &["--agent", agent, "--concurrency", &concurrency.to_string()])?;
        let started = Instant::now();
        let done = sink.wait_total(n, Duration::from_secs(600)).await;
        let elapsed = started.elapsed();
        let cpu = listener.cpu_seconds();
        listener.stop().await;
        let arrivals = sink.arrivals(agent);
        let with_startup = if done { n as f64 / elapsed.as_secs_f64() } else { f64::NAN };
        // Steady state, like the ceilings: first to last arrival, process start-up excluded.
        let first = arrivals.iter().map(|a| a.at).min();
        let last = arrivals.iter().map(|a| a.at).max();
        let (rate, startup_ms) = match (done, first, last) {
            (true, Some(first), Some(last)) if last > first => {
                ((arrivals.len() - 1) as f64 / (last - first).as_secs_f64(), (first - started).as_secs_f64() * 1000.0)
            }
            _ => (f64::NAN, f64::NAN),
        };
        rows.push(
            Row::new(
                format!("forward {n} backlog, concurrency {concurrency}"),
                "listener process started on a full backlog; msgs/s from the first to the last sink arrival \
                 (steady state, as the ceilings); with start-up: from process start; CPU from /proc/<pid>/stat",
            )
            .with("msgs_per_s", rate)
            .with("fraction_of_ceiling", rate / ceiling)
            .with("fraction_of_sequential", rate / sequential)
            .with("msgs_per_s_with_startup", with_startup)
            .with("startup_ms", startup_ms)
            .with("cpu_s_per_10k", cpu * 10_000.0 / n as f64)
            .with("delivered", arrivals.len() as f64),
        );
        sink.reset();
    }

    if forward_only {
        print_table(&rows, ceiling);
        return Ok(());
    }

    // Live bursts: ours at concurrency 1 and 32, then the old-style listener.
    let mut old_rate = f64::NAN;
    if !args.iter().any(|a| a == "--no-python") {
        match old_style_burst(&js, &sink, &nats, n).await {
            Ok(row) => {
                old_rate = row.figures.get("msgs_per_s").copied().unwrap_or(f64::NAN);
                rows.push(row);
            }
            Err(e) => println!("old-style listener skipped: {e:#}"),
        }
    }
    for concurrency in [1usize, 32] {
        bench::ensure_consumer(&js, "a0", concurrency).await?;
        let listener =
            ListenerProcess::start(&nats, &one, &["--agent", "a0", "--concurrency", &concurrency.to_string()])?;
        bench::wait_pulling(&js, "a0", Duration::from_secs(10)).await;
        sink.reset();
        let cpu = listener.cpu_seconds();
        let sent = bench::publish_burst(&js, "a0", n).await?;
        sink.wait_total(n, Duration::from_secs(600)).await;
        let figures = bench::burst_figures(&sent, &sink.arrivals("a0"));
        let cpu = listener.cpu_seconds() - cpu;
        let rss = listener.rss_kib();
        listener.stop().await;
        rows.push(
            burst_row(&format!("live burst of {n}, ours, concurrency {concurrency}"), figures, cpu, rss, n)
                .with("x_old_style", figures.rate / old_rate),
        );
        sink.reset();
    }

    // Latency, paced (the consumer back to the tuning of concurrency 1).
    bench::ensure_consumer(&js, "a0", 1).await?;
    let listener = ListenerProcess::start(&nats, &one, &["--agent", "a0"])?;
    bench::wait_pulling(&js, "a0", Duration::from_secs(10)).await;
    for (rate, count) in [(100.0, 1000 / scale.min(5)), (1000.0, 5000 / scale)] {
        sink.reset();
        let sent = bench::publish_paced(&js, "a0", count, rate).await?;
        sink.wait_total(count, Duration::from_secs(60)).await;
        let samples: Vec<Duration> = sink
            .arrivals("a0")
            .iter()
            .filter_map(|a| sent.get(a.index as usize).map(|s| a.at.saturating_duration_since(*s)))
            .collect();
        let (p50, p99, max) = bench::percentiles(samples);
        rows.push(
            Row::new(
                format!("latency at {rate} msg/s ({count} msgs)"),
                "publish instant to sink arrival, same process clock, concurrency 1, ms",
            )
            .with("p50_ms", p50)
            .with("p99_ms", p99)
            .with("max_ms", max),
        );
    }
    listener.stop().await;

    // Memory of one idle listener.
    let listener = ListenerProcess::start(&nats, &one, &["--agent", "a0"])?;
    bench::wait_pulling(&js, "a0", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, pss) = listener.memory_kib();
    listener.stop().await;
    rows.push(
        Row::new("memory: one idle single-agent listener", "/proc/<pid>/smaps_rollup after 2 s idle, MB")
            .with("rss_mb", rss as f64 / 1024.0)
            .with("pss_mb", pss as f64 / 1024.0),
    );

    // Fan-out and ping.
    for agents in [100usize, 1000 / scale, 3000 / scale] {
        let registry = bench::write_registry(dir.path(), &sink, agents)?;
        let names: Vec<String> = (0..agents).map(|i| format!("a{i}")).collect();
        let mut ensured =
            futures::stream::iter(names.iter().map(|a| bench::ensure_consumer(&js, a, 1))).buffer_unordered(32);
        while let Some(r) = ensured.next().await {
            r?;
        }
        let listener = ListenerProcess::start(&nats, &registry, &["--all"])?;
        let mut ready =
            futures::stream::iter(names.iter().map(|a| bench::wait_pulling(&js, a, Duration::from_secs(60))))
                .buffer_unordered(32);
        while ready.next().await.is_some() {}
        sink.reset();
        let started = Instant::now();
        let envelope = mesh_protocol::Envelope::new("bench", mesh_protocol::Recipient::Broadcast, "bench 0")?;
        mesh_bot::publish::publish(&js, &envelope).await?;
        let all = sink.wait_total(agents, Duration::from_secs(60)).await;
        let last = sink.all().iter().map(|a| a.at).max().unwrap_or(started);
        let fanout_ms = if all { last.duration_since(started).as_secs_f64() * 1000.0 } else { f64::NAN };
        let (rss, _) = listener.memory_kib();
        rows.push(
            Row::new(
                format!("fan-out: broadcast to {agents} agents, one --all process"),
                "publish to last sink arrival; listener RSS after delivery",
            )
            .with("last_delivery_ms", fanout_ms)
            .with("rss_mb", rss as f64 / 1024.0),
        );
        let reg = mesh_listener::registry_file::load(&registry, &Default::default())?;
        let client = nats.client().await;
        let report = mesh_bot::ping::ping(&client, &reg, Duration::from_secs(10)).await.map_err(anyhow::Error::msg)?;
        rows.push(
            Row::new(format!("ping: {agents} agents"), "mesh ping until every pong arrived, ms")
                .with("all_pongs_ms", report.elapsed_ms as f64)
                .with("missing", report.missing as f64),
        );
        listener.stop().await;
    }

    print_table(&rows, ceiling);
    let json = serde_json::json!({
        "machine": machine(),
        "nats_server": nats_version(),
        "ceiling_msgs_per_s": ceiling,
        "rows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    if let Some(path) = json_path {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// One listener (no `--http`, so nothing scrapes `/metrics`) fed a paced
/// stream; its RSS sampled from /proc/<pid>/status.
async fn soak_row(
    js: &async_nats::jetstream::Context,
    sink: &Sink,
    dir: &std::path::Path,
    nats: &TestNats,
    config: SoakConfig,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let registry = bench::write_registry(dir, sink, 1)?;
    bench::ensure_consumer(js, "a0", concurrency).await?;
    let listener =
        ListenerProcess::start(nats, &registry, &["--agent", "a0", "--concurrency", &concurrency.to_string()])?;
    bench::wait_pulling(js, "a0", Duration::from_secs(10)).await;
    let report = soak::run(js, sink, &listener, "a0", config).await?;
    listener.stop().await;
    let mb = |kib: u64| kib as f64 / 1024.0;
    for sample in &report.samples {
        println!("soak sample: {} delivered, {:.1} s, RSS {:.2} MB", sample.delivered, sample.at_s, mb(sample.rss_kib));
    }
    Ok(Row::new(
        format!("soak: {} messages, concurrency {concurrency}, no scrape", config.messages),
        format!(
            "one listener process without --http (nobody scrapes /metrics), publisher at most {} msg/s and 5,000 \
             messages ahead of the sink; VmRSS from /proc/<pid>/status every {} deliveries; start = first sample \
             (after warm-up), end = last",
            config.rate, config.sample_every
        ),
    )
    .with("idle_rss_mb", mb(report.idle_kib))
    .with("start_rss_mb", mb(report.start_kib()))
    .with("end_rss_mb", mb(report.end_kib()))
    .with("max_rss_mb", mb(report.max_kib()))
    .with("growth_mb", mb(report.end_kib()) - mb(report.start_kib()))
    .with("delivered", report.delivered as f64)
    .with("elapsed_s", report.elapsed_s)
    .with("msgs_per_s", report.delivered as f64 / report.elapsed_s))
}

async fn publish_ceiling(js: &async_nats::jetstream::Context, n: usize) -> anyhow::Result<f64> {
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.ceiling".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 300]);
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        acks.push(js.publish("bench.ceiling", payload.clone()).await?.into_future());
        if acks.len() >= 256 {
            acks.next().await.transpose()?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn fetch_ack_ceiling(js: &async_nats::jetstream::Context, n: usize) -> anyhow::Result<f64> {
    let stream = js.get_stream("BENCH").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(256).messages().await?.take(n);
    while let Some(message) = messages.next().await {
        message.map_err(|e| anyhow::anyhow!("{e}"))?.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One keep-alive client posting one request at a time: what ordered delivery can reach at best.
async fn sequential_ceiling(sink: &Sink, n: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let url = format!("http://{}/hooks/ceiling", sink.addr);
    let body = serde_json::json!({"text": "[mesh] Message from bench: bench 0", "mode": "now"}).to_string();
    let started = Instant::now();
    for _ in 0..n {
        client.post(&url).bearer_auth("t").header("Idempotency-Key", "k").body(body.clone()).send().await?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A row of live-burst figures.
fn burst_row(workload: &str, figures: bench::BurstFigures, cpu_s: f64, rss_kib: u64, n: usize) -> Row {
    Row::new(
        workload,
        "N messages published at full speed (JetStream, acked, 256 in flight) while the listener runs; msgs/s from \
         the first publish to the last sink arrival; latency publish instant to arrival; CPU of the listener process \
         during the burst per message; RSS after it",
    )
    .with("msgs_per_s", figures.rate)
    .with("p50_ms", figures.p50_ms)
    .with("p99_ms", figures.p99_ms)
    .with("cpu_ms_per_msg", cpu_s * 1000.0 / n as f64)
    .with("rss_mb", rss_kib as f64 / 1024.0)
    .with("delivered", figures.delivered as f64)
}

/// The old-style Python listener (core NATS, one blocking POST with a new
/// connection per message) on agent `b0`'s inbox, fed the same burst.
async fn old_style_burst(
    js: &async_nats::jetstream::Context,
    sink: &Sink,
    nats: &TestNats,
    n: usize,
) -> anyhow::Result<Row> {
    let exe = std::env::current_exe()?;
    let target = exe.parent().and_then(std::path::Path::parent).ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let python = mesh_tests::oldstyle::ensure_venv(&target.join("bench-venv"))?;
    bench::ensure_consumer(js, "a0", 1).await?;
    let hook = format!("http://{}/hooks/b0", sink.addr);
    let old = mesh_tests::oldstyle::OldListener::start(&python, &nats.url(), "agents.b0.inbox", &hook).await?;
    sink.reset();
    let cpu = bench::cpu_seconds(old.pid());
    let sent = bench::publish_burst(js, "b0", n).await?;
    let all = sink.wait_total(n, Duration::from_secs(600)).await;
    let figures = bench::burst_figures(&sent, &sink.arrivals("b0"));
    let cpu = bench::cpu_seconds(old.pid()) - cpu;
    let rss = bench::rss_kib(old.pid());
    old.stop().await;
    sink.reset();
    anyhow::ensure!(all, "the old-style listener delivered {} of {n}", figures.delivered);
    Ok(burst_row(&format!("live burst of {n}, old-style Python listener"), figures, cpu, rss, n))
}

async fn sink_ceiling(sink: &Sink, n: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let url = format!("http://{}/hooks/ceiling", sink.addr);
    let body = serde_json::json!({"text": "[mesh] Message from bench: bench 0", "mode": "now"}).to_string();
    let started = Instant::now();
    let mut calls = futures::stream::iter(
        (0..n).map(|_| client.post(&url).bearer_auth("t").header("Idempotency-Key", "k").body(body.clone()).send()),
    )
    .buffer_unordered(32);
    while let Some(r) = calls.next().await {
        r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn print_table(rows: &[Row], ceiling: f64) {
    if ceiling.is_finite() {
        println!("\nmin(broker, sink) ceiling: {ceiling:.0} msgs/s\n");
    }
    println!("{:<58} figures", "workload");
    for row in rows {
        let figures: Vec<String> = row.figures.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
        println!("{:<58} {}", row.workload, figures.join("  "));
    }
    println!();
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

fn nats_version() -> String {
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
