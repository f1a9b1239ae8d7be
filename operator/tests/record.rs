//! The sharded membership record against an in-memory ConfigMap store behind a mock API
//! server (tower-test): 10,000 members written and read back equal; one member's change is
//! one merge patch of one key; a record of an earlier version is read and moved into shards;
//! a refused write is kept and written again; an entry that does not decode is skipped and
//! named, the rest read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use serf_operator::engine::{MemberRecord, Membership};
use serf_operator::record::{self, RecordChanges, SHARDS};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request as the store saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    name: String,
    content_type: String,
    _bytes: usize,
}

#[derive(Default)]
struct Store {
    /// name → data.
    objects: BTreeMap<String, BTreeMap<String, String>>,
    seen: Vec<Seen>,
    /// Answer the next writes with 500.
    fail_writes: usize,
}

type Shared = Arc<Mutex<Store>>;

fn not_found(name: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
               "code": 404, "message": format!("configmaps \"{name}\" not found")}),
    )
}

fn object(name: &str, data: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "serf-system"}, "data": data})
}

/// Serves ConfigMaps from `store`: GET, merge patch (404 when absent), apply (creates or
/// replaces the applied data: the record's only manager owns every key it applies).
fn serve(mut h: Handle, store: Shared) {
    tokio::spawn(async move {
        while let Some((req, send)) = h.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = req.into_body().collect_bytes().await.unwrap();
            assert!(
                path.starts_with("/api/v1/namespaces/serf-system/configmaps"),
                "{path}"
            );
            let name = if method == Method::POST {
                let v: Value = serde_json::from_slice(&body).unwrap();
                v["metadata"]["name"].as_str().unwrap().to_string()
            } else {
                path.rsplit('/').next().unwrap().to_string()
            };
            let (code, reply) = {
                let mut s = store.lock().unwrap();
                s.seen.push(Seen {
                    method: method.clone(),
                    name: name.clone(),
                    content_type: content_type.clone(),
                    _bytes: body.len(),
                });
                if method != Method::GET && s.fail_writes > 0 {
                    s.fail_writes -= 1;
                    (
                        500,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "code": 500, "message": "etcdserver: request timed out"}),
                    )
                } else if method == Method::GET {
                    match s.objects.get(&name) {
                        Some(d) => (200, object(&name, d)),
                        None => not_found(&name),
                    }
                } else if method == Method::PATCH {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    let data: BTreeMap<String, Option<String>> =
                        serde_json::from_value(v["data"].clone()).unwrap_or_default();
                    if content_type.contains("merge-patch") {
                        match s.objects.get_mut(&name) {
                            Some(d) => {
                                for (k, val) in data {
                                    match val {
                                        Some(val) => d.insert(k, val),
                                        None => d.remove(&k),
                                    };
                                }
                                let d = d.clone();
                                (200, object(&name, &d))
                            }
                            None => not_found(&name),
                        }
                    } else {
                        assert!(content_type.contains("apply-patch"), "{content_type}");
                        let d: BTreeMap<String, String> = data
                            .into_iter()
                            .filter_map(|(k, v)| Some((k, v?)))
                            .collect();
                        s.objects.insert(name.clone(), d.clone());
                        (200, object(&name, &d))
                    }
                } else if method == Method::POST {
                    if s.objects.contains_key(&name) {
                        (
                            409,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "AlreadyExists", "code": 409,
                                   "message": format!("configmaps \"{name}\" already exists")}),
                        )
                    } else {
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        let d: BTreeMap<String, String> =
                            serde_json::from_value(v["data"].clone()).unwrap_or_default();
                        s.objects.insert(name.clone(), d.clone());
                        (201, object(&name, &d))
                    }
                } else {
                    panic!("unexpected {method} {path}");
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
}

fn client() -> (Client, Shared) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let store = Shared::default();
    serve(handle, store.clone());
    (Client::new(svc, "default"), store)
}

fn member(i: usize, status: &str) -> MemberRecord {
    MemberRecord {
        status: status.into(),
        tags: Arc::new(
            [
                (
                    "role".to_string(),
                    if i.is_multiple_of(3) { "db" } else { "web" }.to_string(),
                ),
                ("dc".to_string(), "eu-west-1".to_string()),
            ]
            .into(),
        ),
        version: 1 + (i % 4) as u64,
        addr: Some(
            format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap(),
        ),
        port: 7946,
        since: 1_800_000_000,
    }
}

