//! Wire types of the Serf RPC protocol: command names, headers, request and reply bodies.
//!
//! Field names are the agent's (PascalCase, case-sensitive). Byte fields (`Payload`, `Addr`)
//! travel as msgpack `bin`; a nil payload decodes as empty.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The only RPC protocol version the agent speaks.
pub const IPC_VERSION: i32 = 1;

/// Command names, as the agent spells them.
pub(crate) mod cmd {
    pub const HANDSHAKE: &str = "handshake";
    pub const AUTH: &str = "auth";
    pub const EVENT: &str = "event";
    pub const FORCE_LEAVE: &str = "force-leave";
    pub const JOIN: &str = "join";
    pub const MEMBERS: &str = "members";
    pub const MEMBERS_FILTERED: &str = "members-filtered";
    pub const TAGS: &str = "tags";
    pub const STREAM: &str = "stream";
    pub const MONITOR: &str = "monitor";
    pub const STOP: &str = "stop";
    pub const LEAVE: &str = "leave";
    pub const QUERY: &str = "query";
    pub const RESPOND: &str = "respond";
    pub const INSTALL_KEY: &str = "install-key";
    pub const USE_KEY: &str = "use-key";
    pub const REMOVE_KEY: &str = "remove-key";
    pub const LIST_KEYS: &str = "list-keys";
    pub const STATS: &str = "stats";
    pub const GET_COORDINATE: &str = "get-coordinate";
}

/// Agent error strings that are never followed by a body, whatever the command.
pub(crate) mod errs {
    pub const HANDSHAKE_REQUIRED: &str = "Handshake required";
    pub const AUTH_REQUIRED: &str = "Authentication required";
    pub const INVALID_AUTH: &str = "Invalid authentication token";
    pub const UNSUPPORTED_COMMAND: &str = "Unsupported command";

    /// True when an error header for a body-carrying command comes without its body.
    pub fn suppresses_body(message: &str) -> bool {
        matches!(
            message,
            HANDSHAKE_REQUIRED | AUTH_REQUIRED | UNSUPPORTED_COMMAND
        )
    }
}

/// Request header: `{Command, Seq}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RequestHeader<'a> {
    pub command: &'a str,
    pub seq: u64,
}

/// Response header: `{Seq, Error}`. Both keys are always sent by the agent.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ResponseHeader {
    pub seq: u64,
    #[serde(default)]
    pub error: String,
}

/// A strict header, used only to tell an orphan body from a header: exactly `Seq` and
/// `Error`, nothing else.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub(crate) struct StrictHeader {
    #[allow(dead_code)]
    pub seq: u64,
    #[allow(dead_code)]
    pub error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HandshakeRequest {
    pub version: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AuthRequest<'a> {
    pub auth_key: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct EventRequest<'a> {
    pub name: &'a str,
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
    pub coalesce: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ForceLeaveRequest<'a> {
    pub node: &'a str,
    pub prune: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct JoinRequest<'a> {
    pub existing: &'a [String],
    pub replay: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct JoinResponse {
    #[serde(default)]
    pub num: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct MembersFilteredRequest<'a> {
    pub tags: &'a BTreeMap<String, String>,
    pub status: &'a str,
    pub name: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct MembersResponse {
    #[serde(default, deserialize_with = "nil_as_default")]
    pub members: Vec<Member>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TagsRequest<'a> {
    pub tags: &'a BTreeMap<String, String>,
    pub delete_tags: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct StreamRequest<'a> {
    #[serde(rename = "Type")]
    pub kind: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct MonitorRequest<'a> {
    pub log_level: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct StopRequest {
    pub stop: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct QueryRequest<'a> {
    pub filter_nodes: &'a [String],
    pub filter_tags: &'a BTreeMap<String, String>,
    pub request_ack: bool,
    pub relay_factor: u8,
    /// Nanoseconds; 0 lets the agent pick its default.
    pub timeout: i64,
    pub name: &'a str,
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RespondRequest<'a> {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KeyRequest<'a> {
    pub key: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CoordinateRequest<'a> {
    pub node: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CoordinateResponse {
    pub coord: Coordinate,
    #[serde(default)]
    pub ok: bool,
}

/// A Serf member, as `members` and member events report it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Gossip address (IPv4-mapped IPv6 addresses are reported as IPv4).
    #[serde(deserialize_with = "de_addr", serialize_with = "ser_addr")]
    pub addr: IpAddr,
    /// Gossip port.
    #[serde(default)]
    pub port: u16,
    /// The member's tags (`role` is the one Serf hands to handlers as `SERF_SELF_ROLE`).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub tags: BTreeMap<String, String>,
    /// Membership status.
    pub status: MemberStatus,
    /// Lowest memberlist protocol the member understands.
    #[serde(default)]
    pub protocol_min: u8,
    /// Highest memberlist protocol the member understands.
    #[serde(default)]
    pub protocol_max: u8,
    /// Memberlist protocol the member speaks.
    #[serde(default)]
    pub protocol_cur: u8,
    /// Lowest Serf protocol the member understands.
    #[serde(default)]
    pub delegate_min: u8,
    /// Highest Serf protocol the member understands.
    #[serde(default)]
    pub delegate_max: u8,
    /// Serf protocol the member speaks.
    #[serde(default)]
    pub delegate_cur: u8,
}

impl Member {
    /// A member with this identity and state (protocol versions left at 0): for tools and
    /// tests that describe members rather than receive them.
    pub fn new(
        name: impl Into<String>,
        addr: IpAddr,
        port: u16,
        tags: BTreeMap<String, String>,
        status: MemberStatus,
    ) -> Self {
        Member {
            name: name.into(),
            addr,
            port,
            tags,
            status,
            protocol_min: 0,
            protocol_max: 0,
            protocol_cur: 0,
            delegate_min: 0,
            delegate_max: 0,
            delegate_cur: 0,
        }
    }

    /// The member's `role` tag, or `""` (what Serf passes as `SERF_SELF_ROLE`).
    pub fn role(&self) -> &str {
        self.tags.get("role").map(String::as_str).unwrap_or("")
    }
}

/// A member's status as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberStatus {
    /// `alive`
    Alive,
    /// `leaving`
    Leaving,
    /// `left`
    Left,
    /// `failed`
    Failed,
    /// `none`
    None,
    /// A status this client does not know, verbatim.
    Other(String),
}

impl MemberStatus {
    /// The agent's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            MemberStatus::Alive => "alive",
            MemberStatus::Leaving => "leaving",
            MemberStatus::Left => "left",
            MemberStatus::Failed => "failed",
            MemberStatus::None => "none",
            MemberStatus::Other(s) => s,
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "alive" => MemberStatus::Alive,
            "leaving" => MemberStatus::Leaving,
            "left" => MemberStatus::Left,
            "failed" => MemberStatus::Failed,
            "none" => MemberStatus::None,
            other => MemberStatus::Other(other.to_string()),
        }
    }
}

impl fmt::Display for MemberStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MemberStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(MemberStatus::parse(&s))
    }
}

