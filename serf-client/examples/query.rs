//! Runs a query and prints acks and responses: `query NAME [PAYLOAD] [--timeout SECS]
//! [--node N]... [--tag k=regex]...` (SERF_RPC_ADDR, SERF_RPC_AUTH).

use std::time::Duration;

use serf_client::{Client, QueryParams, QueryRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut params = QueryParams::new("", Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--timeout" => {
                let secs: f64 = args.next().unwrap_or_default().parse()?;
                params.timeout = Some(Duration::from_secs_f64(secs));
            }
            "--node" => params.filter_nodes.extend(args.next()),
            "--tag" => {
                let kv = args.next().unwrap_or_default();
                let Some((k, v)) = kv.split_once('=') else {
                    anyhow::bail!("--tag takes NAME=REGEX, got {kv:?}");
                };
                params.filter_tags.insert(k.to_string(), v.to_string());
            }
            _ => positional.push(a),
        }
    }
    let mut positional = positional.into_iter();
    let Some(name) = positional.next() else {
        anyhow::bail!("usage: query NAME [PAYLOAD] [--timeout SECS] [--node N] [--tag k=regex]");
    };
    params.name = name;
    params.payload = positional.next().unwrap_or_default().into_bytes();
    let client = Client::connect_env().await?;
    let mut q = client.query(&params).await?;
    println!("Query '{}' dispatched", params.name);
    let (mut acks, mut responses) = (0, 0);
    while let Some(rec) = q.next().await {
        match rec? {
            QueryRecord::Ack { from } => {
                acks += 1;
                println!("Ack from '{from}'");
            }
            QueryRecord::Response { from, payload } => {
                responses += 1;
                println!(
                    "Response from '{from}': {}",
                    String::from_utf8_lossy(&payload).trim_end()
                );
            }
            _ => {}
        }
    }
    println!("Total Acks: {acks}\nTotal Responses: {responses}");
    Ok(())
}
