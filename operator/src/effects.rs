//! The Kubernetes implementation of the dispatcher's [`Effects`]: every method queues work
//! (a Job create, a status record, a Kubernetes Event) on a bounded channel and returns; tasks
//! of their own talk to the API server. A full channel drops the work and counts it by
//! reason, so an API server that hangs never stalls the event path.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use serf_client::Member;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::answer::PendingAnswer;
use crate::dispatch::{DropReason, Effects, RouteEvent, Severity};
use crate::engine::{Launch, SkipReason};
use crate::jobs::HandlerRef;
use crate::launcher::{LaunchResult, Launcher, RetryPolicy};
use crate::ledger::{self, Ledger};
use crate::metrics::{CodeLabel, Metrics};
use crate::record::{RecordChanges, SharedRecord};
use crate::state::StatusMsg;

/// The launch ledgers, shared by the launch workers (check, record) and the state writer
/// (persist). The lock is never held across an await.
pub type SharedLedger = Arc<Mutex<Ledger>>;

/// A Kubernetes Event to publish.
#[derive(Debug, Clone)]
pub struct EventReq {
    /// `SerfHandler` or `SerfEventTrigger`.
    pub kind: &'static str,
    /// The object.
    pub object: HandlerRef,
    /// Normal or Warning.
    pub severity: Severity,
    /// Reason (also the Event's action).
    pub reason: &'static str,
    /// The note.
    pub note: String,
}

/// Where results go: handler status, Kubernetes Events, metrics. Cheap to clone.
#[derive(Clone)]
pub struct Sinks {
    /// Status records for the state writer.
    pub status: mpsc::Sender<StatusMsg>,
    /// Kubernetes Events for the recorder.
    pub events: mpsc::Sender<EventReq>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Sinks {
    /// Counts a route's result in its handler's status.
    pub fn record(&self, handler: &HandlerRef, route: &str, event: &str, what: RouteEvent) {
        let msg = StatusMsg::Route {
            handler: handler.clone(),
            route: route.to_string(),
            event: event.to_string(),
            what,
            at: crate::local::rfc3339(std::time::SystemTime::now()),
        };
        if self.status.try_send(msg).is_err() {
            self.metrics.dropped("status_queue_full");
            tracing::debug!("status queue full: a route counter was not updated");
        }
    }

    /// Publishes a Kubernetes Event.
    pub fn notify(
        &self,
        kind: &'static str,
        object: &HandlerRef,
        severity: Severity,
        reason: &'static str,
        note: String,
    ) {
        let req = EventReq {
            kind,
            object: object.clone(),
            severity,
            reason,
            note,
        };
        if self.events.try_send(req).is_err() {
            self.metrics.dropped("event_queue_full");
            tracing::debug!(reason, "Event queue full; Event not published");
        }
    }
}

/// One Job to create, waiting for a launch worker.
#[derive(Clone)]
pub struct PendingLaunch {
    /// What to create.
    pub launch: Box<Launch>,
    /// The event, e.g. `user:deploy@42`.
    pub event: String,
    /// When the event came off the stream (the launch deadline counts from here).
    pub received: Instant,
    /// The query to answer with the Job's output, on the connection that received it.
    pub answer: Option<PendingAnswer>,
}

/// The dispatcher's effects on Kubernetes.
pub struct KubeEffects {
    /// Results.
    pub sinks: Sinks,
    /// The launch queue.
    pub launches: mpsc::Sender<PendingLaunch>,
    /// The membership record's changes to persist (the state writer takes them).
    pub record: SharedRecord,
    /// Whether the agent was connected before (so that the next connection is a reconnect).
    pub connected_before: bool,
    /// The current agent connection (queries answered from a Job's output go out on it).
    pub serf: Option<serf_client::Client>,
}

impl Effects for KubeEffects {
    fn launch(&mut self, launch: Box<Launch>, event: &str, received: Instant) {
        let answer = match (launch.answer_query, &self.serf) {
            (Some(query_id), Some(serf)) => Some(PendingAnswer {
                query_id,
                serf: serf.clone(),
            }),
            _ => None,
        };
        let p = PendingLaunch {
            launch,
            event: event.to_string(),
            received,
            answer,
        };
        match self.launches.try_send(p) {
            Ok(()) => {
                self.sinks.metrics.launch_queue_depth.inc();
            }
            Err(e) => {
                let p = match e {
                    mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
                };
                let name = p.launch.job.metadata.name.clone().unwrap_or_default();
                tracing::error!(job = %name, "launch queue full: the API server has been unreachable for long; event dropped");
                self.dropped(DropReason::LaunchQueueFull, 1);
                self.sinks.record(
                    &p.launch.handler,
                    &p.launch.route,
                    &p.event,
                    RouteEvent::Skipped {
                        reason: SkipReason::LaunchDropped.as_str().into(),
                        message: format!("the launch queue is full; Job {name} was not created"),
                    },
                );
                self.sinks.notify(
                    "SerfHandler",
                    &p.launch.handler,
                    Severity::Warning,
                    "JobCreateFailed",
                    format!(
                        "route {} dropped {}: the launch queue is full",
                        p.launch.route, p.event
                    ),
                );
            }
        }
    }

