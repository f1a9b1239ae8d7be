//! The one task that writes the operator's state to the API server, gated by the Lease:
//! SerfHandler status (server-side apply under one field manager, in batches, each call with
//! a timeout), the launch ledgers and the membership record. It also hands Job creates that a
//! shutdown cut short over to the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serf_client::Member;
use serf_operator_crds::SerfHandler;
use tokio::sync::{mpsc, watch};

use crate::dispatch::RouteEvent;
use crate::effects::{PendingLaunch, SharedLedger};
use crate::engine::{Launch, RouteError};
use crate::error::{Error, kube_call};
use crate::jobs::HandlerRef;
use crate::ledger::{self, FIELD_MANAGER};
use crate::record::{RecordChanges, SharedRecord};
use crate::status::StatusBook;

/// A change to a handler's status.
#[derive(Debug)]
pub enum StatusMsg {
    /// What a route did with an event.
    Route {
        /// The handler.
        handler: HandlerRef,
        /// The route.
        route: String,
        /// The event, e.g. `user:deploy@42`.
        event: String,
        /// What happened.
        what: RouteEvent,
        /// When (RFC 3339).
        at: String,
    },
    /// A handler's spec as reconciled: Ready, `observedGeneration`, the route list.
    Handler {
        /// The handler.
        handler: Arc<SerfHandler>,
        /// Its route errors.
        errors: Vec<RouteError>,
    },
    /// The handlers that exist (the status of one that existed and is gone is forgotten).
    Present(BTreeSet<(String, String)>),
    /// Handlers added or updated, and handlers deleted, since the last `Present`.
    Changed {
        /// Added or updated (namespace, name).
        present: Vec<(String, String)>,
        /// Deleted (namespace, name): their status is forgotten.
        gone: Vec<(String, String)>,
    },
    /// The members a handler's filters select.
    Members {
        /// The handler.
        handler: HandlerRef,
        /// The members.
        members: Vec<Member>,
    },
    /// Events dropped before routing (queue overflow, stream lag).
    Dropped(u64),
    /// This replica just took the lease: forget the view it had as a standby.
    TookOver,
}

/// The state writer's settings.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Where the membership record lives.
    pub namespace: String,
    /// How often dirty state is written.
    pub interval: Duration,
    /// How long one API call may take.
    pub call_timeout: Duration,
}

/// Owns the status book; see the module docs.
pub struct StateWriter {
    client: Client,
    cfg: StateConfig,
    book: StatusBook,
    ledger: SharedLedger,
    uids: BTreeMap<(String, String), String>,
    /// The handlers present at the last `Present`.
    present: BTreeSet<(String, String)>,
    dropped_total: u64,
    record: SharedRecord,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl StateWriter {
    /// A writer on `client`.
    pub fn new(
        client: Client,
        cfg: StateConfig,
        ledger: SharedLedger,
        record: SharedRecord,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        StateWriter {
            record,
            metrics,
            client,
            cfg,
            book: StatusBook::default(),
            ledger,
            uids: BTreeMap::new(),
            present: Default::default(),
            dropped_total: 0,
        }
    }

