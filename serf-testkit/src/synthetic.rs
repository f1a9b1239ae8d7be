//! A synthetic Serf agent: speaks the agent's RPC protocol byte for byte on a loopback port
//! and plays cluster behaviour (tens of thousands of members, storms of member events, user
//! events, queries) from a program, for benchmarks and tests that need more members than
//! real agents can provide on one machine.
//!
//! What it mimics, from the Go agent's `ipc.go` and the live captures in the RPC reference:
//! the `{Error, Seq}` header and every body map with the agent's keys, key order and msgpack
//! types; the error strings and which errors close the connection; the handshake and auth
//! rules (including the refused request's body being read as the next header); event
//! filters; member and user event coalescing (3 s window, 1 s quiescence by default); and
//! the agent's per-stream queue of 512 events, where an event that does not fit is dropped
//! and counted ([`SyntheticAgent::dropped`]).
//!
//! What it does not do: gossip, encryption and keyrings, `join`, `monitor` (those commands
//! get an error that says so), and network coordinates (`get-coordinate` answers like the
//! agent does for an unknown node).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use serf_testkit::synthetic::{MemberEventKind, SyntheticAgent, SyntheticConfig, SyntheticMember};
//!
//! let members = SyntheticMember::numbered("node", 0..50_000, [("role", "web")]);
//! let agent = SyntheticAgent::start(SyntheticConfig::new("bench").members(members)).await?;
//! // point a Serf RPC client at agent.rpc_addr(), open a stream, then:
//! let names: Vec<String> = (0..10_000).map(|i| format!("node{i}")).collect();
//! agent.play_storm(&names, MemberEventKind::Failed, Duration::from_secs(10)).await;
//! println!("events dropped at the stream: {}", agent.dropped());
//! # Ok(()) }
//! ```

mod conn;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use self::wire::{Enc, Tags};

/// The agent's per-stream event queue (`eventCh` in `ipc_event_stream.go`).
pub const AGENT_STREAM_QUEUE: usize = 512;

/// The agent's default user event size limit (`user_event_size_limit`).
pub const USER_EVENT_SIZE_LIMIT: usize = 512;

/// The agent's default query size limit (`query_size_limit`), also the query response limit.
pub const QUERY_SIZE_LIMIT: usize = 1024;

/// Coalescing periods of member events and of user events sent with `Coalesce: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    /// A batch is flushed this long after its first event at the latest.
    pub period: Duration,
    /// A batch is flushed once no new event came for this long.
    pub quiescent: Duration,
}

impl Coalesce {
    /// What `serf agent` hard-codes: 3 s and 1 s, for member and user events alike.
    pub const AGENT: Coalesce = Coalesce {
        period: Duration::from_secs(3),
        quiescent: Duration::from_secs(1),
    };
}

/// How to start a [`SyntheticAgent`].
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// The agent's own node name (`stats` `agent.name`; listed among the members).
    pub name: String,
    /// The RPC auth key (`rpc_auth`); `None` serves without auth.
    pub auth_key: Option<String>,
    /// The agent's own tags.
    pub tags: BTreeMap<String, String>,
    /// Members known from the start, besides the agent itself (no events are played for them).
    pub members: Vec<SyntheticMember>,
    /// Event coalescing; `Some(Coalesce::AGENT)` by default like the real agent, `None` to
    /// deliver every member event as its own record.
    pub coalesce: Option<Coalesce>,
    /// Events each stream queues before dropping; [`AGENT_STREAM_QUEUE`] by default.
    pub stream_queue: usize,
}

impl SyntheticConfig {
    /// An agent named `name`, no auth, no tags, no other members, the agent's coalescing.
    pub fn new(name: impl Into<String>) -> Self {
        SyntheticConfig {
            name: name.into(),
            auth_key: None,
            tags: BTreeMap::new(),
            members: Vec::new(),
            coalesce: Some(Coalesce::AGENT),
            stream_queue: AGENT_STREAM_QUEUE,
        }
    }

    /// Requires `auth` with this key before any other command.
    pub fn auth(mut self, key: impl Into<String>) -> Self {
        self.auth_key = Some(key.into());
        self
    }

