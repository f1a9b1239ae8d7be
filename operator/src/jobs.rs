//! Builds the Job that a route launches for an event, with `/serf/stdin` in its pod
//! template (or, for bytes an annotation cannot hold, in a Secret made before it). Payloads reach the Job only as environment values and file content, never as
//! part of a command line or of the manifest's structure, and every environment value from
//! Serf is escaped so that Kubernetes' `$(VAR)` expansion leaves it as sent.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Secret, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::contract;
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
/// Annotation of a Job whose route reports its outcome into Serf: `pending` at launch,
/// `sending` once the report is recorded and about to be sent, then its result (`Sent`,
/// `Interrupted`, `TooLarge`, `SendFailed`).
pub const ANNOTATION_REPORT: &str = "serf.operator.io/report";
/// Who manages the Jobs.
pub const MANAGED_BY: &str = "serf-operator";

/// Where every container finds the stdin Serf would pipe to a handler.
pub const STDIN_DIR: &str = "/serf";
/// The file under [`STDIN_DIR`].
pub const STDIN_FILE: &str = "stdin";
const STDIN_VOLUME: &str = "serf-operator-stdin";

/// The SerfHandler a Job belongs to.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct HandlerRef {
    /// Namespace (the Job's namespace too).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, for the owner reference (absent in local mode).
    pub uid: Option<String>,
}

impl HandlerRef {
    /// The reference to a SerfHandler object (its namespace, name and UID).
    pub fn of(h: &serf_operator_crds::SerfHandler) -> HandlerRef {
        HandlerRef {
            namespace: h.metadata.namespace.clone().unwrap_or_default(),
            name: h.metadata.name.clone().unwrap_or_default(),
            uid: h.metadata.uid.clone(),
        }
    }

    /// A handler's (namespace, name), as [`HandlerRef::of`] gives them.
    pub fn key_of(h: &serf_operator_crds::SerfHandler) -> (String, String) {
        let r = HandlerRef::of(h);
        (r.namespace, r.name)
    }
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
    /// The route reports the Job's outcome into Serf.
    pub report: bool,
}

/// Annotation of the Job's pod template holding the bytes of `/serf/stdin` (projected there
/// by a downward-API volume).
pub const ANNOTATION_STDIN: &str = "serf.operator.io/stdin";
/// The most stdin bytes carried in the annotation (Kubernetes allows 256 KiB of annotations
/// in all; the template's own keep the rest).
pub const MAX_ANNOTATION_STDIN: usize = 64 * 1024;

/// The stdin as annotation text, when it can be one: UTF-8, no NUL, at most
/// [`MAX_ANNOTATION_STDIN`] bytes.
pub fn stdin_as_annotation(stdin: &[u8]) -> Option<&str> {
    if stdin.len() > MAX_ANNOTATION_STDIN {
        return None;
    }
    std::str::from_utf8(stdin)
        .ok()
        .filter(|t| !t.contains('\0'))
}

