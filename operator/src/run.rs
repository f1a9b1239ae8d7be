//! `serf-operator run`: the operator on Kubernetes. One subscription to the agent's events,
//! drained at once into a bounded queue; one routing task that owns the engine, the status
//! book and the launch ledger; launch workers that create Jobs; a flusher that writes status
//! in batches; reflectors for SerfHandlers and the Jobs they own. Talks to the API server
//! and to the Serf agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serf_client::{
    ClientConfig, Event, Member, Subscription, SubscriptionConfig, SubscriptionItem,
};
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::contract::SelfNode;
use crate::engine::{Action, ActiveJobs, Context, Engine, Launch, Outcome};
use crate::jobs::{HandlerRef, LABEL_HANDLER, LABEL_ROUTE, MANAGED_BY};
use crate::launcher::{LaunchResult, Launcher, RetryPolicy};
use crate::ledger::{self, Ledger};
use crate::local::{rfc3339, self_node};
use crate::metrics::{CodeLabel, KindLabel, Metrics};
use crate::status::{RouteEvent, StatusBook};

/// Settings of `serf-operator run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The Serf agent.
    pub serf: ClientConfig,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Events buffered between the agent's stream and the router.
    pub queue_size: usize,
    /// Concurrent Job creates.
    pub workers: usize,
    /// Where `/metrics`, `/healthz`, `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// Namespace of the operator's own state (the membership record).
    pub state_namespace: String,
    /// This pod's name (Events' reporting instance, `$(POD_NAME)`).
    pub pod_name: String,
    /// This pod's namespace (`$(POD_NAMESPACE)`).
    pub pod_namespace: String,
    /// How often status, ledgers and membership are written.
    pub flush_interval: Duration,
    /// How long in-flight Job creates may take after SIGTERM.
    pub shutdown_grace: Duration,
    /// Several replicas: elect the one that does the once-only work with a Lease.
    pub leader_election: Option<LeaderElection>,
}

enum Queued {
    Connected(serf_client::Client),
    Event(Event, Instant),
    Disconnected(String),
    Lagged(u64),
}

struct LaunchDone {
    launch: Box<Launch>,
    event: String,
    received: Instant,
    result: LaunchResult,
}

struct KubeEventReq {
    kind: &'static str,
    handler: HandlerRef,
    type_: EventType,
    reason: &'static str,
    note: String,
}

/// Active (unfinished) Jobs, read from the reflector's store.
struct StoreActive<'a>(&'a [Store<Job>]);

fn finished(job: &Job) -> Option<(bool, String)> {
    let status = job.status.as_ref()?;
    for c in status.conditions.iter().flatten() {
        if c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed") {
            let t = c
                .last_transition_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            return Some((c.type_ == "Complete", t));
        }
    }
    None
}

fn route_of(job: &Job) -> Option<(String, String, String)> {
    let labels = job.metadata.labels.as_ref()?;
    Some((
        job.metadata.namespace.clone()?,
        labels.get(LABEL_HANDLER)?.clone(),
        labels.get(LABEL_ROUTE)?.clone(),
    ))
}

impl ActiveJobs for StoreActive<'_> {
    fn active(&self, handler: &HandlerRef, route: &str) -> Vec<String> {
        let want = (
            handler.namespace.clone(),
            crate::naming::label_value(&handler.name),
            crate::naming::label_value(route),
        );
        self.0
            .iter()
            .flat_map(|s| s.state())
            .filter(|j| route_of(j).as_ref() == Some(&want) && finished(j).is_none())
            .filter_map(|j| j.metadata.name.clone())
            .collect()
    }
}

fn object_ref(kind: &str, h: &HandlerRef) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!(
            "{}/{}",
            serf_operator_crds::GROUP,
            serf_operator_crds::VERSION
        )),
        kind: Some(kind.into()),
        name: Some(h.name.clone()),
        namespace: Some(h.namespace.clone()),
        uid: h.uid.clone(),
        ..Default::default()
    }
}

