//! The key rotation controller's reconcile against a mock API server (tower-test) that keeps
//! the one ConfigMap it is asked to (with resourceVersions, refusing a stale write with 409)
//! and takes Events, and real Serf agents: a new primary in the Secret rotates the cluster
//! with every step recorded first and counted once; a standby does nothing; a bad Secret is
//! an Event and nothing else; a record written meanwhile by another replica stops the step;
//! a leader change in mid-rotation: the new leader finishes it, counted once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use serf_client::ClientConfig;
use serf_operator::controller::keyring::{self, KeyringContext};
use serf_operator::keyring::rotate::ConfigMapStore;
use serf_operator::metrics::{Metrics, ResultLabel};
use serf_testkit::{AgentConfig, Cluster, keygen};
use tokio::sync::watch;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const CM: &str = "/api/v1/namespaces/serf-system/configmaps/serf-operator-keyring";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/serf-system/events";

/// What the mock API server saw.
#[derive(Default)]
struct Seen {
    /// The ConfigMap's data and resourceVersion.
    cm: Option<(Value, u64)>,
    /// Each ConfigMap write: the resourceVersion it carried and its record.
    writes: Vec<(Option<String>, Value)>,
    /// Event reasons.
    events: Vec<String>,
    /// Every request body, to look for keys.
    bodies: Vec<String>,
    /// Answer the next write with 409 (another replica wrote meanwhile).
    conflict_next: bool,
    /// Answer every write from this many writes on with 409 (the replica lost the Lease and
    /// the new leader writes).
    refuse_from: Option<usize>,
}

/// Serves the ConfigMap and Events until the client is dropped.
fn serve(mut h: Handle, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((req, send)) = h.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let body = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut s = seen.lock().unwrap();
            s.bodies.push(body.to_string());
            let (code, reply) = match (method, path.as_str()) {
                (Method::GET, CM) => match &s.cm {
                    None => (
                        404,
                        json!({"kind": "Status", "code": 404, "reason": "NotFound"}),
                    ),
                    Some((data, rv)) => (200, cm(data, *rv)),
                },
                (Method::PATCH, CM) => {
                    let sent_rv = body["metadata"]["resourceVersion"]
                        .as_str()
                        .map(String::from);
                    let record: Value =
                        serde_json::from_str(body["data"]["record.json"].as_str().unwrap())
                            .unwrap();
                    let refused = s.refuse_from.is_some_and(|n| s.writes.len() >= n);
                    s.writes.push((sent_rv.clone(), record));
                    let current = s.cm.as_ref().map(|(_, rv)| rv.to_string());
                    if std::mem::take(&mut s.conflict_next)
                        || refused
                        || (sent_rv.is_some() && sent_rv != current)
                    {
                        (
                            409,
                            json!({"kind": "Status", "code": 409, "reason": "Conflict"}),
                        )
                    } else {
                        let rv = s.cm.as_ref().map(|(_, rv)| rv + 1).unwrap_or(1);
                        s.cm = Some((body["data"].clone(), rv));
                        (200, cm(&body["data"], rv))
                    }
                }
                (Method::POST, EVENTS) => {
                    s.events
                        .push(body["reason"].as_str().unwrap_or_default().to_string());
                    (201, body.clone())
                }
                (m, p) => panic!("unexpected request {m} {p}"),
            };
            drop(s);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    })
}

fn cm(data: &Value, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "serf-operator-keyring", "namespace": "serf-system",
                        "resourceVersion": rv.to_string()},
           "data": data})
}

fn secret(data: Value) -> Arc<Secret> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "serf-keys", "namespace": "serf-system", "uid": "s-uid"},
            "data": data,
        }))
        .unwrap(),
    )
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Fixture {
    ctx: Arc<KeyringContext>,
    seen: Arc<Mutex<Seen>>,
    metrics: Arc<Metrics>,
    _server: tokio::task::JoinHandle<()>,
    _senders: (
        watch::Sender<Option<serf_client::Client>>,
        watch::Sender<bool>,
    ),
}

async fn fixture(agent: std::net::SocketAddr, leader: bool) -> Fixture {
    fixture_on(agent, leader, Arc::default()).await
}

