//! Creates the Jobs the engine decides on, exactly once per event: 409 AlreadyExists is
//! "already launched"; 429, 5xx and transport errors are retried with bounded backoff; any
//! other 4xx is final and its message is reported. Talks to the API server.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::{Api, Client};

use crate::engine::Launch;
use crate::jobs;

/// How often and how patiently to retry a create that can succeed later.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
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
    /// Not created. `code` is the HTTP status (None for a transport error); `retried` says
    /// whether the failure outlasted the retries (429, 5xx, timeouts) or was final at once.
    Failed {
        /// Job name.
        name: String,
        /// HTTP status.
        code: Option<u16>,
        /// The API server's message.
        message: String,
        /// True when the error was retryable and the retries ran out.
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
}

fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn code_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn message_of(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Runs `op` until it succeeds, fails for good, or the attempts run out.
async fn with_retries<T, F, Fut>(policy: RetryPolicy, mut op: F) -> Result<T, (kube::Error, bool)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delay = policy.initial;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && attempt < policy.attempts.max(1) => {
                tracing::debug!(error = %e, attempt, "retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max);
                attempt += 1;
            }
            Err(e) => {
                let retried = retryable(&e);
                return Err((e, retried));
            }
        }
    }
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

    /// Creates the Job (after deleting the Jobs it replaces) and then its stdin Secret,
    /// owned by the Job.
    pub async fn launch(&self, l: &Launch) -> LaunchResult {
        let ns = l.handler.namespace.as_str();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), ns);
        let name = l.job.metadata.name.clone().unwrap_or_default();
        for old in &l.replace {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match with_retries(self.retry, || jobs.delete(old, &dp)).await {
                Ok(_) => {
                    tracing::info!(job = %old, replaced_by = %name, "deleted the Job it replaces")
                }
                Err((kube::Error::Api(s), _)) if s.code == 404 => {}
                Err((e, retried)) => {
                    return LaunchResult::Failed {
                        name,
                        code: code_of(&e),
                        message: format!(
                            "cannot delete Job {old} to replace it: {}",
                            message_of(&e)
                        ),
                        retried,
                    };
                }
            }
        }
        let pp = PostParams::default();
        let created = with_retries(self.retry, || jobs.create(&pp, &l.job)).await;
        let (result, uid) = match created {
            Ok(job) => (
                LaunchResult::Created { name: name.clone() },
                job.metadata.uid.clone(),
            ),
            Err((kube::Error::Api(s), _)) if s.code == 409 => {
                // Launched before. Its Secret may be missing if the earlier run stopped in
                // between: look the Job up and make sure.
                let uid = with_retries(self.retry, || jobs.get(&name))
                    .await
                    .ok()
                    .and_then(|j| j.metadata.uid);
                (LaunchResult::AlreadyLaunched { name: name.clone() }, uid)
            }
            Err((e, retried)) => {
                return LaunchResult::Failed {
                    name,
                    code: code_of(&e),
                    message: message_of(&e),
                    retried,
                };
            }
        };
        if let Some(uid) = uid {
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
            let mut secret = l.stdin.clone();
            jobs::owned_by_job(&mut secret, &name, &uid);
            match with_retries(self.retry, || secrets.create(&pp, &secret)).await {
                Ok(_) => {}
                Err((kube::Error::Api(s), _)) if s.code == 409 => {}
                Err((e, retried)) => {
                    return LaunchResult::Failed {
                        name,
                        code: code_of(&e),
                        message: format!(
                            "Job created but its /serf/stdin Secret is not: {}",
                            message_of(&e)
                        ),
                        retried,
                    };
                }
            }
        }
        result
    }
}
