//! Fires a user event: `event NAME [PAYLOAD] [--no-coalesce]` (SERF_RPC_ADDR, SERF_RPC_AUTH).

use serf_client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let coalesce = !args.iter().any(|a| a == "--no-coalesce");
    let mut pos = args.iter().filter(|a| !a.starts_with("--"));
    let Some(name) = pos.next() else {
        anyhow::bail!("usage: event NAME [PAYLOAD] [--no-coalesce]");
    };
    let payload = pos.next().map(String::as_str).unwrap_or("");
    let client = Client::connect_env().await?;
    client.event(name, payload.as_bytes(), coalesce).await?;
    println!("Event '{name}' dispatched! Coalescing enabled: {coalesce}");
    Ok(())
}
