//! **How a trigger fires.** SerfEventTrigger: decides what is due (a generation, a schedule
//! tick, or the outcome of a send interrupted by a restart) and fires it once: the firing is
//! recorded in status before the send and cleared with the outcome after it. The decision is
//! pure ([`decide`]); [`fire`] talks to the API server and the agent; the controller that
//! calls them is [`crate::controller::trigger`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use serf_client::QueryParams;
use serf_operator_crds::{
    Firing, QueryResponse, QueryResult, SerfEventTrigger, SerfEventTriggerSpec,
};

use crate::engine::parse_duration;

/// At most this many acks and responses are listed in status (the counts cover all).
pub const MAX_LISTED: usize = 100;

/// What a trigger needs now.
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// Nothing (fired already, suspended, or no tick yet).
    Nothing,
    /// Fire this.
    Fire(Firing),
    /// A send was recorded but its outcome never was: report it, do not send again.
    Interrupted(Firing),
    /// The spec cannot be fired (bad schedule or time zone).
    Invalid(String),
}

/// Decides what `t` needs at `now`. Pure.
pub fn decide(t: &SerfEventTrigger, now: jiff::Timestamp) -> Due {
    let status = t.status.clone().unwrap_or_default();
    if let Some(f) = status.firing {
        return Due::Interrupted(f);
    }
    if t.spec.suspend {
        return Due::Nothing;
    }
    let generation = t.metadata.generation.unwrap_or(0);
    let started = now.to_string();
    let Some(schedule) = t.spec.schedule.as_deref() else {
        return if status.last_fired_generation == Some(generation) {
            Due::Nothing
        } else {
            Due::Fire(Firing {
                generation,
                tick: None,
                started,
            })
        };
    };
    let cron = match croner::Cron::from_str(schedule) {
        Ok(c) => c,
        Err(e) => return Due::Invalid(format!("schedule {schedule:?}: {e}")),
    };
    let tz = match t.spec.time_zone.as_deref() {
        None => jiff::tz::TimeZone::UTC,
        Some(name) => match jiff::tz::TimeZone::get(name) {
            Ok(tz) => tz,
            Err(e) => return Due::Invalid(format!("timeZone {name:?}: {e}")),
        },
    };
    let Ok(tick) = cron.find_previous_occurrence(&now.to_zoned(tz), true) else {
        return Due::Nothing;
    };
    let tick = tick.timestamp();
    let baseline = status
        .last_schedule_time
        .as_deref()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .or_else(|| t.metadata.creation_timestamp.as_ref().map(|c| c.0));
    if baseline.is_some_and(|b| tick <= b) {
        return Due::Nothing;
    }
    if let Some(deadline) = t.spec.starting_deadline_seconds
        && now.as_second() - tick.as_second() > deadline
    {
        return Due::Nothing;
    }
    Due::Fire(Firing {
        generation,
        tick: Some(tick.to_string()),
        started,
    })
}

/// The result of one send.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Sent; for a query, what it got.
    Sent(Option<QueryResult>),
    /// Failed in a way that can succeed later (agent unreachable, timeout).
    Retry(String),
    /// Failed for good (Serf refused it: size limit, reserved name, ...).
    Failed(String),
    /// The connection broke after the request was written: it may or may not have been
    /// sent, and is not sent again.
    Unknown(String),
}

