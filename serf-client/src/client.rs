//! The RPC connection: one socket shared by concurrent calls and streams, matched by `Seq`,
//! read by one task and written by another.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::codec::{self, Frame, scan_frame};
use crate::error::{Error, ErrorBody, Result};
use crate::event::{Event, QueryRecord, decode_log};
use crate::filter::EventFilter;
use crate::protocol::{self, KeyResponse, Member, Stats, cmd, errs};

/// The agent's default RPC address, as the `serf` CLI uses it.
pub const DEFAULT_RPC_ADDR: &str = "127.0.0.1:7373";

/// Serf refuses user events over 9 KiB even when its configured limit is raised; the
/// client refuses them before sending.
pub const USER_EVENT_HARD_LIMIT: usize = 9 * 1024;

/// How to reach and talk to an agent.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of the agent's RPC listener.
    pub addr: String,
    /// The RPC auth key (`rpc_auth` in the agent's config file), if the agent has one.
    pub auth: Option<String>,
    /// Deadline for connecting and for each call's reply. Default 10 s, like the Go client.
    pub timeout: Duration,
    /// Records each stream buffers for a slow consumer before it counts them as dropped.
    /// Default 4096 (the agent itself buffers 512 per stream).
    pub stream_capacity: usize,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("addr", &self.addr)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("stream_capacity", &self.stream_capacity)
            .finish()
    }
}

impl ClientConfig {
    /// A config for `addr` (`host:port`), no auth, default timeouts.
    pub fn new(addr: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            auth: None,
            timeout: Duration::from_secs(10),
            stream_capacity: 4096,
        }
    }

    /// Like the `serf` CLI: `SERF_RPC_ADDR` (default `127.0.0.1:7373`) and `SERF_RPC_AUTH`.
    pub fn from_env() -> Self {
        let addr = std::env::var("SERF_RPC_ADDR")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_RPC_ADDR.to_string());
        let mut cfg = Self::new(addr);
        cfg.auth = std::env::var("SERF_RPC_AUTH")
            .ok()
            .filter(|s| !s.is_empty());
        cfg
    }

    /// Sets the RPC auth key.
    pub fn with_auth(mut self, key: impl Into<String>) -> Self {
        self.auth = Some(key.into());
        self
    }

    /// Sets the connect and call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the per-stream buffer.
    pub fn with_stream_capacity(mut self, capacity: usize) -> Self {
        self.stream_capacity = capacity.max(1);
        self
    }
}

/// Filters for [`Client::members_filtered`]. Every regex is anchored (`^…$`) by the agent;
/// an empty string matches everything.
#[derive(Debug, Clone, Default)]
pub struct MembersFilter {
    /// Tag name → regex on the tag's value.
    pub tags: BTreeMap<String, String>,
    /// Regex on the status (`alive`, `failed`, ...).
    pub status: String,
    /// Regex on the node name.
    pub name: String,
}

/// A query to send with [`Client::query`].
#[derive(Debug, Clone, Default)]
pub struct QueryParams {
    /// Query name; must not start with `_serf_`.
    pub name: String,
    /// Payload (at most about 1 KiB together with the name and filters, by default).
    pub payload: Vec<u8>,
    /// Only these nodes receive the query (empty: all).
    pub filter_nodes: Vec<String>,
    /// Tag name → regex; unlike members-filtered, these match anywhere in the value.
    pub filter_tags: BTreeMap<String, String>,
    /// Ask receiving nodes to acknowledge.
    pub request_ack: bool,
    /// Extra nodes that relay each answer (0: direct only).
    pub relay_factor: u8,
    /// The query's deadline; `None` lets the agent choose (3.2 s for fewer than 10 nodes).
    pub timeout: Option<Duration>,
}

impl QueryParams {
    /// A query named `name` with `payload`, no filters, acks requested.
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        QueryParams {
            name: name.into(),
            payload: payload.into(),
            request_ack: true,
            ..Default::default()
        }
    }
}

