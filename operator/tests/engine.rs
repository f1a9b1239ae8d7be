//! The routing engine on the shipped examples and on handlers written for each rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::batch::v1::Job;
use serf_client::{
    Event, Member, MemberEvent, MemberEventKind, MemberStatus, QueryEvent, UserEvent,
};
use serf_operator::contract::SelfNode;
use serf_operator::engine::{
    Action, ActiveJobs, Context, Engine, Launch, Membership, NoActiveJobs, Outcome,
    REAP_HORIZON_SECS, SkipReason,
};
use serf_operator::jobs::HandlerRef;
use serf_operator::manifests::{load_handlers, parse_handlers};
use serf_operator_crds::SerfHandler;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn node(role: &str) -> SelfNode {
    SelfNode {
        name: "node1".into(),
        tags: [
            ("role".to_string(), role.to_string()),
            ("dc".to_string(), "eu-west".to_string()),
        ]
        .into(),
    }
}

fn user(name: &str, ltime: u64, payload: &[u8]) -> Event {
    Event::User(UserEvent {
        ltime,
        name: name.into(),
        payload: payload.to_vec(),
        coalesce: false,
    })
}

fn query(name: &str, id: u64, payload: &[u8]) -> Event {
    Event::Query(QueryEvent {
        id,
        ltime: 3,
        name: name.into(),
        payload: payload.to_vec(),
    })
}

fn member(name: &str, role: &str, status: MemberStatus) -> Member {
    Member::new(
        name,
        "10.0.0.5".parse().unwrap(),
        7946,
        [("role".to_string(), role.to_string())].into(),
        status,
    )
}

fn members_event(kind: MemberEventKind, members: Vec<Member>) -> Event {
    Event::Member(MemberEvent { kind, members })
}

fn route_with(
    engine: &mut Engine,
    event: &Event,
    node: &SelfNode,
    active: &dyn ActiveJobs,
    now: SystemTime,
) -> Outcome {
    engine.route(
        event,
        &Context {
            node,
            pod: ("op-0", "serf-system"),
            active,
            now,
            replayed: false,
        },
    )
}

fn route(engine: &mut Engine, event: &Event, node: &SelfNode) -> Outcome {
    route_with(engine, event, node, &NoActiveJobs, SystemTime::UNIX_EPOCH)
}

fn launches(o: &Outcome) -> Vec<&Launch> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch(l) => Some(l.as_ref()),
            _ => None,
        })
        .collect()
}

fn env_of(job: &Job) -> BTreeMap<String, String> {
    job.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

fn handler(yaml: &str) -> Vec<SerfHandler> {
    parse_handlers(yaml, Path::new("test.yaml")).unwrap()
}

const JOB: &str = r#"
      job:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers: [{name: c, image: busybox}]"#;

#[test]
fn every_example_parses_and_has_valid_routes() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let names: Vec<_> = handlers
        .iter()
        .map(|h| h.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["db", "db-remediation", "web", "where"]);
    let engine = Engine::new(&handlers, Membership::default());
    let errors: Vec<_> = engine.router().errors().collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(engine.router().route_count(), 5);
    // Triggers parse too (and are not handlers).
    for f in std::fs::read_dir(examples().join("triggers")).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        let t: serf_operator_crds::SerfEventTrigger = serde_yaml::from_str(&text).unwrap();
        assert!(t.spec.event.is_some() != t.spec.query.is_some());
        if let (Some(w), Some(ev)) = (&t.spec.watch, &t.spec.event) {
            serf_operator::watch::compile(w, ev.payload.as_deref().unwrap_or("")).unwrap();
        }
    }
}

