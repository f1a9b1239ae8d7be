//! Creates the Jobs the engine decides on, exactly once per event (one create each, or the
//! stdin Secret first when the Job cannot carry its stdin), and holds **the retry policy for
//! Job creation** ([`RetryPolicy`]): 409 AlreadyExists is "already launched"; a
//! transient failure (the API server unreachable, hanging, 429 or 5xx) is retried with capped
//! exponential backoff until the launch's deadline, so an API server that restarts loses
//! nothing; any other 4xx is final and its message is reported. Talks to the API server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, Client};

use crate::engine::Launch;
use crate::error::{Category, Error, kube_call};
use crate::jobs;

/// How patiently a Job create is retried while it can succeed later.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay before the second attempt; doubles each time (with jitter).
    pub initial: Duration,
    /// Longest delay between attempts: how soon a recovered API server is noticed.
    pub max: Duration,
    /// How long after the event's arrival a launch is still attempted
    /// (`--launch-deadline`); past it a transient failure is final.
    pub deadline: Duration,
    /// How long one API call may take before it counts as a transient failure (an API
    /// server that accepts connections but does not answer).
    pub call_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            deadline: Duration::from_secs(15 * 60),
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The backoff for a launch whose event arrived at `received`.
    fn backoff(&self, received: Instant) -> ExponentialBuilder {
        let left = self.deadline.saturating_sub(received.elapsed());
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(left))
    }

    /// Runs `op` until it succeeds, fails for good, or the deadline passes.
    async fn run<T, F, Fut>(&self, received: Instant, what: &str, op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut op = op;
        let timeout = self.call_timeout;
        let attempt = || kube_call(what, timeout, op());
        attempt
            .retry(self.backoff(received))
            .sleep(tokio::time::sleep)
            .when(|e: &Error| e.category() == Category::Transient)
            .notify(|e: &Error, after: Duration| {
                tracing::debug!(error = %e, ?after, "API call failed; retrying");
            })
            .await
    }
}

/// What happened to one Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchResult {
    /// Created now.
    Created {
        /// Job name.
        name: String,
    },
    /// A Job of that name exists: this event was launched before (a duplicate or replay).
    AlreadyLaunched {
        /// Job name.
        name: String,
    },
    /// Not created. `code` is the HTTP status (None for a transport error or a timeout);
    /// `retried` says whether the failure was transient and outlasted the launch deadline,
    /// or was final at once.
    Failed {
        /// Job name.
        name: String,
        /// HTTP status.
        code: Option<u16>,
        /// The API server's message.
        message: String,
        /// True when the error was transient and the deadline passed.
        retried: bool,
    },
}

impl LaunchResult {
    /// The Job's name.
    pub fn name(&self) -> &str {
        match self {
            LaunchResult::Created { name }
            | LaunchResult::AlreadyLaunched { name }
            | LaunchResult::Failed { name, .. } => name,
        }
    }

    fn failed(name: String, e: &Error, context: Option<String>) -> LaunchResult {
        let message = match (&e, context) {
            (
                Error::Kube {
                    source: kube::Error::Api(s),
                    ..
                },
                None,
            ) => s.message.clone(),
            (Error::Kube { source, .. }, None) => source.to_string(),
            (_, Some(c)) => format!("{c}: {}", api_message(e)),
            (other, None) => other.to_string(),
        };
        LaunchResult::Failed {
            name,
            code: e.http_code(),
            message,
            retried: e.category() == Category::Transient,
        }
    }
}

