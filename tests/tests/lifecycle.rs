//! End to end on a real cluster (KUBECONFIG): the operator's own life cycle must not fire
//! anything twice. After its agent is killed and restarted (which announces every member
//! again), and after the operator process is replaced, *every* Job of every route is
//! counted, and the member events the other nodes saw are read from their own handler logs.
//! Then the whole Serf cluster restarts, its Lamport clocks begin again, and the new epoch's
//! `deploy` is a new Job, not a duplicate of the old one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serf_client::ClientConfig;
use serf_operator_crds::SerfHandler;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, install_crds, jobs,
    wait_for_default_service_account,
};
use serf_testkit::{Agent, AgentConfig};

const ROUTES: [&str; 5] = ["joins", "leaves", "failures", "updates", "deploy"];

fn handler(ns: &str) -> serde_json::Value {
    let job = serde_json::json!({"spec": {"backoffLimit": 0, "template": {"spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "localhost/busybox:static",
            "imagePullPolicy": "IfNotPresent", "command": ["true"]}],
    }}}});
    let route = |name: &str, events: &str| serde_json::json!({"name": name, "events": events, "job": job.clone()});
    serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "life", "namespace": ns},
        "spec": {"routes": [
            route("joins", "member-join"),
            route("leaves", "member-leave"),
            route("failures", "member-failed"),
            route("updates", "member-update"),
            route("deploy", "user:deploy"),
        ]},
    })
}

/// Every Job of every route, by route.
async fn all_jobs(client: &kube::Client, ns: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in ROUTES {
        for j in jobs(client, ns, r).await {
            let event = j
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("serf.operator.io/event"))
                .cloned()
                .unwrap_or_default();
            out.push((r.to_string(), event));
        }
    }
    out.sort();
    out
}

/// The member events a peer's own `serf agent -event-handler` saw: one line each,
/// `EVENT member...`.
fn seen_by(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn peer(name: &str, dir: &Path) -> (AgentConfig, PathBuf) {
    let log = dir.join(format!("{name}.events"));
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$SERF_EVENT $(cut -f1 | tr '\\n' ' ')\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    (
        AgentConfig::new(name)
            .tag("role", "db")
            .event_handler(format!(
                "member-join,member-leave,member-failed,member-update={}",
                script.display()
            )),
        log,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_replacements_fire_nothing_twice_and_a_new_epoch_is_kept_apart() {
    let Some(client) = cluster_or_skip("the life-cycle suite").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "life").await.unwrap();
    let ns = ns.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("serf-e2e-life-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("operator.log");
    eprintln!("operator log: {}", log.display());
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    hapi.patch(
        "life",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&handler(&ns)),
    )
    .await
    .unwrap();

    let mut op = Agent::start(AgentConfig::new("life-op").tag("role", "web"), &[]).unwrap();
    let (cfg_a, log_a) = peer("life-a", &dir);
    let (cfg_b, log_b) = peer("life-b", &dir);
    let mut a = Agent::start(cfg_a, &[op.bind_addr()]).unwrap();
    let mut b = Agent::start(cfg_b, &[op.bind_addr()]).unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let mut operator_proc =
        OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    operator_proc.following(1).await;

    // The first connect finds three members it never saw: their joins, once.
    let start = eventually(
        "the joins of all three members",
        Duration::from_secs(30),
        || async {
            let js = all_jobs(&client, &ns).await;
            let names: String = js
                .iter()
                .map(|(_, e)| e.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            (["life-op", "life-a", "life-b"]
                .iter()
                .all(|n| names.contains(n)))
            .then_some(js)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let start_jobs = all_jobs(&client, &ns).await;
    assert_eq!(start, start_jobs, "settled");
    eprintln!("jobs at start: {start_jobs:?}");

    // 1. The operator's agent is killed and restarted: it announces every member again in
    //    one member-join. Nothing changed, so nothing is launched.
    let peers_before = (seen_by(&log_a).len(), seen_by(&log_b).len());
    op.kill().unwrap();
    op.restart(&[a.bind_addr(), b.bind_addr()]).unwrap();
    operator_proc.following(2).await;
    // Serf's member-event coalescing (up to 5 s), then the operator's routing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after_agent = all_jobs(&client, &ns).await;
    let new: Vec<_> = after_agent
        .iter()
        .filter(|j| !start_jobs.contains(j))
        .collect();
    // The operator's own view: every member alive before and after, with the same tags; the
    // restarted agent's member-join of all of them is no news.
    assert!(
        new.is_empty(),
        "the agent's restart launched Jobs again: {new:?}"
    );
    eprintln!(
        "peers saw while the operator's agent restarted: {:?}",
        &seen_by(&log_a)[peers_before.0..]
    );
    let settled = all_jobs(&client, &ns).await;

    // 2. The operator process is replaced: the catch-up finds nothing new; the other nodes
    //    see nothing at all (the agent stays).
    let peers_before = (seen_by(&log_a).len(), seen_by(&log_b).len());
    assert!(
        operator_proc.terminate(),
        "SIGTERM ends the operator with 0"
    );
    operator_proc =
        OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    operator_proc.following(3).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        all_jobs(&client, &ns).await,
        settled,
        "a replaced operator launches nothing again"
    );
    assert_eq!(
        (seen_by(&log_a).len(), seen_by(&log_b).len()),
        peers_before,
        "the other nodes saw no member event: {:?} {:?}",
        seen_by(&log_a),
        seen_by(&log_b)
    );

    // 3. The whole Serf cluster restarts: its Lamport clocks begin again. The old epoch's
    //    deploys were @1..@3; the new epoch's first deploy is @1 again, a new Job.
    let serf = serf_client::Client::connect(ClientConfig::new(op.rpc_addr().to_string()))
        .await
        .unwrap();
    for _ in 0..3 {
        serf.event("deploy", b"v1", false).await.unwrap();
    }
    let deploys = eventually("three deploy Jobs", Duration::from_secs(30), || async {
        let d = jobs(&client, &ns, "deploy").await;
        (d.len() == 3).then_some(d)
    })
    .await;
    drop(serf);
    a.kill().unwrap();
    b.kill().unwrap();
    op.kill().unwrap();
    op.restart(&[]).unwrap();
    a.restart(&[op.bind_addr()]).unwrap();
    b.restart(&[op.bind_addr()]).unwrap();
    operator_proc.following(4).await;
    let serf = serf_client::Client::connect(ClientConfig::new(op.rpc_addr().to_string()))
        .await
        .unwrap();
    // Wait until the operator has seen the cluster again (its epoch check needs a peer).
    eventually("the peers are back", Duration::from_secs(20), || async {
        let ms = serf.members().await.ok()?;
        (ms.iter()
            .filter(|m| m.status == serf_client::MemberStatus::Alive)
            .count()
            == 3)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    serf.event("deploy", b"v1", false).await.unwrap();
    let after = eventually(
        "the new epoch's deploy Job",
        Duration::from_secs(30),
        || async {
            let d = jobs(&client, &ns, "deploy").await;
            (d.len() == 4).then_some(d)
        },
    )
    .await;
    let old: Vec<_> = deploys.iter().map(|j| j.metadata.name.clone()).collect();
    let fresh: Vec<_> = after
        .iter()
        .filter(|j| !old.contains(&j.metadata.name))
        .collect();
    assert_eq!(fresh.len(), 1);
    assert_eq!(
        fresh[0]
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .get("serf.operator.io/event")
            .map(String::as_str),
        Some("user:deploy@1"),
        "the new epoch starts at 1 again"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("a new Lamport epoch"),
        "the operator says why"
    );
    assert!(operator_proc.terminate());
}
