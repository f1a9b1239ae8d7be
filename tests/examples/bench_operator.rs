//! Operator benchmark against a real cluster (KUBECONFIG) and a real Serf agent. Prints, side
//! by side, each figure next to its baseline from the same run, with the ratio:
//! - event-to-Job latency (stream arrival to the Job seen in a watch; LATENCY_SAMPLES, default
//!   300), each sample followed by a bare POST of a minimal Job and of one of the operator's
//!   own Job objects (POST to seen), so that all three meet the same control plane;
//! - the sustained rate, in ROUNDS rounds (default 5) of EVENTS Jobs (default 1,000): user
//!   events turned into Jobs (with a loss check), a minimal Job and the operator's own Job
//!   objects POSTed bare over 8 connections, in turns; medians are compared, with the
//!   operator's CPU a Job and, given CONTROL_PLANE_PIDS (kube-apiserver, etcd, ... on this
//!   machine), the control plane's;
//! - the operator's RSS idle and with 1,000 handlers;
//! - 1,000 handler updates: the operator's route-table CPU time (its metrics) next to one
//!   full compile of the same 1,000 handlers (CPU time, median of 5), and the whole
//!   operator's CPU for them;
//! - the API server's requests and watch events a Job in each kind of run (its metrics);
//! - a soak at a fixed event rate (SOAK_SECS, default 600, 0 skips; SOAK_RATE events/s,
//!   default 5) with its RSS growth, from the start and after a warm-up (the first fifth),
//!   and the trend after the warm-up next to the samples' scatter. The handler's launch
//!   ledger starts at its bound, so that the data it keeps by design is not counted as
//!   growth.
//!
//! `cargo build --release -p serf-operator && SERF_OPERATOR_BIN=target/release/serf-operator
//! cargo run --release -p serf-operator-e2e --example bench_operator`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serf_client::ClientConfig;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, cpu_ms, http_get, install_crds, rss_kib,
};
use serf_testkit::{Agent, AgentConfig};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
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

/// The API server's request and watch-event counters, by (verb resource[/subresource]) and
/// ("watch" kind), from its `/metrics`; empty when they cannot be read.
async fn api_counters(client: &kube::Client) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(req) = http::Request::get("/metrics").body(Vec::new()) else {
        return out;
    };
    let Ok(text) = client.request_text(req).await else {
        return out;
    };
    let label = |line: &str, key: &str| -> String {
        line.split(&format!("{key}=\"")[..])
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    for line in text.lines() {
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let key = if line.starts_with("apiserver_request_total{") {
            let (resource, sub) = (label(line, "resource"), label(line, "subresource"));
            if resource.is_empty() {
                continue;
            }
            let sub = if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            };
            format!("{} {resource}{sub}", label(line, "verb"))
        } else if line.starts_with("apiserver_watch_events_total{") {
            format!("watch events {}", label(line, "kind"))
        } else {
            continue;
        };
        *out.entry(key).or_default() += value;
    }
    out
}

/// The three kinds of sustained run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Run {
    Operator,
    Minimal,
    Own,
}

impl Run {
    fn label(self) -> &'static str {
        match self {
            Run::Operator => "operator:",
            Run::Minimal => "minimal Job, bare:",
            Run::Own => "its own Jobs, bare:",
        }
    }
}

/// What one sustained run measured.
struct RunFigures {
    rate: f64,
    operator_cpu_us: f64,
    control_plane_cpu_us: f64,
    /// The Serf agent and this benchmark (which fires the events, or POSTs, and watches).
    others_cpu_us: f64,
    /// API requests and watch events a Job (from the API server's counters).
    api: BTreeMap<String, f64>,
}

/// What the soak measured: RSS samples are (seconds into the soak, KiB).
struct Soak {
    secs: u64,
    rate: u64,
    sent: u64,
    made: usize,
    rss_start: u64,
    rss_end: u64,
    samples: Vec<(u64, u64)>,
    /// Entries of the handler's launch ledger (bounded at 16,384) before and after.
    ledger: (usize, usize),
}

