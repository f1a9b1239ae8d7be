//! Typed stream records: events from `stream`, records from `query`, lines from `monitor`.

use std::fmt;

use serde::Deserialize;

use crate::codec;
use crate::error::Error;
use crate::protocol::{Member, nil_as_default, payload};

/// One event from an event stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A user event (`serf event NAME PAYLOAD`).
    User(UserEvent),
    /// A membership change; may carry several members that Serf coalesced.
    Member(MemberEvent),
    /// A query to be answered with [`crate::Client::respond`] on the same connection.
    Query(QueryEvent),
    /// A record whose `Event` kind this client does not know. Surfaced rather than dropped,
    /// so that a newer agent cannot break a consumer.
    Unknown(UnknownEvent),
}

impl Event {
    /// The Serf event type, as `SERF_EVENT` spells it (`user`, `query`, `member-join`, ...).
    pub fn kind(&self) -> &str {
        match self {
            Event::User(_) => "user",
            Event::Query(_) => "query",
            Event::Member(m) => m.kind.as_str(),
            Event::Unknown(u) => &u.kind,
        }
    }

    /// Decodes a stream record body.
    pub fn decode(bytes: &[u8]) -> Result<Event, Error> {
        let raw: RawEvent = codec::decode(bytes, "event record")?;
        let missing = |field: &str| Error::Decode {
            what: "event record",
            message: format!("{} event without {field}", raw.event),
        };
        Ok(match raw.event.as_str() {
            "user" => Event::User(UserEvent {
                ltime: raw.ltime.ok_or_else(|| missing("LTime"))?,
                name: raw.name.clone().ok_or_else(|| missing("Name"))?,
                payload: raw.payload,
                coalesce: raw.coalesce,
            }),
            "query" => Event::Query(QueryEvent {
                id: raw.id.ok_or_else(|| missing("ID"))?,
                ltime: raw.ltime.ok_or_else(|| missing("LTime"))?,
                name: raw.name.clone().ok_or_else(|| missing("Name"))?,
                payload: raw.payload,
            }),
            other => match MemberEventKind::parse(other) {
                Some(kind) => Event::Member(MemberEvent {
                    kind,
                    members: raw.members,
                }),
                None => Event::Unknown(UnknownEvent {
                    kind: other.to_string(),
                    body: codec::decode(bytes, "event record")?,
                }),
            },
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEvent {
    event: String,
    #[serde(default, rename = "LTime")]
    ltime: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "payload")]
    payload: Vec<u8>,
    #[serde(default)]
    coalesce: bool,
    #[serde(default, rename = "ID")]
    id: Option<u64>,
    #[serde(default, deserialize_with = "nil_as_default")]
    members: Vec<Member>,
}

/// A user event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    /// The Lamport time of the event clock (`SERF_USER_LTIME`). Not unique across senders.
    pub ltime: u64,
    /// Event name (`SERF_USER_EVENT`).
    pub name: String,
    /// The payload, any bytes (nil on the wire is empty).
    pub payload: Vec<u8>,
    /// Whether the sender asked for coalescing.
    pub coalesce: bool,
}

/// A query, received on an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryEvent {
    /// The ID to pass to [`crate::Client::respond`]; valid only on the connection that
    /// received it and only until the query's deadline.
    pub id: u64,
    /// The Lamport time of the query clock (`SERF_QUERY_LTIME`).
    pub ltime: u64,
    /// Query name (`SERF_QUERY_NAME`).
    pub name: String,
    /// The query payload.
    pub payload: Vec<u8>,
}

/// A membership event.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberEvent {
    /// Which change.
    pub kind: MemberEventKind,
    /// The members it concerns, with their new status.
    pub members: Vec<Member>,
}

/// The five member event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberEventKind {
    /// `member-join`
    Join,
    /// `member-leave`
    Leave,
    /// `member-failed`
    Failed,
    /// `member-update`
    Update,
    /// `member-reap`
    Reap,
}

impl MemberEventKind {
    /// All kinds, in Serf's order.
    pub const ALL: [MemberEventKind; 5] = [
        MemberEventKind::Join,
        MemberEventKind::Leave,
        MemberEventKind::Failed,
        MemberEventKind::Update,
        MemberEventKind::Reap,
    ];

    /// Serf's spelling (`member-join`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEventKind::Join => "member-join",
            MemberEventKind::Leave => "member-leave",
            MemberEventKind::Failed => "member-failed",
            MemberEventKind::Update => "member-update",
            MemberEventKind::Reap => "member-reap",
        }
    }

    /// Parses Serf's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for MemberEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record with an event kind this client does not know.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownEvent {
    /// The `Event` field.
    pub kind: String,
    /// The whole record.
    pub body: rmpv::Value,
}

/// One record of a query started with [`crate::Client::query`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueryRecord {
    /// A node passed the filters and received the query (only with `request_ack`).
    Ack {
        /// Node name.
        from: String,
    },
    /// A node's answer.
    Response {
        /// Node name.
        from: String,
        /// The answer (a handler's output includes its trailing newline).
        payload: Vec<u8>,
    },
    /// The query's deadline passed; nothing more will come.
    Done,
}