/// An async Serf RPC client: one TCP connection to one agent.
///
/// Cloning is cheap and shares the connection; calls from several tasks run concurrently and
/// are matched to their replies by `Seq`. The connection closes when the last clone and the
/// last stream opened on it are dropped.
///
/// # Guarantees
/// - Every call either gets its reply, fails with [`Error::Timeout`] after
///   [`ClientConfig::timeout`], or fails with [`Error::ConnectionClosed`] as soon as the
///   connection breaks.
/// - Calls are cancel-safe: dropping a call's future never corrupts the connection (the request
///   is written whole by the writer task, and a late reply is read and discarded).
/// - The agent serves the requests of one connection one at a time, in order; a slow `join`
///   delays the calls behind it.
///
/// # Caveats
/// A tokio runtime must be running: [`Client::connect`] spawns the reader and writer tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .field("closed", &self.is_closed())
            .finish()
    }
}

struct Inner {
    addr: String,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    tasks: [AbortHandle; 2],
    timeout: Duration,
    stream_capacity: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close(Error::closed("the client was dropped"));
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// State shared with the reader and writer tasks.
struct Shared {
    state: Mutex<State>,
    next_seq: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    closed: Option<Error>,
}

/// What the reader expects for a `Seq`.
enum Pending {
    /// A call waiting for one header and, when `expects_body`, one body.
    Unary {
        expects_body: bool,
        tx: oneshot::Sender<Result<Reply>>,
    },
    /// An open stream, monitor or query. `ack` is `Some` until the first header.
    Stream {
        ack: Option<oneshot::Sender<Result<()>>>,
        tx: mpsc::Sender<Bytes>,
        missed: Arc<AtomicU64>,
        query: bool,
    },
    /// A stream whose handle is gone: records may still arrive and are read and dropped.
    Stopped { acked: bool },
}

/// A unary reply: the header's error text and the body, if one followed.
struct Reply {
    error: String,
    body: Option<Bytes>,
}

/// What the next value on the wire is.
enum Expect {
    Header,
    UnaryBody(oneshot::Sender<Result<Reply>>, String),
    StreamBody(u64),
    Discard,
    /// After a header for an unknown `Seq`: a header, or an orphan body to drop.
    HeaderOrOrphan,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters more than losing the connection, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, seq: u64, p: Pending) -> Result<()> {
        let mut st = self.lock();
        if let Some(e) = &st.closed {
            return Err(e.clone());
        }
        st.pending.insert(seq, p);
        Ok(())
    }

    fn closed_error(&self) -> Option<Error> {
        self.lock().closed.clone()
    }

