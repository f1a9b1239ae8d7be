//! The dispatcher with a fake effects implementation: every action kind (launch, answer,
//! skip, coalesce), the leader gate on member events, concurrency skips, coalescing, drops by
//! reason, and the membership handed to the effects (only what changed, the selections at most
//! once a second). No Kubernetes, no agent: decisions only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serf_client::{
    Event, Member, MemberEvent, MemberEventKind, MemberStatus, QueryEvent, UserEvent,
};
use serf_operator::contract::SelfNode;
use serf_operator::dispatch::{
    Control, Dispatcher, DropReason, Effects, Input, RouteEvent, Severity,
};
use serf_operator::engine::{ActiveJobs, Launch, Membership, NoActiveJobs, Outcome};
use serf_operator::jobs::HandlerRef;
use serf_operator::manifests::parse_handlers;
use serf_operator::record::RecordChanges;

const HANDLERS: &str = r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: web, namespace: apps, uid: u1}
spec:
  role: web
  routes:
    - name: deploy
      events: user:deploy
      concurrencyPolicy: Forbid
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
    - name: where
      events: query:where
      respond: {payload: "$(SERF_SELF_NAME) here"}
    - name: joins
      events: member-join
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
---
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: db, namespace: apps, uid: u2}
spec:
  role: db
  routes:
    - name: backup
      events: user:backup
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
---
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: fix, namespace: ops, uid: u3}
spec:
  routes:
    - name: failed
      events: member-failed
      members: {role: db}
      coalesce: 10s
      job: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}}}}
"#;

/// Everything the dispatcher asked for, in order.
#[derive(Default)]
struct Fake {
    log: Vec<String>,
    launches: Vec<(String, String)>,
    answers: Vec<(u64, Vec<u8>)>,
    dropped: BTreeMap<DropReason, u64>,
    members: BTreeMap<String, Vec<String>>,
    /// How many times the selections were published.
    selections: usize,
    records: Vec<RecordChanges>,
}

impl Effects for Fake {
    fn decided(&mut self, outcome: &Outcome) {
        self.log.push(format!("decided {}", outcome.event));
    }
    fn launch(&mut self, launch: Box<Launch>, event: &str, _received: Instant) {
        let name = launch.job.metadata.name.clone().unwrap();
        self.log
            .push(format!("launch {}/{} {name}", launch.handler, launch.route));
        self.launches.push((event.to_string(), name));
    }
    fn answer(
        &mut self,
        _serf: Option<&serf_client::Client>,
        query_id: u64,
        payload: &[u8],
    ) -> impl std::future::Future<Output = Result<(), serf_client::Error>> + Send {
        self.answers.push((query_id, payload.to_vec()));
        async { Ok(()) }
    }
    fn record(&mut self, handler: &HandlerRef, route: &str, event: &str, what: RouteEvent) {
        let what = match what {
            RouteEvent::Launched { .. } => "launched".to_string(),
            RouteEvent::Answered => "answered".to_string(),
            RouteEvent::Coalesced => "coalesced".to_string(),
            RouteEvent::Skipped { reason, .. } => format!("skipped {reason}"),
            RouteEvent::Reported { result, .. } => format!("reported {result}"),
        };
        self.log
            .push(format!("record {handler}/{route} {event} {what}"));
    }
    fn notify(
        &mut self,
        handler: &HandlerRef,
        severity: Severity,
        reason: &'static str,
        _: String,
    ) {
        self.log
            .push(format!("event {handler} {severity:?} {reason}"));
    }
    fn dropped(&mut self, reason: DropReason, count: u64) {
        *self.dropped.entry(reason).or_default() += count;
    }
    fn record_changed(&mut self, changes: RecordChanges) {
        self.records.push(changes);
    }
    fn selected(&mut self, selected: Vec<(HandlerRef, serf_operator_crds::MembershipStatus)>) {
        self.selections += 1;
        self.members = selected
            .iter()
            .map(|(h, ms)| {
                assert_eq!(ms.total as usize, ms.items.len());
                (
                    h.to_string(),
                    ms.items.iter().map(|m| m.name.clone()).collect(),
                )
            })
            .collect();
    }
}

