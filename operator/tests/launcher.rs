//! Job creation against a mock API server (tower-test): the exact request bodies, 409 as
//! "already launched", retries on 500, final 4xx, and Replace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_client::{Event, UserEvent};
use serf_operator::contract::SelfNode;
use serf_operator::engine::{Action, Context, Engine, Launch, Membership};
use serf_operator::launcher::{LaunchResult, Launcher, RetryPolicy};
use serf_operator::manifests::parse_handlers;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
        deadline: Duration::from_secs(30),
        call_timeout: Duration::from_secs(2),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Expects one request, checks it, answers it; returns the request body.
async fn expect(handle: &mut Handle, method: Method, path: &str, code: u16, reply: Value) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .expect("service not called");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let body = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    }
}

async fn no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(
        next.is_err() || next.unwrap().is_none(),
        "unexpected extra request"
    );
}

fn launch(policy: &str) -> Launch {
    launch_with(policy, b"v1.2.3")
}

fn launch_with(policy: &str, payload: &[u8]) -> Launch {
    let yaml = format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: web, namespace: apps, uid: h-uid-1}}
spec:
  routes:
    - name: deploy
      events: user:deploy
      concurrencyPolicy: {policy}
      job:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers: [{{name: c, image: busybox, args: ["$(SERF_PAYLOAD)"]}}]
"#
    );
    let handlers = parse_handlers(&yaml, Path::new("t.yaml")).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let node = SelfNode {
        name: "n1".into(),
        tags: [("role".to_string(), "web".to_string())].into(),
    };
    let mut active = std::collections::BTreeMap::new();
    active.insert(
        ("apps".to_string(), "web".to_string(), "deploy".to_string()),
        vec!["web-deploy-old".to_string()],
    );
    let outcome = engine.route(
        &Event::User(UserEvent {
            ltime: 42,
            name: "deploy".into(),
            payload: payload.to_vec(),
            coalesce: false,
        }),
        &Context {
            node: &node,
            pod: ("", ""),
            active: &active,
            now: SystemTime::UNIX_EPOCH,
            replayed: false,
        },
    );
    match outcome.actions.into_iter().next() {
        Some(Action::Launch(l)) => *l,
        other => panic!("{other:?}"),
    }
}

const JOBS: &str = "/apis/batch/v1/namespaces/apps/jobs";
const SECRETS: &str = "/api/v1/namespaces/apps/secrets";

