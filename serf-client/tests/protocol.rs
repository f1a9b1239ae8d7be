//! The client against a scripted peer on loopback, for what a healthy agent never sends:
//! malformed bytes, out-of-order and unknown replies, records after `stop`, split frames,
//! late replies, slow consumers and arbitrary bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use rmpv::Value;
use serf_client::codec::{Frame, scan_frame};
use serf_client::{Client, ClientConfig, Error, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The agent side of one connection.
struct Peer {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    async fn read_value(&mut self) -> Value {
        loop {
            if let Frame::Complete(n) = scan_frame(&self.buf).unwrap() {
                let v = rmpv::decode::read_value(&mut &self.buf[..n]).unwrap();
                self.buf.drain(..n);
                return v;
            }
            let mut chunk = [0u8; 4096];
            let n = self.sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads a request header and, when `body`, its body; returns (command, seq, body).
    async fn request(&mut self, body: bool) -> (String, u64, Option<Value>) {
        let h = self.read_value().await;
        let command = get(&h, "Command").as_str().unwrap().to_string();
        let seq = get(&h, "Seq").as_u64().unwrap();
        let b = if body {
            Some(self.read_value().await)
        } else {
            None
        };
        (command, seq, b)
    }

    async fn send(&mut self, values: &[Value]) {
        let mut out = Vec::new();
        for v in values {
            rmpv::encode::write_value(&mut out, v).unwrap();
        }
        self.sock.write_all(&out).await.unwrap();
    }
}

fn get<'a>(map: &'a Value, key: &str) -> &'a Value {
    map.as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key} in {map}"))
}

fn header(seq: u64, error: &str) -> Value {
    Value::Map(vec![
        ("Error".into(), error.into()),
        ("Seq".into(), seq.into()),
    ])
}

fn user_record(ltime: u64, name: &str) -> Value {
    Value::Map(vec![
        ("Coalesce".into(), false.into()),
        ("Event".into(), "user".into()),
        ("LTime".into(), ltime.into()),
        ("Name".into(), name.into()),
        ("Payload".into(), Value::Binary(b"p".to_vec())),
    ])
}

fn members_body(n: usize) -> Value {
    let member = |i: usize| {
        Value::Map(vec![
            ("Addr".into(), Value::Binary(vec![127, 0, 0, 1])),
            ("Name".into(), format!("n{i}").into()),
            ("Port".into(), 7946.into()),
            ("Status".into(), "alive".into()),
            ("Tags".into(), Value::Map(vec![])),
        ])
    };
    Value::Map(vec![(
        "Members".into(),
        Value::Array((0..n).map(member).collect()),
    )])
}

/// Starts a listener, connects a client to it (answering the handshake) and returns both.
async fn pair(config: impl FnOnce(ClientConfig) -> ClientConfig) -> (Client, Peer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut peer = Peer {
            sock,
            buf: Vec::new(),
        };
        let (cmd, seq, body) = peer.request(true).await;
        assert_eq!(cmd, "handshake");
        assert_eq!(get(&body.unwrap(), "Version").as_i64(), Some(1));
        peer.send(&[header(seq, "")]).await;
        peer
    });
    let client = Client::connect(config(ClientConfig::new(addr.to_string())))
        .await
        .unwrap();
    (client, server.await.unwrap())
}

#[tokio::test]
async fn replies_out_of_order_reach_their_callers() {
    let (c, mut peer) = pair(|c| c).await;
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.members().await }
    });
    let (cmd1, seq1, _) = peer.request(false).await;
    let second = tokio::spawn({
        let c = c.clone();
        async move { c.event("e", b"x", false).await }
    });
    let (cmd2, seq2, _) = peer.request(true).await;
    assert_eq!((cmd1.as_str(), cmd2.as_str()), ("members", "event"));
    // Answer the second first, split into single bytes.
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &header(seq2, "")).unwrap();
    rmpv::encode::write_value(&mut bytes, &header(seq1, "")).unwrap();
    rmpv::encode::write_value(&mut bytes, &members_body(2)).unwrap();
    for b in bytes {
        peer.sock.write_all(&[b]).await.unwrap();
        peer.sock.flush().await.unwrap();
    }
    second.await.unwrap().unwrap();
    assert_eq!(first.await.unwrap().unwrap().len(), 2);
}