    /// Adds one of the agent's own tags.
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.insert(k.into(), v.into());
        self
    }

    /// Adds initial members.
    pub fn members(mut self, members: impl IntoIterator<Item = SyntheticMember>) -> Self {
        self.members.extend(members);
        self
    }

    /// Sets (or with `None` turns off) event coalescing.
    pub fn coalesce(mut self, c: Option<Coalesce>) -> Self {
        self.coalesce = c;
        self
    }

    /// Sets the per-stream queue length (at least 1).
    pub fn stream_queue(mut self, n: usize) -> Self {
        self.stream_queue = n.max(1);
        self
    }
}

/// A member to add: identity and tags (it joins `alive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticMember {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub addr: IpAddr,
    /// Gossip port.
    pub port: u16,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

impl SyntheticMember {
    /// A member at 127.0.0.1:7946 without tags.
    pub fn new(name: impl Into<String>) -> Self {
        SyntheticMember {
            name: name.into(),
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 7946,
            tags: BTreeMap::new(),
        }
    }

    /// Sets the address.
    pub fn addr(mut self, addr: IpAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Sets the port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.insert(k.into(), v.into());
        self
    }

    /// Members `{prefix}{i}` for each `i` in `range`, each with its own address in 10.0.0.0/8
    /// and the same tags (stored once for all of them).
    pub fn numbered<K, V>(
        prefix: &str,
        range: std::ops::Range<u32>,
        tags: impl IntoIterator<Item = (K, V)>,
    ) -> Vec<SyntheticMember>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let tags: BTreeMap<String, String> = tags
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        range
            .map(|i| {
                let [_, b, c, d] = i.to_be_bytes();
                SyntheticMember {
                    name: format!("{prefix}{i}"),
                    addr: IpAddr::V4(Ipv4Addr::new(10, b, c, d)),
                    port: 7946,
                    tags: tags.clone(),
                }
            })
            .collect()
    }
}

/// A member's status, as the agent spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `alive`
    Alive,
    /// `leaving`
    Leaving,
    /// `left`
    Left,
    /// `failed`
    Failed,
}

impl Status {
    /// The agent's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Alive => "alive",
            Status::Leaving => "leaving",
            Status::Left => "left",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The five member events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The event's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEventKind::Join => "member-join",
            MemberEventKind::Leave => "member-leave",
            MemberEventKind::Failed => "member-failed",
            MemberEventKind::Update => "member-update",
            MemberEventKind::Reap => "member-reap",
        }
    }
}

impl fmt::Display for MemberEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A response to a query, given with `respond` by a client of the synthetic agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryResponse {
    /// The query's name.
    pub query: String,
    /// The query's Lamport time.
    pub ltime: u64,
    /// The `ID` the client answered (per connection).
    pub id: u64,
    /// The node that answered (the synthetic agent's own name).
    pub from: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A running synthetic agent. Stops when [`SyntheticAgent::stop`] is called or when dropped.
///
/// All methods that change the cluster are synchronous and cheap; the events they cause
/// are delivered by tasks of the tokio runtime that started the agent.
pub struct SyntheticAgent {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl fmt::Debug for SyntheticAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyntheticAgent")
            .field("name", &self.inner.name)
            .field("addr", &self.addr)
            .finish()
    }
}

/// One member as stored: about 140 bytes with its name and index entry (measured by the
/// `synthetic_scale` example); tags are shared between members.
#[derive(Clone)]
pub(crate) struct Slot {
    addr: IpAddr,
    port: u16,
    status: Status,
    tags: Arc<Tags>,
}

/// A member as an event carries it.
#[derive(Clone)]
struct Snap {
    name: Arc<str>,
    slot: Slot,
}

struct State {
    members: IndexMap<Arc<str>, Slot>,
    /// Tag sets shared between members, so 50,000 members with the same tags hold one copy.
    tag_sets: HashMap<BTreeMap<String, String>, Arc<Tags>>,
    member_clock: u64,
    event_clock: u64,
    query_clock: u64,
}

impl State {
    fn intern(&mut self, tags: BTreeMap<String, String>) -> Arc<Tags> {
        if let Some(t) = self.tag_sets.get(&tags) {
            return t.clone();
        }
        if self.tag_sets.len() > 10_000 {
            self.tag_sets.retain(|_, t| Arc::strong_count(t) > 1);
        }
        let t = Arc::new(Tags::new(tags.clone()));
        self.tag_sets.insert(tags, t.clone());
        t
    }
}

