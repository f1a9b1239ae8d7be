//! An async client for the HashiCorp Serf agent RPC protocol, on tokio.
//!
//! It speaks the agent's msgpack RPC byte for byte (verified against Serf 0.9.4 agents):
//! every command, concurrent calls and streams on one connection, typed events, typed
//! errors, and a [`Subscription`] that keeps an event stream alive across agent restarts.
//!
//! ```no_run
//! # async fn demo() -> serf_client::Result<()> {
//! use serf_client::{Client, ClientConfig, Event};
//!
//! let client = Client::connect(ClientConfig::from_env()).await?; // SERF_RPC_ADDR, SERF_RPC_AUTH
//! for m in client.members().await? {
//!     println!("{} {} {}", m.name, m.addr, m.status);
//! }
//! let mut events = client.stream("user:deploy,member-failed").await?;
//! client.event("deploy", b"v1.2.3", false).await?;
//! while let Some(ev) = events.next().await {
//!     match ev? {
//!         Event::User(u) => println!("deploy {}", String::from_utf8_lossy(&u.payload)),
//!         other => println!("{}", other.kind()),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Errors
//! All fallible calls return [`Error`]. Agent refusals carry the agent's own text
//! ([`Error::Agent`]); a broken connection fails every waiting call and stream at once with
//! [`Error::ConnectionClosed`]; a call without a reply fails after the configured timeout.
//!
//! # Cancellation
//! Every call is cancel-safe: a dropped future leaves the connection in a consistent state
//! (requests are written whole by a writer task; late replies are read and discarded).
//! Dropping a stream handle sends `stop`.
//!
//! # Agent behaviour to know about
//! - The agent drops events for a client with 512 undelivered ones, silently: read streams
//!   promptly. This client counts what it drops itself ([`Error::Lagged`]).
//! - Stopping or closing a stream while events are being dispatched to it can crash the
//!   agent (a known bug of Serf 0.9.x): keep event streams on long-lived connections.
//! - A `members-filtered` regex that does not compile makes the agent drop the connection;
//!   this client checks regexes before sending.
#![warn(missing_docs)]

mod client;
pub mod codec;
mod error;
mod event;
mod filter;
mod protocol;
mod subscription;

pub use client::{
    Client, ClientConfig, DEFAULT_RPC_ADDR, EventStream, LogStream, MembersFilter, QueryOutcome,
    QueryParams, QueryStream, USER_EVENT_HARD_LIMIT,
};
pub use error::{Error, ErrorBody, Result};
pub use event::{
    Event, MemberEvent, MemberEventKind, QueryEvent, QueryRecord, UnknownEvent, UserEvent,
};
pub use filter::{EventFilter, FilterItem};
pub use protocol::{Coordinate, KeyResponse, Member, MemberStatus, Stats};
pub use subscription::{ConnectionState, Subscription, SubscriptionConfig, SubscriptionItem};
