//! End to end on a real cluster (KUBECONFIG, and `kubectl`): `kubectl apply -R -f examples/`
//! works as it is, next to a running operator whose agent is in a Serf cluster with another
//! node: the namespace comes first, every handler is Ready (its Job templates accepted by the
//! API server's dry run), every trigger Ready, the release trigger's `example-deploy` comes
//! back as a Job of the web handler, the load query is answered by the db node, and the
//! other node sees no event or query whose name does not start with `example-`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, http_get, install_crds, jobs,
};
use serf_testkit::{Agent, AgentConfig};

const NS: &str = "serf-examples";

fn ready(conditions: &[Condition]) -> Option<(String, String)> {
    let c = conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_apply_as_they_are_and_send_only_example_events() {
    let Some(client) = cluster_or_skip("the examples suite").await else {
        return;
    };
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("\n*** SKIPPED: the examples suite needs kubectl on PATH ***\n");
        return;
    }
    install_crds(&client).await.unwrap();
    let _ns = TempNamespace::adopt(&client, NS).await.unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-examples-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("operator.log");
    eprintln!("operator log: {}", log.display());

    // The other node: a db member whose handler logs every user event and query it gets,
    // and answers the load query as a classic Serf handler script would.
    let seen = work.join("db.events");
    let script = work.join("db.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$SERF_EVENT $SERF_USER_EVENT$SERF_QUERY_NAME\" >> {}\n\
             [ \"$SERF_QUERY_NAME\" = example-load ] && echo 0.42\nexit 0\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let op = Agent::start(AgentConfig::new("e2e-examples-op").tag("role", "web"), &[]).unwrap();
    let db = Agent::start(
        AgentConfig::new("e2e-examples-db")
            .tag("role", "db")
            .event_handler(format!("user,query={}", script.display())),
        &[op.bind_addr()],
    )
    .unwrap();
    op.wait_for(Duration::from_secs(20), "2 members", |m| m.len() == 2)
        .unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let operator = OperatorProcess::in_namespace(NS, op.rpc_addr(), metrics, log).unwrap();
    eventually("/readyz", Duration::from_secs(60), || async {
        http_get(metrics, "/readyz").await.map(|_| ())
    })
    .await;
    operator.following(1).await;

    // What a user types, from the repository's root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("kubectl")
        .current_dir(&root)
        .args(["apply", "-R", "-f", "examples/"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "kubectl apply -R -f examples/:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl apply failed");
    assert!(text.starts_with("namespace/serf-examples"), "{text}");

    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), NS);
    let handlers = eventually(
        "every example handler Ready=True",
        Duration::from_secs(60),
        || async {
            let list = hapi.list(&Default::default()).await.ok()?.items;
            let ok = list.len() == 4
                && list.iter().all(|h| {
                    h.status.as_ref().is_some_and(|s| {
                        s.observed_generation == h.metadata.generation
                            && ready(&s.conditions).is_some_and(|(st, _)| st == "True")
                    })
                });
            ok.then_some(list)
        },
    )
    .await;
    for h in &handlers {
        let (_, m) = ready(&h.status.as_ref().unwrap().conditions).unwrap();
        eprintln!(
            "handler {}: Ready=True ({m})",
            h.metadata.name.as_deref().unwrap()
        );
    }

    let tapi: Api<SerfEventTrigger> = Api::namespaced(client.clone(), NS);
    let triggers = eventually(
        "every example trigger Ready=True, the release sent and the load query complete",
        Duration::from_secs(60),
        || async {
            let list = tapi.list(&Default::default()).await.ok()?.items;
            let get = |n: &str| list.iter().find(|t| t.metadata.name.as_deref() == Some(n));
            let release = get("release")?.status.as_ref()?;
            let load = get("db-load")?.status.as_ref()?;
            let ok = list.len() == 5
                && list.iter().all(|t| {
                    t.status
                        .as_ref()
                        .and_then(|s| ready(&s.conditions))
                        .is_some_and(|(st, _)| st == "True")
                })
                && release.fired_count == 1
                && load.query.as_ref().is_some_and(|q| q.complete);
            ok.then_some(list)
        },
    )
    .await;
    for t in &triggers {
        let s = t.status.as_ref().unwrap();
        eprintln!(
            "trigger {}: fired {} {}",
            t.metadata.name.as_deref().unwrap(),
            s.fired_count,
            s.query
                .as_ref()
                .map(|q| format!("(query: {} acks, responses {:?})", q.ack_count, q.responses))
                .unwrap_or_default()
        );
    }
    let load = triggers
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some("db-load"))
        .unwrap();
    let q = load.status.as_ref().unwrap().query.clone().unwrap();
    assert!(
        q.responses
            .iter()
            .any(|r| r.from == "e2e-examples-db" && r.payload.trim() == "0.42"),
        "{q:?}"
    );
    assert!(
        !q.acks.iter().any(|a| a == "e2e-examples-op"),
        "the query asks role=db nodes only: {q:?}"
    );

    // The release trigger's event came back to the operator's stream: a Job of the web
    // handler's deploy route (the operator's node has role=web).
    let deploys = eventually(
        "the web handler's deploy Job",
        Duration::from_secs(30),
        || async {
            let j = jobs(&client, NS, "deploy").await;
            (!j.is_empty()).then_some(j)
        },
    )
    .await;
    assert_eq!(deploys.len(), 1);
    eprintln!(
        "release → Job {}",
        deploys[0].metadata.name.as_deref().unwrap()
    );

    // Everything the other node got is named example-…
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got: Vec<String> = std::fs::read_to_string(&seen)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    eprintln!("the db node saw: {got:?}");
    assert!(got.iter().any(|l| l == "user example-deploy"), "{got:?}");
    assert!(got.iter().any(|l| l == "query example-load"), "{got:?}");
    for l in &got {
        let name = l.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            name.starts_with("example-"),
            "{l}: a real fleet would act on it"
        );
    }
    drop(db);
}