/// Sends the trigger's event or query on `serf`.
pub async fn send(spec: &SerfEventTriggerSpec, serf: Option<&serf_client::Client>) -> SendOutcome {
    let Some(serf) = serf.filter(|c| !c.is_closed()) else {
        return SendOutcome::Retry("not connected to the Serf agent".into());
    };
    let classify = |e: serf_client::Error| {
        if serf.is_closed() && !e.is_connection_error() {
            SendOutcome::Retry(e.to_string())
        } else if e.is_connection_error() || matches!(e, serf_client::Error::Timeout { .. }) {
            SendOutcome::Unknown(e.to_string())
        } else {
            SendOutcome::Failed(
                e.agent_message()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string()),
            )
        }
    };
    if let Some(ev) = &spec.event {
        let payload = ev.payload.as_deref().unwrap_or("").as_bytes();
        return match serf.event(&ev.name, payload, ev.coalesce).await {
            Ok(()) => SendOutcome::Sent(None),
            Err(e) => classify(e),
        };
    }
    let Some(q) = &spec.query else {
        return SendOutcome::Failed("the trigger has neither event nor query".into());
    };
    let timeout = match q.timeout.as_deref().map(parse_duration).transpose() {
        Ok(t) => t,
        Err(e) => return SendOutcome::Failed(format!("timeout: {e}")),
    };
    let params = QueryParams {
        name: q.name.clone(),
        payload: q.payload.clone().unwrap_or_default().into_bytes(),
        filter_nodes: q.filter_nodes.clone(),
        filter_tags: q.filter_tags.clone(),
        request_ack: q.request_ack.unwrap_or(true),
        relay_factor: q.relay_factor.unwrap_or(0),
        timeout,
    };
    let stream = match serf.query(&params).await {
        Ok(s) => s,
        Err(e) => return classify(e),
    };
    match stream.collect().await {
        Ok(out) => SendOutcome::Sent(Some(QueryResult {
            ack_count: i32::try_from(out.acks.len()).unwrap_or(i32::MAX),
            response_count: i32::try_from(out.responses.len()).unwrap_or(i32::MAX),
            acks: out.acks.into_iter().take(MAX_LISTED).collect(),
            responses: out
                .responses
                .into_iter()
                .take(MAX_LISTED)
                .map(|(from, p)| QueryResponse {
                    from,
                    payload: String::from_utf8_lossy(&p).into_owned(),
                })
                .collect(),
            complete: out.complete,
        })),
        // The query went out; only the collection of its answers broke.
        Err(e) => {
            tracing::warn!(error = %e, "query sent but its answers could not all be collected");
            SendOutcome::Sent(Some(QueryResult::default()))
        }
    }
}

pub(crate) fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: &str,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        observed_generation: Some(generation),
        last_transition_time: Time(now.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)),
    }
}

/// Keeps a transition time when the condition's status does not change.
pub(crate) fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out: BTreeMap<String, Condition> =
        old.iter().map(|c| (c.type_.clone(), c.clone())).collect();
    for mut c in new {
        if let Some(prev) = out.get(&c.type_)
            && prev.status == c.status
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
        out.insert(c.type_.clone(), c);
    }
    out.into_values().collect()
}

/// The status patch recording that `firing` is about to be sent.
pub fn firing_patch(firing: &Firing) -> serde_json::Value {
    json!({"status": {"firing": firing}})
}

/// The status patch recording an outcome; `None` for a retry (nothing done yet).
pub fn outcome_patch(
    t: &SerfEventTrigger,
    firing: &Firing,
    outcome: &SendOutcome,
    now: &str,
) -> serde_json::Value {
    let status = t.status.clone().unwrap_or_default();
    let g = firing.generation;
    let done = |mut v: serde_json::Value| {
        v["firing"] = serde_json::Value::Null;
        v["observedGeneration"] = g.into();
        v["lastFiredGeneration"] = g.into();
        if let Some(tick) = &firing.tick {
            v["lastScheduleTime"] = tick.clone().into();
        }
        v
    };
    let what = match (&t.spec.event, &t.spec.query) {
        (Some(e), _) => format!("user event {:?}", e.name),
        (_, Some(q)) => format!("query {:?}", q.name),
        _ => "nothing".into(),
    };
    let body = match outcome {
        SendOutcome::Sent(query) => {
            let conds = merge_conditions(
                &status.conditions,
                vec![
                    condition("Sent", "True", "Fired", &format!("sent {what}"), g, now),
                    condition("Failed", "False", "Fired", "", g, now),
                ],
            );
            let mut v = done(json!({
                "conditions": conds,
                "lastFired": now,
                "firedCount": status.fired_count + 1,
            }));
            if let Some(q) = query {
                v["query"] = serde_json::to_value(q).unwrap_or_default();
            }
            v
        }
        SendOutcome::Failed(msg) => done(json!({
            "conditions": merge_conditions(&status.conditions, vec![
                condition("Sent", "False", "SendFailed", msg, g, now),
                condition("Failed", "True", "SendFailed", msg, g, now),
            ]),
        })),
        SendOutcome::Unknown(msg) => done(json!({
            "conditions": merge_conditions(&status.conditions, vec![
                condition("Sent", "Unknown", "Interrupted", &format!("the connection to the agent broke during the send; it may or may not have been sent, and is not sent again: {msg}"), g, now),
            ]),
        })),
        SendOutcome::Retry(msg) => json!({
            "firing": serde_json::Value::Null,
            "conditions": merge_conditions(&status.conditions, vec![
                condition("Sent", "False", "Retrying", &format!("will retry: {msg}"), g, now),
            ]),
        }),
    };
    json!({ "status": body })
}