fn dispatcher(leader: bool, active: Box<dyn ActiveJobs + Send>) -> Dispatcher<Fake> {
    let mut d = Dispatcher::new(
        Membership::default(),
        ("op-pod".into(), "serf-system".into()),
        leader,
        active,
        Fake::default(),
    );
    d.set_node(SelfNode {
        name: "web-1".into(),
        tags: [("role".to_string(), "web".to_string())].into(),
    });
    d
}

async fn with_handlers(d: &mut Dispatcher<Fake>) {
    let hs = parse_handlers(HANDLERS, Path::new("h.yaml")).unwrap();
    d.control(Control::Handlers(
        hs.into_iter().map(std::sync::Arc::new).collect(),
    ))
    .await;
}

fn user(name: &str, ltime: u64) -> Input {
    Input::Event(
        Event::User(UserEvent {
            ltime,
            name: name.into(),
            payload: b"v1".to_vec(),
            coalesce: false,
        }),
        Instant::now(),
    )
}

fn member(kind: MemberEventKind, name: &str, role: &str, status: MemberStatus) -> Input {
    Input::Event(
        Event::Member(MemberEvent {
            kind,
            members: vec![Member::new(
                name,
                "10.0.0.9".parse().unwrap(),
                7946,
                [("role".to_string(), role.to_string())].into(),
                status,
            )],
        }),
        Instant::now(),
    )
}

#[tokio::test]
async fn a_user_event_becomes_one_launch_and_other_roles_skip() {
    let mut d = dispatcher(true, Box::new(NoActiveJobs));
    with_handlers(&mut d).await;
    d.input(user("deploy", 7)).await;
    let f = d.effects();
    assert_eq!(f.launches.len(), 1);
    assert_eq!(f.launches[0].0, "user:deploy@7");
    assert!(f.launches[0].1.starts_with("web-deploy-"));
    // Launches are recorded by the launch pool once created, not here.
    assert!(!f.log.iter().any(|l| l.contains("launched")));

    d.input(user("backup", 8)).await;
    let f = d.effects();
    assert_eq!(f.launches.len(), 1, "db's route does not run on a web node");
    assert!(
        f.log
            .contains(&"record apps/db/backup user:backup@8 skipped RoleMismatch".to_string()),
        "{:?}",
        f.log
    );
    assert!(
        f.log
            .contains(&"event apps/db Normal RouteSkipped".to_string())
    );
    assert_eq!(f.dropped[&DropReason::Filtered], 1);

    d.input(user("nobody-listens", 9)).await;
    assert_eq!(d.effects().dropped[&DropReason::NoRoute], 1);
}

#[tokio::test]
async fn a_query_is_answered_inline_and_recorded() {
    let mut d = dispatcher(true, Box::new(NoActiveJobs));
    with_handlers(&mut d).await;
    d.input(Input::Event(
        Event::Query(QueryEvent {
            id: 42,
            ltime: 3,
            name: "where".into(),
            payload: Vec::new(),
        }),
        Instant::now(),
    ))
    .await;
    let f = d.effects();
    assert_eq!(f.answers, vec![(42, b"web-1 here".to_vec())]);
    assert!(
        f.log
            .contains(&"record apps/web/where query:where@3 answered".to_string()),
        "{:?}",
        f.log
    );
    assert!(
        f.log
            .contains(&"event apps/web Normal QueryAnswered".to_string())
    );
}

#[tokio::test]
async fn forbid_skips_while_a_job_of_the_route_is_active() {
    let mut active = BTreeMap::new();
    active.insert(
        ("apps".to_string(), "web".to_string(), "deploy".to_string()),
        vec!["web-deploy-running".to_string()],
    );
    let mut d = dispatcher(true, Box::new(active));
    with_handlers(&mut d).await;
    d.input(user("deploy", 7)).await;
    let f = d.effects();
    assert!(f.launches.is_empty());
    assert!(
        f.log.contains(
            &"record apps/web/deploy user:deploy@7 skipped ConcurrencyForbid".to_string()
        ),
        "{:?}",
        f.log
    );
    assert_eq!(f.dropped[&DropReason::Concurrency], 1);
}

