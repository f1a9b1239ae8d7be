//! The SerfService controller against a mock API server (tower-test), every request
//! recorded and answered as the API server would: a service is published as a headless
//! Service, EndpointSlices and a ConfigMap with owner references; the same membership again
//! writes nothing; one member failing rewrites one slice of three; a restart lists what is
//! there and rewrites only what differs; a standby writes nothing; an invalid spec and a
//! ConfigMap too large show in status; unpublishing deletes what the service owns. The
//! membership follower against real Serf agents: joins, tag changes and a graceful leave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use serf_client::{ClientConfig, Member, MemberStatus};
use serf_operator::controller::service::{self, Members, ServiceContext};
use serf_operator_crds::SerfService;
use serf_testkit::{AgentConfig, Cluster};
use tokio::sync::watch;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request as the mock API server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// What the mock API server holds.
#[derive(Default, Clone)]
struct Api {
    slices: Vec<Value>,
    service: Option<Value>,
    config_map: Option<Value>,
}

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Answers every request until none comes for 300 ms; returns them in order.
async fn serve(h: &mut Handle, svc: &SerfService, api: &Api) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(300), h.next_request()).await;
        let Ok(Some((req, send))) = next else {
            return seen;
        };
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
        let (code, reply) = match (&method, path.as_str()) {
            (&Method::GET, p) if p.ends_with("/endpointslices") => (
                200,
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                       "metadata": {}, "items": api.slices}),
            ),
            (&Method::GET, p) if p.contains("/services/") => match &api.service {
                Some(s) => (200, s.clone()),
                None => (404, not_found),
            },
            (&Method::GET, p) if p.contains("/configmaps/") => match &api.config_map {
                Some(s) => (200, s.clone()),
                None => (404, not_found),
            },
            (&Method::PATCH, p) if p.ends_with("/status") => {
                (200, serde_json::to_value(svc).unwrap())
            }
            (&Method::PATCH, _) => (200, body.clone()),
            (&Method::DELETE, _) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
            _ => panic!("unexpected {method} {path}"),
        };
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        seen.push(Seen {
            method,
            path,
            query,
            body,
        });
    }
}

fn writes(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method != Method::GET)
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

const NS: &str = "/namespaces/apps";

