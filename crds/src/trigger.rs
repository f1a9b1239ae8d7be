//! `SerfEventTrigger`: fires a Serf user event or query from Kubernetes and records the
//! outcome.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fires a Serf user event or query: once for each generation of the spec, or on every tick
/// of `schedule`. The outcome (sent, failed, the query's acks and responses) is recorded in
/// status.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serf.operator.io",
    version = "v1alpha1",
    kind = "SerfEventTrigger",
    plural = "serfeventtriggers",
    shortname = "set",
    category = "serf",
    namespaced,
    doc = "Fires a Serf user event or query from Kubernetes and records the outcome.",
    status = "SerfEventTriggerStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Event","type":"string","jsonPath":".spec.event.name"}"#,
    printcolumn = r#"{"name":"Query","type":"string","jsonPath":".spec.query.name"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Sent","type":"string","jsonPath":".status.conditions[?(@.type==\"Sent\")].status"}"#,
    printcolumn = r#"{"name":"Fired","type":"integer","jsonPath":".status.firedCount"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastFired"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = kube::core::Rule::new("has(self.event) != has(self.query)")
        .message("a trigger fires exactly one of event or query")
)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.watch) || (has(self.event) && !has(self.schedule))")
        .message("a watch fires an event (not a query), on changes (not on a schedule)")
)]
#[serde(rename_all = "camelCase")]
pub struct SerfEventTriggerSpec {
    /// A user event to fire (`serf event`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<TriggerEvent>,

    /// A query to run (`serf query`); its acks and responses land in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<TriggerQuery>,

    /// A cron schedule (5 fields, e.g. `*/5 * * * *`), in UTC unless `timeZone` says
    /// otherwise. Without it the trigger fires once for each generation of its spec. The API
    /// server refuses what is not five fields; a schedule the operator still cannot read
    /// shows as `Ready=False` (reason `InvalidSpec`) in the trigger's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 128),
        regex(pattern = r"^[0-9A-Za-z*/,?#-]+( +[0-9A-Za-z*/,?#-]+){4}$")
    )]
    pub schedule: Option<String>,

    /// The IANA time zone of `schedule`, e.g. `Europe/Berlin`. Default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        regex(pattern = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")
    )]
    pub time_zone: Option<String>,

    /// Stop firing (a scheduled trigger skips its ticks; an unscheduled one waits).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// For a schedule: a tick missed (the operator was down, the trigger suspended) still
    /// fires, once, if it is at most this many seconds old, as CronJob's field of the same
    /// name. Omitted: the latest missed tick always fires once; older ones never do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,

    /// Fire `event` once per change of chosen fields of watched objects (any kind), instead
    /// of once per generation: e.g. a ConfigMap's `.data`, a Deployment's
    /// `.status.readyReplicas`. The event's payload is then a template: each `{...}` is a
    /// kubectl JSONPath expression on the object, e.g. `{.metadata.name} {.data.version}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<TriggerWatch>,
}

/// The objects a trigger watches, and what counts as a change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerWatch {
    /// The kind's API version, e.g. `v1`, `apps/v1`.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9.-]+/)?v[0-9a-z]+$")
    )]
    pub api_version: String,
    /// The kind, e.g. `ConfigMap`, `Deployment`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Z][A-Za-z0-9]*$"))]
    pub kind: String,
    /// The namespace to watch. Default: the trigger's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// A label selector, as `kubectl -l` takes it (`app=web,tier!=db`). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub selector: Option<String>,
    /// The fields whose values count as a change: kubectl JSONPath expressions, e.g.
    /// `{.data}`, `{.status.readyReplicas}`. Anything else (status churn, resyncs, other
    /// fields) fires nothing.
    #[schemars(length(min = 1, max = 16))]
    pub fields: Vec<String>,
    /// Changes to one object closer together than this fire once, with the newest state
    /// (e.g. `2s`, `500ms`). Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub debounce: Option<String>,
}

