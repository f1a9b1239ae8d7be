//! The SerfHandler controller: on every spec change (and whenever a Job it owns finishes)
//! it validates the handler's routes (on the leader, each Job template also by a dry-run
//! create), hands Ready and `observedGeneration` to the state
//! writer, and, on the leader, prunes finished Jobs beyond the history limits, each only
//! once the launch ledger records it (so its event cannot launch it again).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use serf_operator_crds::SerfHandler;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::dispatch::{RouteEvent, Severity};
use crate::effects::{SharedLedger, Sinks};
use crate::engine::{DEFAULT_HISTORY_LIMIT, Router};
use crate::error::{Error, kube_call};
use crate::index::JobIndex;
use crate::jobs::{HandlerRef, LABEL_HANDLER, LABEL_ROUTE};
use crate::ledger;
use crate::report;
use crate::state::StatusMsg;

/// A handler's route errors, the generation they were found at, and whether its Job
/// templates were checked with the API server too.
pub type Validated = (Option<i64>, Vec<crate::engine::RouteError>, bool);

/// What every handler reconcile shares.
pub struct HandlerContext {
    /// The API client.
    pub client: Client,
    /// Whether this replica prunes.
    pub leader: watch::Receiver<bool>,
    /// The state writer's inbox.
    pub status: mpsc::Sender<StatusMsg>,
    /// The Jobs the operator owns.
    pub jobs: Vec<Arc<JobIndex>>,
    /// The launch ledgers.
    pub ledger: SharedLedger,
    /// How long one API call may take.
    pub call_timeout: Duration,
    /// How long after recording a Job in the ledger its deletion is tried again.
    pub recheck: Duration,
    /// The current agent connection (Job outcomes are reported on it).
    pub serf: watch::Receiver<Option<serf_client::Client>>,
    /// Events and metrics.
    pub sinks: Sinks,
    /// Reports this process sent, by `namespace/job`, until the Job shows the result: a
    /// reconcile that runs before the cache does must neither send again nor call the
    /// report interrupted.
    pub reported: Mutex<HashMap<String, String>>,
    /// Each handler's (by uid) route errors, and the generation they were found at.
    pub validated: Mutex<HashMap<Option<String>, Validated>>,
}

