//! End to end on a real cluster (KUBECONFIG): a handler whose Job template the API server
//! would refuse shows Ready=False with the API server's message as soon as it is applied
//! (a dry-run create of each route's Job), before any event; fixed, it turns Ready=True; the
//! check creates nothing. The API server refuses a SerfService whose name no Service can have.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serf_operator_crds::SerfHandler;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, http_get, install_crds,
};
use serf_testkit::{Agent, AgentConfig};

fn handler(ns: &str, restart_policy: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"routes": [
            {"name": "deploy", "events": "user:deploy",
             "job": {"spec": {"template": {"spec": {
                 "restartPolicy": restart_policy,
                 "containers": [{"name": "c", "image": "busybox:1.36"}]}}}}},
        ]},
    })
}

fn ready(h: &SerfHandler) -> Option<(String, String, Option<i64>)> {
    let s = h.status.as_ref()?;
    let c = s.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.message.clone(), s.observed_generation))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_template_the_api_server_refuses_shows_at_once() {
    let Some(client) = cluster_or_skip("the template-validation suite").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "validation").await.unwrap();
    let ns = ns.name.clone();
    let work = std::env::temp_dir().join(format!("serf-e2e-validation-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("operator.log");
    eprintln!("operator log: {}", log.display());

    let op = Agent::start(
        AgentConfig::new("e2e-validation-op").tag("role", "web"),
        &[],
    )
    .unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let operator = OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log).unwrap();
    eventually("/readyz", Duration::from_secs(60), || async {
        http_get(metrics, "/readyz").await.map(|_| ())
    })
    .await;
    operator.following(1).await;

    // Jobs refuse restartPolicy Always: the CRD's schema lets the template through, the API
    // server's Job validation does not.
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::apply("e2e").force();
    let applied = Instant::now();
    hapi.patch("web", &pp, &Patch::Apply(&handler(&ns, "Always")))
        .await
        .unwrap();
    let (status, message) = eventually("Ready=False", Duration::from_secs(30), || async {
        let h = hapi.get("web").await.ok()?;
        let (status, message, generation) = ready(&h)?;
        (generation == h.metadata.generation && status == "False").then_some((status, message))
    })
    .await;
    eprintln!(
        "applied → Ready={status} in {:.1} s: {message}",
        applied.elapsed().as_secs_f64()
    );
    assert!(
        message.starts_with("route deploy: the API server refuses its Job: Job.batch"),
        "{message}"
    );
    assert!(message.contains("restartPolicy"), "{message}");

    // Fixed: Ready=True for the new generation.
    hapi.patch("web", &pp, &Patch::Apply(&handler(&ns, "Never")))
        .await
        .unwrap();
    let message = eventually("Ready=True", Duration::from_secs(30), || async {
        let h = hapi.get("web").await.ok()?;
        let (status, message, generation) = ready(&h)?;
        (generation == h.metadata.generation && status == "True").then_some(message)
    })
    .await;
    eprintln!("fixed → Ready=True: {message}");

    // The checks created nothing.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert!(
        jobs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "a dry-run create stores nothing"
    );
}

/// The documented CRD upgrade (Helm never updates `crds/`):
/// `serf-operator crds --out - | kubectl apply --server-side --force-conflicts -f -` applies
/// every CRD over whatever installed them, and all stay established.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_upgrade_by_server_side_apply() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use std::io::Write as _;
    let Some(client) = cluster_or_skip("the CRD upgrade check").await else {
        return;
    };
    if std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        eprintln!("\n*** SKIPPED: the CRD upgrade check needs kubectl on PATH ***\n");
        return;
    }
    install_crds(&client).await.unwrap();
    let crds = std::process::Command::new(serf_operator_e2e::operator_binary().unwrap())
        .args(["crds", "--out", "-"])
        .output()
        .unwrap();
    assert!(crds.status.success());
    for _ in 0..2 {
        let mut kubectl = std::process::Command::new("kubectl")
            .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        kubectl
            .stdin
            .take()
            .unwrap()
            .write_all(&crds.stdout)
            .unwrap();
        let out = kubectl.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success());
        assert!(
            text.contains("serfhandlers.serf.operator.io serverside-applied"),
            "{text}"
        );
        assert!(
            text.contains("serfeventtriggers.serf.operator.io serverside-applied"),
            "{text}"
        );
    }
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "serfhandlers.serf.operator.io",
        "serfeventtriggers.serf.operator.io",
        "serfservices.serf.operator.io",
    ] {
        let crd = api.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} not established");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serf_service_named_what_no_service_can_be_is_refused() {
    let Some(client) = cluster_or_skip("the SerfService name check").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "svcname").await.unwrap();
    let api: Api<serf_operator_crds::SerfService> = Api::namespaced(client.clone(), &ns.name);
    let svc = |name: &str| {
        serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfService",
            "metadata": {"name": name, "namespace": ns.name},
            "spec": {"selector": {"tags": {"role": "db"}}, "ports": [{"name": "pg", "port": 5432}],
                     "publish": {"service": true}},
        })
    };
    // Valid object names for a custom resource, but not for a Service.
    for bad in ["1db", "db.eu", &"d".repeat(64)] {
        let e = api
            .patch(bad, &PatchParams::apply("e2e"), &Patch::Apply(svc(bad)))
            .await
            .expect_err(bad);
        let text = e.to_string();
        assert!(text.contains("is its Service's name"), "{bad}: {text}");
    }
    api.patch(
        "db-eu",
        &PatchParams::apply("e2e"),
        &Patch::Apply(svc("db-eu")),
    )
    .await
    .unwrap();
}
