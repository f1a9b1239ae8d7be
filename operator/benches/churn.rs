//! Handler churn: 1,000 handler updates, one at a time, each applied as the operator applies
//! it (the changed handler handed to the route table, which compiles it alone),
//! next to one full compile of 1,000 handlers and to what the updates would cost if each
//! compiled everything. Prints each figure with its baseline from the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use serf_operator::engine::Router;
use serf_operator::metrics::thread_cpu_time;
use serf_operator_crds::SerfHandler;

fn handler(i: usize, generation: i64, image: &str) -> SerfHandler {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": format!("h{i:04}"), "namespace": format!("ns{}", i % 10),
                     "uid": format!("uid-{i}"), "generation": generation},
        "spec": {"role": "web|api", "selfTags": {"dc": "eu-.*"}, "routes": [
            {"name": "deploy", "events": format!("user:deploy-{i}"),
             "job": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": image}]}}}}},
            {"name": "failed", "events": "member-failed", "members": {"role": "db"},
             "coalesce": "10s",
             "job": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": image}]}}}}},
        ]},
    }))
    .unwrap()
}

fn main() {
    const N: usize = 1000;
    let mut current: Vec<SerfHandler> = (0..N).map(|i| handler(i, 1, "busybox:1.36")).collect();

    // Baseline: one full compile of 1,000 handlers (best of 5).
    let mut full = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = Router::new(&current);
        full = full.min(t.elapsed());
        assert_eq!(r.route_count(), 2 * N);
    }

    // 1,000 updates, one at a time, each handing the changed handler to the table.
    let mut router = Router::new(&current);
    let (t, cpu) = (Instant::now(), thread_cpu_time());
    let mut compiled = 0;
    for (i, h) in current.iter_mut().enumerate() {
        *h = handler(i, 2, "busybox:1.37");
        compiled += router.update(&[h], &[]).len();
    }
    let updates = t.elapsed();
    let updates_cpu = thread_cpu_time().saturating_sub(cpu);
    assert_eq!(compiled, N, "each update compiles its handler only");
    assert_eq!(router.route_count(), 2 * N);

    println!("handler churn (1,000 handlers, 2 routes each)");
    println!(
        "one full compile of 1,000 handlers:   {:>8.1} ms   (baseline)",
        full.as_secs_f64() * 1e3
    );
    println!(
        "1,000 updates, one at a time:         {:>8.1} ms   ({:.1}x the baseline; CPU {:.1} ms; target < 10x)",
        updates.as_secs_f64() * 1e3,
        updates.as_secs_f64() / full.as_secs_f64(),
        updates_cpu.as_secs_f64() * 1e3
    );
    println!(
        "the same, compiling everything each:  {:>8.1} ms   (estimated: 1,000 x the baseline)",
        full.as_secs_f64() * 1e3 * N as f64
    );
}