/// A replica whose API server keeps its objects in `seen` (shared by replicas).
async fn fixture_on(agent: std::net::SocketAddr, leader: bool, seen: Arc<Mutex<Seen>>) -> Fixture {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let server = serve(handle, seen.clone());
    let serf = serf_client::Client::connect(ClientConfig::new(agent.to_string()))
        .await
        .unwrap();
    let (_stx, srx) = watch::channel(Some(serf));
    let (_ltx, lrx) = watch::channel(leader);
    let metrics = Metrics::new();
    let ctx = KeyringContext::new(
        client.clone(),
        srx,
        lrx,
        metrics.clone(),
        ConfigMapStore::new(
            client,
            "serf-system",
            "serf-operator-keyring",
            Duration::from_secs(5),
        ),
        "key".into(),
        Duration::from_secs(60),
        "op-0",
    );
    Fixture {
        ctx,
        seen,
        metrics,
        _server: server,
        _senders: (_stx, _ltx),
    }
}

async fn encrypted_pair(old: &str) -> Cluster {
    let old = old.to_string();
    tokio::task::spawn_blocking(move || {
        Cluster::start(vec![
            AgentConfig::new("kc-1").keyring([old.clone()]),
            AgentConfig::new("kc-2").keyring([old]),
        ])
        .unwrap()
    })
    .await
    .unwrap()
}