/// An event on its way to the streams.
enum Ev {
    Member(MemberEventKind, Vec<Snap>),
    User {
        ltime: u64,
        name: String,
        payload: Vec<u8>,
        coalesce: bool,
    },
    Query(Arc<QueryEv>),
}

/// A query delivered to streams; each connection gives it its own `ID` when it is sent.
pub(crate) struct QueryEv {
    pub(crate) ltime: u64,
    pub(crate) name: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) responded: AtomicBool,
    /// The `query` RPC stream that sent it, for the `response` records.
    pub(crate) origin: Option<mpsc::UnboundedSender<QueryRecord>>,
}

/// A record of a `query` RPC stream.
pub(crate) struct QueryRecord {
    pub(crate) kind: &'static str,
    pub(crate) from: String,
    pub(crate) payload: Vec<u8>,
}

/// What a stream's queue holds: an encoded record body, or a query (encoded when sent,
/// since its `ID` is per connection).
#[derive(Clone)]
pub(crate) enum Item {
    Body(Bytes),
    Query(Arc<QueryEv>),
}

/// One stream filter item (`member-join`, `user:deploy`, `*`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filter {
    event: String,
    name: String,
}

impl Filter {
    /// Parses the agent's filter syntax; `None` when an item is not valid.
    pub(crate) fn parse(spec: &str) -> Option<Vec<Filter>> {
        let spec = if spec.is_empty() { "*" } else { spec };
        spec.split(',')
            .map(|item| {
                let (event, name) = if let Some(n) = item.strip_prefix("user:") {
                    ("user", n)
                } else if let Some(n) = item.strip_prefix("query:") {
                    ("query", n)
                } else {
                    (item, "")
                };
                let valid = matches!(
                    event,
                    "member-join"
                        | "member-leave"
                        | "member-failed"
                        | "member-update"
                        | "member-reap"
                        | "user"
                        | "query"
                        | "*"
                );
                valid.then(|| Filter {
                    event: event.to_string(),
                    name: name.to_string(),
                })
            })
            .collect()
    }

    fn matches(&self, event: &str, name: &str) -> bool {
        self.event == "*"
            || (self.event == event
                && (self.name.is_empty()
                    || !matches!(event, "user" | "query")
                    || self.name == name))
    }
}

/// A registered event stream.
pub(crate) struct StreamReg {
    pub(crate) conn: u64,
    pub(crate) seq: u64,
    pub(crate) filters: Vec<Filter>,
    pub(crate) tx: mpsc::Sender<Item>,
    pub(crate) client: Arc<str>,
}

/// Pending coalesced events and what was last delivered per member.
#[derive(Default)]
struct Coalescer {
    members: HashMap<Arc<str>, (MemberEventKind, Snap)>,
    last: HashMap<Arc<str>, MemberEventKind>,
    member_window: Window,
    users: HashMap<String, (u64, Vec<Ev>)>,
    user_window: Window,
}

#[derive(Default, Clone, Copy)]
struct Window {
    quantum: Option<Instant>,
    quiescent: Option<Instant>,
}

