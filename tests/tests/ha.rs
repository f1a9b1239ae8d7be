//! Two operator replicas on a real cluster (KUBECONFIG), each with its own Serf agent, one
//! Lease: one Job per user event and per member failure, each trigger generation fired once,
//! failover when the leader dies, nothing fired again when both restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serf_client::ClientConfig;
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, env_of, eventually, install_crds, jobs,
};
use serf_testkit::{Agent, AgentConfig};

fn payload_of(job: &Job) -> String {
    env_of(job).remove("SERF_PAYLOAD").unwrap_or_default()
}

async fn count_payload(client: &Client, ns: &str, payload: &str) -> usize {
    jobs(client, ns, "deploy")
        .await
        .iter()
        .filter(|j| payload_of(j) == payload)
        .count()
}

fn replica(
    name: &str,
    agent: &Agent,
    ns: &str,
    metrics: u16,
    dir: &std::path::Path,
) -> OperatorProcess {
    OperatorProcess::start(
        &[
            "--namespaces",
            ns,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--leader-elect",
            "--lease-duration",
            "6",
        ],
        &[
            ("SERF_RPC_ADDR", agent.rpc_addr().to_string()),
            ("POD_NAMESPACE", ns.to_string()),
            ("POD_NAME", name.to_string()),
        ],
        dir.join(format!("{name}.log")),
    )
    .unwrap()
}

async fn holder(client: &Client, ns: &str) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    api.get_opt("serf-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_a_lease() {
    let Some(client) = cluster_or_skip("the two-replica cluster suite").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let tmp = TempNamespace::create(&client, "ha").await.unwrap();
    let ns = tmp.name.clone();
    let dir = std::env::temp_dir().join(format!("serf-e2e-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("replica logs: {}", dir.display());

    let a = Agent::start(AgentConfig::new("ha-a").tag("role", "web"), &[]).unwrap();
    let b = Agent::start(
        AgentConfig::new("ha-b").tag("role", "web"),
        &[a.bind_addr()],
    )
    .unwrap();
    let mut db = Agent::start(
        AgentConfig::new("ha-db").tag("role", "db"),
        &[a.bind_addr()],
    )
    .unwrap();
    a.wait_for(Duration::from_secs(20), "3 members", |m| m.len() == 3)
        .unwrap();

    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/handlers");
    for f in ["web.yaml", "remediation.yaml"] {
        let mut v: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(root.join(f)).unwrap()).unwrap();
        v["metadata"]["namespace"] = ns.clone().into();
        // No kubelet: Jobs never finish, so Forbid would hold back later Jobs.
        v["spec"]["routes"][0]["concurrencyPolicy"] = "Allow".into();
        if f == "remediation.yaml" {
            v["spec"]["routes"][0]["coalesce"] = "2s".into();
        }
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        hapi.patch(&name, &PatchParams::apply("e2e").force(), &Patch::Apply(&v))
            .await
            .unwrap();
    }

    let (ma, mb) = (
        serf_testkit::free_port().unwrap(),
        serf_testkit::free_port().unwrap(),
    );
    let mut ra = Some(replica("replica-a", &a, &ns, ma, &dir));
    let mut rb = Some(replica("replica-b", &b, &ns, mb, &dir));
    let first = eventually("a lease holder", Duration::from_secs(30), || {
        holder(&client, &ns)
    })
    .await;
    eprintln!("leader: {first}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Both replicas route user events: one Job per event.
    let serf = serf_client::Client::connect(ClientConfig::new(a.rpc_addr().to_string()))
        .await
        .unwrap();
    serf.event("deploy", b"ha-1", false).await.unwrap();
    eventually("deploy Job", Duration::from_secs(20), || async {
        (count_payload(&client, &ns, "ha-1").await >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count_payload(&client, &ns, "ha-1").await,
        1,
        "one Job per user event"
    );

    // A member failure: only the leader acts, one Job.
    db.kill().unwrap();
    eventually("remediation Job", Duration::from_secs(60), || async {
        (!jobs(&client, &ns, "db-failed").await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        jobs(&client, &ns, "db-failed").await.len(),
        1,
        "one Job per member failure"
    );

    // A trigger: fired once.
    let tapi: Api<SerfEventTrigger> = Api::namespaced(client.clone(), &ns);
    let mut trig = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "release", "namespace": ns},
        "spec": {"event": {"name": "deploy", "payload": "gen-1"}}
    });
    tapi.patch(
        "release",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&trig),
    )
    .await
    .unwrap();
    eventually("trigger fired", Duration::from_secs(20), || async {
        (tapi.get("release").await.unwrap().status?.fired_count == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        tapi.get("release")
            .await
            .unwrap()
            .status
            .unwrap()
            .fired_count,
        1
    );
    eventually("the trigger's Job", Duration::from_secs(20), || async {
        (count_payload(&client, &ns, "gen-1").await == 1).then_some(())
    })
    .await;

    // Kill the leader: the other takes over within the lease duration and fires the next
    // generation, once.
    let killed_at = Instant::now();
    let survivor = if first == "replica-a" {
        drop(ra.take());
        "replica-b"
    } else {
        drop(rb.take());
        "replica-a"
    };
    eventually("failover", Duration::from_secs(30), || async {
        (holder(&client, &ns).await.as_deref() == Some(survivor)).then_some(())
    })
    .await;
    let failover = killed_at.elapsed();
    eprintln!(
        "failover to {survivor} took {:.1} s",
        failover.as_secs_f64()
    );
    trig["spec"]["event"]["payload"] = "gen-2".into();
    tapi.patch(
        "release",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&trig),
    )
    .await
    .unwrap();
    eventually(
        "second generation fired by the new leader",
        Duration::from_secs(30),
        || async {
            let s = tapi.get("release").await.unwrap().status?;
            (s.fired_count == 2 && s.last_fired_generation == Some(2)).then_some(())
        },
    )
    .await;

    // Restart both: nothing is fired or launched again.
    let before = (
        jobs(&client, &ns, "deploy").await.len(),
        jobs(&client, &ns, "db-failed").await.len(),
    );
    for r in [ra.as_mut(), rb.as_mut()].into_iter().flatten() {
        assert!(r.terminate());
    }
    drop((ra, rb));
    let _ra = replica("replica-a", &a, &ns, ma, &dir);
    let _rb = replica("replica-b", &b, &ns, mb, &dir);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        tapi.get("release")
            .await
            .unwrap()
            .status
            .unwrap()
            .fired_count,
        2,
        "fired again after a restart"
    );
    let after = (
        jobs(&client, &ns, "deploy").await.len(),
        jobs(&client, &ns, "db-failed").await.len(),
    );
    assert_eq!(before, after, "launched again after a restart");
    println!(
        "two replicas: failover {:.1} s (lease duration 6 s)",
        failover.as_secs_f64()
    );
}