fn membership(n: usize) -> Membership {
    Membership {
        members: (0..n)
            .map(|i| (format!("node-{i}"), member(i, "alive")))
            .collect(),
        epoch: 2,
        event_clock: 417,
        ..Membership::default()
    }
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn ten_thousand_members_round_trip_and_one_change_writes_one_key() {
    let (client, store) = client();
    let m = membership(10_000);
    let mut whole = RecordChanges::whole(&m);
    whole.legacy = false;
    let (stats, r) = record::write(&client, "serf-system", whole, T).await;
    r.unwrap();
    // Every shard created (a 404 then an apply each) and the header.
    assert_eq!(stats.calls, u64::from(SHARDS) * 2 + 1);
    {
        let s = store.lock().unwrap();
        assert_eq!(s.objects.len(), SHARDS as usize + 1);
        let biggest = s
            .objects
            .values()
            .map(|d| d.values().map(|v| v.len() + 40).sum::<usize>())
            .max()
            .unwrap();
        assert!(biggest < 300 * 1024, "largest shard {biggest} bytes");
    }

    let loaded = record::read(&client, "serf-system", T).await.unwrap();
    assert!(!loaded.legacy);
    assert_eq!(loaded.skipped, 0);
    assert_eq!(loaded.membership, m);
    // Read back, members with the same tags share one copy: two tag sets for 10,000.
    assert_eq!(loaded.membership.tag_sets.len(), 2);
    let (a, b) = (
        &loaded.membership.members["node-0"].tags,
        &loaded.membership.members["node-3"].tags,
    );
    assert!(Arc::ptr_eq(a, b));

    // One member fails: one merge patch naming one key, some 200 bytes.
    store.lock().unwrap().seen.clear();
    let mut one = RecordChanges::default();
    one.members.insert("node-77".into(), member(77, "failed"));
    let (stats, r) = record::write(&client, "serf-system", one, T).await;
    r.unwrap();
    assert_eq!(stats.calls, 1);
    assert!(stats.bytes < 300, "{stats:?}");
    let seen = store.lock().unwrap().seen.clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::PATCH);
    assert!(seen[0].content_type.contains("merge-patch"));
    assert_eq!(
        seen[0].name,
        record::shard_name(record::shard_of("node-77"))
    );
    let loaded = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(loaded.membership.members["node-77"].status, "failed");
    assert_eq!(loaded.membership.members.len(), 10_000);
}

#[tokio::test]
async fn a_record_of_an_earlier_version_is_read_and_moved_into_shards() {
    let (client, store) = client();
    let m = membership(300);
    store.lock().unwrap().objects.insert(
        "serf-operator-membership".into(),
        [(
            "membership.json".to_string(),
            serde_json::to_string(&m).unwrap(),
        )]
        .into(),
    );
    let pending = record::SharedRecord::default();
    let read = record::load(&client, "serf-system", T, &pending)
        .await
        .unwrap();
    assert_eq!(read, m);
    let changes = std::mem::take(&mut *pending.lock().unwrap());
    assert!(changes.legacy);
    assert_eq!(changes.members.len(), 300);
    let (_, r) = record::write(&client, "serf-system", changes, T).await;
    r.unwrap();
    {
        let s = store.lock().unwrap();
        let header = &s.objects["serf-operator-membership"];
        // The old key is gone; the header names the layout and keeps the clocks.
        assert!(!header.contains_key("membership.json"), "{header:?}");
        let h: Value = serde_json::from_str(&header["record.json"]).unwrap();
        assert_eq!(
            h,
            json!({"format": 2, "shards": 64, "epoch": 2, "eventClock": 417})
        );
    }
    let again = record::read(&client, "serf-system", T).await.unwrap();
    assert!(!again.legacy);
    assert_eq!(again.membership, m);
}

#[tokio::test]
async fn a_refused_write_is_kept_and_written_again() {
    let (client, store) = client();
    let mut whole = RecordChanges::whole(&membership(2_000));
    whole.legacy = false;
    record::write(&client, "serf-system", whole, T)
        .await
        .1
        .unwrap();
    let mut c = RecordChanges::default();
    for i in [1, 2, 3, 500, 900] {
        c.members.insert(format!("node-{i}"), member(i, "failed"));
    }
    c.header = Some((2, 420));
    // The second shard write fails: the shard written stays written, the rest comes back.
    store.lock().unwrap().fail_writes = usize::MAX;
    let (_, r) = record::write(&client, "serf-system", c.clone(), T).await;
    let (e, left) = r.unwrap_err();
    assert!(e.to_string().contains("etcdserver"), "{e}");
    assert_eq!(left.members.len(), c.members.len());
    assert_eq!(left.header, Some((2, 420)));

    // Meanwhile node-1 changed again: the newer state wins over what is put back.
    let pending = record::SharedRecord::default();
    pending
        .lock()
        .unwrap()
        .members
        .insert("node-1".into(), member(1, "left"));
    pending.lock().unwrap().restore(left);
    store.lock().unwrap().fail_writes = 0;
    let retry = std::mem::take(&mut *pending.lock().unwrap());
    record::write(&client, "serf-system", retry, T)
        .await
        .1
        .unwrap();
    let back = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(back.membership.members["node-1"].status, "left");
    for i in [2, 3, 500, 900] {
        assert_eq!(
            back.membership.members[&format!("node-{i}")].status,
            "failed"
        );
    }
    assert_eq!(back.membership.event_clock, 420);
}

