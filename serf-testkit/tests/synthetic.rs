//! The synthetic agent against a real `serf agent`: the same raw requests to both, frames
//! compared by structure (keys, key order, msgpack kinds, error strings, closed connections);
//! then the synthetic agent at scale through serf-client.

// Test helpers outside #[test] functions panic on purpose when the agent misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rmpv::Value;
use serf_client::{Client, ClientConfig, Event};
use serf_testkit::synthetic::{
    Coalesce, MemberEventKind, Status, SyntheticAgent, SyntheticConfig, SyntheticMember,
};
use serf_testkit::{Agent, AgentConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AUTH: &str = "synthetic-s3cret";
const WAIT: Duration = Duration::from_secs(10);

/// A raw RPC connection: writes requests, reads values, sorts stream records by `Seq`.
struct Raw {
    sock: TcpStream,
    buf: Vec<u8>,
    streams: HashSet<u64>,
    records: HashMap<u64, VecDeque<(Value, Value)>>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let sock = TcpStream::connect(addr).await.unwrap();
        Raw {
            sock,
            buf: Vec::new(),
            streams: HashSet::new(),
            records: HashMap::new(),
        }
    }

    async fn send(&mut self, command: &str, seq: u64, body: Option<Value>) {
        let mut out = Vec::new();
        let header = Value::Map(vec![
            (Value::from("Command"), Value::from(command)),
            (Value::from("Seq"), Value::from(seq)),
        ]);
        rmpv::encode::write_value(&mut out, &header).unwrap();
        if let Some(b) = body {
            rmpv::encode::write_value(&mut out, &b).unwrap();
        }
        self.sock.write_all(&out).await.unwrap();
    }

    /// The next value, or `None` when the agent closed the connection.
    async fn value(&mut self) -> Option<Value> {
        loop {
            if !self.buf.is_empty() {
                let mut cur = std::io::Cursor::new(&self.buf[..]);
                if let Ok(v) = rmpv::decode::read_value(&mut cur) {
                    let used = cur.position() as usize;
                    self.buf.drain(..used);
                    return Some(v);
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(WAIT, self.sock.read(&mut chunk))
                .await
                .expect("the agent answers in time")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "closed inside a value");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the reply to `seq`: its header and, when `body`, its body (unless the
    /// error is one that never has one). Stream records met on the way are kept.
    async fn reply(&mut self, seq: u64, body: bool) -> (Value, Option<Value>) {
        loop {
            let h = self
                .value()
                .await
                .expect("a reply before the connection closes");
            let hseq = get(&h, "Seq").as_u64().unwrap();
            // (A reply reusing an open stream's seq is taken as the reply: the test sends no
            // events while it waits for one.)
            if hseq != seq && self.streams.contains(&hseq) {
                let b = self.value().await.expect("a record body");
                self.records.entry(hseq).or_default().push_back((h, b));
                continue;
            }
            assert_eq!(hseq, seq, "reply for another seq: {h}");
            let err = get(&h, "Error").as_str().unwrap().to_string();
            let no_body = matches!(
                err.as_str(),
                "Handshake required" | "Authentication required" | "Unsupported command"
            );
            let b = if body && !no_body {
                Some(self.value().await.expect("a reply body"))
            } else {
                None
            };
            return (h, b);
        }
    }

    async fn call(
        &mut self,
        command: &str,
        seq: u64,
        body: Option<Value>,
        reply_body: bool,
    ) -> (Value, Option<Value>) {
        self.send(command, seq, body).await;
        self.reply(seq, reply_body).await
    }

    /// The next record of stream `seq`.
    async fn record(&mut self, seq: u64) -> (Value, Value) {
        loop {
            if let Some(r) = self.records.get_mut(&seq).and_then(VecDeque::pop_front) {
                return r;
            }
            let h = self
                .value()
                .await
                .expect("a record before the connection closes");
            let hseq = get(&h, "Seq").as_u64().unwrap();
            assert!(self.streams.contains(&hseq), "unexpected frame {h}");
            let b = self.value().await.expect("a record body");
            self.records.entry(hseq).or_default().push_back((h, b));
        }
    }

    /// True when the agent closes the connection (after the frames already sent).
    async fn closed(&mut self) -> bool {
        self.value().await.is_none()
    }
}

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(key)))
        .map(|(_, v)| v)
        .unwrap_or(&Value::Nil)
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// The structure of a value: map keys (sorted) with the kinds of their values; arrays by the
/// set of their elements' structures.
fn shape(v: &Value) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Boolean(_) => "bool".into(),
        Value::Integer(_) => "int".into(),
        Value::F32(_) | Value::F64(_) => "float".into(),
        Value::String(_) => "str".into(),
        Value::Binary(_) => "bin".into(),
        Value::Ext(..) => "ext".into(),
        Value::Array(items) => {
            let set: BTreeSet<String> = items.iter().map(shape).collect();
            format!("[{}]", set.into_iter().collect::<Vec<_>>().join("|"))
        }
        Value::Map(entries) => {
            let fields: BTreeMap<String, String> = entries
                .iter()
                .map(|(k, v)| (k.to_string(), shape(v)))
                .collect();
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", inner.join(","))
        }
    }
}