fn now_str() -> String {
    rfc3339(SystemTime::now())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs the operator until `shutdown` resolves, then stops reading events, lets in-flight
/// Job creates finish (bounded by the grace period), writes status, and returns.
///
/// # Errors
/// The metrics listener cannot bind, or the caches never sync.
pub async fn run(
    client: Client,
    cfg: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr).await?;
    tracing::info!(addr = %cfg.metrics_addr, "serving /metrics, /healthz, /readyz");
    let http = tokio::spawn(crate::metrics::serve(listener, metrics.clone()));

    // Reflectors: SerfHandlers and the Jobs the operator owns, per namespace or cluster-wide.
    let scopes: Vec<Option<String>> = if cfg.namespaces.is_empty() {
        vec![None]
    } else {
        cfg.namespaces.iter().cloned().map(Some).collect()
    };
    let mut reflectors = JoinSet::new();
    let mut handler_stores: Vec<Store<SerfHandler>> = Vec::new();
    let mut job_stores: Vec<Store<Job>> = Vec::new();
    let mut trigger_stores: Vec<Store<SerfEventTrigger>> = Vec::new();
    let owned_jobs =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    for ns in &scopes {
        handler_stores.push(watch_into_store(
            &mut reflectors,
            api_in(&client, ns),
            watcher::Config::default(),
        ));
        job_stores.push(watch_into_store(
            &mut reflectors,
            api_in(&client, ns),
            owned_jobs.clone(),
        ));
        trigger_stores.push(watch_into_store(
            &mut reflectors,
            api_in(&client, ns),
            watcher::Config::default(),
        ));
    }
    for s in &handler_stores {
        s.wait_until_ready().await?;
    }
    for s in &job_stores {
        s.wait_until_ready().await?;
    }
    for s in &trigger_stores {
        s.wait_until_ready().await?;
    }
    metrics.set_caches_ready(true);
    tracing::info!("caches synced");

    // Kubernetes Events go through a bounded queue so that routing never waits for them.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "serf-operator".into(),
            instance: Some(cfg.pod_name.clone()).filter(|s| !s.is_empty()),
        },
    );
    let (ev_tx, mut ev_rx) = mpsc::channel::<KubeEventReq>(1024);
    let events_task = tokio::spawn(async move {
        while let Some(req) = ev_rx.recv().await {
            let ev = KubeEvent {
                type_: req.type_,
                reason: req.reason.into(),
                note: Some(req.note.chars().take(1000).collect()),
                action: req.reason.into(),
                secondary: None,
            };
            if let Err(e) = recorder
                .publish(&ev, &object_ref(req.kind, &req.handler))
                .await
            {
                tracing::debug!(error = %e, "cannot publish Event");
            }
        }
    });

    // The event path: the stream is drained at once into a bounded queue.
    let (q_tx, mut q_rx) = mpsc::channel::<Queued>(cfg.queue_size.max(1));
    let mut sub = Subscription::start(SubscriptionConfig::new(cfg.serf.clone(), "*"))?;
    let reader_metrics = metrics.clone();
    let reader_events = ev_tx.clone();
    let reader_stores = handler_stores.clone();
    let dropped_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader_dropped = dropped_total.clone();
    let reader = tokio::spawn(async move {
        let mut overflow_reported = Instant::now() - Duration::from_secs(3600);
        while let Some(item) = sub.next().await {
            let q = match item {
                SubscriptionItem::Event(ev) => {
                    reader_metrics
                        .events_received
                        .get_or_create(&KindLabel {
                            kind: ev.kind().to_string(),
                        })
                        .inc();
                    match q_tx.try_send(Queued::Event(ev, Instant::now())) {
                        Ok(()) => {
                            reader_metrics.queue_depth.inc();
                        }
                        Err(mpsc::error::TrySendError::Full(Queued::Event(ev, _))) => {
                            reader_metrics.dropped("overflow");
                            reader_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::error!(event = ev.kind(), "event queue full: event dropped");
                            if overflow_reported.elapsed() > Duration::from_secs(10) {
                                overflow_reported = Instant::now();
                                for h in reader_stores.iter().flat_map(|s| s.state()) {
                                    let _ = reader_events.try_send(KubeEventReq {
                                        kind: "SerfHandler",
                                        handler: href(&h),
                                        type_: EventType::Warning,
                                        reason: "EventsDropped",
                                        note: "the operator's event queue is full; Serf events are being dropped (raise --queue-size or --workers)".into(),
                                    });
                                }
                            }
                        }
                        Err(_) => return,
                    }
                    continue;
                }
                SubscriptionItem::Connected { client, .. } => Queued::Connected(client),
                SubscriptionItem::Disconnected { error } => Queued::Disconnected(error.to_string()),
                SubscriptionItem::Lagged { missed } => Queued::Lagged(missed),
                SubscriptionItem::Undecodable(e) => {
                    tracing::warn!(error = %e, "undecodable Serf record");
                    continue;
                }
                _ => continue,
            };
            if q_tx.send(q).await.is_err() {
                return;
            }
        }
    });

    let lease = match &cfg.leader_election {
        None => None,
        Some(le) => {
            let manager =
                kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &le.lease_name)
                    .with_namespace(&cfg.state_namespace)
                    .with_identity(&le.identity)
                    .with_duration(le.duration_secs.max(2))
                    .with_grace((le.duration_secs / 3).max(1))
                    .with_field_manager(ledger::FIELD_MANAGER)
                    .build()
                    .await?;
            let (rx, _task) = manager.watch().await;
            tracing::info!(lease = %le.lease_name, identity = %le.identity, "leader election on");
            Some(rx)
        }
    };
    let mut router = Router {
        client: client.clone(),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        engine: Engine::new(
            &[],
            ledger::read_membership(&client, &cfg.state_namespace)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the membership record; starting empty");
                    Default::default()
                }),
        ),
        status: StatusBook::default(),
        ledger: Ledger::default(),
        node: SelfNode::default(),
        serf: None,
        handler_stores,
        job_stores,
        handler_versions: BTreeMap::new(),
        membership_dirty: false,
        events: ev_tx,
        launcher: Launcher::new(client.clone(), RetryPolicy::default()),
        workers: Arc::new(Semaphore::new(cfg.workers.max(1))),
        inflight: JoinSet::new(),
        done_tx: None,
        dropped_total,
        leadership: Leadership {
            lease,
            was_leader: false,
        },
        trigger_stores,
        trigger_busy: Arc::default(),
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<LaunchDone>();
    router.done_tx = Some(done_tx);
    router.sync_handlers();

    let mut tick = tokio::time::interval(cfg.flush_interval);
    let mut ticks: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let coalesce_due = router
            .engine
            .next_deadline()
            .and_then(|d| d.duration_since(SystemTime::now()).ok());
        tokio::select! {
            _ = &mut shutdown => break,
            item = q_rx.recv() => {
                let Some(item) = item else { break };
                router.on_item(item).await;
            }
            Some(done) = done_rx.recv() => router.on_done(done),
            _ = tokio::time::sleep(coalesce_due.unwrap_or(Duration::from_secs(3600))), if coalesce_due.is_some() || router.engine.next_deadline().is_some() => {
                router.flush_coalesced();
            }
            _ = tick.tick() => {
                ticks += 1;
                router.check_leadership().await;
                router.sync_handlers();
                router.flush_coalesced();
                router.write_state().await;
                if router.leadership.is_leader() {
                    router.fire_triggers();
                }
                if ticks.is_multiple_of(10) && router.leadership.is_leader() {
                    router.prune().await;
                }
            }
        }
    }

    tracing::info!("shutting down: no more events are read; finishing in-flight Job creates");
    reader.abort();
    metrics.set_serf_ready(false);
    let grace = tokio::time::sleep(cfg.shutdown_grace);
    tokio::pin!(grace);
    while !router.inflight.is_empty() {
        tokio::select! {
            _ = &mut grace => {
                tracing::warn!(left = router.inflight.len(), "grace period over; abandoning Job creates (a restart re-creates them idempotently only if their events come again)");
                router.inflight.abort_all();
                break;
            }
            Some(done) = done_rx.recv() => router.on_done(done),
            _ = router.inflight.join_next() => {}
        }
    }
    while let Ok(done) = done_rx.try_recv() {
        router.on_done(done);
    }
    router.write_state().await;
    drop(router);
    let _ = tokio::time::timeout(Duration::from_secs(2), events_task).await;
    http.abort();
    reflectors.abort_all();
    Ok(())
}