/// When a Job finished, and whether it succeeded.
pub fn finished(job: &Job) -> Option<(bool, String)> {
    let c = crate::report::finish_condition(job)?;
    let t = c
        .last_transition_time
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Some((c.type_ == "Complete", t))
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
        let Some(labels) = j.metadata.labels.as_ref() else {
            continue;
        };
        if labels.get(LABEL_HANDLER) != Some(&handler_label)
            || j.metadata.namespace.as_deref() != Some(href.namespace.as_str())
        {
            continue;
        }
        if report::outstanding(j) {
            // Kept until its outcome is reported into Serf.
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
    // Its routes are validated once per generation (a Job's change triggers this too); the
    // result goes to the state writer every time, which writes only what changed. The
    // leader also checks each Job template with a dry-run create.
    let leader = *ctx.leader.borrow();
    let version = (h.metadata.uid.clone(), h.metadata.generation);
    let cached = ctx.validated.lock().ok().and_then(|m| {
        m.get(&version.0)
            .filter(|(g, _, checked)| *g == version.1 && (*checked || !leader))
            .map(|(_, e, _)| e.clone())
    });
    let mut check_again = false;
    let errors = match cached {
        Some(errors) => errors,
        None => {
            let mut errors: Vec<_> = Router::new(std::slice::from_ref(&*h))
                .errors()
                .cloned()
                .collect();
            let mut checked = false;
            if leader {
                match super::dryrun::check(&ctx.client, &h, &errors, ctx.call_timeout).await {
                    Ok(refused) => {
                        checked = true;
                        for e in &refused {
                            ctx.sinks.notify(
                                "SerfHandler",
                                &HandlerRef::of(&h),
                                Severity::Warning,
                                "JobTemplateRefused",
                                format!("route {}: {}", e.route, e.problem),
                            );
                        }
                        errors.extend(refused);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check the Job templates; trying again in 5 s");
                        check_again = true;
                    }
                }
            }
            for e in &errors {
                tracing::warn!("{e}");
            }
            if let Ok(mut m) = ctx.validated.lock() {
                m.insert(version.0, (version.1, errors.clone(), checked));
            }
            errors
        }
    };
    let _ = ctx
        .status
        .send(StatusMsg::Handler {
            handler: h.clone(),
            errors,
        })
        .await;
    let action = lead(&h, &ctx).await?;
    Ok(if check_again {
        Action::requeue(Duration::from_secs(5))
    } else {
        action
    })
}

/// The leader's part of a reconcile: report finished Jobs' outcomes, prune beyond the
/// history limits.
///
/// # Errors
/// A ledger read or a Job deletion the API server refused or did not answer.
async fn lead(h: &Arc<SerfHandler>, ctx: &Arc<HandlerContext>) -> Result<Action, Error> {
    let h = h.clone();
    let ctx = ctx.clone();
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let href = HandlerRef::of(&h);
    let jobs: Vec<Arc<Job>> = ctx.jobs.iter().flat_map(|i| i.finished(&href)).collect();
    let no_agent = report_outcomes(&h, &jobs, &ctx).await?;
    let prune = beyond_history(&h, &jobs);
    if prune.is_empty() {
        return Ok(if no_agent {
            Action::requeue(ctx.recheck)
        } else {
            Action::await_change()
        });
    }
    ledger::load_once(&ctx.client, &ctx.ledger, &href, ctx.call_timeout).await?;
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

/// Reports the outcome of every finished Job of `h` whose route has `report` and that is
/// not reported yet: recorded on the Job (`sending`), then sent as a Serf user event, then
/// the result recorded. A Job found `sending` that this process did not send is
/// `Interrupted`: a previous leader stopped in between, and it is not sent again. True when
/// a report waits for the agent connection.
///
/// # Errors
/// A Job annotation the API server refused or did not answer.
async fn report_outcomes(
    h: &SerfHandler,
    jobs: &[Arc<Job>],
    ctx: &HandlerContext,
) -> Result<bool, Error> {
    let href = HandlerRef::of(h);
    let handler_label = crate::naming::label_value(&href.name);
    let mut no_agent = false;
    for route in &h.spec.routes {
        let Some(rep) = &route.report else { continue };
        let route_label = crate::naming::label_value(&route.name);
        for j in jobs {
            let Some(labels) = j.metadata.labels.as_ref() else {
                continue;
            };
            if j.metadata.namespace.as_deref() != Some(href.namespace.as_str())
                || labels.get(LABEL_HANDLER) != Some(&handler_label)
                || labels.get(LABEL_ROUTE) != Some(&route_label)
            {
                continue;
            }
            let name = j.metadata.name.clone().unwrap_or_default();
            let key = format!("{}/{name}", href.namespace);
            let sent_here = ctx.reported.lock().ok().and_then(|m| m.get(&key).cloned());
            let (ok, reason) = report::outcome(j).unwrap_or((false, String::new()));
            let outcome = if ok { "Succeeded" } else { "Failed" }.to_string();
            let span = tracing::info_span!("report", job = %name, route = %route.name);
            // Instrumented, not entered: a span entered across an await is left on
            // whatever thread the task resumes on.
            let waits = async {
                match report::step(j, sent_here.as_deref()) {
                    report::Step::Nothing => {
                        if sent_here.is_some()
                            && !report::outstanding(j)
                            && let Ok(mut m) = ctx.reported.lock()
                        {
                            m.remove(&key);
                        }
                    }
                    report::Step::WriteResult(result) => {
                        report::mark(&ctx.client, j, &result, ctx.call_timeout).await?;
                    }
                    report::Step::Interrupted => {
                        report::mark(&ctx.client, j, "Interrupted", ctx.call_timeout).await?;
                        if let Ok(mut m) = ctx.reported.lock() {
                            m.insert(key, "Interrupted".into());
                        }
                        let message = "the operator stopped between recording this report and sending it; it is not sent again".to_string();
                        tracing::warn!("{message}");
                        reported(
                            ctx,
                            &href,
                            route,
                            rep,
                            &name,
                            &outcome,
                            "Interrupted",
                            Some(message),
                        );
                    }
                    report::Step::Send => {
                        let Some(serf) = ctx.serf.borrow().clone() else {
                            return Ok(true);
                        };
                        let (payload, fits) = report::payload(rep, j, ok, &reason);
                        // Recorded before it is sent: a restart in between shows Interrupted.
                        report::mark(&ctx.client, j, "sending", ctx.call_timeout).await?;
                        let (result, message) = if !fits {
                            (
                                "TooLarge",
                                Some(format!(
                                    "event {} with a {}-byte payload is over Serf's {} bytes; not sent",
                                    rep.event,
                                    payload.len(),
                                    report::USER_EVENT_LIMIT
                                )),
                            )
                        } else {
                            match serf
                                .event(&rep.event, &payload, rep.coalesce.unwrap_or(false))
                                .await
                            {
                                Ok(()) => ("Sent", None),
                                Err(e) => ("SendFailed", Some(e.to_string())),
                            }
                        };
                        if let Ok(mut m) = ctx.reported.lock() {
                            m.insert(key, result.into());
                        }
                        tracing::info!(result, event = %rep.event, "Job outcome reported");
                        reported(ctx, &href, route, rep, &name, &outcome, result, message);
                        report::mark(&ctx.client, j, result, ctx.call_timeout).await?;
                    }
                }
                Ok::<bool, Error>(false)
            }
            .instrument(span)
            .await?;
            no_agent |= waits;
        }
    }
    Ok(no_agent)
}

#[allow(clippy::too_many_arguments)]
fn reported(
    ctx: &HandlerContext,
    href: &HandlerRef,
    route: &serf_operator_crds::Route,
    rep: &serf_operator_crds::Report,
    job: &str,
    outcome: &str,
    result: &str,
    message: Option<String>,
) {
    ctx.sinks
        .metrics
        .reports
        .get_or_create(&crate::metrics::ResultLabel {
            result: result.to_string(),
        })
        .inc();
    let (severity, reason, note) = if result == "Sent" {
        (
            Severity::Normal,
            "OutcomeReported",
            format!(
                "route {} reported Job {job} ({outcome}) as Serf event {}",
                route.name, rep.event
            ),
        )
    } else {
        (
            Severity::Warning,
            "ReportNotSent",
            format!(
                "route {} did not report Job {job} ({outcome}): {result}: {}",
                route.name,
                message.clone().unwrap_or_default()
            ),
        )
    };
    ctx.sinks
        .notify("SerfHandler", href, severity, reason, note);
    ctx.sinks.record(
        href,
        &route.name,
        &format!("job:{job}"),
        RouteEvent::Reported {
            job: job.to_string(),
            outcome: outcome.to_string(),
            result: result.to_string(),
            event: rep.event.clone(),
            message,
        },
    );
}

/// Backs off 5 s.
pub fn error_policy(_h: Arc<SerfHandler>, err: &Error, _ctx: Arc<HandlerContext>) -> Action {
    tracing::warn!(error = %err, "handler reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller over the handlers in `store`, reconciling each one `trigger` names
/// and the owner of each Job in `jobs`, until `shutdown`.
pub async fn run(
    store: Store<SerfHandler>,
    trigger: impl futures::Stream<Item = SerfHandler> + Send + 'static,
    jobs: impl futures::Stream<Item = Job> + Send + 'static,
    ctx: Arc<HandlerContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let leader = super::on_leadership_change(ctx.leader.clone());
    Controller::for_stream(trigger.map(Ok), store)
        .owns_stream(jobs.map(Ok))
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
