//! Streams (`stream`, `monitor`, `query`): the raw record stream and its typed handles.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::codec;
use crate::error::{Error, Result};
use crate::event::{Event, QueryRecord, decode_log};
use crate::protocol::{self, cmd};

use super::*;

impl Client {
    /// `stop`: stops the stream or monitor opened with `seq`. Always succeeds on the agent.
    pub(super) async fn stop(&self, seq: u64) -> Result<()> {
        self.call_empty(cmd::STOP, Some(&protocol::StopRequest { stop: seq }))
            .await
    }

    pub(super) async fn open_stream<B: Serialize>(
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

/// The record stream under the typed handles.
pub(super) struct RawStream {
    pub(super) client: Client,
    pub(super) seq: u64,
    pub(super) rx: mpsc::Receiver<Bytes>,
    pub(super) missed: Arc<AtomicU64>,
    pub(super) reported: u64,
    /// False once the agent has ended it (query done, refused) or it was stopped.
    pub(super) open: bool,
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
    pub(super) async fn next(&mut self) -> Option<Result<Bytes>> {
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
    pub(super) fn dropped(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// Turns the pending entry into a tombstone so late records are consumed.
    pub(super) fn tombstone(&mut self) -> bool {
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

    pub(super) async fn stop(mut self) -> Result<()> {
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
    pub(super) raw: RawStream,
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
    pub(super) raw: RawStream,
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
    pub(super) raw: RawStream,
    pub(super) done: bool,
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
    ///
    /// Acks and responses from no node (an empty `From`) are skipped: at the deadline the
    /// agent closes the query's channels, and until its own timer fires its RPC loop reads
    /// zero values from them and sends each as an ack or a response. Under load that is
    /// dozens of `("", [])` records after the real ones.
    pub async fn next(&mut self) -> Option<Result<QueryRecord>> {
        loop {
            if self.done {
                return None;
            }
            match self.raw.next().await {
                Some(r) => {
                    let rec = r.and_then(|b| QueryRecord::decode(&b));
                    match &rec {
                        Ok(QueryRecord::Done) => {
                            self.done = true;
                            self.raw.open = false;
                        }
                        Ok(QueryRecord::Ack { from } | QueryRecord::Response { from, .. })
                            if from.is_empty() =>
                        {
                            continue;
                        }
                        _ => {}
                    }
                    return Some(rec);
                }
                None => {
                    // The agent's `done` was lost to a full buffer; the stream did end.
                    self.done = true;
                    return None;
                }
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
