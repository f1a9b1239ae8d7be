//! Service discovery benchmark against a real cluster (KUBECONFIG): MEMBERS Serf members
//! (default 10,000; a synthetic agent that speaks the agent's RPC, with the agent's event
//! coalescing) behind one SerfService, published by the operator (`--discovery`). Prints each
//! figure next to its baseline from the same run:
//! - the first publication: SerfService created → every endpoint seen ready in a watch, next
//!   to the same EndpointSlices applied bare, one after the other, by this benchmark;
//! - one member failing, CHANGES times (default 10): the event → its endpoint seen not ready,
//!   and the EndpointSlice writes it took (the watch's modifications and the operator's own
//!   count), next to one bare apply of one slice → seen, and to a rewrite of every slice;
//! - a burst of BURST members (default 1,000, spread over every slice) failing at once:
//!   writes and time until all are seen;
//! - the operator's RSS and CPU, idle before the SerfService and with it.
//!
//! `cargo build --release -p serf-operator && SERF_OPERATOR_BIN=target/release/serf-operator
//! cargo run --release -p serf-operator-e2e --example bench_discovery`

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serf_operator_crds::SerfService;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, cpu_ms, http_get, install_crds, rss_kib,
};
use serf_testkit::{SyntheticAgent, SyntheticConfig, SyntheticMember};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the watch has seen: each slice by name, and how many changes it delivered.
#[derive(Default)]
struct Seen {
    slices: BTreeMap<String, EndpointSlice>,
    modified: u64,
}

impl Seen {
    /// Per endpoint address of the slices of `service`: ready.
    fn ready(&self, service: &str) -> BTreeMap<String, bool> {
        self.slices
            .values()
            .filter(|s| {
                s.labels()
                    .get("kubernetes.io/service-name")
                    .map(String::as_str)
                    == Some(service)
            })
            .flat_map(|s| s.endpoints.iter())
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false),
                )
            })
            .collect()
    }
}