#[tokio::test]
async fn malformed_bytes_fail_every_waiter_with_a_clear_reason() {
    let (c, mut peer) = pair(|c| c).await;
    let mut stream = {
        let c2 = c.clone();
        let opening = tokio::spawn(async move { c2.stream("user").await });
        let (_, seq, _) = peer.request(true).await;
        peer.send(&[header(seq, "")]).await;
        opening.await.unwrap().unwrap()
    };
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.members().await }
    });
    peer.request(false).await;
    peer.sock.write_all(&[0xc1]).await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::ConnectionClosed { .. }), "{err:?}");
    assert!(text.contains("invalid msgpack marker 0xc1"), "{text}");
    let err = stream.next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("0xc1"), "{err}");
    assert!(stream.next().await.is_none());
    assert!(c.is_closed());
}

#[tokio::test]
async fn a_header_that_is_not_a_header_is_a_protocol_violation() {
    let (c, mut peer) = pair(|c| c).await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.stats().await }
    });
    peer.request(false).await;
    peer.send(&[Value::from("surprise")]).await;
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a response header {Seq, Error}"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_seq_and_orphan_bodies_are_skipped() {
    let (c, mut peer) = pair(|c| c).await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.members().await }
    });
    let (_, seq, _) = peer.request(false).await;
    peer.send(&[
        header(9999, ""), // nobody asked
        members_body(5),  // its orphan body
        header(8888, ""), // another unknown, no body:
        header(seq, ""),  // the real reply follows at once
        members_body(1),
    ])
    .await;
    assert_eq!(waiting.await.unwrap().unwrap().len(), 1);
    assert!(!c.is_closed());
}

#[tokio::test]
async fn records_after_stop_are_consumed() {
    let (c, mut peer) = pair(|c| c).await;
    let opening = tokio::spawn({
        let c = c.clone();
        async move { c.stream("user").await }
    });
    let (cmd, stream_seq, body) = peer.request(true).await;
    assert_eq!(cmd, "stream");
    assert_eq!(get(&body.unwrap(), "Type").as_str(), Some("user"));
    peer.send(&[header(stream_seq, "")]).await;
    let mut stream = opening.await.unwrap().unwrap();
    peer.send(&[header(stream_seq, ""), user_record(1, "a")])
        .await;
    let Event::User(u) = stream.next().await.unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(u.name, "a");

    drop(stream); // sends stop
    let (cmd, stop_seq, body) = peer.request(true).await;
    assert_eq!(cmd, "stop");
    assert_eq!(get(&body.unwrap(), "Stop").as_u64(), Some(stream_seq));
    // Records still in flight, before and after the stop reply.
    peer.send(&[
        header(stream_seq, ""),
        user_record(2, "late"),
        header(stop_seq, ""),
        header(stream_seq, ""),
        user_record(3, "later"),
    ])
    .await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.members().await }
    });
    let (_, seq, _) = peer.request(false).await;
    peer.send(&[header(seq, ""), members_body(3)]).await;
    assert_eq!(waiting.await.unwrap().unwrap().len(), 3);
}

#[tokio::test]
async fn a_late_reply_after_a_timeout_is_read_and_dropped() {
    let (c, mut peer) = pair(|c| c.with_timeout(Duration::from_millis(200))).await;
    let err = {
        let c = c.clone();
        let call = tokio::spawn(async move { c.members().await });
        let _ = peer.request(false).await;
        call.await.unwrap().unwrap_err()
    };
    assert!(
        matches!(
            err,
            Error::Timeout {
                command: "members",
                ..
            }
        ),
        "{err:?}"
    );
    let (seq_late, next) = {
        let c = c.clone();
        let call = tokio::spawn(async move { c.members().await });
        let (_, seq2, _) = peer.request(false).await;
        (seq2 - 1, (call, seq2))
    };
    // The late reply (with its body) arrives first, then the answer to the new call.
    peer.send(&[
        header(seq_late, ""),
        members_body(7),
        header(next.1, ""),
        members_body(2),
    ])
    .await;
    assert_eq!(next.0.await.unwrap().unwrap().len(), 2);
}

#[tokio::test]
async fn a_slow_consumer_is_told_how_much_it_missed() {
    let (c, mut peer) = pair(|c| c.with_stream_capacity(4)).await;
    let opening = tokio::spawn({
        let c = c.clone();
        async move { c.stream("*").await }
    });
    let (_, seq, _) = peer.request(true).await;
    peer.send(&[header(seq, "")]).await;
    let mut stream = opening.await.unwrap().unwrap();
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.push(header(seq, ""));
        burst.push(user_record(i, "burst"));
    }
    peer.send(&burst).await;
    // Let the reader take all of it before the consumer reads anything.
    let probe = tokio::spawn({
        let c = c.clone();
        async move { c.stats().await }
    });
    let (_, pseq, _) = peer.request(false).await;
    peer.send(&[header(pseq, ""), Value::Map(vec![])]).await;
    probe.await.unwrap().unwrap();

    let mut received = 0;
    let mut missed = 0;
    while received + missed < 20 {
        match stream.next().await.unwrap() {
            Ok(_) => received += 1,
            Err(Error::Lagged { missed: n }) => missed += n,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((received, missed), (4, 16));
    assert_eq!(stream.dropped(), 16);
}

#[tokio::test]
async fn closing_mid_message_is_reported() {
    let (c, mut peer) = pair(|c| c).await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.members().await }
    });
    let (_, seq, _) = peer.request(false).await;
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &header(seq, "")).unwrap();
    rmpv::encode::write_value(&mut bytes, &members_body(3)).unwrap();
    bytes.truncate(bytes.len() - 10);
    peer.sock.write_all(&bytes).await.unwrap();
    drop(peer);
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("in the middle of a message"),
        "{err}"
    );
}

