//! Query answers from a Job's output, as Serf answers a query with its handler's output:
//! waits for the first of the Job's Pods to finish, reads its first container's log (stdout
//! and stderr together), and answers on the Serf connection that received the query.

use std::time::Duration;

use futures::{AsyncReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::dispatch::{RouteEvent, Severity};
use crate::effects::Sinks;
use crate::engine::{Launch, MAX_ANSWER, SkipReason};

/// How long a Job launched for a query may take to finish before its answer is given up.
/// A query's own deadline is usually far shorter (Serf's default is a few seconds); past it
/// the agent refuses the answer anyway.
pub const ANSWER_WAIT: Duration = Duration::from_secs(300);

/// A query waiting for its Job's output.
#[derive(Clone)]
pub struct PendingAnswer {
    /// The query's id on `serf`.
    pub query_id: u64,
    /// The connection that received the query (only it can answer).
    pub serf: serf_client::Client,
}

/// Why a query got no answer from its Job.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    /// The Job's Pod did not finish in time.
    #[error("the Job's Pod did not finish within {0:?}")]
    NotFinished(Duration),
    /// Watching the Pods failed.
    #[error("cannot watch the Job's Pods: {0}")]
    Watch(String),
    /// Reading the log failed.
    #[error("cannot read the output of Pod {pod}: {error}")]
    Log {
        /// The Pod.
        pod: String,
        /// What went wrong.
        error: String,
    },
    /// The output was empty: Serf sends no answer then either.
    #[error("Pod {0} wrote no output: no answer (as under Serf)")]
    Empty(String),
    /// The agent refused the answer.
    #[error("{0}")]
    Refused(String),
}

/// The first of `job`'s Pods (in `namespace`) to finish, Succeeded or Failed: its name
/// and phase.
pub async fn finished_pod(
    pods: &Api<Pod>,
    job: &str,
    wait: Duration,
) -> Result<(String, String), NoAnswer> {
    let cfg = watcher::Config::default().labels(&format!("job-name={job}"));
    let stream = watcher(pods.clone(), cfg).applied_objects();
    let finished = stream
        .try_filter_map(|pod: Pod| async move {
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            Ok((phase == "Succeeded" || phase == "Failed")
                .then(|| (pod.metadata.name.clone().unwrap_or_default(), phase)))
        })
        .boxed();
    let mut finished = finished;
    match tokio::time::timeout(wait, finished.next()).await {
        Err(_) => Err(NoAnswer::NotFinished(wait)),
        Ok(None) => Err(NoAnswer::Watch("the watch ended".into())),
        Ok(Some(Err(e))) => Err(NoAnswer::Watch(e.to_string())),
        Ok(Some(Ok(found))) => Ok(found),
    }
}

/// The first `MAX_ANSWER` bytes of `container`'s log in `pod`.
pub async fn output(
    pods: &Api<Pod>,
    pod: &str,
    container: Option<String>,
    timeout: Duration,
) -> Result<Vec<u8>, NoAnswer> {
    let lp = LogParams {
        container,
        limit_bytes: Some(MAX_ANSWER as i64),
        ..Default::default()
    };
    let read = async {
        let mut stream = pods.log_stream(pod, &lp).await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        stream
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(bytes)
    };
    let mut bytes = match tokio::time::timeout(timeout, read).await {
        Ok(r) => r.map_err(|error| NoAnswer::Log {
            pod: pod.to_string(),
            error,
        })?,
        Err(_) => {
            return Err(NoAnswer::Log {
                pod: pod.to_string(),
                error: format!("no answer from the API server within {timeout:?}"),
            });
        }
    };
    bytes.truncate(MAX_ANSWER);
    Ok(bytes)
}

/// Waits for the Job of `launch` to finish and answers its query with the output. The
/// outcome goes to the route's status, the metrics and an Event.
pub async fn answer_with_output(
    client: Client,
    sinks: Sinks,
    launch: Box<Launch>,
    event: String,
    pending: PendingAnswer,
    call_timeout: Duration,
) {
    let job = launch.job.metadata.name.clone().unwrap_or_default();
    let container = launch
        .job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .map(|c| c.name.clone());
    let pods: Api<Pod> = Api::namespaced(client, &launch.handler.namespace);
    let result = async {
        let (pod, phase) = finished_pod(&pods, &job, ANSWER_WAIT).await?;
        tracing::debug!(%pod, %phase, "the query's Job finished");
        let bytes = output(&pods, &pod, container, call_timeout).await?;
        if bytes.is_empty() {
            return Err(NoAnswer::Empty(pod));
        }
        pending
            .serf
            .respond(pending.query_id, &bytes)
            .await
            .map_err(|e| {
                let e = e.to_string();
                NoAnswer::Refused(if e.contains("No pending queries") {
                    format!(
                        "the query's deadline passed before Pod {pod} finished (send it with `serf query -timeout`): {e}"
                    )
                } else {
                    format!("the agent refused the answer: {e}")
                })
            })?;
        Ok(pod)
    }
    .await;
    match result {
        Ok(pod) => {
            tracing::info!(%pod, "query answered with the Job's output");
            sinks.metrics.queries_answered.inc();
            sinks.record(&launch.handler, &launch.route, &event, RouteEvent::Answered);
            sinks.notify(
                "SerfHandler",
                &launch.handler,
                Severity::Normal,
                "QueryAnswered",
                format!(
                    "route {} answered {event} with the output of Job {job}",
                    launch.route
                ),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "query not answered from its Job");
            sinks.record(
                &launch.handler,
                &launch.route,
                &event,
                RouteEvent::Skipped {
                    reason: SkipReason::AnswerFailed.as_str().into(),
                    message: e.to_string(),
                },
            );
            sinks.notify(
                "SerfHandler",
                &launch.handler,
                Severity::Warning,
                "RouteSkipped",
                format!(
                    "route {} could not answer {event} from Job {job}: {e}",
                    launch.route
                ),
            );
        }
    }
}
