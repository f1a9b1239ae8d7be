//! A query taken by a `job` route is answered with the Job's output, as Serf answers with
//! a handler's: a real Serf agent delivers the query and carries the answer back to the
//! node that asked; the Job's Pod and its log come from a mock API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_client::{ClientConfig, Event, QueryParams, QueryRecord};
use serf_operator::answer::{PendingAnswer, answer_with_output};
use serf_operator::contract::SelfNode;
use serf_operator::effects::Sinks;
use serf_operator::engine::{Action, Context, Engine, Launch, Membership, NoActiveJobs};
use serf_operator::manifests::parse_handlers;
use serf_operator::metrics::Metrics;
use serf_operator::state::StatusMsg;
use serf_operator::status::RouteEvent;
use serf_testkit::{AgentConfig, Cluster};
use tokio::sync::mpsc;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const HANDLER: &str = r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: q, namespace: ops, uid: u1}
spec:
  routes:
    - name: load
      events: query:load
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: probe, image: busybox}]}}}}
"#;

fn pod(name: &str, phase: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ops", "resourceVersion": "7"},
        "spec": {"containers": [{"name": "probe", "image": "busybox"}]},
        "status": {"phase": phase}})
}

/// Serves the watcher's list (the Pod still running) and its watch (the Pod finished),
/// then the log request; returns the log request's query string.
async fn serve_pod_and_log(h: &mut Handle, job: &str, log: &'static [u8]) -> String {
    loop {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
            .await
            .expect("a request")
            .expect("service not called");
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        assert_eq!(req.method(), Method::GET);
        if path == "/api/v1/namespaces/ops/pods" && !query.contains("watch=true") {
            assert!(
                query.contains(&format!("labelSelector=job-name%3D{job}")),
                "{query}"
            );
            let list = json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "7"}, "items": [pod("p-1", "Running")]});
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&list).unwrap()))
                    .unwrap(),
            );
        } else if path == "/api/v1/namespaces/ops/pods" {
            let mut done = pod("p-1", "Succeeded");
            done["metadata"]["resourceVersion"] = json!("8");
            let line = format!("{}\n", json!({"type": "MODIFIED", "object": done}));
            send.send_response(
                Response::builder()
                    .body(Body::from(line.into_bytes()))
                    .unwrap(),
            );
        } else if path == "/api/v1/namespaces/ops/pods/p-1/log" {
            send.send_response(Response::builder().body(Body::from(log.to_vec())).unwrap());
            return query;
        } else {
            panic!("unexpected request {path}?{query}");
        }
    }
}

struct Setup {
    _cluster: Cluster,
    asker: serf_client::Client,
    op: serf_client::Client,
    stream: serf_client::EventStream,
}

async fn setup() -> Setup {
    let cluster = Cluster::start(vec![AgentConfig::new("answer-1")]).unwrap();
    let addr = cluster[0].rpc_addr().to_string();
    let op = serf_client::Client::connect(ClientConfig::new(addr.clone()))
        .await
        .unwrap();
    let asker = serf_client::Client::connect(ClientConfig::new(addr))
        .await
        .unwrap();
    let stream = op.stream("query").await.unwrap();
    Setup {
        _cluster: cluster,
        asker,
        op,
        stream,
    }
}

/// Routes the query the operator's connection received; returns the launch and its event.
async fn launch_for_next_query(s: &mut Setup) -> (Box<Launch>, String) {
    let ev = tokio::time::timeout(Duration::from_secs(10), s.stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::Query(_)), "{ev:?}");
    let handlers = parse_handlers(HANDLER, Path::new("h.yaml")).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let outcome = engine.route(
        &ev,
        &Context {
            node: &SelfNode::default(),
            pod: ("", ""),
            active: &NoActiveJobs,
            now: SystemTime::now(),
            replayed: false,
        },
    );
    let [Action::Launch(l)] = &outcome.actions[..] else {
        panic!("{outcome:?}")
    };
    assert!(l.answer_query.is_some(), "waits for the Job's output");
    (l.clone(), outcome.event)
}