#[test]
fn web_handler_deploys_on_its_role_only() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let ev = user("deploy", 42, b"v1.2.3");
    let o = route(&mut engine, &ev, &node("web"));
    assert_eq!(o.event, "user:deploy@42");
    let l = launches(&o);
    assert_eq!(l.len(), 1);
    let job = &l[0].job;
    assert_eq!(job.metadata.namespace.as_deref(), Some("serf-examples"));
    assert!(
        job.metadata
            .name
            .as_ref()
            .unwrap()
            .starts_with("web-deploy-")
    );
    let env = env_of(job);
    assert_eq!(env["SERF_EVENT"], "user");
    assert_eq!(env["SERF_USER_EVENT"], "deploy");
    assert_eq!(env["SERF_USER_LTIME"], "42");
    assert_eq!(env["SERF_PAYLOAD"], "v1.2.3");
    assert_eq!(env["SERF_SELF_ROLE"], "web");
    assert_eq!(env["SERF_TAG_DC"], "eu-west");
    assert!(!env.contains_key("SERF_PAYLOAD_BASE64"));
    let labels = job.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["serf.operator.io/handler"], "web");
    assert_eq!(labels["serf.operator.io/route"], "deploy");
    assert_eq!(labels["serf.operator.io/event"], "user");
    assert_eq!(labels["serf.operator.io/event-name"], "deploy");
    // /serf/stdin: the payload plus a newline, as Serf pipes it, in the Job itself (a
    // downward-API volume of a pod annotation): no second object.
    let stdin = &l[0].stdin_bytes();
    assert_eq!(stdin, b"v1.2.3\n");
    assert!(l[0].stdin.is_none());
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "serf-operator-stdin")
        .unwrap();
    let item = &vol.downward_api.as_ref().unwrap().items.as_ref().unwrap()[0];
    assert_eq!(item.path, "stdin");
    assert_eq!(
        item.field_ref.as_ref().unwrap().field_path,
        "metadata.annotations['serf.operator.io/stdin']"
    );

    // On a db node the web route skips with the reason; the db route does not take deploy.
    let o = route(&mut engine, &ev, &node("db"));
    assert_eq!(o.actions.len(), 1);
    match &o.actions[0] {
        Action::Skip {
            reason, message, ..
        } => {
            assert_eq!(*reason, SkipReason::RoleMismatch);
            assert!(message.contains("\"db\""), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // Members joining: the web handler's member-join route gets them on /serf/stdin.
    let join = members_event(
        MemberEventKind::Join,
        vec![
            member("web-2", "web", MemberStatus::Alive),
            member("db-3", "db", MemberStatus::Alive),
        ],
    );
    let o = route(&mut engine, &join, &node("web"));
    let l = launches(&o);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].route, "member-join");
    assert_eq!(env_of(&l[0].job)["SERF_EVENT"], "member-join");
    assert_eq!(
        l[0].stdin_bytes(),
        b"web-2\t10.0.0.5\tweb\trole=web\ndb-3\t10.0.0.5\tdb\trole=db\n"
    );

    // The db handler's backup on a db node; its template labels are kept.
    let o = route(&mut engine, &user("backup", 7, b"nightly"), &node("db"));
    let l = launches(&o);
    assert_eq!(l.len(), 1);
    assert_eq!(
        l[0].job.metadata.labels.as_ref().unwrap()["team"],
        "storage"
    );
}

#[test]
fn job_names_are_deterministic_and_distinct() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let mut a = Engine::new(&handlers, Membership::default());
    let mut b = Engine::new(&handlers, Membership::default());
    let name = |e: &mut Engine, ev: &Event| {
        launches(&route(e, ev, &node("web")))[0]
            .job
            .metadata
            .name
            .clone()
            .unwrap()
    };
    let n1 = name(&mut a, &user("deploy", 42, b"v1"));
    // Another engine (restart, second replica) names the same event the same way.
    assert_eq!(n1, name(&mut b, &user("deploy", 42, b"v1")));
    // Same Lamport time from another sender with another payload: another event.
    assert_ne!(n1, name(&mut a, &user("deploy", 42, b"v2")));
    assert_ne!(n1, name(&mut a, &user("deploy", 43, b"v1")));
    assert!(n1.len() <= 63);
}

#[test]
fn member_flap_gets_new_jobs_and_duplicates_do_not() {
    let handlers = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: m, namespace: ops}}
spec:
  routes:
    - name: failed
      events: member-failed,member-join
{JOB}
"#
    ));
    let mut engine = Engine::new(&handlers, Membership::default());
    let n = node("web");
    let name = |e: &mut Engine, ev: &Event| {
        launches(&route(e, ev, &n))[0]
            .job
            .metadata
            .name
            .clone()
            .unwrap()
    };
    let failed = members_event(
        MemberEventKind::Failed,
        vec![member("db-1", "db", MemberStatus::Failed)],
    );
    let alive = members_event(
        MemberEventKind::Join,
        vec![member("db-1", "db", MemberStatus::Alive)],
    );
    let first = name(&mut engine, &failed);
    let duplicate = route(&mut engine, &failed, &n);
    assert!(
        duplicate.no_news && duplicate.actions.is_empty(),
        "a duplicate delivery is no news: {duplicate:?}"
    );
    let _ = name(&mut engine, &alive);
    let again = name(&mut engine, &failed);
    assert_ne!(first, again, "failed, alive, failed is a flap: a new Job");
    assert_eq!(engine.membership().members["db-1"].version, 3);
}

