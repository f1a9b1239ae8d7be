//! Schema pieces shared by the API types: the event filter pattern and the embedded Job
//! template.

use std::borrow::Cow;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Serf's event filter syntax, as an OpenAPI pattern: comma-separated items, no spaces.
pub const EVENT_FILTER_PATTERN: &str = r"^(member-(join|leave|failed|update|reap|\*)|user(:[^,]+)?|query(:[^,]+)?|\*)(,(member-(join|leave|failed|update|reap|\*)|user(:[^,]+)?|query(:[^,]+)?|\*))*$";

/// A batch/v1 JobTemplateSpec, kept as the user wrote it.
///
/// The CRD declares it as an object with `x-kubernetes-preserve-unknown-fields`, not with
/// the full PodSpec schema: that schema would make the CRD several hundred KiB (over the
/// 256 KiB limit of `kubectl apply`'s last-applied annotation), and a template with a
/// mistake must not make the whole handler unreadable. The operator decodes the template per
/// route ([`JobTemplate::decode`]) and the API server validates every Job it creates; a bad
/// template shows as that route's error, while the handler's other routes keep working.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(transparent)]
pub struct JobTemplate(pub serde_json::Value);

impl JobTemplate {
    /// Decodes the template into the typed JobTemplateSpec.
    ///
    /// # Errors
    /// The decoder's message, which names the offending field.
    pub fn decode(&self) -> Result<JobTemplateSpec, String> {
        serde_json::from_value(self.0.clone()).map_err(|e| e.to_string())
    }

    /// Wraps a typed template.
    pub fn from_spec(spec: &JobTemplateSpec) -> Self {
        JobTemplate(serde_json::to_value(spec).unwrap_or_default())
    }
}

impl JsonSchema for JobTemplate {
    fn schema_name() -> Cow<'static, str> {
        "JobTemplate".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "description": "A batch/v1 JobTemplateSpec (metadata and spec), as in a CronJob's jobTemplate.",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}
