//! One RPC connection of the synthetic agent: the request loop (one request at a time, in
//! order, like the agent's `handleClient`), the commands, and the tasks that write stream
//! and query records.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::Regex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::wire::{self, Body, DecodeError, Enc, ValueReader};
use super::{
    Ev, Filter, Inner, Item, QUERY_SIZE_LIMIT, QueryEv, QueryRecord, QueryResponse, StreamReg,
    USER_EVENT_SIZE_LIMIT, lock, signalled,
};

const HANDSHAKE_REQUIRED: &str = "Handshake required";
const UNSUPPORTED_IPC_VERSION: &str = "Unsupported IPC version";
const DUPLICATE_HANDSHAKE: &str = "Handshake already performed";
const AUTH_REQUIRED: &str = "Authentication required";
const INVALID_AUTH: &str = "Invalid authentication token";
const UNSUPPORTED_COMMAND: &str = "Unsupported command";
const INVALID_FILTER: &str = "Invalid event filter";
const STREAM_EXISTS: &str = "Stream with given sequence exists";
const INVALID_QUERY_ID: &str = "No pending queries matching ID";

/// The socket's write side, shared by the request loop and the record writers: each header
/// and its body are written under one lock.
struct Writer {
    w: tokio::sync::Mutex<BufWriter<OwnedWriteHalf>>,
}

impl Writer {
    async fn send(&self, seq: u64, error: &str, body: Option<&[u8]>) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(16 + error.len());
        wire::header(&mut out, seq, error);
        let mut w = self.w.lock().await;
        w.write_all(&out).await?;
        if let Some(b) = body {
            w.write_all(b).await?;
        }
        w.flush().await
    }
}

/// Queries sent to this connection's streams, by the `ID` it gave them.
#[derive(Default)]
struct Queries {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<QueryEv>>>,
}

impl Queries {
    /// Gives a query the next `ID`; it can be answered until its deadline.
    fn register(&self, q: &Arc<QueryEv>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        if q.deadline > now {
            let mut p = lock(&self.pending);
            p.retain(|_, q| q.deadline > now);
            p.insert(id, q.clone());
        }
        id
    }

    fn get(&self, id: u64) -> Option<Arc<QueryEv>> {
        let p = lock(&self.pending);
        p.get(&id).filter(|q| q.deadline > Instant::now()).cloned()
    }
}

struct Conn {
    inner: Arc<Inner>,
    id: u64,
    client: Arc<str>,
    writer: Arc<Writer>,
    reader: ValueReader,
    closed: watch::Sender<bool>,
    version: i64,
    did_auth: bool,
    command: String,
    seq: u64,
    streams: HashSet<u64>,
    queries: Arc<Queries>,
}

/// Serves one connection until the client leaves, a request makes the agent close it, or the
/// agent stops.
pub(super) async fn serve(inner: Arc<Inner>, sock: TcpStream, peer: SocketAddr) {
    let _ = sock.set_nodelay(true);
    let (rd, wr) = sock.into_split();
    let (closed, _) = watch::channel(false);
    let mut conn = Conn {
        id: inner.next_conn_id(),
        client: Arc::from(peer.to_string()),
        writer: Arc::new(Writer {
            w: tokio::sync::Mutex::new(BufWriter::with_capacity(64 * 1024, wr)),
        }),
        reader: ValueReader::new(rd),
        closed,
        version: 0,
        did_auth: false,
        command: String::new(),
        seq: 0,
        streams: HashSet::new(),
        queries: Arc::new(Queries::default()),
        inner,
    };
    let mut shutdown = conn.inner.shutdown.subscribe();
    let result = tokio::select! {
        () = signalled(&mut shutdown) => Ok(()),
        r = conn.run() => r,
    };
    if let Err(e) = result {
        tracing::debug!(client = %conn.client, "agent.ipc: Failed to evaluate request: {e}");
    }
    conn.closed.send_replace(true);
    let id = conn.id;
    lock(&conn.inner.streams).retain(|s| s.conn != id);
}

impl Conn {
    async fn run(&mut self) -> Result<(), String> {
        loop {
            let Some(v) = self.reader.next().await.map_err(|e| e.to_string())? else {
                return Ok(());
            };
            wire::merge_header(&v, &mut self.command, &mut self.seq).map_err(|e| e.to_string())?;
            self.handle().await?;
        }
    }