fn sinks() -> (Sinks, mpsc::Receiver<StatusMsg>) {
    let (status, status_rx) = mpsc::channel(16);
    let (events, mut events_rx) = mpsc::channel(16);
    tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    (
        Sinks {
            status,
            events,
            metrics: Metrics::new(),
        },
        status_rx,
    )
}

async fn route_record(rx: &mut mpsc::Receiver<StatusMsg>) -> RouteEvent {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if let StatusMsg::Route { what, .. } = msg {
            return what;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_with_the_jobs_output() {
    let mut s = setup().await;
    let mut params = QueryParams::new("load", b"5m".to_vec());
    params.timeout = Some(Duration::from_secs(10));
    let mut answers = s.asker.query(&params).await.unwrap();
    let (launch, event) = launch_for_next_query(&mut s).await;
    let job = launch.job.metadata.name.clone().unwrap();
    let query_id = launch.answer_query.unwrap();

    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (sinks, mut status) = sinks();
    let metrics = sinks.metrics.clone();
    let task = tokio::spawn(answer_with_output(
        Client::new(svc, "default"),
        sinks,
        launch,
        event,
        PendingAnswer {
            query_id,
            serf: s.op.clone(),
        },
        Duration::from_secs(5),
    ));
    // stdout and stderr as the container wrote them, invalid UTF-8 included.
    let log_query = serve_pod_and_log(&mut h, &job, b"load 0.42\nwarning: \xff slow\n").await;
    assert!(log_query.contains("container=probe"), "{log_query}");
    assert!(log_query.contains("limitBytes=1000"), "{log_query}");
    task.await.unwrap();

    let mut got = None;
    while let Some(rec) = tokio::time::timeout(Duration::from_secs(15), answers.next())
        .await
        .unwrap()
    {
        if let QueryRecord::Response { from, payload } = rec.unwrap() {
            got = Some((from, payload));
        }
    }
    assert_eq!(
        got,
        Some((
            "answer-1".to_string(),
            b"load 0.42\nwarning: \xff slow\n".to_vec()
        ))
    );
    assert_eq!(route_record(&mut status).await, RouteEvent::Answered);
    assert_eq!(metrics.queries_answered.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_or_a_passed_deadline_is_reported_not_answered() {
    let mut s = setup().await;
    // A Job that writes nothing: no answer, as under Serf.
    let mut params = QueryParams::new("load", Vec::new());
    params.timeout = Some(Duration::from_secs(10));
    let _answers = s.asker.query(&params).await.unwrap();
    let (launch, event) = launch_for_next_query(&mut s).await;
    let job = launch.job.metadata.name.clone().unwrap();
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (sinks, mut status) = sinks();
    let task = tokio::spawn(answer_with_output(
        Client::new(svc, "default"),
        sinks.clone(),
        launch,
        event,
        PendingAnswer {
            query_id: 1,
            serf: s.op.clone(),
        },
        Duration::from_secs(5),
    ));
    serve_pod_and_log(&mut h, &job, b"").await;
    task.await.unwrap();
    match route_record(&mut status).await {
        RouteEvent::Skipped { reason, message } => {
            assert_eq!(reason, "AnswerFailed");
            assert!(message.contains("wrote no output"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // A Job slower than the query's deadline: the agent refuses, and the route says why.
    let mut params = QueryParams::new("load", b"x".to_vec());
    params.timeout = Some(Duration::from_millis(300));
    let _answers = s.asker.query(&params).await.unwrap();
    let (launch, event) = launch_for_next_query(&mut s).await;
    let job = launch.job.metadata.name.clone().unwrap();
    let query_id = launch.answer_query.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(answer_with_output(
        Client::new(svc, "default"),
        sinks,
        launch,
        event,
        PendingAnswer {
            query_id,
            serf: s.op.clone(),
        },
        Duration::from_secs(5),
    ));
    serve_pod_and_log(&mut h, &job, b"too late\n").await;
    task.await.unwrap();
    match route_record(&mut status).await {
        RouteEvent::Skipped { reason, message } => {
            assert_eq!(reason, "AnswerFailed");
            assert!(message.contains("deadline passed"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