impl QueryRecord {
    pub(crate) fn decode(bytes: &[u8]) -> Result<QueryRecord, Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Raw {
            #[serde(rename = "Type")]
            kind: String,
            #[serde(default)]
            from: String,
            #[serde(default, deserialize_with = "payload")]
            payload: Vec<u8>,
        }
        let raw: Raw = codec::decode(bytes, "query record")?;
        match raw.kind.as_str() {
            "ack" => Ok(QueryRecord::Ack { from: raw.from }),
            "response" => Ok(QueryRecord::Response {
                from: raw.from,
                payload: raw.payload,
            }),
            "done" => Ok(QueryRecord::Done),
            other => Err(Error::Decode {
                what: "query record",
                message: format!("unknown query record type {other:?}"),
            }),
        }
    }
}

pub(crate) fn decode_log(bytes: &[u8]) -> Result<String, Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Raw {
        log: String,
    }
    Ok(codec::decode::<Raw>(bytes, "monitor record")?.log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn captured_user_event_record_decodes() {
        // serf-rpc.md §3.5, the body after the header.
        let body = hex("85 a8 43 6f 61 6c 65 73 63 65 c2 a5 45 76 65 6e 74 a4 75
             73 65 72 a5 4c 54 69 6d 65 01 a4 4e 61 6d 65 a6
             64 65 70 6c 6f 79 a7 50 61 79 6c 6f 61 64 c4 06
             76 31 2e 32 2e 33");
        assert_eq!(
            Event::decode(&body).unwrap(),
            Event::User(UserEvent {
                ltime: 1,
                name: "deploy".into(),
                payload: b"v1.2.3".to_vec(),
                coalesce: false
            })
        );
    }

    #[test]
    fn nil_and_str_payloads_decode() {
        let v = rmpv::Value::Map(vec![
            ("Event".into(), "user".into()),
            ("LTime".into(), 3.into()),
            ("Name".into(), "n".into()),
            ("Payload".into(), rmpv::Value::Nil),
        ]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        let Event::User(u) = Event::decode(&b).unwrap() else {
            panic!()
        };
        assert!(u.payload.is_empty());
        let v = rmpv::Value::Map(vec![
            ("Event".into(), "user".into()),
            ("LTime".into(), 3.into()),
            ("Name".into(), "n".into()),
            ("Payload".into(), "as-str".into()),
        ]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        let Event::User(u) = Event::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(u.payload, b"as-str");
    }

    #[test]
    fn unknown_kind_is_surfaced() {
        let v = rmpv::Value::Map(vec![
            ("Event".into(), "member-teleport".into()),
            ("X".into(), 1.into()),
        ]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        let Event::Unknown(u) = Event::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(u.kind, "member-teleport");
        assert_eq!(u.body, v);
    }

    #[test]
    fn member_addr_forms() {
        for (addr, want) in [
            (rmpv::Value::Binary(vec![127, 0, 0, 1]), "127.0.0.1"),
            (
                rmpv::Value::Binary(vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 9]),
                "10.0.0.9",
            ),
            (
                rmpv::Value::Binary(vec![0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                "fe80::1",
            ),
            (
                rmpv::Value::Array(vec![10.into(), 1.into(), 2.into(), 3.into()]),
                "10.1.2.3",
            ),
        ] {
            let v = rmpv::Value::Map(vec![
                ("Event".into(), "member-join".into()),
                (
                    "Members".into(),
                    rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                        ("Name".into(), "a".into()),
                        ("Addr".into(), addr),
                        ("Port".into(), 7946.into()),
                        ("Tags".into(), rmpv::Value::Map(vec![])),
                        ("Status".into(), "alive".into()),
                    ])]),
                ),
            ]);
            let mut b = Vec::new();
            rmpv::encode::write_value(&mut b, &v).unwrap();
            let Event::Member(m) = Event::decode(&b).unwrap() else {
                panic!()
            };
            assert_eq!(m.members[0].addr.to_string(), want);
        }
        // 5 bytes: an error that says why
        let v = rmpv::Value::Map(vec![
            ("Event".into(), "member-join".into()),
            (
                "Members".into(),
                rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                    ("Name".into(), "a".into()),
                    ("Addr".into(), rmpv::Value::Binary(vec![1, 2, 3, 4, 5])),
                    ("Status".into(), "alive".into()),
                ])]),
            ),
        ]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        let err = Event::decode(&b).unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
    }

    #[test]
    fn captured_query_records_decode() {
        // serf-rpc.md §3.5 bodies
        let mut ack = vec![0x83, 0xa4];
        ack.extend_from_slice(b"From");
        ack.push(0xa5);
        ack.extend_from_slice(b"node2");
        ack.push(0xa7);
        ack.extend_from_slice(b"Payload");
        ack.push(0xc0);
        ack.push(0xa4);
        ack.extend_from_slice(b"Type");
        ack.push(0xa3);
        ack.extend_from_slice(b"ack");
        assert_eq!(
            QueryRecord::decode(&ack).unwrap(),
            QueryRecord::Ack {
                from: "node2".into()
            }
        );
    }
}
