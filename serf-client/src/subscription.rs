//! A reconnecting event subscription: keeps an event stream alive across agent restarts,
//! with backoff, re-handshake, re-auth and re-subscribe.
//!
//! # What is lost while disconnected
//! Serf's RPC has no replay. While the connection is down (agent restarting, network gone):
//! - **user events and queries** delivered to the agent in that time are not seen by this
//!   subscription and cannot be recovered; queries also expire within seconds;
//! - **member events** are not delivered either, but membership is a level, not an edge:
//!   after every [`SubscriptionItem::Connected`] call [`Client::members`] and compare with
//!   what you saw last to recover the joins, leaves and failures you missed;
//! - events the agent had queued for the old connection (up to 512) are gone with it.
//!
//! Each reconnect starts a new *epoch*. Query IDs belong to the connection that received the
//! query: answer with the [`Client`] handed out in the `Connected` item of the same epoch.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::client::{Client, ClientConfig, EventStream};
use crate::error::Error;
use crate::event::Event;

/// Settings of a [`Subscription`].
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// How to reach the agent.
    pub client: ClientConfig,
    /// The event filter, in Serf's syntax (see [`crate::EventFilter`]).
    pub filter: String,
    /// First delay before a reconnect attempt. Default 100 ms.
    pub initial_backoff: Duration,
    /// Longest delay between attempts. Default 5 s.
    pub max_backoff: Duration,
    /// Items buffered between the subscription's task and its consumer. Default 1024; past
    /// that the connection's own stream buffer fills and drops are reported as
    /// [`SubscriptionItem::Lagged`].
    pub capacity: usize,
}

impl SubscriptionConfig {
    /// A subscription to `filter` on the agent of `client`.
    pub fn new(client: ClientConfig, filter: impl Into<String>) -> Self {
        SubscriptionConfig {
            client,
            filter: filter.into(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            capacity: 1024,
        }
    }
}

/// The state of a subscription's connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// Trying to connect; `attempt` counts failures since the last success.
    Connecting {
        /// Attempt number, from 0.
        attempt: u32,
    },
    /// Connected and subscribed.
    Connected {
        /// Connection number, from 1; grows by one on every reconnect.
        epoch: u64,
    },
    /// Not connected; the next attempt comes after `retry_in`.
    Disconnected {
        /// Why the last connection or attempt failed.
        error: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
}

impl ConnectionState {
    /// True while connected and subscribed.
    pub fn is_connected(&self) -> bool {
        matches!(self, ConnectionState::Connected { .. })
    }
}

/// One item of a [`Subscription`], in order.
#[derive(Debug)]
#[non_exhaustive]
pub enum SubscriptionItem {
    /// A connection is up and subscribed. Events until the next `Disconnected` came over
    /// `client`'s connection. Anything between the previous `Disconnected` and this was lost
    /// (see the module docs).
    Connected {
        /// The connection (use it for `members` and `respond`).
        client: Client,
        /// Connection number.
        epoch: u64,
    },
    /// An event.
    Event(Event),
    /// The consumer was too slow and `missed` events were dropped (counted, not silent).
    Lagged {
        /// Events dropped.
        missed: u64,
    },
    /// One record could not be decoded; it is lost, the stream goes on.
    Undecodable(Error),
    /// The connection broke; reconnecting with backoff.
    Disconnected {
        /// Why.
        error: Error,
    },
}

/// An event stream that reconnects by itself. Dropping it stops its task and closes its
/// connection.
pub struct Subscription {
    rx: mpsc::Receiver<SubscriptionItem>,
    state: watch::Receiver<ConnectionState>,
    task: AbortHandle,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// Starts the subscription's task. A tokio runtime must be running.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the filter is not valid Serf syntax (checked once, here).
    pub fn start(config: SubscriptionConfig) -> Result<Subscription, Error> {
        crate::EventFilter::parse(&config.filter)?;
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let (state_tx, state) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let task = tokio::spawn(run(config, tx, state_tx)).abort_handle();
        Ok(Subscription { rx, state, task })
    }

    /// The next item; `None` only if the task has ended (it runs until dropped).
    pub async fn next(&mut self) -> Option<SubscriptionItem> {
        self.rx.recv().await
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change of the connection state.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }
}

async fn run(
    config: SubscriptionConfig,
    tx: mpsc::Sender<SubscriptionItem>,
    state: watch::Sender<ConnectionState>,
) {
    let mut attempt: u32 = 0;
    let mut epoch: u64 = 0;
    let mut jitter = Jitter::new();
    loop {
        state.send_replace(ConnectionState::Connecting { attempt });
        let error = match subscribe(&config).await {
            Ok((client, stream)) => {
                attempt = 0;
                epoch += 1;
                state.send_replace(ConnectionState::Connected { epoch });
                tracing::info!(addr = %config.client.addr, epoch, "subscribed to serf events");
                if tx
                    .send(SubscriptionItem::Connected { client, epoch })
                    .await
                    .is_err()
                {
                    return;
                }
                let Some(error) = forward(stream, &tx).await else {
                    return;
                };
                tracing::warn!(%error, epoch, "serf event stream lost; reconnecting");
                if tx
                    .send(SubscriptionItem::Disconnected {
                        error: error.clone(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                error
            }
            Err(error) => {
                tracing::debug!(%error, attempt, "cannot subscribe to serf events");
                error
            }
        };
        let delay = backoff(&config, attempt, &mut jitter);
        attempt = attempt.saturating_add(1);
        state.send_replace(ConnectionState::Disconnected {
            error: error.to_string(),
            retry_in: delay,
        });
        tokio::time::sleep(delay).await;
    }
}

async fn subscribe(config: &SubscriptionConfig) -> Result<(Client, EventStream), Error> {
    let client = Client::connect(config.client.clone()).await?;
    let stream = client.stream(&config.filter).await?;
    Ok((client, stream))
}

/// Forwards events until the stream fails (returns the error) or the consumer is gone
/// (returns `None`).
async fn forward(mut stream: EventStream, tx: &mpsc::Sender<SubscriptionItem>) -> Option<Error> {
    loop {
        let item = match stream.next().await {
            Some(Ok(ev)) => SubscriptionItem::Event(ev),
            Some(Err(Error::Lagged { missed })) => SubscriptionItem::Lagged { missed },
            Some(Err(e @ Error::Decode { .. })) => SubscriptionItem::Undecodable(e),
            Some(Err(e)) => return Some(e),
            None => return Some(Error::closed("the event stream ended")),
        };
        if tx.send(item).await.is_err() {
            return None;
        }
    }
}

fn backoff(config: &SubscriptionConfig, attempt: u32, jitter: &mut Jitter) -> Duration {
    let base = config
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(config.max_backoff);
    // Up to 20% less, so that many subscribers do not reconnect in lockstep.
    let cut = base.mul_f64(jitter.next_unit() * 0.2);
    base.saturating_sub(cut)
}

/// A small xorshift generator for backoff jitter (no need for cryptographic randomness).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Jitter(seed | 1)
    }

    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let cfg = SubscriptionConfig::new(ClientConfig::new("x:1"), "*");
        let mut j = Jitter::new();
        let d0 = backoff(&cfg, 0, &mut j);
        let d3 = backoff(&cfg, 3, &mut j);
        let d30 = backoff(&cfg, 30, &mut j);
        assert!(d0 <= Duration::from_millis(100) && d0 >= Duration::from_millis(80));
        assert!(d3 <= Duration::from_millis(800) && d3 >= Duration::from_millis(640));
        assert!(d30 <= Duration::from_secs(5) && d30 >= Duration::from_secs(4));
    }
}
