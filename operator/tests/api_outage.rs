//! The event path while the API server is away, against a real Serf agent and a mock API
//! server (tower-test) that first hangs (connections open, no answer), then refuses
//! (transport errors), then comes back: queries are answered inline throughout, user events
//! keep being routed, and once the API server is back every Job is created exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_client::{ClientConfig, QueryParams, Subscription, SubscriptionConfig};
use serf_operator::dispatch::{Control, Dispatcher, Input};
use serf_operator::effects::{KubeEffects, LaunchPool, PendingLaunch, Sinks};
use serf_operator::engine::{Membership, NoActiveJobs};
use serf_operator::launcher::RetryPolicy;
use serf_operator::manifests::parse_handlers;
use serf_operator::metrics::Metrics;
use serf_operator::state::StatusMsg;
use serf_operator::status::RouteEvent;
use serf_testkit::{Agent, AgentConfig};
use tokio::sync::{mpsc, watch};

const HANDLERS: &str = r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: web, namespace: apps, uid: u1}
spec:
  routes:
    - name: deploy
      events: user:deploy
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
    - name: where
      events: query:where
      respond: {payload: "$(SERF_SELF_NAME) answers"}
"#;

const HANG: u8 = 0;
const REFUSE: u8 = 1;
const UP: u8 = 2;

/// The mock API server: behaves as `phase` says; counts Job creates per name.
fn api_server(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    phase: Arc<AtomicU8>,
    created: Arc<Mutex<BTreeMap<String, u32>>>,
) {
    tokio::spawn(async move {
        let mut hung = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            match phase.load(Ordering::SeqCst) {
                HANG => hung.push(send),
                REFUSE => send.send_error(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                )),
                _ => {
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let body = req.into_body().collect_bytes().await.unwrap();
                    let (code, reply) = if method == Method::POST && path.ends_with("/jobs") {
                        let job: Value = serde_json::from_slice(&body).unwrap();
                        let name = job["metadata"]["name"].as_str().unwrap().to_string();
                        let mut c = created.lock().unwrap();
                        let n = c.entry(name.clone()).or_default();
                        *n += 1;
                        if *n == 1 {
                            let mut j = job.clone();
                            j["metadata"]["uid"] = json!(format!("uid-{name}"));
                            (201, j)
                        } else {
                            (
                                409,
                                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                            )
                        }
                    } else if method == Method::POST {
                        (201, serde_json::from_slice(&body).unwrap_or(json!({})))
                    } else {
                        (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                        )
                    };
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                            .unwrap(),
                    );
                }
            }
        }
        drop(hung);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answered_and_no_job_lost_while_the_api_server_is_away() {
    let agent = Agent::start(AgentConfig::new("outage-op").tag("role", "web"), &[]).unwrap();
    let asker_agent = Agent::start(AgentConfig::new("outage-asker"), &[agent.bind_addr()]).unwrap();
    agent
        .wait_for(Duration::from_secs(10), "2 members", |ms| ms.len() == 2)
        .unwrap();

    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let phase = Arc::new(AtomicU8::new(HANG));
    let created = Arc::new(Mutex::new(BTreeMap::new()));
    api_server(handle, phase.clone(), created.clone());

    let metrics = Metrics::new();
    let (status_tx, mut status_rx) = mpsc::channel::<StatusMsg>(4096);
    let (events_tx, mut events_rx) = mpsc::channel(4096);
    tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    let sinks = Sinks {
        status: status_tx,
        events: events_tx,
        metrics: metrics.clone(),
    };
    let policy = RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        deadline: Duration::from_secs(120),
        call_timeout: Duration::from_millis(300),
    };
    let (launch_tx, launch_rx) = mpsc::channel::<PendingLaunch>(1024);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let pool = LaunchPool::new(client.clone(), policy, 4, Arc::default(), sinks.clone());
    let pool_task = tokio::spawn(pool.run(launch_rx, stop_rx));

    let (input_tx, input_rx) = mpsc::channel::<Input>(1024);
    let (control_tx, control_rx) = mpsc::channel::<Control>(4);
    let (serf_tx, _serf_rx) = watch::channel(None);
    let sub = Subscription::start(SubscriptionConfig::new(
        ClientConfig::new(agent.rpc_addr().to_string()),
        "*",
    ))
    .unwrap();
    tokio::spawn(serf_operator::run::read_serf(
        sub,
        input_tx,
        sinks.clone(),
        serf_tx,
    ));
    let d = Dispatcher::new(
        Membership::default(),
        ("op".into(), "ns".into()),
        true,
        Box::new(NoActiveJobs),
        KubeEffects {
            sinks: sinks.clone(),
            launches: launch_tx,
            record: Default::default(),
            connected_before: false,
            serf: None,
        },
    );
    control_tx
        .send(Control::Handlers(
            parse_handlers(HANDLERS, Path::new("h.yaml"))
                .unwrap()
                .into_iter()
                .map(Arc::new)
                .collect(),
        ))
        .await
        .unwrap();
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let dispatcher = tokio::spawn(d.run(input_rx, control_rx, async move {
        let _ = shutdown_rx.wait_for(|s| *s).await;
    }));

    let asker = serf_client::Client::connect(ClientConfig::new(asker_agent.rpc_addr().to_string()))
        .await
        .unwrap();
    let ask = || async {
        let mut q = QueryParams::new("where", Vec::new());
        q.timeout = Some(Duration::from_secs(2));
        asker.query(&q).await.unwrap().collect().await.unwrap()
    };
    // Wait until the operator follows the agent (its answer arrives).
    let mut answered = false;
    for _ in 0..20 {
        if !ask().await.responses.is_empty() {
            answered = true;
            break;
        }
    }
    assert!(answered, "the operator never answered");

    let mut sent = 0;
    for (p, label) in [(HANG, "hanging"), (REFUSE, "refusing connections")] {
        phase.store(p, Ordering::SeqCst);
        for _ in 0..3 {
            sent += 1;
            asker
                .event("deploy", format!("v{sent}").as_bytes(), false)
                .await
                .unwrap();
            let out = ask().await;
            assert_eq!(
                out.responses,
                vec![("outage-op".to_string(), b"outage-op answers".to_vec())],
                "the query is answered while the API server is {label}"
            );
        }
        assert!(
            created.lock().unwrap().is_empty(),
            "nothing can be created while the API server is {label}"
        );
    }

    // The API server comes back: every Job is created, exactly once.
    phase.store(UP, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut launched = Vec::new();
    while launched.len() < sent {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let msg = tokio::time::timeout(left, status_rx.recv())
            .await
            .expect("all Jobs recorded within 30 s")
            .unwrap();
        if let StatusMsg::Route {
            what: RouteEvent::Launched { job },
            ..
        } = msg
        {
            launched.push(job);
        }
    }
    let c = created.lock().unwrap().clone();
    assert_eq!(c.len(), sent, "one Job per event: {c:?}");
    assert!(
        c.values().all(|n| *n == 1),
        "each created exactly once: {c:?}"
    );
    let text = metrics.render();
    assert!(!text.contains("reason=\"launch_deadline\""), "{text}");

    shutdown_tx.send(true).unwrap();
    dispatcher.await.unwrap();
    assert!(pool_task.await.unwrap().is_empty(), "nothing left over");
}

