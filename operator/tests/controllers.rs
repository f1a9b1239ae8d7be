//! The two controllers' reconcile functions against a mock API server (tower-test), each
//! request checked as it comes (as controller-rs's `ApiServerVerifier` does), with a real
//! Serf agent where a trigger sends: a trigger fires once per generation (a stale cache
//! does not fire it again), an interrupted firing is reported and not re-sent, an invalid
//! schedule shows in the trigger's status, a standby does nothing, failures back off; a
//! handler's Ready and `observedGeneration` go to the state writer, and a finished Job is
//! pruned only after the launch ledger records it; the state writer reads a ledger before it
//! writes one, writes only the segment that changed, and writes again what was refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::{Value, json};
use serf_client::{ClientConfig, Event};
use serf_operator::controller::handler::{self, HandlerContext};
use serf_operator::controller::trigger::{self, TriggerContext};
use serf_operator::effects::Sinks;
use serf_operator::error::Error;
use serf_operator::ledger::Ledger;
use serf_operator::metrics::Metrics;
use serf_operator::state::StatusMsg;
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use serf_testkit::{AgentConfig, Cluster};
use tokio::sync::{mpsc, watch};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Takes the next request, answers `code` with `reply`; returns its method, URI and body.
async fn answer(h: &mut Handle, code: u16, reply: Value) -> (Method, http::Uri, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .expect("a request")
        .expect("service not called");
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let body = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    (
        method,
        uri,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Expects one request: checks method and path, answers `code` with `reply`, returns the
/// request body.
async fn expect(h: &mut Handle, method: Method, path: &str, code: u16, reply: Value) -> Value {
    let (m, uri, body) = answer(h, code, reply).await;
    assert_eq!(m, method, "{uri}");
    assert_eq!(uri.path(), path);
    body
}

async fn no_more_requests(h: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(200), h.next_request()).await;
    assert!(
        next.is_err() || next.unwrap().is_none(),
        "unexpected request"
    );
}

/// Expects the dry-run create of a route's sample Job in `apps`; answers `code` with
/// `reply`, returns the Job sent.
async fn expect_dry_run(h: &mut Handle, code: u16, reply: Value) -> Value {
    let (m, uri, body) = answer(h, code, reply).await;
    assert_eq!(m, Method::POST, "{uri}");
    assert_eq!(uri.path(), "/apis/batch/v1/namespaces/apps/jobs");
    assert!(
        uri.query().unwrap_or_default().contains("dryRun=All"),
        "{uri}"
    );
    body
}

const TSTATUS: &str = "/apis/serf.operator.io/v1alpha1/namespaces/apps/serfeventtriggers/t/status";

fn trigger_obj(spec: Value, status: Value) -> SerfEventTrigger {
    serde_json::from_value(json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "t", "namespace": "apps", "generation": 2, "uid": "t-uid",
                     "creationTimestamp": "2026-11-23T10:00:00Z"},
        "spec": spec, "status": status,
    }))
    .unwrap()
}

fn ok_obj() -> Value {
    json!({"apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
           "metadata": {"name": "t", "namespace": "apps"}, "spec": {"event": {"name": "x"}}})
}

fn sinks() -> (Sinks, mpsc::Receiver<StatusMsg>) {
    let (status, rx) = mpsc::channel(1024);
    let (events, mut erx) = mpsc::channel(1024);
    tokio::spawn(async move { while erx.recv().await.is_some() {} });
    (
        Sinks {
            status,
            events,
            metrics: Metrics::new(),
        },
        rx,
    )
}

