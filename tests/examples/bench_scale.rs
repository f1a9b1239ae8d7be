//! Scale benchmark: the operator, built for release, against a real cluster (KUBECONFIG).
//! Prints, in one run, each figure next to its baseline from the same run.
//!
//! Part 1, real agents: REAL_AGENTS (default 200; 0 skips) real `serf agent` processes on
//! loopback (Serf's timings REAL_PROFILE, default wan), the operator following the first; half of the others are killed at once
//! (SIGKILL). Figures: the time until the operator has acted on every failure, next to the
//! time its agent took to see them all failed; events dropped; the Jobs created next to the
//! coalescing windows, and the members their `/serf/stdin` list.
//!
//! Part 2, a synthetic Serf agent (serf-testkit) that plays a pool of MEMBERS members
//! (default 50,000):
//! - RSS with the whole pool known, next to the operator's RSS idle;
//! - the join of the whole pool: time until every member is acted on;
//! - the membership record: objects and total size, and the bytes one member's failure
//!   writes, next to the record's size (what writing it whole would send);
//! - a storm of STORM member-failed (default 10,000) over STORM_SECS (default 10): events
//!   dropped at the agent's stream (its 512-event queue) and by the operator, the time until
//!   every failure is acted on next to the storm's own length, the Jobs created next to the
//!   coalescing windows the storm spans, the members the Jobs' `/serf/stdin` list, and the
//!   bytes each record write of the storm sent next to the record's size;
//! - catch-up after a reconnect: RECONNECT_FAILS (default 1,000) members fail while the
//!   operator's link is down; the time from the link's return until every one is acted on,
//!   and the operator's own catch-up time, next to a bare `members` call of the same pool.
//!
//! `cargo build --release -p serf-operator && SERF_OPERATOR_BIN=target/release/serf-operator
//! cargo run --release -p serf-operator-e2e --example bench_scale`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serf_client::ClientConfig;
use serf_operator_e2e::{
    OperatorProcess, Proxy, ProxyMode, TempNamespace, cluster_or_skip, http_get, install_crds,
};
use serf_testkit::synthetic::{MemberEventKind, SyntheticAgent, SyntheticConfig, SyntheticMember};
use serf_testkit::{Agent, AgentConfig};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

fn rss_mib(pid: u32) -> f64 {
    serf_operator_e2e::rss_kib(pid) as f64 / 1024.0
}

/// The peak RSS so far.
fn peak_mib(pid: u32) -> f64 {
    serf_operator_e2e::proc_status_kib(pid, "VmHWM:") as f64 / 1024.0
}

