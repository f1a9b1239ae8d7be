//! The operator's Jobs, kept from one watch and indexed by handler and route. What the
//! dispatcher asks on every event (a route's active Jobs) and what a handler's reconcile
//! reads (its finished Jobs) cost the size of the answer, not the number of Jobs; an active
//! Job is kept as its name only, a finished one as the few fields that are read.
//!
//! The same watch feeds the SerfHandler controller's `owns` trigger, so each Job change is
//! decoded once, and only in part ([`WatchedJob`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::jobs::{HandlerRef, LABEL_HANDLER, LABEL_ROUTE};

/// A Job as the index's watch decodes it: the metadata that is read (no managed fields), the
/// first container's environment (a report's `SERF_*` values) and the status. The rest of
/// each watch event is skipped, not decoded.
#[derive(Clone, Debug, Default)]
pub struct WatchedJob(pub Job);

impl<'de> serde::Deserialize<'de> for WatchedJob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use k8s_openapi::api::batch::v1::JobStatus;
        use k8s_openapi::api::core::v1::EnvVar;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Raw {
            metadata: Meta,
            spec: Option<Spec>,
            status: Option<JobStatus>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default, rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            namespace: Option<String>,
            uid: Option<String>,
            resource_version: Option<String>,
            generation: Option<i64>,
            creation_timestamp: Option<Time>,
            deletion_timestamp: Option<Time>,
            labels: Option<BTreeMap<String, String>>,
            annotations: Option<BTreeMap<String, String>>,
            owner_references: Option<Vec<OwnerReference>>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Spec {
            template: Template,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Template {
            spec: Option<PodSpec>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct PodSpec {
            containers: Vec<Container>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Container {
            name: String,
            env: Option<Vec<EnvVar>>,
        }

        let raw = Raw::deserialize(d)?;
        let m = raw.metadata;
        let first = raw
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.containers.into_iter().next());
        Ok(WatchedJob(Job {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                generation: m.generation,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                labels: m.labels,
                annotations: m.annotations,
                owner_references: m.owner_references,
                ..Default::default()
            },
            spec: first.map(|c| k8s_openapi::api::batch::v1::JobSpec {
                template: k8s_openapi::api::core::v1::PodTemplateSpec {
                    metadata: None,
                    spec: Some(k8s_openapi::api::core::v1::PodSpec {
                        containers: vec![k8s_openapi::api::core::v1::Container {
                            name: c.name,
                            env: c.env,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: raw.status,
        }))
    }
}

impl kube::Resource for WatchedJob {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Job::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Job::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Job::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Job::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

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

    fn insert(&mut self, job: Job) {
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

/// Whether a Job's change is worth a reconcile of its handler: only a finished Job is pruned
/// or reported, so the changes of a running one (created, Pod started) are not.
fn triggers_owner(job: &Job) -> bool {
    crate::report::finish_condition(job).is_some()
}

/// Keeps `index` up to date from a watch of `api` (retried with backoff), and sends the owner
/// reference of each changed finished Job to `owners` (the handler controller's trigger).
pub async fn maintain(
    api: kube::Api<WatchedJob>,
    cfg: watcher::Config,
    index: Arc<JobIndex>,
    owners: futures::channel::mpsc::UnboundedSender<Job>,
) {
    watcher(api, cfg)
        .default_backoff()
        .for_each(|r| {
            match r {
                Ok(ev) => {
                    if let watcher::Event::Apply(j) | watcher::Event::InitApply(j) = &ev
                        && triggers_owner(&j.0)
                    {
                        let _ = owners.unbounded_send(owner_trigger(&j.0));
                    }
                    index.apply(match ev {
                        watcher::Event::Apply(j) => watcher::Event::Apply(j.0),
                        watcher::Event::Delete(j) => watcher::Event::Delete(j.0),
                        watcher::Event::InitApply(j) => watcher::Event::InitApply(j.0),
                        watcher::Event::Init => watcher::Event::Init,
                        watcher::Event::InitDone => watcher::Event::InitDone,
                    });
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
        assert_eq!(ix.finished(&href("web")).len(), 1);

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
    fn a_watched_job_keeps_what_is_read_and_nothing_else() {
        let full = serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "web-deploy-1", "namespace": "ns", "uid": "u1",
                "resourceVersion": "42", "labels": {LABEL_HANDLER: "web", LABEL_ROUTE: "deploy"},
                "annotations": {"serf.operator.io/report": "pending"},
                "ownerReferences": [{"apiVersion": "serf.operator.io/v1alpha1",
                    "kind": "SerfHandler", "name": "web", "uid": "h1", "controller": true}],
                "managedFields": [{"manager": "serf-operator", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:template": {}}}}]},
            "spec": {"backoffLimit": 2, "template": {
                "metadata": {"annotations": {"serf.operator.io/stdin": "payload"}},
                "spec": {"restartPolicy": "Never", "containers": [
                    {"name": "c", "image": "busybox", "args": ["x"],
                     "env": [{"name": "SERF_EVENT", "value": "user"}]},
                    {"name": "d", "image": "busybox"}]}}},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}
        });
        let w: WatchedJob = serde_json::from_value(full).unwrap();
        let m = &w.0.metadata;
        assert_eq!(m.resource_version.as_deref(), Some("42"));
        assert_eq!(m.labels.as_ref().unwrap().len(), 2);
        assert_eq!(m.annotations.as_ref().unwrap().len(), 1);
        assert_eq!(m.owner_references.as_ref().unwrap()[0].name, "web");
        assert!(m.managed_fields.is_none());
        let spec = w.0.spec.as_ref().unwrap();
        assert!(spec.backoff_limit.is_none() && spec.template.metadata.is_none());
        let containers = &spec.template.spec.as_ref().unwrap().containers;
        assert_eq!(containers.len(), 1);
        assert!(containers[0].image.is_none() && containers[0].args.is_none());
        assert_eq!(containers[0].env.as_ref().unwrap()[0].name, "SERF_EVENT");
        assert!(crate::report::finish_condition(&w.0).is_some());
        assert!(
            triggers_owner(&w.0),
            "a finished Job is worth its handler's reconcile"
        );
        // A Job without spec or status decodes too; running, it triggers nothing.
        let bare: WatchedJob =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(bare.0.spec.is_none() && bare.0.status.is_none());
        assert!(!triggers_owner(&bare.0));
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