#[tokio::test]
async fn bad_entries_and_odd_members_lose_nothing_else() {
    let (client, store) = client();
    let mut m = membership(100);
    // A member with 1,000 tags, one with 64 KiB of tags, names that are not ConfigMap keys.
    let mut many = member(1, "alive");
    many.tags = Arc::new(
        (0..1_000)
            .map(|i| (format!("t{i}"), format!("v{i}")))
            .collect(),
    );
    m.members.insert("many-tags".into(), many);
    let mut big = member(2, "alive");
    big.tags = Arc::new([("blob".to_string(), "x".repeat(64 * 1024))].into());
    m.members.insert("big-tags".into(), big);
    m.members
        .insert("host/with:odd chars".into(), member(3, "failed"));
    m.members.insert("_leading".into(), member(4, "alive"));
    let mut whole = RecordChanges::whole(&m);
    whole.legacy = false;
    record::write(&client, "serf-system", whole, T)
        .await
        .1
        .unwrap();
    // One entry damaged in place.
    {
        let mut s = store.lock().unwrap();
        let shard = record::shard_name(record::shard_of("node-5"));
        s.objects
            .get_mut(&shard)
            .unwrap()
            .insert("node-5".into(), "{not json".into());
    }
    let back = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(back.skipped, 1);
    assert!(!back.membership.members.contains_key("node-5"));
    let mut expected = m.clone();
    expected.members.remove("node-5");
    assert_eq!(back.membership, expected);
}

#[tokio::test]
async fn shards_without_a_header_are_read() {
    let (client, store) = client();
    let mut c = RecordChanges::default();
    c.members.insert("node-1".into(), member(1, "failed"));
    record::write(&client, "serf-system", c, T).await.1.unwrap();
    assert!(
        !store
            .lock()
            .unwrap()
            .objects
            .contains_key("serf-operator-membership")
    );
    let back = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(back.membership.members["node-1"].status, "failed");
}

#[tokio::test]
async fn no_record_reads_empty_and_a_header_of_another_format_is_named() {
    let (client, store) = client();
    let back = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(back.membership, Membership::default());
    store.lock().unwrap().objects.insert(
        "serf-operator-membership".into(),
        [(
            "record.json".to_string(),
            r#"{"format": 9, "shards": 64}"#.to_string(),
        )]
        .into(),
    );
    let e = record::read(&client, "serf-system", T).await.unwrap_err();
    assert!(e.to_string().contains("format 9"), "{e}");
}

#[tokio::test]
async fn shards_a_read_found_absent_are_created_at_once_and_a_stale_hint_costs_one_call() {
    let (client, store) = client();
    let pending = record::SharedRecord::default();
    // No record at all: every shard is known absent.
    let m = record::load(&client, "serf-system", T, &pending)
        .await
        .unwrap();
    assert_eq!(m, Membership::default());
    assert_eq!(pending.lock().unwrap().absent.len(), SHARDS as usize);
    let mut c = std::mem::take(&mut *pending.lock().unwrap());
    let pool = membership(3_000);
    c.members = pool.members.clone();
    c.header = Some((pool.epoch, pool.event_clock));
    store.lock().unwrap().seen.clear();
    let (stats, r) = record::write(&client, "serf-system", c, T).await;
    r.unwrap();
    // One create a shard (no patch answered 404 first) and the header.
    assert_eq!(stats.calls, u64::from(SHARDS) + 1);
    let posts = store
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|s| s.method == Method::POST)
        .count();
    assert_eq!(posts, SHARDS as usize);
    assert_eq!(
        record::read(&client, "serf-system", T)
            .await
            .unwrap()
            .membership,
        pool
    );

    // A stale hint (the shard exists after all): the create is refused, the patch follows,
    // and nothing stored is lost.
    let mut again = RecordChanges::default();
    again.members.insert("node-5".into(), member(5, "failed"));
    again.absent.insert(record::shard_of("node-5"));
    let (stats, r) = record::write(&client, "serf-system", again, T).await;
    r.unwrap();
    assert_eq!(stats.calls, 2);
    let back = record::read(&client, "serf-system", T).await.unwrap();
    assert_eq!(back.membership.members.len(), 3_000);
    assert_eq!(back.membership.members["node-5"].status, "failed");
}

#[tokio::test]
async fn the_state_writer_keeps_the_absent_hint_across_empty_flushes() {
    let (client, store) = client();
    let pending = record::SharedRecord::default();
    record::load(&client, "serf-system", T, &pending)
        .await
        .unwrap();
    let mut writer = serf_operator::state::StateWriter::new(
        client,
        serf_operator::state::StateConfig {
            namespace: "serf-system".into(),
            interval: Duration::from_secs(1),
            call_timeout: T,
        },
        Arc::default(),
        pending.clone(),
        None,
    );
    // Nothing to write yet: no call, and the hint stays.
    assert!(writer.flush(true).await);
    assert_eq!(pending.lock().unwrap().absent.len(), SHARDS as usize);
    pending
        .lock()
        .unwrap()
        .members
        .insert("node-1".into(), member(1, "alive"));
    store.lock().unwrap().seen.clear();
    assert!(writer.flush(true).await);
    let seen = store.lock().unwrap().seen.clone();
    // Straight to a create: no patch answered 404 first.
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(pending.lock().unwrap().absent.len(), SHARDS as usize - 1);
}