fn svc(spec: Value) -> SerfService {
    serde_json::from_value(json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfService",
        "metadata": {"name": "db", "namespace": "apps", "uid": "db-uid", "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn member(name: &str, addr: &str, status: MemberStatus, tags: &[(&str, &str)]) -> Member {
    Member::new(
        name,
        addr.parse().unwrap(),
        7946,
        tags.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        status,
    )
}

fn context(
    client: Client,
    members: Vec<Member>,
    leader: bool,
) -> (
    Arc<ServiceContext>,
    watch::Sender<Option<Members>>,
    watch::Sender<bool>,
) {
    let (mtx, mrx) = watch::channel(Some(Arc::new(members)));
    let (ltx, lrx) = watch::channel(leader);
    (
        ServiceContext::new(client, lrx, mrx, Duration::from_secs(5)),
        mtx,
        ltx,
    )
}

async fn reconcile(
    h: &mut Handle,
    s: &SerfService,
    ctx: &Arc<ServiceContext>,
    api: &Api,
) -> (Action, Vec<Seen>) {
    let task = tokio::spawn(service::reconcile(Arc::new(s.clone()), ctx.clone()));
    let seen = serve(h, s, api).await;
    (task.await.unwrap().unwrap(), seen)
}

fn three() -> Vec<Member> {
    vec![
        member("db-1", "10.0.0.1", MemberStatus::Alive, &[("role", "db")]),
        member("db-2", "10.0.0.2", MemberStatus::Alive, &[("role", "db")]),
        member("DB 3", "10.0.0.3", MemberStatus::Leaving, &[("role", "db")]),
        member("web-1", "10.0.0.9", MemberStatus::Alive, &[("role", "web")]),
    ]
}

fn db_spec() -> Value {
    json!({"selector": {"tags": {"role": "db"}},
           "ports": [{"name": "pg", "port": 5432}],
           "publish": {"service": true, "configMap": true},
           "removeAfter": "30s"})
}

#[tokio::test]
async fn a_service_is_published_then_only_what_changes_is_written() {
    let (client, mut h) = mock();
    let s = svc(db_spec());
    let (ctx, members, _leader) = context(client, three(), true);
    let (action, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(600)));
    let list = &seen[0];
    assert_eq!(list.method, Method::GET);
    assert!(
        list.query.contains("kubernetes.io%2Fservice-name%3Ddb")
            && list
                .query
                .contains("endpointslice.kubernetes.io%2Fmanaged-by%3Dserf-operator"),
        "{}",
        list.query
    );
    assert_eq!(
        writes(&seen),
        [
            format!("PATCH /api/v1{NS}/services/db"),
            format!("PATCH /apis/discovery.k8s.io/v1{NS}/endpointslices/db-serf-0"),
            format!("PATCH /api/v1{NS}/configmaps/db-members"),
            format!("PATCH /apis/serf.operator.io/v1alpha1{NS}/serfservices/db/status"),
        ]
    );
    for w in &seen[1..4] {
        assert!(
            w.query.contains("fieldManager=serf-operator"),
            "{}",
            w.query
        );
        assert!(
            w.query.contains("force=true"),
            "server-side apply: {}",
            w.query
        );
        let o = &w.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (
                o["kind"].as_str(),
                o["uid"].as_str(),
                o["controller"].as_bool()
            ),
            (Some("SerfService"), Some("db-uid"), Some(true))
        );
    }
    let service = &seen[1].body;
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert!(service["spec"].get("selector").is_none());
    assert_eq!(service["spec"]["ports"][0]["port"], 5432);

    let slice = &seen[2].body;
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "db"
    );
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "serf-operator"
    );
    assert_eq!(
        slice["ports"],
        json!([{"name": "pg", "port": 5432, "protocol": "TCP"}])
    );
    let eps = slice["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3, "web-1 is not selected: {eps:?}");
    // By name: "DB 3" (leaving: terminating, still serving; no hostname, not a DNS label),
    // db-1, db-2 (alive: ready).
    assert_eq!(eps[0]["addresses"], json!(["10.0.0.3"]));
    assert_eq!(
        eps[0]["conditions"],
        json!({"ready": false, "serving": true, "terminating": true})
    );
    assert!(eps[0].get("hostname").is_none());
    assert_eq!(eps[1]["hostname"], "db-1");
    assert_eq!(
        eps[1]["conditions"],
        json!({"ready": true, "serving": true, "terminating": false})
    );

    let data = &seen[3].body["data"];
    assert_eq!(
        data["members.txt"],
        "db-1 10.0.0.1:5432\ndb-2 10.0.0.2:5432\n"
    );
    let listed: Value = serde_json::from_str(data["members.json"].as_str().unwrap()).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    assert_eq!(listed[0]["status"], "leaving");
    assert_eq!(listed[1]["tags"]["role"], "db");

    let status = &seen[4].body["status"];
    assert_eq!(
        (
            &status["ready"],
            &status["terminating"],
            &status["total"],
            &status["slices"]
        ),
        (&json!(2), &json!(1), &json!(3), &json!(1))
    );
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status["lastChange"].is_string());
    let first_slice = slice.clone();

    // The same membership again: nothing is written.
    let (_, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert!(seen.is_empty(), "{seen:?}");

    // db-2 fails: its slice, the ConfigMap and the status; the grace is awaited.
    let mut m = three();
    m[1].status = MemberStatus::Failed;
    members.send_replace(Some(Arc::new(m.clone())));
    let (action, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(
        writes(&seen),
        [
            format!("PATCH /apis/discovery.k8s.io/v1{NS}/endpointslices/db-serf-0"),
            format!("PATCH /api/v1{NS}/configmaps/db-members"),
            format!("PATCH /apis/serf.operator.io/v1alpha1{NS}/serfservices/db/status"),
        ]
    );
    let failed = &seen[0].body["endpoints"][2];
    assert_eq!(
        failed["conditions"],
        json!({"ready": false, "serving": false, "terminating": false})
    );
    assert_eq!(seen[1].body["data"]["members.txt"], "db-1 10.0.0.1:5432\n");
    assert_eq!(seen[2].body["status"]["ready"], 1);
    let wait = format!("{action:?}");
    assert!(
        !wait.contains("600"),
        "requeued for the end of the grace, not the relist: {wait}"
    );

    // A restart (a new context) with the first slice in the API and the first membership:
    // the list shows it is as wanted, so only the Service and ConfigMap are applied (once).
    let (client, mut h) = mock();
    let (ctx2, _m2, _l2) = ctx_with(client, three());
    let api = Api {
        slices: vec![first_slice],
        ..Default::default()
    };
    let (_, seen) = reconcile(&mut h, &s, &ctx2, &api).await;
    let w = writes(&seen);
    assert!(
        !w.iter().any(|w| w.contains("endpointslices")),
        "no slice rewritten after a restart: {w:?}"
    );
    assert!(
        w.contains(&format!("PATCH /api/v1{NS}/services/db")),
        "{w:?}"
    );
}

fn ctx_with(
    client: Client,
    members: Vec<Member>,
) -> (
    Arc<ServiceContext>,
    watch::Sender<Option<Members>>,
    watch::Sender<bool>,
) {
    context(client, members, true)
}

fn many(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| {
            member(
                &format!("m{i:05}"),
                &format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
                MemberStatus::Alive,
                &[("role", "db"), ("port", "6000")],
            )
        })
        .collect()
}