    /// Applies one change in memory.
    pub fn apply(&mut self, msg: StatusMsg) {
        match msg {
            StatusMsg::Route {
                handler,
                route,
                event,
                what,
                at,
            } => self.book.record(&handler, &route, &event, what, &at),
            StatusMsg::Handler { handler, errors } => {
                let r = HandlerRef::of(&handler);
                if let Some(uid) = r.uid.clone() {
                    self.uids.insert((r.namespace.clone(), r.name.clone()), uid);
                }
                self.book.sync_handler(&handler, &errors, &now());
                if self.dropped_total > 0 {
                    self.book.set_events_dropped(&r, self.dropped_total, &now());
                }
            }
            StatusMsg::Present(keys) => {
                // Forget the handlers that were present and are gone (deleted); one the
                // controller reported before the dispatcher's cache had it is kept.
                let gone: BTreeSet<(String, String)> =
                    self.present.difference(&keys).cloned().collect();
                self.present = keys;
                self.book.retain(|k| !gone.contains(k));
                self.uids.retain(|k, _| !gone.contains(k));
            }
            StatusMsg::Changed { present, gone } => {
                self.present.extend(present);
                for k in &gone {
                    self.present.remove(k);
                    self.uids.remove(k);
                }
                if !gone.is_empty() {
                    let gone: BTreeSet<(String, String)> = gone.into_iter().collect();
                    self.book.retain(|k| !gone.contains(k));
                }
            }
            StatusMsg::Members { handler, members } => {
                let refs: Vec<&Member> = members.iter().collect();
                self.book.set_members(&handler, &refs);
            }
            StatusMsg::Dropped(n) => {
                self.dropped_total += n;
                let at = now();
                for (ns, name) in self.uids.keys().cloned().collect::<Vec<_>>() {
                    let h = HandlerRef {
                        namespace: ns,
                        name,
                        uid: None,
                    };
                    self.book.set_events_dropped(&h, self.dropped_total, &at);
                }
            }
            StatusMsg::TookOver => {
                // Counters continue from the stored status; ledgers are read again.
                self.book = StatusBook::default();
                if let Ok(mut l) = self.ledger.lock() {
                    *l = ledger::Ledger::default();
                }
            }
        }
    }

    /// Writes what changed. A standby discards it (the leader's view is the one written).
    /// Returns false when the membership record could not be written.
    pub async fn flush(&mut self, leader: bool) -> bool {
        if !leader {
            let _ = self.book.take_dirty();
            // The leader's view is the one written.
            if let Ok(mut r) = self.record.lock() {
                *r = RecordChanges::default();
            }
            return true;
        }
        let t = self.cfg.call_timeout;
        // A ledger with launches recorded before it could be read is read first, so that
        // what is stored is kept.
        let unloaded = match self.ledger.lock() {
            Ok(l) => l.unloaded(),
            Err(_) => Vec::new(),
        };
        for h in unloaded {
            if let Err(e) = ledger::load_once(&self.client, &self.ledger, &h, t).await {
                tracing::warn!(error = %e, handler = %h, "cannot read the launch ledger; will retry");
            }
        }
        let changed = match self.ledger.lock() {
            Ok(mut l) => l.take_changes(crate::ledger::unix_now()),
            Err(_) => Vec::new(),
        };
        for (k, changes) in changed {
            let h = HandlerRef {
                namespace: k.0.clone(),
                name: k.1.clone(),
                uid: self.uids.get(&k).cloned(),
            };
            // Its names count as recorded (and their Jobs may be pruned) only once written.
            let write = ledger::write_ledger(&self.client, &h, &changes);
            let left = match tokio::time::timeout(t * 2, write).await {
                Ok(Ok(())) => None,
                Ok(Err((e, left))) => Some((e.to_string(), left)),
                Err(_) => Some((format!("no answer within {:?}", t * 2), changes.clone())),
            };
            if let Some((error, _)) = &left {
                tracing::warn!(%error, handler = %h, "cannot write the launch ledger; will retry");
            }
            if let Ok(mut l) = self.ledger.lock() {
                l.finished(&k, &changes, left.as_ref().map(|(_, left)| left));
            }
        }
        for (k, status) in self.book.take_dirty() {
            let r = kube_call(
                "write the handler's status",
                t,
                crate::status::write_status(&self.client, &k.0, &k.1, &status),
            )
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, handler = %format!("{}/{}", k.0, k.1), "cannot write status; will retry");
                self.book.mark_dirty(&k);
            }
        }
        let changes = match self.record.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => RecordChanges::default(),
        };
        if changes.is_empty() {
            return true;
        }
        let members = changes.members.len();
        let (stats, r) = crate::record::write(&self.client, &self.cfg.namespace, changes, t).await;
        self.metrics_record(stats);
        match r {
            Ok(()) => {
                tracing::debug!(
                    members,
                    calls = stats.calls,
                    bytes = stats.bytes,
                    "membership record written"
                );
                true
            }
            Err((e, left)) => {
                tracing::warn!(error = %e, "cannot persist the membership record; will retry");
                if let Ok(mut r) = self.record.lock() {
                    r.restore(left);
                }
                false
            }
        }
    }

    fn metrics_record(&self, stats: crate::record::WriteStats) {
        if let Some(m) = &self.metrics {
            m.record_writes.inc_by(stats.calls);
            m.record_bytes.inc_by(stats.bytes);
        }
    }

    /// Runs until `rx` closes or `stop` fires, writing every `interval` while `leader`
    /// holds; a last write at the end.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<StatusMsg>,
        leader: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = until_set(&mut stop) => break,
                msg = rx.recv() => match msg {
                    Some(m) => self.apply(m),
                    None => break,
                },
                _ = tick.tick() => {
                    let is_leader = *leader.borrow();
                    // What could not be written is kept and retried on the next tick.
                    self.flush(is_leader).await;
                }
            }
        }
        while let Ok(m) = rx.try_recv() {
            self.apply(m);
        }
        let is_leader = *leader.borrow();
        let _ = self.flush(is_leader).await;
    }
}