    fn record(&mut self, handler: &HandlerRef, route: &str, event: &str, what: RouteEvent) {
        self.sinks.record(handler, route, event, what);
    }

    fn notify(
        &mut self,
        handler: &HandlerRef,
        severity: Severity,
        reason: &'static str,
        note: String,
    ) {
        self.sinks
            .notify("SerfHandler", handler, severity, reason, note);
    }

    fn dropped(&mut self, reason: DropReason, count: u64) {
        for _ in 0..count {
            self.sinks.metrics.dropped(reason.label());
        }
        if matches!(reason, DropReason::Overflow) {
            let _ = self.sinks.status.try_send(StatusMsg::Dropped(count));
        }
    }

    fn routed(&mut self) {
        self.sinks.metrics.events_routed.inc();
    }

    fn answered(&mut self) {
        self.sinks.metrics.queries_answered.inc();
    }

    fn selected(&mut self, selected: Vec<(HandlerRef, Vec<Member>)>) {
        for (h, members) in selected {
            let _ = self.sinks.status.try_send(StatusMsg::Members {
                handler: h,
                members,
            });
        }
    }

    fn record_changed(&mut self, changes: RecordChanges) {
        self.sinks
            .metrics
            .members_changed
            .inc_by(changes.members.len() as u64);
        if let Ok(mut r) = self.record.lock() {
            r.extend(changes);
        }
    }

    fn connection(&mut self, serf: Option<&serf_client::Client>) {
        self.serf = serf.cloned();
    }

    fn serf_link(&mut self, up: bool) {
        self.sinks.metrics.set_serf_ready(up);
        if up {
            // A reconnect is a connection after the first one.
            if self.connected_before {
                self.sinks.metrics.serf_reconnects.inc();
            }
            self.connected_before = true;
        }
    }

    fn dequeued(&mut self) {
        self.sinks.metrics.queue_depth.dec();
    }

    fn routes_compiled(&mut self, compiled: usize, took: std::time::Duration) {
        let m = &self.sinks.metrics;
        m.handlers_compiled.inc_by(compiled as u64);
        m.route_table_seconds.inc_by(took.as_secs_f64());
    }
}

/// The launch workers: take Jobs from the launch queue, at most `workers` at a time, and
/// create them ([`Launcher`], with its retry policy). Results go to status, Events, metrics
/// and the launch ledger.
pub struct LaunchPool {
    client: Client,
    launcher: Launcher,
    policy: RetryPolicy,
    ledger: SharedLedger,
    sinks: Sinks,
    workers: Arc<Semaphore>,
    /// Launches started and not finished, by Job name (to hand over at shutdown).
    inflight: Arc<Mutex<BTreeMap<String, PendingLaunch>>>,
}

impl LaunchPool {
    /// A pool of `workers` on `client`.
    pub fn new(
        client: Client,
        policy: RetryPolicy,
        workers: usize,
        ledger: SharedLedger,
        sinks: Sinks,
    ) -> Self {
        LaunchPool {
            launcher: Launcher::new(client.clone(), policy),
            client,
            policy,
            ledger,
            sinks,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            inflight: Arc::default(),
        }
    }