/// The sum of a metric's samples (all label sets) in the operator's exposition.
async fn metric(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let bare = key.split('{').next()?;
            (bare == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Events lost by the operator: dropped for a reason that is a loss (its queue full, the
/// stream lagging, a launch given up), not a decision (no route, filtered, duplicate).
async fn lost(port: u16) -> f64 {
    let text = http_get(port, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("serf_operator_events_dropped_total{"))
        .filter(|l| {
            [
                "overflow",
                "event_queue_full",
                "launch_queue_full",
                "launch_deadline",
                "shutdown",
                "status_queue_full",
            ]
            .iter()
            .any(|r| l.contains(&format!("reason=\"{r}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until `name` reaches `target`; returns when it did (None: not within `within`).
async fn until_metric(port: u16, name: &str, target: f64, within: Duration) -> Option<Instant> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if metric(port, name).await >= target {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `name` has not moved for `quiet`.
async fn settled(port: u16, name: &str, quiet: Duration) -> f64 {
    let mut last = metric(port, name).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = metric(port, name).await;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
    }
}

/// The record writes the operator logged (debug): (members, bytes) each.
fn record_writes(log: &std::path::Path) -> Vec<(u64, u64)> {
    let field = |l: &str, k: &str| -> Option<u64> {
        let at = l.find(&format!("{k}="))? + k.len() + 1;
        l[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("membership record written"))
        .filter_map(|l| Some((field(l, "members")?, field(l, "bytes")?)))
        .collect()
}

/// The operator's own catch-up times (ms), from its log.
fn catch_ups(log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("membership caught up"))
        .filter_map(|l| {
            let at = l.find("took_ms=")? + 8;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The Jobs in `ns` and the member names their `/serf/stdin` list (one a line, as Serf's
/// handlers get them: name, address, role, tags, tab-separated).
async fn jobs_and_members(client: &kube::Client, ns: &str) -> anyhow::Result<(usize, Vec<String>)> {
    let japi: Api<Job> = Api::namespaced(client.clone(), ns);
    let sapi: Api<Secret> = Api::namespaced(client.clone(), ns);
    let jobs = japi.list(&ListParams::default()).await?.items;
    let mut listed = Vec::new();
    for j in &jobs {
        let name = j.metadata.name.clone().unwrap_or_default();
        let ann = j
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(serf_operator::jobs::ANNOTATION_STDIN).cloned());
        let stdin = match ann {
            Some(s) => s,
            None => sapi
                .get_opt(&name)
                .await?
                .and_then(|s| s.data)
                .and_then(|d| d.into_values().next())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default(),
        };
        listed.extend(
            stdin
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.split('\t').next().unwrap_or("").to_string()),
        );
    }
    Ok((jobs.len(), listed))
}

/// A handler in `ns` with one route: member-failed of `role=db` members, gathered for
/// `coalesce_secs`.
async fn failed_handler(client: &kube::Client, ns: &str, coalesce_secs: u64) -> anyhow::Result<()> {
    let hapi: Api<serf_operator_crds::SerfHandler> = Api::namespaced(client.clone(), ns);
    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "pool", "namespace": ns},
        "spec": {"routes": [{"name": "failed", "events": "member-failed",
            "members": {"role": "db"}, "coalesce": format!("{coalesce_secs}s"),
            "job": {"spec": {"template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}}]}
    });
    hapi.patch(
        "pool",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&handler),
    )
    .await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let Some(client) = cluster_or_skip("the scale benchmark").await else {
        return Ok(());
    };
    install_crds(&client).await?;
    let coalesce_secs: u64 = env_or("COALESCE_SECS", 10);
    let real: usize = env_or("REAL_AGENTS", 200);
    if real >= 3 {
        real_pool(&client, real, coalesce_secs).await?;
    }
    synthetic_pool(&client, coalesce_secs).await
}

async fn real_pool(client: &kube::Client, n: usize, coalesce_secs: u64) -> anyhow::Result<()> {
    let tmp = TempNamespace::create(client, "scale-real").await?;
    let ns = tmp.name.clone();
    failed_handler(client, &ns, coalesce_secs).await?;
    let t = Instant::now();
    // Serf's WAN timings by default (REAL_PROFILE): with LAN timings, 200 agents gossiping on
    // a 2-core machine starve the control plane sharing it, and live members are taken
    // for failed.
    let profile: String = env_or("REAL_PROFILE", "wan".to_string());
    let first = Agent::start(
        AgentConfig::new("op-node")
            .tag("role", "ops")
            .arg(format!("-profile={profile}")),
        &[],
    )?;
    let seed = [first.bind_addr()];
    let mut others: Vec<Agent> = Vec::new();
    for chunk in (1..n).collect::<Vec<_>>().chunks(16) {
        let started: Vec<std::io::Result<Agent>> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|i| {
                    let profile = &profile;
                    s.spawn(move || {
                        Agent::start(
                            AgentConfig::new(format!("real-{i:03}"))
                                .tag("role", "db")
                                .arg(format!("-profile={profile}")),
                            &seed,
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for a in started {
            others.push(a?);
        }
    }
    let serf =
        serf_client::Client::connect(ClientConfig::new(first.rpc_addr().to_string())).await?;
    loop {
        let alive = serf
            .members()
            .await?
            .iter()
            .filter(|m| m.status == serf_client::MemberStatus::Alive)
            .count();
        if alive == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = t.elapsed();

    let metrics = serf_testkit::free_port()?;
    let log = std::env::temp_dir().join(format!(
        "serf-operator-scale-real-{}.log",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&log);
    let mut op = OperatorProcess::in_namespace(&ns, first.rpc_addr(), metrics, log.clone())?;
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("following the Serf agent")
    {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the operator follows its agent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_metric(
        metrics,
        "serf_operator_members_changed_total",
        n as f64 - 1.0,
        Duration::from_secs(60),
    )
    .await
    .expect("every agent's join acted on");

    // Half of the others die at once.
    let kill = (n - 1) / 2;
    let killed_names: std::collections::BTreeSet<String> = others
        .iter()
        .take(kill)
        .map(|a| a.name().to_string())
        .collect();
    let d0 = lost(metrics).await;
    let pids: Vec<String> = others
        .iter()
        .take(kill)
        .filter_map(|a| a.pid())
        .map(|p| p.to_string())
        .collect();
    let t = Instant::now();
    std::process::Command::new("kill")
        .arg("-KILL")
        .args(&pids)
        .status()?;
    let killed = t.elapsed();
    for a in others.iter_mut().take(kill) {
        a.kill()?;
    }
    // The agent's own view, polled, next to the Jobs the operator made of it.
    let mut agent_first = None;
    let mut agent_saw = None;
    let mut in_jobs = None;
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    while t.elapsed() < Duration::from_secs(240) && (agent_saw.is_none() || in_jobs.is_none()) {
        if agent_saw.is_none() {
            let failed = serf
                .members()
                .await?
                .iter()
                .filter(|m| {
                    m.status == serf_client::MemberStatus::Failed && killed_names.contains(&m.name)
                })
                .count();
            if failed > 0 && agent_first.is_none() {
                agent_first = Some(t.elapsed());
            }
            if failed >= kill {
                agent_saw = Some(t.elapsed());
            }
        }
        if in_jobs.is_none() && last_poll.elapsed() >= Duration::from_millis(500) {
            last_poll = Instant::now();
            let (_, listed) = jobs_and_members(client, &ns).await?;
            let listed: std::collections::BTreeSet<String> = listed.into_iter().collect();
            if killed_names.is_subset(&listed) {
                in_jobs = Some(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_saw = agent_saw.expect("the agent saw every killed member failed");
    let agent_first = agent_first.unwrap_or(agent_saw);
    let windows = (agent_saw - agent_first).as_secs_f64() / coalesce_secs as f64;
    let in_jobs = in_jobs.expect("every killed member in a Job's /serf/stdin");
    let dropped = lost(metrics).await - d0;
    tokio::time::sleep(Duration::from_secs(coalesce_secs + 3)).await;
    let (jobs, listed) = jobs_and_members(client, &ns).await?;
    let flapped: std::collections::BTreeSet<&String> = listed
        .iter()
        .filter(|n| !killed_names.contains(*n))
        .collect();
    let rss = rss_mib(op.pid());
    op.terminate();
    drop(others);
    drop(first);

    println!(
        "\nreal agents ({profile} timings): {n} `serf agent` processes on loopback (started and converged in {:.1} s), {kill} killed at once (in {:.2} s), coalescing window {coalesce_secs} s\n",
        started.as_secs_f64(),
        killed.as_secs_f64()
    );
    println!("| | operator | baseline (same run) |");
    println!("|---|---|---|");
    println!(
        "| every killed member in a Job's /serf/stdin | {:.2} s after the kills (Jobs polled every 0.5 s) | its agent listed the first failed {:.2} s and all {kill} failed {:.2} s after the kills (polled every 50 ms); coalescing window {coalesce_secs} s |",
        in_jobs.as_secs_f64(),
        agent_first.as_secs_f64(),
        agent_saw.as_secs_f64()
    );
    println!("| events lost | {dropped:.0} | 0 (target) |");
    println!(
        "| Jobs created | {jobs}; their /serf/stdin list {} lines: every killed member, and {} live members the overloaded gossip took for failed for a while | {kill} members killed, failing over {:.1} s as its agent saw them: {windows:.1} coalescing windows |",
        listed.len(),
        flapped.len(),
        (agent_saw - agent_first).as_secs_f64()
    );
    println!("| RSS | {rss:.1} MiB with {n} members | |");
    Ok(())
}

async fn synthetic_pool(client: &kube::Client, coalesce_secs: u64) -> anyhow::Result<()> {
    let client = client.clone();
    let pool: u32 = env_or("MEMBERS", 50_000);
    let storm: u32 = env_or("STORM", 10_000);
    let storm_secs: u64 = env_or("STORM_SECS", 10);
    let reconnect_fails: u32 = env_or("RECONNECT_FAILS", 1_000);
    assert!(
        storm + reconnect_fails + 1 < pool,
        "the pool holds the storm"
    );

    let tmp = TempNamespace::create(&client, "scale").await?;
    let ns = tmp.name.clone();
    failed_handler(&client, &ns, coalesce_secs).await?;

    let agent =
        SyntheticAgent::start(SyntheticConfig::new("operator-node").tag("role", "ops")).await?;
    let proxy = Proxy::start(agent.addr()).await?;
    let metrics = serf_testkit::free_port()?;
    let log = std::env::temp_dir().join(format!("serf-operator-scale-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut op = OperatorProcess::in_namespace(&ns, proxy.addr, metrics, log.clone())?;
    op.following(1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = op.pid();
    let rss_idle = rss_mib(pid);

    // The whole pool joins.
    let members =
        SyntheticMember::numbered("node-", 0..pool, [("role", "db"), ("dc", "eu-west-1")]);
    let changed0 = metric(metrics, "serf_operator_members_changed_total").await;
    let t = Instant::now();
    agent.add_members(members);
    let joined = until_metric(
        metrics,
        "serf_operator_members_changed_total",
        changed0 + f64::from(pool),
        Duration::from_secs(120),
    )
    .await
    .expect("every member's join acted on within 2 minutes");
    let join_time = joined - t;
    // Until the whole pool is in the record (its first write is every member).
    let t = Instant::now();
    while record_writes(&log).iter().map(|w| w.0).sum::<u64>() < u64::from(pool) {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the record written within 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_write = record_writes(&log);
    let first_write_secs = t.elapsed().as_secs_f64() + join_time.as_secs_f64();
    let first_write_bytes: u64 = first_write.iter().map(|w| w.1).sum();
    let rss_pool = rss_mib(pid);

    // The record as stored.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let record = cms
        .list(&ListParams::default().labels(serf_operator::record::LABEL_RECORD))
        .await?;
    let record_objects = record.items.len();
    let sizes: Vec<usize> = record
        .items
        .iter()
        .map(|cm| {
            cm.data
                .as_ref()
                .map_or(0, |d| d.iter().map(|(k, v)| k.len() + v.len()).sum())
        })
        .collect();
    let record_bytes: usize = sizes.iter().sum();
    let largest = sizes.iter().copied().max().unwrap_or(0);

    // One member fails.
    let (b0, w0) = (
        metric(metrics, "serf_operator_membership_record_bytes_total").await,
        metric(metrics, "serf_operator_membership_record_writes_total").await,
    );
    let c0 = metric(metrics, "serf_operator_members_changed_total").await;
    agent.fail(["node-0"]);
    until_metric(
        metrics,
        "serf_operator_members_changed_total",
        c0 + 1.0,
        Duration::from_secs(30),
    )
    .await
    .expect("one failure acted on");
    let b1 = settled(
        metrics,
        "serf_operator_membership_record_bytes_total",
        Duration::from_secs(3),
    )
    .await;
    let w1 = metric(metrics, "serf_operator_membership_record_writes_total").await;
    let one_bytes = b1 - b0;
    let one_calls = w1 - w0;

    // The storm.
    let names: Vec<String> = (1..=storm).map(|i| format!("node-{i}")).collect();
    let writes_before = record_writes(&log).len();
    let c0 = metric(metrics, "serf_operator_members_changed_total").await;
    let dropped_op0 = lost(metrics).await;
    let (stream_dropped0, delivered0) = (agent.dropped(), agent.delivered());
    let t = Instant::now();
    agent
        .play_storm(
            &names,
            MemberEventKind::Failed,
            Duration::from_secs(storm_secs),
        )
        .await;
    let storm_len = t.elapsed();
    let routed = until_metric(
        metrics,
        "serf_operator_members_changed_total",
        c0 + f64::from(storm),
        Duration::from_secs(120),
    )
    .await
    .expect("every failure of the storm acted on within 2 minutes");
    let route_all = routed - t;
    let stream_dropped = agent.dropped() - stream_dropped0;
    let records_delivered = agent.delivered() - delivered0;
    let dropped_op = lost(metrics).await - dropped_op0;
    // The last window closes, its Job is created.
    tokio::time::sleep(Duration::from_secs(coalesce_secs + 3)).await;
    settled(
        metrics,
        "serf_operator_jobs_created_total",
        Duration::from_secs(3),
    )
    .await;
    let storm_writes: Vec<(u64, u64)> = record_writes(&log).split_off(writes_before);

    let (jobs, listed) = jobs_and_members(&client, &ns).await?;
    let listed = listed.len();
    // Windows the storm spans: the first opens at its first failure (node-0's failure had a
    // window of its own, closed before the storm).
    let windows = storm_len.as_secs_f64() / coalesce_secs as f64;

    // Catch-up after a reconnect.
    proxy.set(ProxyMode::Refuse);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let missed: Vec<String> = (storm + 1..=storm + reconnect_fails)
        .map(|i| format!("node-{i}"))
        .collect();
    let c0 = metric(metrics, "serf_operator_members_changed_total").await;
    agent.fail(&missed);
    let catch_ups_before = catch_ups(&log).len();
    let t = Instant::now();
    proxy.set(ProxyMode::Pass);
    let caught = until_metric(
        metrics,
        "serf_operator_members_changed_total",
        c0 + f64::from(reconnect_fails),
        Duration::from_secs(60),
    )
    .await
    .expect("the missed failures acted on after the reconnect");
    let reconnect_wall = caught - t;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let own = catch_ups(&log).split_off(catch_ups_before);
    let rss_after = rss_mib(pid);
    // Allocator caches given back after a quiet minute.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let rss_quiet = rss_mib(pid);
    let rss_peak = peak_mib(pid);

    // Baseline: a bare `members` call of the same pool, five times.
    let mut bare: Vec<u64> = Vec::new();
    let c = serf_client::Client::connect(ClientConfig::new(agent.rpc_addr())).await?;
    for _ in 0..5 {
        let t = Instant::now();
        let n = c.members().await?.len();
        bare.push(t.elapsed().as_millis() as u64);
        assert_eq!(n, pool as usize + 1);
    }
    let bare_members = median(&mut bare);
    op.terminate();

    let kib = |b: f64| b / 1024.0;
    println!(
        "\nscale: {pool} members, a storm of {storm} member-failed over {storm_secs} s, coalescing window {coalesce_secs} s\n"
    );
    println!("| | operator | baseline (same run) |");
    println!("|---|---|---|");
    println!(
        "| RSS | {rss_pool:.1} MiB with {pool} members known; {rss_after:.1} MiB after the storm and the reconnect, {rss_quiet:.1} MiB 30 s later; peak {rss_peak:.1} MiB | {rss_idle:.1} MiB idle |"
    );
    println!(
        "| join of the whole pool | all {pool} acted on in {:.2} s; all in the record {first_write_secs:.1} s after the join, {:.0} KiB sent in {} write(s) | |",
        join_time.as_secs_f64(),
        kib(first_write_bytes as f64),
        first_write.len()
    );
    println!(
        "| membership record | {record_objects} objects, {:.0} KiB in all, largest {:.0} KiB | 1,024 KiB: the API server's limit for one object |",
        kib(record_bytes as f64),
        kib(largest as f64)
    );
    println!(
        "| one member fails | {one_calls:.0} write(s), {one_bytes:.0} bytes | {:.0} KiB: the record written whole |",
        kib(record_bytes as f64)
    );
    println!(
        "| storm: events dropped at the agent's stream | {stream_dropped} ({records_delivered} stream records delivered) | 0 (target) |"
    );
    println!("| storm: events lost by the operator | {dropped_op:.0} | 0 (target) |");
    println!(
        "| storm: every failure acted on | {:.2} s after its start ({:+.2} s after its last event) | {:.2} s: the storm itself |",
        route_all.as_secs_f64(),
        route_all.as_secs_f64() - storm_len.as_secs_f64(),
        storm_len.as_secs_f64()
    );
    println!(
        "| storm: Jobs created | {jobs} (their /serf/stdin list {listed} members) | {:.1} coalescing windows spanned; {} members failed (+1 before) |",
        windows, storm
    );
    let storm_bytes: u64 = storm_writes.iter().map(|w| w.1).sum();
    let max_batch = storm_writes.iter().map(|w| w.1).max().unwrap_or(0);
    let max_members = storm_writes.iter().map(|w| w.0).max().unwrap_or(0);
    println!(
        "| storm: record writes | {} batches, {:.0} KiB in all, at most {:.0} KiB ({max_members} members) a batch; {:.0} bytes a member | {:.0} KiB a batch: the record written whole |",
        storm_writes.len(),
        kib(storm_bytes as f64),
        kib(max_batch as f64),
        storm_bytes as f64 / f64::from(storm),
        kib(record_bytes as f64)
    );
    println!(
        "| catch-up after a reconnect, {reconnect_fails} missed failures | {:.2} s from the link's return to all acted on; the operator's own catch-up {:?} ms | bare `members` call of {pool}: {bare_members} ms (median of 5) |",
        reconnect_wall.as_secs_f64(),
        own
    );
    Ok(())
}