    /// Fails every waiting call and ends every stream. Idempotent: the first reason wins.
    fn close(&self, reason: Error) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            let reason = match reason {
                e @ Error::ConnectionClosed { .. } => e,
                other => Error::closed(other.to_string()),
            };
            st.closed = Some(reason);
            std::mem::take(&mut st.pending)
        };
        let Some(err) = self.closed_error() else {
            return;
        };
        for (_, p) in pending {
            match p {
                Pending::Unary { tx, .. } => {
                    let _ = tx.send(Err(err.clone()));
                }
                Pending::Stream { ack: Some(ack), .. } => {
                    let _ = ack.send(Err(err.clone()));
                }
                // Dropping the sender ends the stream; its handle reports `closed`.
                Pending::Stream { ack: None, .. } | Pending::Stopped { .. } => {}
            }
        }
    }

    fn on_frame(&self, expect: Expect, frame: Bytes) -> Result<Expect> {
        match expect {
            Expect::Header => self.on_header(&frame),
            Expect::HeaderOrOrphan => {
                if codec::decode::<protocol::StrictHeader>(&frame, "header").is_ok() {
                    self.on_header(&frame)
                } else {
                    tracing::debug!(len = frame.len(), "dropped an orphan body");
                    Ok(Expect::Header)
                }
            }
            Expect::UnaryBody(tx, error) => {
                let _ = tx.send(Ok(Reply {
                    error,
                    body: Some(frame),
                }));
                Ok(Expect::Header)
            }
            Expect::StreamBody(seq) => {
                self.deliver(seq, frame);
                Ok(Expect::Header)
            }
            Expect::Discard => Ok(Expect::Header),
        }
    }

    fn on_header(&self, frame: &[u8]) -> Result<Expect> {
        let h: protocol::ResponseHeader = rmp_serde::from_slice(frame).map_err(|e| {
            Error::Protocol(format!("expected a response header {{Seq, Error}}: {e}"))
        })?;
        let mut st = self.lock();
        let Some(entry) = st.pending.get_mut(&h.seq) else {
            tracing::warn!(seq = h.seq, error = %h.error, "reply for an unknown seq");
            return Ok(Expect::HeaderOrOrphan);
        };
        match entry {
            Pending::Unary { expects_body, .. } => {
                let expects_body = *expects_body && !errs::suppresses_body(&h.error);
                let Some(Pending::Unary { tx, .. }) = st.pending.remove(&h.seq) else {
                    return Ok(Expect::Header);
                };
                if expects_body {
                    Ok(Expect::UnaryBody(tx, h.error))
                } else {
                    let _ = tx.send(Ok(Reply {
                        error: h.error,
                        body: None,
                    }));
                    Ok(Expect::Header)
                }
            }
            Pending::Stream { ack, .. } => match ack.take() {
                Some(ack) if h.error.is_empty() => {
                    let _ = ack.send(Ok(()));
                    Ok(Expect::Header)
                }
                Some(ack) => {
                    st.pending.remove(&h.seq);
                    let _ = ack.send(Err(Error::Agent {
                        command: "stream",
                        message: h.error,
                        body: None,
                    }));
                    Ok(Expect::Header)
                }
                None => Ok(Expect::StreamBody(h.seq)),
            },
            Pending::Stopped { acked } => {
                if *acked {
                    Ok(Expect::Discard)
                } else {
                    *acked = true;
                    Ok(Expect::Header)
                }
            }
        }
    }

    fn deliver(&self, seq: u64, frame: Bytes) {
        let mut st = self.lock();
        let done = match st.pending.get_mut(&seq) {
            Some(Pending::Stream {
                tx, missed, query, ..
            }) => {
                let done = *query && is_query_done(&frame);
                match tx.try_send(frame) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        missed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        st.pending.insert(seq, Pending::Stopped { acked: true });
                        return;
                    }
                }
                done
            }
            _ => false,
        };
        if done {
            st.pending.remove(&seq);
        }
    }
}

fn is_query_done(frame: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(rename = "Type", default)]
        kind: String,
    }
    rmp_serde::from_slice::<T>(frame).is_ok_and(|t| t.kind == "done")
}

async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>) {
    let reason = match read_frames(&mut rd, &shared).await {
        Ok(()) => Error::closed("the agent closed the connection"),
        Err(e) => e,
    };
    tracing::debug!(%reason, "serf rpc connection closed");
    shared.close(reason);
}

async fn read_frames(rd: &mut OwnedReadHalf, shared: &Shared) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut expect = Expect::Header;
    loop {
        let frame = loop {
            match scan_frame(&buf)? {
                Frame::Complete(n) => break buf.split_to(n).freeze(),
                Frame::Incomplete => {
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(64 * 1024);
                    }
                    if rd.read_buf(&mut buf).await? == 0 {
                        return if buf.is_empty() {
                            Ok(())
                        } else {
                            Err(Error::closed(format!(
                                "the agent closed the connection in the middle of a message \
                                 ({} bytes buffered)",
                                buf.len()
                            )))
                        };
                    }
                }
            }
        };
        expect = shared.on_frame(expect, frame)?;
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(mut out) = rx.recv().await {
        while out.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => out.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&out).await {
            shared.close(Error::from(e));
            return;
        }
    }
    let _ = wr.shutdown().await;
}

