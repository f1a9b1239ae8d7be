//! End to end on a real cluster (KUBECONFIG) through a proxy in front of the real
//! kube-apiserver: while the API server hangs (the proxy holds every byte) and while it is
//! down (the proxy refuses connections), Serf queries are still answered inline and user
//! events keep being routed; when it is back, every Job is created, exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serf_client::{ClientConfig, QueryParams};
use serf_operator_crds::SerfHandler;
use serf_operator_e2e::{
    OperatorProcess, Proxy, ProxyMode, TempNamespace, cluster_or_skip, eventually, http_get,
    install_crds, jobs, kubeconfig_via,
};
use serf_testkit::{Agent, AgentConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_api_server_hangs_or_is_down() {
    let Some(client) = cluster_or_skip("the API-outage suite").await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "outage").await.unwrap();
    let ns = ns.name.clone();
    let work = std::env::temp_dir().join(format!("serf-e2e-outage-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("operator.log");
    eprintln!("operator log: {}", log.display());

    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"routes": [
            {"name": "deploy", "events": "user:deploy",
             // suspended: no Pod is needed to count Jobs
             "job": {"spec": {"suspend": true, "template": {"spec": {
                 "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "busybox:1.36"}]}}}}},
            {"name": "where", "events": "query:where",
             "respond": {"payload": "$(SERF_SELF_NAME) is here"}},
        ]},
    });
    let hapi: Api<SerfHandler> = Api::namespaced(client.clone(), &ns);
    hapi.patch(
        "web",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&handler),
    )
    .await
    .unwrap();

    // The operator reaches the API server only through the proxy.
    let (_, upstream) = kubeconfig_via("127.0.0.1:1".parse().unwrap(), &work).unwrap();
    let proxy = Proxy::start(upstream).await.unwrap();
    let (kubeconfig, _) = kubeconfig_via(proxy.addr, &work).unwrap();

    let op = Agent::start(AgentConfig::new("e2e-outage-op").tag("role", "web"), &[]).unwrap();
    let asker_agent =
        Agent::start(AgentConfig::new("e2e-outage-asker"), &[op.bind_addr()]).unwrap();
    op.wait_for(Duration::from_secs(20), "2 members", |ms| ms.len() == 2)
        .unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    // The operator reaches the API server through the proxy, with a 2 s call timeout.
    let start_operator = || {
        OperatorProcess::start(
            &[
                "--namespaces",
                &ns,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
                "--api-timeout",
                "2",
            ],
            &[
                ("SERF_RPC_ADDR", op.rpc_addr().to_string()),
                ("POD_NAMESPACE", ns.clone()),
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("RUST_LOG", "info,serf_operator=debug".to_string()),
            ],
            log.clone(),
        )
        .unwrap()
    };
    let mut operator = start_operator();
    eventually("/readyz", Duration::from_secs(60), || async {
        http_get(metrics, "/readyz").await.map(|_| ())
    })
    .await;

    let asker = serf_client::Client::connect(ClientConfig::new(asker_agent.rpc_addr().to_string()))
        .await
        .unwrap();
    let answered = || async {
        let mut q = QueryParams::new("where", Vec::new());
        q.timeout = Some(Duration::from_secs(2));
        let out = asker.query(&q).await.unwrap().collect().await.unwrap();
        out.responses.contains(&(
            "e2e-outage-op".to_string(),
            b"e2e-outage-op is here".to_vec(),
        ))
    };
    assert!(
        answered().await,
        "the query is answered with the API server up"
    );

    let mut sent = 0u32;
    let fire = |n: u32| {
        let asker = asker.clone();
        async move {
            for _ in 0..n {
                asker.event("deploy", b"v", false).await.unwrap();
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }
    };
    fire(2).await;
    sent += 2;
    for (mode, label) in [(ProxyMode::Pause, "hangs"), (ProxyMode::Refuse, "is down")] {
        proxy.set(mode);
        fire(10).await;
        sent += 10;
        assert!(
            answered().await,
            "the query is answered while the API server {label}"
        );
        fire(10).await;
        sent += 10;
        assert!(
            answered().await,
            "the query is answered while the API server {label}"
        );
    }
    proxy.set(ProxyMode::Pass);
    let n = eventually(
        "every Job after the outage",
        Duration::from_secs(90),
        || async {
            let n = jobs(&client, &ns, "deploy").await.len();
            (n >= sent as usize).then_some(n)
        },
    )
    .await;
    assert_eq!(n, sent as usize, "one Job per event");
    // Exactly once: no create was counted twice, none dropped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = http_get(metrics, "/metrics").await.unwrap();
    let created: f64 = text
        .lines()
        .find(|l| l.starts_with("serf_operator_jobs_created_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(created as u32, sent, "{text}");
    assert!(!text.contains("reason=\"launch_deadline\""), "{text}");
    assert!(!text.contains("reason=\"launch_queue_full\""), "{text}");
    let idle = operator.terminate_timed().expect("exits 0 on SIGTERM");
    eprintln!("SIGTERM → exit, idle: {:.2} s", idle.as_secs_f64());

    // Stopping while the API server hangs with creates queued: the drain waits at most 10 s,
    // the handover of what is left cannot be written either; the exit is still bounded.
    let mut operator = start_operator();
    eventually("/readyz again", Duration::from_secs(60), || async {
        http_get(metrics, "/readyz").await.map(|_| ())
    })
    .await;
    proxy.set(ProxyMode::Pause);
    fire(3).await;
    let hung = operator
        .terminate_timed()
        .expect("exits 0 on SIGTERM while the API server hangs");
    eprintln!(
        "SIGTERM → exit, API server hanging, 3 creates queued: {:.2} s",
        hung.as_secs_f64()
    );
    assert!(hung < Duration::from_secs(20));
    proxy.set(ProxyMode::Pass);
}
