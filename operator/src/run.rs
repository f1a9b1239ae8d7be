//! `serf-operator run`: wires the parts together, and nothing else.
//!
//! - **Event path** (edge-triggered): the agent's stream is drained at once into a bounded
//!   queue; the [`Dispatcher`] routes each event through the pure engine and hands its
//!   decisions to [`KubeEffects`], which queue them for tasks of their own. Nothing on this
//!   path awaits the API server.
//! - **API work**, each on its own task with bounded queues and per-call timeouts: the
//!   [`LaunchPool`] (Job creates, retried until the API server is back or the launch deadline
//!   passes), the [`StateWriter`] (status, ledgers, membership), the Event publisher.
//! - **Level-triggered work** on kube-runtime controllers: SerfEventTriggers
//!   ([`controller::trigger`]), SerfHandlers ([`controller::handler`]) and, with
//!   `--discovery`, SerfServices ([`controller::service`]).
//! - **Leader election** ([`leader`]) gates the once-only work.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use kube::ResourceExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serf_client::{ClientConfig, Subscription, SubscriptionConfig, SubscriptionItem};
use serf_operator_crds::{SerfEventTrigger, SerfHandler};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use crate::controller::{self, api_in};
use crate::dispatch::{Control, Dispatcher, DropReason, Input, Severity};
use crate::effects::{KubeEffects, LaunchPool, PendingLaunch, SharedLedger, Sinks};
use crate::engine::{ActiveJobs, SkipReason};
use crate::index::JobIndex;
use crate::jobs::{HandlerRef, MANAGED_BY};
use crate::launcher::RetryPolicy;
use crate::leader;
pub use crate::leader::LeaderElection;
use crate::metrics::{KindLabel, Metrics};
use crate::record::SharedRecord;
use crate::state::{StateConfig, StateWriter, StatusMsg};
use crate::status::RouteEvent;

/// Settings of `serf-operator run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The Serf agent.
    pub serf: ClientConfig,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Events buffered between the agent's stream and the dispatcher; also the number of
    /// Job creates that may wait for the API server.
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
    /// How long in-flight Job creates may take after SIGTERM before they are handed over.
    pub shutdown_grace: Duration,
    /// How long after its event a Job create is still retried while the API server is
    /// unreachable.
    pub launch_deadline: Duration,
    /// How long one API call may take.
    pub call_timeout: Duration,
    /// Several replicas: elect the one that does the once-only work with a Lease.
    pub leader_election: Option<LeaderElection>,
    /// Gossip key rotation from a Secret (in the state namespace), if on.
    pub keyring: Option<KeyringConfig>,
    /// The Deployment (in the state namespace) that owns the state objects, if any: they are
    /// garbage-collected with it.
    pub owner_deployment: Option<String>,
    /// Publish SerfServices (service discovery): [`controller::service`].
    pub discovery: bool,
}

/// Gossip key rotation settings.
#[derive(Debug, Clone)]
pub struct KeyringConfig {
    /// The Secret holding the keyring (in the state namespace).
    pub secret: String,
    /// Its entry holding the primary key.
    pub primary_entry: String,
    /// The ConfigMap (in the state namespace) holding the rotation's record and status.
    pub configmap: String,
    /// How often the cluster's keys are checked again while in sync.
    pub recheck: Duration,
}

/// Active (unfinished) Jobs, read from the Job index.
struct IndexActive(Vec<Arc<JobIndex>>);

impl ActiveJobs for IndexActive {
    fn active(&self, handler: &HandlerRef, route: &str) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|i| i.active(handler, route))
            .collect()
    }
}

/// The SerfHandlers changed since the forwarder last looked, or a complete (re)list.
#[derive(Default)]
struct HandlerChanges {
    keys: HashSet<ObjectRef<SerfHandler>>,
    relisted: bool,
}

/// The spec version (uid, generation) of each handler seen, to tell a spec change from a
/// change of status or metadata alone.
#[derive(Default)]
struct SpecVersions(std::collections::HashMap<ObjectRef<SerfHandler>, (Option<String>, i64)>);

impl SpecVersions {
    /// Notes `h`'s version; whether it is new or differs from the one noted before (a handler
    /// without a generation always counts as changed).
    fn changed(&mut self, h: &SerfHandler) -> bool {
        let Some(generation) = h.metadata.generation else {
            return true;
        };
        let version = (h.metadata.uid.clone(), generation);
        self.0.insert(ObjectRef::from_obj(h), version.clone()) != Some(version)
    }
}