/// Gives every container of the template a Serf agent to call: `SERF_RPC_ADDR`, and
/// `SERF_RPC_AUTH` from the Secret, first in each container's `env` (the `serf` CLI reads
/// both). A template variable of the same name is replaced.
pub fn give_agent(template: &mut JobTemplateSpec, agent: &serf_operator_crds::AgentAccess) {
    let mut vars = vec![EnvVar {
        name: "SERF_RPC_ADDR".into(),
        value: Some(agent.rpc_addr.clone()),
        ..Default::default()
    }];
    if let Some(secret) = &agent.rpc_auth_secret {
        vars.push(EnvVar {
            name: "SERF_RPC_AUTH".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let Some(pod) = template
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    else {
        return;
    };
    let give = |c: &mut Container| {
        let own = c.env.take().unwrap_or_default();
        let mut env = vars.clone();
        env.extend(
            own.into_iter()
                .filter(|v| !vars.iter().any(|a| a.name == v.name)),
        );
        c.env = Some(env);
    };
    pod.containers.iter_mut().for_each(give);
    if let Some(init) = pod.init_containers.as_mut() {
        init.iter_mut().for_each(give);
    }
}

/// Builds the Job, and the Secret that carries `/serf/stdin` when the Job cannot carry it
/// itself.
///
/// In the common case (stdin is UTF-8 text of at most 64 KiB) there is no Secret: the bytes
/// are an annotation of the Job's pod template, projected to `/serf/stdin` by a downward-API
/// volume, so one create makes the whole Job. Otherwise the Secret (same name, owned by the
/// handler) is mounted instead; it must exist before the Job, and is handed to the Job as its
/// owner once the Job exists.
pub fn build(req: &JobRequest<'_>) -> (Job, Option<Secret>) {
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
    if req.report {
        annotations.insert(ANNOTATION_REPORT.into(), "pending".into());
    }

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
    let in_annotation = stdin_as_annotation(&req.stdin);
    if let Some(text) = in_annotation {
        pod_meta
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ANNOTATION_STDIN.into(), text.to_string());
    }
    if let Some(pod) = spec.template.spec.as_mut() {
        let env: Vec<EnvVar> = req.env.iter().map(|(k, v)| serf_env_var(k, v)).collect();
        let decorate = |c: &mut Container| {
            // The `SERF_*` variables come first, so that the template's own variables can
            // use `$(SERF_PAYLOAD)` and friends; a template variable of the same name is
            // replaced by the operator's.
            let own = c.env.take().unwrap_or_default();
            let mut e = env.clone();
            e.extend(
                own.into_iter()
                    .filter(|v| !env.iter().any(|s| s.name == v.name)),
            );
            c.env = Some(e);
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
        let volume = match in_annotation {
            Some(_) => Volume {
                name: STDIN_VOLUME.into(),
                downward_api: Some(DownwardAPIVolumeSource {
                    default_mode: Some(0o444),
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: STDIN_FILE.into(),
                        field_ref: Some(ObjectFieldSelector {
                            field_path: format!("metadata.annotations['{ANNOTATION_STDIN}']"),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            },
            None => Volume {
                name: STDIN_VOLUME.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(req.name.clone()),
                    default_mode: Some(0o444),
                    optional: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        pod.volumes.get_or_insert_with(Vec::new).push(volume);
    }

    let job = Job {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.handler.namespace.clone()),
            labels: Some(job_labels),
            annotations: Some(annotations.clone()),
            owner_references: owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    if in_annotation.is_some() {
        return (job, None);
    }
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
            // Until the Job exists and takes it over: deleted with the handler at the latest.
            owner_references: owner.map(|mut o| {
                o.controller = Some(false);
                o.block_owner_deletion = Some(false);
                vec![o]
            }),
            ..Default::default()
        },
        data: Some([(STDIN_FILE.to_string(), ByteString(req.stdin.clone()))].into()),
        immutable: Some(true),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    (job, Some(secret))
}

/// The one place a Serf-derived value becomes a container environment variable: the value
/// is written so that Kubernetes' `$(VAR)` expansion gives the container exactly `value`
/// ([`contract::kube_literal`]).
pub fn serf_env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(contract::kube_literal(value)),
        value_from: None,
    }
}

/// The owner reference that ties the stdin Secret to its Job (so it goes with the Job).
pub fn job_owner(job_name: &str, job_uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job_name.into(),
        uid: job_uid.into(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    }
}

/// The bytes a Job's containers read at `/serf/stdin`: the pod template's annotation, or
/// the Secret's data.
pub fn stdin_bytes(job: &Job, secret: Option<&Secret>) -> Vec<u8> {
    if let Some(text) = job
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_STDIN))
    {
        return text.as_bytes().to_vec();
    }
    secret
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(STDIN_FILE))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::contract::{container_env_after_expansion, expand};

    fn template() -> JobTemplateSpec {
        serde_json::from_value(serde_json::json!({
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "c", "image": "busybox",
                    "args": ["$(SERF_PAYLOAD)", "$$(SERF_PAYLOAD)"],
                    "env": [
                        {"name": "DB_PASSWORD",
                         "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
                        {"name": "MSG", "value": "got $(SERF_PAYLOAD)"},
                        {"name": "SERF_EVENT", "value": "overridden"}
                    ]
                }]
            }}}
        }))
        .unwrap()
    }

    #[test]
    fn serf_values_reach_the_container_as_sent_and_the_template_can_use_them() {
        let handler = HandlerRef {
            namespace: "ns".into(),
            name: "h".into(),
            uid: None,
        };
        let template = template();
        for payload in [
            "a $(SERF_EVENT) b $$ c $(UNDEF)",
            "$(DB_PASSWORD)",
            "$(MSG)$(",
            "plain",
        ] {
            let env = vec![
                ("SERF_EVENT".to_string(), "user".to_string()),
                ("SERF_PAYLOAD".to_string(), payload.to_string()),
            ];
            let (job, _) = build(&JobRequest {
                handler: &handler,
                route: "r",
                template: &template,
                name: "h-r-1".into(),
                env: &env,
                stdin: payload.as_bytes().to_vec(),
                event_kind: "user",
                event_name: Some("x"),
                event_description: "user:x@1",
                replayed: false,
                report: false,
            });
            let c = &job.spec.unwrap().template.spec.unwrap().containers[0];
            let vars = c.env.as_ref().unwrap();
            // SERF_* first, then the template's own; the template's SERF_EVENT is replaced.
            let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(names, ["SERF_EVENT", "SERF_PAYLOAD", "DB_PASSWORD", "MSG"]);
            let seen = container_env_after_expansion(vars, |_| Some("s3cret".into()));
            assert_eq!(seen["SERF_PAYLOAD"], payload);
            assert_eq!(seen["SERF_EVENT"], "user");
            assert_eq!(seen["MSG"], format!("got {payload}"));
            assert!(!seen["SERF_PAYLOAD"].contains("s3cret"));
            let args: Vec<String> = c
                .args
                .as_ref()
                .unwrap()
                .iter()
                .map(|a| expand(a, &seen))
                .collect();
            assert_eq!(args, [payload, "$(SERF_PAYLOAD)"]);
        }
    }
}
