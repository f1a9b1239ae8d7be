//! Operator benchmark against a real cluster (KUBECONFIG) and a real Serf agent. Prints, side
//! by side: event-to-Job latency (stream arrival to the Job seen in a watch) next to a bare
//! Job POST from the same client; sustained user events turned into Jobs (with a loss check)
//! next to the API server's own create rate; the operator's RSS idle and with 1,000 handlers.
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

fn job(name: &str) -> Job {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"bench": "bare"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap_or_default()
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
    let mut post = Vec::new();
    let mut post_seen = Vec::new();
    for i in 0..n {
        let name = format!("bare-{i}");
        let t0 = Instant::now();
        japi.create(&PostParams::default(), &job(&name)).await?;
        post.push(t0.elapsed().as_secs_f64() * 1000.0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(t) = seen.lock().ok().and_then(|m| m.get(&name).copied()) {
                post_seen.push(t.saturating_duration_since(t0).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    // 3. Sustained: fire events as fast as the agent takes them; count the Jobs.
    let start_count = count_before(&seen);
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
    let _ = op.terminate();

    println!("serf-operator benchmark (real kube-apiserver and Serf agent on loopback)");
    println!(
        "event -> Job visible in a watch (ms):  p50 {:.1}  p99 {:.1}   (n={n})",
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat, 0.99)
    );
    println!(
        "bare Job POST (ms):                    p50 {:.1}  p99 {:.1}",
        pct(&mut post.clone(), 0.5),
        pct(&mut post, 0.99)
    );
    println!(
        "bare Job POST -> visible in watch (ms): p50 {:.1}  p99 {:.1}",
        pct(&mut post_seen.clone(), 0.5),
        pct(&mut post_seen, 0.99)
    );
    println!(
        "sustained: {sustained} events fired in {:.2}s; {made} Jobs in {:.2}s = {:.0} Jobs/s; lost {}",
        fired.as_secs_f64(),
        took.as_secs_f64(),
        made as f64 / took.as_secs_f64(),
        sustained.saturating_sub(made)
    );
    println!("API server create rate, 8 concurrent bare POSTs: {api_rate:.0} Jobs/s ");
    println!(
        "operator RSS: idle {} KiB, with 1,000 handlers {} KiB",
        rss_idle, rss_loaded
    );
    println!("operator log: {}", log.display());
    Ok(())
}
