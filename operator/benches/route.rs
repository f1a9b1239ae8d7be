//! Routing throughput of the engine with 1,000 routes across 100 handlers (no API calls).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::SystemTime;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serf_client::{
    Event, Member, MemberEvent, MemberEventKind, MemberStatus, QueryEvent, UserEvent,
};
use serf_operator::contract::SelfNode;
use serf_operator::engine::{Context, Engine, Membership, NoActiveJobs};
use serf_operator::manifests::parse_handlers;

fn handlers() -> Vec<serf_operator_crds::SerfHandler> {
    let mut yaml = String::new();
    for h in 0..100 {
        yaml.push_str(&format!(
            "---\napiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {{name: h{h:03}, namespace: ns{}}}\nspec:\n  role: {}\n  routes:\n",
            h % 10,
            if h % 2 == 0 { "web" } else { "db" }
        ));
        for r in 0..10 {
            let events = match r % 5 {
                0 => format!("user:ev{}", (h * 10 + r) % 200),
                1 => "member-failed".to_string(),
                2 => format!("query:q{}", h % 20),
                3 => format!("user:ev{},member-join", (h + r) % 200),
                _ => format!("user:other{h}"),
            };
            let action = if events.starts_with("query") {
                "      respond: {payload: \"$(SERF_SELF_NAME)\"}\n".to_string()
            } else {
                "      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}\n".to_string()
            };
            let members = if r % 5 == 1 {
                "      members: {role: db}\n"
            } else {
                ""
            };
            yaml.push_str(&format!(
                "    - name: r{r}\n      events: \"{events}\"\n{members}{action}"
            ));
        }
    }
    parse_handlers(&yaml, Path::new("bench.yaml")).expect("bench handlers")
}

fn events() -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..200u64 {
        out.push(Event::User(UserEvent {
            ltime: i,
            name: format!("ev{i}"),
            payload: b"v1.2.3".to_vec(),
            coalesce: false,
        }));
    }
    for i in 0..20u64 {
        out.push(Event::Query(QueryEvent {
            id: i,
            ltime: i,
            name: format!("q{i}"),
            payload: Vec::new(),
        }));
    }
    out.push(Event::User(UserEvent {
        ltime: 1,
        name: "nobody".into(),
        payload: Vec::new(),
        coalesce: false,
    }));
    out.push(Event::Member(MemberEvent {
        kind: MemberEventKind::Failed,
        members: vec![Member::new(
            "db-1",
            "10.0.0.1".parse().expect("ip"),
            7946,
            [("role".to_string(), "db".to_string())].into(),
            MemberStatus::Failed,
        )],
    }));
    out
}

fn bench(c: &mut Criterion) {
    let hs = handlers();
    let mut engine = Engine::new(&hs, Membership::default());
    assert_eq!(
        engine.router().route_count(),
        1000,
        "{:?}",
        engine.router().errors().next()
    );
    let node = SelfNode {
        name: "n1".into(),
        tags: [("role".to_string(), "web".to_string())].into(),
    };
    let evs = events();
    let ctx = Context {
        node: &node,
        pod: ("p", "ns"),
        active: &NoActiveJobs,
        now: SystemTime::UNIX_EPOCH,
        replayed: false,
    };
    let actions: usize = evs
        .iter()
        .map(|e| engine.route(e, &ctx).actions.len())
        .sum();
    assert!(
        actions > 200,
        "the mix must exercise launches, answers and skips: {actions}"
    );
    let mut g = c.benchmark_group("route_1000_routes");
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.bench_function("mixed_events", |b| {
        b.iter(|| {
            for e in &evs {
                black_box(engine.route(black_box(e), &ctx));
            }
        })
    });
    g.finish();
    c.bench_function("compile_100_handlers", |b| {
        b.iter(|| black_box(Engine::new(black_box(&hs), Membership::default())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