#[tokio::test]
async fn member_events_only_on_the_leader_and_the_membership_is_handed_on() {
    let mut standby = dispatcher(false, Box::new(NoActiveJobs));
    with_handlers(&mut standby).await;
    standby
        .input(member(
            MemberEventKind::Join,
            "web-2",
            "web",
            MemberStatus::Alive,
        ))
        .await;
    assert!(
        standby.effects().launches.is_empty(),
        "a standby leaves member events to the leader"
    );
    assert!(standby.engine().membership().members.is_empty());
    // User events run on every replica.
    standby.input(user("deploy", 1)).await;
    assert_eq!(standby.effects().launches.len(), 1);

    // Becoming the leader takes over the persisted membership.
    let mut persisted = Membership::default();
    persisted.observe(
        MemberEventKind::Join,
        &Member::new(
            "db-1",
            "10.0.0.2".parse().unwrap(),
            7946,
            [("role".to_string(), "db".to_string())].into(),
            MemberStatus::Alive,
        ),
        1_000,
    );
    standby
        .control(Control::Leader {
            leader: true,
            membership: Some(persisted),
        })
        .await;
    assert!(standby.is_leader());
    assert!(standby.engine().membership().members.contains_key("db-1"));
    standby
        .input(member(
            MemberEventKind::Join,
            "web-2",
            "web",
            MemberStatus::Alive,
        ))
        .await;
    let f = standby.effects();
    assert_eq!(f.launches.len(), 2);
    assert!(f.launches[1].1.starts_with("web-joins-"));
    // The fix handler selects db members only.
    assert_eq!(f.members["ops/fix"], ["db-1"]);
    assert_eq!(f.members["apps/web"], ["db-1", "web-2"]);
}

#[tokio::test]
async fn member_failures_coalesce_into_one_launch_when_the_window_closes() {
    let mut d = dispatcher(true, Box::new(NoActiveJobs));
    with_handlers(&mut d).await;
    for n in ["db-1", "db-2"] {
        d.input(member(
            MemberEventKind::Failed,
            n,
            "db",
            MemberStatus::Failed,
        ))
        .await;
    }
    // A web member's failure is filtered out by the route's member filter.
    d.input(member(
        MemberEventKind::Failed,
        "web-9",
        "web",
        MemberStatus::Failed,
    ))
    .await;
    let f = d.effects();
    assert!(f.launches.is_empty(), "nothing before the window closes");
    let coalesced = f.log.iter().filter(|l| l.ends_with(" coalesced")).count();
    assert_eq!(coalesced, 2, "{:?}", f.log);
    assert!(f.log.iter().any(|l| l.contains("skipped MembersFiltered")));
    let due = d.next_deadline().expect("an open window");
    assert!(due > SystemTime::now() + Duration::from_secs(8));
    d.flush_at(due);
    let f = d.effects();
    assert_eq!(f.launches.len(), 1, "{:?}", f.launches);
    assert!(f.launches[0].1.starts_with("fix-failed-"));
    assert!(d.next_deadline().is_none());

    // The same failures delivered again are no news: no window opens, nothing launches.
    d.input(member(
        MemberEventKind::Failed,
        "db-1",
        "db",
        MemberStatus::Failed,
    ))
    .await;
    d.input(member(
        MemberEventKind::Failed,
        "db-2",
        "db",
        MemberStatus::Failed,
    ))
    .await;
    assert!(d.next_deadline().is_none());
    let f = d.effects();
    assert_eq!(f.launches.len(), 1);
    assert_eq!(f.dropped[&DropReason::Duplicate], 2);
}

