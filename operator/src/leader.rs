//! **Leader election.** Which replica does the once-only work (acting on member events,
//! firing triggers, pruning, writing status, ledgers and the membership record): with one
//! replica, always this one; with `--leader-elect`, the holder of a Lease
//! (`kube-lease-manager`). The verdict is a `watch` channel every part reads; this module
//! also tells the dispatcher and the state writer when this replica takes over.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::{mpsc, watch};

use crate::dispatch::Control;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::StatusMsg;

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

/// The verdict: `true` while this replica is the leader. Without election it is always
/// `true`.
///
/// # Errors
/// The Lease cannot be set up.
pub async fn elect(
    client: &Client,
    namespace: &str,
    election: Option<&LeaderElection>,
) -> Result<(watch::Receiver<bool>, Option<watch::Sender<bool>>), Error> {
    let Some(le) = election else {
        let (tx, rx) = watch::channel(true);
        return Ok((rx, Some(tx)));
    };
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &le.lease_name)
        .with_namespace(namespace)
        .with_identity(&le.identity)
        .with_duration(le.duration_secs.max(2))
        .with_grace((le.duration_secs / 3).max(1))
        .with_field_manager(crate::ledger::FIELD_MANAGER)
        .build()
        .await
        .map_err(|e| Error::Invalid(format!("cannot set up the Lease: {e}")))?;
    let (rx, _task) = manager.watch().await;
    tracing::info!(lease = %le.lease_name, identity = %le.identity, "leader election on");
    if let Some(o) = crate::objects::owner() {
        // Under a field manager of its own, so that the Lease manager's applies keep it.
        let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(client.clone(), namespace);
        let pp = kube::api::PatchParams {
            field_manager: Some(format!("{}-owner", crate::ledger::FIELD_MANAGER)),
            ..Default::default()
        };
        let patch = serde_json::json!({"metadata": {"ownerReferences": [o]}});
        if let Err(e) = api
            .patch(&le.lease_name, &pp, &kube::api::Patch::Merge(patch))
            .await
        {
            tracing::warn!(error = %e, lease = %le.lease_name, "cannot set the Lease's owner; it stays after an uninstall");
        }
    }
    Ok((rx, None))
}

/// Follows the verdict: on each change tells the dispatcher (with the persisted membership
/// to take over, read here, off the event path) and the state writer, and counts it.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    mut verdict: watch::Receiver<bool>,
    client: Client,
    namespace: String,
    control: mpsc::Sender<Control>,
    status: mpsc::Sender<StatusMsg>,
    metrics: Arc<Metrics>,
    call_timeout: Duration,
    record: crate::record::SharedRecord,
) {
    let mut was = *verdict.borrow_and_update();
    metrics.leader.set(i64::from(was));
    if was {
        tracing::info!("holding the lease: acting on member events, triggers and pruning");
    }
    while verdict.changed().await.is_ok() {
        let now = *verdict.borrow_and_update();
        if now == was {
            continue;
        }
        was = now;
        metrics.leader.set(i64::from(now));
        metrics.lease_transitions.inc();
        if !now {
            tracing::warn!(
                "lost the lease: no longer acting on member events, triggers or pruning"
            );
            let _ = control
                .send(Control::Leader {
                    leader: false,
                    membership: None,
                })
                .await;
            continue;
        }
        tracing::info!("holding the lease: acting on member events, triggers and pruning");
        let _ = status.send(StatusMsg::TookOver).await;
        let membership = match crate::record::load(&client, &namespace, call_timeout, &record).await
        {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the membership record; keeping this replica's view");
                None
            }
        };
        let _ = control
            .send(Control::Leader {
                leader: true,
                membership,
            })
            .await;
    }
}