/// Keeps a store of the SerfHandlers in one scope up to date from a watch (retried with
/// backoff; managed fields, never read, are not kept). Each new handler, change of a
/// handler's spec (its generation) and deletion is noted in `changes` (then `changed` is
/// notified) and sent to `trigger`, the handler controller's input. A change of status or
/// metadata alone (the operator's own status writes) only updates the store: nothing the
/// operator does depends on it.
fn watch_handlers(
    set: &mut JoinSet<()>,
    api: kube::Api<SerfHandler>,
    changes: Arc<Mutex<HandlerChanges>>,
    changed: Arc<Notify>,
    trigger: futures::channel::mpsc::UnboundedSender<SerfHandler>,
) -> Store<SerfHandler> {
    let (reader, writer) = reflector::store();
    let mut versions = SpecVersions::default();
    set.spawn(
        reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(|h| {
                h.metadata.managed_fields = None;
            }),
        )
        .default_backoff()
        .for_each(move |r| {
            match r {
                Err(e) => tracing::warn!(error = %e, kind = "SerfHandler", "watch"),
                Ok(ev) => {
                    match &ev {
                        watcher::Event::Init => versions = SpecVersions::default(),
                        watcher::Event::InitApply(h) => {
                            versions.changed(h);
                        }
                        watcher::Event::Apply(h) if !versions.changed(h) => {
                            return std::future::ready(());
                        }
                        watcher::Event::Delete(h) => {
                            versions.0.remove(&ObjectRef::from_obj(h));
                        }
                        _ => {}
                    }
                    if let Ok(mut c) = changes.lock() {
                        match &ev {
                            watcher::Event::Apply(h) | watcher::Event::Delete(h) => {
                                c.keys.insert(ObjectRef::from_obj(h));
                            }
                            watcher::Event::InitDone => c.relisted = true,
                            _ => {}
                        }
                    }
                    if let watcher::Event::Apply(h) | watcher::Event::InitApply(h) = &ev {
                        // The controller reads the object from the store; a key is enough.
                        let mut key = SerfHandler::new(&h.name_any(), h.spec.clone());
                        key.metadata.namespace = h.metadata.namespace.clone();
                        let _ = trigger.unbounded_send(key);
                    }
                    changed.notify_one();
                }
            }
            std::future::ready(())
        }),
    );
    reader
}

