//! The connection: the state shared by the reader and writer tasks, pending calls and
//! streams by `Seq`, and the two I/O loops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, Frame, scan_frame};
use crate::error::{Error, Result};
use crate::protocol::{self, errs};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) next_seq: AtomicU64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) closed: Option<Error>,
}

/// What the reader expects for a `Seq`.
pub(super) enum Pending {
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
pub(super) struct Reply {
    pub(super) error: String,
    pub(super) body: Option<Bytes>,
}

/// What the next value on the wire is.
pub(super) enum Expect {
    Header,
    UnaryBody(oneshot::Sender<Result<Reply>>, String),
    StreamBody(u64),
    Discard,
    /// After a header for an unknown `Seq`: a header, or an orphan body to drop.
    HeaderOrOrphan,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters more than losing the connection, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(&self, seq: u64, p: Pending) -> Result<()> {
        let mut st = self.lock();
        if let Some(e) = &st.closed {
            return Err(e.clone());
        }
        st.pending.insert(seq, p);
        Ok(())
    }

    pub(super) fn closed_error(&self) -> Option<Error> {
        self.lock().closed.clone()
    }

    /// Fails every waiting call and ends every stream. Idempotent: the first reason wins.
    pub(super) fn close(&self, reason: Error) {
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

    pub(super) fn on_frame(&self, expect: Expect, frame: Bytes) -> Result<Expect> {
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

    pub(super) fn on_header(&self, frame: &[u8]) -> Result<Expect> {
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

    pub(super) fn deliver(&self, seq: u64, frame: Bytes) {
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

pub(super) fn is_query_done(frame: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(rename = "Type", default)]
        kind: String,
    }
    rmp_serde::from_slice::<T>(frame).is_ok_and(|t| t.kind == "done")
}

pub(super) async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>) {
    let reason = match read_frames(&mut rd, &shared).await {
        Ok(()) => Error::closed("the agent closed the connection"),
        Err(e) => e,
    };
    tracing::debug!(%reason, "serf rpc connection closed");
    shared.close(reason);
}

pub(super) async fn read_frames(rd: &mut OwnedReadHalf, shared: &Shared) -> Result<()> {
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

pub(super) async fn write_loop(
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