/// A restarted agent announces every member in one member-join: only the members whose
/// state changed are routed, and an unchanged batch launches nothing.
#[test]
fn a_restarted_agent_announcing_known_members_launches_nothing() {
    let handlers = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: m, namespace: ops}}
spec:
  routes:
    - name: joins
      events: member-join
{JOB}
"#
    ));
    let mut engine = Engine::new(&handlers, Membership::default());
    let n = node("web");
    let join = |names: &[&str]| {
        members_event(
            MemberEventKind::Join,
            names
                .iter()
                .map(|x| member(x, "db", MemberStatus::Alive))
                .collect(),
        )
    };
    assert_eq!(
        launches(&route(&mut engine, &join(&["a", "b"]), &n)).len(),
        1
    );
    // The agent restarts and announces a, b and a new member c in one batch.
    let o = route(&mut engine, &join(&["c", "a", "b"]), &n);
    let l = launches(&o);
    assert_eq!(l.len(), 1);
    assert_eq!(o.event, "member-join:c");
    assert_eq!(l[0].stdin_bytes(), b"c\t10.0.0.5\tdb\trole=db\n");
    // Again, in another order: nothing is news.
    let o = route(&mut engine, &join(&["b", "c", "a"]), &n);
    assert!(o.no_news && o.actions.is_empty(), "{o:?}");
    // A tag change is news for that member only.
    let mut a2 = member("a", "db", MemberStatus::Alive);
    a2.tags.insert("ver".into(), "2".into());
    let o = route(
        &mut engine,
        &members_event(
            MemberEventKind::Join,
            vec![a2, member("b", "db", MemberStatus::Alive)],
        ),
        &n,
    );
    assert_eq!(o.event, "member-join:a");
    assert_eq!(launches(&o).len(), 1);
}

/// A Serf cluster restarted as a whole starts its Lamport clocks again: `deploy@1` of the
/// new epoch is a new Job, not a duplicate of the old `deploy@1`.
#[test]
fn a_new_lamport_epoch_is_kept_apart() {
    let handlers = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: d, namespace: ops}}
spec:
  routes:
    - name: deploy
      events: user:deploy
{JOB}
"#
    ));
    let mut engine = Engine::new(&handlers, Membership::default());
    let n = node("web");
    let job = |e: &mut Engine, ltime: u64| {
        launches(&route(e, &user("deploy", ltime, b"v1"), &n))[0]
            .job
            .metadata
            .name
            .clone()
            .unwrap()
    };
    let old = job(&mut engine, 1);
    // A fresh agent's clock is 1: behind an agent that delivered event 1 (clock 2).
    let mut fresh = engine.membership().clone();
    assert!(fresh.witness_agent_clock(1));
    assert_eq!(old, job(&mut engine, 1), "a redelivery is the same Job");
    let _ = job(&mut engine, 900);
    assert_eq!(engine.membership().epoch, 0);
    // deploy@1 again, more than Serf's event buffer behind the newest event: a new epoch.
    let new = job(&mut engine, 1);
    assert_ne!(old, new);
    assert_eq!(engine.membership().epoch, 1);
    assert_eq!(
        new,
        job(&mut engine, 1),
        "and within it, a redelivery is the same Job"
    );
    assert_eq!(engine.membership().epoch, 1);

    // Read from the agent on connecting: a clock behind the newest event seen.
    let mut m = Membership::default();
    assert!(!m.witness_event(40));
    assert!(
        !m.witness_agent_clock(41),
        "the clock of an agent that delivered event 40: same epoch"
    );
    assert!(!m.witness_agent_clock(45));
    assert!(m.witness_agent_clock(3), "behind: the cluster restarted");
    assert_eq!((m.epoch, m.event_clock), (1, 3));
    // The epoch is persisted with the membership.
    let back: Membership = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(back.epoch, 1);
    // A record from before the epoch existed reads as epoch 0.
    let legacy: Membership = serde_json::from_str(r#"{"members":{}}"#).unwrap();
    assert_eq!(legacy.epoch, 0);
}