fn api_message(e: &Error) -> String {
    match e {
        Error::Kube {
            source: kube::Error::Api(s),
            ..
        } => s.message.clone(),
        Error::Kube { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// What is read of the API server's answer to a Job create: the uid. The rest (the whole Job
/// again, with its managed fields) is skipped, not decoded.
#[derive(serde::Deserialize)]
struct Created {
    metadata: CreatedMeta,
}

#[derive(serde::Deserialize)]
struct CreatedMeta {
    uid: Option<String>,
}

/// Creates `job` through `jobs`; its uid.
async fn create_job(
    client: &Client,
    jobs: &Api<Job>,
    pp: &PostParams,
    job: &Job,
) -> Result<Option<String>, kube::Error> {
    let body = serde_json::to_vec(job).map_err(kube::Error::SerdeError)?;
    let mut req = kube::core::Request::new(jobs.resource_url())
        .create(pp, body)
        .map_err(kube::Error::BuildRequest)?;
    req.extensions_mut().insert("create");
    Ok(client.request::<Created>(req).await?.metadata.uid)
}

fn is_code(e: &Error, code: u16) -> bool {
    e.http_code() == Some(code)
}

/// Creates Jobs and their stdin Secrets.
#[derive(Clone)]
pub struct Launcher {
    client: Client,
    retry: RetryPolicy,
}

impl Launcher {
    /// A launcher on `client`.
    pub fn new(client: Client, retry: RetryPolicy) -> Self {
        Launcher { client, retry }
    }

    /// Creates the Job (after deleting the Jobs it replaces): one create in the common case;
    /// when `/serf/stdin` needs a Secret, the Secret first, so that no Job exists without
    /// its stdin, then handed to the Job as its owner (or deleted if the Job is never
    /// created). Retries what can succeed later until `received` + the deadline.
    pub async fn launch(&self, l: &Launch) -> LaunchResult {
        self.launch_since(l, Instant::now()).await
    }

    /// [`Launcher::launch`] for an event that arrived at `received` (the deadline counts
    /// from then).
    pub async fn launch_since(&self, l: &Launch, received: Instant) -> LaunchResult {
        let ns = l.handler.namespace.as_str();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let name = l.job.metadata.name.clone().unwrap_or_default();
        let policy = self.retry;
        for old in &l.replace {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match policy
                .run(received, "delete the replaced Job", || {
                    jobs.delete(old, &dp)
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(job = %old, replaced_by = %name, "deleted the Job it replaces")
                }
                Err(e) if is_code(&e, 404) => {}
                Err(e) => {
                    return LaunchResult::failed(
                        name,
                        &e,
                        Some(format!("cannot delete Job {old} to replace it")),
                    );
                }
            }
        }
        let pp = PostParams::default();
        if let Some(secret) = &l.stdin {
            match policy
                .run(received, "create the /serf/stdin Secret", || {
                    secrets.create(&pp, secret)
                })
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, 409) => {}
                Err(e) => {
                    return LaunchResult::failed(
                        name,
                        &e,
                        Some("cannot create the /serf/stdin Secret, so not the Job".into()),
                    );
                }
            }
        }
        // A create that timed out or lost its connection may have been applied: a 409 on a
        // later attempt is then this launch's own Job.
        let uncertain = AtomicBool::new(false);
        let created = policy
            .run(received, "create the Job", || {
                let call = create_job(&self.client, &jobs, &pp, &l.job);
                let uncertain = &uncertain;
                async move {
                    let r = call.await;
                    if matches!(r, Err(kube::Error::HyperError(_) | kube::Error::Service(_))) {
                        uncertain.store(true, Ordering::Relaxed);
                    }
                    r
                }
            })
            .await;
        let (result, uid) = match created {
            Ok(uid) => (LaunchResult::Created { name: name.clone() }, uid),
            Err(e) if is_code(&e, 409) => {
                let uid = match &l.stdin {
                    // Its Secret goes with the Job that exists.
                    Some(_) => policy
                        .run(received, "read the existing Job", || jobs.get(&name))
                        .await
                        .ok()
                        .and_then(|j| j.metadata.uid),
                    None => None,
                };
                let result = if uncertain.load(Ordering::Relaxed) {
                    LaunchResult::Created { name: name.clone() }
                } else {
                    LaunchResult::AlreadyLaunched { name: name.clone() }
                };
                (result, uid)
            }
            Err(e) => {
                if l.stdin.is_some() {
                    // Not used by any Job: cleaned up (best effort).
                    let dp = DeleteParams::default();
                    if let Err(d) = kube_call(
                        "delete the unused /serf/stdin Secret",
                        policy.call_timeout,
                        secrets.delete(&name, &dp),
                    )
                    .await
                    {
                        tracing::warn!(error = %d, "the unused /serf/stdin Secret stays (owned by the handler)");
                    }
                }
                return LaunchResult::failed(name, &e, None);
            }
        };
        if let (Some(_), Some(uid)) = (&l.stdin, uid) {
            let owner = jobs::job_owner(&name, &uid);
            let patch = Patch::Merge(serde_json::json!({
                "metadata": {"ownerReferences": [owner]}
            }));
            let pp = PatchParams::default();
            if let Err(e) = policy
                .run(received, "hand the /serf/stdin Secret to its Job", || {
                    secrets.patch(&name, &pp, &patch)
                })
                .await
            {
                tracing::warn!(error = %e, "the /serf/stdin Secret stays owned by the handler");
            }
        }
        result
    }
}
