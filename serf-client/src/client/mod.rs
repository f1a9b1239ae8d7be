//! The RPC client: its configuration and the [`Client`] handle. The connection (one socket
//! shared by concurrent calls and streams, matched by `Seq`, read by one task and written by
//! another) is in [`connection`]; the RPC commands in [`commands`]; streams, monitors and
//! queries in [`streams`].

mod commands;
mod connection;
mod streams;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::codec::{self};
use crate::error::{Error, ErrorBody, Result};
use crate::protocol::{self, KeyResponse, cmd, errs};

use self::connection::{Pending, Reply, Shared, State, read_loop, write_loop};
pub use self::streams::{EventStream, LogStream, QueryOutcome, QueryStream};

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
}
