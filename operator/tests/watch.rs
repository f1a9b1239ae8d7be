//! A watching trigger whose kind the operator may not read says so in its status
//! (`Ready=False`, `WatchForbidden`) instead of failing silently (mock API, tower-test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_operator::effects::Sinks;
use serf_operator::metrics::Metrics;
use serf_operator::watch::Runner;
use serf_operator_crds::SerfEventTrigger;
use tokio::sync::{mpsc, watch};

#[tokio::test]
async fn a_kind_the_operator_may_not_read_is_ready_false_with_the_reason() {
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let t: SerfEventTrigger = serde_json::from_value(json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "cfg", "namespace": "apps", "uid": "u", "generation": 2},
        "spec": {"event": {"name": "config-changed", "payload": "{.metadata.name}"},
                 "watch": {"apiVersion": "v1", "kind": "ConfigMap", "fields": ["{.data}"]}},
    }))
    .unwrap();
    let (status, _srx) = mpsc::channel(16);
    let (events, mut erx) = mpsc::channel(16);
    tokio::spawn(async move { while erx.recv().await.is_some() {} });
    let sinks = Sinks {
        status,
        events,
        metrics: Metrics::new(),
    };
    let runner = Runner::new(
        client,
        watch::channel(None).1,
        sinks,
        Arc::new(t),
        Duration::from_secs(5),
    );
    let task = tokio::spawn(runner.run());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), h.next_request())
            .await
            .expect("a request")
            .expect("service not called")
    };
    // Discovery: the core group serves ConfigMaps.
    let (req, send) = next().await;
    assert_eq!(req.uri().path(), "/api/v1");
    let list = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
        "resources": [{"name": "configmaps", "singularName": "configmap", "namespaced": true,
                       "kind": "ConfigMap", "verbs": ["get", "list", "watch"]}]});
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&list).unwrap()))
            .unwrap(),
    );
    // Listing them is forbidden.
    let (req, send) = next().await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/namespaces/apps/configmaps");
    let denied = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "configmaps is forbidden: User \"system:serviceaccount:serf-system:serf-operator\" cannot list resource \"configmaps\"",
        "reason": "Forbidden", "code": 403});
    send.send_response(
        Response::builder()
            .status(403)
            .body(Body::from(serde_json::to_vec(&denied).unwrap()))
            .unwrap(),
    );
    // The trigger's status says so.
    let (req, send) = next().await;
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/serf.operator.io/v1alpha1/namespaces/apps/serfeventtriggers/cfg/status"
    );
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let ready = &body["status"]["conditions"][0];
    assert_eq!(ready["type"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "WatchForbidden");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("cannot list configmaps in apps"),
        "{ready}"
    );
    assert_eq!(body["status"]["observedGeneration"], 2);
    send.send_response(
        Response::builder()
            .body(Body::from(
                serde_json::to_vec(&json!({"apiVersion": "serf.operator.io/v1alpha1",
                "kind": "SerfEventTrigger", "metadata": {"name": "cfg", "namespace": "apps"},
                "spec": {"event": {"name": "x"}}}))
                .unwrap(),
            ))
            .unwrap(),
    );
    // It looks again later (RBAC may be granted): nothing more for now.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), h.next_request())
            .await
            .is_err()
    );
    task.abort();
}
