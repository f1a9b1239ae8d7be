//! Times `members` calls on one connection (SERF_RPC_ADDR, SERF_RPC_AUTH) and prints one
//! JSON line: per-call p50/p99/mean in microseconds and calls per second, first for N
//! sequential calls, then for N calls (rounded down to a multiple of 16) with 16 in flight at
//! once, from 16 tasks sharing the connection. On Linux it also reports the
//! client's own CPU time per call (all threads, from `/proc/self/task/*/schedstat`), which
//! does not depend on how fast the agent answers or how long the kernel takes to wake us.
//!
//! Usage: `members_latency [N] [--multi-thread]` (N defaults to 2000; the runtime is
//! single-threaded unless `--multi-thread` is given).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serf_client::Client;

const IN_FLIGHT: usize = 16;

fn main() -> anyhow::Result<()> {
    let mut calls = 2000usize;
    let mut multi_thread = false;
    for arg in std::env::args().skip(1) {
        if arg == "--multi-thread" {
            multi_thread = true;
        } else {
            calls = arg
                .parse()
                .map_err(|e| anyhow::anyhow!("N must be a number, got {arg:?}: {e}"))?;
        }
    }
    let calls = calls.max(IN_FLIGHT);
    let runtime = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    let report = runtime.block_on(run(calls))?;
    println!(
        "{}",
        json!({
            "client": "serf-client",
            "runtime": if multi_thread { "multi-thread" } else { "current-thread" },
            "sequential": report.0,
            "concurrent": report.1,
        })
    );
    Ok(())
}

async fn run(calls: usize) -> anyhow::Result<(Value, Value)> {
    let client = Client::connect_env().await?;
    let members = client.members().await?.len();
    // Warm-up, not measured.
    for _ in 0..calls.min(100) {
        client.members().await?;
    }

    let mut latencies = Vec::with_capacity(calls);
    let cpu = cpu_time();
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        client.members().await?;
        latencies.push(t.elapsed());
    }
    let sequential = summary(latencies, started.elapsed(), cpu_since(cpu), 1, members);

    let per_task = calls / IN_FLIGHT;
    let cpu = cpu_time();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let client = client.clone();
        tasks.spawn(async move {
            let mut own = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                client.members().await?;
                own.push(t.elapsed());
            }
            Ok::<_, serf_client::Error>(own)
        });
    }
    let mut latencies = Vec::with_capacity(per_task * IN_FLIGHT);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let concurrent = summary(
        latencies,
        started.elapsed(),
        cpu_since(cpu),
        IN_FLIGHT,
        members,
    );
    Ok((sequential, concurrent))
}

fn summary(
    mut latencies: Vec<Duration>,
    wall: Duration,
    cpu: Option<Duration>,
    in_flight: usize,
    members: usize,
) -> Value {
    latencies.sort_unstable();
    let n = latencies.len();
    let micros = |d: Duration| (d.as_secs_f64() * 1e6 * 10.0).round() / 10.0;
    let pct = |p: f64| {
        let i = ((p * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
        latencies.get(i).copied().map(micros).unwrap_or(0.0)
    };
    let total: Duration = latencies.iter().sum();
    let mean = if n == 0 {
        0.0
    } else {
        micros(total / n as u32)
    };
    json!({
        "calls": n,
        "in_flight": in_flight,
        "members": members,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "mean_us": mean,
        "calls_per_s": (n as f64 / wall.as_secs_f64()).round() as u64,
        "cpu_us_per_call": cpu.filter(|_| n > 0).map(|c| micros(c / n as u32)),
    })
}

/// CPU time used so far by all threads of this process (Linux), in nanoseconds.
fn cpu_time() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn cpu_since(start: Option<u64>) -> Option<Duration> {
    Some(Duration::from_nanos(cpu_time()?.saturating_sub(start?)))
}
