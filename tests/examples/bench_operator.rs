//! Operator benchmark against a real cluster (KUBECONFIG) and a real Serf agent. Prints, side
//! by side: event-to-Job latency (stream arrival to the Job seen in a watch) next to a bare
//! Job POST from the same client; sustained user events turned into Jobs (with a loss check)
//! next to the API server's own create rate (a minimal Job, and the very Jobs the operator
//! makes, POSTed bare); the operator's RSS idle and with 1,000 handlers;
//! the CPU 1,000 handler updates cost next to one full compile; and a soak at a fixed event
//! rate (SOAK_SECS, default 600, 0 skips; SOAK_RATE events/s, default 5) with its RSS growth.
//! Each figure is printed next to its baseline from the same run, with the ratio.
//!
//! `cargo build --release -p serf-operator && SERF_OPERATOR_BIN=target/release/serf-operator
//! cargo run --release -p serf-operator-e2e --example bench_operator` (EVENTS=1000 to change
//! the sustained run's size).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serf_client::ClientConfig;
use serf_operator_e2e::{OperatorProcess, TempNamespace, cluster_or_skip, install_crds};
use serf_testkit::{Agent, AgentConfig};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in ms (100 Hz clock ticks).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10
}

fn job(name: &str) -> Job {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"bench": "bare"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap_or_default()
}