#[test]
fn remediation_coalesces_db_failures_only() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let n = node("web");
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let ev1 = members_event(
        MemberEventKind::Failed,
        vec![
            member("db-1", "db", MemberStatus::Failed),
            member("web-9", "web", MemberStatus::Failed),
        ],
    );
    let o = route_with(&mut engine, &ev1, &n, &NoActiveJobs, t0);
    assert!(
        matches!(&o.actions[..], [Action::Deferred { until, .. }] if *until == t0 + Duration::from_secs(10))
    );
    // Only web members: filtered, with the reason.
    let ev2 = members_event(
        MemberEventKind::Failed,
        vec![member("web-2", "web", MemberStatus::Failed)],
    );
    let o = route_with(
        &mut engine,
        &ev2,
        &n,
        &NoActiveJobs,
        t0 + Duration::from_secs(2),
    );
    assert!(matches!(
        &o.actions[..],
        [Action::Skip {
            reason: SkipReason::MembersFiltered,
            ..
        }]
    ));
    let ev3 = members_event(
        MemberEventKind::Failed,
        vec![member("db-2", "db", MemberStatus::Failed)],
    );
    route_with(
        &mut engine,
        &ev3,
        &n,
        &NoActiveJobs,
        t0 + Duration::from_secs(5),
    );
    assert_eq!(engine.next_deadline(), Some(t0 + Duration::from_secs(10)));

    let ctx = |now| Context {
        node: &n,
        pod: ("", ""),
        active: &NoActiveJobs,
        now,
        replayed: false,
    };
    assert!(engine.flush(&ctx(t0 + Duration::from_secs(9))).is_empty());
    let out = engine.flush(&ctx(t0 + Duration::from_secs(10)));
    assert_eq!(out.len(), 1);
    let l = launches(&out[0]);
    assert_eq!(l.len(), 1);
    let stdin = String::from_utf8(l[0].stdin_bytes()).unwrap();
    assert_eq!(
        stdin,
        "db-1\t10.0.0.5\tdb\trole=db\ndb-2\t10.0.0.5\tdb\trole=db\n"
    );
    assert_eq!(env_of(&l[0].job)["SERF_EVENT"], "member-failed");
    assert!(engine.next_deadline().is_none());
}

#[test]
fn concurrency_policies() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let mut active: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    active.insert(
        ("serf-examples".into(), "web".into(), "deploy".into()),
        vec!["web-deploy-old".into()],
    );
    let o = route_with(
        &mut engine,
        &user("deploy", 9, b"x"),
        &node("web"),
        &active,
        SystemTime::UNIX_EPOCH,
    );
    match &o.actions[..] {
        [
            Action::Skip {
                reason: SkipReason::ConcurrencyForbid,
                message,
                ..
            },
        ] => {
            assert!(message.contains("web-deploy-old"))
        }
        other => panic!("{other:?}"),
    }

    let replace = handler(&route_with_policy("Replace"));
    let mut engine = Engine::new(&replace, Membership::default());
    let mut active: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    active.insert(
        ("ns".into(), "r".into(), "go".into()),
        vec!["r-go-1".into()],
    );
    let o = route_with(
        &mut engine,
        &user("go", 1, b""),
        &node("x"),
        &active,
        SystemTime::UNIX_EPOCH,
    );
    assert_eq!(launches(&o)[0].replace, ["r-go-1"]);

    // Under Allow (the default) the active Jobs are not asked for at all: on every event it
    // would be a lookup for nothing.
    struct Counting(std::cell::Cell<usize>);
    impl ActiveJobs for Counting {
        fn active(&self, _: &HandlerRef, _: &str) -> Vec<String> {
            self.0.set(self.0.get() + 1);
            vec!["busy".into()]
        }
    }
    let allow = handler(&route_with_policy("Allow"));
    let mut engine = Engine::new(&allow, Membership::default());
    let counting = Counting(std::cell::Cell::new(0));
    let o = route_with(
        &mut engine,
        &user("go", 2, b""),
        &node("x"),
        &counting,
        SystemTime::UNIX_EPOCH,
    );
    assert_eq!(launches(&o).len(), 1);
    assert_eq!(counting.0.get(), 0);
}

fn route_with_policy(policy: &str) -> String {
    format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: r, namespace: ns}}
spec:
  routes:
    - name: go
      events: user:go
      concurrencyPolicy: {policy}
{JOB}
"#
    )
}

#[test]
fn queries_respond_inline_or_with_the_job_name() {
    let handlers = load_handlers(&[examples()]).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let o = route(&mut engine, &query("where", 17, b""), &node("web"));
    match &o.actions[..] {
        [
            Action::Answer {
                query_id,
                payload,
                handler,
                ..
            },
        ] => {
            assert_eq!(*query_id, 17);
            assert_eq!(payload, b"node1 in serf-system");
            assert_eq!(handler.name, "where");
        }
        other => panic!("{other:?}"),
    }

    let hs = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: q, namespace: ns}}
spec:
  routes:
    - name: run
      events: query:build
{JOB}
    - name: named
      events: query:named
      answer: JobName
{JOB}
    - name: silent
      events: query:silent
      answer: None
{JOB}
---
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: big, namespace: ns}}
spec:
  routes:
    - name: huge
      events: query:huge
      respond: {{payload: "$(SERF_PAYLOAD)$(SERF_PAYLOAD)"}}
    - name: second
      events: query:huge
      respond: {{payload: "second"}}
