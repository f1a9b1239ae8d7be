//! `SerfService`: Serf members selected by their tags, published as a headless Service with
//! EndpointSlices and/or a ConfigMap listing them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Publishes the Serf members that match a tag selector as Kubernetes service discovery.
///
/// `publish.service` makes a headless Service named as this object, with EndpointSlices of
/// the selected members (alive → ready; leaving or left → terminating; failed → not ready;
/// failed and left members are removed after `removeAfter`), so that
/// `NAME.NAMESPACE.svc` resolves to them. `publish.configMap` makes the ConfigMap
/// `NAME-members` with the members as JSON (`members.json`) and as lines
/// (`members.txt`, `name address:port` for the ready ones). Only the operator that holds
/// the Lease writes; the objects are owned by this one and deleted with it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serf.operator.io",
    version = "v1alpha1",
    kind = "SerfService",
    plural = "serfservices",
    shortname = "ssvc",
    category = "serf",
    namespaced,
    doc = "Publishes the Serf members that match a tag selector as a headless Service with EndpointSlices and/or a ConfigMap.",
    status = "SerfServiceStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Terminating","type":"integer","jsonPath":".status.terminating"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Change","type":"date","jsonPath":".status.lastChange"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new(
        "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message("a SerfService's name is its Service's name: at most 63 characters, lowercase letters, digits and '-', starting with a letter and not ending with '-'")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.publish.service || self.publish.configMap")
        .message("publish at least one of service and configMap")
)]
pub struct SerfServiceSpec {
    /// Which Serf members: those whose tags match.
    #[serde(default)]
    pub selector: MemberSelector,

    /// The members' service ports, 1 to 16, each fixed or read from a tag. A member without
    /// a usable value for every tagged port is left out (counted in `status.skipped`).
    #[x_kube(
        validation = kube::core::Rule::new("self.all(p, self.exists_one(o, o.name == p.name))")
            .message("port names must be unique")
    )]
    #[schemars(length(min = 1, max = 16))]
    pub ports: Vec<ServicePort>,

    /// What to publish.
    #[serde(default)]
    pub publish: Publish,

    /// How long a failed or left member stays listed (not ready) before it is removed, e.g.
    /// `30s`, `5m`, `1h`. Default `1m`. `0s` removes it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub remove_after: Option<String>,
}

/// Which Serf members a SerfService selects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberSelector {
    /// Tag name to an anchored regular expression on its value, e.g. `{role: db}` or
    /// `{role: "db|cache", dc: "eu-.*"}` (as `serf members -tag`). A member lacking a listed
    /// tag does not match. Empty: every member.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// One service port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("has(self.port) != has(self.portTag)")
        .message("a port needs exactly one of port and portTag")
)]
pub struct ServicePort {
    /// The port's name (an IANA service name style label): the EndpointSlice port's name, and
    /// the SRV record `_NAME._PROTOCOL.SERVICE.NAMESPACE.svc`.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The same port number for every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// The member tag holding its port number, e.g. `port` for members tagged `port=5432`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub port_tag: Option<String>,

    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// A port's protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// Kubernetes' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// What a SerfService publishes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Publish {
    /// A headless Service named as the SerfService, with EndpointSlices of the members
    /// (split at 1,000 endpoints). Default true.
    #[serde(default = "yes")]
    pub service: bool,
    /// The ConfigMap `NAME-members`: `members.json` (every listed member: name, address,
    /// port, ports, status, tags) and `members.txt` (`name address:port` per ready member).
    /// Default false.
    #[serde(default)]
    pub config_map: bool,
}

impl Default for Publish {
    fn default() -> Self {
        Publish {
            service: true,
            config_map: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// The observed state of a SerfService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerfServiceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: True when the published objects match the membership; False names the
    /// problem (`InvalidSpec`, `ConfigMapTooLarge`, `WriteFailed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Endpoints ready (members alive).
    #[serde(default)]
    pub ready: i32,
    /// Endpoints terminating (members leaving or left, within `removeAfter`).
    #[serde(default)]
    pub terminating: i32,
    /// Endpoints listed: ready, terminating and failed within `removeAfter`.
    #[serde(default)]
    pub total: i32,
    /// Selected members left out for want of a usable port.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: i32,
    /// EndpointSlices published.
    #[serde(default)]
    pub slices: i32,
    /// When the listed endpoints last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}
