//! Handler status: counters and reasons per route, the Ready condition naming invalid routes,
//! batching, and the status patch as the API server receives it (mock API, tower-test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_operator::engine::{Engine, Membership};
use serf_operator::jobs::HandlerRef;
use serf_operator::manifests::parse_handlers;
use serf_operator::status::{RouteEvent, StatusBook, write_status};

const HANDLERS: &str = r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: web, namespace: apps, generation: 4}
spec:
  routes:
    - name: deploy
      events: user:deploy
      concurrencyPolicy: Forbid
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
    - name: broken
      events: member-join
      members: {role: "db("}
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
status:
  routes:
    - {name: deploy, matched: 10, jobsCreated: 9, skipped: 1}
    - {name: removed-route, matched: 3}
"#;

fn web() -> HandlerRef {
    HandlerRef {
        namespace: "apps".into(),
        name: "web".into(),
        uid: None,
    }
}

#[test]
fn counters_reasons_and_ready_condition() {
    let hs = parse_handlers(HANDLERS, Path::new("h.yaml")).unwrap();
    let engine = Engine::new(&hs, Membership::default());
    let mut book = StatusBook::default();
    book.sync_handler(
        &hs[0],
        &engine.router().errors().cloned().collect::<Vec<_>>(),
        "2026-11-23T10:00:00Z",
    );

    let s = book.get("apps", "web").unwrap().clone();
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(s.route_count, Some(2));
    let ready = &s.conditions[0];
    assert_eq!(
        (
            ready.type_.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "False", "InvalidRoutes")
    );
    assert!(
        ready
            .message
            .contains("route broken: members.role: regex \"db(\" does not compile"),
        "{}",
        ready.message
    );
    // Counters continue from the stored status; a removed route's entry goes.
    assert_eq!(
        s.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["deploy", "broken"]
    );
    assert_eq!(s.routes[0].jobs_created, 9);

    // A storm of events: one dirty entry, counted exactly.
    let _ = book.take_dirty();
    for i in 0..100 {
        book.record(
            &web(),
            "deploy",
            &format!("user:deploy@{i}"),
            RouteEvent::Launched {
                job: format!("web-deploy-{i}"),
            },
            "2026-11-23T10:00:01Z",
        );
    }
    book.record(
        &web(),
        "deploy",
        "user:deploy@100",
        RouteEvent::Skipped {
            reason: "ConcurrencyForbid".into(),
            message: "Job web-deploy-99 is still active".into(),
        },
        "2026-11-23T10:00:02Z",
    );
    let invalid = "Job.batch \"web-deploy-x\" is invalid: spec.template.spec.containers[0].image: Required value";
    book.record(
        &web(),
        "deploy",
        "user:deploy@101",
        RouteEvent::Skipped {
            reason: "JobCreateFailed".into(),
            message: invalid.into(),
        },
        "2026-11-23T10:00:03Z",
    );
    let dirty = book.take_dirty();
    assert_eq!(dirty.len(), 1, "one write for the whole storm");
    let deploy = &dirty[0].1.routes[0];
    assert_eq!(
        (deploy.matched, deploy.jobs_created, deploy.skipped),
        (110, 109, 3)
    );
    assert_eq!(
        deploy.last_matched.as_ref().unwrap().job.as_deref(),
        Some("web-deploy-99")
    );
    let last = deploy.last_skipped.as_ref().unwrap();
    assert_eq!(
        (last.reason.as_str(), last.event.as_str()),
        ("JobCreateFailed", "user:deploy@101")
    );
    assert_eq!(last.message.as_deref(), Some(invalid));
    assert!(book.take_dirty().is_empty());

    // Events dropped before routing show as a condition, written once per change.
    book.set_events_dropped(&web(), 7, "2026-11-23T10:00:04Z");
    book.set_events_dropped(&web(), 7, "2026-11-23T10:00:05Z");
    let dirty = book.take_dirty();
    assert_eq!(dirty.len(), 1);
    let c = dirty[0]
        .1
        .conditions
        .iter()
        .find(|c| c.type_ == "EventsDropped")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "QueueOverflow")
    );
    assert!(
        c.message.starts_with("7 Serf event(s) dropped"),
        "{}",
        c.message
    );
    assert!(book.take_dirty().is_empty());

    // Fixing the handler flips Ready and keeps the transition time honest.
    let fixed = HANDLERS
        .replace("members: {role: \"db(\"}", "members: {role: db}")
        .replace("generation: 4", "generation: 5");
    let hs2 = parse_handlers(&fixed, Path::new("h.yaml")).unwrap();
    let engine = Engine::new(&hs2, Membership::default());
    book.sync_handler(
        &hs2[0],
        &engine.router().errors().cloned().collect::<Vec<_>>(),
        "2026-11-23T11:00:00Z",
    );
    let s = book.get("apps", "web").unwrap();
    assert_eq!(s.conditions[0].status, "True");
    assert_eq!(s.conditions[0].reason, "RoutesValid");
    assert_eq!(
        s.conditions[0].last_transition_time.0.to_string(),
        "2026-11-23T11:00:00Z"
    );
    assert_eq!(s.observed_generation, Some(5));
}