    async fn body(&mut self) -> Result<rmpv::Value, String> {
        match self.reader.next().await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err("decode failed: EOF".to_string()),
            Err(e) => Err(format!("decode failed: {e}")),
        }
    }

    async fn send(&self, error: &str, body: Option<&[u8]>) -> Result<(), String> {
        self.writer
            .send(self.seq, error, body)
            .await
            .map_err(|e| e.to_string())
    }

    async fn handle(&mut self) -> Result<(), String> {
        let command = self.command.clone();
        if command != "handshake" && self.version == 0 {
            self.send(HANDSHAKE_REQUIRED, None).await?;
            return Err(HANDSHAKE_REQUIRED.to_string());
        }
        if self.inner.auth_key.is_some()
            && !self.did_auth
            && command != "auth"
            && command != "handshake"
        {
            tracing::warn!("agent.ipc: Client sending commands before auth");
            // The body, if any, is not read: it is read as the next header, like the agent.
            return self.send(AUTH_REQUIRED, None).await;
        }
        let v = match command.as_str() {
            "members" | "leave" | "list-keys" | "stats" => rmpv::Value::Nil,
            "handshake" | "auth" | "event" | "force-leave" | "join" | "members-filtered"
            | "tags" | "stream" | "monitor" | "stop" | "query" | "respond" | "install-key"
            | "use-key" | "remove-key" | "get-coordinate" => self.body().await?,
            _ => {
                self.send(UNSUPPORTED_COMMAND, None).await?;
                return Err(format!("command '{command}' not recognized"));
            }
        };
        let body = Body::new(&v).map_err(|e| e.to_string())?;
        let d = |e: DecodeError| e.to_string();
        match command.as_str() {
            "handshake" => {
                let version = body.int("Version").map_err(d)?;
                let error = if !(1..=1).contains(&version) {
                    UNSUPPORTED_IPC_VERSION
                } else if self.version != 0 {
                    DUPLICATE_HANDSHAKE
                } else {
                    self.version = version;
                    ""
                };
                self.send(error, None).await
            }
            "auth" => {
                let key = body.string("AuthKey").map_err(d)?;
                let error = if key == self.inner.auth_key.as_deref().unwrap_or("") {
                    self.did_auth = true;
                    ""
                } else {
                    INVALID_AUTH
                };
                self.send(error, None).await
            }
            "event" => {
                let name = body.string("Name").map_err(d)?;
                let payload = body.bytes("Payload").map_err(d)?;
                let coalesce = body.bool("Coalesce").map_err(d)?;
                let error = match user_event_error(&name, &payload, self.inner.event_time()) {
                    Some(e) => e,
                    None => {
                        self.inner.user_event(&name, &payload, coalesce);
                        String::new()
                    }
                };
                self.send(&error, None).await
            }
            "force-leave" => {
                let node = body.string("Node").map_err(d)?;
                let prune = body.bool("Prune").map_err(d)?;
                self.inner.force_leave(&node, prune);
                self.send("", None).await
            }
            "join" => {
                let mut e = Enc::default();
                e.map(1).str("Num").uint(0);
                self.send("join is not supported by the synthetic agent", Some(&e.0))
                    .await
            }
            "members" => {
                let out = self.inner.encode_members(|_, _| true);
                self.send("", Some(&out)).await
            }
            "members-filtered" => {
                let tags = body.str_map("Tags").map_err(d)?;
                let status = body.string("Status").map_err(d)?;
                let name = body.string("Name").map_err(d)?;
                let anchored = |expr: &str| {
                    Regex::new(&format!("^{expr}$"))
                        .map_err(|e| format!("Failed to compile regex: {e}"))
                };
                let tag_res = tags
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), anchored(v)?)))
                    .collect::<Result<Vec<(String, Regex)>, String>>()?;
                let status_re = anchored(&status)?;
                let name_re = anchored(&name)?;
                let out = self.inner.encode_members(|n, s| {
                    tag_res.iter().all(|(k, re)| {
                        re.is_match(s.tags.map.get(k).map(String::as_str).unwrap_or(""))
                    }) && (status.is_empty() || status_re.is_match(s.status.as_str()))
                        && (name.is_empty() || name_re.is_match(n))
                });
                self.send("", Some(&out)).await
            }
            "tags" => {
                let add = body.str_map("Tags").map_err(d)?;
                let delete = body.str_list("DeleteTags").map_err(d)?;
                let mut tags = lock(&self.inner.self_tags).map.clone();
                tags.retain(|k, _| !delete.contains(k));
                tags.extend(add);
                self.inner.set_self_tags(tags);
                self.send("", None).await
            }
            "stream" => {
                let spec = body.string("Type").map_err(d)?;
                let Some(filters) = Filter::parse(&spec) else {
                    return self.send(INVALID_FILTER, None).await;
                };
                if self.streams.contains(&self.seq) {
                    return self.send(STREAM_EXISTS, None).await;
                }
                // Registered before the ack, so no event played after the client has the ack
                // is missed; written only after it, so the ack comes first, as at the agent.
                let rx = self.register_stream(filters);
                self.send("", None).await?;
                tokio::spawn(stream_records(
                    self.inner.clone(),
                    self.writer.clone(),
                    self.seq,
                    rx,
                    self.queries.clone(),
                    self.closed.subscribe(),
                    self.client.clone(),
                ));
                Ok(())
            }
            "monitor" => {
                let level = body.string("LogLevel").map_err(d)?.to_uppercase();
                let error = if matches!(level.as_str(), "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERR")
                {
                    "monitor is not supported by the synthetic agent".to_string()
                } else {
                    format!("Unknown log level: {level}")
                };
                self.send(&error, None).await
            }
            "stop" => {
                let stop = body.uint("Stop").map_err(d)?;
                if self.streams.remove(&stop) {
                    let id = self.id;
                    lock(&self.inner.streams).retain(|s| !(s.conn == id && s.seq == stop));
                }
                self.send("", None).await
            }
            "leave" => {
                tracing::info!("agent.ipc: Graceful leave triggered");
                self.send("", None).await?;
                self.inner.shut_down();
                Err("the agent left".to_string())
            }
            "install-key" | "use-key" | "remove-key" | "list-keys" => {
                let mut e = Enc::default();
                e.map(5).str("Keys").nil().str("Messages").map(0);
                e.str("NumErr").uint(0).str("NumNodes").uint(0);
                e.str("NumResp").uint(0);
                let error = format!("{command} is not supported by the synthetic agent");
                self.send(&error, Some(&e.0)).await
            }
            "query" => self.query(&body).await,
            "respond" => {
                let id = body.uint("ID").map_err(d)?;
                let payload = body.bytes("Payload").map_err(d)?;
                let error = self.respond(id, payload);
                self.send(&error, None).await
            }
            "stats" => {
                let out = self.stats();
                self.send("", Some(&out)).await
            }
            "get-coordinate" => {
                let _node = body.string("Node").map_err(d)?;
                let mut e = Enc::default();
                e.map(2).str("Coord").map(4);
                e.str("Adjustment").f64(0.0).str("Error").f64(0.0);
                e.str("Height").f64(0.0).str("Vec").nil();
                e.str("Ok").bool(false);
                self.send("", Some(&e.0)).await
            }
            _ => Err(format!("command '{command}' not recognized")),
        }
    }

    fn register_stream(&mut self, filters: Vec<Filter>) -> mpsc::Receiver<Item> {
        let (tx, rx) = mpsc::channel(self.inner.stream_queue);
        self.streams.insert(self.seq);
        lock(&self.inner.streams).push(StreamReg {
            conn: self.id,
            seq: self.seq,
            filters,
            tx,
            client: self.client.clone(),
        });
        rx
    }

    async fn query(&mut self, body: &Body<'_>) -> Result<(), String> {
        let d = |e: DecodeError| e.to_string();
        let filter_nodes = body.str_list("FilterNodes").map_err(d)?;
        let filter_tags = body.str_map("FilterTags").map_err(d)?;
        let request_ack = body.bool("RequestAck").map_err(d)?;
        let _relay = body.uint("RelayFactor").map_err(d)?;
        let timeout = body.int("Timeout").map_err(d)?;
        let name = body.string("Name").map_err(d)?;
        let payload = body.bytes("Payload").map_err(d)?;
        if name.starts_with("_serf_") && !(name == "_serf_ping" && payload.is_empty()) {
            return self
                .send("Queries cannot contain the '_serf_' prefix", None)
                .await;
        }
        let filters_len: usize = filter_nodes.iter().map(|n| n.len() + 2).sum::<usize>()
            + filter_tags
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>();
        // The encoded query message: about 90 bytes of envelope besides these.
        if name.len() + payload.len() + filters_len + 90 > QUERY_SIZE_LIMIT {
            return self
                .send(
                    &format!("query exceeds limit of {QUERY_SIZE_LIMIT} bytes"),
                    None,
                )
                .await;
        }
        let timeout = match u64::try_from(timeout) {
            Ok(ns) if ns > 0 => Duration::from_nanos(ns),
            _ => default_query_timeout(self.inner.alive_count()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline = Instant::now() + timeout;
        let q = Arc::new(QueryEv {
            ltime: self.inner.next_query_time(),
            name,
            payload,
            deadline,
            responded: AtomicBool::new(false),
            origin: Some(tx.clone()),
        });
        self.send("", None).await?;
        tokio::spawn(query_records(
            self.writer.clone(),
            self.seq,
            rx,
            deadline,
            self.closed.subscribe(),
        ));
        // The agent is a member too: it takes part in its own query when the filters pass.
        let own_tags = lock(&self.inner.self_tags).clone();
        let passes = (filter_nodes.is_empty() || filter_nodes.contains(&self.inner.name))
            && filter_tags.iter().all(|(k, re)| {
                Regex::new(re).is_ok_and(|re| {
                    re.is_match(own_tags.map.get(k).map(String::as_str).unwrap_or(""))
                })
            });
        if passes {
            if request_ack {
                let _ = tx.send(QueryRecord {
                    kind: "ack",
                    from: self.inner.name.clone(),
                    payload: Vec::new(),
                });
            }
            self.inner.dispatch(&Ev::Query(q));
        }
        Ok(())
    }

    fn respond(&self, id: u64, payload: Vec<u8>) -> String {
        let Some(q) = self.queries.get(id) else {
            return INVALID_QUERY_ID.to_string();
        };
        // The encoded response message: type byte, {LTime, ID (uint32), From, Flags, Payload}.
        let size = 1
            + 1
            + 6
            + uint_len(q.ltime)
            + 3
            + 5
            + 5
            + str_len(&self.inner.name)
            + 6
            + 1
            + 8
            + bin_len(payload.len());
        if size > QUERY_SIZE_LIMIT {
            return format!(
                "failed to respond to key query: response exceeds limit of {QUERY_SIZE_LIMIT} bytes"
            );
        }
        if q.responded.swap(true, Ordering::AcqRel) {
            return "failed to respond to key query: response already sent".to_string();
        }
        if let Some(origin) = &q.origin {
            let _ = origin.send(QueryRecord {
                kind: "response",
                from: self.inner.name.clone(),
                payload: payload.clone(),
            });
        }
        lock(&self.inner.responses).push(QueryResponse {
            query: q.name.clone(),
            ltime: q.ltime,
            id,
            from: self.inner.name.clone(),
            payload,
        });
        String::new()
    }

    fn stats(&self) -> Vec<u8> {
        let tags = lock(&self.inner.self_tags).clone();
        let serf = self.inner.serf_stats();
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string();
        let goroutines = (lock(&self.inner.streams).len() + 1).to_string();
        let mut e = Enc::with_capacity(512);
        e.map(5);
        e.str("agent")
            .str_map(1, [("name", self.inner.name.as_str())]);
        e.str("event_handlers").map(0);
        e.str("runtime").str_map(
            6,
            [
                ("arch", arch),
                ("cpu_count", cpus.as_str()),
                ("goroutines", goroutines.as_str()),
                ("max_procs", cpus.as_str()),
                ("os", std::env::consts::OS),
                ("version", "synthetic"),
            ],
        );
        e.str("serf")
            .str_map(serf.len(), serf.iter().map(|(k, v)| (*k, v.as_str())));
        e.str("tags").raw(&tags.encoded);
        e.0
    }
}

impl Inner {
    fn event_time(&self) -> u64 {
        lock(&self.state).event_clock
    }
}

/// The agent's `UserEvent` size checks: the name and payload before encoding, then the
/// encoded gossip message (a type byte and `{LTime, Name, Payload, CC}`).
fn user_event_error(name: &str, payload: &[u8], ltime: u64) -> Option<String> {
    let before = name.len() + payload.len();
    if before > USER_EVENT_SIZE_LIMIT {
        return Some(format!(
            "user event exceeds configured limit of {USER_EVENT_SIZE_LIMIT} bytes before encoding"
        ));
    }
    let encoded =
        1 + 1 + 6 + uint_len(ltime) + 5 + str_len(name) + 8 + bin_len(payload.len()) + 3 + 1;
    if encoded > USER_EVENT_SIZE_LIMIT {
        return Some(format!(
            "encoded user event exceeds configured limit of {USER_EVENT_SIZE_LIMIT} bytes after encoding"
        ));
    }
    None
}

fn uint_len(v: u64) -> usize {
    match v {
        0..=127 => 1,
        128..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn str_len(s: &str) -> usize {
    s.len()
        + match s.len() {
            0..=31 => 1,
            32..=0xff => 2,
            0x100..=0xffff => 3,
            _ => 5,
        }
}

fn bin_len(n: usize) -> usize {
    n + match n {
        0..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// `GossipInterval (200 ms) × QueryTimeoutMult (16) × ceil(log10(N+1))`.
fn default_query_timeout(alive: usize) -> Duration {
    let scale = ((alive as f64) + 1.0).log10().ceil().max(1.0);
    Duration::from_millis(200 * 16).mul_f64(scale)
}

/// Writes one stream's queued records: each batch under one lock of the socket, flushed once.
async fn stream_records(
    inner: Arc<Inner>,
    writer: Arc<Writer>,
    seq: u64,
    mut rx: mpsc::Receiver<Item>,
    queries: Arc<Queries>,
    mut closed: watch::Receiver<bool>,
    client: Arc<str>,
) {
    let mut hdr = Vec::new();
    wire::header(&mut hdr, seq, "");
    loop {
        let first = tokio::select! {
            () = signalled(&mut closed) => return,
            item = rx.recv() => match item {
                Some(i) => i,
                None => return,
            },
        };
        let batch = async {
            let mut w = writer.w.lock().await;
            let mut n = 0u64;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                w.write_all(&hdr).await?;
                match item {
                    Item::Body(b) => w.write_all(&b).await?,
                    Item::Query(q) => w.write_all(&encode_query(&q, &queries)).await?,
                }
                n += 1;
                if n < 4096 {
                    next = rx.try_recv().ok();
                }
            }
            w.flush().await?;
            Ok::<u64, std::io::Error>(n)
        };
        let result = tokio::select! {
            () = signalled(&mut closed) => return,
            r = batch => r,
        };
        match result {
            Ok(n) => {
                inner.delivered.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("agent.ipc: Failed to stream event to ipc.client: {client}: {e}");
                return;
            }
        }
    }
}

fn encode_query(q: &Arc<QueryEv>, queries: &Queries) -> Vec<u8> {
    let id = queries.register(q);
    let mut e = Enc::with_capacity(64 + q.name.len() + q.payload.len());
    e.map(5)
        .str("Event")
        .str("query")
        .str("ID")
        .uint(id)
        .str("LTime")
        .uint(q.ltime)
        .str("Name")
        .str(&q.name)
        .str("Payload")
        .payload(&q.payload);
    e.0
}

/// Writes a `query` command's records: acks and responses as they come, `done` at the
/// deadline (never earlier, like the agent).
async fn query_records(
    writer: Arc<Writer>,
    seq: u64,
    mut rx: mpsc::UnboundedReceiver<QueryRecord>,
    deadline: Instant,
    mut closed: watch::Receiver<bool>,
) {
    let record = |r: &QueryRecord| {
        let mut e = Enc::with_capacity(32 + r.from.len() + r.payload.len());
        e.map(3)
            .str("From")
            .str(&r.from)
            .str("Payload")
            .payload(&r.payload)
            .str("Type")
            .str(r.kind);
        e.0
    };
    let mut open = true;
    loop {
        let next = async {
            if open {
                rx.recv().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            () = signalled(&mut closed) => return,
            () = tokio::time::sleep_until(deadline) => {
                let done = QueryRecord { kind: "done", from: String::new(), payload: Vec::new() };
                let _ = writer.send(seq, "", Some(&record(&done))).await;
                return;
            }
            r = next => match r {
                Some(r) => {
                    if writer.send(seq, "", Some(&record(&r))).await.is_err() {
                        return;
                    }
                }
                None => open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits_match_the_live_figures() {
        // serf-rpc.md §8.1: a 1-char name takes a payload of at most 479 bytes (LTime ~250).
        assert!(user_event_error("x", &[0; 479], 300).is_none());
        assert!(user_event_error("x", &[0; 480], 300).is_some());
        assert!(
            user_event_error("x", &[0; 600], 1)
                .unwrap()
                .contains("before encoding")
        );
        assert_eq!(
            default_query_timeout(3),
            Duration::from_millis(3200),
            "3.2 s below 10 nodes"
        );
        assert_eq!(default_query_timeout(50), Duration::from_millis(6400));
    }
}
