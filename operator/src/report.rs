//! Job outcomes reported into Serf (a route's `report`): what to do is decided from the Job
//! alone (its conditions and the `serf.operator.io/report` annotation); the report is
//! recorded on the Job before it is sent, so that it is sent at most once, and only by the
//! leader.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serf_operator_crds::Report;

use crate::error::{Error, kube_call};
use crate::jobs::ANNOTATION_REPORT;

/// Serf's limit on a user event's name and payload together.
pub const USER_EVENT_LIMIT: usize = 512;

/// What to do about a Job's report now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Finished, not yet reported: record, then send.
    Send,
    /// Recorded as being sent by a process that is gone: not sent again.
    Interrupted,
    /// Sent by this process, but the result did not reach the Job yet: write it again.
    WriteResult(String),
    /// Nothing (not finished, not reported by this route, or done).
    Nothing,
}

/// The Job's outcome once it has finished: succeeded, and why it failed.
pub fn outcome(job: &Job) -> Option<(bool, String)> {
    let c = finish_condition(job)?;
    Some(if c.type_ == "Complete" {
        (true, String::new())
    } else {
        (false, c.reason.clone().unwrap_or_default())
    })
}

/// A finished Job's `Complete` or `Failed` condition (status True).
pub fn finish_condition(job: &Job) -> Option<&k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
}

/// The report annotation's value.
pub fn annotation(job: &Job) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_REPORT)
        .map(String::as_str)
}

/// Whether the Job's report is still to come (its Job must not be pruned yet).
pub fn outstanding(job: &Job) -> bool {
    matches!(annotation(job), Some("pending" | "sending"))
}

/// What to do now; `sent_here` is the result this process wrote for the Job, if it sent it.
pub fn step(job: &Job, sent_here: Option<&str>) -> Step {
    match (annotation(job), sent_here) {
        (Some("pending"), None) if outcome(job).is_some() => Step::Send,
        (Some("pending" | "sending"), Some(result)) => Step::WriteResult(result.to_string()),
        (Some("sending"), None) => Step::Interrupted,
        _ => Step::Nothing,
    }
}

/// The values a report's payload can use: `JOB_*` and the launching event's `SERF_*` (read
/// back from the Job's first container, where every `$` was written doubled).
pub fn vars(job: &Job, succeeded: bool, reason: &str) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    if let Some(c) = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
    {
        for e in c.env.iter().flatten() {
            if let (true, Some(value)) = (e.name.starts_with("SERF_"), &e.value) {
                if e.name == "SERF_RPC_ADDR" {
                    continue;
                }
                v.insert(e.name.clone(), value.replace("$$", "$"));
            }
        }
    }
    v.insert(
        "JOB_NAME".into(),
        job.metadata.name.clone().unwrap_or_default(),
    );
    v.insert(
        "JOB_NAMESPACE".into(),
        job.metadata.namespace.clone().unwrap_or_default(),
    );
    v.insert(
        "JOB_OUTCOME".into(),
        if succeeded { "Succeeded" } else { "Failed" }.into(),
    );
    v.insert("JOB_REASON".into(), reason.to_string());
    v
}

/// The report's payload for `job`, and whether name and payload fit Serf's limit.
pub fn payload(report: &Report, job: &Job, succeeded: bool, reason: &str) -> (Vec<u8>, bool) {
    let p = crate::contract::expand(&report.payload, &vars(job, succeeded, reason)).into_bytes();
    let fits = report.event.len() + p.len() <= USER_EVENT_LIMIT;
    (p, fits)
}

/// Writes the report annotation (a merge patch, field manager `serf-operator`).
///
/// # Errors
/// The API server refused or did not answer in time (404: the Job is gone).
pub async fn mark(
    client: &Client,
    job: &Job,
    value: &str,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    let ns = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_REPORT: value}}});
    kube_call(
        "record a Job's report",
        timeout,
        api.patch(
            &name,
            &PatchParams::apply("serf-operator"),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn job(annotation: Option<&str>, condition: Option<(&str, &str)>) -> Job {
        let mut j: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-deploy-1", "namespace": "apps"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x", "env": [
                {"name": "SERF_EVENT", "value": "user"},
                {"name": "SERF_USER_EVENT", "value": "deploy"},
                {"name": "SERF_PAYLOAD", "value": "v1 $$(HOME) $$$$"},
                {"name": "SERF_RPC_ADDR", "value": "10.0.0.1:7373"},
                {"name": "OWN", "value": "not serf"}
            ]}]}}},
        }))
        .unwrap();
        if let Some(a) = annotation {
            j.metadata.annotations = Some([(ANNOTATION_REPORT.to_string(), a.to_string())].into());
        }
        if let Some((t, reason)) = condition {
            j.status = serde_json::from_value(serde_json::json!({"conditions": [
                {"type": t, "status": "True", "reason": reason}]}))
            .unwrap();
        }
        j
    }

    #[test]
    fn once_per_job_and_interrupted_not_resent() {
        // Not finished, or not reported by its route: nothing.
        assert_eq!(step(&job(Some("pending"), None), None), Step::Nothing);
        assert_eq!(
            step(&job(None, Some(("Complete", ""))), None),
            Step::Nothing
        );
        // Finished while the operator was down, or just now: sent.
        assert_eq!(
            step(&job(Some("pending"), Some(("Complete", ""))), None),
            Step::Send
        );
        // Recorded by a process that is gone: not sent again.
        assert_eq!(
            step(
                &job(Some("sending"), Some(("Failed", "BackoffLimitExceeded"))),
                None
            ),
            Step::Interrupted
        );
        // Sent here, the cache not caught up: the result is written, nothing resent.
        assert_eq!(
            step(&job(Some("sending"), Some(("Complete", ""))), Some("Sent")),
            Step::WriteResult("Sent".into())
        );
        assert_eq!(
            step(&job(Some("pending"), Some(("Complete", ""))), Some("Sent")),
            Step::WriteResult("Sent".into())
        );
        for done in ["Sent", "Interrupted", "TooLarge", "SendFailed"] {
            let j = job(Some(done), Some(("Complete", "")));
            assert_eq!(step(&j, None), Step::Nothing);
            assert!(!outstanding(&j));
        }
        assert!(outstanding(&job(Some("pending"), None)));
    }

    #[test]
    fn the_payload_names_the_job_its_outcome_and_its_event() {
        let j = job(Some("pending"), Some(("Failed", "BackoffLimitExceeded")));
        let (ok, reason) = outcome(&j).unwrap();
        assert!(!ok);
        let rep = Report {
            event: "deploy-done".into(),
            payload: "$(JOB_NAMESPACE)/$(JOB_NAME) $(JOB_OUTCOME) $(JOB_REASON) for $(SERF_USER_EVENT) $(SERF_PAYLOAD)$(SERF_RPC_ADDR)".into(),
            coalesce: None,
        };
        let (p, fits) = payload(&rep, &j, ok, &reason);
        // The event's values as sent (the doubled `$` undone), never re-expanded.
        assert_eq!(
            String::from_utf8(p).unwrap(),
            "apps/web-deploy-1 Failed BackoffLimitExceeded for deploy v1 $(HOME) $$$(SERF_RPC_ADDR)",
            "unknown names stay as written"
        );
        assert!(fits);
        let big = Report {
            payload: "x".repeat(502),
            ..rep
        };
        assert!(
            !payload(&big, &j, true, "").1,
            "over 512 bytes with the name"
        );
        assert_eq!(
            outcome(&job(None, Some(("Complete", "")))),
            Some((true, String::new()))
        );
    }
}