impl Client {
    /// Connects, performs the handshake and, when the config has a key, authenticates.
    ///
    /// # Errors
    /// [`Error::Io`] when the agent cannot be reached, [`Error::Timeout`] when it does not
    /// answer in time, [`Error::Auth`] when the key is refused.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let stream = tokio::time::timeout(config.timeout, TcpStream::connect(&config.addr))
            .await
            .map_err(|_| Error::Timeout {
                command: "connect",
                after: config.timeout,
            })?
            .map_err(|e| {
                Error::Io(Arc::new(std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to serf agent at {}: {e}", config.addr),
                )))
            })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            next_seq: AtomicU64::new(0),
        });
        let (wtx, wrx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(rd, shared.clone())).abort_handle();
        let writer = tokio::spawn(write_loop(wr, wrx, shared.clone())).abort_handle();
        let client = Client {
            inner: Arc::new(Inner {
                addr: config.addr.clone(),
                shared,
                writer: wtx,
                tasks: [reader, writer],
                timeout: config.timeout,
                stream_capacity: config.stream_capacity.max(1),
            }),
        };
        client.handshake().await?;
        if let Some(key) = &config.auth {
            client.auth(key).await?;
        }
        Ok(client)
    }

    /// [`Client::connect`] with [`ClientConfig::from_env`].
    pub async fn connect_env() -> Result<Client> {
        Self::connect(ClientConfig::from_env()).await
    }

    /// The agent address this client is connected to.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// True once the connection is closed; every call then fails at once.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed_error().is_some()
    }

    fn next_seq(&self) -> u64 {
        self.inner.shared.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, frame: Vec<u8>) -> Result<()> {
        self.inner.writer.send(frame).map_err(|_| {
            self.inner
                .shared
                .closed_error()
                .unwrap_or_else(|| Error::closed("the writer task has stopped"))
        })
    }

    /// Sends one request and waits for its reply. A non-empty error header becomes an error,
    /// with the body decoded by `on_error_body` where the command sends one.
    async fn call<B: Serialize>(
        &self,
        command: &'static str,
        body: Option<&B>,
        expects_body: bool,
    ) -> Result<Option<Bytes>> {
        let seq = self.next_seq();
        let frame = codec::encode_request(command, seq, body)?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .shared
            .register(seq, Pending::Unary { expects_body, tx })?;
        self.send(frame)?;
        let reply = match tokio::time::timeout(self.inner.timeout, rx).await {
            Err(_) => {
                return Err(Error::Timeout {
                    command,
                    after: self.inner.timeout,
                });
            }
            Ok(Err(_)) => {
                return Err(self
                    .inner
                    .shared
                    .closed_error()
                    .unwrap_or_else(|| Error::closed("the reader task has stopped")));
            }
            Ok(Ok(reply)) => reply?,
        };
        if reply.error.is_empty() {
            return Ok(reply.body);
        }
        Err(self.agent_error(command, reply))
    }

    fn agent_error(&self, command: &'static str, reply: Reply) -> Error {
        match reply.error.as_str() {
            errs::AUTH_REQUIRED | errs::INVALID_AUTH => {
                if reply.error == errs::AUTH_REQUIRED {
                    // The agent reads the body of a refused request as the next header and
                    // answers it again; the connection cannot be trusted after this.
                    self.inner.shared.close(Error::closed(
                        "the agent requires authentication (set the RPC auth key)",
                    ));
                }
                Error::Auth(reply.error)
            }
            _ => {
                let body = reply.body.and_then(|b| match command {
                    cmd::JOIN => codec::decode::<protocol::JoinResponse>(&b, "join reply")
                        .ok()
                        .map(|j| Box::new(ErrorBody::Join { num: j.num })),
                    cmd::INSTALL_KEY | cmd::USE_KEY | cmd::REMOVE_KEY | cmd::LIST_KEYS => {
                        codec::decode::<KeyResponse>(&b, "keyring reply")
                            .ok()
                            .map(|k| Box::new(ErrorBody::Keys(k)))
                    }
                    _ => None,
                });
                Error::Agent {
                    command,
                    message: reply.error,
                    body,
                }
            }
        }
    }

    async fn call_body<B: Serialize>(
        &self,
        command: &'static str,
        body: Option<&B>,
    ) -> Result<Bytes> {
        self.call(command, body, true)
            .await?
            .ok_or_else(|| Error::Decode {
                what: "reply",
                message: format!("{command} reply without a body"),
            })
    }

    async fn call_empty<B: Serialize>(
        &self,
        command: &'static str,
        body: Option<&B>,
    ) -> Result<()> {
        self.call(command, body, false).await.map(|_| ())
    }

    /// `handshake` (done by [`Client::connect`]; a second one is refused by the agent).
    pub async fn handshake(&self) -> Result<()> {
        self.call_empty(
            cmd::HANDSHAKE,
            Some(&protocol::HandshakeRequest {
                version: protocol::IPC_VERSION,
            }),
        )
        .await
    }

    /// `auth` (done by [`Client::connect`] when the config has a key).
    ///
    /// # Errors
    /// [`Error::Auth`] with the agent's text when the key is wrong.
    pub async fn auth(&self, key: &str) -> Result<()> {
        self.call_empty(cmd::AUTH, Some(&protocol::AuthRequest { auth_key: key }))
            .await
    }

    /// `members`: every member the agent knows, in any status.
    pub async fn members(&self) -> Result<Vec<Member>> {
        let body = self.call_body::<()>(cmd::MEMBERS, None).await?;
        Ok(codec::decode::<protocol::MembersResponse>(&body, "members reply")?.members)
    }

    /// `members-filtered`: members whose tags, status and name match anchored regexes.
    ///
    /// # Errors
    /// [`Error::Invalid`] when a regex does not compile: the agent would drop the connection
    /// without an answer, so the client checks first.
    pub async fn members_filtered(&self, filter: &MembersFilter) -> Result<Vec<Member>> {
        for (what, re) in filter
            .tags
            .iter()
            .map(|(k, v)| (format!("tag {k}"), v))
            .chain([
                ("status".to_string(), &filter.status),
                ("name".to_string(), &filter.name),
            ])
        {
            check_regex(&what, re)?;
        }
        let body = self
            .call_body(
                cmd::MEMBERS_FILTERED,
                Some(&protocol::MembersFilteredRequest {
                    tags: &filter.tags,
                    status: &filter.status,
                    name: &filter.name,
                }),
            )
            .await?;
        Ok(codec::decode::<protocol::MembersResponse>(&body, "members-filtered reply")?.members)
    }

    /// `join`: joins the agent to the nodes at `addrs` (`host:port`). With `replay`, the
    /// agent re-delivers past user events it learns from them. Returns how many were joined.
    ///
    /// # Errors
    /// [`Error::Agent`] with [`ErrorBody::Join`] carrying how many joined before the failure.
    pub async fn join<S: AsRef<str>>(&self, addrs: &[S], replay: bool) -> Result<u32> {
        let existing: Vec<String> = addrs.iter().map(|a| a.as_ref().to_string()).collect();
        let body = self
            .call_body(
                cmd::JOIN,
                Some(&protocol::JoinRequest {
                    existing: &existing,
                    replay,
                }),
            )
            .await?;
        let num = codec::decode::<protocol::JoinResponse>(&body, "join reply")?.num;
        Ok(u32::try_from(num).unwrap_or(0))
    }

    /// `leave`: the agent leaves the cluster gracefully and shuts down. The agent may close
    /// the connection before or after it answers; both count as success.
    pub async fn leave(&self) -> Result<()> {
        match self.call_empty::<()>(cmd::LEAVE, None).await {
            Err(Error::ConnectionClosed { .. }) => Ok(()),
            other => other,
        }
    }

    /// `force-leave`: marks a failed node as left; with `prune`, also removes (reaps) it
    /// at once. An unknown node is not an error.
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<()> {
        self.call_empty(
            cmd::FORCE_LEAVE,
            Some(&protocol::ForceLeaveRequest { node, prune }),
        )
        .await
    }

    /// `event`: fires a user event. With `coalesce`, receivers may deliver only the newest
    /// event of that name within their coalescing window.
    ///
    /// # Errors
    /// [`Error::Invalid`] over 9 KiB (Serf's hard cap); [`Error::Agent`] over the agent's
    /// configured limit (512 bytes of name and payload by default).
    pub async fn event(&self, name: &str, payload: &[u8], coalesce: bool) -> Result<()> {
        let size = name.len() + payload.len();
        if size > USER_EVENT_HARD_LIMIT {
            return Err(Error::Invalid(format!(
                "user event {name:?} is {size} bytes (name and payload); Serf refuses more \
                 than {USER_EVENT_HARD_LIMIT} whatever its configuration (default limit 512)"
            )));
        }
        self.call_empty(
            cmd::EVENT,
            Some(&protocol::EventRequest {
                name,
                payload,
                coalesce,
            }),
        )
        .await
    }

    /// `tags`: sets (adds or overwrites) and deletes tags of the agent's own node. Other
    /// nodes see a `member-update`.
    pub async fn tags(&self, set: &BTreeMap<String, String>, delete: &[String]) -> Result<()> {
        self.call_empty(
            cmd::TAGS,
            Some(&protocol::TagsRequest {
                tags: set,
                delete_tags: delete,
            }),
        )
        .await
    }

    /// `stream`: events that pass `filter` (Serf's syntax; see [`EventFilter`]).
    ///
    /// # Caveats
    /// Records arrive until the stream is stopped or dropped. The agent itself drops events
    /// for a client that has 512 undelivered, silently; this client counts what *it* drops
    /// for a slow consumer and reports it as [`Error::Lagged`]. Stopping or dropping a stream
    /// while the agent is dispatching events to it can crash Debian's 0.9.4 agent (a known
    /// agent bug): keep event streams open for the life of the connection.
    pub async fn stream(&self, filter: &str) -> Result<EventStream> {
        let filter = EventFilter::parse(filter)?;
        let raw = self
            .open_stream(
                cmd::STREAM,
                &protocol::StreamRequest {
                    kind: &filter.to_agent_syntax(),
                },
                false,
            )
            .await?;
        Ok(EventStream { raw })
    }

    /// `monitor`: the agent's log lines at `level` (`trace`, `debug`, `info`, `warn`,
    /// `err`), starting with a backlog of up to 512 recent lines. One per connection.
    pub async fn monitor(&self, level: &str) -> Result<LogStream> {
        let raw = self
            .open_stream(
                cmd::MONITOR,
                &protocol::MonitorRequest { log_level: level },
                false,
            )
            .await?;
        Ok(LogStream { raw })
    }

    /// `query`: sends a query and streams its acks and responses until its deadline.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a tag regex that does not compile; [`Error::Agent`] when the
    /// agent refuses the query (`query exceeds limit of 1024 bytes`, the `_serf_` prefix).
    pub async fn query(&self, params: &QueryParams) -> Result<QueryStream> {
        for (k, re) in &params.filter_tags {
            check_regex(&format!("query tag {k}"), re)?;
        }
        let timeout = match params.timeout {
            None => 0,
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX).max(1),
        };
        let raw = self
            .open_stream(
                cmd::QUERY,
                &protocol::QueryRequest {
                    filter_nodes: &params.filter_nodes,
                    filter_tags: &params.filter_tags,
                    request_ack: params.request_ack,
                    relay_factor: params.relay_factor,
                    timeout,
                    name: &params.name,
                    payload: &params.payload,
                },
                true,
            )
            .await?;
        Ok(QueryStream { raw, done: false })
    }

    /// `respond`: answers a query received on a stream of **this** connection, before its
    /// deadline, once.
    pub async fn respond(&self, id: u64, payload: &[u8]) -> Result<()> {
        self.call_empty(
            cmd::RESPOND,
            Some(&protocol::RespondRequest { id, payload }),
        )
        .await
    }

    async fn key_call(&self, command: &'static str, key: Option<&str>) -> Result<KeyResponse> {
        let body = match key {
            Some(key) => {
                self.call_body(command, Some(&protocol::KeyRequest { key }))
                    .await?
            }
            None => self.call_body::<()>(command, None).await?,
        };
        codec::decode(&body, "keyring reply")
    }

    /// `install-key`: adds a gossip encryption key (base64 of 16, 24 or 32 bytes) on every
    /// node.
    pub async fn install_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::INSTALL_KEY, Some(key)).await
    }

    /// `use-key`: makes an installed key the primary one on every node.
    pub async fn use_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::USE_KEY, Some(key)).await
    }

    /// `remove-key`: removes a key (not the primary one) from every node.
    pub async fn remove_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::REMOVE_KEY, Some(key)).await
    }

    /// `list-keys`: the installed keys and how many nodes have each.
    pub async fn list_keys(&self) -> Result<KeyResponse> {
        self.key_call(cmd::LIST_KEYS, None).await
    }

    /// `stats`: the agent's statistics, every value a string.
    pub async fn stats(&self) -> Result<Stats> {
        let body = self.call_body::<()>(cmd::STATS, None).await?;
        codec::decode(&body, "stats reply")
    }

    /// `get-coordinate`: a node's network coordinate, `None` for an unknown node.
    pub async fn get_coordinate(&self, node: &str) -> Result<Option<protocol::Coordinate>> {
        let body = self
            .call_body(
                cmd::GET_COORDINATE,
                Some(&protocol::CoordinateRequest { node }),
            )
            .await?;
        let r: protocol::CoordinateResponse = codec::decode(&body, "get-coordinate reply")?;
        Ok(r.ok.then_some(r.coord))
    }

    /// `stop`: stops the stream or monitor opened with `seq`. Always succeeds on the agent.
    async fn stop(&self, seq: u64) -> Result<()> {
        self.call_empty(cmd::STOP, Some(&protocol::StopRequest { stop: seq }))
            .await
    }

    async fn open_stream<B: Serialize>(
        &self,
        command: &'static str,
        body: &B,
        query: bool,
    ) -> Result<RawStream> {
        let seq = self.next_seq();
        let frame = codec::encode_request(command, seq, Some(body))?;
        let (ack_tx, ack_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(self.inner.stream_capacity);
        let missed = Arc::new(AtomicU64::new(0));
        self.inner.shared.register(
            seq,
            Pending::Stream {
                ack: Some(ack_tx),
                tx,
                missed: missed.clone(),
                query,
            },
        )?;
        let raw = RawStream {
            client: self.clone(),
            seq,
            rx,
            missed,
            reported: 0,
            open: true,
        };
        self.send(frame)?;
        match tokio::time::timeout(self.inner.timeout, ack_rx).await {
            // `raw` is dropped here: a late ack is consumed and the stream is stopped.
            Err(_) => Err(Error::Timeout {
                command,
                after: self.inner.timeout,
            }),
            Ok(Err(_)) => Err(self
                .inner
                .shared
                .closed_error()
                .unwrap_or_else(|| Error::closed("the reader task has stopped"))),
            Ok(Ok(Err(Error::Agent { message, body, .. }))) => {
                let mut raw = raw;
                raw.open = false;
                Err(Error::Agent {
                    command,
                    message,
                    body,
                })
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(()))) => Ok(raw),
        }
    }
}

