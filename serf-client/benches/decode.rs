//! Decoding benchmarks on bytes recorded from a real Serf agent (see `data/README.md`).
//!
//! - `user_events`: the 200-event `stream` capture, split with [`scan_frame`] into response
//!   headers and event records, each header decoded (as the client's reader does to route
//!   it) and each record decoded with [`Event::decode`]. `scan_only` measures the framing
//!   alone.
//! - `members`: a `members` reply (header + body) with 3 recorded members and with 500
//!   members built from them, framed with [`scan_frame`] and decoded into [`Member`]s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::Deserialize;
use serf_client::codec::{Frame, scan_frame};
use serf_client::{Event, Member};

static USER_EVENTS: &[u8] = include_bytes!("data/user-events.bin");
static MEMBERS_3: &[u8] = include_bytes!("data/members-3.bin");
static MEMBERS_500: &[u8] = include_bytes!("data/members-500.bin");

const USER_EVENT_COUNT: usize = 200;

/// A response header, as the client's reader decodes it to find the waiting call.
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(rename = "Seq")]
    seq: u64,
    #[serde(rename = "Error", borrow)]
    error: &'a str,
}

/// A `members` reply body.
#[derive(Deserialize)]
struct MembersBody {
    #[serde(rename = "Members")]
    members: Vec<Member>,
}

/// The length of the complete msgpack value at the start of `buf`.
fn frame_len(buf: &[u8]) -> usize {
    match scan_frame(buf).expect("recorded bytes are msgpack") {
        Frame::Complete(n) => n,
        Frame::Incomplete => panic!("recorded bytes end inside a value"),
    }
}

fn decode_header(bytes: &[u8]) -> Header<'_> {
    rmp_serde::from_slice(bytes).expect("response header")
}

/// Frames and decodes every header + event record pair; returns the events.
fn decode_stream(mut buf: &[u8]) -> Vec<Event> {
    let mut events = Vec::with_capacity(USER_EVENT_COUNT);
    while !buf.is_empty() {
        let n = frame_len(buf);
        let header = decode_header(&buf[..n]);
        black_box((header.seq, header.error));
        buf = &buf[n..];
        let n = frame_len(buf);
        events.push(Event::decode(&buf[..n]).expect("event record"));
        buf = &buf[n..];
    }
    events
}

/// Frames every value without decoding; returns how many there were.
fn scan_stream(mut buf: &[u8]) -> usize {
    let mut count = 0;
    while !buf.is_empty() {
        buf = &buf[frame_len(buf)..];
        count += 1;
    }
    count
}

/// Frames and decodes one `members` reply (header, then body).
fn decode_members(buf: &[u8]) -> Vec<Member> {
    let n = frame_len(buf);
    let header = decode_header(&buf[..n]);
    assert!(header.error.is_empty());
    let body = &buf[n..];
    let m = frame_len(body);
    assert_eq!(n + m, buf.len(), "one header and one body");
    rmp_serde::from_slice::<MembersBody>(&body[..m])
        .expect("members body")
        .members
}

/// Checks once, before measuring, that the fixtures decode to what was recorded.
fn check_fixtures() {
    let events = decode_stream(USER_EVENTS);
    assert_eq!(events.len(), USER_EVENT_COUNT);
    assert_eq!(scan_stream(USER_EVENTS), 2 * USER_EVENT_COUNT);
    let users: Vec<_> = events
        .iter()
        .map(|e| match e {
            Event::User(u) => u,
            other => panic!("not a user event: {other:?}"),
        })
        .collect();
    assert!(users.iter().all(|u| !u.coalesce));
    assert!(users.iter().any(|u| u.payload.is_empty()));
    assert!(
        users
            .iter()
            .any(|u| std::str::from_utf8(&u.payload).is_err())
    );

    let three = decode_members(MEMBERS_3);
    assert_eq!(three.len(), 3);

    let members = decode_members(MEMBERS_500);
    assert_eq!(members.len(), 500);
    assert_eq!(members[0].name, "node-000");
    assert_eq!(members[499].name, "node-499");
    assert!(members.iter().all(|m| m.addr.is_ipv4() && m.port >= 7946));
}

fn user_events(c: &mut Criterion) {
    check_fixtures();
    let mut g = c.benchmark_group("user_events");
    g.throughput(Throughput::ElementsAndBytes {
        elements: USER_EVENT_COUNT as u64,
        bytes: USER_EVENTS.len() as u64,
    });
    g.bench_function("scan_and_decode_200", |b| {
        b.iter(|| decode_stream(black_box(USER_EVENTS)))
    });
    g.bench_function("scan_only_200", |b| {
        b.iter(|| scan_stream(black_box(USER_EVENTS)))
    });
    g.finish();
}

fn members(c: &mut Criterion) {
    let mut g = c.benchmark_group("members");
    for (name, bytes, count) in [
        ("decode_3", MEMBERS_3, 3u64),
        ("decode_500", MEMBERS_500, 500),
    ] {
        g.throughput(Throughput::ElementsAndBytes {
            elements: count,
            bytes: bytes.len() as u64,
        });
        g.bench_function(name, |b| b.iter(|| decode_members(black_box(bytes))));
    }
    g.finish();
}

criterion_group!(benches, user_events, members);
criterion_main!(benches);
