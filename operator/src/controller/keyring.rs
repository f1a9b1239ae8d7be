//! The key rotation controller: watches the one Secret holding the gossip keyring (the
//! chart's `serf.encryptKeySecret`) and, on the leader only, brings the whole Serf cluster
//! to it through the agent ([`crate::keyring::rotate`]), recording each step first in the
//! ConfigMap [`crate::objects::keyring_record`]. Every step is an Event on the Secret; each
//! rotation that ends counts once in `serf_operator_key_rotations_total{result}`. The cluster
//! is checked again every `recheck` while in sync, and every few seconds while a step waits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::error::Error;
use crate::keyring::Keyring;
use crate::keyring::plan::{Action as Step, Note};
use crate::keyring::rotate::{ConfigMapStore, Rotator, StatusCache};
use crate::metrics::{Metrics, ResultLabel};

/// Steps one reconcile may take before it yields (a rotation takes three or four).
const MAX_STEPS: usize = 12;
/// How soon a step that must wait is tried again.
const WAIT_RECHECK: Duration = Duration::from_secs(5);

/// What every reconcile shares.
pub struct KeyringContext {
    /// The API client.
    pub client: Client,
    /// The current agent connection.
    pub serf: watch::Receiver<Option<serf_client::Client>>,
    /// Whether this replica acts.
    pub leader: watch::Receiver<bool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where the record lives.
    pub store: ConfigMapStore,
    /// The Secret's entry holding the primary key.
    pub primary_entry: String,
    /// How often the cluster is checked again while in sync.
    pub recheck: Duration,
    /// Publishes Events on the Secret.
    pub recorder: Recorder,
    /// The status last written.
    pub written: StatusCache,
}

impl KeyringContext {
    /// A context; Events are reported as `serf-operator` from `pod_name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        serf: watch::Receiver<Option<serf_client::Client>>,
        leader: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        store: ConfigMapStore,
        primary_entry: String,
        recheck: Duration,
        pod_name: &str,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "serf-operator".into(),
                instance: Some(pod_name.to_string()).filter(|s| !s.is_empty()),
            },
        );
        Arc::new(KeyringContext {
            client,
            serf,
            leader,
            metrics,
            store,
            primary_entry,
            recheck,
            recorder,
            written: StatusCache::default(),
        })
    }

    async fn publish(&self, secret: &Secret, note: &Note) {
        if note.warning {
            tracing::warn!(reason = note.reason, "{}", note.message);
        } else {
            tracing::info!(reason = note.reason, "{}", note.message);
        }
        let ev = KubeEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            action: crate::effects::event_action(note.reason, &note.message),
            note: Some(note.message.chars().take(1000).collect()),
            secondary: None,
        };
        let target = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some(secret.name_any()),
            namespace: secret.namespace(),
            uid: secret.metadata.uid.clone(),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(10), self.recorder.publish(&ev, &target))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot publish Event"),
            Err(_) => tracing::debug!("publishing an Event timed out"),
        }
    }
}

/// One reconcile: the Secret's keyring, a few steps towards it, then when to look again.
///
/// # Errors
/// The agent unreachable or the record not written (retried after a pause).
#[tracing::instrument(skip_all, fields(secret = %secret.name_any()))]
pub async fn reconcile(secret: Arc<Secret>, ctx: Arc<KeyringContext>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        // A standby looks again when the leadership changes (reconcile_all_on).
        return Ok(Action::await_change());
    }
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let desired = match Keyring::from_entries(&data, &ctx.primary_entry) {
        Ok(k) => k,
        Err(e) => {
            let note = Note {
                warning: true,
                reason: "KeyringInvalid",
                message: format!("{e}; the cluster's keys are left as they are"),
            };
            ctx.publish(&secret, &note).await;
            return Ok(Action::await_change());
        }
    };
    let serf = ctx.serf.borrow().clone().ok_or(Error::SerfDisconnected)?;
    let rotator = Rotator::with_cache(serf, ctx.store.clone(), ctx.written.clone());
    let outcomes = rotator.run(&desired, MAX_STEPS, now).await?;
    for o in &outcomes {
        for note in &o.notes {
            ctx.publish(&secret, note).await;
        }
        for f in &o.ended {
            ctx.metrics
                .key_rotations
                .get_or_create(&ResultLabel {
                    result: f.result.clone(),
                })
                .inc();
        }
    }
    Ok(match outcomes.last().map(|o| &o.action) {
        Some(Step::InSync) => Action::requeue(ctx.recheck),
        Some(Step::Wait(why)) => {
            tracing::info!(%why, "key rotation waits");
            Action::requeue(WAIT_RECHECK)
        }
        _ => Action::requeue(Duration::from_secs(1)),
    })
}

fn now() -> String {
    crate::local::rfc3339(std::time::SystemTime::now())
}

/// A failed reconcile is tried again after a pause.
pub fn error_policy(_s: Arc<Secret>, err: &Error, ctx: Arc<KeyringContext>) -> Action {
    ctx.metrics.key_rotation_errors.inc();
    tracing::warn!(error = %err, "key rotation step failed; trying again");
    Action::requeue(WAIT_RECHECK)
}

/// Runs the controller on the Secret `name` in `namespace` until `shutdown` resolves. Only
/// that Secret is watched (a field selector: RBAC can grant it by name).
pub async fn run(
    namespace: &str,
    name: &str,
    ctx: Arc<KeyringContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), namespace);
    let leader = super::on_leadership_change(ctx.leader.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    Controller::new(api, cfg)
        .reconcile_all_on(leader)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "keyring controller");
            }
            std::future::ready(())
        })
        .await;
}
