//! Builds the Job (and the Secret that carries `/serf/stdin`) that a route launches for an
//! event. Payloads reach the Job only as environment values and file content, never as
//! part of a command line or of the manifest's structure.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, Secret, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::naming::label_value;

/// Label: the SerfHandler that launched the Job.
pub const LABEL_HANDLER: &str = "serf.operator.io/handler";
/// Label: the route.
pub const LABEL_ROUTE: &str = "serf.operator.io/route";
/// Label: the Serf event type (`user`, `query`, `member-failed`, ...).
pub const LABEL_EVENT: &str = "serf.operator.io/event";
/// Label: the user event or query name (made a valid label value).
pub const LABEL_EVENT_NAME: &str = "serf.operator.io/event-name";
/// Label: `true` when the event was recovered by the membership comparison after a
/// reconnect rather than received live.
pub const LABEL_REPLAYED: &str = "serf.operator.io/replayed";
/// Annotation: the event, e.g. `user:deploy@42` or `member-failed:db-1`.
pub const ANNOTATION_EVENT: &str = "serf.operator.io/event";
/// Who manages the Jobs.
pub const MANAGED_BY: &str = "serf-operator";

/// Where every container finds the stdin Serf would pipe to a handler.
pub const STDIN_DIR: &str = "/serf";
/// The file under [`STDIN_DIR`].
pub const STDIN_FILE: &str = "stdin";
const STDIN_VOLUME: &str = "serf-operator-stdin";

/// The SerfHandler a Job belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerRef {
    /// Namespace (the Job's namespace too).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, for the owner reference (absent in local mode).
    pub uid: Option<String>,
}

impl std::fmt::Display for HandlerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the Job is launched for.
pub struct JobRequest<'a> {
    /// The owning handler.
    pub handler: &'a HandlerRef,
    /// The route's name.
    pub route: &'a str,
    /// The route's template.
    pub template: &'a JobTemplateSpec,
    /// The deterministic name.
    pub name: String,
    /// `SERF_*` environment.
    pub env: &'a [(String, String)],
    /// The bytes of `/serf/stdin`.
    pub stdin: Vec<u8>,
    /// Event type, event name (user event or query), description.
    pub event_kind: &'a str,
    /// User event or query name, if any.
    pub event_name: Option<&'a str>,
    /// `user:deploy@42`, ...
    pub event_description: &'a str,
    /// Recovered after a reconnect.
    pub replayed: bool,
}

/// Builds the Job and its stdin Secret.
///
/// The Secret has the Job's name and should be owned by the Job once the Job exists (so it
/// is deleted with it); the Job mounts it at `/serf` in every container and init container
/// and waits for it if it is not there yet.
pub fn build(req: &JobRequest<'_>) -> (Job, Secret) {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    labels.insert(LABEL_HANDLER.into(), label_value(&req.handler.name));
    labels.insert(LABEL_ROUTE.into(), label_value(req.route));
    labels.insert(LABEL_EVENT.into(), label_value(req.event_kind));
    if let Some(n) = req.event_name {
        labels.insert(LABEL_EVENT_NAME.into(), label_value(n));
    }
    if req.replayed {
        labels.insert(LABEL_REPLAYED.into(), "true".into());
    }
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());

    let template_meta = req.template.metadata.clone().unwrap_or_default();
    let mut job_labels = template_meta.labels.clone().unwrap_or_default();
    job_labels.extend(labels.clone());
    let mut annotations = template_meta.annotations.clone().unwrap_or_default();
    annotations.insert(ANNOTATION_EVENT.into(), req.event_description.to_string());

    let owner = req.handler.uid.as_ref().map(|uid| OwnerReference {
        api_version: format!(
            "{}/{}",
            serf_operator_crds::GROUP,
            serf_operator_crds::VERSION
        ),
        kind: "SerfHandler".into(),
        name: req.handler.name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });

    let mut spec = req.template.spec.clone().unwrap_or_default();
    let pod_meta = spec.template.metadata.get_or_insert_with(Default::default);
    pod_meta
        .labels
        .get_or_insert_with(Default::default)
        .extend(labels.clone());
    if let Some(pod) = spec.template.spec.as_mut() {
        let env: Vec<EnvVar> = req
            .env
            .iter()
            .map(|(k, v)| EnvVar {
                name: k.clone(),
                value: Some(v.clone()),
                value_from: None,
            })
            .collect();
        let decorate = |c: &mut Container| {
            let e = c.env.get_or_insert_with(Vec::new);
            e.retain(|v| !env.iter().any(|s| s.name == v.name));
            e.extend(env.iter().cloned());
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: STDIN_VOLUME.into(),
                    mount_path: STDIN_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
        };
        pod.containers.iter_mut().for_each(decorate);
        if let Some(init) = pod.init_containers.as_mut() {
            init.iter_mut().for_each(decorate);
        }
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: STDIN_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(req.name.clone()),
                default_mode: Some(0o444),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    let job = Job {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.handler.namespace.clone()),
            labels: Some(job_labels),
            annotations: Some(annotations.clone()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.handler.namespace.clone()),
            labels: Some(labels),
            annotations: Some(
                [(
                    ANNOTATION_EVENT.to_string(),
                    req.event_description.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([(STDIN_FILE.to_string(), ByteString(req.stdin.clone()))].into()),
        immutable: Some(true),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    (job, secret)
}

/// The owner reference that ties the stdin Secret to its Job.
pub fn owned_by_job(secret: &mut Secret, job_name: &str, job_uid: &str) {
    secret.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job_name.into(),
        uid: job_uid.into(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    }]);
}
