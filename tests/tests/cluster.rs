//! End to end on a real cluster (KUBECONFIG) with real Serf agents: the operator binary turns
//! real events into Jobs, answers queries, writes status and Events, survives restarts
//! without a second Job, catches up on a member failure that happened while it was down, and
//! does not launch a replayed event again after its Job was deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as KubeEvent, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serf_client::{ClientConfig, QueryParams};
use serf_operator::jobs::stdin_bytes as stdin_of;
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, env_of, eventually, install_crds, jobs,
};
use serf_testkit::{Agent, AgentConfig};

fn handlers(ns: &str) -> Vec<serde_json::Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/handlers");
    let mut out = Vec::new();
    for f in ["web.yaml", "remediation.yaml", "where.yaml"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let mut v: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        v["metadata"]["namespace"] = ns.into();
        // This suite plays the kubelet itself (it sets a Pod's phase): its Pods must never
        // land on a real node, whose kubelet would own their status.
        for r in v["spec"]["routes"].as_array_mut().unwrap() {
            if let Some(pod) = r.pointer_mut("/job/spec/template/spec") {
                pod["nodeSelector"] = serde_json::json!({"serf.operator.io/e2e": "no-node"});
            }
        }
        if f == "web.yaml" {
            // No kubelet here: Jobs never finish, so Forbid would skip every later deploy.
            v["spec"]["routes"][0]["concurrencyPolicy"] = "Allow".into();
        }
        if f == "remediation.yaml" {
            v["spec"]["routes"][0]["coalesce"] = "2s".into();
            // No kubelet here: Jobs never finish, so Forbid would hold back the second one.
            v["spec"]["routes"][0]["concurrencyPolicy"] = "Allow".into();
        }
        out.push(v);
    }
    out
}

fn operator(agent: &Agent, ns: &str, metrics: u16, log: &std::path::Path) -> OperatorProcess {
    OperatorProcess::start(
        &[
            "--namespaces",
            ns,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ],
        &[
            ("SERF_RPC_ADDR", agent.rpc_addr().to_string()),
            ("POD_NAMESPACE", ns.to_string()),
            ("POD_NAME", "serf-operator-e2e".to_string()),
            ("RUST_LOG", "info,serf_operator=debug".to_string()),
        ],
        log.to_path_buf(),
    )
    .unwrap()
}

