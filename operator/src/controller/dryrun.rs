//! Checks each route's Job template with the API server when a handler changes: the Job the
//! route would create for a sample event is created with `dryRun=All`, so that a template
//! the API server would refuse shows as Ready=False with the API server's message at once,
//! not at the first event.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::PostParams;
use kube::{Api, Client};
use serf_operator_crds::SerfHandler;
use tracing::Instrument as _;

use crate::engine::RouteError;
use crate::error::{Category, Error, kube_call};
use crate::jobs::{self, HandlerRef, JobRequest};

/// The prefix of the generated name of a sample Job (the API server appends 5 characters;
/// nothing is stored).
pub const SAMPLE_PREFIX: &str = "serf-dry-run-";

/// The Job each route of `h` with a `job` template would create for a sample event of the
/// kind it takes, with the operator's labels, annotations, `SERF_*` environment, stdin
/// volume and owner. Routes in `known` (already found invalid) and routes without a
/// template are left out. Pure.
pub fn sample_jobs(h: &SerfHandler, known: &[RouteError]) -> Vec<(String, Job)> {
    let href = HandlerRef::of(h);
    let mut out = Vec::new();
    for r in &h.spec.routes {
        if known
            .iter()
            .any(|e| e.route == r.name || e.route.is_empty())
        {
            continue;
        }
        let Some(t) = &r.job else { continue };
        let Ok(mut template) = t.decode() else {
            continue;
        };
        if let Some(agent) = &r.agent {
            jobs::give_agent(&mut template, agent);
        }
        let (kind, name) = sample_event(&r.events);
        let mut env = vec![("SERF_EVENT".to_string(), kind.to_string())];
        match kind {
            "user" => env.push(("SERF_USER_EVENT".into(), name.to_string())),
            "query" => env.push(("SERF_QUERY_NAME".into(), name.to_string())),
            _ => {}
        }
        env.push(("SERF_SELF_NAME".into(), "dry-run".into()));
        env.push(("SERF_SELF_ROLE".into(), String::new()));
        let description = format!("{kind}:dry-run");
        let (mut job, _) = jobs::build(&JobRequest {
            handler: &href,
            route: &r.name,
            template: &template,
            name: String::new(),
            env: &env,
            stdin: b"dry-run\n".to_vec(),
            event_kind: kind,
            event_name: (!name.is_empty()).then_some(name),
            event_description: &description,
            replayed: false,
            report: r.report.is_some(),
        });
        job.metadata.name = None;
        job.metadata.generate_name = Some(SAMPLE_PREFIX.to_string());
        out.push((r.name.clone(), job));
    }
    out
}

/// The event type and name of a sample event a route with this `events` filter takes.
fn sample_event(events: &str) -> (&'static str, &str) {
    let first = events.split(',').next().unwrap_or_default();
    match first.split_once(':') {
        Some(("user", name)) => ("user", name),
        Some(("query", name)) => ("query", name),
        _ if first == "user" => ("user", "dry-run"),
        _ if first == "query" => ("query", "dry-run"),
        _ if first.starts_with("member-") && first != "member-*" => (member_kind(first), ""),
        _ => ("member-join", ""),
    }
}

fn member_kind(event: &str) -> &'static str {
    match event {
        "member-leave" => "member-leave",
        "member-failed" => "member-failed",
        "member-update" => "member-update",
        "member-reap" => "member-reap",
        _ => "member-join",
    }
}

/// Creates each sample Job of `h` with `dryRun=All` and returns a route error for each the
/// API server refuses (invalid, or forbidden to the operator), with its message.
///
/// # Errors
/// The API server did not answer, or answered with a transient failure (429, 5xx): the
/// check is to be tried again.
pub async fn check(
    client: &Client,
    h: &SerfHandler,
    known: &[RouteError],
    call_timeout: Duration,
) -> Result<Vec<RouteError>, Error> {
    let href = HandlerRef::of(h);
    let api: Api<Job> = Api::namespaced(client.clone(), &href.namespace);
    let pp = PostParams {
        dry_run: true,
        field_manager: Some("serf-operator".into()),
    };
    let mut refused = Vec::new();
    for (route, job) in sample_jobs(h, known) {
        let span = tracing::debug_span!("dry_run", handler = %href, route = %route);
        match kube_call(
            "check the route's Job template (dry-run create)",
            call_timeout,
            api.create(&pp, &job),
        )
        .instrument(span)
        .await
        {
            Ok(_) => {}
            Err(e) if e.category() == Category::Transient => return Err(e),
            Err(e) => {
                let problem = match e.http_code() {
                    Some(403) => format!(
                        "the operator may not create Jobs in namespace {}: {}",
                        href.namespace,
                        api_message(&e)
                    ),
                    _ => format!("the API server refuses its Job: {}", api_message(&e)),
                };
                refused.push(RouteError {
                    handler: href.clone(),
                    route,
                    problem,
                });
            }
        }
    }
    Ok(refused)
}

fn api_message(e: &Error) -> String {
    match e {
        Error::Kube {
            source: kube::Error::Api(s),
            ..
        } => s.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(routes: serde_json::Value) -> SerfHandler {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
            "metadata": {"name": "web", "namespace": "apps", "uid": "u1", "generation": 2},
            "spec": {"routes": routes}
        }))
        .unwrap()
    }

    #[test]
    fn a_sample_job_is_the_routes_job_with_a_generated_name() {
        let h = handler(serde_json::json!([
            {"name": "deploy", "events": "user:deploy",
             "job": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "busybox"}]}}}}},
            {"name": "where", "events": "query:where", "respond": {"payload": "x"}},
            {"name": "dead", "events": "member-failed",
             "job": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "busybox"}]}}}}},
        ]));
        let known = [RouteError {
            handler: HandlerRef::of(&h),
            route: "dead".into(),
            problem: "x".into(),
        }];
        let jobs = sample_jobs(&h, &known);
        assert_eq!(jobs.len(), 1, "only the valid route with a template");
        let (route, job) = &jobs[0];
        assert_eq!(route, "deploy");
        assert_eq!(job.metadata.name, None);
        assert_eq!(job.metadata.generate_name.as_deref(), Some(SAMPLE_PREFIX));
        assert_eq!(job.metadata.namespace.as_deref(), Some("apps"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("SerfHandler", "u1")
        );
        let c = &job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(env.contains(&"SERF_USER_EVENT"), "{env:?}");
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/serf"),
            "the stdin volume is part of what is checked"
        );
    }

    #[test]
    fn sample_events_follow_the_filter() {
        assert_eq!(sample_event("user:deploy"), ("user", "deploy"));
        assert_eq!(sample_event("query:where,user"), ("query", "where"));
        assert_eq!(sample_event("user"), ("user", "dry-run"));
        assert_eq!(
            sample_event("member-failed,member-leave"),
            ("member-failed", "")
        );
        assert_eq!(sample_event("member-*"), ("member-join", ""));
        assert_eq!(sample_event("*"), ("member-join", ""));
    }
}