/// An Api for `K` in one namespace, or in all.
fn api_in<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Keeps a local store of `K` up to date from a watch (retried with backoff), driven by a
/// task in `set`.
fn watch_into_store<K>(set: &mut JoinSet<()>, api: Api<K>, cfg: watcher::Config) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    <K as kube::Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    set.spawn(
        reflector::reflector(writer, watcher(api, cfg))
            .default_backoff()
            .for_each(move |r| {
                if let Err(e) = r {
                    tracing::warn!(error = %e, kind = %kind, "watch");
                }
                std::future::ready(())
            }),
    );
    reader
}

fn href(h: &SerfHandler) -> HandlerRef {
    HandlerRef {
        namespace: h.metadata.namespace.clone().unwrap_or_default(),
        name: h.metadata.name.clone().unwrap_or_default(),
        uid: h.metadata.uid.clone(),
    }
}

/// Decides whether this replica does the once-only work: acting on member events (the
/// membership comparison and coalescing), pruning history. With one replica that is always
/// this one; this is the single place a Lease will decide it when several replicas run.
#[derive(Debug, Default)]
struct Leadership {
    /// The Lease's verdict when leader election is on; `None`: this is the only replica.
    lease: Option<tokio::sync::watch::Receiver<bool>>,
    /// What the last check saw, to notice transitions.
    was_leader: bool,
}

impl Leadership {
    fn is_leader(&self) -> bool {
        self.lease.as_ref().is_none_or(|r| *r.borrow())
    }
}

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    /// Lease name (in the state namespace).
    pub lease_name: String,
    /// This replica's identity.
    pub identity: String,
    /// Lease duration in seconds: how long a dead leader blocks the others.
    pub duration_secs: u64,
}

