//! `SerfHandler`: routes Serf events, by the operator node's role, to Jobs and query answers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// Routes Serf events to Kubernetes Jobs and query answers.
///
/// A handler applies where the operator's own Serf node matches `role` and `selfTags`, as a
/// `serf agent -event-handler` applies on the node it runs on. Each route names the Serf
/// events it takes (Serf's own filter syntax) and one action: launch a Job from `job`, or
/// answer a query with `respond`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serf.operator.io",
    version = "v1alpha1",
    kind = "SerfHandler",
    plural = "serfhandlers",
    shortname = "sh",
    category = "serf",
    namespaced,
    doc = "Routes Serf events, by the Serf role of the operator's node, to Jobs and query answers.",
    status = "SerfHandlerStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Routes","type":"integer","jsonPath":".status.routeCount"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SerfHandlerSpec {
    /// Run only where the operator's own Serf node has this `role` tag (what Serf passes to
    /// handlers as SERF_SELF_ROLE). An anchored regular expression, like `serf members -tag`:
    /// `web` matches exactly `web`, `web|api` either. Omitted: any role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub role: Option<String>,

    /// Further filters on the operator node's own tags: tag name to an anchored regular
    /// expression on its value, e.g. `{dc: "eu-.*"}`. A tag the node lacks never matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub self_tags: BTreeMap<String, String>,

    /// The routes, each with a unique name. An event can match several routes; each acts.
    #[x_kube(
        validation = kube::core::Rule::new("self.all(r, self.exists_one(o, o.name == r.name))")
            .message("route names must be unique within a handler")
    )]
    #[schemars(length(min = 1, max = 64))]
    pub routes: Vec<Route>,

    /// Finished successful Jobs to keep per route (oldest deleted first). Default 3. The
    /// record that keeps an event from launching twice outlives this pruning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub successful_jobs_history_limit: Option<i32>,

    /// Finished failed Jobs to keep per route (oldest deleted first). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub failed_jobs_history_limit: Option<i32>,
}

/// One route: which events, which members, and what to do.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("has(self.job) != has(self.respond)")
        .message("a route needs exactly one action: job or respond")
)]
#[x_kube(
    validation = kube::core::Rule::new(
        "!has(self.respond) || self.events.matches('^query(:[^,]+)?(,query(:[^,]+)?)*$')"
    )
    .message("respond answers queries only: its route's `events` must list only query or query:NAME")
)]
#[x_kube(
    validation = kube::core::Rule::new(
        "!has(self.members) || self.events.matches('^(member-[a-z*]+)(,member-[a-z*]+)*$')"
    )
    .message("members filters apply to member events only: `events` must list only member-* events")
)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.answer) || has(self.job)")
        .message("answer is for job routes (a respond route answers with its payload)")
)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.agent) || has(self.job)")
        .message("agent is for job routes: it is given to the Job's containers")
)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.report) || has(self.job)")
        .message("report is for job routes: it reports each Job's outcome")
)]
pub struct Route {
    /// The route's name: a DNS label, unique in the handler. It appears in Job names, labels
    /// and status.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The Serf events this route takes, in Serf's own filter syntax: `member-join`,
    /// `member-leave`, `member-failed`, `member-update`, `member-reap`, `member-*`, `user`,
    /// `user:NAME`, `query`, `query:NAME`, `*`; several separated by commas, no spaces.
    #[schemars(length(min = 1, max = 1024), regex(pattern = schema::EVENT_FILTER_PATTERN))]
    pub events: String,

    /// For member events: anchored regular expressions on the tags of each member in the
    /// event, e.g. `{role: db}`. The route acts on the members that match; an event none of
    /// whose members match is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<BTreeMap<String, String>>,

    /// For member events: gather the members of matching events inside this window (e.g.
    /// `10s`, `1m`) into one Job, like Serf's own coalescing. Omitted: one Job per event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub coalesce: Option<String>,

    /// What to do when a Job of this route is still active: `Allow` (default) runs them side
    /// by side, `Forbid` skips the new event, `Replace` deletes the active Job first. As in
    /// CronJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,

    /// Launch a Job from this template (a batch/v1 JobTemplateSpec: `metadata` and `spec`).
    /// The Job gets the Serf event as SERF_* environment variables in every container and
    /// the stdin Serf would pipe to a handler as the file /serf/stdin. When the handler
    /// changes, the operator creates the Job this template makes with a server-side dry run:
    /// a template the API server refuses makes the handler Ready=False with its message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<schema::JobTemplate>,

    /// Answer a query inline, before its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond: Option<Respond>,

    /// For a query that this `job` route takes: what answers it. `Output` (the default):
    /// the output of the Job's first container (stdout and stderr, as Serf answers with a
    /// handler's output), once its Pod finishes, cut to Serf's response limit (1 KiB); no
    /// answer when the output is empty or the query's deadline has passed by then (send
    /// such queries with `serf query -timeout`). `JobName`: the Job's `namespace/name`, at
    /// once. `None`: no answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<QueryAnswer>,

    /// Give the route's Jobs a Serf agent to call, as handlers under `serf agent` have
    /// theirs (`serf members`, `serf event`): every container gets `SERF_RPC_ADDR`, and
    /// `SERF_RPC_AUTH` from a Secret in the handler's namespace. The RPC can send events and
    /// queries and make the agent leave: give it to Jobs you would give a shell on a Serf
    /// node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentAccess>,

    /// Report each Job's outcome back into Serf: when a Job of this route completes or
    /// fails, the leader fires a Serf user event, once per Job (recorded on the Job before
    /// it is sent, so a restart in between shows `Interrupted` rather than sending twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

/// The Serf user event that reports a Job's outcome.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("size(self.event) + size(self.payload) <= 512")
        .message("a Serf user event's name and payload hold 512 bytes at most")
)]
pub struct Report {
    /// The user event's name, e.g. `deploy-done`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[^\s,_][^\s,]*$"))]
    pub event: String,