#[tokio::test]
async fn one_create_makes_the_job_with_its_stdin() {
    let (client, mut h) = mock();
    let l = launch("Allow");
    assert!(l.stdin.is_none(), "text stdin needs no Secret");
    let name = l.job.metadata.name.clone().unwrap();
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    let mut created = serde_json::to_value(&l.job).unwrap();
    created["metadata"]["uid"] = json!("job-uid-7");
    let body = expect(&mut h, Method::POST, JOBS, 201, created).await;
    // The exact body: the engine's Job, nothing added or lost on the way.
    assert_eq!(body, serde_json::to_value(&l.job).unwrap());
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "h-uid-1");
    assert_eq!(
        body["metadata"]["ownerReferences"][0]["kind"],
        "SerfHandler"
    );
    let env = &body["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .contains(&json!({"name": "SERF_PAYLOAD", "value": "v1.2.3"}))
    );
    assert_eq!(
        body["spec"]["template"]["metadata"]["annotations"]["serf.operator.io/stdin"],
        "v1.2.3\n"
    );
    assert_eq!(task.await.unwrap(), LaunchResult::Created { name });
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn binary_stdin_gets_its_secret_before_the_job_and_then_the_job_owns_it() {
    let (client, mut h) = mock();
    let l = launch_with("Allow", &[0xff, 0x00, b'x']);
    let name = l.job.metadata.name.clone().unwrap();
    let task = tokio::spawn({
        let l = l.clone();
        let client = client.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    let secret = expect(&mut h, Method::POST, SECRETS, 201, json!({})).await;
    assert_eq!(secret["metadata"]["name"], name.as_str());
    assert_eq!(secret["data"]["stdin"], "/wB4Cg==");
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "SerfHandler"
    );
    let mut created = serde_json::to_value(&l.job).unwrap();
    created["metadata"]["uid"] = json!("job-uid-8");
    let job = expect(&mut h, Method::POST, JOBS, 201, created).await;
    assert_eq!(
        job["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        name.as_str()
    );
    let owner = expect(
        &mut h,
        Method::PATCH,
        &format!("{SECRETS}/{name}"),
        200,
        json!({}),
    )
    .await;
    assert_eq!(owner["metadata"]["ownerReferences"][0]["uid"], "job-uid-8");
    assert_eq!(owner["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(
        task.await.unwrap(),
        LaunchResult::Created { name: name.clone() }
    );
    no_more_requests(&mut h).await;

    // A Job refused for good: its Secret is not left behind.
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    expect(&mut h, Method::POST, SECRETS, 201, json!({})).await;
    expect(
        &mut h,
        Method::POST,
        JOBS,
        422,
        status(422, "Invalid", "bad"),
    )
    .await;
    expect(
        &mut h,
        Method::DELETE,
        &format!("{SECRETS}/{name}"),
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
    )
    .await;
    assert!(matches!(
        task.await.unwrap(),
        LaunchResult::Failed {
            code: Some(422),
            ..
        }
    ));
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn conflict_means_already_launched() {
    let (client, mut h) = mock();
    let l = launch("Allow");
    let name = l.job.metadata.name.clone().unwrap();
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    expect(
        &mut h,
        Method::POST,
        JOBS,
        409,
        status(409, "AlreadyExists", "jobs.batch exists"),
    )
    .await;
    assert_eq!(task.await.unwrap(), LaunchResult::AlreadyLaunched { name });
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let (client, mut h) = mock();
    let l = launch("Allow");
    let name = l.job.metadata.name.clone().unwrap();
    let task = tokio::spawn({
        let l = l.clone();
        let client = client.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    expect(
        &mut h,
        Method::POST,
        JOBS,
        500,
        status(500, "InternalError", "etcd down"),
    )
    .await;
    expect(
        &mut h,
        Method::POST,
        JOBS,
        429,
        status(429, "TooManyRequests", "slow down"),
    )
    .await;
    let mut created = serde_json::to_value(&l.job).unwrap();
    created["metadata"]["uid"] = json!("u");
    expect(&mut h, Method::POST, JOBS, 201, created).await;
    assert_eq!(
        task.await.unwrap(),
        LaunchResult::Created { name: name.clone() }
    );

    // 503 until the launch deadline: the failure says the deadline passed.
    let short = RetryPolicy {
        deadline: Duration::from_millis(150),
        ..fast()
    };
    let mut task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, short).launch(&l).await }
    });
    let mut attempts = 0;
    let result = loop {
        tokio::select! {
            r = &mut task => break r.unwrap(),
            Some((req, send)) = h.next_request() => {
                assert_eq!(req.uri().path(), JOBS);
                attempts += 1;
                send.send_response(
                    Response::builder()
                        .status(503)
                        .body(Body::from(serde_json::to_vec(&status(503, "ServiceUnavailable", "down")).unwrap()))
                        .unwrap(),
                );
            }
        }
    };
    assert!(
        attempts >= 3,
        "retried until the deadline: {attempts} attempts"
    );
    assert_eq!(
        result,
        LaunchResult::Failed {
            name,
            code: Some(503),
            message: "down".into(),
            retried: true
        }
    );
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn an_api_server_that_never_answers_is_retried_until_it_does() {
    let (client, mut h) = mock();
    let l = launch("Allow");
    let name = l.job.metadata.name.clone().unwrap();
    let policy = RetryPolicy {
        call_timeout: Duration::from_millis(100),
        ..fast()
    };
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, policy).launch(&l).await }
    });
    // Two requests hang (never answered): each times out and is retried.
    let mut hung = Vec::new();
    for _ in 0..2 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(req.uri().path(), JOBS);
        hung.push(send);
    }
    // Then the API server is back: the Job is created, once.
    let mut created = serde_json::to_value(&l.job).unwrap();
    created["metadata"]["uid"] = json!("u");
    expect(&mut h, Method::POST, JOBS, 201, created).await;
    assert_eq!(task.await.unwrap(), LaunchResult::Created { name });
    drop(hung);
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn an_invalid_template_is_final_and_not_retried() {
    let (client, mut h) = mock();
    let l = launch("Allow");
    let name = l.job.metadata.name.clone().unwrap();
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    let msg = "Job.batch \"x\" is invalid: spec.template.spec.containers[0].image: Required value";
    expect(&mut h, Method::POST, JOBS, 422, status(422, "Invalid", msg)).await;
    assert_eq!(
        task.await.unwrap(),
        LaunchResult::Failed {
            name,
            code: Some(422),
            message: msg.into(),
            retried: false
        }
    );
    no_more_requests(&mut h).await;
}

#[tokio::test]
async fn replace_deletes_the_active_job_first() {
    let (client, mut h) = mock();
    let l = launch("Replace");
    assert_eq!(l.replace, ["web-deploy-old"]);
    let task = tokio::spawn({
        let l = l.clone();
        async move { Launcher::new(client, fast()).launch(&l).await }
    });
    let del = expect(&mut h, Method::DELETE, &format!("{JOBS}/web-deploy-old"), 200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200})).await;
    assert_eq!(del["propagationPolicy"], "Background");
    let mut created = serde_json::to_value(&l.job).unwrap();
    created["metadata"]["uid"] = json!("u");
    expect(&mut h, Method::POST, JOBS, 201, created).await;
    assert!(matches!(task.await.unwrap(), LaunchResult::Created { .. }));
}