    /// Creates Jobs from `queue` until it is closed and drained and the creates in flight
    /// have finished, or until `stop` fires (the end of the shutdown grace period). Returns
    /// the launches that did not finish (still queued, or in flight when `stop` fired).
    pub async fn run(
        self,
        mut queue: mpsc::Receiver<PendingLaunch>,
        mut stop: watch::Receiver<bool>,
    ) -> Vec<PendingLaunch> {
        let mut tasks = JoinSet::new();
        let mut stopped = false;
        loop {
            let permit = tokio::select! {
                biased;
                _ = crate::state::until_set(&mut stop) => { stopped = true; break; }
                p = self.workers.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                _ = crate::state::until_set(&mut stop) => { stopped = true; break; }
                p = queue.recv() => p,
            };
            let Some(p) = next else { break };
            self.sinks.metrics.launch_queue_depth.dec();
            let name = p.launch.job.metadata.name.clone().unwrap_or_default();
            if let Ok(mut m) = self.inflight.lock() {
                m.insert(name.clone(), p.clone());
            }
            let worker = self.worker();
            let span = tracing::info_span!("launch", event = %p.event, job = %name);
            tasks.spawn(
                async move {
                    worker.launch(p).await;
                    drop(permit);
                }
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }
        if !stopped {
            // The queue is closed and drained: the creates in flight may finish.
            loop {
                tokio::select! {
                    _ = crate::state::until_set(&mut stop) => break,
                    r = tasks.join_next() => if r.is_none() { break },
                }
            }
        }
        if !tasks.is_empty() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over; Job creates still in flight are handed over"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let mut left: Vec<PendingLaunch> = Vec::new();
        while let Ok(p) = queue.try_recv() {
            self.sinks.metrics.launch_queue_depth.dec();
            left.push(p);
        }
        if let Ok(m) = self.inflight.lock() {
            left.extend(m.values().cloned());
        }
        left
    }

    fn worker(&self) -> Worker {
        Worker {
            client: self.client.clone(),
            launcher: self.launcher.clone(),
            policy: self.policy,
            ledger: self.ledger.clone(),
            sinks: self.sinks.clone(),
            inflight: self.inflight.clone(),
        }
    }
}

struct Worker {
    client: Client,
    launcher: Launcher,
    policy: RetryPolicy,
    ledger: SharedLedger,
    sinks: Sinks,
    inflight: Arc<Mutex<BTreeMap<String, PendingLaunch>>>,
}

impl Worker {
    fn ledger_has(&self, h: &HandlerRef, name: &str) -> Option<bool> {
        let l = self.ledger.lock().ok()?;
        l.is_loaded(h).then(|| l.contains(h, name))
    }

    async fn launch(self, p: PendingLaunch) {
        let l = &p.launch;
        let name = l.job.metadata.name.clone().unwrap_or_default();
        // The ledger remembers launches whose Jobs are gone; read it once per handler.
        if let Err(e) = ledger::load_once(
            &self.client,
            &self.ledger,
            &l.handler,
            self.policy.call_timeout,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot read the launch ledger; relying on the Job name alone");
        }
        let result = if self.ledger_has(&l.handler, &name) == Some(true) {
            None
        } else {
            // Where an event's time goes: received → here (queue and routing), then the
            // API server's answer ("Job created" logs the total).
            tracing::debug!(since_received = ?p.received.elapsed(), "creating the Job");
            Some(self.launcher.launch_since(l, p.received).await)
        };
        self.report(&p, &name, result);
        if let Ok(mut m) = self.inflight.lock() {
            m.remove(&name);
        }
    }