/// Per trigger (namespace, name): not before this time, and the retry attempt.
type TriggerHolds = Arc<std::sync::Mutex<BTreeMap<(String, String), (Instant, u32)>>>;

/// (namespace, handler label, route label).
type RouteKey = (String, String, String);
/// (succeeded, finish time, name).
type FinishedJob = (bool, String, String);

struct Router {
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    engine: Engine,
    status: StatusBook,
    ledger: Ledger,
    node: SelfNode,
    serf: Option<serf_client::Client>,
    handler_stores: Vec<Store<SerfHandler>>,
    job_stores: Vec<Store<Job>>,
    /// (namespace, name) → (uid, generation), to notice spec changes.
    handler_versions: BTreeMap<(String, String), (Option<String>, Option<i64>)>,
    membership_dirty: bool,
    events: mpsc::Sender<KubeEventReq>,
    launcher: Launcher,
    workers: Arc<Semaphore>,
    inflight: JoinSet<()>,
    done_tx: Option<mpsc::UnboundedSender<LaunchDone>>,
    /// Events dropped before routing (queue overflow, stream lag), shown in every handler's
    /// status.
    dropped_total: Arc<std::sync::atomic::AtomicU64>,
    leadership: Leadership,
    trigger_stores: Vec<Store<SerfEventTrigger>>,
    /// Triggers not to look at before a time: being fired, just fired (until the store has
    /// the outcome), or backing off after a failure that can succeed later; with the attempt.
    trigger_busy: TriggerHolds,
}

impl Router {
    fn handlers(&self) -> Vec<SerfHandler> {
        self.handler_stores
            .iter()
            .flat_map(|s| s.state())
            .map(|h| (*h).clone())
            .collect()
    }

    fn kube_event(
        &self,
        handler: &HandlerRef,
        type_: EventType,
        reason: &'static str,
        note: String,
    ) {
        if self
            .events
            .try_send(KubeEventReq {
                kind: "SerfHandler",
                handler: handler.clone(),
                type_,
                reason,
                note,
            })
            .is_err()
        {
            tracing::debug!(reason, "Event queue full; Event not published");
        }
    }

    /// Recompiles the routes when a handler was added, changed or deleted, and updates
    /// every handler's Ready condition and membership.
    fn sync_handlers(&mut self) {
        // Compare versions on the shared objects; clone them only when something changed.
        let versions: BTreeMap<_, _> = self
            .handler_stores
            .iter()
            .flat_map(|s| s.state())
            .map(|h| {
                (
                    (
                        h.metadata.namespace.clone().unwrap_or_default(),
                        h.metadata.name.clone().unwrap_or_default(),
                    ),
                    (h.metadata.uid.clone(), h.metadata.generation),
                )
            })
            .collect();
        if versions == self.handler_versions {
            return;
        }
        for gone in self
            .handler_versions
            .keys()
            .filter(|k| !versions.contains_key(*k))
        {
            self.status.remove(&HandlerRef {
                namespace: gone.0.clone(),
                name: gone.1.clone(),
                uid: None,
            });
        }
        self.handler_versions = versions;
        let handlers = self.handlers();
        self.engine.set_handlers(&handlers);
        let errors = self.engine.router().errors().to_vec();
        for e in &errors {
            tracing::warn!("{e}");
        }
        let now = now_str();
        for h in &handlers {
            self.status.sync_handler(h, &errors, &now);
        }
        self.update_member_status();
    }

    fn update_member_status(&mut self) {
        let members: Vec<Member> = self
            .engine
            .membership()
            .members
            .iter()
            .filter(|(_, r)| r.status != "reaped")
            .map(|(name, r)| {
                Member::new(
                    name.clone(),
                    r.addr
                        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                    r.port,
                    r.tags.clone(),
                    match r.status.as_str() {
                        "alive" => serf_client::MemberStatus::Alive,
                        "failed" => serf_client::MemberStatus::Failed,
                        "leaving" => serf_client::MemberStatus::Leaving,
                        _ => serf_client::MemberStatus::Left,
                    },
                )
            })
            .collect();
        let refs: Vec<HandlerRef> = self
            .handler_stores
            .iter()
            .flat_map(|s| s.state())
            .map(|h| href(&h))
            .collect();
        for r in refs {
            let selected: Vec<&Member> = members
                .iter()
                .filter(|m| self.engine.router().selects_member(&r, m))
                .collect();
            self.status.set_members(&r, &selected);
        }
    }