/// Resolves once `flag` is (or becomes) true, or its sender is gone.
pub async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

fn now() -> String {
    crate::local::rfc3339(std::time::SystemTime::now())
}

/// The most bytes handed over (a ConfigMap holds at most 1 MiB).
const MAX_HANDOVER_BYTES: usize = 900 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Handed {
    launch: Launch,
    event: String,
}

/// Writes the launches a shutdown cut short into [`crate::objects::pending_launches`] for the next start.
/// Returns the ones that could not be handed over (too large, or the API server did not
/// take them): those are dropped, and the caller counts them.
pub async fn hand_over(
    client: &Client,
    namespace: &str,
    left: Vec<PendingLaunch>,
    timeout: Duration,
) -> Vec<PendingLaunch> {
    if left.is_empty() {
        return left;
    }
    let mut data = BTreeMap::new();
    let mut size = 0;
    let mut rest = Vec::new();
    for p in left {
        let name = p.launch.job.metadata.name.clone().unwrap_or_default();
        let text = serde_json::to_string(&Handed {
            launch: (*p.launch).clone(),
            event: p.event.clone(),
        })
        .unwrap_or_default();
        if text.is_empty() || size + text.len() > MAX_HANDOVER_BYTES {
            rest.push(p);
            continue;
        }
        size += text.len();
        data.insert(name, (text, p));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let body: BTreeMap<&String, &String> = data.iter().map(|(k, (t, _))| (k, t)).collect();
    let mut meta = serde_json::json!({"name": crate::objects::pending_launches(), "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": crate::jobs::MANAGED_BY}});
    crate::objects::add_owner(&mut meta);
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta,
        "data": body,
    });
    let r = kube_call(
        "hand over unfinished Job creates",
        timeout,
        api.patch(
            &crate::objects::pending_launches(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(cm),
        ),
    )
    .await;
    match r {
        Ok(_) => {
            tracing::info!(
                count = data.len(),
                "unfinished Job creates handed over to the next start"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot hand over unfinished Job creates");
            rest.extend(data.into_values().map(|(_, p)| p));
        }
    }
    rest
}

/// Reads (and deletes) the launches the previous run handed over.
///
/// # Errors
/// The API error; a handover that cannot be parsed is logged and skipped.
pub async fn take_over(
    client: &Client,
    namespace: &str,
    timeout: Duration,
) -> Result<Vec<(Launch, String)>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let Some(cm) = kube_call(
        "read the handed-over Job creates",
        timeout,
        api.get_opt(&crate::objects::pending_launches()),
    )
    .await?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (name, text) in cm.data.unwrap_or_default() {
        match serde_json::from_str::<Handed>(&text) {
            Ok(h) => out.push((h.launch, h.event)),
            Err(e) => {
                tracing::error!(job = %name, error = %e, "a handed-over Job create cannot be read; dropped")
            }
        }
    }
    kube_call(
        "delete the handed-over Job creates",
        timeout,
        api.delete(
            &crate::objects::pending_launches(),
            &DeleteParams::default(),
        ),
    )
    .await?;
    Ok(out)
}
