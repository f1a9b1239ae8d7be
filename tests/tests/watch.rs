//! End to end on a real cluster (KUBECONFIG): Kubernetes objects become Serf events. A
//! watching SerfEventTrigger fires once per change of the fields it watches: a ConfigMap
//! edit reaches another agent once, a second edit once more, a burst of edits once with the
//! newest state; a change of a watched Deployment's other fields fires nothing, and its
//! readiness (with a Ready node that runs its Pod) fires once. An operator restart repeats
//! nothing, and a change made while it was down fires once when it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serf_client::{ClientConfig, Event, EventStream};
use serf_operator_crds::SerfEventTrigger;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, install_crds, node_image_or_skip,
    wait_for_default_service_account,
};
use serf_testkit::{Agent, AgentConfig};

/// The next user event's payload within `within`, or `None`.
async fn next_event(stream: &mut EventStream, within: Duration) -> Option<(String, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Event::User(u)))) => {
                return Some((u.name, String::from_utf8_lossy(&u.payload).into_owned()));
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }
}

async fn set_version(cms: &Api<ConfigMap>, v: &str) {
    cms.patch(
        "app-config",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"version": v}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_objects_fire_once_per_change() {
    let Some(client) = cluster_or_skip("the watch suite").await else {
        return;
    };
    let image = node_image_or_skip(&client, "the watch suite's Deployment readiness part").await;
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "watch").await.unwrap();
    let ns = ns.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("serf-e2e-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("operator.log");
    eprintln!("operator log: {}", log.display());

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "app-config", "labels": {"app": "web"}},
            "data": {"version": "1"},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deps.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"run": "web"}},
                "template": {"metadata": {"labels": {"run": "web"}}, "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "web", "image": image.clone().unwrap_or_else(|| "busybox:1.36".into()),
                        "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}}},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let tapi: Api<SerfEventTrigger> = Api::namespaced(client.clone(), &ns);
    for t in [
        serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
            "metadata": {"name": "config", "namespace": ns},
            "spec": {
                "event": {"name": "config-changed", "payload": "{.metadata.name} {.data.version}"},
                "watch": {"apiVersion": "v1", "kind": "ConfigMap", "selector": "app=web",
                          "fields": ["{.data}"], "debounce": "1500ms"},
            },
        }),
        serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
            "metadata": {"name": "ready", "namespace": ns},
            "spec": {
                "event": {"name": "web-ready", "payload": "{.metadata.name} ready={.status.readyReplicas}"},
                "watch": {"apiVersion": "apps/v1", "kind": "Deployment",
                          "fields": ["{.status.readyReplicas}"], "debounce": "500ms"},
            },
        }),
    ] {
        tapi.patch(
            t["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&t),
        )
        .await
        .unwrap();
    }

    let op = Agent::start(AgentConfig::new("watch-op"), &[]).unwrap();
    let other = Agent::start(AgentConfig::new("watch-other"), &[op.bind_addr()]).unwrap();
    let listener = serf_client::Client::connect(ClientConfig::new(other.rpc_addr().to_string()))
        .await
        .unwrap();
    let mut events = listener.stream("user").await.unwrap();
    let metrics = serf_testkit::free_port().unwrap();
    let start = || OperatorProcess::in_namespace(&ns, op.rpc_addr(), metrics, log.clone()).unwrap();
    let mut operator = start();
    for name in ["config", "ready"] {
        eventually(
            &format!("trigger {name} Ready (watching)"),
            Duration::from_secs(30),
            || async {
                let t = tapi.get(name).await.ok()?;
                t.status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "Watching")
                    .then_some(())
            },
        )
        .await;
    }
    // What existed when the triggers were made is their starting point: nothing fires.
    assert_eq!(next_event(&mut events, Duration::from_secs(4)).await, None);

    // A ConfigMap edit reaches the other agent once; a second edit once more.
    set_version(&cms, "2").await;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(15)).await,
        Some(("config-changed".into(), "app-config 2".into()))
    );
    assert_eq!(next_event(&mut events, Duration::from_secs(3)).await, None);
    set_version(&cms, "3").await;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(15)).await,
        Some(("config-changed".into(), "app-config 3".into()))
    );
    // A label change is not a change of `.data`.
    cms.patch(
        "app-config",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .unwrap();
    // A burst inside the debounce window: once, with the newest state.
    for v in ["4", "5", "6"] {
        set_version(&cms, v).await;
    }
    assert_eq!(
        next_event(&mut events, Duration::from_secs(15)).await,
        Some(("config-changed".into(), "app-config 6".into()))
    );
    assert_eq!(next_event(&mut events, Duration::from_secs(3)).await, None);

    // The Deployment: a spec change that leaves readyReplicas alone (its status changes:
    // observedGeneration) fires nothing.
    deps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"revisionHistoryLimit": 3}})),
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut events, Duration::from_secs(4)).await, None);
    if image.is_some() {
        // Scaled up on a node that runs the Pod: readyReplicas becomes 1, once.
        deps.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(90)).await,
            Some(("web-ready".into(), "web ready=1".into()))
        );
        assert_eq!(next_event(&mut events, Duration::from_secs(3)).await, None);
    }

    // A restart repeats nothing; a change made while the operator was down fires once.
    assert!(operator.terminate());
    set_version(&cms, "7").await;
    operator = start();
    assert_eq!(
        next_event(&mut events, Duration::from_secs(30)).await,
        Some(("config-changed".into(), "app-config 7".into()))
    );
    assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, None);

    // A kind the API server does not serve: the trigger says so.
    let bogus = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "bogus", "namespace": ns},
        "spec": {"event": {"name": "x"},
                 "watch": {"apiVersion": "example.com/v1", "kind": "Widget", "fields": ["{.spec}"]}},
    });
    tapi.patch(
        "bogus",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&bogus),
    )
    .await
    .unwrap();
    let c = eventually(
        "the bogus trigger not Ready",
        Duration::from_secs(30),
        || async {
            let t = tapi.get("bogus").await.ok()?;
            t.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "False")
        },
    )
    .await;
    assert_eq!(c.reason, "UnknownKind", "{c:?}");
    assert!(c.message.contains("example.com/v1 Widget"), "{c:?}");

    let s = tapi.get("config").await.unwrap().status.unwrap();
    let w = s.watch.unwrap();
    assert_eq!(w.objects, 1);
    assert_eq!(w.fired[0].object, format!("{ns}/app-config"));
    assert_eq!(w.fired[0].payload, "app-config 7");
    assert_eq!(w.fired[0].result, "Sent");
    assert_eq!(s.fired_count, 4);
    assert!(operator.terminate());
}