/// Map keys in wire order.
fn key_order(v: &Value) -> Vec<String> {
    v.as_map()
        .map(|m| m.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default()
}

/// One step of the conversation: a label, the frames, and whether the connection closed.
#[derive(Debug)]
struct Step {
    label: &'static str,
    frames: Vec<Value>,
    closed: bool,
}

fn step(label: &'static str, (h, b): (Value, Option<Value>)) -> Step {
    Step {
        label,
        frames: std::iter::once(h).chain(b).collect(),
        closed: false,
    }
}

/// Plays the same raw requests against an agent at `addr` whose own name is `name` and whose
/// RPC key is [`AUTH`]; `join` makes a member with tag role=db join the cluster.
async fn conversation(
    addr: SocketAddr,
    name: &str,
    join: impl std::future::Future<Output = ()>,
) -> Vec<Step> {
    let mut steps = Vec::new();

    // A command before the handshake: an error, then the agent closes the connection.
    let mut c = Raw::connect(addr).await;
    let r = c.call("members", 1, None, true).await;
    let mut s = step("before handshake", r);
    s.closed = c.closed().await;
    steps.push(s);

    let mut c = Raw::connect(addr).await;
    let hs = |v: i64| Some(map(&[("Version", Value::from(v))]));
    steps.push(step(
        "handshake v2",
        c.call("handshake", 1, hs(2), false).await,
    ));
    steps.push(step(
        "handshake",
        c.call("handshake", 2, hs(1), false).await,
    ));
    steps.push(step(
        "handshake again",
        c.call("handshake", 3, hs(1), false).await,
    ));
    steps.push(step(
        "stats before auth",
        c.call("stats", 4, None, true).await,
    ));
    // A refused request's body is not read: the agent takes it as the next header, which
    // keeps the previous command and seq, and refuses it again.
    let ev = map(&[
        ("Name", Value::from("early")),
        ("Payload", Value::Binary(b"x".to_vec())),
        ("Coalesce", Value::from(false)),
    ]);
    let (h1, _) = c.call("event", 30, Some(ev), false).await;
    let (h2, _) = c.reply(30, false).await;
    steps.push(Step {
        label: "event before auth",
        frames: vec![h1, h2],
        closed: false,
    });
    let auth = |k: &str| Some(map(&[("AuthKey", Value::from(k))]));
    steps.push(step(
        "bad auth",
        c.call("auth", 5, auth("nope"), false).await,
    ));
    steps.push(step("auth", c.call("auth", 6, auth(AUTH), false).await));

    let (h, b) = c.call("members", 7, None, true).await;
    let body = b.clone().unwrap();
    let me = get(&body, "Members").as_array().unwrap();
    assert_eq!(me.len(), 1, "only the agent itself: {body}");
    assert_eq!(get(&me[0], "Name").as_str(), Some(name));
    steps.push(step("members", (h, b)));

    let filtered = |tag: &str, status: &str| {
        Some(map(&[
            ("Tags", map(&[("role", Value::from(tag))])),
            ("Status", Value::from(status)),
            ("Name", Value::from("")),
        ]))
    };
    let (h, b) = c
        .call("members-filtered", 8, filtered("web", "alive"), true)
        .await;
    assert_eq!(
        get(b.as_ref().unwrap(), "Members")
            .as_array()
            .unwrap()
            .len(),
        1
    );
    steps.push(step("members-filtered match", (h, b)));
    let (h, b) = c.call("members-filtered", 9, filtered("w", ""), true).await;
    assert_eq!(
        get(b.as_ref().unwrap(), "Members")
            .as_array()
            .unwrap()
            .len(),
        0,
        "tag regexes are anchored"
    );
    steps.push(step("members-filtered anchored", (h, b)));

    steps.push(step("stats", c.call("stats", 10, None, true).await));

    let stream = |t: &str| Some(map(&[("Type", Value::from(t))]));
    steps.push(step(
        "bad filter",
        c.call("stream", 11, stream("member-join, user"), false)
            .await,
    ));
    steps.push(step(
        "stream",
        c.call("stream", 12, stream("member-join,user:deploy"), false)
            .await,
    ));
    c.streams.insert(12);
    steps.push(step(
        "stream seq reused",
        c.call("stream", 12, stream("*"), false).await,
    ));

    // A user event from this connection comes back on the stream.
    let ev = Some(map(&[
        ("Name", Value::from("deploy")),
        ("Payload", Value::Binary(b"v1.2.3".to_vec())),
        ("Coalesce", Value::from(false)),
    ]));
    steps.push(step("event", c.call("event", 13, ev, false).await));
    let (h, b) = c.record(12).await;
    steps.push(step("user record", (h, Some(b))));

    join.await;
    // The agent's own join, coalesced at its start, may come first or in the same record
    // depending on timing: it is left out, and the joined member compared.
    let (h, b) = loop {
        let (h, mut b) = c.record(12).await;
        assert_eq!(get(&b, "Event").as_str(), Some("member-join"), "{b}");
        let members = match &mut b {
            Value::Map(m) => m
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some("Members"))
                .map(|(_, v)| v),
            _ => None,
        };
        if let Some(Value::Array(ms)) = members {
            ms.retain(|m| get(m, "Name").as_str() != Some(name));
            if ms.is_empty() {
                continue;
            }
        }
        break (h, b);
    };
    steps.push(step("member-join record", (h, Some(b))));

    steps.push(step(
        "stop",
        c.call("stop", 14, Some(map(&[("Stop", Value::from(12))])), false)
            .await,
    ));
    c.streams.remove(&12);

    // A query to the agent itself, answered on the same connection through its stream.
    steps.push(step(
        "query stream",
        c.call("stream", 15, stream("query"), false).await,
    ));
    c.streams.insert(15);
    let q = Some(map(&[
        ("FilterNodes", Value::Array(vec![Value::from(name)])),
        ("FilterTags", Value::Map(vec![])),
        ("RequestAck", Value::from(true)),
        ("RelayFactor", Value::from(0)),
        ("Timeout", Value::from(800_000_000i64)),
        ("Name", Value::from("load")),
        ("Payload", Value::Binary(b"5m".to_vec())),
    ]));
    steps.push(step("query", c.call("query", 16, q, false).await));
    c.streams.insert(16);
    let (h, b) = c.record(15).await;
    let id = get(&b, "ID").as_u64().unwrap();
    steps.push(step("query record", (h, Some(b))));
    let respond = |id: u64| {
        Some(map(&[
            ("ID", Value::from(id)),
            ("Payload", Value::Binary(b"answer".to_vec())),
        ]))
    };
    steps.push(step(
        "respond",
        c.call("respond", 17, respond(id), false).await,
    ));
    steps.push(step(
        "respond again",
        c.call("respond", 18, respond(id), false).await,
    ));
    steps.push(step(
        "respond unknown",
        c.call("respond", 19, respond(999), false).await,
    ));
    let mut kinds = Vec::new();
    loop {
        let (h, b) = c.record(16).await;
        let kind = get(&b, "Type").as_str().unwrap().to_string();
        kinds.push(kind.clone());
        let label = match kind.as_str() {
            "ack" => "query ack",
            "response" => "query response",
            _ => "query done",
        };
        steps.push(step(label, (h, Some(b))));
        if kind == "done" {
            break;
        }
    }
    assert_eq!(kinds, ["ack", "response", "done"]);

    // An unknown command: an error, then the agent closes the connection.
    let r = c.call("bogus", 20, None, false).await;
    let mut s = step("unknown command", r);
    s.closed = c.closed().await;
    steps.push(s);

    // A members-filtered regex that does not compile: the connection closes, no reply.
    let mut c = Raw::connect(addr).await;
    c.call("handshake", 1, hs(1), false).await;
    c.call("auth", 2, auth(AUTH), false).await;
    let bad = map(&[
        ("Tags", Value::Nil),
        ("Status", Value::from("")),
        ("Name", Value::from("(")),
    ]);
    c.send("members-filtered", 3, Some(bad)).await;
    steps.push(Step {
        label: "bad regex",
        frames: Vec::new(),
        closed: c.closed().await,
    });
    steps
}

