//! The SerfHandler controller: on every spec change (and on every change of a Job it owns)
//! it validates the handler's routes, hands Ready and `observedGeneration` to the state
//! writer, and, on the leader, prunes finished Jobs beyond the history limits, each only
//! once the launch ledger records it (so its event cannot launch it again).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use serf_operator_crds::SerfHandler;
use tokio::sync::{mpsc, watch};

use crate::effects::SharedLedger;
use crate::engine::{DEFAULT_HISTORY_LIMIT, Router};
use crate::error::{Error, kube_call};
use crate::jobs::{HandlerRef, LABEL_HANDLER, LABEL_ROUTE, MANAGED_BY};
use crate::ledger;
use crate::state::StatusMsg;

/// What every handler reconcile shares.
pub struct HandlerContext {
    /// The API client.
    pub client: Client,
    /// Whether this replica prunes.
    pub leader: watch::Receiver<bool>,
    /// The state writer's inbox.
    pub status: mpsc::Sender<StatusMsg>,
    /// The Jobs the operator owns.
    pub jobs: Vec<Store<Job>>,
    /// The launch ledgers.
    pub ledger: SharedLedger,
    /// How long one API call may take.
    pub call_timeout: Duration,
    /// How long after recording a Job in the ledger its deletion is tried again.
    pub recheck: Duration,
}

/// When a Job finished, and whether it succeeded.
pub fn finished(job: &Job) -> Option<(bool, String)> {
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

/// The Jobs to delete for `h`: per route, the finished ones beyond its history limits
/// (successful and failed counted apart), newest kept. Pure.
pub fn beyond_history(h: &SerfHandler, jobs: &[Arc<Job>]) -> Vec<String> {
    let href = HandlerRef::of(h);
    let handler_label = crate::naming::label_value(&href.name);
    let keep =
        |limit: Option<i32>| usize::try_from(limit.unwrap_or(DEFAULT_HISTORY_LIMIT)).unwrap_or(0);
    let (keep_ok, keep_failed) = (
        keep(h.spec.successful_jobs_history_limit),
        keep(h.spec.failed_jobs_history_limit),
    );
    // route label → [(succeeded, finish time, name)]
    let mut by_route: BTreeMap<String, Vec<(bool, String, String)>> = BTreeMap::new();
    for j in jobs {
        let labels = j.metadata.labels.clone().unwrap_or_default();
        if j.metadata.namespace.as_deref() != Some(href.namespace.as_str())
            || labels.get(LABEL_HANDLER) != Some(&handler_label)
        {
            continue;
        }
        if let (Some(route), Some((ok, t)), Some(name)) = (
            labels.get(LABEL_ROUTE),
            finished(j),
            j.metadata.name.clone(),
        ) {
            by_route
                .entry(route.clone())
                .or_default()
                .push((ok, t, name));
        }
    }
    let mut out = Vec::new();
    for r in &h.spec.routes {
        let Some(done) = by_route.get(&crate::naming::label_value(&r.name)) else {
            continue;
        };
        for (want_ok, keep) in [(true, keep_ok), (false, keep_failed)] {
            let mut these: Vec<&(bool, String, String)> =
                done.iter().filter(|j| j.0 == want_ok).collect();
            these.sort_by(|a, b| b.1.cmp(&a.1));
            out.extend(these.into_iter().skip(keep).map(|j| j.2.clone()));
        }
    }
    out
}

/// One reconcile of one handler.
///
/// # Errors
/// A ledger read or a Job deletion the API server refused or did not answer.
pub async fn reconcile(h: Arc<SerfHandler>, ctx: Arc<HandlerContext>) -> Result<Action, Error> {
    let errors = Router::new(std::slice::from_ref(&*h)).errors().to_vec();
    for e in &errors {
        tracing::warn!("{e}");
    }
    let _ = ctx
        .status
        .send(StatusMsg::Handler {
            handler: h.clone(),
            errors,
        })
        .await;
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let href = HandlerRef::of(&h);
    let jobs: Vec<Arc<Job>> = ctx.jobs.iter().flat_map(|s| s.state()).collect();
    let prune = beyond_history(&h, &jobs);
    if prune.is_empty() {
        return Ok(Action::await_change());
    }
    let loaded = ctx
        .ledger
        .lock()
        .map(|l| l.is_loaded(&href))
        .unwrap_or(false);
    if !loaded {
        let text = kube_call(
            "read the launch ledger",
            ctx.call_timeout,
            ledger::read_ledger(&ctx.client, &href),
        )
        .await?;
        if let Ok(mut l) = ctx.ledger.lock() {
            l.load(&href, &text);
        }
    }
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &href.namespace);
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    let mut waiting = false;
    for name in prune {
        let recorded = match ctx.ledger.lock() {
            Ok(mut l) => {
                if l.is_recorded(&href, &name) {
                    true
                } else {
                    if !l.contains(&href, &name) {
                        l.record(&href, &name, crate::ledger::unix_now());
                    }
                    false
                }
            }
            Err(_) => false,
        };
        if !recorded {
            // Deleted once the ledger with its name is written.
            waiting = true;
            continue;
        }
        match kube_call(
            "prune a finished Job",
            ctx.call_timeout,
            api.delete(&name, &dp),
        )
        .await
        {
            Ok(_) => tracing::info!(job = %name, "pruned by the history limit"),
            Err(e) if e.http_code() == Some(404) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if waiting {
        Action::requeue(ctx.recheck)
    } else {
        Action::await_change()
    })
}

/// Backs off 5 s.
pub fn error_policy(_h: Arc<SerfHandler>, err: &Error, _ctx: Arc<HandlerContext>) -> Action {
    tracing::warn!(error = %err, "handler reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller over `api` (and the Jobs it owns in `jobs_api`) until `shutdown`.
pub async fn run(
    api: Api<SerfHandler>,
    jobs_api: Api<Job>,
    ctx: Arc<HandlerContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let leader = super::on_leadership_change(ctx.leader.clone());
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(api, watcher::Config::default())
        .owns(jobs_api, owned)
        .reconcile_all_on(leader)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "handler controller");
            }
            std::future::ready(())
        })
        .await;
}