/// Creates `jobs` over 8 connections (a failed create is printed).
async fn create_all(japi: &Api<Job>, jobs: Vec<Job>) {
    let jobs = Arc::new(jobs);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (japi, jobs) = (japi.clone(), jobs.clone());
        tasks.push(tokio::spawn(async move {
            for job in jobs.iter().skip(w).step_by(8) {
                if let Err(e) = japi.create(&PostParams::default(), job).await {
                    eprintln!("bare create failed: {e}");
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
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

    // The handler's launch ledger starts at its bound (8 full segments, 16,384 entries, as a
    // busy handler's is): from then on each full segment replaces the oldest, so what the
    // ledger keeps by design (14,337 to 16,384 entries) does not read as growth in the soak.
    let owner = hapi.get("bench").await?;
    let bench_ref = serf_operator::jobs::HandlerRef {
        namespace: ns.clone(),
        name: "bench".into(),
        uid: owner.metadata.uid.clone(),
    };
    let long_ago = serf_operator::ledger::unix_now() - 60;
    let mut prefill = serf_operator::ledger::Ledger::default();
    prefill.load(&bench_ref, &[]);
    for i in 0..serf_operator::ledger::MAX_ENTRIES {
        prefill.record(&bench_ref, &format!("bench-prefill-{i:05}"), long_ago);
    }
    for (_, changes) in prefill.take_changes(long_ago) {
        serf_operator::ledger::write_ledger(&client, &bench_ref, &changes)
            .await
            .map_err(|(e, _)| e)?;
    }

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

    eprintln!("bench: latency");
    // 1. Latency, one event at a time, each operator sample followed by a bare POST of a
    //    minimal Job and one of the operator's own Job objects (built by its engine), so that
    //    all three see the same moment of the control plane.
    let n: usize = std::env::var("LATENCY_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let own_for_latency = operator_jobs(&owner, n, 2_000_000);
    let (mut lat, mut post_seen, mut own_seen) = (Vec::new(), Vec::new(), Vec::new());
    for (i, own) in own_for_latency.iter().enumerate() {
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
        post_seen.extend(post_until_seen(&japi, &job(&format!("bare-{i}")), &seen).await?);
        own_seen.extend(post_until_seen(&japi, own, &seen).await?);
    }

    eprintln!("bench: sustained runs");
    // 2. Sustained, in ROUNDS rounds (default 5). A round has three runs of EVENTS Jobs each,
    //    every run timed from its start until the watch has seen all its Jobs: the operator
    //    (user events fired as fast as the agent takes them), a minimal Job POSTed bare and
    //    the operator's own Job objects POSTed bare (8 connections each). The order turns from
    //    round to round, and the control plane gets a pause before each run, so that no run
    //    always follows the same one. Medians are compared.
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let control_plane: Vec<u32> = std::env::var("CONTROL_PLANE_PIDS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let cp_cpu = || control_plane.iter().map(|p| cpu_ms(*p)).sum::<u64>();
    let agent_pid = agent.pid().unwrap_or(0);
    let mut runs: BTreeMap<Run, Vec<RunFigures>> = BTreeMap::new();
    let (mut lost, mut fired_in) = (0usize, Vec::new());
    let mut ltime = 1_000_000u64;
    for round in 0..rounds {
        for k in 0..3 {
            let kind = [Run::Operator, Run::Minimal, Run::Own][(round + k) % 3];
            tokio::time::sleep(Duration::from_secs(5)).await;
            let start_count = count_before(&seen);
            let others = || cpu_ms(agent_pid) + cpu_ms(std::process::id());
            // The API server's metrics are read outside the CPU window: one read costs it
            // over 100 ms of CPU on a small machine.
            let api_before = api_counters(&client).await;
            let (op_cpu, cp, oth) = (cpu_ms(pid), cp_cpu(), others());
            let t0 = Instant::now();
            match kind {
                Run::Operator => {
                    for i in 0..sustained {
                        serf.event("burst", format!("{round}-{i}").as_bytes(), false)
                            .await?;
                    }
                    fired_in.push(t0.elapsed().as_secs_f64());
                }
                Run::Minimal => {
                    let jobs = (0..sustained)
                        .map(|i| job(&format!("rate-{round}-{i}")))
                        .collect();
                    create_all(&japi, jobs).await;
                }
                Run::Own => {
                    create_all(&japi, operator_jobs(&owner, sustained, ltime)).await;
                    ltime += sustained as u64;
                }
            }
            let deadline = Instant::now() + Duration::from_secs(300);
            while count_before(&seen) < start_count + sustained && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let made = count_before(&seen) - start_count;
            let elapsed = t0.elapsed().as_secs_f64();
            let (op_end, cp_end, oth_end) = (cpu_ms(pid), cp_cpu(), others());
            let api = api_counters(&client)
                .await
                .into_iter()
                .map(|(k, v)| {
                    let d = v - api_before.get(&k).copied().unwrap_or(0.0);
                    (k, d / made.max(1) as f64)
                })
                .filter(|(_, v)| *v >= 0.005)
                .collect();
            if kind == Run::Operator {
                lost += sustained.saturating_sub(made);
            }
            runs.entry(kind).or_default().push(RunFigures {
                rate: made as f64 / elapsed,
                operator_cpu_us: op_end.saturating_sub(op_cpu) as f64 * 1000.0 / made.max(1) as f64,
                control_plane_cpu_us: cp_end.saturating_sub(cp) as f64 * 1000.0
                    / made.max(1) as f64,
                others_cpu_us: oth_end.saturating_sub(oth) as f64 * 1000.0 / made.max(1) as f64,
                api,
            });
        }
    }

    let rss_after_jobs = rss_kib(pid);
    let jobs_after_runs = count_before(&seen);
    // The Jobs of the runs above are deleted (as history limits or a TTL would), so that
    // the RSS below is the handlers' and the operator's, not that of some 19,000 pending
    // Jobs in its index; the allocator gets 15 s to return freed pages.
    // One delete-collection call may outlast the API server's request timeout (it goes on
    // deleting where the last one stopped), so it is repeated until no Job is listed.
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline
        && !japi
            .list(&kube::api::ListParams::default().limit(1))
            .await?
            .items
            .is_empty()
    {
        if let Err(e) = japi
            .delete_collection(
                &kube::api::DeleteParams::background(),
                &kube::api::ListParams::default(),
            )
            .await
        {
            eprintln!("bench: deleting the Jobs: {e} (again)");
        }
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_emptied = rss_kib(pid);
    eprintln!("bench: 1,000 handlers");
    // 3. RSS with 1,000 handlers loaded.
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

    // 4. 1,000 handler updates (a spec change each), next to one full compile of the same
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
    // The median of 5 compiles, in this thread's CPU time, as the operator's metric counts.
    let mut compiles: Vec<f64> = (0..5)
        .map(|_| {
            let t = serf_operator::metrics::thread_cpu_time();
            let _ = serf_operator::engine::Router::new(&specs);
            serf_operator::metrics::thread_cpu_time()
                .saturating_sub(t)
                .as_secs_f64()
        })
        .collect();
    let full_compile = Duration::from_secs_f64(pct(&mut compiles, 0.5));
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let table_before = http_get(metrics, "/metrics").await.unwrap_or_default();
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
    let table_after = http_get(metrics, "/metrics").await.unwrap_or_default();
    let table_ms = 1e3
        * (metric(&table_after, "serf_operator_route_table_seconds_total")
            - metric(&table_before, "serf_operator_route_table_seconds_total"));
    let compiled = metric(&table_after, "serf_operator_handlers_compiled_total")
        - metric(&table_before, "serf_operator_handlers_compiled_total");

    eprintln!("bench: soak");
    // 5. Soak: a fixed event rate for SOAK_SECS (default 600; 0 skips), RSS sampled.
    let soak_secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let rate: u64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut soak = None;
    let ledger_entries = || async {
        let stored = serf_operator::ledger::read_ledger(&client, &bench_ref)
            .await
            .unwrap_or_default();
        let mut l = serf_operator::ledger::Ledger::default();
        l.load(&bench_ref, &stored);
        l.len(&bench_ref)
    };
    if soak_secs > 0 {
        let ledger_start = ledger_entries().await;
        let rss_start = rss_kib(pid);
        let mut samples = Vec::new();
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
                samples.push((t.elapsed().as_secs(), rss_kib(pid)));
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
        soak = Some(Soak {
            secs: soak_secs,
            rate,
            sent,
            made,
            rss_start,
            rss_end: rss_kib(pid),
            samples,
            ledger: (ledger_start, ledger_entries().await),
        });
    }
    let _ = op.terminate();

    let (l50, l99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let (b50, b99) = (pct(&mut post_seen, 0.5), pct(&mut post_seen, 0.99));
    let (o50, o99) = (pct(&mut own_seen, 0.5), pct(&mut own_seen, 0.99));
    let median = |kind: Run, f: fn(&RunFigures) -> f64| {
        let mut v: Vec<f64> = runs.get(&kind).into_iter().flatten().map(f).collect();
        pct(&mut v, 0.5)
    };
    let rate_of = |kind: Run| median(kind, |r| r.rate);
    let (op_rate, min_rate, own_rate) = (
        rate_of(Run::Operator),
        rate_of(Run::Minimal),
        rate_of(Run::Own),
    );
    let row = |what: &str, operator: String, baseline: String, ratio: String| {
        println!("{what:<46} {operator:>18} {baseline:>34} {ratio:>14}");
    };
    println!("serf-operator benchmark (real kube-apiserver and Serf agent on loopback; one run)");
    row(
        "",
        "operator".into(),
        "baseline (same run)".into(),
        "ratio".into(),
    );
    row(
        &format!("latency p50 / p99, ms (n={n}; p99 <= 1.5x)"),
        format!("{l50:.1} / {l99:.1}"),
        format!("{b50:.1} / {b99:.1} minimal Job POST"),
        format!("{:.2}x / {:.2}x", l50 / b50, l99 / b99),
    );
    row(
        "",
        "".into(),
        format!("{o50:.1} / {o99:.1} its own Jobs POSTed"),
        format!("{:.2}x / {:.2}x", l50 / o50, l99 / o99),
    );
    row(
        &format!("sustained, Jobs/s (median of {rounds} x {sustained})"),
        format!("{op_rate:.0} (lost {lost})"),
        format!("{min_rate:.0} minimal Job, 8 conns"),
        format!("{:.0}%", 100.0 * op_rate / min_rate),
    );
    row(
        "",
        "".into(),
        format!("{own_rate:.0} its own Jobs, 8 conns"),
        format!("{:.0}%", 100.0 * op_rate / own_rate),
    );
    // Each round's operator run against the same round's bare runs: the rounds drift (the
    // namespace fills, the controller manager's backlog grows), a round's runs do not.
    let paired = |base: Run| -> (Vec<f64>, f64) {
        let (ops, bases) = (runs.get(&Run::Operator), runs.get(&base));
        let mut ratios: Vec<f64> = ops
            .into_iter()
            .flatten()
            .zip(bases.into_iter().flatten())
            .map(|(o, b)| 100.0 * o.rate / b.rate)
            .collect();
        let by_round = ratios.clone();
        (by_round, pct(&mut ratios, 0.5))
    };
    for base in [Run::Minimal, Run::Own] {
        let (by_round, median) = paired(base);
        let each: Vec<String> = by_round.iter().map(|r| format!("{r:.0}%")).collect();
        println!(
            "  operator against {} by round: {} (median {median:.0}%)",
            base.label().trim_end_matches(':'),
            each.join(", ")
        );
    }
    for (kind, figures) in &runs {
        let rates: Vec<String> = figures.iter().map(|r| format!("{:.0}", r.rate)).collect();
        let mut line = format!(
            "  {:<24} Jobs/s by round {}; CPU a Job: operator {:.0} µs",
            kind.label(),
            rates.join(", "),
            median(*kind, |r| r.operator_cpu_us)
        );
        if !control_plane.is_empty() {
            line += &format!(
                "; control plane {:.0} µs",
                median(*kind, |r| r.control_plane_cpu_us)
            );
        }
        line += &format!(
            "; Serf agent and benchmark {:.0} µs",
            median(*kind, |r| r.others_cpu_us)
        );
        println!("{line}");
        // The API server's work a Job, from its counters (the last run of this kind).
        if let Some(last) = figures.last() {
            let api: Vec<String> = last
                .api
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            println!("    API a Job (last run): {}", api.join(", "));
        }
    }
    fired_in.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  ({sustained} events fired in {} s)",
        fired_in
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let full_ms = full_compile.as_secs_f64() * 1e3;
    row(
        "1,000 handler updates, route table CPU (< 10x)",
        format!("{table_ms:.1} ms"),
        format!("{full_ms:.1} ms one full compile (median of 5)"),
        format!("{:.1}x", table_ms / full_ms),
    );
    println!(
        "  (handlers compiled: {compiled}; the whole operator: {updates_cpu} ms CPU, {:.2} ms an update, with its watch events and status write; the 1,000 patches took {:.1} s at the API server)",
        updates_cpu as f64 / 1000.0,
        patched.as_secs_f64()
    );
    row(
        "RSS, KiB (<= 40 MiB with 1,000 handlers)",
        format!("{rss_loaded} loaded"),
        format!("{rss_idle} idle"),
        format!("{:.1}x", rss_loaded as f64 / rss_idle as f64),
    );
    println!(
        "  (RSS after the sustained runs: {rss_after_jobs} KiB with {jobs_after_runs} Jobs; {rss_emptied} KiB once they were deleted, before the handlers)"
    );
    if let Some(s) = soak {
        // The first fifth is warm-up (allocator arenas, buffers at their working size).
        let warm = s
            .samples
            .iter()
            .find(|(t, _)| *t >= s.secs / 5)
            .map_or(s.rss_start, |(_, r)| *r);
        let max = s.samples.iter().map(|(_, r)| *r).max().unwrap_or(s.rss_end);
        println!(
            "soak {} s at {} events/s: {} events, {} Jobs (lost {}); RSS {} -> {} KiB (+{:.1}%); after the first fifth {} -> {} KiB ({:+.1}%), max {}",
            s.secs,
            s.rate,
            s.sent,
            s.made,
            s.sent.saturating_sub(s.made as u64),
            s.rss_start,
            s.rss_end,
            100.0 * (s.rss_end as f64 - s.rss_start as f64) / s.rss_start as f64,
            warm,
            s.rss_end,
            100.0 * (s.rss_end as f64 - warm as f64) / warm as f64,
            max
        );
        // A least-squares line through the samples after the warm-up: a drift shows as a
        // slope whose total over the soak stands out of the samples' own scatter.
        let after: Vec<(f64, f64)> = s
            .samples
            .iter()
            .filter(|(t, _)| *t >= s.secs / 5)
            .map(|(t, r)| (*t as f64 / 60.0, *r as f64))
            .collect();
        if after.len() >= 3 {
            let n = after.len() as f64;
            let (mx, my) = (
                after.iter().map(|p| p.0).sum::<f64>() / n,
                after.iter().map(|p| p.1).sum::<f64>() / n,
            );
            let sxx: f64 = after.iter().map(|p| (p.0 - mx).powi(2)).sum();
            let sxy: f64 = after.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
            let slope = sxy / sxx;
            let resid = (after
                .iter()
                .map(|p| (p.1 - my - slope * (p.0 - mx)).powi(2))
                .sum::<f64>()
                / (n - 2.0))
                .sqrt();
            let span = after.last().map_or(0.0, |p| p.0) - after.first().map_or(0.0, |p| p.0);
            println!(
                "  trend after the warm-up: {slope:+.1} KiB a minute ({:+.0} KiB over {span:.0} min), scatter around it {resid:.0} KiB (sd), {} samples",
                slope * span,
                after.len()
            );
        }
        let each_minute: Vec<String> = s
            .samples
            .iter()
            .filter(|(t, _)| t % 60 < 10)
            .map(|(t, r)| format!("{}s {r}", t))
            .collect();
        println!("  RSS KiB by minute: {}", each_minute.join(", "));
        println!(
            "  launch ledger of the handler: {} -> {} entries (it started at its bound, 16,384; each new segment of 2,048 replaced the oldest)",
            s.ledger.0, s.ledger.1
        );
    }
    println!("operator log: {}", log.display());
    Ok(())
}