fn compare(real: &[Step], synthetic: &[Step]) {
    assert_eq!(
        real.iter().map(|s| s.label).collect::<Vec<_>>(),
        synthetic.iter().map(|s| s.label).collect::<Vec<_>>()
    );
    for (r, s) in real.iter().zip(synthetic) {
        let what = r.label;
        assert_eq!(r.frames.len(), s.frames.len(), "{what}: frame count");
        assert_eq!(r.closed, s.closed, "{what}: connection closed");
        for (i, (rf, sf)) in r.frames.iter().zip(&s.frames).enumerate() {
            assert_eq!(
                shape(rf),
                shape(sf),
                "{what}: frame {i} structure\nreal: {rf}\nsynthetic: {sf}"
            );
            // Struct maps come in the agent's (alphabetical) key order; the stats body is a Go
            // map, whose order is random.
            if !(what == "stats" && i == 1) {
                assert_eq!(key_order(rf), key_order(sf), "{what}: frame {i} key order");
            }
        }
        let is_header = |v: &Value| key_order(v) == ["\"Error\"", "\"Seq\""];
        for (rh, sh) in r
            .frames
            .iter()
            .zip(&s.frames)
            .filter(|(rh, _)| is_header(rh))
        {
            assert_eq!(get(rh, "Error"), get(sh, "Error"), "{what}: error string");
            assert_eq!(get(rh, "Seq"), get(sh, "Seq"), "{what}: seq");
        }
        // Member maps: keys in the agent's order.
        if let Some(body) = r.frames.get(1) {
            let members = |b: &Value| get(b, "Members").as_array().cloned().unwrap_or_default();
            for (rm, sm) in members(body).iter().zip(members(&s.frames[1]).iter()) {
                assert_eq!(key_order(rm), key_order(sm), "{what}: member key order");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_match_a_real_agent() {
    let real = tokio::task::spawn_blocking(|| {
        Agent::start(
            AgentConfig::new("synth-real-a")
                .tag("role", "web")
                .tag("dc", "east")
                .rpc_auth(AUTH),
            &[],
        )
    })
    .await
    .unwrap()
    .unwrap();
    let synthetic = SyntheticAgent::start(
        SyntheticConfig::new("synth-fake-a")
            .tag("role", "web")
            .tag("dc", "east")
            .auth(AUTH),
    )
    .await
    .unwrap();

    let seed = real.bind_addr();
    let real_join = async move {
        tokio::task::spawn_blocking(move || {
            Agent::start(AgentConfig::new("synth-real-b").tag("role", "db"), &[seed])
        })
        .await
        .unwrap()
        .unwrap()
    };
    let (real_steps, joined) = {
        let joined = std::sync::Mutex::new(None);
        let steps = conversation(real.rpc_addr(), "synth-real-a", async {
            *joined.lock().unwrap() = Some(real_join.await);
        })
        .await;
        (steps, joined.into_inner().unwrap())
    };
    let synthetic_steps = conversation(synthetic.addr(), "synth-fake-a", async {
        synthetic.add_members([SyntheticMember::new("synth-fake-b").tag("role", "db")]);
    })
    .await;
    drop(joined);
    compare(&real_steps, &synthetic_steps);
    let closing: Vec<&str> = real_steps
        .iter()
        .filter(|s| s.closed)
        .map(|s| s.label)
        .collect();
    assert_eq!(
        closing,
        ["before handshake", "unknown command", "bad regex"]
    );
    let twice = real_steps
        .iter()
        .find(|s| s.label == "event before auth")
        .unwrap();
    assert_eq!(twice.frames.len(), 2);

    // The stats sections and their keys, beyond the kinds compared above.
    let stats = |steps: &[Step]| {
        let s = steps.iter().find(|s| s.label == "stats").unwrap();
        let sections: BTreeMap<String, BTreeSet<String>> = s.frames[1]
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_string(), key_order(v).into_iter().collect()))
            .collect();
        sections
    };
    assert_eq!(stats(&real_steps), stats(&synthetic_steps));
    assert_eq!(synthetic.responses().len(), 1);
    assert_eq!(synthetic.responses()[0].payload, b"answer");
}

fn client_config(agent: &SyntheticAgent) -> ClientConfig {
    ClientConfig::new(agent.rpc_addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_members_listed_by_the_client() {
    let members = SyntheticMember::numbered("m", 0..50_000, [("role", "web"), ("dc", "east")]);
    let agent = SyntheticAgent::start(SyntheticConfig::new("big").members(members))
        .await
        .unwrap();
    let client = Client::connect(client_config(&agent)).await.unwrap();
    let started = Instant::now();
    let listed = client.members().await.unwrap();
    let took = started.elapsed();
    println!("members of 50,001 listed in {took:?}");
    assert_eq!(listed.len(), 50_001);
    let names: HashSet<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), 50_001);
    let m = listed.iter().find(|m| m.name == "m49999").unwrap();
    assert_eq!(m.addr.to_string(), "10.0.195.79");
    assert_eq!(m.tags["role"], "web");
    assert_eq!(m.status.as_str(), "alive");

    let filter = serf_client::MembersFilter {
        name: "m4999.".into(),
        ..Default::default()
    };
    assert_eq!(client.members_filtered(&filter).await.unwrap().len(), 10);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats["serf"]["members"], "50001");
    assert_eq!(stats["agent"]["name"], "big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_ten_thousand_failures_reaches_a_reading_client() {
    let members = SyntheticMember::numbered("s", 0..10_000, [("role", "web")]);
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("storm")
            .members(members)
            .coalesce(None),
    )
    .await
    .unwrap();
    let client = Client::connect(client_config(&agent)).await.unwrap();
    let mut stream = client.stream("member-failed").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < 10_000 {
            match stream.next().await {
                Some(Ok(Event::Member(m))) => {
                    assert_eq!(m.kind.as_str(), "member-failed");
                    for member in m.members {
                        assert_eq!(member.status.as_str(), "failed");
                        assert!(seen.insert(member.name), "each failure once");
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (seen.len(), stream.dropped())
    });
    let started = Instant::now();
    let played = agent
        .play_storm(&names, MemberEventKind::Failed, Duration::from_secs(2))
        .await;
    let spread = started.elapsed();
    assert_eq!(played, 10_000);
    assert!(
        spread >= Duration::from_millis(1900),
        "spread over the duration: {spread:?}"
    );
    assert!(agent.settled(WAIT).await);
    assert_eq!(agent.queued(), 0);
    let (seen, client_dropped) = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(seen, 10_000);
    assert_eq!(client_dropped, 0);
    assert_eq!(agent.dropped(), 0);
    assert_eq!(agent.delivered(), 10_000);
    assert_eq!(agent.status("s42"), Some(Status::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_events_at_the_stream() {
    // Big tags make each record about 2 KiB, so the socket buffers fill quickly.
    let big = "x".repeat(2000);
    let members = SyntheticMember::numbered("d", 0..20_000, [("blob", big.as_str())]);
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("stall")
            .members(members)
            .coalesce(None),
    )
    .await
    .unwrap();
    let mut raw = Raw::connect(agent.addr()).await;
    raw.call(
        "handshake",
        0,
        Some(map(&[("Version", Value::from(1))])),
        false,
    )
    .await;
    let (h, _) = raw
        .call("stream", 1, Some(map(&[("Type", Value::from("*"))])), false)
        .await;
    assert_eq!(get(&h, "Error").as_str(), Some(""));
    // The subscriber stops reading here.
    assert_eq!(agent.fail(&names), 20_000);
    let deadline = Instant::now() + WAIT;
    while agent.dropped() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !agent.settled(Duration::from_millis(50)).await,
        "records stay queued for a subscriber that does not read"
    );
    let queued = agent.queued();
    assert!(
        queued > 0 && queued <= 512,
        "at most the agent's 512 queued: {queued}"
    );
    let dropped = agent.dropped();
    println!(
        "events dropped at the stream: {dropped}, written to the socket: {}",
        agent.delivered()
    );
    assert!(dropped > 0);
    assert!(dropped + agent.delivered() <= 20_000);
    // Another client is still served while that one is stuck.
    let client = Client::connect(client_config(&agent)).await.unwrap();
    assert_eq!(client.members().await.unwrap().len(), 20_001);
    drop(raw);
}

async fn next(s: &mut serf_client::EventStream) -> Event {
    tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_batches_member_and_user_events_like_the_agent() {
    let members = SyntheticMember::numbered("c", 0..1000, [("role", "web")]);
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let window = Coalesce {
        period: Duration::from_millis(600),
        quiescent: Duration::from_millis(250),
    };
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("co")
            .members(members)
            .coalesce(Some(window)),
    )
    .await
    .unwrap();
    // The agent's own join at start goes through the first window: let it pass.
    assert!(agent.settled(WAIT).await);
    let client = Client::connect(client_config(&agent)).await.unwrap();
    let mut stream = client.stream("*").await.unwrap();

    agent.fail(&names[..500]);
    agent.fail(&names[500..]);
    assert_eq!(agent.coalescing(), 1000, "held until the window closes");
    let Event::Member(m) = next(&mut stream).await else {
        panic!("a member event")
    };
    assert_eq!(m.kind.as_str(), "member-failed");
    assert_eq!(m.members.len(), 1000, "one record for the whole batch");

    // Within one window: a join then an update of the same member keeps only the update;
    // a member that comes back and fails again ends where it was last delivered (failed),
    // so nothing is played for it.
    agent.set_status(&names[..10], Status::Alive);
    agent.update_tags("c0", [("role".to_string(), "db".to_string())].into());
    agent.set_status(["c10"], Status::Alive);
    agent.fail(["c10"]);
    let mut got = Vec::new();
    for _ in 0..2 {
        let Event::Member(m) = next(&mut stream).await else {
            panic!("a member event")
        };
        got.push((m.kind.as_str().to_string(), m.members.len()));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("member-join".to_string(), 9),
            ("member-update".to_string(), 1)
        ]
    );

    // User events with Coalesce: only the newest of a name in the window is delivered.
    for i in 1..=5 {
        agent.user_event("cx", format!("p{i}").as_bytes(), true);
    }
    agent.user_event("plain", b"now", false);
    let Event::User(u) = next(&mut stream).await else {
        panic!("a user event")
    };
    assert_eq!(
        (u.name.as_str(), u.payload.as_slice()),
        ("plain", &b"now"[..])
    );
    let Event::User(u) = next(&mut stream).await else {
        panic!("a user event")
    };
    assert_eq!((u.name.as_str(), u.payload.as_slice()), ("cx", &b"p5"[..]));
    assert_eq!(agent.dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_answered_through_the_client_and_recorded() {
    let agent = SyntheticAgent::start(SyntheticConfig::new("q").auth("k"))
        .await
        .unwrap();
    let client = Client::connect(client_config(&agent).with_auth("k"))
        .await
        .unwrap();
    let mut stream = client.stream("query:load").await.unwrap();
    // Deadlines long enough for a loaded machine: the answer must come before them.
    let ltime = agent.query("other", b"x", Duration::from_secs(30));
    let ltime2 = agent.query("load", b"5m", Duration::from_secs(30));
    assert_eq!(ltime2, ltime + 1);
    let Some(Ok(Event::Query(q))) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() else {
        panic!("a query")
    };
    assert_eq!((q.name.as_str(), q.ltime, q.id), ("load", ltime2, 1));
    client.respond(q.id, b"0.42").await.unwrap();
    let again = client.respond(q.id, b"0.42").await.unwrap_err();
    assert!(
        again.to_string().contains("response already sent"),
        "{again}"
    );
    let responses = agent.responses();
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].payload, b"0.42");
    assert_eq!(responses[0].query, "load");

    // Stopping the agent closes the connection and the listener.
    agent.stop();
    let deadline = Instant::now() + WAIT;
    while !client.is_closed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.is_closed());
    assert!(Client::connect(client_config(&agent)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_leave_tags_and_leave_commands_change_the_cluster() {
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("cmds")
            .tag("role", "web")
            .members([SyntheticMember::new("gone"), SyntheticMember::new("alive")])
            .coalesce(None),
    )
    .await
    .unwrap();
    let client = Client::connect(client_config(&agent)).await.unwrap();
    let mut stream = client
        .stream("member-leave,member-reap,member-update")
        .await
        .unwrap();

    agent.fail(["gone"]);
    client.force_leave("gone", false).await.unwrap();
    let Event::Member(m) = next(&mut stream).await else {
        panic!("a member event")
    };
    assert_eq!(m.kind.as_str(), "member-leave");
    assert_eq!(m.members[0].status.as_str(), "left");
    client.force_leave("gone", true).await.unwrap();
    let Event::Member(m) = next(&mut stream).await else {
        panic!("a member event")
    };
    assert_eq!(
        (m.kind.as_str(), m.members[0].status.as_str()),
        ("member-reap", "left")
    );
    assert_eq!(agent.status("gone"), None);
    // An alive member is not force-left, and an unknown one is no error.
    client.force_leave("alive", true).await.unwrap();
    client.force_leave("nobody", false).await.unwrap();
    assert_eq!(agent.status("alive"), Some(Status::Alive));

    client
        .tags(
            &[("dc".to_string(), "east".to_string())].into(),
            &["role".to_string()],
        )
        .await
        .unwrap();
    let Event::Member(m) = next(&mut stream).await else {
        panic!("a member event")
    };
    assert_eq!(m.kind.as_str(), "member-update");
    assert_eq!(m.members[0].name, "cmds");
    assert_eq!(
        m.members[0].tags,
        [("dc".to_string(), "east".to_string())].into()
    );
    let stats = client.stats().await.unwrap();
    assert_eq!(
        stats["tags"],
        [("dc".to_string(), "east".to_string())].into()
    );

    client.leave().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !agent.is_stopped() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(agent.is_stopped());
}
