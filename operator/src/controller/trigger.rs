//! The SerfEventTrigger controller: reconcile = decide what is due
//! ([`crate::trigger::decide`]) → fire it once ([`crate::trigger::fire`]) → requeue at the
//! next schedule tick; `error_policy` backs off per trigger (1 s doubling to 60 s) while the
//! agent is unreachable or the firing cannot be recorded. A spec it cannot fire says so in
//! its own status (`Ready=False`, reason `InvalidSpec`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serf_operator_crds::SerfEventTrigger;
use tokio::sync::watch;

use crate::dispatch::Severity;
use crate::effects::Sinks;
use crate::error::Error;
use crate::jobs::HandlerRef;
use crate::metrics::ResultLabel;
use crate::trigger::{self, Due, SendOutcome};

type Key = (String, String);

/// What every trigger reconcile shares.
pub struct TriggerContext {
    /// The API client.
    pub client: Client,
    /// The current agent connection.
    pub serf: watch::Receiver<Option<serf_client::Client>>,
    /// Whether this replica fires triggers.
    pub leader: watch::Receiver<bool>,
    /// Events and metrics.
    pub sinks: Sinks,
    /// Failed attempts per trigger, for the backoff.
    attempts: Mutex<HashMap<Key, u32>>,
    /// Firings this process completed (generation, tick), per trigger: a reconcile that
    /// runs before the cache shows the outcome must neither fire again nor call it
    /// interrupted.
    completed: Mutex<HashMap<Key, (i64, Option<String>)>>,
    /// The running watch of each watching trigger, with the (uid, generation) it runs for.
    watches: Mutex<HashMap<Key, (String, tokio::task::AbortHandle)>>,
}

impl TriggerContext {
    /// A context.
    pub fn new(
        client: Client,
        serf: watch::Receiver<Option<serf_client::Client>>,
        leader: watch::Receiver<bool>,
        sinks: Sinks,
    ) -> Arc<Self> {
        Arc::new(TriggerContext {
            client,
            serf,
            leader,
            sinks,
            attempts: Mutex::default(),
            completed: Mutex::default(),
            watches: Mutex::default(),
        })
    }

    /// Keeps one watch task running for `t`, started again when its spec changed or it
    /// ended.
    fn ensure_watch(&self, t: &Arc<SerfEventTrigger>) {
        let k = key(t);
        let spec = format!(
            "{}:{}",
            t.metadata.uid.clone().unwrap_or_default(),
            t.metadata.generation.unwrap_or(0)
        );
        let Ok(mut watches) = self.watches.lock() else {
            return;
        };
        if let Some((running, handle)) = watches.get(&k)
            && *running == spec
            && !handle.is_finished()
        {
            return;
        }
        if let Some((_, old)) = watches.remove(&k) {
            old.abort();
        }
        let runner = crate::watch::Runner::new(
            self.client.clone(),
            self.serf.clone(),
            self.sinks.clone(),
            t.clone(),
            Duration::from_secs(10),
        );
        // A task of its own, not part of this reconcile: a root span.
        let span =
            tracing::info_span!(parent: None, "watch", trigger = %format!("{}/{}", k.0, k.1));
        let handle = tokio::spawn(tracing::Instrument::instrument(runner.run(), span));
        tracing::info!(trigger = %format!("{}/{}", k.0, k.1), "watch started");
        watches.insert(k, (spec, handle.abort_handle()));
    }

    /// Stops `t`'s watch task, if any (leadership lost, suspended, watch removed).
    fn stop_watch(&self, k: &Key) {
        if let Ok(mut watches) = self.watches.lock()
            && let Some((_, handle)) = watches.remove(k)
        {
            handle.abort();
            tracing::info!(trigger = %format!("{}/{}", k.0, k.1), "watch stopped");
        }
    }

    fn result(&self, r: &str) {
        self.sinks
            .metrics
            .triggers_fired
            .get_or_create(&ResultLabel { result: r.into() })
            .inc();
    }

    fn publish(
        &self,
        t: &SerfEventTrigger,
        severity: Severity,
        reason: &'static str,
        note: String,
    ) {
        let r = HandlerRef {
            namespace: t.namespace().unwrap_or_default(),
            name: t.name_any(),
            uid: t.metadata.uid.clone(),
        };
        self.sinks
            .notify("SerfEventTrigger", &r, severity, reason, note);
    }
}

fn key(t: &SerfEventTrigger) -> Key {
    (t.namespace().unwrap_or_default(), t.name_any())
}

/// After a firing (or nothing to do): the next tick of a schedule, or the next change.
fn next(t: &SerfEventTrigger) -> Action {
    match trigger::until_next_tick(t, jiff::Timestamp::now()) {
        Some(d) => Action::requeue(d + Duration::from_millis(50)),
        None => Action::await_change(),
    }
}