/// A user event.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new(
        "size(bytes(self.name)) + (has(self.payload) ? size(bytes(self.payload)) : 0) <= 470"
    )
    .message("name and payload together must fit Serf's user event limit: at most 470 bytes (512 with Serf's envelope)")
)]
pub struct TriggerEvent {
    /// The event name (SERF_USER_EVENT on receivers).
    #[schemars(length(min = 1, max = 470))]
    pub name: String,
    /// The payload, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 470))]
    pub payload: Option<String>,
    /// Let receivers coalesce bursts of this event into the newest one, as `serf event` does
    /// by default. Default false here: every generation is delivered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub coalesce: bool,
}

/// A query.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new(
        "size(bytes(self.name)) + (has(self.payload) ? size(bytes(self.payload)) : 0) <= 900"
    )
    .message("name and payload together must fit Serf's query limit: at most 900 bytes (1024 with filters and envelope)")
)]
#[x_kube(
    validation = kube::core::Rule::new("!self.name.startsWith('_serf_')")
        .message("query names starting with _serf_ are reserved by Serf")
)]
pub struct TriggerQuery {
    /// The query name (SERF_QUERY_NAME on receivers).
    #[schemars(length(min = 1, max = 900))]
    pub name: String,
    /// The payload, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 900))]
    pub payload: Option<String>,
    /// Only these nodes receive the query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub filter_nodes: Vec<String>,
    /// Only nodes whose tags match receive it: tag name to a regular expression that may
    /// match anywhere in the value (as `serf query -tag`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter_tags: BTreeMap<String, String>,
    /// How long to collect answers (e.g. `5s`). Omitted: Serf's default (3.2 s for fewer
    /// than 10 nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// Ask receiving nodes to acknowledge. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ack: Option<bool>,
    /// Extra nodes that relay each answer, for lossy networks. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 5))]
    pub relay_factor: Option<u8>,
}

/// The observed state of a SerfEventTrigger.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerfEventTriggerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Sent` (True, False with Serf's error text, or Unknown when the operator stopped
    /// between sending and recording) and `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When it last fired (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired: Option<String>,
    /// How many times it has fired.
    #[serde(default)]
    pub fired_count: i64,
    /// For queries: what the latest run got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryResult>,
    /// The generation whose firing completed (sent, failed for good, or interrupted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired_generation: Option<i64>,
    /// For a schedule: the latest tick handled (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// Recorded before a send and cleared after its outcome is recorded. Found set after an
    /// operator restart, it means the send may or may not have happened: the trigger then
    /// shows `Sent=Unknown` (reason `Interrupted`) instead of sending twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firing: Option<Firing>,
    /// For a watch: the objects watched and what was last fired for each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchStatus>,
}

/// What a watching trigger sees and fired.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    /// Objects watched now.
    #[serde(default)]
    pub objects: i32,
    /// What was last fired for each object, the most recent first (at most 20 objects;
    /// `firedCount` counts all firings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fired: Vec<WatchFired>,
}

/// One firing for one watched object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WatchFired {
    /// The object, `namespace/name`.
    pub object: String,
    /// When (RFC 3339).
    pub time: String,
    /// The payload sent (at most 256 bytes shown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payload: String,
    /// `Sent`, `Failed` (with Serf's error), or `Interrupted` (the operator stopped between
    /// recording and sending; not sent again).
    pub result: String,
}

/// A send in progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Firing {
    /// The spec generation being fired.
    pub generation: i64,
    /// For a schedule: the tick being fired (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<String>,
    /// When the send started (RFC 3339).
    pub started: String,
}

/// The acks and responses of a query run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueryResult {
    /// Nodes that acknowledged (at most 100; `ackCount` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acks: Vec<String>,
    /// All acks.
    #[serde(default)]
    pub ack_count: i32,
    /// Answers (at most 100; `responseCount` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub responses: Vec<QueryResponse>,
    /// All answers.
    #[serde(default)]
    pub response_count: i32,
    /// True when the query ran to its deadline.
    #[serde(default)]
    pub complete: bool,
}

/// One node's answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueryResponse {
    /// Node name.
    pub from: String,
    /// The answer as text (invalid UTF-8 replaced).
    pub payload: String,
}
