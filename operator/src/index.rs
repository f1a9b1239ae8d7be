//! The operator's Jobs, kept from one watch and indexed by handler and route. What the
//! dispatcher asks on every event (a route's active Jobs) and what a handler's reconcile
//! reads (its finished Jobs) cost the size of the answer, not the number of Jobs; an active
//! Job is kept as its name only, a finished one as the few fields that are read
//! ([`crate::jobs::strip_for_cache`]).
//!
//! The same watch feeds the SerfHandler controller's `owns` trigger, so each Job change is
//! decoded once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::jobs::{HandlerRef, LABEL_HANDLER, LABEL_ROUTE};

/// (namespace, handler label value).
type HandlerKey = (String, String);

#[derive(Default)]
struct HandlerJobs {
    /// Unfinished Jobs: name → route label value.
    active: BTreeMap<String, String>,
    /// Finished Jobs, by name.
    finished: BTreeMap<String, Arc<Job>>,
}

#[derive(Default)]
struct Jobs {
    by_handler: HashMap<HandlerKey, HandlerJobs>,
    /// (namespace, name) → the handler it is filed under.
    filed: HashMap<(String, String), HandlerKey>,
}

impl Jobs {
    fn remove(&mut self, ns: &str, name: &str) {
        if let Some(key) = self.filed.remove(&(ns.to_string(), name.to_string()))
            && let Some(h) = self.by_handler.get_mut(&key)
        {
            h.active.remove(name);
            h.finished.remove(name);
            if h.active.is_empty() && h.finished.is_empty() {
                self.by_handler.remove(&key);
            }
        }
    }

    fn insert(&mut self, mut job: Job) {
        let (Some(ns), Some(name)) = (job.metadata.namespace.clone(), job.metadata.name.clone())
        else {
            return;
        };
        self.remove(&ns, &name);
        let labels = job.metadata.labels.as_ref();
        let (Some(handler), route) = (
            labels.and_then(|l| l.get(LABEL_HANDLER)).cloned(),
            labels
                .and_then(|l| l.get(LABEL_ROUTE))
                .cloned()
                .unwrap_or_default(),
        ) else {
            return;
        };
        let key = (ns.clone(), handler);
        let entry = self.by_handler.entry(key.clone()).or_default();
        if crate::report::finish_condition(&job).is_some() {
            job.metadata.managed_fields = None;
            crate::jobs::strip_for_cache(&mut job);
            entry.finished.insert(name.clone(), Arc::new(job));
        } else {
            entry.active.insert(name.clone(), route);
        }
        self.filed.insert((ns, name), key);
    }

    fn len(&self) -> usize {
        self.filed.len()
    }
}

/// The operator's Jobs in one watch scope (a namespace, or all), indexed.
pub struct JobIndex {
    jobs: RwLock<Jobs>,
    /// The list being read after a (re)connect; swapped in when complete.
    listing: std::sync::Mutex<Option<Jobs>>,
    ready: watch::Sender<bool>,
}

impl Default for JobIndex {
    fn default() -> Self {
        JobIndex {
            jobs: RwLock::default(),
            listing: std::sync::Mutex::default(),
            ready: watch::channel(false).0,
        }
    }
}

impl JobIndex {
    /// Applies one watch event.
    pub fn apply(&self, event: watcher::Event<Job>) {
        match event {
            watcher::Event::Apply(job) => {
                if let Ok(mut j) = self.jobs.write() {
                    j.insert(job);
                }
            }
            watcher::Event::Delete(job) => {
                if let (Some(ns), Some(name), Ok(mut j)) = (
                    job.metadata.namespace.as_deref(),
                    job.metadata.name.as_deref(),
                    self.jobs.write(),
                ) {
                    j.remove(ns, name);
                }
            }
            watcher::Event::Init => {
                if let Ok(mut l) = self.listing.lock() {
                    *l = Some(Jobs::default());
                }
            }
            watcher::Event::InitApply(job) => {
                if let Ok(mut l) = self.listing.lock()
                    && let Some(l) = l.as_mut()
                {
                    l.insert(job);
                }
            }
            watcher::Event::InitDone => {
                let listed = self.listing.lock().ok().and_then(|mut l| l.take());
                if let (Some(listed), Ok(mut j)) = (listed, self.jobs.write()) {
                    *j = listed;
                }
                self.ready.send_replace(true);
            }
        }
    }