/// The status patch for a spec that cannot be fired (a bad schedule or time zone):
/// `Ready=False` with the reason, so that the object itself says why nothing happens.
pub fn invalid_patch(t: &SerfEventTrigger, msg: &str, now: &str) -> serde_json::Value {
    let status = t.status.clone().unwrap_or_default();
    let g = t.metadata.generation.unwrap_or(0);
    json!({"status": {
        "observedGeneration": g,
        "conditions": merge_conditions(&status.conditions, vec![
            condition("Ready", "False", "InvalidSpec", msg, g, now),
        ]),
    }})
}

/// Whether `t` already shows `Ready=True` for its generation (so a valid spec does not
/// write it again).
pub fn shows_ready(t: &SerfEventTrigger) -> bool {
    let g = t.metadata.generation;
    t.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True" && c.observed_generation == g)
    })
}

/// The status patch for a valid spec: `Ready=True`.
pub fn ready_patch(t: &SerfEventTrigger, now: &str) -> serde_json::Value {
    let status = t.status.clone().unwrap_or_default();
    let g = t.metadata.generation.unwrap_or(0);
    json!({"status": {
        "conditions": merge_conditions(&status.conditions, vec![
            condition("Ready", "True", "Valid", "", g, now),
        ]),
    }})
}

/// How long until the trigger's next schedule tick after `now`; `None` without a schedule
/// (or with one that cannot be read).
pub fn until_next_tick(t: &SerfEventTrigger, now: jiff::Timestamp) -> Option<Duration> {
    let cron = croner::Cron::from_str(t.spec.schedule.as_deref()?).ok()?;
    let tz = match t.spec.time_zone.as_deref() {
        None => jiff::tz::TimeZone::UTC,
        Some(name) => jiff::tz::TimeZone::get(name).ok()?,
    };
    let next = cron
        .find_next_occurrence(&now.to_zoned(tz), false)
        .ok()?
        .timestamp();
    let secs = (next.as_millisecond() - now.as_millisecond()).max(0);
    Some(Duration::from_millis(u64::try_from(secs).unwrap_or(0)))
}

/// The status patch for a send interrupted by a restart.
pub fn interrupted_patch(t: &SerfEventTrigger, firing: &Firing, now: &str) -> serde_json::Value {
    let status = t.status.clone().unwrap_or_default();
    let msg = format!(
        "the operator stopped after recording the send of generation {} (started {}) and before recording its outcome; it may or may not have been sent, and is not sent again",
        firing.generation, firing.started
    );
    let mut v = json!({
        "firing": serde_json::Value::Null,
        "observedGeneration": firing.generation,
        "lastFiredGeneration": firing.generation,
        "conditions": merge_conditions(&status.conditions, vec![
            condition("Sent", "Unknown", "Interrupted", &msg, firing.generation, now),
        ]),
    });
    if let Some(tick) = &firing.tick {
        v["lastScheduleTime"] = tick.clone().into();
    }
    json!({ "status": v })
}