"#
    ));
    let mut engine = Engine::new(&hs, Membership::default());
    let answer_of = |o: &Outcome| {
        o.actions.iter().find_map(|a| match a {
            Action::Answer { payload, .. } => Some(String::from_utf8(payload.clone()).unwrap()),
            _ => None,
        })
    };
    // By default a job route answers with the Job's output, once it has finished: the
    // launch carries the query, no answer goes out now.
    let o = route(&mut engine, &query("build", 4, b"x"), &node("web"));
    assert_eq!(launches(&o)[0].answer_query, Some(4));
    assert_eq!(answer_of(&o), None);
    // `answer: JobName`: the Job's name, at once; `None`: nothing.
    let o = route(&mut engine, &query("named", 7, b"x"), &node("web"));
    let job = launches(&o)[0].job.metadata.name.clone().unwrap();
    assert_eq!(launches(&o)[0].answer_query, None);
    assert_eq!(answer_of(&o), Some(format!("ns/{job}")));
    let o = route(&mut engine, &query("silent", 8, b"x"), &node("web"));
    assert_eq!(launches(&o)[0].answer_query, None);
    assert_eq!(answer_of(&o), None);

    // Too large after expansion: skipped with the reason; the next route answers instead.
    let o = route(&mut engine, &query("huge", 5, &[b'x'; 600]), &node("web"));
    assert!(matches!(
        o.actions[0],
        Action::Skip {
            reason: SkipReason::ResponseTooLarge,
            ..
        }
    ));
    assert!(matches!(&o.actions[1], Action::Answer { payload, .. } if payload == b"second"));
    // Two respond routes for one query: the first answers, the second is told why not.
    let o = route(&mut engine, &query("huge", 6, b"a"), &node("web"));
    assert!(matches!(&o.actions[0], Action::Answer { payload, .. } if payload == b"aa"));
    assert!(matches!(
        o.actions[1],
        Action::Skip {
            reason: SkipReason::AlreadyAnswered,
            ..
        }
    ));
}

#[test]
fn invalid_routes_are_named_and_the_rest_still_route() {
    let hs = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: mixed, namespace: ns}}
spec:
  routes:
    - name: good
      events: user:good
{JOB}
    - name: bad-filter
      events: "user, query"
{JOB}
    - name: bad-regex
      events: member-join
      members: {{role: "db("}}
{JOB}
    - name: good
      events: user:dup
{JOB}
    - name: both
      events: query
      respond: {{payload: x}}
{JOB}
    - name: respond-user
      events: user:x
      respond: {{payload: x}}
    - name: empty-job
      events: user:y
      job: {{spec: {{template: {{spec: {{containers: []}}}}}}}}
    - name: typo
      events: user:z
      job: {{spec: {{template: {{spec: {{containers: "nope"}}}}}}}}
---
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: badrole, namespace: ns}}
spec:
  role: "web("
  routes:
    - name: r
      events: user:good
{JOB}
"#
    ));
    let mut engine = Engine::new(&hs, Membership::default());
    let errors: Vec<String> = engine.router().errors().map(ToString::to_string).collect();
    let expect = [
        "SerfHandler ns/badrole: role: regex",
        "SerfHandler ns/mixed route bad-filter: events: invalid request: invalid event filter item \" query\"",
        "SerfHandler ns/mixed route bad-regex: members.role: regex \"db(\" does not compile",
        "SerfHandler ns/mixed route good: duplicate route name",
        "SerfHandler ns/mixed route both: a route needs exactly one action",
        "SerfHandler ns/mixed route respond-user: respond answers queries only",
        "SerfHandler ns/mixed route empty-job: job: the template has no spec.template.spec.containers",
        "SerfHandler ns/mixed route typo: job: not a valid JobTemplateSpec",
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    for e in expect {
        assert!(
            errors.iter().any(|x| x.starts_with(e)),
            "missing {e:?} in {errors:#?}"
        );
    }
    assert_eq!(engine.router().route_count(), 1);
    let o = route(&mut engine, &user("good", 1, b""), &node("web"));
    assert_eq!(launches(&o).len(), 1);
    assert_eq!(
        launches(&o)[0].handler,
        HandlerRef {
            namespace: "ns".into(),
            name: "mixed".into(),
            uid: None
        }
    );
    // The duplicate's event is not routed by the dropped route.
    assert!(
        route(&mut engine, &user("dup", 1, b""), &node("web"))
            .actions
            .is_empty()
    );
}