async fn ready(metrics: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", metrics)).await else {
        return false;
    };
    let _ = s
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf).await;
    buf.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_on_a_real_cluster() {
    let Some(client) = cluster_or_skip("the operator's cluster suite").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "op").await.unwrap();
    let ns = ns.name.clone();
    let work = tempfile_dir();
    let log = work.join("operator.log");

    let op = Agent::start(AgentConfig::new("e2e-op").tag("role", "web"), &[]).unwrap();
    let mut db1 = Agent::start(
        AgentConfig::new("e2e-db-1").tag("role", "db"),
        &[op.bind_addr()],
    )
    .unwrap();
    let mut db2 = Agent::start(
        AgentConfig::new("e2e-db-2").tag("role", "db"),
        &[op.bind_addr()],
    )
    .unwrap();
    op.wait_for(Duration::from_secs(20), "3 members", |ms| ms.len() == 3)
        .unwrap();

    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    for h in handlers(&ns) {
        let name = h["metadata"]["name"].as_str().unwrap().to_string();
        hapi.patch(&name, &PatchParams::apply("e2e").force(), &Patch::Apply(&h))
            .await
            .unwrap();
    }

    let metrics = serf_testkit::free_port().unwrap();
    let mut operator_proc = operator(&op, &ns, metrics, &log);
    eventually("/readyz", Duration::from_secs(30), || async {
        ready(metrics).await.then_some(())
    })
    .await;

    // The agents' joins reach the web handler's member-join route (membership diff at start).
    eventually("member-join Job", Duration::from_secs(20), || async {
        (!jobs(&client, &ns, "member-join").await.is_empty()).then_some(())
    })
    .await;

    // A user event → one Job with the Serf environment and /serf/stdin.
    let serf = serf_client::Client::connect(ClientConfig::new(op.rpc_addr().to_string()))
        .await
        .unwrap();
    serf.event("deploy", b"v1.2.3", false).await.unwrap();
    let job = eventually("deploy Job", Duration::from_secs(20), || async {
        jobs(&client, &ns, "deploy").await.into_iter().next()
    })
    .await;
    let job_name = job.metadata.name.clone().unwrap();
    let env = env_of(&job);
    assert_eq!(env["SERF_EVENT"], "user");
    assert_eq!(env["SERF_USER_EVENT"], "deploy");
    assert_eq!(env["SERF_PAYLOAD"], "v1.2.3");
    assert_eq!(env["SERF_SELF_NAME"], "e2e-op");
    assert_eq!(env["SERF_SELF_ROLE"], "web");
    // /serf/stdin travels in the Job itself (one create): no Secret.
    assert_eq!(stdin_of(&job, None), b"v1.2.3\n");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    assert!(secrets.get_opt(&job_name).await.unwrap().is_none());
    assert_eq!(
        job.metadata.owner_references.as_ref().unwrap()[0].kind,
        "SerfHandler"
    );

    // The where query is answered inline, from another node.
    let asker = serf_client::Client::connect(ClientConfig::new(db1.rpc_addr().to_string()))
        .await
        .unwrap();
    let mut q = QueryParams::new("where", Vec::new());
    q.timeout = Some(Duration::from_secs(2));
    let out = asker.query(&q).await.unwrap().collect().await.unwrap();
    assert!(
        out.responses
            .contains(&("e2e-op".to_string(), format!("e2e-op in {ns}").into_bytes())),
        "{out:?}"
    );

    // Status and Events.
    let status = eventually("web status", Duration::from_secs(10), || async {
        let h = hapi.get("web").await.unwrap();
        let s = h.status?;
        let deploy = s.routes.iter().find(|r| r.name == "deploy")?;
        (deploy.jobs_created == 1).then_some(s)
    })
    .await;
    let ready_cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready_cond.status, "True");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.members.as_ref().unwrap().total, 3);
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), &ns);
    eventually("JobCreated Event", Duration::from_secs(10), || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("JobCreated"))
            .then_some(())
    })
    .await;

    // kill -9 a db member → one remediation Job with it on /serf/stdin.
    db2.kill().unwrap();
    let remediation = eventually("remediation Job", Duration::from_secs(60), || async {
        jobs(&client, &ns, "db-failed").await.into_iter().next()
    })
    .await;
    let stdin = String::from_utf8(stdin_of(&remediation, None)).unwrap();
    assert!(stdin.starts_with("e2e-db-2\t127.0.0.1\tdb\t"), "{stdin:?}");

    // Bytes an annotation cannot hold: the Secret is made before the Job, then the Job owns it.
    serf.event("deploy", &[0xff, b'b', b'i', b'n'], false)
        .await
        .unwrap();
    let binary = eventually("the binary deploy Job", Duration::from_secs(20), || async {
        jobs(&client, &ns, "deploy")
            .await
            .into_iter()
            .find(|j| env_of(j).contains_key("SERF_PAYLOAD_BASE64"))
    })
    .await;
    let bname = binary.metadata.name.clone().unwrap();
    let owned = eventually(
        "the Secret owned by its Job",
        Duration::from_secs(20),
        || async {
            let s = secrets.get_opt(&bname).await.unwrap()?;
            let owner = s.metadata.owner_references.clone()?.into_iter().next()?;
            (owner.kind == "Job").then_some((s, owner))
        },
    )
    .await;
    assert_eq!(owned.1.uid, binary.metadata.uid.clone().unwrap());
    assert_eq!(stdin_of(&binary, Some(&owned.0)), b"\xffbin\n");
    assert!(
        owned.0.metadata.creation_timestamp.as_ref().unwrap().0
            <= binary.metadata.creation_timestamp.as_ref().unwrap().0,
        "the Secret exists before the Job"
    );

    // A SerfEventTrigger fires its event once; the event comes back on the operator's own
    // stream and the web handler's deploy route launches a Job for it (GitOps trigger → Job).
    let tapi: Api<SerfEventTrigger> = Api::namespaced(client.clone(), &ns);
    let release = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "release", "namespace": ns},
        "spec": {"event": {"name": "deploy", "payload": "v2.0.0"}}
    });
    tapi.patch(
        "release",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&release),
    )
    .await
    .unwrap();
    let fired = eventually("trigger fired", Duration::from_secs(20), || async {
        let s = tapi.get("release").await.unwrap().status?;
        (s.fired_count == 1 && s.firing.is_none()).then_some(s)
    })
    .await;
    assert_eq!(fired.last_fired_generation, Some(1));
    let sent = fired.conditions.iter().find(|c| c.type_ == "Sent").unwrap();
    assert_eq!(
        (sent.status.as_str(), sent.reason.as_str()),
        ("True", "Fired")
    );
    eventually(
        "the trigger's event launched a deploy Job",
        Duration::from_secs(20),
        || async {
            jobs(&client, &ns, "deploy")
                .await
                .iter()
                .any(|j| env_of(j).get("SERF_PAYLOAD").map(String::as_str) == Some("v2.0.0"))
                .then_some(())
        },
    )
    .await;
    // A new generation fires again, once.
    let mut release2 = release.clone();
    release2["spec"]["event"]["payload"] = "v2.0.1".into();
    tapi.patch(
        "release",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&release2),
    )
    .await
    .unwrap();
    eventually(
        "second generation fired",
        Duration::from_secs(20),
        || async {
            let s = tapi.get("release").await.unwrap().status?;
            (s.fired_count == 2 && s.last_fired_generation == Some(2)).then_some(())
        },
    )
    .await;
    // A query trigger: its acks and answers land in status.
    let where_q = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "where", "namespace": ns},
        "spec": {"query": {"name": "where", "timeout": "1s"}}
    });
    tapi.patch(
        "where",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&where_q),
    )
    .await
    .unwrap();
    let q = eventually(
        "query trigger answered",
        Duration::from_secs(20),
        || async { tapi.get("where").await.unwrap().status?.query },
    )
    .await;
    assert!(q.complete);
    assert!(
        q.responses
            .iter()
            .any(|r| r.from == "e2e-op" && r.payload == format!("e2e-op in {ns}")),
        "{q:?}"
    );
    assert!(q.ack_count >= 1);

    // Restart the operator: no second Job for anything already launched.
    assert!(
        operator_proc.terminate(),
        "SIGTERM must end the operator with exit 0"
    );
    let before = jobs(&client, &ns, "deploy").await.len()
        + jobs(&client, &ns, "db-failed").await.len()
        + jobs(&client, &ns, "member-join").await.len();
    operator_proc = operator(&op, &ns, metrics, &log);
    eventually("/readyz again", Duration::from_secs(30), || async {
        ready(metrics).await.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = jobs(&client, &ns, "deploy").await.len()
        + jobs(&client, &ns, "db-failed").await.len()
        + jobs(&client, &ns, "member-join").await.len();
    assert_eq!(before, after, "a restart must not launch anything again");
    let s = tapi.get("release").await.unwrap().status.unwrap();
    assert_eq!(s.fired_count, 2, "a restart must not fire a trigger again");

    // A member fails while the operator is down → its Job once, after the restart.
    assert!(operator_proc.terminate());
    db1.kill().unwrap();
    op.wait_for_status("e2e-db-1", "failed", Duration::from_secs(40))
        .unwrap();
    operator_proc = operator(&op, &ns, metrics, &log);
    let caught_up = eventually(
        "Job for the failure missed while down",
        Duration::from_secs(60),
        || async {
            let js = jobs(&client, &ns, "db-failed").await;
            (js.len() == 2).then_some(js)
        },
    )
    .await;
    let replayed = caught_up
        .iter()
        .find(|j| j.metadata.name != remediation.metadata.name)
        .unwrap();
    assert_eq!(
        replayed
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .get("serf.operator.io/replayed")
            .map(String::as_str),
        Some("true")
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        jobs(&client, &ns, "db-failed").await.len(),
        2,
        "exactly once"
    );

    // Replay after pruning: the deploy Job finishes, the history limit (now 0) prunes it,
    // then the same event comes back through a replaying join; it must not launch again.
    let japi: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the deploy Job's Pod", Duration::from_secs(30), || async {
        pods.list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
    })
    .await;
    pods.patch_status(
        pod.metadata.name.as_ref().unwrap(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .unwrap();
    eventually(
        "the deploy Job complete",
        Duration::from_secs(30),
        || async {
            let j = japi.get(&job_name).await.unwrap();
            j.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let mut web = handlers(&ns).remove(0);
    web["spec"]["successfulJobsHistoryLimit"] = 0.into();
    hapi.patch(
        "web",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&web),
    )
    .await
    .unwrap();
    eventually(
        "the deploy Job pruned by the history limit",
        Duration::from_secs(60),
        || async {
            japi.get_opt(&job_name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    // Pending Jobs of other routes are untouched by the spec change and the pruning.
    assert_eq!(jobs(&client, &ns, "db-failed").await.len(), 2);
    assert!(operator_proc.terminate());
    db1.restart(&[op.bind_addr()]).unwrap();
    let fresh = Agent::start(AgentConfig::new("e2e-op-2").tag("role", "web"), &[]).unwrap();
    operator_proc = operator(&fresh, &ns, metrics, &log);
    eventually(
        "/readyz on the fresh agent",
        Duration::from_secs(30),
        || async { ready(metrics).await.then_some(()) },
    )
    .await;
    let fresh_client =
        serf_client::Client::connect(ClientConfig::new(fresh.rpc_addr().to_string()))
            .await
            .unwrap();
    fresh_client
        .join(&[op.bind_addr().to_string()], true)
        .await
        .unwrap();
    let skipped = eventually(
        "the replayed deploy counted as a duplicate",
        Duration::from_secs(30),
        || async {
            let h = hapi.get("web").await.unwrap();
            let s = h.status?;
            let r = s.routes.into_iter().find(|r| r.name == "deploy")?;
            let last = r.last_skipped?;
            (last.reason == "Duplicate").then_some(last)
        },
    )
    .await;
    assert!(skipped.event.starts_with("user:deploy@"), "{skipped:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        japi.get_opt(&job_name).await.unwrap().is_none(),
        "a replayed event launched its Job again"
    );
    // The operator's agent is killed and restarted while the operator runs: it reconnects,
    // compares membership, and keeps serving.
    let mut fresh = fresh;
    fresh.kill().unwrap();
    eventually(
        "/readyz false while the agent is down",
        Duration::from_secs(10),
        || async { (!ready(metrics).await).then_some(()) },
    )
    .await;
    fresh.restart(&[]).unwrap();
    eventually(
        "/readyz after the agent came back",
        Duration::from_secs(30),
        || async { ready(metrics).await.then_some(()) },
    )
    .await;

    assert!(operator_proc.terminate());
    drop(db1);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("serf-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("operator log: {}", dir.join("operator.log").display());
    dir
}