fn check_regex(what: &str, re: &str) -> Result<()> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|e| Error::Invalid(format!("{what}: regex {re:?} does not compile: {e}")))
}

/// The record stream under the typed handles.
struct RawStream {
    client: Client,
    seq: u64,
    rx: mpsc::Receiver<Bytes>,
    missed: Arc<AtomicU64>,
    reported: u64,
    /// False once the agent has ended it (query done, refused) or it was stopped.
    open: bool,
}

impl fmt::Debug for RawStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("seq", &self.seq)
            .field("open", &self.open)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl RawStream {
    async fn next(&mut self) -> Option<Result<Bytes>> {
        let missed = self.missed.load(Ordering::Relaxed);
        if missed > self.reported {
            let n = missed - self.reported;
            self.reported = missed;
            return Some(Err(Error::Lagged { missed: n }));
        }
        match self.rx.recv().await {
            Some(b) => Some(Ok(b)),
            None => {
                if !self.open {
                    return None;
                }
                self.open = false;
                self.client.inner.shared.closed_error().map(Err)
            }
        }
    }

    /// Records dropped so far because the consumer was slow.
    fn dropped(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// Turns the pending entry into a tombstone so late records are consumed.
    fn tombstone(&mut self) -> bool {
        let was_open = self.open;
        self.open = false;
        self.rx.close();
        let mut st = self.client.inner.shared.lock();
        match st.pending.get(&self.seq) {
            Some(Pending::Stream { ack, .. }) => {
                let acked = ack.is_none();
                st.pending.insert(self.seq, Pending::Stopped { acked });
                was_open
            }
            _ => false,
        }
    }

    async fn stop(mut self) -> Result<()> {
        if self.tombstone() {
            self.client.stop(self.seq).await?;
        }
        Ok(())
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        // When this stream holds the last reference, the connection closes right after:
        // no `stop` is needed (and none is sent into a closing connection).
        let last = Arc::strong_count(&self.client.inner) == 1;
        if self.tombstone() && !last {
            let seq = self.client.next_seq();
            let (tx, _rx) = oneshot::channel();
            let stop = codec::encode_request(
                cmd::STOP,
                seq,
                Some(&protocol::StopRequest { stop: self.seq }),
            );
            if let Ok(frame) = stop
                && self
                    .client
                    .inner
                    .shared
                    .register(
                        seq,
                        Pending::Unary {
                            expects_body: false,
                            tx,
                        },
                    )
                    .is_ok()
            {
                let _ = self.client.send(frame);
            }
        }
    }
}

/// An open event stream from [`Client::stream`]. Dropping it sends `stop` to the agent.
///
/// # Guarantees
/// Records arrive in the agent's order. Records the consumer was too slow for are counted and
/// reported as [`Error::Lagged`] at the next call to [`EventStream::next`], never dropped
/// silently. When the connection breaks, `next` returns [`Error::ConnectionClosed`] once and
/// then `None`.
#[derive(Debug)]
pub struct EventStream {
    raw: RawStream,
}

impl EventStream {
    /// The next event; `None` when the stream has ended.
    ///
    /// Cancel-safe: dropping the future loses no record.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        Some(self.raw.next().await?.and_then(|b| Event::decode(&b)))
    }

    /// The client whose connection carries this stream (use it to `respond` to queries).
    pub fn client(&self) -> &Client {
        &self.raw.client
    }

    /// Records dropped so far because the consumer was too slow.
    pub fn dropped(&self) -> u64 {
        self.raw.dropped()
    }

    /// Stops the stream and waits for the agent's answer. Records still in flight are read
    /// and discarded.
    pub async fn stop(self) -> Result<()> {
        self.raw.stop().await
    }
}

