//! Figures for the synthetic agent itself, so a benchmark can tell it is not the bottleneck:
//! memory per member, the time to answer `members` for 50,000, and storms of 10,000
//! `member-failed` records to a client that reads (spread over 10 s, and all at once).
//!
//! `cargo run --release -p serf-testkit --example synthetic_scale`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use serf_client::{Client, ClientConfig, Event};
use serf_testkit::synthetic::{MemberEventKind, SyntheticAgent, SyntheticConfig, SyntheticMember};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MEMBERS: u32 = 50_000;
const STORM: usize = 10_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Sends `members` on a raw connection and reads the reply to its last byte.
async fn raw_members(agent: &SyntheticAgent) -> (Duration, usize) {
    let mut sock = TcpStream::connect(agent.addr()).await.unwrap();
    let mut req = Vec::new();
    let hdr = |c: &str, s: u64| {
        rmpv::Value::Map(vec![("Command".into(), c.into()), ("Seq".into(), s.into())])
    };
    rmpv::encode::write_value(&mut req, &hdr("handshake", 0)).unwrap();
    rmpv::encode::write_value(
        &mut req,
        &rmpv::Value::Map(vec![("Version".into(), 1.into())]),
    )
    .unwrap();
    sock.write_all(&req).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let n = sock.read(&mut buf).await.unwrap();
    assert_eq!(n, 13, "handshake reply");
    let mut req = Vec::new();
    rmpv::encode::write_value(&mut req, &hdr("members", 1)).unwrap();
    let started = Instant::now();
    sock.write_all(&req).await.unwrap();
    let mut got: Vec<u8> = Vec::new();
    loop {
        let n = sock.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
        // Scan only when the socket was drained (a full read means more is waiting).
        if n < buf.len() {
            use serf_client::codec::{Frame, scan_frame};
            if let Ok(Frame::Complete(h)) = scan_frame(&got)
                && let Ok(Frame::Complete(b)) = scan_frame(&got[h..])
            {
                assert_eq!(h + b, got.len());
                return (started.elapsed(), got.len());
            }
        }
    }
}

async fn storm(over: Duration) -> Storm {
    let members = SyntheticMember::numbered("s", 0..STORM as u32, [("role", "web")]);
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let agent = SyntheticAgent::start(
        SyntheticConfig::new("storm")
            .members(members)
            .coalesce(None),
    )
    .await
    .unwrap();
    let client = Client::connect(ClientConfig::new(agent.rpc_addr()))
        .await
        .unwrap();
    let mut stream = client.stream("member-failed").await.unwrap();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut n = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                Ok(Some(Ok(Event::Member(m)))) => n += m.members.len(),
                // The client's own buffer overflowed: it counts what it lost, reading goes on.
                Ok(Some(Err(_))) => {}
                _ => break,
            }
            if n == STORM {
                break;
            }
        }
        (n, stream.dropped())
    });
    agent
        .play_storm(&names, MemberEventKind::Failed, over)
        .await;
    let played = started.elapsed();
    let (received, client_dropped) = reader.await.unwrap();
    Storm {
        played,
        received,
        client_dropped,
        delivered: agent.delivered(),
        dropped: agent.dropped(),
    }
}

struct Storm {
    played: Duration,
    received: usize,
    client_dropped: u64,
    delivered: u64,
    dropped: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Memory: members added in chunks of 1,000, so the input list does not count.
    let agent = SyntheticAgent::start(SyntheticConfig::new("scale").coalesce(None))
        .await
        .unwrap();
    let before = rss_bytes();
    for chunk in 0..MEMBERS / 1000 {
        let range = chunk * 1000..(chunk + 1) * 1000;
        agent.add_members(SyntheticMember::numbered(
            "member-",
            range,
            [("role", "web"), ("dc", "east")],
        ));
    }
    let after = rss_bytes();
    println!(
        "memory: {MEMBERS} members (names like member-12345, two shared tags) take {:.1} MiB \
         of RSS, {} bytes per member (target: 100-200 bytes)",
        after.saturating_sub(before) as f64 / f64::from(1 << 20),
        after.saturating_sub(before) / u64::from(MEMBERS)
    );
    let mut best = Duration::MAX;
    let mut size = 0;
    for _ in 0..3 {
        let (t, n) = raw_members(&agent).await;
        best = best.min(t);
        size = n;
    }
    println!(
        "members answer: {} members, {:.1} MiB, best of 3: {best:?} from request to last byte \
         (target: well under 1 s)",
        MEMBERS + 1,
        size as f64 / f64::from(1 << 20),
    );
    let client = Client::connect(ClientConfig::new(agent.rpc_addr()))
        .await
        .unwrap();
    let started = Instant::now();
    let n = client.members().await.unwrap().len();
    println!(
        "  baseline, same run: serf-client lists and decodes the {n} members in {:?}",
        started.elapsed()
    );
    drop(agent);

    for over in [Duration::from_secs(10), Duration::ZERO] {
        let s = storm(over).await;
        println!(
            "storm of {STORM} member-failed records over {over:?}: played in {:?}; the client \
             received {} (its own buffer dropped {}); written to the socket {}, dropped at the \
             stream {}",
            s.played, s.received, s.client_dropped, s.delivered, s.dropped
        );
    }
}