#[test]
fn self_tags_and_binary_payloads() {
    let hs = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: eu, namespace: ns, uid: 1234-abcd}}
spec:
  role: "web|api"
  selfTags: {{dc: "eu-.*"}}
  routes:
    - name: any
      events: "*"
{JOB}
"#
    ));
    let mut engine = Engine::new(&hs, Membership::default());
    let o = route(
        &mut engine,
        &user("blob", 2, &[0xff, 0x00, 0x41]),
        &node("api"),
    );
    let l = launches(&o);
    let env = env_of(&l[0].job);
    assert_eq!(env["SERF_PAYLOAD_BASE64"], "/wBB");
    assert_eq!(l[0].stdin_bytes(), vec![0xff, 0x00, 0x41, b'\n']);
    let owner = &l[0].job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("SerfHandler", "eu", "1234-abcd")
    );
    assert_eq!(owner.controller, Some(true));

    let mut us = node("web");
    us.tags.insert("dc".into(), "us-east".into());
    let o = route(&mut engine, &user("blob", 3, b""), &us);
    assert!(matches!(
        &o.actions[..],
        [Action::Skip {
            reason: SkipReason::SelfTagsMismatch,
            ..
        }]
    ));
}

/// The index finds exactly the routes a scan would, for many handlers and events.
#[test]
fn index_matches_a_full_scan() {
    let filters = [
        "*",
        "user",
        "user:a",
        "user:b",
        "query",
        "query:a",
        "member-*",
        "member-join",
        "member-failed,user:a",
        "user:a,user",
        "query:b,member-reap",
    ];
    let mut yaml = String::new();
    for (i, f) in filters.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {{name: h{i:02}, namespace: ns}}\nspec:\n  routes:\n    - name: r\n      events: \"{f}\"\n{JOB}\n"
        ));
    }
    let hs = handler(&yaml);
    let mut engine = Engine::new(&hs, Membership::default());
    let events = [
        user("a", 1, b""),
        user("b", 1, b""),
        user("c", 1, b""),
        query("a", 1, b""),
        query("b", 1, b""),
        members_event(
            MemberEventKind::Join,
            vec![member("x", "db", MemberStatus::Alive)],
        ),
        members_event(
            MemberEventKind::Reap,
            vec![member("x", "db", MemberStatus::Left)],
        ),
        members_event(
            MemberEventKind::Update,
            vec![member("x", "db", MemberStatus::Alive)],
        ),
    ];
    for ev in events {
        let (name, _) = serf_operator::engine::describe(&ev);
        let mut expected: Vec<String> = filters
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                serf_client::EventFilter::parse(f)
                    .unwrap()
                    .matches(ev.kind(), &name)
            })
            .map(|(i, _)| format!("h{i:02}"))
            .collect();
        expected.sort();
        let mut got: Vec<String> = route(&mut engine, &ev, &node("web"))
            .actions
            .iter()
            .map(|a| a.route().0.name.clone())
            .collect();
        got.sort();
        // A job route on a query also answers with the Job's name: one route, two actions.
        got.dedup();
        assert_eq!(got, expected, "{ev:?}");
    }
}

#[test]
fn incremental_handler_changes_route_like_a_full_compile() {
    let spec = |i: usize, f: &str| {
        format!(
            "---\napiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {{name: h{i:02}, namespace: ns, uid: u{i}, generation: 1}}\nspec:\n  routes:\n    - name: r\n      events: \"{f}\"\n{JOB}\n"
        )
    };
    let first = handler(&[spec(0, "user:a"), spec(1, "user:b"), spec(2, "query")].concat());
    // h00 is deleted, h01 changes its filter (generation 2), h03 is new, h02 is untouched.
    let mut h01 = handler(&spec(1, "user:a"))[0].clone();
    h01.metadata.generation = Some(2);
    let h03 = handler(&spec(3, "user"))[0].clone();
    let mut engine = Engine::new(&first, Membership::default());
    let compiled = engine.update_handlers(&[&h01, &h03], &[("ns".into(), "h00".into())]);
    assert_eq!(compiled.len(), 2);
    // The same spec again compiles nothing.
    assert!(engine.update_handlers(&[&h01], &[]).is_empty());
    let mut full = Engine::new(
        &[h01.clone(), first[2].clone(), h03.clone()],
        Membership::default(),
    );
    for ev in [user("a", 1, b""), user("b", 2, b""), query("q", 1, b"")] {
        let got = names_of(&route(&mut engine, &ev, &node("web")));
        let want = names_of(&route(&mut full, &ev, &node("web")));
        assert_eq!(got, want, "{ev:?}");
    }
    assert_eq!(
        names_of(&route(&mut engine, &user("a", 3, b""), &node("web"))),
        vec!["h01", "h03"]
    );
}