impl Serialize for MemberStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The reply of the keyring commands (`install-key`, `use-key`, `remove-key`, `list-keys`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyResponse {
    /// Per-node messages (errors) from nodes that reported failure.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub messages: BTreeMap<String, String>,
    /// For `list-keys`: each installed key (base64) and how many nodes have it.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub keys: BTreeMap<String, i64>,
    /// Nodes in the cluster.
    #[serde(default)]
    pub num_nodes: i64,
    /// Nodes that answered.
    #[serde(default)]
    pub num_resp: i64,
    /// Nodes that reported an error.
    #[serde(default)]
    pub num_err: i64,
}

/// A network coordinate (Vivaldi) of a node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Coordinate {
    /// The Euclidean part of the coordinate.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub vec: Vec<f64>,
    /// The estimated error.
    #[serde(default)]
    pub error: f64,
    /// The adjustment term.
    #[serde(default)]
    pub adjustment: f64,
    /// The height term.
    #[serde(default)]
    pub height: f64,
}

/// The `stats` reply: section (`agent`, `runtime`, `serf`, `tags`, `event_handlers`) →
/// key → value. Every value is a string, numbers included, as the agent sends them.
pub type Stats = HashMap<String, HashMap<String, String>>;

/// Decodes nil as the type's default (the agent sends nil for empty maps and slices).
pub(crate) fn nil_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Decodes an optional byte payload: bin, str, or nil (empty).
pub(crate) fn payload<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?
        .map(serde_bytes::ByteBuf::into_vec)
        .unwrap_or_default())
}

fn ip_from_bytes<E: de::Error>(b: &[u8]) -> Result<IpAddr, E> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            let v6 = Ipv6Addr::from(a);
            Ok(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        n => Err(E::custom(format!(
            "member address has {n} bytes, expected 4 (IPv4) or 16 (IPv6)"
        ))),
    }
}

fn de_addr<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    struct AddrVisitor;
    impl<'de> Visitor<'de> for AddrVisitor {
        type Value = IpAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IP address as 4 or 16 bytes")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<IpAddr, E> {
            ip_from_bytes(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<IpAddr, E> {
            v.parse()
                .map_err(|_| E::custom(format!("invalid member address {v:?}")))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IpAddr, A::Error> {
            let mut bytes = Vec::with_capacity(16);
            while let Some(b) = seq.next_element::<u8>()? {
                if bytes.len() == 16 {
                    return Err(de::Error::custom("member address longer than 16 bytes"));
                }
                bytes.push(b);
            }
            ip_from_bytes(&bytes)
        }
    }
    d.deserialize_any(AddrVisitor)
}

/// Members serialize their address as text (`"127.0.0.1"`), for JSON and YAML output; the
/// decoder accepts that form as well as the agent's bytes.
fn ser_addr<S: serde::Serializer>(addr: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(addr)
}