#[tokio::test]
async fn a_create_still_in_flight_at_shutdown_is_handed_over_and_taken_back() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (status_tx, _status_rx) = mpsc::channel::<StatusMsg>(64);
    let (events_tx, _events_rx) = mpsc::channel(64);
    let sinks = Sinks {
        status: status_tx,
        events: events_tx,
        metrics: Metrics::new(),
    };
    let policy = RetryPolicy {
        call_timeout: Duration::from_secs(30),
        ..RetryPolicy::default()
    };
    let (launch_tx, launch_rx) = mpsc::channel::<PendingLaunch>(8);
    let (stop_tx, stop_rx) = watch::channel(false);
    let pool = LaunchPool::new(client.clone(), policy, 2, Arc::default(), sinks);
    let pool_task = tokio::spawn(pool.run(launch_rx, stop_rx));

    // A launch whose create the API server never answers.
    let hs = parse_handlers(HANDLERS, Path::new("h.yaml")).unwrap();
    let mut engine = serf_operator::engine::Engine::new(&hs, Membership::default());
    let node = serf_operator::contract::SelfNode {
        name: "n".into(),
        tags: Default::default(),
    };
    let outcome = engine.route(
        &serf_client::Event::User(serf_client::UserEvent {
            ltime: 9,
            name: "deploy".into(),
            payload: b"v9".to_vec(),
            coalesce: false,
        }),
        &serf_operator::engine::Context {
            node: &node,
            pod: ("", ""),
            active: &NoActiveJobs,
            now: std::time::SystemTime::now(),
            replayed: false,
        },
    );
    let Some(serf_operator::engine::Action::Launch(launch)) = outcome.actions.into_iter().next()
    else {
        panic!("no launch")
    };
    let name = launch.job.metadata.name.clone().unwrap();
    launch_tx
        .send(PendingLaunch {
            launch: launch.clone(),
            event: "user:deploy@9".into(),
            received: std::time::Instant::now(),
            answer: None,
        })
        .await
        .unwrap();
    // The ledger read, then the create: both hang.
    let _held = handle.next_request().await.unwrap();
    drop(launch_tx);
    // (the ledger read times out only after 30 s: the grace period ends first)
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(true).unwrap();
    let left = tokio::time::timeout(Duration::from_secs(5), pool_task)
        .await
        .expect("the pool stops at the end of the grace period")
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].launch.job.metadata.name.as_deref(),
        Some(name.as_str())
    );

    // Handed over: one apply of the pending ConfigMap holding the whole launch.
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            serf_operator::state::hand_over(&client, "serf-system", left, Duration::from_secs(5))
                .await
        }
    });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/serf-system/configmaps/serf-operator-pending-launches"
    );
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    assert!(task.await.unwrap().is_empty(), "nothing dropped");

    // The next start takes it back, exactly as it was, and deletes the record.
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            serf_operator::state::take_over(&client, "serf-system", Duration::from_secs(5)).await
        }
    });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.method(), Method::GET);
    let mut cm = body.clone();
    cm["metadata"]["resourceVersion"] = json!("1");
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&cm).unwrap()))
            .unwrap(),
    );
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.method(), Method::DELETE);
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(
                serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200})).unwrap(),
            ))
            .unwrap(),
    );
    let back = task.await.unwrap().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].0, *launch);
    assert_eq!(back[0].1, "user:deploy@9");
}