fn trigger_ctx(
    client: Client,
    serf: Option<serf_client::Client>,
    leader: bool,
) -> Arc<TriggerContext> {
    let (_stx, srx) = watch::channel(serf);
    let (_ltx, lrx) = watch::channel(leader);
    // The senders may go: the receivers keep the last value.
    TriggerContext::new(client, srx, lrx, sinks().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_fires_once_per_generation_even_from_a_stale_cache() {
    let cluster = Cluster::start(vec![
        AgentConfig::new("ctl-op"),
        AgentConfig::new("ctl-other"),
    ])
    .unwrap();
    let serf = serf_client::Client::connect(ClientConfig::new(cluster[0].rpc_addr().to_string()))
        .await
        .unwrap();
    let other = serf_client::Client::connect(ClientConfig::new(cluster[1].rpc_addr().to_string()))
        .await
        .unwrap();
    let mut seen = other.stream("user:release").await.unwrap();

    let (client, mut h) = mock();
    let ctx = trigger_ctx(client, Some(serf), true);
    let t = Arc::new(trigger_obj(
        json!({"event": {"name": "release", "payload": "v2"}}),
        json!({"firedCount": 1, "lastFiredGeneration": 1}),
    ));
    let task = tokio::spawn(trigger::reconcile(t.clone(), ctx.clone()));
    let first = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    assert_eq!(
        first["status"]["firing"]["generation"], 2,
        "recorded before the send"
    );
    let second = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    assert_eq!(second["status"]["lastFiredGeneration"], 2);
    assert_eq!(second["status"]["firedCount"], 2);
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let ev = tokio::time::timeout(Duration::from_secs(10), seen.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&ev, Event::User(u) if u.payload == b"v2"),
        "{ev:?}"
    );

    // The cache has not caught up (the same object again): no second send, no request.
    let again = trigger::reconcile(t.clone(), ctx.clone()).await.unwrap();
    assert_eq!(again, Action::requeue(Duration::from_millis(500)));
    // Nor when the cache shows only the firing record: that is our own, not an interruption.
    let mid = Arc::new(trigger_obj(
        json!({"event": {"name": "release", "payload": "v2"}}),
        json!({"firedCount": 1, "lastFiredGeneration": 1, "firing": first["status"]["firing"]}),
    ));
    let again = trigger::reconcile(mid, ctx.clone()).await.unwrap();
    assert_eq!(again, Action::requeue(Duration::from_millis(500)));
    no_more_requests(&mut h).await;
    let extra = tokio::time::timeout(Duration::from_millis(500), seen.next()).await;
    assert!(extra.is_err(), "sent once: {extra:?}");

    // Once the cache shows the outcome: Ready=True is written once, then nothing.
    let fired = Arc::new(trigger_obj(
        json!({"event": {"name": "release", "payload": "v2"}}),
        json!({"firedCount": 2, "lastFiredGeneration": 2}),
    ));
    let task = tokio::spawn(trigger::reconcile(fired, ctx.clone()));
    let ready = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    let c = &ready["status"]["conditions"][0];
    assert_eq!(
        (c["type"].as_str(), c["status"].as_str()),
        (Some("Ready"), Some("True"))
    );
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let shown = Arc::new(trigger_obj(
        json!({"event": {"name": "release", "payload": "v2"}}),
        json!({"firedCount": 2, "lastFiredGeneration": 2, "conditions": [
            {"type": "Ready", "status": "True", "reason": "Valid", "message": "",
             "observedGeneration": 2, "lastTransitionTime": "2026-11-23T10:00:00Z"}]}),
    ));
    assert_eq!(
        trigger::reconcile(shown, ctx).await.unwrap(),
        Action::await_change()
    );
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn an_interrupted_firing_is_reported_not_resent() {
    let (client, mut h) = mock();
    // No agent at all: a send would fail; none is attempted.
    let ctx = trigger_ctx(client, None, true);
    let t = Arc::new(trigger_obj(
        json!({"event": {"name": "release"}}),
        json!({"firing": {"generation": 2, "started": "2026-11-23T10:00:01Z"}}),
    ));
    let task = tokio::spawn(trigger::reconcile(t, ctx));
    let patch = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    let s = &patch["status"];
    assert_eq!(s["firing"], Value::Null);
    assert_eq!(s["lastFiredGeneration"], 2);
    let c = &s["conditions"][0];
    assert_eq!(
        (
            c["type"].as_str(),
            c["status"].as_str(),
            c["reason"].as_str()
        ),
        (Some("Sent"), Some("Unknown"), Some("Interrupted"))
    );
    task.await.unwrap().unwrap();
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn an_invalid_schedule_shows_in_the_triggers_status() {
    let (client, mut h) = mock();
    let ctx = trigger_ctx(client, None, true);
    let t = Arc::new(trigger_obj(
        json!({"schedule": "not a cron", "event": {"name": "tick"}}),
        json!({}),
    ));
    let task = tokio::spawn(trigger::reconcile(t, ctx.clone()));
    let patch = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    let c = &patch["status"]["conditions"][0];
    assert_eq!(
        (
            c["type"].as_str(),
            c["status"].as_str(),
            c["reason"].as_str()
        ),
        (Some("Ready"), Some("False"), Some("InvalidSpec"))
    );
    assert!(c["message"].as_str().unwrap().contains("not a cron"), "{c}");
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());

    // Already shown: not written again.
    let shown = Arc::new(trigger_obj(
        json!({"schedule": "not a cron", "event": {"name": "tick"}}),
        json!({"conditions": [c.clone()]}),
    ));
    trigger::reconcile(shown, ctx).await.unwrap();
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn a_standby_does_nothing_and_failures_back_off() {
    let (client, mut h) = mock();
    let standby = trigger_ctx(client.clone(), None, false);
    let t = Arc::new(trigger_obj(json!({"event": {"name": "x"}}), json!({})));
    assert_eq!(
        trigger::reconcile(t.clone(), standby).await.unwrap(),
        Action::await_change()
    );
    no_more_requests(&mut h).await;

    // The leader with no agent connection: the firing is recorded, the send cannot happen,
    // the record is cleared (Retrying) and the reconcile fails; error_policy backs off.
    let ctx = trigger_ctx(client, None, true);
    let task = tokio::spawn(trigger::reconcile(t.clone(), ctx.clone()));
    expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    let cleared = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    assert_eq!(cleared["status"]["firing"], Value::Null);
    assert_eq!(cleared["status"]["conditions"][0]["reason"], "Retrying");
    let err = task.await.unwrap().unwrap_err();
    let delays: Vec<Action> = (0..8)
        .map(|_| trigger::error_policy(t.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(delays[0], Action::requeue(Duration::from_secs(2)));
    assert_eq!(delays[1], Action::requeue(Duration::from_secs(4)));
    assert_eq!(delays[7], Action::requeue(Duration::from_secs(60)));

    // A status write refused: the error says so and nothing is sent.
    let (client, mut h) = mock();
    let ctx = trigger_ctx(client, None, true);
    let task = tokio::spawn(trigger::reconcile(t, ctx));
    expect(
        &mut h,
        Method::PATCH,
        TSTATUS,
        403,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Forbidden", "code": 403, "message": "forbidden"}),
    )
    .await;
    let e = task.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Kube { .. }), "{e}");
    no_more_requests(&mut h).await;
}

const HANDLER: &str = r#"{"apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
  "metadata": {"name": "web", "namespace": "apps", "uid": "h-uid", "generation": 5},
  "spec": {"successfulJobsHistoryLimit": 1, "routes": [
    {"name": "deploy", "events": "user:deploy",
     "job": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}},
    {"name": "bad", "events": "member-joinn", "respond": {"payload": "x"}}]}}"#;

fn finished_job(name: &str, at: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "apps",
            "labels": {"serf.operator.io/handler": "web", "serf.operator.io/route": "deploy",
                       "app.kubernetes.io/managed-by": "serf-operator"}},
        "status": {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": at}]}
    }))
    .unwrap()
}

fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

#[tokio::test]
async fn a_job_template_the_api_server_refuses_makes_the_handler_not_ready() {
    let (client, mut h) = mock();
    let (status_tx, mut status_rx) = mpsc::channel(16);
    let (sinks, _records) = sinks();
    let (ltx, leader) = watch::channel(false);
    let ctx = Arc::new(HandlerContext {
        client,
        leader,
        status: status_tx,
        jobs: vec![],
        ledger: Arc::new(Mutex::new(Ledger::default())),
        call_timeout: Duration::from_secs(5),
        recheck: Duration::from_secs(3),
        serf: watch::channel(None).1,
        sinks,
        reported: Default::default(),
        validated: Default::default(),
    });
    let template = |name: &str| {
        json!({"spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": name, "image": "busybox"}]}}}})
    };
    let handler: Arc<SerfHandler> = Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
            "metadata": {"name": "web", "namespace": "apps", "uid": "h-uid", "generation": 3},
            "spec": {"routes": [
                {"name": "ok", "events": "user:deploy", "job": template("c")},
                {"name": "upper", "events": "member-failed", "job": template("Bad_Name")},
                {"name": "where", "events": "query:where", "respond": {"payload": "x"}}]}
        }))
        .unwrap(),
    );
    let errors_sent = |m: StatusMsg| match m {
        StatusMsg::Handler { errors, .. } => errors,
        other => panic!("{other:?}"),
    };

    // A standby validates its routes but asks the API server nothing.
    let r = handler::reconcile(handler.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(r, Action::await_change());
    no_more_requests(&mut h).await;
    assert!(errors_sent(status_rx.recv().await.unwrap()).is_empty());

    // The leader checks both Job routes; the API server does not answer at first (503):
    // nothing is concluded, and the check runs again in 5 s.
    ltx.send(true).unwrap();
    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    expect_dry_run(
        &mut h,
        503,
        api_status(503, "ServiceUnavailable", "etcd is down"),
    )
    .await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(5))
    );
    assert!(errors_sent(status_rx.recv().await.unwrap()).is_empty());

    // Then: one accepted, one refused with the API server's own message.
    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    expect_dry_run(&mut h, 201, json!({})).await;
    let sent = expect_dry_run(
        &mut h,
        422,
        api_status(
            422,
            "Invalid",
            "Job.batch \"serf-dry-run-abcde\" is invalid: spec.template.spec.containers[0].name: \
             Invalid value: \"Bad_Name\": a lowercase RFC 1123 label must consist of ...",
        ),
    )
    .await;
    assert_eq!(
        sent["spec"]["template"]["spec"]["containers"][0]["name"],
        "Bad_Name"
    );
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let errors = errors_sent(status_rx.recv().await.unwrap());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].route, "upper");
    assert!(
        errors[0]
            .problem
            .starts_with("the API server refuses its Job: Job.batch"),
        "{}",
        errors[0].problem
    );
    assert!(errors[0].problem.contains("Bad_Name"));

    // Checked once per generation: the next reconcile asks nothing.
    let r = handler::reconcile(handler.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(r, Action::await_change());
    no_more_requests(&mut h).await;
    assert_eq!(errors_sent(status_rx.recv().await.unwrap()).len(), 1);

    // The state writer turns it into Ready=False with that message.
    let mut book = serf_operator::status::StatusBook::default();
    book.sync_handler(&handler, &errors, "2026-12-04T02:00:00Z");
    let ready = book
        .get("apps", "web")
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidRoutes")
    );
    assert!(
        ready
            .message
            .contains("route upper: the API server refuses its Job")
    );

    // A new generation where the operator may not create Jobs: named as such.
    let mut next = (*handler).clone();
    next.metadata.generation = Some(4);
    next.spec.routes.truncate(1);
    let task = tokio::spawn(handler::reconcile(Arc::new(next), ctx.clone()));
    expect_dry_run(
        &mut h,
        403,
        api_status(
            403,
            "Forbidden",
            "jobs.batch is forbidden: User \"system:serviceaccount:serf-system:serf-operator\" cannot create resource \"jobs\"",
        ),
    )
    .await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let errors = errors_sent(status_rx.recv().await.unwrap());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].problem.starts_with(
            "the operator may not create Jobs in namespace apps: jobs.batch is forbidden"
        ),
        "{}",
        errors[0].problem
    );
}