async fn wait(seen: &Arc<Mutex<Seen>>, within: Duration, ok: impl Fn(&Seen) -> bool) -> Duration {
    let t = Instant::now();
    loop {
        if ok(&lock(seen)) {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "timed out");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// The operator's own count of writes so far (its `published` log lines).
fn operator_writes(log: &std::path::Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("published"))
        .filter_map(|l| {
            let i = l.find("\"writes\":")? + 9;
            l[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn lock(m: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let Some(client) = cluster_or_skip("the discovery benchmark").await else {
        return Ok(());
    };
    let members = env_usize("MEMBERS", 10_000);
    let changes = env_usize("CHANGES", 10);
    let burst = env_usize("BURST", 1_000).min(members / 2);
    install_crds(&client).await?;
    let ns_guard = TempNamespace::create(&client, "bench-disc").await?;
    let ns = ns_guard.name.clone();

    let list: Vec<SyntheticMember> = (0..members)
        .map(|i| {
            SyntheticMember::new(format!("db-{i:05}"))
                .addr(addr(i))
                .tag("role", "db")
        })
        .collect();
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("bench-op")
            .tag("role", "op")
            .members(list),
    )
    .await?;

    // The watch: every EndpointSlice of the namespace.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    {
        let seen = seen.clone();
        let slices = slices.clone();
        tokio::spawn(async move {
            let mut s = watcher(slices, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = s.next().await {
                let Ok(ev) = ev else { continue };
                let mut g = lock(&seen);
                match ev {
                    watcher::Event::Apply(o) => {
                        g.modified += 1;
                        g.slices.insert(o.name_any(), o);
                    }
                    watcher::Event::InitApply(o) => {
                        g.slices.insert(o.name_any(), o);
                    }
                    watcher::Event::Delete(o) => {
                        g.modified += 1;
                        g.slices.remove(&o.name_any());
                    }
                    _ => {}
                }
            }
        });
    }

    let work = std::env::temp_dir().join(format!("serf-bench-disc-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let log = work.join("operator.log");
    eprintln!("operator log: {}", log.display());
    let metrics = serf_testkit::free_port()?;
    let operator = OperatorProcess::start(
        &[
            "--namespaces",
            &ns,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--discovery",
        ],
        &[
            ("SERF_RPC_ADDR", agent.rpc_addr()),
            ("POD_NAMESPACE", ns.clone()),
            ("RUST_LOG", "info".to_string()),
            ("SERF_OPERATOR_LOG_FORMAT", "json".to_string()),
        ],
        log.clone(),
    )?;
    let t = Instant::now();
    while http_get(metrics, "/readyz").await.is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "operator not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("membership read")
    {
        assert!(t.elapsed() < Duration::from_secs(60), "membership not read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = operator.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid);

    // First publication.
    let svcs: Api<SerfService> = Api::namespaced(client.clone(), &ns);
    let ss: SerfService = serde_json::from_value(serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfService",
        "metadata": {"name": "db"},
        "spec": {"selector": {"tags": {"role": "db"}},
                 "ports": [{"name": "pg", "port": 5432}],
                 "removeAfter": "1h"},
    }))?;
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    svcs.create(&PostParams::default(), &ss).await?;
    let first = wait(&seen, Duration::from_secs(120), |s| {
        let r = s.ready("db");
        r.len() == members && r.values().all(|v| *v)
    })
    .await;
    let _ = t;
    let cpu_first = cpu_ms(pid) - cpu0;
    let ours: Vec<EndpointSlice> = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=db"))
        .await?
        .items;
    let n_slices = ours.len();

    // Baseline: the same slices applied bare, one after the other, until all are seen.
    let bare: Vec<serde_json::Value> = ours
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            let name = s.name_any().replace("db-", "bare-");
            v["metadata"] = serde_json::json!({"name": name,
                "labels": {"kubernetes.io/service-name": "bare",
                           "endpointslice.kubernetes.io/managed-by": "bench"}});
            v
        })
        .collect();
    let pp = PatchParams::apply("bench").force();
    let t = Instant::now();
    for b in &bare {
        let name = b["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        slices.patch(&name, &pp, &Patch::Apply(b)).await?;
    }
    let bare_first = t.elapsed()
        + wait(&seen, Duration::from_secs(60), |s| {
            s.ready("bare").len() == members
        })
        .await;

    // One member failing, CHANGES times.
    let mut lat = Vec::new();
    let mut watch_writes = Vec::new();
    let mut op_writes = Vec::new();
    for k in 0..changes {
        let i = (k * 997 + 13) % members;
        let a = addr(i).to_string();
        let (m0, w0) = (lock(&seen).modified, operator_writes(&log));
        let t = Instant::now();
        agent.fail([format!("db-{i:05}")]);
        wait(&seen, Duration::from_secs(30), |s| {
            s.ready("db").get(&a) == Some(&false)
        })
        .await;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        // Let the status write and anything late land before counting.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        watch_writes.push((lock(&seen).modified - m0) as f64);
        op_writes.push((operator_writes(&log) - w0) as f64);
    }
    // Baselines: one bare slice apply → seen; a rewrite of every slice.
    let mut bare_one = Vec::new();
    let mut bare_all = Vec::new();
    for k in 0..changes {
        let mut b = bare[0].clone();
        let flip = k % 2 == 0;
        b["endpoints"][0]["conditions"]["ready"] = serde_json::json!(!flip);
        let a0 = b["endpoints"][0]["addresses"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = b["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let t = Instant::now();
        slices.patch(&name, &pp, &Patch::Apply(&b)).await?;
        wait(&seen, Duration::from_secs(30), |s| {
            s.ready("bare").get(&a0) == Some(&!flip)
        })
        .await;
        bare_one.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        for (j, b2) in bare.iter().enumerate() {
            let body = if j == 0 { &b } else { b2 };
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            slices.patch(&name, &pp, &Patch::Apply(body)).await?;
        }
        bare_all.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // A burst.
    // Spread over every slice: every (MEMBERS / BURST)th member, from the second.
    let step = members / burst.max(1);
    let picked: Vec<usize> = (0..burst).map(|k| k * step + 1).collect();
    let names: Vec<String> = picked.iter().map(|i| format!("db-{i:05}")).collect();
    let addrs: Vec<String> = picked.iter().map(|i| addr(*i).to_string()).collect();
    let (m0, w0, c0) = (lock(&seen).modified, operator_writes(&log), cpu_ms(pid));
    let t = Instant::now();
    agent.fail(&names);
    wait(&seen, Duration::from_secs(60), |s| {
        let r = s.ready("db");
        addrs.iter().all(|a| r.get(a) == Some(&false))
    })
    .await;
    let burst_t = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let burst_watch = lock(&seen).modified - m0;
    let burst_op = operator_writes(&log) - w0;
    let burst_cpu = cpu_ms(pid) - c0;
    let rss_busy = rss_kib(pid);

    println!(
        "\nservice discovery, {members} members behind one SerfService ({n_slices} EndpointSlices)\n"
    );
    println!("| | operator | baseline (same run) |");
    println!("|---|---|---|");
    println!(
        "| first publication: created → every endpoint seen ready | {:.0} ms (operator CPU {cpu_first} ms) | the same {n_slices} slices applied bare one after the other → seen: {:.0} ms |",
        first.as_secs_f64() * 1000.0,
        bare_first.as_secs_f64() * 1000.0
    );
    println!(
        "| one member fails → its endpoint seen not ready, median of {changes} | {:.0} ms (Serf's coalescing and the 1 s debounce included) | one bare slice apply → seen: {:.1} ms |",
        median(&mut lat),
        median(&mut bare_one)
    );
    println!(
        "| EndpointSlice writes for one member failing, median | {} seen in the watch, {} by the operator's own count (status writes not counted) | a rewrite of every slice: {n_slices} applies, {:.0} ms |",
        median(&mut watch_writes),
        median(&mut op_writes),
        median(&mut bare_all)
    );
    println!(
        "| {burst} members fail at once, spread over every slice → all seen | {:.0} ms, {burst_watch} slice changes seen, {burst_op} writes (operator CPU {burst_cpu} ms) | {n_slices} slices at most |",
        burst_t.as_secs_f64() * 1000.0
    );
    println!(
        "| operator RSS | {:.1} MiB with the SerfService | {:.1} MiB idle, the {members} members read |",
        rss_busy as f64 / 1024.0,
        rss_idle as f64 / 1024.0
    );
    drop(operator);
    agent.stop();
    Ok(())
}