/// Runs the operator until `shutdown` resolves, then stops reading events, lets in-flight
/// Job creates finish (bounded by the grace period), hands the rest over to the next start,
/// writes status, and returns.
///
/// # Errors
/// The admin listener cannot bind, the Lease cannot be set up, or the caches never sync.
pub async fn run(
    client: Client,
    cfg: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (--metrics-addr, SERF_OPERATOR_METRICS_ADDR): {e}",
                cfg.metrics_addr
            )
        })?;
    tracing::info!(addr = %cfg.metrics_addr, "serving /metrics, /healthz, /readyz");
    let admin = tokio::spawn(crate::admin::serve(listener, metrics.clone()));

    // Caches: SerfHandlers (their changes go to the dispatcher) and the Jobs it owns.
    let scopes: Vec<Option<String>> = if cfg.namespaces.is_empty() {
        vec![None]
    } else {
        cfg.namespaces.iter().cloned().map(Some).collect()
    };
    let mut watches = JoinSet::new();
    let handlers_changed = Arc::new(Notify::new());
    let owned_jobs =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let mut handler_stores: Vec<Store<SerfHandler>> = Vec::new();
    let mut handler_triggers = Vec::new();
    let handler_changes: Arc<Mutex<HandlerChanges>> = Arc::default();
    let mut job_index: Vec<Arc<JobIndex>> = Vec::new();
    let mut job_owners = Vec::new();
    for ns in &scopes {
        let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
        handler_stores.push(watch_handlers(
            &mut watches,
            api_in(&client, ns),
            handler_changes.clone(),
            handlers_changed.clone(),
            trigger_tx,
        ));
        handler_triggers.push(trigger_rx);
        let index = Arc::new(JobIndex::default());
        let (owners_tx, owners_rx) = futures::channel::mpsc::unbounded();
        watches.spawn(crate::index::maintain(
            api_in(&client, ns),
            owned_jobs.clone(),
            index.clone(),
            owners_tx,
        ));
        job_index.push(index);
        job_owners.push(owners_rx);
    }
    for s in &handler_stores {
        s.wait_until_ready().await?;
    }
    for i in &job_index {
        i.wait_until_ready().await;
    }
    metrics.set_caches_ready(true);
    tracing::info!("caches synced");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (status_tx, status_rx) = mpsc::channel::<StatusMsg>(16 * 1024);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let (launch_tx, launch_rx) = mpsc::channel::<PendingLaunch>(cfg.queue_size.max(1));
    let (control_tx, control_rx) = mpsc::channel::<Control>(64);
    let (input_tx, input_rx) = mpsc::channel::<Input>(cfg.queue_size.max(1));
    let record: SharedRecord = Arc::default();
    let (serf_tx, serf_rx) = watch::channel::<Option<serf_client::Client>>(None);
    let ledger: SharedLedger = Arc::new(Mutex::new(crate::ledger::Ledger::default()));
    let sinks = Sinks {
        status: status_tx.clone(),
        events: events_tx,
        metrics: metrics.clone(),
    };

    if let Some(d) = &cfg.owner_deployment {
        crate::objects::own_by_deployment(&client, &cfg.state_namespace, d, cfg.call_timeout)
            .await?;
    }
    // Leader election.
    let (verdict, _single) =
        leader::elect(&client, &cfg.state_namespace, cfg.leader_election.as_ref()).await?;
    let mut tasks = JoinSet::new();
    tasks.spawn(leader::follow(
        verdict.clone(),
        client.clone(),
        cfg.state_namespace.clone(),
        control_tx.clone(),
        status_tx.clone(),
        metrics.clone(),
        cfg.call_timeout,
        record.clone(),
    ));

    // API work, each on a task of its own.
    let state = StateWriter::new(
        client.clone(),
        StateConfig {
            namespace: cfg.state_namespace.clone(),
            interval: cfg.flush_interval,
            call_timeout: cfg.call_timeout,
        },
        ledger.clone(),
        record.clone(),
        Some(metrics.clone()),
    );
    let state_task = tokio::spawn(state.run(status_rx, verdict.clone(), stop_rx.clone()));
    let events_task = tokio::spawn(crate::effects::publish_events(
        client.clone(),
        cfg.pod_name.clone(),
        events_rx,
        cfg.call_timeout,
        metrics.clone(),
    ));
    let policy = RetryPolicy {
        deadline: cfg.launch_deadline,
        call_timeout: cfg.call_timeout,
        ..RetryPolicy::default()
    };
    let (pool_stop_tx, pool_stop_rx) = watch::channel(false);
    let pool = LaunchPool::new(
        client.clone(),
        policy,
        cfg.workers,
        ledger.clone(),
        sinks.clone(),
    );
    let pool_task = tokio::spawn(pool.run(launch_rx, pool_stop_rx));

    // Job creates the previous run handed over.
    match crate::state::take_over(&client, &cfg.state_namespace, cfg.call_timeout).await {
        Ok(handed) if !handed.is_empty() => {
            tracing::info!(
                count = handed.len(),
                "finishing the Job creates handed over by the previous run"
            );
            for (launch, event) in handed {
                let p = PendingLaunch {
                    launch: Box::new(launch),
                    event,
                    received: Instant::now(),
                    answer: None,
                };
                if launch_tx.try_send(p).is_ok() {
                    metrics.launch_queue_depth.inc();
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the Job creates handed over by the previous run")
        }
    }

    // Controllers.
    let trigger_ctx = controller::trigger::TriggerContext::new(
        client.clone(),
        serf_rx.clone(),
        verdict.clone(),
        sinks.clone(),
    );
    let handler_ctx = Arc::new(controller::handler::HandlerContext {
        client: client.clone(),
        leader: verdict.clone(),
        status: status_tx.clone(),
        jobs: job_index.clone(),
        ledger: ledger.clone(),
        call_timeout: cfg.call_timeout,
        recheck: cfg.flush_interval * 3,
        serf: serf_rx.clone(),
        sinks: sinks.clone(),
        reported: Default::default(),
        validated: Default::default(),
    });
    for ((ns, owners), (store, trigger)) in scopes
        .iter()
        .zip(job_owners)
        .zip(handler_stores.iter().cloned().zip(handler_triggers))
    {
        let mut stop = stop_rx.clone();
        tasks.spawn(controller::trigger::run(
            api_in::<SerfEventTrigger>(&client, ns),
            trigger_ctx.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        let mut stop = stop_rx.clone();
        tasks.spawn(controller::handler::run(
            store,
            trigger,
            owners,
            handler_ctx.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }

    // Handler changes → the dispatcher (recompiled routes) and the state writer: after a
    // (re)list the whole set, otherwise only the handlers that changed.
    {
        let stores = handler_stores.clone();
        let control = control_tx.clone();
        let status = status_tx.clone();
        let changed = handlers_changed.clone();
        let changes = handler_changes.clone();
        tasks.spawn(async move {
            loop {
                changed.notified().await;
                // Let a burst of changes (the initial list) settle into one recompile.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let taken = match changes.lock() {
                    Ok(mut c) => std::mem::take(&mut *c),
                    Err(_) => return,
                };
                let (status_msg, control_msg) = if taken.relisted {
                    let all: Vec<Arc<SerfHandler>> =
                        stores.iter().flat_map(|s| s.state()).collect();
                    let present = all.iter().map(|h| HandlerRef::key_of(h)).collect();
                    (StatusMsg::Present(present), Control::Handlers(all))
                } else if taken.keys.is_empty() {
                    continue;
                } else {
                    let (mut changed, mut gone) = (Vec::new(), Vec::new());
                    for k in taken.keys {
                        match stores.iter().find_map(|s| s.get(&k)) {
                            Some(h) => changed.push(h),
                            None => gone.push((k.namespace.unwrap_or_default(), k.name)),
                        }
                    }
                    let present = changed.iter().map(|h| HandlerRef::key_of(h)).collect();
                    (
                        StatusMsg::Changed {
                            present,
                            gone: gone.clone(),
                        },
                        Control::HandlersChanged { changed, gone },
                    )
                };
                let _ = status.send(status_msg).await;
                if control.send(control_msg).await.is_err() {
                    return;
                }
            }
        });
    }

    // The membership last acted on, to start from.
    let membership =
        match crate::record::load(&client, &cfg.state_namespace, cfg.call_timeout, &record).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the membership record; starting empty");
                Default::default()
            }
        };

    // Gossip key rotation from the keyring Secret (the leader acts).
    if let Some(k) = &cfg.keyring {
        let ctx = controller::keyring::KeyringContext::new(
            client.clone(),
            serf_rx.clone(),
            verdict.clone(),
            metrics.clone(),
            crate::keyring::rotate::ConfigMapStore::new(
                client.clone(),
                cfg.state_namespace.clone(),
                k.configmap.clone(),
                cfg.call_timeout,
            ),
            k.primary_entry.clone(),
            k.recheck,
            &cfg.pod_name,
        );
        let mut stop = stop_rx.clone();
        let (ns, name) = (cfg.state_namespace.clone(), k.secret.clone());
        tasks.spawn(async move {
            controller::keyring::run(&ns, &name, ctx, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
        tracing::info!(secret = %k.secret, record = %k.configmap, "gossip key rotation on");
    }

    // Service discovery: SerfServices published from a membership of their own (the leader
    // writes).
    if cfg.discovery {
        controller::service::start(
            &mut tasks,
            &client,
            cfg.serf.clone(),
            &scopes,
            verdict.clone(),
            cfg.call_timeout,
            &stop_rx,
        );
    }

    // The Serf link: the stream is drained at once into the bounded queue.
    let sub = Subscription::start(SubscriptionConfig::new(cfg.serf.clone(), "*"))?;
    let reader = tokio::spawn(read_serf(sub, input_tx, sinks.clone(), serf_tx));

    let leader_now = *verdict.borrow();
    let dispatcher = Dispatcher::new(
        membership,
        (cfg.pod_name.clone(), cfg.pod_namespace.clone()),
        leader_now,
        Box::new(IndexActive(job_index.clone())),
        KubeEffects {
            sinks: sinks.clone(),
            launches: launch_tx,
            record,
            connected_before: false,
            serf: None,
        },
    );
    // The handlers are compiled before the first event (the catch-up on connecting needs
    // them); later changes come through the control channel.
    let mut dispatcher = dispatcher;
    let initial: Vec<Arc<SerfHandler>> = handler_stores.iter().flat_map(|s| s.state()).collect();
    dispatcher.control(Control::Handlers(initial)).await;
    let dispatcher = dispatcher.run(input_rx, control_rx, shutdown).await;

    tracing::info!("shutting down: no more events are read; finishing in-flight Job creates");
    reader.abort();
    metrics.set_serf_ready(false);
    drop(dispatcher);
    let grace = cfg.shutdown_grace;
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let _ = pool_stop_tx.send(true);
    });
    let left = pool_task.await.unwrap_or_default();
    stopper.abort();
    let dropped =
        crate::state::hand_over(&client, &cfg.state_namespace, left, cfg.call_timeout).await;
    for p in &dropped {
        let name = p.launch.job.metadata.name.clone().unwrap_or_default();
        tracing::error!(job = %name, event = %p.event, "Job create dropped at shutdown: neither finished nor handed over");
        metrics.dropped(DropReason::Shutdown.label());
        sinks.record(
            &p.launch.handler,
            &p.launch.route,
            &p.event,
            RouteEvent::Skipped {
                reason: SkipReason::LaunchDropped.as_str().into(),
                message: format!("the operator stopped before Job {name} was created"),
            },
        );
        sinks.notify(
            "SerfHandler",
            &p.launch.handler,
            Severity::Warning,
            "JobCreateFailed",
            format!("route {} dropped {} at shutdown", p.launch.route, p.event),
        );
    }
    drop(sinks);
    drop(status_tx);
    drop(control_tx);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(cfg.call_timeout, state_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events_task).await;
    tasks.abort_all();
    watches.abort_all();
    admin.abort();
    Ok(())
}

/// Drains the agent's stream into the dispatcher's queue. Events that do not fit are
/// dropped and counted (`overflow`), never waited for.
pub async fn read_serf(
    mut sub: Subscription,
    queue: mpsc::Sender<Input>,
    sinks: Sinks,
    serf: watch::Sender<Option<serf_client::Client>>,
) {
    let metrics = sinks.metrics.clone();
    let mut overflow_reported = Instant::now() - Duration::from_secs(3600);
    let mut overflowed: u64 = 0;
    while let Some(item) = sub.next().await {
        let input = match item {
            SubscriptionItem::Event(ev) => {
                metrics
                    .events_received
                    .get_or_create(&KindLabel {
                        kind: ev.kind().to_string(),
                    })
                    .inc();
                match queue.try_send(Input::Event(ev, Instant::now())) {
                    Ok(()) => {
                        metrics.queue_depth.inc();
                    }
                    Err(mpsc::error::TrySendError::Full(Input::Event(ev, _))) => {
                        metrics.dropped(DropReason::Overflow.label());
                        overflowed += 1;
                        tracing::error!(event = ev.kind(), "event queue full: event dropped");
                        if overflow_reported.elapsed() > Duration::from_secs(1) {
                            overflow_reported = Instant::now();
                            let _ = sinks.status.try_send(StatusMsg::Dropped(overflowed));
                            overflowed = 0;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            SubscriptionItem::Connected { client, .. } => {
                serf.send_replace(Some(client.clone()));
                Input::Connected(client)
            }
            SubscriptionItem::Disconnected { error } => {
                serf.send_replace(None);
                Input::Disconnected(error.to_string())
            }
            SubscriptionItem::Lagged { missed } => Input::Lagged(missed),
            SubscriptionItem::Undecodable(e) => {
                tracing::warn!(error = %e, "undecodable Serf record");
                continue;
            }
            _ => continue,
        };
        if queue.send(input).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(uid: &str, generation: Option<i64>, observed: Option<i64>) -> SerfHandler {
        let mut h: SerfHandler = serde_json::from_value(serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
            "metadata": {"name": "web", "namespace": "apps", "uid": uid},
            "spec": {"routes": []}
        }))
        .unwrap();
        h.metadata.generation = generation;
        h.status = observed.map(|g| serf_operator_crds::SerfHandlerStatus {
            observed_generation: Some(g),
            ..Default::default()
        });
        h
    }

    #[test]
    fn only_a_new_spec_counts_as_a_change() {
        let mut v = SpecVersions::default();
        assert!(v.changed(&handler("u1", Some(1), None)), "new");
        assert!(
            !v.changed(&handler("u1", Some(1), Some(1))),
            "the operator's own status write"
        );
        assert!(v.changed(&handler("u1", Some(2), Some(1))), "spec edited");
        assert!(
            v.changed(&handler("u2", Some(2), None)),
            "deleted and made again under the same name"
        );
        assert!(v.changed(&handler("u2", None, None)), "no generation");
        assert!(v.changed(&handler("u2", None, None)));
    }
}