#[test]
fn route_order_is_handler_order_whatever_the_update_order() {
    let spec = |name: &str| {
        format!(
            "---\napiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, generation: 1}}\nspec:\n  routes:\n    - name: r\n      events: \"user\"\n{JOB}\n"
        )
    };
    let one = |name: &str| handler(&spec(name))[0].clone();
    let mut engine = Engine::new(&[one("m"), one("z")], Membership::default());
    // "a" comes after the others, and "b" takes the place "m" left.
    engine.update_handlers(&[&one("a")], &[]);
    engine.update_handlers(&[], &[("ns".into(), "m".into())]);
    engine.update_handlers(&[&one("b")], &[]);
    let order: Vec<String> = route(&mut engine, &user("go", 1, b""), &node("web"))
        .actions
        .iter()
        .map(|a| a.route().0.name.clone())
        .collect();
    assert_eq!(order, ["a", "b", "z"]);
    assert_eq!(engine.router().route_count(), 3);
}

fn names_of(o: &Outcome) -> Vec<String> {
    let mut n: Vec<String> = o.actions.iter().map(|a| a.route().0.name.clone()).collect();
    n.sort();
    n.dedup();
    n
}

#[test]
fn membership_diff_recovers_missed_member_events() {
    let mut ledger = Membership::default();
    // Everything was seen at T; the agent is asked at T + 1 hour.
    const T: i64 = 1_800_000_000;
    let seen = |l: &mut Membership, kind, m: &Member| {
        l.observe(kind, m, T);
    };
    seen(
        &mut ledger,
        MemberEventKind::Join,
        &member("a", "db", MemberStatus::Alive),
    );
    seen(
        &mut ledger,
        MemberEventKind::Join,
        &member("b", "db", MemberStatus::Alive),
    );
    seen(
        &mut ledger,
        MemberEventKind::Join,
        &member("c", "web", MemberStatus::Alive),
    );
    seen(
        &mut ledger,
        MemberEventKind::Failed,
        &member("d", "db", MemberStatus::Failed),
    );
    seen(
        &mut ledger,
        MemberEventKind::Join,
        &member("gone", "db", MemberStatus::Alive),
    );

    let mut c_updated = member("c", "web", MemberStatus::Alive);
    c_updated.tags.insert("ver".into(), "2".into());
    let current = vec![
        member("a", "db", MemberStatus::Alive),   // unchanged: nothing
        member("b", "db", MemberStatus::Failed),  // failed while away
        c_updated,                                // tags changed
        member("d", "db", MemberStatus::Alive),   // recovered
        member("new", "db", MemberStatus::Alive), // joined
        member("e", "db", MemberStatus::Left),    // unknown and already left: nothing
    ];
    let summary = |diff: &[MemberEvent]| -> Vec<(MemberEventKind, Vec<String>)> {
        diff.iter()
            .map(|e| (e.kind, e.members.iter().map(|m| m.name.clone()).collect()))
            .collect()
    };
    let expected = vec![
        (
            MemberEventKind::Join,
            vec!["d".to_string(), "new".to_string()],
        ),
        (MemberEventKind::Failed, vec!["b".to_string()]),
        (MemberEventKind::Update, vec!["c".to_string()]),
    ];
    // "gone" is absent from the agent's list: a freshly started agent may not have heard
    // of it yet, so it is not reaped before Serf itself would (24 hours).
    let diff = ledger.diff(&current, T + 3600);
    assert_eq!(summary(&diff), expected);
    let mut later = expected.clone();
    later.push((MemberEventKind::Reap, vec!["gone".to_string()]));
    assert_eq!(
        summary(&ledger.diff(&current, T + REAP_HORIZON_SECS)),
        later
    );
    // Routing the recovered events makes the ledger match the agent: no second diff.
    let mut engine = Engine::new(&[], ledger);
    for e in diff {
        route(&mut engine, &Event::Member(e), &node("web"));
    }
    assert!(engine.membership().diff(&current, T + 3600).is_empty());
    // And the ledger survives a round trip through JSON (it is persisted in the cluster).
    let json = serde_json::to_string(engine.membership()).unwrap();
    let back: Membership = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, engine.membership());
}