/// POSTs `job`, then waits (up to 10 s) for the watch to see it: the ms from the POST to
/// then, or `None` when it was not seen.
async fn post_until_seen(
    japi: &Api<Job>,
    job: &Job,
    seen: &Mutex<BTreeMap<String, Instant>>,
) -> anyhow::Result<Option<f64>> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let t0 = Instant::now();
    japi.create(&PostParams::default(), job).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() <= deadline {
        if let Some(t) = seen.lock().ok().and_then(|m| m.get(&name).copied()) {
            return Ok(Some(t.saturating_duration_since(t0).as_secs_f64() * 1000.0));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    Ok(None)
}

/// `count` Jobs exactly as the operator makes them for user events `burst` with ltimes from
/// `ltime`, built by its engine for the handler `owner`.
fn operator_jobs(owner: &serf_operator_crds::SerfHandler, count: usize, ltime: u64) -> Vec<Job> {
    let mut engine = serf_operator::engine::Engine::new(
        std::slice::from_ref(owner),
        serf_operator::engine::Membership::default(),
    );
    let node = serf_operator::contract::SelfNode {
        name: "bench-op".into(),
        tags: [("role".to_string(), "web".to_string())].into(),
    };
    let mut jobs = Vec::new();
    for i in 0..count {
        let ev = serf_client::Event::User(serf_client::UserEvent {
            ltime: ltime + i as u64,
            name: "burst".into(),
            payload: format!("{i}").into_bytes(),
            coalesce: false,
        });
        let o = engine.route(
            &ev,
            &serf_operator::engine::Context {
                node: &node,
                pod: ("", ""),
                active: &serf_operator::engine::NoActiveJobs,
                now: std::time::SystemTime::now(),
                replayed: false,
            },
        );
        if let Some(serf_operator::engine::Action::Launch(l)) = o.actions.into_iter().next() {
            jobs.push(l.job);
        }
    }
    jobs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let Some(client) = cluster_or_skip("the operator benchmark").await else {
        return Ok(());
    };
    let sustained: usize = std::env::var("EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    install_crds(&client).await?;
    let tmp = TempNamespace::create(&client, "bench").await?;
    let ns = tmp.name.clone();
    let agent = Agent::start(AgentConfig::new("bench-op").tag("role", "web"), &[])?;
    let hapi: Api<serf_operator_crds::SerfHandler> = Api::namespaced(client.clone(), &ns);
    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "bench", "namespace": ns},
        "spec": {"routes": [{"name": "go", "events": "user", "job": {"spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}}],
            "successfulJobsHistoryLimit": 1000, "failedJobsHistoryLimit": 1000}
    });
    hapi.patch(
        "bench",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&handler),
    )
    .await?;

    // Watch every Job in the namespace and note when each name first appears.
    let seen: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let japi: Api<Job> = Api::namespaced(client.clone(), &ns);
    {
        let seen = seen.clone();
        let japi = japi.clone();
        tokio::spawn(async move {
            let mut s = watcher(japi, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(j)) = s.next().await {
                if let Some(n) = j.metadata.name {
                    seen.lock()
                        .map(|mut m| {
                            m.entry(n).or_insert_with(Instant::now);
                        })
                        .ok();
                }
            }
        });
    }

    let metrics = serf_testkit::free_port()?;
    let log = std::env::temp_dir().join("serf-operator-bench.log");
    let mut op = OperatorProcess::start(
        &[
            "--namespaces",
            &ns,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--workers",
            "8",
        ],
        &[
            ("SERF_RPC_ADDR", agent.rpc_addr().to_string()),
            ("POD_NAMESPACE", ns.clone()),
            ("RUST_LOG", "warn".into()),
        ],
        log.clone(),
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = op.pid();
    let rss_idle = rss_kib(pid);

    // The operator's own stream, to time each event's arrival.
    let serf =
        serf_client::Client::connect(ClientConfig::new(agent.rpc_addr().to_string())).await?;
    let mut stream = serf.stream("user").await?;
    let count_before =
        |seen: &Arc<Mutex<BTreeMap<String, Instant>>>| seen.lock().map(|m| m.len()).unwrap_or(0);

    // 1. Latency, one event at a time.
    let n = 200;
    let mut lat = Vec::new();
    for i in 0..n {
        let before = count_before(&seen);
        serf.event("lat", format!("{i}").as_bytes(), false).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let arrived = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        while count_before(&seen) <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let t = seen
            .lock()
            .map(|m| m.values().max().copied())
            .ok()
            .flatten()
            .unwrap_or(arrived);
        lat.push(t.saturating_duration_since(arrived).as_secs_f64() * 1000.0);
    }

    // 2. A bare Job POST from the same client, sequential.
    let mut post_seen = Vec::new();
    for i in 0..n {
        post_seen.extend(post_until_seen(&japi, &job(&format!("bare-{i}")), &seen).await?);
    }

    // 2b. The same, with the operator's own Job objects (its Job's weight at the API
    //     server, without the operator).
    let owner = hapi.get("bench").await?;
    let mut own_seen = Vec::new();
    for job in operator_jobs(&owner, n, 2_000_000) {
        own_seen.extend(post_until_seen(&japi, &job, &seen).await?);
    }

    // 3. Sustained: fire events as fast as the agent takes them; count the Jobs.
    let start_count = count_before(&seen);
    let sustained_cpu_before = cpu_ms(pid);
    let t0 = Instant::now();
    for i in 0..sustained {
        serf.event("burst", format!("{i}").as_bytes(), false)
            .await?;
    }
    let fired = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_before(&seen) < start_count + sustained && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let made = count_before(&seen) - start_count;
    let sustained_cpu = cpu_ms(pid).saturating_sub(sustained_cpu_before);

    // 4. The API server's own create rate: 8 concurrent creators.
    let api_n = sustained;
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let japi = japi.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < api_n {
                let _ = japi
                    .create(&PostParams::default(), &job(&format!("rate-{i}")))
                    .await;
                i += 8;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let api_rate = api_n as f64 / t1.elapsed().as_secs_f64();

    // 4b. The same, with the very Job objects the operator creates (owner reference,
    //     labels, annotations with /serf/stdin, the SERF_* environment, the stdin volume),
    //     built by the operator's engine for the same kind of event.
    let own_jobs = operator_jobs(&owner, api_n, 1_000_000);
    let own_jobs = Arc::new(own_jobs);
    let t2 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let japi = japi.clone();
        let own_jobs = own_jobs.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < own_jobs.len() {
                let _ = japi.create(&PostParams::default(), &own_jobs[i]).await;
                i += 8;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let own_rate = own_jobs.len() as f64 / t2.elapsed().as_secs_f64();

    let rss_after_jobs = rss_kib(pid);
    // 5. RSS with 1,000 handlers loaded.
    for h in 0..1000 {
        let mut v = handler.clone();
        v["metadata"]["name"] = format!("h{h:04}").into();
        v["spec"]["routes"][0]["events"] = format!("user:never-{h}").into();
        hapi.patch(
            &format!("h{h:04}"),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&v),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_loaded = rss_kib(pid);

    // 6. 1,000 handler updates (a spec change each), next to one full compile of the same
    //    1,000 handlers in this process (the baseline).
    let mut specs = Vec::new();
    for h in 0..1000 {
        let mut v = handler.clone();
        v["metadata"]["name"] = format!("h{h:04}").into();
        v["metadata"]["uid"] = format!("u{h}").into();
        v["metadata"]["generation"] = 1.into();
        v["spec"]["routes"][0]["events"] = format!("user:never-{h}").into();
        specs.push(serde_json::from_value::<serf_operator_crds::SerfHandler>(
            v,
        )?);
    }
    let t = Instant::now();
    let _ = serf_operator::engine::Router::new(&specs);
    let full_compile = t.elapsed();
    let cpu_before = cpu_ms(pid);
    let t = Instant::now();
    for h in 0..1000 {
        let mut v = handler.clone();
        v["metadata"]["name"] = format!("h{h:04}").into();
        v["spec"]["routes"][0]["events"] = format!("user:never-again-{h}").into();
        hapi.patch(
            &format!("h{h:04}"),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&v),
        )
        .await?;
    }
    let patched = t.elapsed();
    // Until the operator is idle again (no CPU used for a second).
    let mut last = cpu_ms(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ms(pid);
        if now == last {
            break;
        }
        last = now;
    }
    let updates_cpu = last.saturating_sub(cpu_before);

    // 7. Soak: a fixed event rate for SOAK_SECS (default 600; 0 skips), RSS sampled.
    let soak_secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let rate: u64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut soak = None;
    if soak_secs > 0 {
        let rss_start = rss_kib(pid);
        let mut rss_max = rss_start;
        let before = count_before(&seen);
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed() < Duration::from_secs(soak_secs) {
            serf.event("soak", format!("{sent}").as_bytes(), false)
                .await?;
            sent += 1;
            let next = Duration::from_millis(sent * 1000 / rate.max(1));
            if let Some(wait) = next.checked_sub(t.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            if sent.is_multiple_of(rate.max(1) * 10) {
                rss_max = rss_max.max(rss_kib(pid));
                // Jobs of the soak are deleted as they come (as history limits or a TTL
                // would): what grows then is the operator, not the data it caches.
                let _ = japi
                    .delete_collection(
                        &kube::api::DeleteParams::background(),
                        &kube::api::ListParams::default()
                            .labels("serf.operator.io/event-name=soak"),
                    )
                    .await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_before(&seen) < before + sent as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let made = count_before(&seen) - before;
        soak = Some((
            soak_secs,
            rate,
            sent,
            made,
            rss_start,
            rss_kib(pid),
            rss_max,
        ));
    }
    let _ = op.terminate();

    let (mut lat_s, mut seen_s) = (lat.clone(), post_seen.clone());
    let (l50, l99) = (pct(&mut lat_s, 0.5), pct(&mut lat, 0.99));
    let (b50, b99) = (pct(&mut seen_s, 0.5), pct(&mut post_seen, 0.99));
    let mut own_s = own_seen.clone();
    let (o50, o99) = (pct(&mut own_s, 0.5), pct(&mut own_seen, 0.99));
    let op_rate = made as f64 / took.as_secs_f64();
    println!("serf-operator benchmark (real kube-apiserver and Serf agent on loopback; one run)");
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "", "operator", "baseline (same run)", "ratio"
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        format!("latency p50, ms (n={n})"),
        format!("{l50:.1}"),
        format!("{b50:.1} bare POST -> watch"),
        format!("{:.2}x", l50 / b50)
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "latency p99, ms (target <= 1.5x)",
        format!("{l99:.1}"),
        format!("{b99:.1} bare POST -> watch"),
        format!("{:.2}x", l99 / b99)
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "  p50 / p99 with the operator's Jobs, bare",
        "",
        format!("{o50:.1} / {o99:.1}"),
        format!("{:.2}x / {:.2}x", l50 / o50, l99 / o99)
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        format!(
            "sustained {sustained} events (fired in {:.2} s), Jobs/s",
            fired.as_secs_f64()
        ),
        format!("{op_rate:.0} (lost {})", sustained.saturating_sub(made)),
        format!("{api_rate:.0} bare creates, 8 conns"),
        format!("{:.0}%", 100.0 * op_rate / api_rate)
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "  the same Jobs as the operator's, bare",
        "",
        format!("{own_rate:.0} bare creates, 8 conns"),
        format!("{:.0}%", 100.0 * op_rate / own_rate)
    );
    println!(
        "  (operator CPU for the sustained run: {sustained_cpu} ms, {:.0} µs a Job)",
        sustained_cpu as f64 * 1000.0 / sustained.max(1) as f64
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "1,000 handler updates (target < 10x)",
        format!("{updates_cpu} ms CPU"),
        format!("{:.0} ms full compile", full_compile.as_secs_f64() * 1e3),
        format!(
            "{:.1}x",
            updates_cpu as f64 / (full_compile.as_secs_f64() * 1e3)
        )
    );
    println!(
        "  (the 1,000 patches took {:.1} s of wall time at the API server)",
        patched.as_secs_f64()
    );
    println!(
        "{:<44} {:>16} {:>26} {:>8}",
        "RSS, KiB (target <= 40 MiB with 1,000)",
        format!("{rss_loaded} loaded"),
        format!("{rss_idle} idle"),
        format!("{:.1}x", rss_loaded as f64 / rss_idle as f64)
    );
    println!(
        "  (RSS after the sustained run, before the handlers: {rss_after_jobs} KiB; the Jobs in the operator's cache then: {})",
        count_before(&seen)
    );
    if let Some((secs, rate, sent, made, start, end, max)) = soak {
        println!(
            "soak {secs} s at {rate} events/s: {sent} events, {made} Jobs (lost {}); RSS {start} -> {end} KiB (max {max}; growth {:+.1}%)",
            sent.saturating_sub(made as u64),
            100.0 * (end as f64 - start as f64) / start as f64
        );
    }
    println!("operator log: {}", log.display());
    Ok(())
}