#[tokio::test]
async fn undecodable_record_is_an_error_for_that_record_only() {
    let (c, mut peer) = pair(|c| c).await;
    let opening = tokio::spawn({
        let c = c.clone();
        async move { c.stream("*").await }
    });
    let (_, seq, _) = peer.request(true).await;
    peer.send(&[
        header(seq, ""),
        header(seq, ""),
        Value::Map(vec![("Event".into(), "user".into())]), // no LTime, no Name
        header(seq, ""),
        user_record(5, "fine"),
    ])
    .await;
    let mut stream = opening.await.unwrap().unwrap();
    let err = stream.next().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("LTime"), "{err}");
    let Event::User(u) = stream.next().await.unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(u.name, "fine");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Frame::Complete(n)) = scan_frame(&bytes) {
            prop_assert!(n <= bytes.len());
            let _ = Event::decode(&bytes[..n]);
        }
        let _ = Event::decode(&bytes);
    }

    #[test]
    fn truncated_records_are_incomplete_or_errors(cut in 0usize..60, ltime in any::<u64>(), name in ".{0,20}") {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &user_record(ltime, &name)).unwrap();
        let cut = cut.min(bytes.len().saturating_sub(1));
        prop_assert_eq!(scan_frame(&bytes[..cut]).unwrap(), Frame::Incomplete);
        prop_assert!(Event::decode(&bytes[..cut]).is_err());
        prop_assert_eq!(scan_frame(&bytes).unwrap(), Frame::Complete(bytes.len()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a peer sends, a waiting call ends (reply, error or close), never a panic
    /// or a hang.
    #[test]
    fn arbitrary_peer_bytes_end_in_an_error_not_a_panic(noise in proptest::collection::vec(any::<u8>(), 1..256)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (c, mut peer) = pair(|c| c.with_timeout(Duration::from_millis(300))).await;
            let waiting = tokio::spawn({
                let c = c.clone();
                async move { c.members().await }
            });
            peer.request(false).await;
            peer.sock.write_all(&noise).await.unwrap();
            drop(peer);
            let r = waiting.await.expect("no panic in the call");
            if let Ok(members) = r {
                // Only possible when the noise happens to be a valid reply.
                assert!(members.len() < 256);
            }
            assert!(c.members().await.is_err());
        });
    }
}

/// At a query's deadline the agent closes the query's channels, and until its own timer
/// fires its RPC loop sends the zero values it reads from them: acks and responses from no
/// node, dozens under load. They are not answers.
#[tokio::test]
async fn acks_and_responses_from_no_node_are_not_answers() {
    let (c, mut peer) = pair(|c| c).await;
    let asking = tokio::spawn({
        let c = c.clone();
        async move {
            c.query(&serf_client::QueryParams::new("where", Vec::new()))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
        }
    });
    let (cmd, seq, _) = peer.request(true).await;
    assert_eq!(cmd, "query");
    let rec = |kind: &str, from: &str, payload: Option<&[u8]>| {
        Value::Map(vec![
            ("From".into(), from.into()),
            (
                "Payload".into(),
                payload.map_or(Value::Nil, |p| Value::Binary(p.to_vec())),
            ),
            ("Type".into(), kind.into()),
        ])
    };
    let mut frames = vec![header(seq, "")];
    for r in [
        rec("ack", "node1", None),
        rec("response", "node1", Some(b"here")),
        rec("response", "", None),
        rec("ack", "", None),
        rec("response", "", None),
        rec("done", "", None),
    ] {
        frames.push(header(seq, ""));
        frames.push(r);
    }
    peer.send(&frames).await;
    let out = asking.await.unwrap();
    assert_eq!(out.acks, ["node1"]);
    assert_eq!(out.responses, [("node1".to_string(), b"here".to_vec())]);
    assert!(out.complete);
}
