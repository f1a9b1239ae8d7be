//! Prints each event of the agent as one JSON line (SERF_RPC_ADDR, SERF_RPC_AUTH), reconnecting
//! when the agent restarts. Optional argument: a Serf event filter (default `*`).

mod common;

use serde_json::json;
use serf_client::{ClientConfig, Subscription, SubscriptionConfig, SubscriptionItem};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let filter = std::env::args().nth(1).unwrap_or_else(|| "*".to_string());
    let mut sub = Subscription::start(SubscriptionConfig::new(ClientConfig::from_env(), filter))?;
    loop {
        let item = tokio::select! {
            item = sub.next() => item,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        match item {
            SubscriptionItem::Event(ev) => println!("{}", common::event_json(&ev)),
            SubscriptionItem::Connected { client, epoch } => {
                eprintln!("connected to {} (connection {epoch})", client.addr())
            }
            SubscriptionItem::Disconnected { error } => {
                eprintln!("disconnected: {error}; reconnecting")
            }
            SubscriptionItem::Lagged { missed } => {
                println!("{}", json!({ "lagged": missed }))
            }
            SubscriptionItem::Undecodable(e) => eprintln!("undecodable record: {e}"),
            _ => {}
        }
    }
}