    /// A query taken by the Job's route is answered with its output: a task of its own
    /// waits for the Job's Pod to finish.
    fn answer_from_output(&self, p: &PendingLaunch) {
        let Some(pending) = p.answer.clone() else {
            return;
        };
        let span = tracing::info_span!("answer", event = %p.event, job = p.launch.job.metadata.name.as_deref().unwrap_or(""));
        tokio::spawn(
            crate::answer::answer_with_output(
                self.client.clone(),
                self.sinks.clone(),
                p.launch.clone(),
                p.event.clone(),
                pending,
                self.policy.call_timeout,
            )
            .instrument(span),
        );
    }

    fn report(&self, p: &PendingLaunch, name: &str, result: Option<LaunchResult>) {
        let l = &p.launch;
        let metrics = &self.sinks.metrics;
        let record_in_ledger = |name: &str| {
            if let Ok(mut ledger) = self.ledger.lock() {
                ledger.record(&l.handler, name, crate::ledger::unix_now());
            }
        };
        match result {
            None => {
                tracing::info!("launched before (launch ledger): not launched again");
                metrics.dropped(DropReason::Duplicate.label());
                self.sinks.record(
                    &l.handler,
                    &l.route,
                    &p.event,
                    RouteEvent::Skipped {
                        reason: SkipReason::Duplicate.as_str().into(),
                        message: format!("Job {name} was launched for this event before"),
                    },
                );
            }
            Some(LaunchResult::Created { name }) => {
                self.answer_from_output(p);
                let took = p.received.elapsed();
                tracing::info!(?took, "Job created");
                metrics.jobs_created.inc();
                metrics.event_to_job_seconds.observe(took.as_secs_f64());
                record_in_ledger(&name);
                self.sinks.record(
                    &l.handler,
                    &l.route,
                    &p.event,
                    RouteEvent::Launched { job: name.clone() },
                );
                self.sinks.notify(
                    "SerfHandler",
                    &l.handler,
                    Severity::Normal,
                    "JobCreated",
                    format!("route {} created Job {name} for {}", l.route, p.event),
                );
            }
            Some(LaunchResult::AlreadyLaunched { name }) => {
                self.answer_from_output(p);
                tracing::info!("Job exists already: a duplicate or a replay");
                metrics.dropped(DropReason::Duplicate.label());
                record_in_ledger(&name);
                self.sinks.record(
                    &l.handler,
                    &l.route,
                    &p.event,
                    RouteEvent::Skipped {
                        reason: SkipReason::Duplicate.as_str().into(),
                        message: format!("Job {name} already exists for this event"),
                    },
                );
            }
            Some(LaunchResult::Failed {
                name,
                code,
                message,
                retried,
            }) => {
                metrics
                    .job_create_errors
                    .get_or_create(&CodeLabel {
                        code: code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "transport".into()),
                    })
                    .inc();
                let why = if retried {
                    metrics.dropped(DropReason::LaunchDeadline.label());
                    format!(
                        "the API server stayed unreachable until the launch deadline: {message}"
                    )
                } else {
                    message
                };
                tracing::warn!(code = ?code, "Job not created: {why}");
                self.sinks.record(
                    &l.handler,
                    &l.route,
                    &p.event,
                    RouteEvent::Skipped {
                        reason: SkipReason::JobCreateFailed.as_str().into(),
                        message: why.clone(),
                    },
                );
                self.sinks.notify(
                    "SerfHandler",
                    &l.handler,
                    Severity::Warning,
                    "JobCreateFailed",
                    format!(
                        "route {} could not create Job {name} for {}: {why}",
                        l.route, p.event
                    ),
                );
            }
        }
    }
}

/// client-go's spam filter defaults, per object: a burst of 25 Events, then one per 5
/// minutes. A storm of Serf events must not turn into a storm of API writes; the route's
/// status keeps the counts and the latest of each.
const EVENT_BURST: f64 = 25.0;
const EVENT_REFILL: Duration = Duration::from_secs(300);
/// client-go's aggregator defaults: past 10 distinct notes of one reason on one object
/// within 10 minutes, the rest are one series, "(combined from similar events)".
const SIMILAR_MAX: u32 = 10;
const SIMILAR_WINDOW: Duration = Duration::from_secs(600);

/// The spam filter and aggregator in front of the Event recorder.
#[derive(Default)]
pub struct EventThrottle {
    buckets: HashMap<String, (f64, Instant)>,
    similar: HashMap<(String, &'static str), (Instant, u32)>,
}

impl EventThrottle {
    /// Whether an Event on `object` may go out at `now` (takes a token).
    pub fn admit(&mut self, object: &str, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            self.buckets
                .retain(|_, (_, t)| now.duration_since(*t) < EVENT_REFILL * 25);
        }
        let (tokens, last) = self
            .buckets
            .entry(object.to_string())
            .or_insert((EVENT_BURST, now));
        let refill = now.duration_since(*last).as_secs_f64() / EVENT_REFILL.as_secs_f64();
        *tokens = (*tokens + refill).min(EVENT_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The action and note an Event goes out with: its own (one Event per distinct note),
    /// or, past [`SIMILAR_MAX`] in the window, the combined series.
    pub fn shape(
        &mut self,
        object: &str,
        reason: &'static str,
        note: &str,
        now: Instant,
    ) -> (String, String) {
        if self.similar.len() > 10_000 {
            self.similar
                .retain(|_, (t, _)| now.duration_since(*t) < SIMILAR_WINDOW);
        }
        let e = self
            .similar
            .entry((object.to_string(), reason))
            .or_insert((now, 0));
        if now.duration_since(e.0) > SIMILAR_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > SIMILAR_MAX {
            (
                format!("{reason}-combined"),
                format!("(combined from similar events): {note}"),
            )
        } else {
            (event_action(reason, note), note.to_string())
        }
    }
}

/// Publishes Kubernetes Events from `rx` until it closes; each publish is bounded by
/// `timeout`. Events past the spam filter are dropped (counted as
/// `events_dropped_total{reason="event_rate_limited"}`).
pub async fn publish_events(
    client: Client,
    pod_name: String,
    mut rx: mpsc::Receiver<EventReq>,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "serf-operator".into(),
            instance: Some(pod_name).filter(|s| !s.is_empty()),
        },
    );
    let mut throttle = EventThrottle::default();
    while let Some(req) = rx.recv().await {
        let now = Instant::now();
        let object = format!("{}/{}/{}", req.kind, req.object.namespace, req.object.name);
        let (action, note) = throttle.shape(&object, req.reason, &req.note, now);
        if !throttle.admit(&object, now) {
            metrics.dropped("event_rate_limited");
            continue;
        }
        let ev = KubeEvent {
            type_: match req.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: req.reason.into(),
            action,
            note: Some(note.chars().take(1000).collect()),
            secondary: None,
        };
        let target = object_ref(req.kind, &req.object);
        match tokio::time::timeout(timeout, recorder.publish(&ev, &target)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot publish Event"),
            Err(_) => tracing::debug!("publishing an Event timed out"),
        }
    }
}

/// The Event's action: its reason and a digest of its note. The recorder folds Events with
/// the same reason and action on one object into a series that keeps the first note, so
/// with the reason alone every `JobCreated` after the first lost its Job's name. With the
/// digest, each distinct note is an Event of its own, and the same note again (a failure
/// that repeats) is still counted as a series.
pub fn event_action(reason: &str, note: &str) -> String {
    let digest = Sha256::digest(note.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{reason}-{hex}")
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
