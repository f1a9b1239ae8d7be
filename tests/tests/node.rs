//! End to end on a real cluster with a real node (KUBECONFIG, and a Ready node that runs
//! Pods): what only a running container shows. A hostile Serf payload reaches the Job's
//! container byte for byte (in `SERF_PAYLOAD`, through `args: ["$(SERF_PAYLOAD)"]`, in a
//! template variable built from it, and at `/serf/stdin`), and a Secret-backed variable of
//! the template never leaks into it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{ListParams, LogParams, Patch, PatchParams, PostParams};
use serf_client::ClientConfig;
use serf_operator_crds::SerfHandler;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, install_crds, jobs,
    node_image_or_skip, wait_for_default_service_account,
};
use serf_testkit::{Agent, AgentConfig};

/// Shell script run by the Job's container: prints what the container received, one value
/// a line (none of the values holds a newline), then `/serf/stdin`. It names no `$(...)`,
/// so Kubernetes leaves it alone; `$0` is the first argument, `$(SERF_PAYLOAD)` in `args`.
const SCRIPT: &str = r#"printf 'ENV=%s\n' "$SERF_PAYLOAD"
printf 'ARG=%s\n' "$0"
printf 'MSG=%s\n' "$MSG"
printf 'TAG=%s\n' "$SERF_TAG_NOTE"
printf 'NAME=%s\n' "$SERF_USER_EVENT"
printf 'PW=%s\n' "$DB_PASSWORD"
printf 'B64=%s\n' "$SERF_PAYLOAD_BASE64"
printf 'HEX=%s\n' "`od -An -tx1 /serf/stdin | tr -d ' \n'`"
printf 'STDIN='
[ -n "$SERF_PAYLOAD_BASE64" ] || cat /serf/stdin"#;

/// What each test here starts from: the cluster, the image its Jobs run, a fresh namespace
/// (deleted when dropped) and the operator's log file. `None`, after a loud SKIPPED, without
/// a cluster or a Ready node.
async fn setup(tag: &str) -> Option<(kube::Client, String, TempNamespace, std::path::PathBuf)> {
    let client = cluster_or_skip("the real-node suite").await?;
    let image = node_image_or_skip(&client, "the real-node suite").await?;
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, tag).await.unwrap();
    wait_for_default_service_account(&client, &ns.name)
        .await
        .unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("operator.log");
    eprintln!("operator log: {}", log.display());
    Some((client, image, ns, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_reach_a_real_container_unchanged() {
    let Some((client, image, ns_guard, log)) = setup("node").await else {
        return;
    };
    let ns = ns_guard.name.clone();

    // A Secret the template reads with envFrom: its variables are defined before every
    // `env` entry, so an unescaped `$(DB_PASSWORD)` in a Serf value would be replaced.
    let secret_value = format!("s3cret-{}", std::process::id());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db"},
        "stringData": {"DB_PASSWORD": secret_value},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "hostile", "namespace": ns},
        "spec": {"routes": [{
            "name": "show", "events": "user",
            "job": {"spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "show", "image": image, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", SCRIPT, "$(SERF_PAYLOAD)"],
                    "envFrom": [{"secretRef": {"name": "db"}}],
                    "env": [{"name": "MSG", "value": "got $(SERF_PAYLOAD)"}],
                }],
            }}}},
        }]},
    });
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    hapi.patch(
        "hostile",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&handler),
    )
    .await
    .unwrap();

    // The operator's node carries a tag whose value is Kubernetes syntax too.
    let tag = "$(DB_PASSWORD) $$ $(SERF_EVENT)";
    let op = Agent::start(
        AgentConfig::new("e2e-node-op")
            .tag("role", "web")
            .tag("note", tag),
        &[],
    )
    .unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let operator = OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    operator.following(1).await;
    // The handler's routes are compiled once the operator's cache holds it.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let serf = serf_client::Client::connect(ClientConfig::new(op.rpc_addr().to_string()))
        .await
        .unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "show-subst",
            "a $(SERF_EVENT) b $$ c $(UNDEF) $(DB_PASSWORD) $(KUBERNETES_SERVICE_HOST) $(",
        ),
        ("show-escape", "$$(DB_PASSWORD)$$$(MSG)$"),
    ];
    for (name, payload) in cases {
        serf.event(name, payload.as_bytes(), false).await.unwrap();
    }
    for (name, payload) in cases {
        let out = output_of(&client, &ns, name).await;
        let seen: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
        eprintln!("{name}: container output:\n{out}");
        assert_eq!(seen["ENV"], *payload, "SERF_PAYLOAD in the container");
        assert_eq!(seen["ARG"], *payload, "args: [$(SERF_PAYLOAD)]");
        assert_eq!(
            seen["MSG"],
            format!("got {payload}"),
            "the template's own env"
        );
        assert_eq!(seen["TAG"], tag, "SERF_TAG_NOTE");
        assert_eq!(seen["NAME"], *name, "SERF_USER_EVENT");
        assert_eq!(seen["PW"], secret_value, "the Secret is in the container");
        assert_eq!(seen["STDIN"], *payload, "/serf/stdin");
        for (k, v) in &seen {
            if *k != "PW" {
                assert!(!v.contains(&secret_value), "{k} leaks the Secret: {v}");
            }
        }
    }

    // Bytes an annotation cannot hold (not UTF-8, a NUL): /serf/stdin comes from a Secret
    // made before the Job; a real container reads the exact bytes.
    let bytes: &[u8] = &[0xff, b'$', b'(', b'X', b')', 0x00, b'z'];
    serf.event("show-binary", bytes, false).await.unwrap();
    let out = output_of(&client, &ns, "show-binary").await;
    eprintln!("show-binary: container output:\n{out}");
    let hex: String = bytes
        .iter()
        .chain(b"\n")
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        out.contains(&format!("HEX={hex}\n")),
        "/serf/stdin byte for byte: {out}"
    );
    assert!(
        out.contains("B64=/yQoWCkAeg==\n"),
        "SERF_PAYLOAD_BASE64: {out}"
    );
}

