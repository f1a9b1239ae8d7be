//! Lists the agent's members, like `serf members` (SERF_RPC_ADDR, SERF_RPC_AUTH).

mod common;

use serf_client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect_env().await?;
    let json = std::env::args().any(|a| a == "--json");
    for m in client.members().await? {
        if json {
            println!("{}", common::member_json(&m));
        } else {
            let tags: Vec<String> = m.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{}\t{}:{}\t{}\t{}",
                m.name,
                m.addr,
                m.port,
                m.status,
                tags.join(",")
            );
        }
    }
    Ok(())
}