/// Applies a status patch to a trigger.
///
/// # Errors
/// The API error.
pub async fn patch_status(
    client: &Client,
    t: &SerfEventTrigger,
    patch: serde_json::Value,
) -> Result<(), kube::Error> {
    let ns = t.metadata.namespace.clone().unwrap_or_default();
    let name = t.metadata.name.clone().unwrap_or_default();
    let api: Api<SerfEventTrigger> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams {
        field_manager: Some(crate::ledger::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let patch = Patch::Merge(patch);
    let call = api.patch_status(&name, &pp, &patch);
    match tokio::time::timeout(STATUS_TIMEOUT, call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(kube::Error::Service(
            format!("the API server did not answer within {STATUS_TIMEOUT:?}").into(),
        )),
    }
}

/// How long one trigger status write may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff before retry `attempt` (from 1): 1 s doubling to 60 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

/// Fires once: records `firing` in status, sends, records the outcome (retrying that write a
/// few times). Returns the outcome, or `Err` when the firing could not be recorded (then
/// nothing was sent).
///
/// # Errors
/// The API error of the first status write.
pub async fn fire(
    client: &Client,
    serf: Option<&serf_client::Client>,
    t: &SerfEventTrigger,
    firing: &Firing,
) -> Result<SendOutcome, kube::Error> {
    patch_status(client, t, firing_patch(firing)).await?;
    let outcome = send(&t.spec, serf).await;
    let patch = outcome_patch(
        t,
        firing,
        &outcome,
        &crate::local::rfc3339(std::time::SystemTime::now()),
    );
    use backon::Retryable;
    let record = || patch_status(client, t, patch.clone());
    let recorded = record
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_times(4),
        )
        .sleep(tokio::time::sleep)
        .notify(|e: &kube::Error, _| {
            tracing::warn!(error = %e, "cannot record the trigger's outcome; retrying");
        })
        .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, "the outcome could not be recorded; the trigger will show Sent=Unknown");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(yaml: &str) -> SerfEventTrigger {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    const ONCE: &str = "apiVersion: serf.operator.io/v1alpha1\nkind: SerfEventTrigger\nmetadata: {name: t, namespace: n, generation: 2, creationTimestamp: '2026-11-23T10:00:00Z'}\nspec: {event: {name: deploy, payload: v1}}\n";

    #[test]
    fn fires_once_per_generation() {
        let mut t = trigger(ONCE);
        let now = at("2026-11-23T10:00:05Z");
        assert!(matches!(
            decide(&t, now),
            Due::Fire(Firing {
                generation: 2,
                tick: None,
                ..
            })
        ));
        t.status = Some(serf_operator_crds::SerfEventTriggerStatus {
            last_fired_generation: Some(2),
            ..Default::default()
        });
        assert_eq!(decide(&t, now), Due::Nothing);
        t.metadata.generation = Some(3);
        assert!(matches!(
            decide(&t, now),
            Due::Fire(Firing { generation: 3, .. })
        ));
        t.spec.suspend = true;
        assert_eq!(decide(&t, now), Due::Nothing);
    }

    #[test]
    fn a_recorded_firing_is_interrupted_not_resent() {
        let mut t = trigger(ONCE);
        let f = Firing {
            generation: 2,
            tick: None,
            started: "2026-11-23T10:00:01Z".into(),
        };
        t.status = Some(serf_operator_crds::SerfEventTriggerStatus {
            firing: Some(f.clone()),
            ..Default::default()
        });
        assert_eq!(
            decide(&t, at("2026-11-23T10:01:00Z")),
            Due::Interrupted(f.clone())
        );
        let patch = interrupted_patch(&t, &f, "2026-11-23T10:01:00Z");
        assert_eq!(patch["status"]["firing"], serde_json::Value::Null);
        assert_eq!(patch["status"]["lastFiredGeneration"], 2);
        let c = &patch["status"]["conditions"][0];
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (Some("Sent"), Some("Unknown"), Some("Interrupted"))
        );
    }

    #[test]
    fn schedule_ticks_and_missed_ticks() {
        let yaml = ONCE.replace("spec: {event", "spec: {schedule: '*/5 * * * *', event");
        let mut t = trigger(&yaml);
        // Created 10:00:00; at 10:04 no tick after creation yet.
        assert_eq!(decide(&t, at("2026-11-23T10:04:00Z")), Due::Nothing);
        match decide(&t, at("2026-11-23T10:05:30Z")) {
            Due::Fire(f) => assert_eq!(f.tick.as_deref(), Some("2026-11-23T10:05:00Z")),
            other => panic!("{other:?}"),
        }
        // Down from 10:06 to 10:31: the ticks 10:10..10:30 collapse into one, the latest.
        t.status = Some(serf_operator_crds::SerfEventTriggerStatus {
            last_schedule_time: Some("2026-11-23T10:05:00Z".into()),
            ..Default::default()
        });
        match decide(&t, at("2026-11-23T10:31:00Z")) {
            Due::Fire(f) => assert_eq!(f.tick.as_deref(), Some("2026-11-23T10:30:00Z")),
            other => panic!("{other:?}"),
        }
        // With a starting deadline of 30 s, a tick 60 s old is skipped.
        t.spec.starting_deadline_seconds = Some(30);
        assert_eq!(decide(&t, at("2026-11-23T10:31:00Z")), Due::Nothing);
        // Time zones.
        t.spec.starting_deadline_seconds = None;
        t.spec.schedule = Some("0 9 * * *".into());
        t.spec.time_zone = Some("Europe/Berlin".into());
        match decide(&t, at("2026-11-24T08:30:00Z")) {
            Due::Fire(f) => assert_eq!(f.tick.as_deref(), Some("2026-11-24T08:00:00Z")),
            other => panic!("{other:?}"),
        }
        t.spec.time_zone = Some("Mars/Olympus".into());
        assert!(
            matches!(decide(&t, at("2026-11-24T08:30:00Z")), Due::Invalid(m) if m.contains("Mars/Olympus"))
        );
        t.spec.time_zone = None;
        t.spec.schedule = Some("every tuesday".into());
        assert!(
            matches!(decide(&t, at("2026-11-24T08:30:00Z")), Due::Invalid(m) if m.contains("every tuesday"))
        );
    }
}
