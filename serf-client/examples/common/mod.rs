//! Helpers shared by the examples: JSON rendering of events and members.
#![allow(dead_code)]

use base64::Engine as _;

use serde_json::{Value, json};
use serf_client::{Event, Member};

/// A payload as JSON: text when it is UTF-8, otherwise base64 under `payload_base64`.
pub fn payload_fields(payload: &[u8]) -> Value {
    match std::str::from_utf8(payload) {
        Ok(s) => json!({ "payload": s }),
        Err(_) => json!({ "payload_base64": base64(payload) }),
    }
}

/// A member as JSON.
pub fn member_json(m: &Member) -> Value {
    json!({
        "name": m.name,
        "addr": format!("{}:{}", m.addr, m.port),
        "status": m.status.as_str(),
        "tags": m.tags,
    })
}

/// An event as one JSON object.
pub fn event_json(ev: &Event) -> Value {
    let mut v = match ev {
        Event::User(u) => {
            json!({ "event": "user", "name": u.name, "ltime": u.ltime, "coalesce": u.coalesce })
        }
        Event::Query(q) => {
            json!({ "event": "query", "name": q.name, "ltime": q.ltime, "id": q.id })
        }
        Event::Member(m) => json!({
            "event": m.kind.as_str(),
            "members": m.members.iter().map(member_json).collect::<Vec<_>>(),
        }),
        Event::Unknown(u) => json!({ "event": u.kind, "raw": u.body.to_string() }),
        _ => json!({ "event": ev.kind() }),
    };
    let payload = match ev {
        Event::User(u) => Some(&u.payload),
        Event::Query(q) => Some(&q.payload),
        _ => None,
    };
    if let (Some(p), Some(obj)) = (payload, v.as_object_mut())
        && let Value::Object(extra) = payload_fields(p)
    {
        obj.extend(extra);
    }
    v
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