#[tokio::test]
async fn status_is_one_server_side_apply_on_the_status_subresource() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let hs = parse_handlers(HANDLERS, Path::new("h.yaml")).unwrap();
    let mut book = StatusBook::default();
    book.sync_handler(&hs[0], &[], "2026-11-23T10:00:00Z");
    book.record(
        &web(),
        "deploy",
        "user:deploy@7",
        RouteEvent::Launched {
            job: "web-deploy-abc".into(),
        },
        "2026-11-23T10:00:01Z",
    );
    let (key, status) = book.take_dirty().remove(0);
    let writer = tokio::spawn(async move { write_status(&client, &key.0, &key.1, &status).await });

    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/serf.operator.io/v1alpha1/namespaces/apps/serfhandlers/web/status"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let query = req.uri().query().unwrap_or("").to_string();
    assert!(query.contains("fieldManager=serf-operator"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(body["kind"], "SerfHandler");
    assert_eq!(body["apiVersion"], "serf.operator.io/v1alpha1");
    assert_eq!(body["status"]["observedGeneration"], 4);
    assert_eq!(body["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(body["status"]["routes"][0]["jobsCreated"], 10);
    assert_eq!(
        body["status"]["routes"][0]["lastMatched"],
        json!({"event": "user:deploy@7", "time": "2026-11-23T10:00:01Z", "job": "web-deploy-abc"})
    );
    let obj = json!({"apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler", "metadata": {"name": "web", "namespace": "apps"}, "spec": {"routes": []}, "status": body["status"].clone()});
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&obj).unwrap()))
            .unwrap(),
    );
    writer.await.unwrap().unwrap();

    // A handler deleted meanwhile (404) is not an error.
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let writer =
        tokio::spawn(
            async move { write_status(&client, "apps", "gone", &Default::default()).await },
        );
    let (_, send) = handle.next_request().await.unwrap();
    let nf = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&nf).unwrap()))
            .unwrap(),
    );
    writer.await.unwrap().unwrap();
}

/// Each distinct note is an Event of its own (the recorder groups by reason and action, so
/// a second `JobCreated` must not fold into the first); the same note again is a series.
#[tokio::test]
async fn every_job_created_is_its_own_event_and_repeats_are_a_series() {
    use serf_operator::dispatch::Severity;
    use serf_operator::effects::{EventReq, publish_events};
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let publisher = tokio::spawn(publish_events(
        client,
        "op-0".into(),
        rx,
        Duration::from_secs(5),
        serf_operator::metrics::Metrics::new(),
    ));
    let notes = [
        "route deploy created Job web-deploy-1 for user:deploy@1",
        "route joins created Job web-joins-2 for member-join:db-1",
        "route deploy created Job web-deploy-1 for user:deploy@1",
    ];
    for note in notes {
        tx.send(EventReq {
            kind: "SerfHandler",
            object: web(),
            severity: Severity::Normal,
            reason: "JobCreated",
            note: note.into(),
        })
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap()
            .unwrap();
        let method = req.method().clone();
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        seen.push((method, body.clone()));
        let mut reply = body.clone();
        if reply["metadata"]["name"].is_null() {
            reply["metadata"]["name"] = json!("ev");
        }
        reply["metadata"]["namespace"] = json!("apps");
        send.send_response(
            Response::builder()
                .status(if seen.len() == 3 { 200 } else { 201 })
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    assert_eq!(seen[0].0, Method::POST);
    assert_eq!(seen[1].0, Method::POST, "a second note is a new Event");
    assert_ne!(seen[0].1["action"], seen[1].1["action"]);
    assert_eq!(seen[0].1["note"], notes[0]);
    assert_eq!(seen[1].1["note"], notes[1]);
    assert_eq!(seen[0].1["reason"], "JobCreated");
    assert_eq!(
        seen[2].0,
        Method::PATCH,
        "the same note again is a series on the first Event: {:?}",
        seen[2].1
    );
}

/// A storm of Serf events is not a storm of Event writes: per object, a burst of 25, then
/// one per 5 minutes (client-go's spam filter); past 10 distinct notes of one reason in 10
/// minutes, the rest are one combined series (client-go's aggregator).
#[test]
fn events_are_throttled_and_combined_per_object() {
    use serf_operator::effects::EventThrottle;
    use std::time::Instant;
    let mut t = EventThrottle::default();
    let now = Instant::now();
    let mut admitted = 0;
    let mut actions = std::collections::BTreeSet::new();
    for i in 0..100 {
        let note = format!("route deploy created Job web-deploy-{i} for user:deploy@{i}");
        let (action, shaped) = t.shape("SerfHandler/apps/web", "JobCreated", &note, now);
        if i >= 10 {
            assert!(shaped.starts_with("(combined from similar events): "));
        } else {
            assert_eq!(shaped, note);
        }
        actions.insert(action);
        if t.admit("SerfHandler/apps/web", now) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 25);
    assert_eq!(
        actions.len(),
        11,
        "ten Events of their own, then one series"
    );
    // Another object has its own budget; the first gets a token back after 5 minutes.
    assert!(t.admit("SerfHandler/apps/db", now));
    assert!(!t.admit("SerfHandler/apps/web", now + Duration::from_secs(60)));
    assert!(t.admit("SerfHandler/apps/web", now + Duration::from_secs(301)));
}