#[tokio::test]
async fn slices_split_at_1000_and_one_change_among_2500_is_one_slice_write() {
    let (client, mut h) = mock();
    let s = svc(json!({"selector": {"tags": {"role": "db"}},
                       "ports": [{"name": "app", "portTag": "port"}]}));
    let (ctx, members, _l) = context(client, many(2500), true);
    let (_, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    let slices: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path.contains("/endpointslices/"))
        .collect();
    assert_eq!(slices.len(), 3);
    let sizes: Vec<usize> = slices
        .iter()
        .map(|s| s.body["endpoints"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    assert_eq!(slices[0].body["ports"][0]["port"], 6000);
    // Tag ports are not on the Service (each member may differ).
    let service = seen
        .iter()
        .find(|s| s.path.ends_with("/services/db"))
        .unwrap();
    assert_eq!(service.body["spec"]["ports"], json!([]));
    assert!(
        !seen
            .iter()
            .any(|s| s.path.contains("configmaps/db-members") && s.method == Method::PATCH)
    );

    let mut m = many(2500);
    m[1500].tags.insert("role".into(), "web".into());
    members.send_replace(Some(Arc::new(m)));
    let (_, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(
        writes(&seen),
        [
            format!("PATCH /apis/discovery.k8s.io/v1{NS}/endpointslices/db-serf-1"),
            format!("PATCH /apis/serf.operator.io/v1alpha1{NS}/serfservices/db/status"),
        ]
    );
    assert_eq!(seen[0].body["endpoints"].as_array().unwrap().len(), 999);
    assert_eq!(seen[1].body["status"]["total"], 2499);
}

#[tokio::test]
async fn a_standby_writes_nothing_and_lists_again_when_it_leads() {
    let (client, mut h) = mock();
    let s = svc(db_spec());
    let (ctx, _m, leader) = context(client, three(), false);
    let (action, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(action, Action::await_change());
    assert!(seen.is_empty(), "{seen:?}");
    leader.send_replace(true);
    let (_, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(seen[0].method, Method::GET, "lists first");
    assert_eq!(writes(&seen).len(), 4);
}

#[tokio::test]
async fn an_invalid_spec_and_a_configmap_too_large_show_in_status() {
    let (client, mut h) = mock();
    let s =
        svc(json!({"selector": {"tags": {"role": "("}}, "ports": [{"name": "pg", "port": 5432}]}));
    let (ctx, _m, _l) = context(client, three(), true);
    let (action, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        writes(&seen),
        [format!(
            "PATCH /apis/serf.operator.io/v1alpha1{NS}/serfservices/db/status"
        )]
    );
    let c = &seen[0].body["status"]["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("InvalidSpec"))
    );
    assert!(
        c["message"].as_str().unwrap().contains("selector.role"),
        "{c}"
    );

    // 10,000 members with long tags do not fit a ConfigMap: the slices are published, the
    // status says why the ConfigMap is not.
    let (client, mut h) = mock();
    let s = svc(json!({"ports": [{"name": "pg", "port": 5432}],
                       "publish": {"service": true, "configMap": true}}));
    let mut big = many(10_000);
    for m in &mut big {
        m.tags.insert("note".into(), "x".repeat(100));
    }
    let (ctx, _m, _l) = context(client, big, true);
    let (_, seen) = reconcile(&mut h, &s, &ctx, &Api::default()).await;
    let w = writes(&seen);
    assert_eq!(
        w.iter().filter(|w| w.contains("endpointslices")).count(),
        10
    );
    assert!(!w.iter().any(|w| w.contains("configmaps")), "{w:?}");
    let status = &seen.last().unwrap().body["status"];
    assert_eq!(status["conditions"][0]["reason"], "ConfigMapTooLarge");
    assert_eq!(status["total"], 10_000);
    assert_eq!(status["slices"], 10);
}

#[tokio::test]
async fn unpublishing_deletes_only_what_the_service_owns() {
    let (client, mut h) = mock();
    let s = svc(json!({"selector": {"tags": {"role": "db"}},
                       "ports": [{"name": "pg", "port": 5432}],
                       "publish": {"service": false, "configMap": true}}));
    let (ctx, _m, _l) = context(client, three(), true);
    let owned = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "apps",
                     "ownerReferences": [{"apiVersion": "serf.operator.io/v1alpha1",
                        "kind": "SerfService", "name": "db", "uid": "db-uid"}]},
        "spec": {"clusterIP": "None"}});
    let api = Api {
        slices: vec![
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-serf-0", "namespace": "apps",
                         "labels": {"serf.operator.io/slice": "0"}},
            "addressType": "IPv4", "endpoints": []}),
        ],
        service: Some(owned),
        config_map: None,
    };
    let (_, seen) = reconcile(&mut h, &s, &ctx, &api).await;
    assert_eq!(
        writes(&seen),
        [
            format!("DELETE /apis/discovery.k8s.io/v1{NS}/endpointslices/db-serf-0"),
            format!("DELETE /api/v1{NS}/services/db"),
            format!("PATCH /api/v1{NS}/configmaps/db-members"),
            format!("PATCH /apis/serf.operator.io/v1alpha1{NS}/serfservices/db/status"),
        ]
    );
    assert_eq!(seen.last().unwrap().body["status"]["slices"], 0);

    // A Service of the same name that someone else made stays.
    let (client, mut h) = mock();
    let (ctx, _m, _l) = context(client, three(), true);
    let theirs = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "apps"}, "spec": {"clusterIP": "10.0.0.10"}});
    let api = Api {
        service: Some(theirs),
        ..Default::default()
    };
    let (_, seen) = reconcile(&mut h, &s, &ctx, &api).await;
    assert!(
        !writes(&seen).iter().any(|w| w.starts_with("DELETE")),
        "{seen:?}"
    );
}