    async fn on_item(&mut self, item: Queued) {
        match item {
            Queued::Connected(c) => {
                self.node = self_node(&c).await.unwrap_or_default();
                tracing::info!(node = %self.node.name, role = self.node.role(), "following the Serf agent");
                self.metrics.set_serf_ready(true);
                self.metrics.serf_reconnects.inc();
                self.serf = Some(c.clone());
                // Member events missed while disconnected (or while the operator was down).
                if !self.leadership.is_leader() {
                    return;
                }
                self.catch_up_members(&c).await;
            }
            Queued::Event(ev, received) => {
                self.metrics.queue_depth.dec();
                if matches!(ev, Event::Member(_)) && !self.leadership.is_leader() {
                    return;
                }
                self.route(&ev, received, false).await;
                if matches!(ev, Event::Member(_)) {
                    self.membership_dirty = true;
                    self.update_member_status();
                }
            }
            Queued::Disconnected(error) => {
                tracing::warn!(%error, "Serf agent connection lost; user events and queries sent until it is back are lost");
                self.metrics.set_serf_ready(false);
                self.serf = None;
            }
            Queued::Lagged(missed) => {
                tracing::error!(
                    missed,
                    "the routing task fell behind the agent's stream; events dropped"
                );
                for _ in 0..missed {
                    self.metrics.dropped("overflow");
                }
                self.dropped_total
                    .fetch_add(missed, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    async fn route(&mut self, ev: &Event, received: Instant, replayed: bool) {
        let outcome = {
            let stores = self.job_stores.clone();
            let active = StoreActive(&stores);
            let ctx = Context {
                node: &self.node,
                pod: (&self.cfg.pod_name, &self.cfg.pod_namespace),
                active: &active,
                now: SystemTime::now(),
                replayed,
            };
            self.engine.route(ev, &ctx)
        };
        self.act(outcome, received).await;
    }

    fn flush_coalesced(&mut self) {
        let stores = self.job_stores.clone();
        let active = StoreActive(&stores);
        let ctx = Context {
            node: &self.node,
            pod: (&self.cfg.pod_name, &self.cfg.pod_namespace),
            active: &active,
            now: SystemTime::now(),
            replayed: false,
        };
        let outcomes = self.engine.flush(&ctx);
        for o in outcomes {
            // Launches only; answers never coalesce.
            let now = now_str();
            for a in o.actions {
                self.act_one(a, &o.event, Instant::now(), &now);
            }
        }
    }

    async fn act(&mut self, outcome: Outcome, received: Instant) {
        if outcome.actions.is_empty() {
            self.metrics.dropped("no_route");
            return;
        }
        if outcome.actions.iter().any(|a| {
            matches!(
                a,
                Action::Launch(_) | Action::Answer { .. } | Action::Deferred { .. }
            )
        }) {
            self.metrics.events_routed.inc();
        }
        let now = now_str();
        for a in outcome.actions {
            if let Action::Answer {
                handler,
                route,
                query_id,
                payload,
            } = &a
            {
                // Answers go out inline, before the query's deadline.
                let result = match &self.serf {
                    Some(c) => c.respond(*query_id, payload).await,
                    None => Err(serf_client::Error::Invalid("not connected".into())),
                };
                match result {
                    Ok(()) => {
                        self.metrics.queries_answered.inc();
                        self.status.record(
                            handler,
                            route,
                            &outcome.event,
                            RouteEvent::Answered,
                            &now,
                        );
                        self.kube_event(
                            handler,
                            EventType::Normal,
                            "QueryAnswered",
                            format!("route {route} answered {}", outcome.event),
                        );
                    }
                    Err(e) => {
                        self.status.record(
                            handler,
                            route,
                            &outcome.event,
                            RouteEvent::Skipped {
                                reason: "AnswerFailed".into(),
                                message: e.to_string(),
                            },
                            &now,
                        );
                        self.kube_event(
                            handler,
                            EventType::Warning,
                            "RouteSkipped",
                            format!("route {route} could not answer {}: {e}", outcome.event),
                        );
                    }
                }
                continue;
            }
            if let Action::Launch(l) = &a
                && !self.ledger.is_loaded(&l.handler)
            {
                match ledger::read_ledger(&self.client, &l.handler).await {
                    Ok(text) => self.ledger.load(&l.handler, &text),
                    Err(e) => {
                        tracing::warn!(error = %e, handler = %l.handler, "cannot read the launch ledger; relying on Job names alone")
                    }
                }
            }
            self.act_one(a, &outcome.event, received, &now);
        }
    }

    fn act_one(&mut self, a: Action, event: &str, received: Instant, now: &str) {
        match a {
            Action::Launch(l) => {
                let name = l.job.metadata.name.clone().unwrap_or_default();
                if self.ledger.contains(&l.handler, &name) {
                    self.metrics.dropped("duplicate");
                    self.status.record(
                        &l.handler,
                        &l.route,
                        event,
                        RouteEvent::Skipped {
                            reason: "Duplicate".into(),
                            message: format!("Job {name} was launched for this event before"),
                        },
                        now,
                    );
                    return;
                }
                let launcher = self.launcher.clone();
                let workers = self.workers.clone();
                let Some(done) = self.done_tx.clone() else {
                    return;
                };
                let event = event.to_string();
                self.inflight.spawn(async move {
                    let Ok(_permit) = workers.acquire_owned().await else {
                        return;
                    };
                    let result = launcher.launch(&l).await;
                    let _ = done.send(LaunchDone {
                        launch: l,
                        event,
                        received,
                        result,
                    });
                });
            }
            Action::Skip {
                handler,
                route,
                reason,
                message,
            } => {
                self.metrics.dropped(reason.metric_label());
                self.kube_event(
                    &handler,
                    EventType::Normal,
                    "RouteSkipped",
                    format!("route {route} skipped {event}: {reason}: {message}"),
                );
                self.status.record(
                    &handler,
                    &route,
                    event,
                    RouteEvent::Skipped {
                        reason: reason.to_string(),
                        message,
                    },
                    now,
                );
            }
            Action::Deferred { handler, route, .. } => {
                self.status
                    .record(&handler, &route, event, RouteEvent::Coalesced, now);
            }
            Action::Answer { .. } => {}
        }
    }

    fn on_done(&mut self, d: LaunchDone) {
        let now = now_str();
        let l = &d.launch;
        match &d.result {
            LaunchResult::Created { name } => {
                self.metrics.jobs_created.inc();
                self.metrics
                    .event_to_job_seconds
                    .observe(d.received.elapsed().as_secs_f64());
                self.ledger.record(&l.handler, name, unix_now());
                self.status.record(
                    &l.handler,
                    &l.route,
                    &d.event,
                    RouteEvent::Launched { job: name.clone() },
                    &now,
                );
                self.kube_event(
                    &l.handler,
                    EventType::Normal,
                    "JobCreated",
                    format!("route {} created Job {name} for {}", l.route, d.event),
                );
            }
            LaunchResult::AlreadyLaunched { name } => {
                self.metrics.dropped("duplicate");
                self.ledger.record(&l.handler, name, unix_now());
                self.status.record(
                    &l.handler,
                    &l.route,
                    &d.event,
                    RouteEvent::Skipped {
                        reason: "Duplicate".into(),
                        message: format!("Job {name} already exists for this event"),
                    },
                    &now,
                );
            }
            LaunchResult::Failed {
                name,
                code,
                message,
                retried,
            } => {
                self.metrics
                    .job_create_errors
                    .get_or_create(&CodeLabel {
                        code: code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "transport".into()),
                    })
                    .inc();
                let why = if *retried {
                    format!("gave up after retries: {message}")
                } else {
                    message.clone()
                };
                tracing::warn!(job = %name, handler = %l.handler, route = %l.route, code = ?code, "{why}");
                self.status.record(
                    &l.handler,
                    &l.route,
                    &d.event,
                    RouteEvent::Skipped {
                        reason: "JobCreateFailed".into(),
                        message: why.clone(),
                    },
                    &now,
                );
                self.kube_event(
                    &l.handler,
                    EventType::Warning,
                    "JobCreateFailed",
                    format!(
                        "route {} could not create Job {name} for {}: {why}",
                        l.route, d.event
                    ),
                );
            }
        }
    }

    /// Notices leadership changes. On becoming the leader: take over the persisted membership
    /// and launch ledgers (the old leader wrote them), replay the member events missed, and
    /// from then on fire triggers, prune, and write status.
    async fn check_leadership(&mut self) {
        let leader = self.leadership.is_leader();
        self.metrics.leader.set(i64::from(leader));
        if leader == self.leadership.was_leader {
            return;
        }
        self.leadership.was_leader = leader;
        self.metrics.lease_transitions.inc();
        if !leader {
            tracing::warn!(
                "lost the lease: no longer acting on member events, triggers or pruning"
            );
            return;
        }
        tracing::info!("holding the lease: acting on member events, triggers and pruning");
        if self.leadership.lease.is_none() {
            return;
        }
        match ledger::read_membership(&self.client, &self.cfg.state_namespace).await {
            Ok(m) => self.engine.set_membership(m),
            Err(e) => tracing::warn!(error = %e, "cannot read the membership record"),
        }
        self.ledger = Ledger::default();
        self.status = StatusBook::default();
        self.handler_versions.clear();
        self.sync_handlers();
        if let Some(c) = self.serf.clone() {
            self.catch_up_members(&c).await;
        }
    }

    /// Routes the member events missed while disconnected, down, or not the leader: the
    /// difference between the agent's members and the membership last acted on.
    async fn catch_up_members(&mut self, c: &serf_client::Client) {
        match c.members().await {
            Ok(current) => {
                for ev in self.engine.membership().diff(&current) {
                    let ev = Event::Member(ev);
                    tracing::info!(event = %crate::engine::describe(&ev).1, "replaying a missed member event");
                    self.route(&ev, Instant::now(), true).await;
                }
                self.membership_dirty = true;
                self.update_member_status();
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the agent's members"),
        }
    }

    /// Fires what is due: each trigger at most once per generation or schedule tick. Sends
    /// run in tasks; the firing is recorded in status before the send.
    fn fire_triggers(&mut self) {
        let now = jiff::Timestamp::now();
        let triggers: Vec<Arc<SerfEventTrigger>> =
            self.trigger_stores.iter().flat_map(|s| s.state()).collect();
        for t in triggers {
            let key = (
                t.metadata.namespace.clone().unwrap_or_default(),
                t.metadata.name.clone().unwrap_or_default(),
            );
            let attempt = {
                let Ok(mut busy) = self.trigger_busy.lock() else {
                    return;
                };
                match busy.get(&key) {
                    Some((until, _)) if *until > Instant::now() => continue,
                    Some((_, attempt)) => {
                        let a = *attempt;
                        busy.remove(&key);
                        a
                    }
                    None => 0,
                }
            };
            let due = crate::trigger::decide(&t, now);
            if due == crate::trigger::Due::Nothing {
                continue;
            }
            if let Ok(mut busy) = self.trigger_busy.lock() {
                busy.insert(
                    key.clone(),
                    (Instant::now() + Duration::from_secs(3600), attempt),
                );
            }
            let client = self.client.clone();
            let serf = self.serf.clone();
            let busy = self.trigger_busy.clone();
            let events = self.events.clone();
            let metrics = self.metrics.clone();
            let tref = HandlerRef {
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: t.metadata.uid.clone(),
            };
            tokio::spawn(async move {
                let hold = |attempt: u32, d: Duration| {
                    if let Ok(mut b) = busy.lock() {
                        b.insert(key.clone(), (Instant::now() + d, attempt));
                    }
                };
                let publish = |type_: EventType, reason: &'static str, note: String| {
                    let _ = events.try_send(KubeEventReq {
                        kind: "SerfEventTrigger",
                        handler: tref.clone(),
                        type_,
                        reason,
                        note,
                    });
                };
                let result = |r: &str| {
                    metrics
                        .triggers_fired
                        .get_or_create(&crate::metrics::ResultLabel { result: r.into() })
                        .inc()
                };
                let now_s = now_str();
                match due {
                    crate::trigger::Due::Nothing => {}
                    crate::trigger::Due::Invalid(msg) => {
                        publish(EventType::Warning, "TriggerFailed", msg.clone());
                        tracing::warn!(trigger = %tref, "{msg}");
                        hold(0, Duration::from_secs(60));
                    }
                    crate::trigger::Due::Interrupted(firing) => {
                        let patch = crate::trigger::interrupted_patch(&t, &firing, &now_s);
                        match crate::trigger::patch_status(&client, &t, patch).await {
                            Ok(()) => {
                                result("interrupted");
                                publish(
                                    EventType::Warning,
                                    "TriggerFailed",
                                    format!(
                                        "generation {} was interrupted between send and record; not sent again (Sent=Unknown)",
                                        firing.generation
                                    ),
                                );
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, trigger = %tref, "cannot record an interrupted send")
                            }
                        }
                        hold(0, Duration::from_secs(5));
                    }
                    crate::trigger::Due::Fire(firing) => {
                        // Recorded before the send: once stored, a restart never sends it again.
                        let outcome = match crate::trigger::fire(
                            &client,
                            serf.as_ref(),
                            &t,
                            &firing,
                        )
                        .await
                        {
                            Ok(o) => o,
                            Err(e) => {
                                tracing::warn!(error = %e, trigger = %tref, "cannot record the send; not sending");
                                hold(attempt, Duration::from_secs(2));
                                return;
                            }
                        };
                        match outcome {
                            crate::trigger::SendOutcome::Sent(_) => {
                                result("sent");
                                publish(
                                    EventType::Normal,
                                    "TriggerFired",
                                    format!(
                                        "fired generation {}{}",
                                        firing.generation,
                                        firing
                                            .tick
                                            .as_ref()
                                            .map(|t| format!(" for the tick at {t}"))
                                            .unwrap_or_default()
                                    ),
                                );
                                hold(0, Duration::from_secs(5));
                            }
                            crate::trigger::SendOutcome::Failed(msg) => {
                                result("failed");
                                publish(EventType::Warning, "TriggerFailed", msg);
                                hold(0, Duration::from_secs(5));
                            }
                            crate::trigger::SendOutcome::Unknown(msg) => {
                                result("interrupted");
                                publish(
                                    EventType::Warning,
                                    "TriggerFailed",
                                    format!(
                                        "the send of generation {} may or may not have happened; not sent again: {msg}",
                                        firing.generation
                                    ),
                                );
                                hold(0, Duration::from_secs(5));
                            }
                            crate::trigger::SendOutcome::Retry(msg) => {
                                result("retry");
                                tracing::warn!(trigger = %tref, attempt = attempt + 1, "send failed, will retry: {msg}");
                                hold(attempt + 1, crate::trigger::retry_delay(attempt + 1));
                            }
                        }
                    }
                }
            });
        }
    }

    /// Writes what changed: handler status, launch ledgers, the membership record.
    async fn write_state(&mut self) {
        if !self.leadership.is_leader() {
            // The leader's view is the one written; a standby's would fight it.
            let _ = self.status.take_dirty();
            return;
        }
        let dropped = self
            .dropped_total
            .load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            let now = now_str();
            for h in self.handlers() {
                self.status.set_events_dropped(&href(&h), dropped, &now);
            }
        }
        for (k, text) in self.ledger.take_dirty(unix_now()) {
            let uid = self
                .handler_stores
                .iter()
                .flat_map(|s| s.state())
                .find(|h| {
                    h.metadata.namespace.as_deref() == Some(&k.0)
                        && h.metadata.name.as_deref() == Some(&k.1)
                })
                .and_then(|h| h.metadata.uid.clone());
            let h = HandlerRef {
                namespace: k.0.clone(),
                name: k.1.clone(),
                uid,
            };
            if let Err(e) = ledger::write_ledger(&self.client, &h, &text).await {
                tracing::warn!(error = %e, handler = %h, "cannot write the launch ledger; will retry");
                self.ledger.mark_dirty(&k);
            }
        }
        for (k, status) in self.status.take_dirty() {
            if let Err(e) = crate::status::write_status(&self.client, &k.0, &k.1, &status).await {
                tracing::warn!(error = %e, handler = %format!("{}/{}", k.0, k.1), "cannot write status; will retry");
                self.status.mark_dirty(&k);
            }
        }
        if self.membership_dirty {
            match ledger::write_membership(
                &self.client,
                &self.cfg.state_namespace,
                self.engine.membership(),
            )
            .await
            {
                Ok(()) => self.membership_dirty = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot persist the membership record; will retry")
                }
            }
        }
    }