/// Waits for the Job of user event `event` to complete on the node; its container's output.
async fn output_of(client: &kube::Client, ns: &str, event: &str) -> String {
    let job_api: Api<Job> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let job = eventually(
        &format!("Job for {event}"),
        Duration::from_secs(30),
        || async {
            jobs(client, ns, "show").await.into_iter().find(|j| {
                j.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("serf.operator.io/event-name"))
                    .is_some_and(|n| n == event)
            })
        },
    )
    .await;
    let job_name = job.metadata.name.clone().unwrap();
    eventually(
        &format!("Job {job_name} Complete on the node"),
        Duration::from_secs(90),
        || async {
            let j = job_api.get(&job_name).await.unwrap();
            let st = j.status.unwrap_or_default();
            assert_eq!(st.failed.unwrap_or(0), 0, "Job {job_name} failed");
            (st.succeeded.unwrap_or(0) >= 1).then_some(())
        },
    )
    .await;
    let pod = pods
        .list(&ListParams::default().labels(&format!("job-name={job_name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap();
    pods.logs(&pod.metadata.name.unwrap(), &LogParams::default())
        .await
        .unwrap()
}

/// A real query answered by a real Job's output on the node (as Serf answers with its
/// handler's output), and a Job that calls the agent it was given (`serf members`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_by_a_real_jobs_output_and_a_job_calls_its_agent() {
    let Some((client, image, ns_guard, log)) = setup("answer").await else {
        return;
    };
    let ns = ns_guard.name.clone();

    let op = Agent::start(AgentConfig::new("e2e-answer-op").tag("role", "web"), &[]).unwrap();
    let peer = Agent::start(AgentConfig::new("e2e-answer-peer"), &[op.bind_addr()]).unwrap();
    // A Job that calls the agent needs the `serf` CLI: the operator's image carries it.
    let serf_image = "localhost/serf-operator:dev";
    let with_agent = serf_operator_e2e::node_has_image(&client, serf_image).await;
    let mut routes = vec![serde_json::json!({
        "name": "uptime", "events": "query:uptime",
        "job": {"spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "uptime", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "echo \"up on $SERF_SELF_NAME: $(cat /serf/stdin)\"; echo 'and a warning' >&2"],
            }],
        }}}},
    })];
    if with_agent {
        routes.push(serde_json::json!({
            "name": "members", "events": "user:list-members",
            // The agent listens on the host's loopback: the Pod shares the host's network.
            "agent": {"rpcAddr": op.rpc_addr().to_string()},
            "job": {"spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", "hostNetwork": true,
                "containers": [{
                    "name": "members", "image": serf_image, "imagePullPolicy": "IfNotPresent",
                    "command": ["serf", "members"],
                }],
            }}}},
        }));
    } else {
        eprintln!(
            "\n*** SKIPPED (part): the node has no {serf_image} image for a Job that runs `serf members` ***\n"
        );
    }
    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "answers", "namespace": ns},
        "spec": {"routes": routes},
    });
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    hapi.patch(
        "answers",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&handler),
    )
    .await
    .unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let operator = OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    operator.following(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The query comes from the other node, with a deadline long enough for a Pod to run.
    let asker = serf_client::Client::connect(ClientConfig::new(peer.rpc_addr().to_string()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut params = serf_client::QueryParams::new("uptime", b"5m".to_vec());
    params.timeout = Some(Duration::from_secs(60));
    params.filter_nodes = vec!["e2e-answer-op".into()];
    let mut records = asker.query(&params).await.unwrap();
    let mut answer = None;
    while let Some(rec) = tokio::time::timeout(Duration::from_secs(70), records.next())
        .await
        .expect("the query ends at its deadline")
    {
        if let serf_client::QueryRecord::Response { from, payload } = rec.unwrap() {
            eprintln!(
                "answer from {from} after {:?}: {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&payload)
            );
            answer = Some((from, payload));
            break;
        }
    }
    // stdout and stderr are two streams in the container log: each keeps its order, but
    // not their order against each other.
    let (from, payload) = answer.expect("an answer");
    assert_eq!(from, "e2e-answer-op");
    let mut lines: Vec<&[u8]> = payload.split_inclusive(|b| *b == b'\n').collect();
    lines.sort();
    assert_eq!(
        lines,
        [&b"and a warning\n"[..], &b"up on e2e-answer-op: 5m\n"[..]],
        "the Job's stdout and stderr answer the query; operator log: {}",
        log.display()
    );

    if with_agent {
        let serf = serf_client::Client::connect(ClientConfig::new(op.rpc_addr().to_string()))
            .await
            .unwrap();
        serf.event("list-members", b"", false).await.unwrap();
        let job = eventually("the members Job", Duration::from_secs(30), || async {
            jobs(&client, &ns, "members").await.into_iter().next()
        })
        .await;
        let job_name = job.metadata.name.clone().unwrap();
        let job_api: Api<Job> = Api::namespaced(client.clone(), &ns);
        eventually(
            &format!("Job {job_name} Complete"),
            Duration::from_secs(90),
            || async {
                let st = job_api
                    .get(&job_name)
                    .await
                    .unwrap()
                    .status
                    .unwrap_or_default();
                assert_eq!(st.failed.unwrap_or(0), 0, "Job {job_name} failed");
                (st.succeeded.unwrap_or(0) >= 1).then_some(())
            },
        )
        .await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pod = pods
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await
            .unwrap()
            .items
            .remove(0);
        let out = pods
            .logs(&pod.metadata.name.unwrap(), &LogParams::default())
            .await
            .unwrap();
        eprintln!("serf members in the Job:\n{out}");
        assert!(
            out.contains("e2e-answer-op") && out.contains("e2e-answer-peer"),
            "{out}"
        );
    }
}

/// Kubernetes → Serf: a Job's outcome comes back as a Serf event. A deploy Job that runs
/// and exits 0 on the node is reported `Succeeded` to another agent, a failing one `Failed`
/// with its reason; an operator restart afterwards sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_outcomes_reach_another_serf_node() {
    let Some((client, image, ns_guard, log)) = setup("report").await else {
        return;
    };
    let ns = ns_guard.name.clone();
    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"routes": [{
            "name": "deploy", "events": "user:deploy",
            "report": {"event": "deploy-done",
                       "payload": "$(JOB_OUTCOME) $(JOB_REASON) $(SERF_PAYLOAD) $(JOB_NAMESPACE)/$(JOB_NAME)"},
            "job": {"spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "deploy", "image": image, "imagePullPolicy": "IfNotPresent",
                    // Exits with the code the payload asks for.
                    "command": ["sh", "-c", "echo deploying $SERF_PAYLOAD; [ \"$SERF_PAYLOAD\" != broken ]"],
                }],
            }}}},
        }]},
    });
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    hapi.patch(
        "web",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&handler),
    )
    .await
    .unwrap();
    let op = Agent::start(AgentConfig::new("e2e-report-op").tag("role", "web"), &[]).unwrap();
    let other = Agent::start(AgentConfig::new("e2e-report-other"), &[op.bind_addr()]).unwrap();
    let watcher = serf_client::Client::connect(ClientConfig::new(other.rpc_addr().to_string()))
        .await
        .unwrap();
    let mut reports = watcher.stream("user:deploy-done").await.unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let start = || OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    let mut operator = start();
    operator.following(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Sent from the other node, reported back to it.
    watcher.event("deploy", b"v2", false).await.unwrap();
    watcher.event("deploy", b"broken", false).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(120), reports.next())
            .await
            .expect("both outcomes reported within 2 minutes")
            .unwrap()
            .unwrap();
        if let serf_client::Event::User(u) = ev {
            let text = String::from_utf8(u.payload).unwrap();
            eprintln!("report: {text}");
            got.push(text);
        }
    }
    got.sort();
    assert!(
        got[0].starts_with(&format!(
            "Failed BackoffLimitExceeded broken {ns}/web-deploy-"
        )),
        "{got:?}"
    );
    assert!(
        got[1].starts_with(&format!("Succeeded  v2 {ns}/web-deploy-")),
        "{got:?}"
    );
    let status = eventually("the reports in status", Duration::from_secs(20), || async {
        let r = hapi
            .get("web")
            .await
            .ok()?
            .status?
            .routes
            .into_iter()
            .find(|r| r.name == "deploy")?;
        (r.reported == 2).then_some(r)
    })
    .await;
    assert_eq!(status.last_reported.unwrap().result, "Sent");
    // A restart sends nothing again.
    assert!(operator.terminate());
    operator = start();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), reports.next())
            .await
            .is_err(),
        "a restart reported an outcome again"
    );
    assert!(operator.terminate());
}