    /// The payload: `$(VAR)` is replaced with `JOB_NAME`, `JOB_NAMESPACE`, `JOB_OUTCOME`
    /// (`Succeeded` or `Failed`), `JOB_REASON` (why it failed, e.g.
    /// `BackoffLimitExceeded`; empty when it succeeded), or a `SERF_*` value of the event that
    /// launched the Job (`SERF_USER_EVENT`, `SERF_PAYLOAD`, ...); `$$(VAR)` is a literal
    /// `$(VAR)`. Default: `$(JOB_NAMESPACE)/$(JOB_NAME) $(JOB_OUTCOME) $(JOB_REASON)`.
    /// Expanded, name and payload must fit Serf's 512 bytes; a report that does not is
    /// not sent, and the route's status says so.
    #[serde(default = "default_report_payload")]
    #[schemars(length(max = 512))]
    pub payload: String,

    /// Let Serf coalesce the report with others of the same name (`serf event
    /// -coalesce`). Default false: every report is delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<bool>,
}

fn default_report_payload() -> String {
    "$(JOB_NAMESPACE)/$(JOB_NAME) $(JOB_OUTCOME) $(JOB_REASON)".into()
}

/// What answers a query taken by a `job` route.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum QueryAnswer {
    /// The Job's output, once its Pod finishes, if that is before the query's deadline.
    #[default]
    Output,
    /// The Job's `namespace/name`, at once.
    JobName,
    /// No answer.
    None,
}

/// A Serf agent for a route's Jobs to call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentAccess {
    /// The agent's RPC address, `host:port` (`SERF_RPC_ADDR`), e.g. the chart's
    /// `serf-operator-rpc.serf-system.svc:7373` when `serf.rpcForJobs` is enabled.
    #[schemars(length(min = 3, max = 253), regex(pattern = r"^[^\s]+:[0-9]{1,5}$"))]
    pub rpc_addr: String,

    /// The Secret (in the handler's namespace) and key holding the agent's RPC auth key
    /// (`SERF_RPC_AUTH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_auth_secret: Option<SecretKey>,
}

/// A key of a Secret in the handler's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What to do with a new event while a Job of the same route is active.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Run Jobs side by side.
    #[default]
    Allow,
    /// Skip the new event while a Job is active (the skip shows in status).
    Forbid,
    /// Delete the active Job, then launch the new one.
    Replace,
}

/// An inline answer to a query.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Respond {
    /// The answer. `$(VAR)` is replaced with the value of a Job-contract variable
    /// (SERF_SELF_NAME, SERF_SELF_ROLE, SERF_TAG_*, SERF_QUERY_NAME, SERF_QUERY_LTIME,
    /// SERF_PAYLOAD) or the operator's POD_NAME / POD_NAMESPACE; `$$(VAR)` is a literal
    /// `$(VAR)`. Serf limits an answer to about 1 KiB.
    #[schemars(length(max = 1024))]
    pub payload: String,
}

/// The observed state of a SerfHandler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerfHandlerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: True when every route is valid; False names each invalid route and its
    /// problem (the valid routes keep working).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of routes in the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_count: Option<i32>,
    /// Per route: how often it matched, launched, answered or skipped, and the latest of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteStatus>,
    /// The Serf members this handler's member filters select.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<MembershipStatus>,
}

/// What one route did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// The route's name.
    pub name: String,
    /// Events that matched the route.
    #[serde(default)]
    pub matched: i64,
    /// Jobs launched.
    #[serde(default)]
    pub jobs_created: i64,
    /// Queries answered.
    #[serde(default)]
    pub answered: i64,
    /// Matching events not acted on (see lastSkipped for why).
    #[serde(default)]
    pub skipped: i64,
    /// The latest event the route acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_matched: Option<LastMatched>,
    /// The latest event the route did not act on, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped: Option<LastSkipped>,
    /// Job outcomes reported into Serf (`report`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reported: i64,
    /// The latest outcome reported, or the latest report that could not be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reported: Option<LastReported>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A Job outcome reported into Serf.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastReported {
    /// The Job.
    pub job: String,
    /// `Succeeded` or `Failed`.
    pub outcome: String,
    /// `Sent`; or why not: `Interrupted` (the operator stopped between recording the
    /// report and sending it; it is not sent again), `TooLarge`, `SendFailed`.
    pub result: String,
    /// The Serf user event, e.g. `deploy-done`.
    pub event: String,
    /// Details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When (RFC 3339).
    pub time: String,
}

/// The latest event a route acted on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastMatched {
    /// The event, e.g. `user:deploy@42` or `member-failed:db-1`.
    pub event: String,
    /// When (RFC 3339).
    pub time: String,
    /// The Job launched, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// The latest event a route did not act on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastSkipped {
    /// The event.
    pub event: String,
    /// Why, in one word: RoleMismatch, SelfTagsMismatch, MembersFiltered,
    /// ConcurrencyForbid, Duplicate, JobCreateFailed, ...
    pub reason: String,
    /// Details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When (RFC 3339).
    pub time: String,
}

/// Serf members as the handler sees them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MembershipStatus {
    /// Members in status alive.
    pub alive: i32,
    /// Members in status failed.
    pub failed: i32,
    /// Members in status left or leaving.
    pub left: i32,
    /// All members counted.
    pub total: i32,
    /// The first members by name (at most 50; `total` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<MemberItem>,
}

/// One Serf member.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberItem {
    /// Node name.
    pub name: String,
    /// Gossip address, `ip:port`.
    pub addr: String,
    /// The `role` tag.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// alive, leaving, left or failed.
    pub status: String,
}