#[tokio::test]
async fn a_handler_reports_ready_and_prunes_only_after_the_ledger_records() {
    let (client, mut h) = mock();
    let index = Arc::new(serf_operator::index::JobIndex::default());
    index.apply(watcher::Event::InitDone);
    for (n, at) in [
        ("web-deploy-old", "2026-11-23T10:00:00Z"),
        ("web-deploy-new", "2026-11-23T11:00:00Z"),
    ] {
        index.apply(watcher::Event::Apply(finished_job(n, at)));
    }
    let (status_tx, mut status_rx) = mpsc::channel(16);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (_ltx, leader) = watch::channel(true);
    let ctx = Arc::new(HandlerContext {
        client,
        leader,
        status: status_tx,
        jobs: vec![index.clone()],
        ledger: ledger.clone(),
        call_timeout: Duration::from_secs(5),
        recheck: Duration::from_secs(3),
        serf: watch::channel(None).1,
        sinks: sinks().0,
        reported: Default::default(),
        validated: Default::default(),
    });
    let handler: Arc<SerfHandler> = Arc::new(serde_json::from_str(HANDLER).unwrap());

    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    // The valid route's Job template is checked first, by a dry-run create of its Job.
    let sample = expect_dry_run(
        &mut h,
        201,
        json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "serf-dry-run-x7k2p", "namespace": "apps"}}),
    )
    .await;
    assert_eq!(sample["metadata"]["generateName"], "serf-dry-run-");
    assert_eq!(
        sample["metadata"]["labels"]["serf.operator.io/route"], "deploy",
        "{sample}"
    );
    // Then the ledger is read: one list of the handler's ConfigMaps, of which only its
    // segments count.
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/namespaces/apps/configmaps");
    let query = req.uri().query().unwrap_or_default().replace("%2C", ",");
    assert!(
        query.contains("serf.operator.io%2Fhandler%3Dweb")
            || query.contains("serf.operator.io/handler=web"),
        "{query}"
    );
    let segment = |name: &str, seq: &str, text: &str| {
        json!({"metadata": {"name": name, "namespace": "apps",
                            "annotations": {"serf.operator.io/ledger-sequence": seq}},
               "data": {"launched": text}})
    };
    send.send_response(
        Response::builder()
            .body(Body::from(
                serde_json::to_vec(&json!({
                    "kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
                    "items": [
                        segment("web-serf-launched-1", "1", "web-deploy-earlier 1800000000\n"),
                        segment("web-settings", "7", "web-deploy-not-a-segment 1800000000\n"),
                    ]
                }))
                .unwrap(),
            ))
            .unwrap(),
    );
    // Not deleted yet: the old Job is recorded first, and looked at again later.
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(3))
    );
    no_more_requests(&mut h).await;
    match status_rx.recv().await.unwrap() {
        StatusMsg::Handler { handler, errors } => {
            assert_eq!(handler.metadata.generation, Some(5));
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].route, "bad");
        }
        other => panic!("{other:?}"),
    }
    {
        let l = ledger.lock().unwrap();
        let r = serf_operator::jobs::HandlerRef::of(&handler);
        assert!(l.contains(&r, "web-deploy-old"));
        assert!(!l.is_recorded(&r, "web-deploy-old"), "not written yet");
        assert!(l.contains(&r, "web-deploy-earlier"));
        assert!(!l.contains(&r, "web-deploy-not-a-segment"));
    }
    // The state writer writes the ledger; the next reconcile deletes the Job.
    let written = ledger.lock().unwrap().take_changes(1_800_000_000);
    {
        // Taken to be written, not written yet: still not deleted.
        let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
        assert_eq!(
            task.await.unwrap().unwrap(),
            Action::requeue(Duration::from_secs(3))
        );
        no_more_requests(&mut h).await;
    }
    ledger
        .lock()
        .unwrap()
        .finished(&written[0].0, &written[0].1, None);
    let segment = &written[0].1.write[0];
    assert_eq!(
        (segment.slot, segment.seq),
        (1, Some(1)),
        "the newest segment, added to"
    );
    assert!(segment.text.contains("web-deploy-old") && segment.text.contains("web-deploy-earlier"));
    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    let del = expect(
        &mut h,
        Method::DELETE,
        "/apis/batch/v1/namespaces/apps/jobs/web-deploy-old",
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
    )
    .await;
    assert_eq!(del["propagationPolicy"], "Background");
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    no_more_requests(&mut h).await;

    // The state writer turns the message into Ready=False naming the bad route.
    let mut book = serf_operator::status::StatusBook::default();
    let errors = serf_operator::engine::Router::new(std::slice::from_ref(&*handler))
        .errors()
        .cloned()
        .collect::<Vec<_>>();
    book.sync_handler(&handler, &errors, "2026-11-23T12:00:00Z");
    let s = book.get("apps", "web").unwrap();
    assert_eq!(s.observed_generation, Some(5));
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("route bad"), "{}", ready.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_its_latest_tick_once_and_requeues_for_the_next() {
    let cluster = Cluster::start(vec![AgentConfig::new("ctl-tick")]).unwrap();
    let serf = serf_client::Client::connect(ClientConfig::new(cluster[0].rpc_addr().to_string()))
        .await
        .unwrap();
    let (client, mut h) = mock();
    let ctx = trigger_ctx(client, Some(serf), true);
    // Every minute; the last tick handled is long past: the latest tick fires, once.
    let spec = json!({"schedule": "* * * * *", "event": {"name": "tick"}});
    let t = Arc::new(trigger_obj(
        spec.clone(),
        json!({"lastScheduleTime": "2026-11-23T10:00:00Z", "lastFiredGeneration": 2}),
    ));
    let task = tokio::spawn(trigger::reconcile(t.clone(), ctx.clone()));
    let first = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    let tick = first["status"]["firing"]["tick"]
        .as_str()
        .unwrap()
        .to_string();
    let tick_at: jiff::Timestamp = tick.parse().unwrap();
    let age = jiff::Timestamp::now().as_second() - tick_at.as_second();
    assert!(
        (0..=60).contains(&age),
        "the latest tick, not a missed one: {tick}"
    );
    let second = expect(&mut h, Method::PATCH, TSTATUS, 200, ok_obj()).await;
    assert_eq!(second["status"]["lastScheduleTime"], tick.as_str());
    let action = task.await.unwrap().unwrap();
    // Requeued for the next tick (within a minute), not left to wait for a change.
    assert_ne!(action, Action::await_change());
    let until_next = 60 - age;
    assert!(
        format!("{action:?}").contains("requeue_after: Some"),
        "{action:?} (next tick in about {until_next} s)"
    );
    // The same tick from a stale cache: not fired again.
    assert_eq!(
        trigger::reconcile(t, ctx).await.unwrap(),
        Action::requeue(Duration::from_millis(500))
    );
    no_more_requests(&mut h).await;
}