/// An open log stream from [`Client::monitor`]. Dropping it sends `stop`.
#[derive(Debug)]
pub struct LogStream {
    raw: RawStream,
}

impl LogStream {
    /// The next log line (without a trailing newline); `None` when the stream has ended.
    pub async fn next(&mut self) -> Option<Result<String>> {
        Some(self.raw.next().await?.and_then(|b| decode_log(&b)))
    }

    /// Records dropped so far because the consumer was too slow.
    pub fn dropped(&self) -> u64 {
        self.raw.dropped()
    }

    /// Stops the monitor and waits for the agent's answer.
    pub async fn stop(self) -> Result<()> {
        self.raw.stop().await
    }
}

/// The records of a running query from [`Client::query`]. Ends at the query's deadline.
#[derive(Debug)]
pub struct QueryStream {
    raw: RawStream,
    done: bool,
}

/// Everything a query got, from [`QueryStream::collect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOutcome {
    /// Nodes that acknowledged, in arrival order.
    pub acks: Vec<String>,
    /// Node and answer, in arrival order.
    pub responses: Vec<(String, Vec<u8>)>,
    /// True when the query ran to its deadline (the agent sent `done`).
    pub complete: bool,
    /// Records lost because the consumer was too slow.
    pub dropped: u64,
}

