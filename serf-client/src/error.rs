//! Errors returned by the client, its streams and the reconnecting subscription.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::KeyResponse;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a Serf agent.
///
/// Errors fall in two groups. *Call errors* ([`Error::Agent`], [`Error::Invalid`],
/// [`Error::Decode`], [`Error::Timeout`], [`Error::Lagged`]) concern one call or one record;
/// the connection stays usable. *Connection errors* ([`Error::Io`], [`Error::Protocol`],
/// [`Error::ConnectionClosed`], [`Error::Auth`]) mean the connection is gone: every waiting
/// call and every open stream on it fails with [`Error::ConnectionClosed`] and the client must
/// be reconnected (see [`crate::Subscription`] for a stream that does this by itself).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket error while connecting, reading or writing.
    #[error("i/o error talking to the serf agent: {0}")]
    Io(#[source] Arc<std::io::Error>),

    /// The agent answered the command with an error string, for example
    /// `Invalid event filter` or `user event exceeds configured limit of 512 bytes before
    /// encoding`. `body` carries the reply body that some commands (join and the keyring
    /// commands) send even on error.
    #[error("serf agent refused {command}: {message}")]
    Agent {
        /// The RPC command that failed (`event`, `join`, ...).
        command: &'static str,
        /// The agent's error text, verbatim.
        message: String,
        /// The body the agent sent along with the error, if any.
        body: Option<Box<ErrorBody>>,
    },

    /// Authentication failed or is required (`Invalid authentication token`,
    /// `Authentication required`). The connection is closed by the client afterwards.
    #[error("serf agent authentication failed: {0}")]
    Auth(String),

    /// The bytes from the agent do not follow the protocol (not msgpack, a header that is
    /// not a `{Seq, Error}` map, a frame over the size limit). The connection is closed.
    #[error("serf rpc protocol violation: {0}")]
    Protocol(String),

    /// One record or reply body could not be decoded into its type. Only that record is
    /// lost; the connection and the stream stay open.
    #[error("cannot decode {what} from the serf agent: {message}")]
    Decode {
        /// What was being decoded (`members reply`, `event record`, ...).
        what: &'static str,
        /// The decoder's message.
        message: String,
    },

    /// The connection is closed; `reason` says why (agent gone, protocol violation, client
    /// dropped). Every waiting call and every stream of the connection gets this error.
    #[error("serf agent connection closed: {reason}")]
    ConnectionClosed {
        /// Why the connection closed.
        reason: Arc<str>,
    },

    /// No reply within the configured call timeout. The connection stays open and a late
    /// reply is read and discarded.
    #[error("serf agent did not answer {command} within {after:?}")]
    Timeout {
        /// The RPC command.
        command: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },

    /// The request was refused by the client before it was sent (a regex that does not
    /// compile, an invalid event filter, a payload over Serf's hard limit).
    #[error("invalid request: {0}")]
    Invalid(String),

    /// The consumer of a stream fell behind: `missed` records were dropped because the
    /// stream's buffer was full. The stream goes on with the records that follow.
    #[error("stream consumer fell behind: {missed} record(s) dropped")]
    Lagged {
        /// How many records were dropped since the last report.
        missed: u64,
    },
}

/// A reply body that the agent sends together with an error.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ErrorBody {
    /// `join`: how many nodes were joined before the failure.
    Join {
        /// Nodes joined.
        num: i32,
    },
    /// Keyring commands: per-node messages and counts.
    Keys(KeyResponse),
}

impl Error {
    /// True when the error means the connection is unusable and must be re-established.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Io(_) | Error::Protocol(_) | Error::ConnectionClosed { .. } | Error::Auth(_)
        )
    }

    /// The agent's error text when the agent refused the request.
    pub fn agent_message(&self) -> Option<&str> {
        match self {
            Error::Agent { message, .. } => Some(message),
            Error::Auth(message) => Some(message),
            _ => None,
        }
    }

    pub(crate) fn closed(reason: impl Into<Arc<str>>) -> Self {
        Error::ConnectionClosed {
            reason: reason.into(),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}