async fn wait_members(
    rx: &mut watch::Receiver<Option<Members>>,
    what: &str,
    ok: impl Fn(&[Member]) -> bool,
) -> Members {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = rx.borrow_and_update().clone()
            && ok(&m)
        {
            return m;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            tokio::time::timeout(left, rx.changed()).await.is_ok(),
            "timed out waiting for {what}: {:?}",
            rx.borrow().as_ref().map(|m| m
                .iter()
                .map(|m| (m.name.clone(), m.status.clone(), m.tags.clone()))
                .collect::<Vec<_>>())
        );
    }
}

fn status_of(m: &[Member], name: &str) -> Option<MemberStatus> {
    m.iter().find(|m| m.name == name).map(|m| m.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_follows_joins_tag_changes_and_leaves_of_real_agents() {
    let mut cluster = Cluster::start(vec![
        AgentConfig::new("disc-a").tag("role", "db"),
        AgentConfig::new("disc-b").tag("role", "db"),
    ])
    .unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(service::follow_members(
        ClientConfig::new(cluster[0].rpc_addr().to_string()),
        tx,
        Duration::from_millis(200),
    ));
    wait_members(&mut rx, "both alive", |m| {
        status_of(m, "disc-a") == Some(MemberStatus::Alive)
            && status_of(m, "disc-b") == Some(MemberStatus::Alive)
    })
    .await;

    cluster
        .add(AgentConfig::new("disc-c").tag("role", "web"))
        .unwrap();
    wait_members(&mut rx, "disc-c joined", |m| {
        status_of(m, "disc-c") == Some(MemberStatus::Alive)
    })
    .await;

    cluster[1].serf_ok(&["tags", "-set", "role=cache"]).unwrap();
    wait_members(&mut rx, "disc-b's new tag", |m| {
        m.iter()
            .any(|m| m.name == "disc-b" && m.tags.get("role").map(String::as_str) == Some("cache"))
    })
    .await;

    cluster[2].serf_ok(&["leave"]).unwrap();
    wait_members(&mut rx, "disc-c left", |m| {
        status_of(m, "disc-c") == Some(MemberStatus::Left)
    })
    .await;
    task.abort();
}