/// Reconciles until the controller says to look again in a minute (in sync).
async fn until_in_sync(s: &Arc<Secret>, ctx: &Arc<KeyringContext>) {
    for _ in 0..40 {
        let a = keyring::reconcile(s.clone(), ctx.clone()).await.unwrap();
        if a == Action::requeue(Duration::from_secs(60)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("never in sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_rotates_the_cluster_recording_each_step_first() {
    let (old, new) = (keygen().unwrap(), keygen().unwrap());
    let cluster = encrypted_pair(&old).await;
    let f = fixture(cluster[0].rpc_addr(), true).await;

    until_in_sync(&secret(json!({"key": b64(&old)})), &f.ctx).await;
    let s = secret(json!({"key": b64(&new)}));
    until_in_sync(&s, &f.ctx).await;

    let seen = f.seen.lock().unwrap();
    // Every write carried the version it read (none only for the first).
    let mut last_rv: Option<String> = None;
    for (i, (rv, _)) in seen.writes.iter().enumerate() {
        if i > 0 {
            assert_eq!(rv, &last_rv, "write {i}");
        }
        last_rv = Some((i + 1).to_string());
    }
    let steps: Vec<String> = seen
        .writes
        .iter()
        .filter_map(|(_, r)| r["rotation"]["step"]["step"].as_str().map(String::from))
        .collect();
    let mut folded = steps.clone();
    folded.dedup();
    assert_eq!(folded, ["install", "use", "remove"], "{steps:?}");
    let (data, _) = seen.cm.clone().unwrap();
    assert_eq!(data["step"], "InSync");
    let record: Value = serde_json::from_str(data["record.json"].as_str().unwrap()).unwrap();
    assert_eq!(record["last"]["result"], "Succeeded");
    assert_eq!(record["rotation"], Value::Null);
    for reason in [
        "KeyRotationStarted",
        "KeyInstalled",
        "PrimaryKeyChanged",
        "KeyRemoved",
        "KeyRotationFinished",
    ] {
        assert_eq!(
            seen.events.iter().filter(|e| *e == reason).count(),
            1,
            "{reason}: {:?}",
            seen.events
        );
    }
    for b in &seen.bodies {
        assert!(
            !b.contains(&old) && !b.contains(&new),
            "a key reached the API: {b}"
        );
    }
    drop(seen);
    let counted = f
        .metrics
        .key_rotations
        .get_or_create(&ResultLabel {
            result: "Succeeded".into(),
        })
        .get();
    assert_eq!(counted, 1);
    let listed = cluster[1].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && !listed.contains(&old), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_and_a_bad_secret_change_nothing() {
    let old = keygen().unwrap();
    let cluster = encrypted_pair(&old).await;
    let standby = fixture(cluster[0].rpc_addr(), false).await;
    let a = keyring::reconcile(
        secret(json!({"key": b64(&keygen().unwrap())})),
        standby.ctx.clone(),
    )
    .await
    .unwrap();
    assert_eq!(a, Action::await_change());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(standby.seen.lock().unwrap().bodies.is_empty());

    let f = fixture(cluster[0].rpc_addr(), true).await;
    let a = keyring::reconcile(secret(json!({"key": b64("short")})), f.ctx.clone())
        .await
        .unwrap();
    assert_eq!(a, Action::await_change());
    let seen = f.seen.lock().unwrap();
    assert_eq!(seen.events, ["KeyringInvalid"]);
    assert!(seen.writes.is_empty());
    assert!(!seen.bodies.iter().any(|b| b.contains("short")));
    let listed = cluster[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_meanwhile_stops_the_step_before_the_agent_is_asked() {
    let (old, new) = (keygen().unwrap(), keygen().unwrap());
    let cluster = encrypted_pair(&old).await;
    let f = fixture(cluster[0].rpc_addr(), true).await;
    until_in_sync(&secret(json!({"key": b64(&old)})), &f.ctx).await;
    f.seen.lock().unwrap().conflict_next = true;
    let r = keyring::reconcile(secret(json!({"key": b64(&new)})), f.ctx.clone()).await;
    assert!(r.is_err(), "{r:?}");
    let listed = cluster[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(
        !listed.contains(&new),
        "installed although the record was not written"
    );
    // Retried, it goes through.
    until_in_sync(&secret(json!({"key": b64(&new)})), &f.ctx).await;
    let listed = cluster[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && !listed.contains(&old), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_rotation_and_it_counts_once() {
    let (old, new) = (keygen().unwrap(), keygen().unwrap());
    let cluster = encrypted_pair(&old).await;
    let api = Arc::new(Mutex::new(Seen::default()));
    // Replica A leads through its own agent; replica B waits on the other agent.
    let a = fixture_on(cluster[0].rpc_addr(), true, api.clone()).await;
    let b = fixture_on(cluster[1].rpc_addr(), false, api.clone()).await;
    until_in_sync(&secret(json!({"key": b64(&old)})), &a.ctx).await;
    let s = secret(json!({"key": b64(&new)}));
    // A records and does the install, then loses the Lease: its next write (the use step) is
    // refused, so it does not use the key.
    {
        let mut seen = api.lock().unwrap();
        seen.refuse_from = Some(seen.writes.len() + 1);
    }
    assert!(keyring::reconcile(s.clone(), a.ctx.clone()).await.is_err());
    let record: Value = {
        let seen = api.lock().unwrap();
        serde_json::from_str(seen.cm.as_ref().unwrap().0["record.json"].as_str().unwrap()).unwrap()
    };
    assert_eq!(record["rotation"]["step"]["step"], "install", "{record}");
    let listed = cluster[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && listed.contains(&old), "{listed}");
    api.lock().unwrap().refuse_from = None;
    a._senders.1.send_replace(false);
    b._senders.1.send_replace(true);
    assert_eq!(
        keyring::reconcile(s.clone(), a.ctx.clone()).await.unwrap(),
        Action::await_change(),
        "the old leader stands by"
    );
    until_in_sync(&s, &b.ctx).await;
    let listed = cluster[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && !listed.contains(&old), "{listed}");
    let count = |f: &Fixture| {
        f.metrics
            .key_rotations
            .get_or_create(&ResultLabel {
                result: "Succeeded".into(),
            })
            .get()
    };
    assert_eq!((count(&a), count(&b)), (0, 1));
    let seen = api.lock().unwrap();
    assert_eq!(
        seen.events
            .iter()
            .filter(|e| *e == "KeyRotationFinished")
            .count(),
        1,
        "{:?}",
        seen.events
    );
    let record: Value =
        serde_json::from_str(seen.cm.as_ref().unwrap().0["record.json"].as_str().unwrap()).unwrap();
    assert_eq!(record["rotations"], 1);
    assert_eq!(record["last"]["result"], "Succeeded");
}