impl Window {
    fn touch(&mut self, c: Coalesce, now: Instant) {
        if self.quantum.is_none() {
            self.quantum = Some(now + c.period);
        }
        self.quiescent = Some(now + c.quiescent);
    }
    fn due(&self) -> Option<Instant> {
        match (self.quantum, self.quiescent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) auth_key: Option<String>,
    coalesce: Option<Coalesce>,
    pub(crate) stream_queue: usize,
    state: Mutex<State>,
    pub(crate) self_tags: Mutex<Arc<Tags>>,
    pub(crate) streams: Mutex<Vec<StreamReg>>,
    coalescer: Mutex<Coalescer>,
    coalesce_wake: Notify,
    pub(crate) responses: Mutex<Vec<QueryResponse>>,
    pub(crate) dropped: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    next_conn: AtomicU64,
}

/// Locks a mutex; a poisoned lock is used anyway (a panic elsewhere only ends a test).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyntheticAgent {
    /// Binds 127.0.0.1 on a free port and starts serving RPC connections.
    ///
    /// Must run inside a tokio runtime with the `net` and `time` drivers: the agent's tasks
    /// (listener, connections, coalescing) are spawned on it.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(cfg: SyntheticConfig) -> io::Result<SyntheticAgent> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let mut members = IndexMap::with_capacity(cfg.members.len() + 1);
        let mut state = State {
            members: IndexMap::new(),
            tag_sets: HashMap::new(),
            member_clock: 1,
            event_clock: 1,
            query_clock: 1,
        };
        let self_tags = state.intern(cfg.tags.clone());
        members.insert(
            Arc::<str>::from(cfg.name.as_str()),
            Slot {
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 7946,
                status: Status::Alive,
                tags: self_tags.clone(),
            },
        );
        for m in cfg.members {
            let tags = state.intern(m.tags);
            members.insert(
                Arc::from(m.name),
                Slot {
                    addr: m.addr,
                    port: m.port,
                    status: Status::Alive,
                    tags,
                },
            );
        }
        state.members = members;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            name: cfg.name,
            auth_key: cfg.auth_key,
            coalesce: cfg.coalesce,
            stream_queue: cfg.stream_queue.max(1),
            state: Mutex::new(state),
            self_tags: Mutex::new(self_tags),
            streams: Mutex::new(Vec::new()),
            coalescer: Mutex::new(Coalescer::default()),
            coalesce_wake: Notify::new(),
            responses: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            shutdown,
            next_conn: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(listener, inner.clone()));
        if inner.coalesce.is_some() {
            tokio::spawn(coalesce_loop(inner.clone()));
            // Like the agent: its own join goes through coalescing, so a stream opened within
            // the first window receives it.
            let own = {
                let st = lock(&inner.state);
                st.members
                    .get_key_value(inner.name.as_str())
                    .map(|(name, slot)| Snap {
                        name: name.clone(),
                        slot: slot.clone(),
                    })
            };
            inner.member_events(MemberEventKind::Join, own.into_iter().collect());
        }
        Ok(SyntheticAgent { inner, addr })
    }

    /// The RPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The RPC address as `host:port`, for a client config.
    pub fn rpc_addr(&self) -> String {
        self.addr.to_string()
    }

    /// The agent's own node name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Closes the listener and every connection (their tasks end at their next step).
    /// Idempotent; also done on drop.
    pub fn stop(&self) {
        self.inner.shutdown.send_replace(true);
        lock(&self.inner.streams).clear();
    }

    /// True once stopped (by [`SyntheticAgent::stop`] or a `leave` command).
    pub fn is_stopped(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Events dropped because a stream's queue was full (the agent's `Dropping event to …`).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Stream records written to client sockets.
    pub fn delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::Relaxed)
    }

    /// Event streams open now, over all connections.
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    /// Records waiting in stream queues now (not yet written, not dropped), over all streams.
    pub fn queued(&self) -> usize {
        lock(&self.inner.streams)
            .iter()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .sum()
    }

    /// Events held by coalescing windows that have not closed yet.
    pub fn coalescing(&self) -> usize {
        let co = lock(&self.inner.coalescer);
        co.members.len() + co.users.values().map(|(_, evs)| evs.len()).sum::<usize>()
    }

    /// Waits until no event is held by coalescing and every stream queue is empty (each
    /// record written to its socket or dropped), polling every 5 ms. False on timeout (a
    /// subscriber that does not read keeps up to a queue's worth of records waiting).
    pub async fn settled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.coalescing() == 0 && self.queued() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Members known, the agent itself included, in any status.
    pub fn member_count(&self) -> usize {
        lock(&self.inner.state).members.len()
    }

    /// A member's status, if it is known.
    pub fn status(&self, name: &str) -> Option<Status> {
        lock(&self.inner.state).members.get(name).map(|s| s.status)
    }

    /// The current user event clock (`stats` `serf.event_time`).
    pub fn event_time(&self) -> u64 {
        lock(&self.inner.state).event_clock
    }

    /// The responses clients gave to queries, oldest first.
    pub fn responses(&self) -> Vec<QueryResponse> {
        lock(&self.inner.responses).clone()
    }

    /// Adds members (or brings known ones back `alive` with new identity and tags), each with
    /// a `member-join` event. Returns how many joined.
    pub fn add_members(&self, members: impl IntoIterator<Item = SyntheticMember>) -> usize {
        let snaps = {
            let mut st = lock(&self.inner.state);
            let mut snaps = Vec::new();
            for m in members {
                let tags = st.intern(m.tags);
                let slot = Slot {
                    addr: m.addr,
                    port: m.port,
                    status: Status::Alive,
                    tags,
                };
                let name: Arc<str> = match st.members.get_key_value(m.name.as_str()) {
                    Some((k, old)) if old.status == Status::Alive => {
                        let k = k.clone();
                        st.members.insert(k, slot);
                        continue;
                    }
                    Some((k, _)) => k.clone(),
                    None => Arc::from(m.name),
                };
                st.member_clock += 1;
                st.members.insert(name.clone(), slot.clone());
                snaps.push(Snap { name, slot });
            }
            snaps
        };
        let n = snaps.len();
        self.inner.member_events(MemberEventKind::Join, snaps);
        n
    }

    /// Sets the status of the named members; a change to `alive`, `failed` or `left` plays
    /// `member-join`, `member-failed` or `member-leave` (`leaving` plays nothing, like the
    /// agent). Unknown names and unchanged statuses are skipped. Returns how many changed.
    pub fn set_status<S: AsRef<str>>(
        &self,
        names: impl IntoIterator<Item = S>,
        status: Status,
    ) -> usize {
        let kind = match status {
            Status::Alive => Some(MemberEventKind::Join),
            Status::Failed => Some(MemberEventKind::Failed),
            Status::Left => Some(MemberEventKind::Leave),
            Status::Leaving => None,
        };
        let snaps = {
            let mut st = lock(&self.inner.state);
            let mut snaps = Vec::new();
            for n in names {
                let Some((name, slot)) = st
                    .members
                    .get_full_mut(n.as_ref())
                    .map(|(_, k, s)| (k.clone(), s))
                else {
                    continue;
                };
                if slot.status == status {
                    continue;
                }
                slot.status = status;
                let slot = slot.clone();
                st.member_clock += 1;
                snaps.push(Snap { name, slot });
            }
            snaps
        };
        let n = snaps.len();
        if let Some(kind) = kind {
            self.inner.member_events(kind, snaps);
        }
        n
    }

    /// Marks members `failed` (`member-failed`).
    pub fn fail<S: AsRef<str>>(&self, names: impl IntoIterator<Item = S>) -> usize {
        self.set_status(names, Status::Failed)
    }

    /// Marks members `left` (`member-leave`), as a graceful leave or a force-leave does.
    pub fn leave<S: AsRef<str>>(&self, names: impl IntoIterator<Item = S>) -> usize {
        self.set_status(names, Status::Left)
    }

    /// Removes members (`member-reap`, carrying their last status). Returns how many.
    pub fn reap<S: AsRef<str>>(&self, names: impl IntoIterator<Item = S>) -> usize {
        let snaps = {
            let mut st = lock(&self.inner.state);
            let mut snaps = Vec::new();
            for n in names {
                if n.as_ref() == self.inner.name {
                    continue;
                }
                if let Some((name, slot)) = st.members.swap_remove_entry(n.as_ref()) {
                    st.member_clock += 1;
                    snaps.push(Snap { name, slot });
                }
            }
            snaps
        };
        let n = snaps.len();
        self.inner.member_events(MemberEventKind::Reap, snaps);
        n
    }

    /// Replaces a member's tags (`member-update`). False when the member is unknown.
    pub fn update_tags(&self, name: &str, tags: BTreeMap<String, String>) -> bool {
        let snap = {
            let mut st = lock(&self.inner.state);
            let tags = st.intern(tags);
            let Some((_, k, slot)) = st.members.get_full_mut(name) else {
                return false;
            };
            slot.tags = tags.clone();
            let snap = Snap {
                name: k.clone(),
                slot: slot.clone(),
            };
            st.member_clock += 1;
            snap
        };
        if name == self.inner.name {
            *lock(&self.inner.self_tags) = snap.slot.tags.clone();
        }
        self.inner
            .member_events(MemberEventKind::Update, vec![snap]);
        true
    }

    /// Plays a user event, as if it had been sent in the cluster; returns its Lamport time.
    /// With `coalesce` and coalescing on, only the newest event of a name within the window
    /// is delivered, like the agent.
    pub fn user_event(&self, name: &str, payload: &[u8], coalesce: bool) -> u64 {
        self.inner.user_event(name, payload, coalesce)
    }

    /// Plays a query with this deadline; returns its Lamport time. Clients answer it with
    /// `respond`; see [`SyntheticAgent::responses`].
    pub fn query(&self, name: &str, payload: &[u8], timeout: Duration) -> u64 {
        let ltime = self.inner.next_query_time();
        let q = Arc::new(QueryEv {
            ltime,
            name: name.to_string(),
            payload: payload.to_vec(),
            deadline: Instant::now() + timeout,
            responded: AtomicBool::new(false),
            origin: None,
        });
        self.inner.dispatch(&Ev::Query(q));
        ltime
    }

    /// Plays one member event of `kind` for each name, spread evenly over `over` (the first
    /// at once, the last at `over`). `Join` adds unknown names with default identity; the
    /// other kinds skip unknown names, and a status a member already has plays nothing (see
    /// [`SyntheticAgent::set_status`]). Returns how many events were played.
    pub async fn play_storm<S: AsRef<str>>(
        &self,
        names: &[S],
        kind: MemberEventKind,
        over: Duration,
    ) -> usize {
        let start = Instant::now();
        let total = names.len();
        let mut next = 0;
        let mut played = 0;
        while next < total {
            let elapsed = start.elapsed();
            // Every event whose time has come: i * over / (total - 1) <= elapsed.
            let due = if total <= 1 || over.is_zero() {
                total
            } else {
                let span = (total - 1) as u128;
                let k = elapsed.as_nanos() * span / over.as_nanos().max(1);
                usize::try_from(k)
                    .unwrap_or(total)
                    .saturating_add(1)
                    .min(total)
            };
            if due > next {
                played += self.apply(&names[next..due], kind);
                next = due;
            }
            if next < total {
                let at =
                    start + over.mul_f64(next as f64 / (total.saturating_sub(1).max(1)) as f64);
                tokio::time::sleep_until(at).await;
            }
        }
        played
    }

    fn apply<S: AsRef<str>>(&self, names: &[S], kind: MemberEventKind) -> usize {
        match kind {
            MemberEventKind::Join => {
                let (known, unknown): (Vec<&S>, Vec<&S>) = {
                    let st = lock(&self.inner.state);
                    names
                        .iter()
                        .partition(|n| st.members.contains_key(n.as_ref()))
                };
                self.set_status(known.iter().map(|n| n.as_ref()), Status::Alive)
                    + self.add_members(unknown.iter().map(|n| SyntheticMember::new(n.as_ref())))
            }
            MemberEventKind::Failed => self.fail(names.iter().map(AsRef::as_ref)),
            MemberEventKind::Leave => self.leave(names.iter().map(AsRef::as_ref)),
            MemberEventKind::Reap => self.reap(names.iter().map(AsRef::as_ref)),
            MemberEventKind::Update => names
                .iter()
                .filter(|n| {
                    let tags = lock(&self.inner.state)
                        .members
                        .get(n.as_ref())
                        .map(|s| s.tags.map.clone());
                    tags.is_some_and(|t| self.update_tags(n.as_ref(), t))
                })
                .count(),
        }
    }
}