/// A route's `report`: each finished Job's outcome goes into Serf once, recorded on the Job
/// before the send; a Job found recorded but not sent (an earlier leader stopped between)
/// is `Interrupted` and not sent; an unfinished Job waits. Then the same reconcile from a
/// stale cache sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_outcomes_are_reported_into_serf_once() {
    let cluster = Cluster::start(vec![AgentConfig::new("report-1")]).unwrap();
    let addr = cluster[0].rpc_addr().to_string();
    let op = serf_client::Client::connect(ClientConfig::new(addr.clone()))
        .await
        .unwrap();
    let listener = serf_client::Client::connect(ClientConfig::new(addr))
        .await
        .unwrap();
    let mut seen = listener.stream("user").await.unwrap();

    let (client, mut h) = mock();
    let index = Arc::new(serf_operator::index::JobIndex::default());
    index.apply(watcher::Event::InitDone);
    let job = |name: &str, annotation: &str, condition: Option<(&str, &str)>| -> Job {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "apps",
                "annotations": {"serf.operator.io/report": annotation},
                "labels": {"serf.operator.io/handler": "web", "serf.operator.io/route": "deploy",
                           "app.kubernetes.io/managed-by": "serf-operator"}},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x",
                "env": [{"name": "SERF_USER_EVENT", "value": "deploy"},
                        {"name": "SERF_PAYLOAD", "value": "v1.2.3"}]}]}}},
            "status": {"conditions": condition.map(|(t, r)| vec![json!({"type": t, "status": "True", "reason": r,
                "lastTransitionTime": "2026-11-23T10:00:00Z"})]).unwrap_or_default()}
        }))
        .unwrap()
    };
    for j in [
        job("web-deploy-ok", "pending", Some(("Complete", ""))),
        job(
            "web-deploy-cut",
            "sending",
            Some(("Failed", "BackoffLimitExceeded")),
        ),
        job("web-deploy-running", "pending", None),
    ] {
        index.apply(watcher::Event::Apply(j));
    }
    let (status_tx, _status_rx) = mpsc::channel(16);
    let (sinks, mut records) = sinks();
    let metrics = sinks.metrics.clone();
    let (_ltx, leader) = watch::channel(true);
    let ctx = Arc::new(HandlerContext {
        client,
        leader,
        status: status_tx,
        jobs: vec![index.clone()],
        ledger: Arc::new(Mutex::new(Ledger::default())),
        call_timeout: Duration::from_secs(5),
        recheck: Duration::from_secs(3),
        serf: watch::channel(Some(op)).1,
        sinks,
        reported: Default::default(),
        validated: Default::default(),
    });
    let handler: Arc<SerfHandler> = Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
            "metadata": {"name": "web", "namespace": "apps", "uid": "h-uid", "generation": 1},
            "spec": {"routes": [{"name": "deploy", "events": "user:deploy",
                "report": {"event": "deploy-done",
                           "payload": "$(JOB_NAME) $(JOB_OUTCOME) $(JOB_REASON) for $(SERF_USER_EVENT) $(SERF_PAYLOAD)"},
                "job": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox"}]}}}}}]}
        }))
        .unwrap(),
    );

    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    let sample = expect_dry_run(&mut h, 201, json!({})).await;
    // The sample carries what a reporting route's Jobs carry.
    assert_eq!(
        sample["metadata"]["annotations"]["serf.operator.io/report"],
        "pending"
    );
    // Answer every annotation patch; collect them by Job.
    let mut patches: Vec<(String, String)> = Vec::new();
    while patches.len() < 3 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
            .await
            .expect("a Job annotation patch")
            .expect("service not called");
        assert_eq!(req.method(), Method::PATCH);
        let name = req.uri().path().rsplit('/').next().unwrap().to_string();
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        let value = body["metadata"]["annotations"]["serf.operator.io/report"]
            .as_str()
            .unwrap()
            .to_string();
        patches.push((name.clone(), value));
        let reply = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "apps"}});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }
    task.await.unwrap().unwrap();
    no_more_requests(&mut h).await;
    patches.sort();
    assert_eq!(
        patches,
        [
            ("web-deploy-cut".to_string(), "Interrupted".to_string()),
            ("web-deploy-ok".to_string(), "Sent".to_string()),
            ("web-deploy-ok".to_string(), "sending".to_string()),
        ]
    );
    // Exactly one Serf event: the finished Job's outcome.
    let ev = tokio::time::timeout(Duration::from_secs(10), seen.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        Event::User(u) => {
            assert_eq!(u.name, "deploy-done");
            assert_eq!(
                String::from_utf8(u.payload).unwrap(),
                "web-deploy-ok Succeeded  for deploy v1.2.3"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut results = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), records.recv()).await {
        if let StatusMsg::Route {
            what: serf_operator::status::RouteEvent::Reported { job, result, .. },
            ..
        } = m
        {
            results.push((job, result));
        }
    }
    results.sort();
    assert_eq!(
        results,
        [
            ("web-deploy-cut".to_string(), "Interrupted".to_string()),
            ("web-deploy-ok".to_string(), "Sent".to_string())
        ]
    );
    let sent = metrics
        .reports
        .get_or_create(&serf_operator::metrics::ResultLabel {
            result: "Sent".into(),
        })
        .get();
    assert_eq!(sent, 1);

    // The same reconcile again, from the stale cache (still `pending` / `sending`): this
    // process sent them, so it writes the results again and sends nothing.
    let task = tokio::spawn(handler::reconcile(handler.clone(), ctx.clone()));
    let mut again = Vec::new();
    while again.len() < 2 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
            .await
            .unwrap()
            .unwrap();
        let name = req.uri().path().rsplit('/').next().unwrap().to_string();
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        again.push((
            name.clone(),
            body["metadata"]["annotations"]["serf.operator.io/report"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
        let reply = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "apps"}});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }
    task.await.unwrap().unwrap();
    again.sort();
    assert_eq!(
        again,
        [
            ("web-deploy-cut".to_string(), "Interrupted".to_string()),
            ("web-deploy-ok".to_string(), "Sent".to_string()),
        ]
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), seen.next())
            .await
            .is_err(),
        "nothing sent twice"
    );
}