    /// The unfinished Jobs of a handler's route, by name.
    pub fn active(&self, handler: &HandlerRef, route: &str) -> Vec<String> {
        let key = (
            handler.namespace.clone(),
            crate::naming::label_value(&handler.name),
        );
        let route = crate::naming::label_value(route);
        self.jobs
            .read()
            .ok()
            .and_then(|j| {
                j.by_handler.get(&key).map(|h| {
                    h.active
                        .iter()
                        .filter(|(_, r)| **r == route)
                        .map(|(n, _)| n.clone())
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// The finished Jobs of a handler.
    pub fn finished(&self, handler: &HandlerRef) -> Vec<Arc<Job>> {
        let key = (
            handler.namespace.clone(),
            crate::naming::label_value(&handler.name),
        );
        self.jobs
            .read()
            .ok()
            .and_then(|j| {
                j.by_handler
                    .get(&key)
                    .map(|h| h.finished.values().cloned().collect())
            })
            .unwrap_or_default()
    }

    /// How many Jobs are indexed.
    pub fn len(&self) -> usize {
        self.jobs.read().map(|j| j.len()).unwrap_or(0)
    }

    /// True when no Job is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once the first list is complete.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// What the handler controller needs of a Job to find its owner.
fn owner_trigger(job: &Job) -> Job {
    Job {
        metadata: ObjectMeta {
            name: job.metadata.name.clone(),
            namespace: job.metadata.namespace.clone(),
            owner_references: job.metadata.owner_references.clone(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Keeps `index` up to date from a watch of `api` (retried with backoff), and sends each
/// changed Job's owner reference to `owners` (the handler controller's trigger).
pub async fn maintain(
    api: kube::Api<Job>,
    cfg: watcher::Config,
    index: Arc<JobIndex>,
    owners: futures::channel::mpsc::UnboundedSender<Job>,
) {
    watcher(api, cfg)
        .default_backoff()
        .for_each(|r| {
            match r {
                Ok(ev) => {
                    if let watcher::Event::Apply(j) | watcher::Event::InitApply(j) = &ev {
                        let _ = owners.unbounded_send(owner_trigger(j));
                    }
                    index.apply(ev);
                }
                Err(e) => tracing::warn!(error = %e, kind = "Job", "watch"),
            }
            std::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, handler: &str, route: &str, finished: bool) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {
                LABEL_HANDLER: handler, LABEL_ROUTE: route}},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}},
            "status": if finished {
                serde_json::json!({"conditions": [{"type": "Complete", "status": "True"}]})
            } else { serde_json::json!({}) }
        }))
        .unwrap()
    }

    fn href(name: &str) -> HandlerRef {
        HandlerRef {
            namespace: "ns".into(),
            name: name.into(),
            uid: None,
        }
    }

    #[test]
    fn jobs_are_found_by_handler_and_route_and_move_when_they_finish() {
        let ix = JobIndex::default();
        ix.apply(watcher::Event::Init);
        ix.apply(watcher::Event::InitApply(job("a", "web", "deploy", false)));
        ix.apply(watcher::Event::InitApply(job("b", "web", "other", false)));
        ix.apply(watcher::Event::InitApply(job("c", "db", "deploy", true)));
        // Not visible until the list is complete.
        assert!(ix.is_empty());
        ix.apply(watcher::Event::InitDone);
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.active(&href("web"), "deploy"), vec!["a".to_string()]);
        assert!(ix.finished(&href("web")).is_empty());
        assert_eq!(ix.finished(&href("db")).len(), 1);

        ix.apply(watcher::Event::Apply(job("a", "web", "deploy", true)));
        assert!(ix.active(&href("web"), "deploy").is_empty());
        let done = ix.finished(&href("web"));
        assert_eq!(done.len(), 1);
        // Kept stripped: no Pod template beyond the first container's environment.
        assert!(done[0].spec.as_ref().unwrap().template.metadata.is_none());

        ix.apply(watcher::Event::Delete(job("a", "web", "deploy", true)));
        assert!(ix.finished(&href("web")).is_empty());
        assert_eq!(ix.len(), 2);

        // A relist replaces everything: Jobs deleted while the watch was down are gone.
        ix.apply(watcher::Event::Init);
        ix.apply(watcher::Event::InitApply(job("d", "web", "deploy", false)));
        ix.apply(watcher::Event::InitDone);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.active(&href("web"), "deploy"), vec!["d".to_string()]);
        assert!(ix.finished(&href("db")).is_empty());
    }

    #[test]
    fn a_relabelled_job_is_filed_once() {
        let ix = JobIndex::default();
        ix.apply(watcher::Event::InitDone);
        ix.apply(watcher::Event::Apply(job("a", "web", "deploy", false)));
        ix.apply(watcher::Event::Apply(job("a", "web", "other", false)));
        assert!(ix.active(&href("web"), "deploy").is_empty());
        assert_eq!(ix.active(&href("web"), "other"), vec!["a".to_string()]);
        assert_eq!(ix.len(), 1);
    }
}