/// One reconcile of one trigger.
///
/// # Errors
/// The agent unreachable (retried with backoff), or a status write refused.
pub async fn reconcile(
    t: Arc<SerfEventTrigger>,
    ctx: Arc<TriggerContext>,
) -> Result<Action, Error> {
    let k = key(&t);
    if !*ctx.leader.borrow() {
        // A standby looks again when the leadership changes (reconcile_all_on).
        ctx.stop_watch(&k);
        return Ok(Action::await_change());
    }
    if t.spec.watch.is_some() && !t.spec.suspend {
        // Fired by its watch task, once per change of the watched objects.
        ctx.ensure_watch(&t);
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    ctx.stop_watch(&k);
    if t.spec.watch.is_some() {
        return Ok(Action::await_change());
    }
    let now = jiff::Timestamp::now();
    let now_s = now.to_string();
    let due = trigger::decide(&t, now);
    let done_here = ctx.completed.lock().ok().and_then(|m| m.get(&k).cloned());
    let already = |f: &serf_operator_crds::Firing| {
        done_here.as_ref() == Some(&(f.generation, f.tick.clone()))
    };
    match due {
        Due::Nothing => {
            if !trigger::shows_ready(&t) {
                trigger::patch_status(&ctx.client, &t, trigger::ready_patch(&t, &now_s))
                    .await
                    .map_err(|e| Error::kube("mark the trigger Ready", e))?;
            }
            Ok(next(&t))
        }
        Due::Invalid(msg) => {
            tracing::warn!("cannot fire: {msg}");
            let shown = t.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.message == msg)
            });
            if !shown {
                trigger::patch_status(&ctx.client, &t, trigger::invalid_patch(&t, &msg, &now_s))
                    .await
                    .map_err(|e| Error::kube("record the invalid spec", e))?;
                ctx.publish(&t, Severity::Warning, "TriggerFailed", msg);
            }
            Ok(Action::await_change())
        }
        Due::Interrupted(f) if already(&f) => {
            // Our own firing, completed; the cache has not caught up with its outcome.
            Ok(Action::requeue(Duration::from_millis(500)))
        }
        Due::Interrupted(f) => {
            trigger::patch_status(&ctx.client, &t, trigger::interrupted_patch(&t, &f, &now_s))
                .await
                .map_err(|e| Error::kube("record an interrupted send", e))?;
            ctx.result("interrupted");
            ctx.publish(
                &t,
                Severity::Warning,
                "TriggerFailed",
                format!(
                    "generation {} was interrupted between send and record; not sent again (Sent=Unknown)",
                    f.generation
                ),
            );
            Ok(next(&t))
        }
        Due::Fire(f) if already(&f) => Ok(Action::requeue(Duration::from_millis(500))),
        Due::Fire(f) => {
            let serf = ctx.serf.borrow().clone();
            // Recorded before the send: once stored, a restart never sends it again.
            let outcome = trigger::fire(&ctx.client, serf.as_ref(), &t, &f)
                .await
                .map_err(|e| Error::kube("record the firing before the send", e))?;
            let attempt = ctx
                .attempts
                .lock()
                .ok()
                .and_then(|m| m.get(&k).copied())
                .unwrap_or(0);
            if !matches!(outcome, SendOutcome::Retry(_)) {
                if let Ok(mut m) = ctx.completed.lock() {
                    m.insert(k.clone(), (f.generation, f.tick.clone()));
                }
                if let Ok(mut m) = ctx.attempts.lock() {
                    m.remove(&k);
                }
            }
            match outcome {
                SendOutcome::Sent(_) => {
                    tracing::info!(generation = f.generation, tick = ?f.tick, "fired");
                    ctx.result("sent");
                    ctx.publish(
                        &t,
                        Severity::Normal,
                        "TriggerFired",
                        format!(
                            "fired generation {}{}",
                            f.generation,
                            f.tick
                                .as_ref()
                                .map(|t| format!(" for the tick at {t}"))
                                .unwrap_or_default()
                        ),
                    );
                    Ok(next(&t))
                }
                SendOutcome::Failed(msg) => {
                    tracing::warn!("Serf refused the send: {msg}");
                    ctx.result("failed");
                    ctx.publish(&t, Severity::Warning, "TriggerFailed", msg);
                    Ok(next(&t))
                }
                SendOutcome::Unknown(msg) => {
                    ctx.result("interrupted");
                    ctx.publish(
                        &t,
                        Severity::Warning,
                        "TriggerFailed",
                        format!(
                            "the send of generation {} may or may not have happened; not sent again: {msg}",
                            f.generation
                        ),
                    );
                    Ok(next(&t))
                }
                SendOutcome::Retry(msg) => {
                    ctx.result("retry");
                    tracing::warn!(attempt = attempt + 1, "send failed, will retry: {msg}");
                    Err(Error::Invalid(format!("send failed, will retry: {msg}")))
                }
            }
        }
    }
}

/// Backs off per trigger: 1 s doubling to 60 s.
pub fn error_policy(t: Arc<SerfEventTrigger>, err: &Error, ctx: Arc<TriggerContext>) -> Action {
    let k = key(&t);
    let attempt = match ctx.attempts.lock() {
        Ok(mut m) => {
            let a = m.entry(k).or_insert(0);
            *a += 1;
            *a
        }
        Err(_) => 1,
    };
    let delay = trigger::retry_delay(attempt);
    tracing::warn!(error = %err, attempt, ?delay, "trigger reconcile failed; backing off");
    Action::requeue(delay)
}

/// Runs the controller over `api` until `shutdown` resolves.
pub async fn run(
    api: kube::Api<SerfEventTrigger>,
    ctx: Arc<TriggerContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let leader = super::on_leadership_change(ctx.leader.clone());
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(leader)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "trigger controller");
            }
            std::future::ready(())
        })
        .await;
}