#[tokio::test]
async fn the_state_writer_reads_a_ledger_before_writing_it_and_writes_only_what_changed() {
    let (client, mut h) = mock();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let cfg = serf_operator::state::StateConfig {
        namespace: "serf-system".into(),
        interval: Duration::from_secs(1),
        call_timeout: Duration::from_secs(5),
    };
    let mut writer = serf_operator::state::StateWriter::new(
        client,
        cfg,
        ledger.clone(),
        Default::default(),
        None,
    );
    let web = serf_operator::jobs::HandlerRef {
        namespace: "apps".into(),
        name: "web".into(),
        uid: None,
    };
    // A launch recorded while the ledger could not be read.
    ledger
        .lock()
        .unwrap()
        .record(&web, "web-deploy-new", 1_800_000_000);

    let flush = tokio::spawn(async move {
        let ok = writer.flush(true).await;
        (writer, ok)
    });
    // Read first: the stored segment 0 is full, so the launch starts segment 1.
    let full: String = (0..serf_operator::ledger::SEGMENT_ENTRIES)
        .map(|i| format!("web-deploy-{i:05} 1799999000\n"))
        .collect();
    expect(
        &mut h,
        Method::GET,
        "/api/v1/namespaces/apps/configmaps",
        200,
        json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
               "items": [{"metadata": {"name": "web-serf-launched", "namespace": "apps",
                          "annotations": {"serf.operator.io/ledger-sequence": "0"}},
                          "data": {"launched": full}}]}),
    )
    .await;
    // Only segment 1 is written, with its sequence; the API server refuses it once.
    let body = expect(
        &mut h,
        Method::PATCH,
        "/api/v1/namespaces/apps/configmaps/web-serf-launched-1",
        500,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "InternalError", "code": 500, "message": "etcd went away"}),
    )
    .await;
    assert_eq!(
        body["metadata"]["annotations"]["serf.operator.io/ledger-sequence"],
        "1"
    );
    assert_eq!(body["data"]["launched"], "web-deploy-new 1800000000\n");
    assert_eq!(
        body["metadata"]["labels"]["serf.operator.io/handler"],
        "web"
    );
    let (mut writer, ok) = flush.await.unwrap();
    assert!(ok);
    no_more_requests(&mut h).await;
    assert!(!ledger.lock().unwrap().is_recorded(&web, "web-deploy-new"));
    assert!(ledger.lock().unwrap().is_recorded(&web, "web-deploy-00000"));

    // The next flush writes it again (no second read), and then it counts as recorded.
    let flush = tokio::spawn(async move { writer.flush(true).await });
    let again = expect(
        &mut h,
        Method::PATCH,
        "/api/v1/namespaces/apps/configmaps/web-serf-launched-1",
        200,
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "web-serf-launched-1"}}),
    )
    .await;
    assert_eq!(again, body);
    assert!(flush.await.unwrap());
    no_more_requests(&mut h).await;
    assert!(ledger.lock().unwrap().is_recorded(&web, "web-deploy-new"));
}