    /// Deletes finished Jobs beyond each route's history limits. A Job is deleted only once
    /// its name is in the launch ledger, so its event cannot launch it again.
    async fn prune(&mut self) {
        let handlers = self.handlers();
        let mut by_route: BTreeMap<RouteKey, Vec<FinishedJob>> = BTreeMap::new();
        for j in self.job_stores.iter().flat_map(|s| s.state()) {
            if let (Some(key), Some((ok, t)), Some(name)) =
                (route_of(&j), finished(&j), j.metadata.name.clone())
            {
                by_route.entry(key).or_default().push((ok, t, name));
            }
        }
        let mut to_delete: Vec<(HandlerRef, String)> = Vec::new();
        for h in &handlers {
            let r = href(h);
            let keep_ok = usize::try_from(
                h.spec
                    .successful_jobs_history_limit
                    .unwrap_or(crate::engine::DEFAULT_HISTORY_LIMIT),
            )
            .unwrap_or(0);
            let keep_failed = usize::try_from(
                h.spec
                    .failed_jobs_history_limit
                    .unwrap_or(crate::engine::DEFAULT_HISTORY_LIMIT),
            )
            .unwrap_or(0);
            let routes: BTreeSet<String> = h
                .spec
                .routes
                .iter()
                .map(|x| crate::naming::label_value(&x.name))
                .collect();
            for route in routes {
                let Some(jobs) = by_route.get(&(
                    r.namespace.clone(),
                    crate::naming::label_value(&r.name),
                    route,
                )) else {
                    continue;
                };
                for (want_ok, keep) in [(true, keep_ok), (false, keep_failed)] {
                    let mut done: Vec<&FinishedJob> =
                        jobs.iter().filter(|j| j.0 == want_ok).collect();
                    done.sort_by(|a, b| b.1.cmp(&a.1));
                    for (_, _, name) in done.into_iter().skip(keep) {
                        to_delete.push((r.clone(), name.clone()));
                    }
                }
            }
        }
        for (h, name) in to_delete {
            if !self.ledger.is_loaded(&h)
                && let Ok(text) = ledger::read_ledger(&self.client, &h).await
            {
                self.ledger.load(&h, &text);
            }
            if !self.ledger.contains(&h, &name) {
                // Record first; delete on a later round, once the record is written.
                self.ledger.record(&h, &name, unix_now());
                continue;
            }
            let api: Api<Job> = Api::namespaced(self.client.clone(), &h.namespace);
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => tracing::info!(job = %name, handler = %h, "pruned by the history limit"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => tracing::warn!(error = %e, job = %name, "cannot prune"),
            }
        }
    }
}