impl Drop for SyntheticAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    /// Shuts the agent down (as `leave` does).
    pub(crate) fn shut_down(&self) {
        self.shutdown.send_replace(true);
        lock(&self.streams).clear();
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn next_query_time(&self) -> u64 {
        let mut st = lock(&self.state);
        let t = st.query_clock;
        st.query_clock += 1;
        t
    }

    /// Alive members (the agent's default query timeout depends on them).
    pub(crate) fn alive_count(&self) -> usize {
        lock(&self.state)
            .members
            .values()
            .filter(|s| s.status == Status::Alive)
            .count()
    }

    pub(crate) fn user_event(&self, name: &str, payload: &[u8], coalesce: bool) -> u64 {
        let ltime = {
            let mut st = lock(&self.state);
            let t = st.event_clock;
            st.event_clock += 1;
            t
        };
        self.emit(Ev::User {
            ltime,
            name: name.to_string(),
            payload: payload.to_vec(),
            coalesce,
        });
        ltime
    }

    /// The `members` (or filtered) reply body, encoded under the state lock.
    pub(crate) fn encode_members(&self, keep: impl Fn(&str, &Slot) -> bool) -> Vec<u8> {
        let st = lock(&self.state);
        let picked: Vec<(&Arc<str>, &Slot)> =
            st.members.iter().filter(|(n, s)| keep(n, s)).collect();
        let mut e = Enc::with_capacity(16 + picked.len() * 160);
        e.map(1).str("Members").array(picked.len());
        for (name, s) in picked {
            wire::member(&mut e, name, s.addr, s.port, &s.tags, s.status.as_str());
        }
        e.0
    }

    /// The `serf` section of `stats`.
    pub(crate) fn serf_stats(&self) -> Vec<(&'static str, String)> {
        let st = lock(&self.state);
        let count = |s: Status| st.members.values().filter(|m| m.status == s).count();
        vec![
            ("coordinate_resets", "0".into()),
            ("encrypted", "false".into()),
            ("event_queue", "0".into()),
            ("event_time", st.event_clock.to_string()),
            ("failed", count(Status::Failed).to_string()),
            ("health_score", "0".into()),
            ("intent_queue", "0".into()),
            ("left", count(Status::Left).to_string()),
            ("member_time", st.member_clock.to_string()),
            ("members", st.members.len().to_string()),
            ("query_queue", "0".into()),
            ("query_time", st.query_clock.to_string()),
        ]
    }

    /// Changes the agent's own tags (the `tags` command), with a `member-update`.
    pub(crate) fn set_self_tags(&self, tags: BTreeMap<String, String>) {
        let snap = {
            let mut st = lock(&self.state);
            let tags = st.intern(tags);
            *lock(&self.self_tags) = tags.clone();
            let name = self.name.as_str();
            let Some((_, k, slot)) = st.members.get_full_mut(name) else {
                return;
            };
            slot.tags = tags;
            let snap = Snap {
                name: k.clone(),
                slot: slot.clone(),
            };
            st.member_clock += 1;
            snap
        };
        self.member_events(MemberEventKind::Update, vec![snap]);
    }

    /// `force-leave`: a failed member becomes `left`; with `prune`, a failed or left member
    /// is reaped.
    pub(crate) fn force_leave(&self, node: &str, prune: bool) {
        let mut leave = Vec::new();
        let mut reap = Vec::new();
        {
            let mut st = lock(&self.state);
            let Some((_, k, slot)) = st.members.get_full_mut(node) else {
                return;
            };
            let k = k.clone();
            if slot.status == Status::Failed {
                slot.status = Status::Left;
                leave.push(Snap {
                    name: k.clone(),
                    slot: slot.clone(),
                });
            }
            if prune
                && matches!(slot.status, Status::Left)
                && let Some((name, slot)) = st.members.swap_remove_entry(node)
            {
                reap.push(Snap { name, slot });
            }
            st.member_clock += 1;
        }
        self.member_events(MemberEventKind::Leave, leave);
        self.member_events(MemberEventKind::Reap, reap);
    }

    fn member_events(&self, kind: MemberEventKind, snaps: Vec<Snap>) {
        if snaps.is_empty() {
            return;
        }
        if self.coalesce.is_some() {
            self.emit(Ev::Member(kind, snaps));
        } else {
            // Like serf without coalescing: one event per member.
            for s in snaps {
                self.dispatch(&Ev::Member(kind, vec![s]));
            }
        }
    }

    /// Passes an event through coalescing (when on) to the streams.
    fn emit(&self, ev: Ev) {
        let Some(c) = self.coalesce else {
            self.dispatch(&ev);
            return;
        };
        let now = Instant::now();
        let mut co = lock(&self.coalescer);
        match ev {
            Ev::Member(kind, snaps) => {
                for s in snaps {
                    co.members.insert(s.name.clone(), (kind, s));
                }
                co.member_window.touch(c, now);
            }
            Ev::User {
                ltime,
                ref name,
                coalesce: true,
                ..
            } => {
                let entry = co.users.entry(name.clone()).or_insert((ltime, Vec::new()));
                if entry.0 < ltime {
                    *entry = (ltime, vec![ev]);
                } else if entry.0 == ltime {
                    entry.1.push(ev);
                }
                co.user_window.touch(c, now);
            }
            other => {
                drop(co);
                self.dispatch(&other);
                return;
            }
        }
        drop(co);
        self.coalesce_wake.notify_one();
    }

    /// Flushes the coalescing windows that are due; returns when the next one is.
    fn flush_due(&self, now: Instant) -> Option<Instant> {
        let mut out = Vec::new();
        let next = {
            let mut co = lock(&self.coalescer);
            if co.member_window.due().is_some_and(|d| d <= now) {
                co.member_window = Window::default();
                let pending = std::mem::take(&mut co.members);
                let mut by_kind: Vec<(MemberEventKind, Vec<Snap>)> = Vec::new();
                for (name, (kind, snap)) in pending {
                    let prev = co.last.insert(name, kind);
                    if prev == Some(kind) && kind != MemberEventKind::Update {
                        continue;
                    }
                    match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                        Some((_, v)) => v.push(snap),
                        None => by_kind.push((kind, vec![snap])),
                    }
                }
                out.extend(by_kind.into_iter().map(|(k, v)| Ev::Member(k, v)));
            }
            if co.user_window.due().is_some_and(|d| d <= now) {
                co.user_window = Window::default();
                for (_, (_, evs)) in std::mem::take(&mut co.users) {
                    out.extend(evs);
                }
            }
            match (co.member_window.due(), co.user_window.due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        for ev in &out {
            self.dispatch(ev);
        }
        next
    }

    /// Encodes an event once and queues it to every stream whose filter matches; a full queue
    /// drops it, as the agent does.
    fn dispatch(&self, ev: &Ev) {
        let (event, name) = match ev {
            Ev::Member(kind, _) => (kind.as_str(), ""),
            Ev::User { name, .. } => ("user", name.as_str()),
            Ev::Query(q) => ("query", q.name.as_str()),
        };
        let streams = lock(&self.streams);
        let mut item: Option<Item> = None;
        for s in streams
            .iter()
            .filter(|s| s.filters.iter().any(|f| f.matches(event, name)))
        {
            let it = item.get_or_insert_with(|| encode_event(ev)).clone();
            match s.tx.try_send(it) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "agent.ipc: Dropping event to ipc.client: {} (stream {})",
                        s.client,
                        s.seq
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// Encodes an event's record body (queries are encoded per connection, when sent).
fn encode_event(ev: &Ev) -> Item {
    match ev {
        Ev::Member(kind, snaps) => {
            let mut e = Enc::with_capacity(32 + snaps.len() * 160);
            e.map(2).str("Event").str(kind.as_str());
            e.str("Members").array(snaps.len());
            for s in snaps {
                wire::member(
                    &mut e,
                    &s.name,
                    s.slot.addr,
                    s.slot.port,
                    &s.slot.tags,
                    s.slot.status.as_str(),
                );
            }
            Item::Body(Bytes::from(e.0))
        }
        Ev::User {
            ltime,
            name,
            payload,
            coalesce,
        } => {
            let mut e = Enc::with_capacity(48 + name.len() + payload.len());
            e.map(5)
                .str("Coalesce")
                .bool(*coalesce)
                .str("Event")
                .str("user")
                .str("LTime")
                .uint(*ltime)
                .str("Name")
                .str(name)
                .str("Payload")
                .payload(payload);
            Item::Body(Bytes::from(e.0))
        }
        Ev::Query(q) => Item::Query(q.clone()),
    }
}

/// Resolves once the flag is set (or its sender is gone).
pub(crate) async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            () = signalled(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let span = tracing::debug_span!("synthetic_rpc_client", %peer);
                    tokio::spawn(conn::serve(inner.clone(), sock, peer).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent.ipc: Failed to accept client");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn coalesce_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut next: Option<Instant> = None;
    loop {
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = signalled(&mut shutdown) => return,
            () = inner.coalesce_wake.notified() => {}
            () = sleep => {}
        }
        next = inner.flush_due(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_like_the_agent() {
        assert_eq!(Filter::parse("").unwrap().len(), 1);
        let f = Filter::parse("member-join,user:deploy,query").unwrap();
        assert!(f.iter().any(|f| f.matches("member-join", "")));
        assert!(f.iter().any(|f| f.matches("user", "deploy")));
        assert!(!f.iter().any(|f| f.matches("user", "other")));
        assert!(f.iter().any(|f| f.matches("query", "anything")));
        assert!(!f.iter().any(|f| f.matches("member-failed", "")));
        assert!(Filter::parse("member-join, user").is_none());
        assert!(Filter::parse("bogus").is_none());
        assert!(Filter::parse("*").unwrap()[0].matches("member-reap", ""));
    }

    #[test]
    fn numbered_members_have_distinct_addresses() {
        let ms = SyntheticMember::numbered("n", 0..300, [("role", "web")]);
        assert_eq!(ms.len(), 300);
        assert_eq!(ms[299].name, "n299");
        assert_ne!(ms[1].addr, ms[257].addr);
        assert_eq!(ms[0].tags["role"], "web");
    }
}
