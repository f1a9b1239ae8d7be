//! SerfEventTrigger firing with real Serf agents and a mock API server: the firing is
//! recorded before the send, the event and the query reach other nodes, acks and responses
//! land in status, and Serf's refusals are reported, not retried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;
use serf_client::{ClientConfig, Event};
use serf_operator::trigger::{SendOutcome, fire};
use serf_operator_crds::{Firing, SerfEventTrigger};
use serf_testkit::{AgentConfig, Cluster};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers the next status patch with 200 and returns its body.
async fn status_patch(h: &mut Handle) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .expect("a status patch")
        .expect("service not called");
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/serf.operator.io/v1alpha1/namespaces/apps/serfeventtriggers/t/status"
    );
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let obj = serde_json::json!({"apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "t", "namespace": "apps"}, "spec": {"event": {"name": "x"}}});
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&obj).unwrap()))
            .unwrap(),
    );
    body
}

fn trigger(spec: Value) -> SerfEventTrigger {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "t", "namespace": "apps", "generation": 3},
        "spec": spec,
        "status": {"firedCount": 4}
    }))
    .unwrap()
}

fn firing() -> Firing {
    Firing {
        generation: 3,
        tick: None,
        started: "2026-11-23T10:00:00Z".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_and_query_triggers_reach_other_nodes_and_record_the_outcome() {
    let cluster = Cluster::start(vec![
        AgentConfig::new("trig-op").tag("role", "web"),
        AgentConfig::new("trig-db").tag("role", "db"),
    ])
    .unwrap();
    let serf = serf_client::Client::connect(ClientConfig::new(cluster[0].rpc_addr().to_string()))
        .await
        .unwrap();
    let other = serf_client::Client::connect(ClientConfig::new(cluster[1].rpc_addr().to_string()))
        .await
        .unwrap();
    let mut seen = other.stream("user:release,query:load").await.unwrap();

    // A user event.
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let t = trigger(serde_json::json!({"event": {"name": "release", "payload": "v1.2.3"}}));
    let task = tokio::spawn({
        let serf = serf.clone();
        async move { fire(&client, Some(&serf), &t, &firing()).await }
    });
    let first = status_patch(&mut h).await;
    assert_eq!(
        first["status"]["firing"]["generation"], 3,
        "the firing is recorded before the send"
    );
    let second = status_patch(&mut h).await;
    assert_eq!(task.await.unwrap().unwrap(), SendOutcome::Sent(None));
    let s = &second["status"];
    assert_eq!(s["firing"], Value::Null);
    assert_eq!(s["firedCount"], 5);
    assert_eq!(s["lastFiredGeneration"], 3);
    assert_eq!(s["observedGeneration"], 3);
    let sent = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Sent")
        .unwrap();
    assert_eq!(
        (sent["status"].as_str(), sent["reason"].as_str()),
        (Some("True"), Some("Fired"))
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), seen.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&ev, Event::User(u) if u.name == "release" && u.payload == b"v1.2.3"),
        "{ev:?}"
    );

    // A query answered by the other node; its acks and answers land in status.
    let answering = tokio::spawn(async move {
        let ev = tokio::time::timeout(Duration::from_secs(10), seen.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Event::Query(q) = ev else {
            panic!("{ev:?}")
        };
        other.respond(q.id, b"load 0.42").await.unwrap();
    });
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let t = trigger(
        serde_json::json!({"query": {"name": "load", "payload": "5m", "filterTags": {"role": "db"}, "timeout": "1500ms"}}),
    );
    let task = tokio::spawn({
        let serf = serf.clone();
        async move { fire(&client, Some(&serf), &t, &firing()).await }
    });
    status_patch(&mut h).await;
    let second = status_patch(&mut h).await;
    answering.await.unwrap();
    let SendOutcome::Sent(Some(q)) = task.await.unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(q.acks, ["trig-db"]);
    assert_eq!(q.responses[0].from, "trig-db");
    assert_eq!(q.responses[0].payload, "load 0.42");
    assert!(q.complete);
    assert_eq!(second["status"]["query"]["ackCount"], 1);
    assert_eq!(
        second["status"]["query"]["responses"][0]["payload"],
        "load 0.42"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_reported_at_once_and_an_absent_agent_is_retried() {
    let cluster = Cluster::start(vec![AgentConfig::new("trig-solo")]).unwrap();
    let serf = serf_client::Client::connect(ClientConfig::new(cluster[0].rpc_addr().to_string()))
        .await
        .unwrap();

    // Over Serf's user event limit: Serf's own text, final (the generation is done).
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let t = trigger(serde_json::json!({"event": {"name": "big", "payload": "x".repeat(600)}}));
    let task = tokio::spawn({
        let serf = serf.clone();
        async move { fire(&client, Some(&serf), &t, &firing()).await }
    });
    status_patch(&mut h).await;
    let second = status_patch(&mut h).await;
    let SendOutcome::Failed(msg) = task.await.unwrap().unwrap() else {
        panic!()
    };
    assert!(msg.contains("exceeds configured limit"), "{msg}");
    let failed = second["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap();
    assert_eq!(failed["status"], "True");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("exceeds configured limit")
    );
    assert_eq!(second["status"]["lastFiredGeneration"], 3);

    // No agent connection: nothing sent, the firing cleared, Sent=False Retrying.
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let t = trigger(serde_json::json!({"event": {"name": "later"}}));
    let task = tokio::spawn(async move { fire(&client, None, &t, &firing()).await });
    status_patch(&mut h).await;
    let second = status_patch(&mut h).await;
    assert!(matches!(
        task.await.unwrap().unwrap(),
        SendOutcome::Retry(_)
    ));
    assert_eq!(second["status"]["firing"], Value::Null);
    assert!(
        second["status"].get("lastFiredGeneration").is_none(),
        "a retry leaves the generation due"
    );
    let sent = &second["status"]["conditions"][0];
    assert_eq!(
        (sent["status"].as_str(), sent["reason"].as_str()),
        (Some("False"), Some("Retrying"))
    );
}