/// `serf tags -set role=db` on the operator's own agent: the agent's member-update of its
/// own node switches routing (and `SERF_SELF_*`) to the new tags, on every replica.
#[tokio::test]
async fn the_operators_own_node_is_followed_live() {
    let mut d = dispatcher(false, Box::new(NoActiveJobs));
    with_handlers(&mut d).await;
    d.input(user("backup", 1)).await;
    assert!(d.effects().launches.is_empty(), "role web: no backup");
    d.input(member(
        MemberEventKind::Update,
        "web-1",
        "db",
        MemberStatus::Alive,
    ))
    .await;
    assert_eq!(d.node().role(), "db");
    d.input(user("backup", 2)).await;
    assert_eq!(d.effects().launches.len(), 1);
    assert!(d.effects().launches[0].1.starts_with("db-backup-"));
    // Another node's update changes nothing here.
    d.input(member(
        MemberEventKind::Update,
        "web-7",
        "web",
        MemberStatus::Alive,
    ))
    .await;
    assert_eq!(d.node().role(), "db");
}

#[tokio::test]
async fn lagging_counts_overflow_drops() {
    let mut d = dispatcher(true, Box::new(NoActiveJobs));
    d.input(Input::Lagged(5)).await;
    assert_eq!(d.effects().dropped[&DropReason::Overflow], 5);
}

#[tokio::test]
async fn only_changed_members_go_to_the_record_and_selections_are_throttled() {
    let mut d = dispatcher(true, Box::new(NoActiveJobs));
    with_handlers(&mut d).await;
    let before = d.effects().selections;
    d.input(member(
        MemberEventKind::Join,
        "db-1",
        "db",
        MemberStatus::Alive,
    ))
    .await;
    d.input(member(
        MemberEventKind::Join,
        "web-1",
        "web",
        MemberStatus::Alive,
    ))
    .await;
    // The same join again is not news: nothing more to write.
    d.input(member(
        MemberEventKind::Join,
        "web-1",
        "web",
        MemberStatus::Alive,
    ))
    .await;
    d.input(member(
        MemberEventKind::Failed,
        "db-1",
        "db",
        MemberStatus::Failed,
    ))
    .await;
    let f = d.effects();
    let written: Vec<Vec<(String, String)>> = f
        .records
        .iter()
        .map(|c| {
            c.members
                .iter()
                .map(|(n, r)| (n.clone(), r.status.clone()))
                .collect()
        })
        .collect();
    assert_eq!(
        written,
        [
            // The header alone, when the handlers came (before any member).
            vec![],
            vec![("db-1".to_string(), "alive".to_string())],
            vec![("web-1".to_string(), "alive".to_string())],
            vec![("db-1".to_string(), "failed".to_string())],
        ]
    );
    // The header goes with the first change (it exists from the start), then only when
    // the clocks move.
    assert_eq!(f.records[0].header, Some((0, 0)));
    assert!(
        f.records[1..]
            .iter()
            .all(|c| c.header.is_none() && !c.legacy)
    );
    // Three member changes within a second: the first publishes at once, the rest wait.
    assert_eq!(f.selections, before + 1);
    assert_eq!(f.members["apps/db"], ["db-1"]);

    // A user event moves the clock: the header alone.
    d.input(user("deploy", 41)).await;
    let last = d.effects().records.last().unwrap().clone();
    assert!(last.members.is_empty());
    assert_eq!(last.header, Some((0, 42)));

    // The held-back selection is published once its second is up, by the run loop.
    let (_in_tx, in_rx) = tokio::sync::mpsc::channel(1);
    let (_c_tx, c_rx) = tokio::sync::mpsc::channel(1);
    let mut d = d
        .run(
            in_rx,
            c_rx,
            tokio::time::sleep(Duration::from_millis(1_500)),
        )
        .await;
    let f = d.effects();
    assert_eq!(f.selections, before + 2);
    // With what changed since: web-1 joined after the first publish.
    assert_eq!(f.members["apps/db"], ["db-1", "web-1"]);
}