/// A route that gives its Jobs an agent: every container gets `SERF_RPC_ADDR` and
/// `SERF_RPC_AUTH` from the Secret, before its own variables; a template variable of the
/// same name is replaced.
#[test]
fn a_route_can_give_its_jobs_an_agent() {
    let hs = handler(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: hosts, namespace: ops}
spec:
  routes:
    - name: rebuild
      events: member-join
      agent: {rpcAddr: "serf-operator-rpc.serf-system.svc:7373", rpcAuthSecret: {name: serf-rpc, key: key}}
      job:
        spec:
          template:
            spec:
              restartPolicy: Never
              initContainers: [{name: init, image: busybox}]
              containers:
                - name: c
                  image: busybox
                  env: [{name: SERF_RPC_ADDR, value: "mine"}, {name: OWN, value: "$(SERF_RPC_ADDR)"}]
"#,
    );
    let mut engine = Engine::new(&hs, Membership::default());
    let o = route(
        &mut engine,
        &members_event(
            MemberEventKind::Join,
            vec![member("db-1", "db", MemberStatus::Alive)],
        ),
        &node("web"),
    );
    let l = launches(&o)[0];
    let pod = l.job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.as_ref().unwrap())
    {
        let env = c.env.as_ref().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        let addr = names.iter().position(|n| *n == "SERF_RPC_ADDR").unwrap();
        assert_eq!(
            names.iter().filter(|n| **n == "SERF_RPC_ADDR").count(),
            1,
            "{names:?}"
        );
        assert_eq!(
            env[addr].value.as_deref(),
            Some("serf-operator-rpc.serf-system.svc:7373")
        );
        let auth = env.iter().find(|e| e.name == "SERF_RPC_AUTH").unwrap();
        let secret = auth
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("serf-rpc", "key")
        );
        assert!(auth.value.is_none(), "the key never enters the spec");
        if let Some(own) = names.iter().position(|n| *n == "OWN") {
            assert!(addr < own, "defined before the template's own: {names:?}");
        }
    }
}

/// A name that comes back with other tags (a node rebuilt under the same name) is a new
/// state: routed by its new tags, a new Job, a new version; members with 1,000 tags or 64 KiB
/// of tags route like any other and their tags reach the record whole.
#[test]
fn a_reused_name_with_new_tags_and_huge_tag_sets_are_routed_and_recorded() {
    let handlers = handler(&format!(
        r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {{name: m, namespace: ops}}
spec:
  routes:
    - name: db-joins
      events: member-join
      members: {{role: db}}
{JOB}
"#
    ));
    let mut engine = Engine::new(&handlers, Membership::default());
    let n = node("web");
    let join = |m: Member| members_event(MemberEventKind::Join, vec![m]);
    let web = route(
        &mut engine,
        &join(member("node-7", "web", MemberStatus::Alive)),
        &n,
    );
    assert!(launches(&web).is_empty(), "a web member is not selected");
    let left = members_event(
        MemberEventKind::Leave,
        vec![member("node-7", "web", MemberStatus::Left)],
    );
    let _ = route(&mut engine, &left, &n);
    // Rebuilt as a db node under the same name.
    let db = route(
        &mut engine,
        &join(member("node-7", "db", MemberStatus::Alive)),
        &n,
    );
    assert_eq!(launches(&db).len(), 1, "{db:?}");
    let r = &engine.membership().members["node-7"];
    assert_eq!(r.tags["role"], "db");
    assert_eq!(r.version, 3);
    // The same name, alive, tags changed without leaving: news too (a member-update).
    let mut retagged = member("node-7", "db", MemberStatus::Alive);
    retagged.tags.insert("zone".into(), "b".into());
    let update = route(
        &mut engine,
        &members_event(MemberEventKind::Update, vec![retagged]),
        &n,
    );
    assert!(!update.no_news);
    assert_eq!(engine.membership().members["node-7"].version, 4);

    let mut many = member("many", "db", MemberStatus::Alive);
    many.tags
        .extend((0..1_000).map(|i| (format!("t{i}"), format!("v{i}"))));
    let mut big = member("big", "db", MemberStatus::Alive);
    big.tags.insert("blob".into(), "x".repeat(64 * 1024));
    let o = route(
        &mut engine,
        &members_event(MemberEventKind::Join, vec![many, big]),
        &n,
    );
    assert_eq!(launches(&o).len(), 1);
    // Too large for the pod template's annotation: /serf/stdin comes from a Secret.
    assert!(launches(&o)[0].stdin.is_some());
    assert_eq!(engine.membership().members["many"].tags.len(), 1_001);
    assert_eq!(
        engine.membership().members["big"].tags["blob"].len(),
        64 * 1024
    );
    let changed = engine.take_changed();
    assert!(changed.contains_key("many") && changed.contains_key("big"));
}