impl QueryStream {
    /// The next ack or response; [`QueryRecord::Done`] at the deadline, then `None`.
    pub async fn next(&mut self) -> Option<Result<QueryRecord>> {
        if self.done {
            return None;
        }
        match self.raw.next().await {
            Some(r) => {
                let rec = r.and_then(|b| QueryRecord::decode(&b));
                if matches!(rec, Ok(QueryRecord::Done)) {
                    self.done = true;
                    self.raw.open = false;
                }
                Some(rec)
            }
            None => {
                // The agent's `done` was lost to a full buffer; the stream did end.
                self.done = true;
                None
            }
        }
    }

    /// Waits for the deadline and returns every ack and response.
    ///
    /// # Errors
    /// [`Error::ConnectionClosed`] when the connection breaks before the deadline.
    pub async fn collect(mut self) -> Result<QueryOutcome> {
        let mut out = QueryOutcome::default();
        while let Some(rec) = self.next().await {
            match rec {
                Ok(QueryRecord::Ack { from }) => out.acks.push(from),
                Ok(QueryRecord::Response { from, payload }) => out.responses.push((from, payload)),
                Ok(QueryRecord::Done) => {}
                Err(Error::Lagged { missed }) => out.dropped += missed,
                Err(Error::Decode { .. }) => out.dropped += 1,
                Err(e) => return Err(e),
            }
        }
        // The stream ends without an error only at the deadline (even if the `done` record
        // itself was lost to a full buffer).
        out.complete = true;
        Ok(out)
    }
}
