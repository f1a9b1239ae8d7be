//! The `serf-operator` command: `crds` writes the CRDs, `route` routes one event offline,
//! `local` follows a live Serf agent without Kubernetes.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serf_client::ClientConfig;
use serf_operator::contract::SelfNode;
use serf_operator::{local, manifests};

/// jemalloc hands memory freed after a burst (a thousand handlers synced, a storm of events)
/// back to the system, where the system allocator keeps it.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "serf-operator",
    version,
    about = "Routes HashiCorp Serf events to Kubernetes Jobs and query answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML files into a directory, or print them.
    Crds {
        /// The directory to write (one file per CRD); `-` prints them to stdout.
        #[arg(long, default_value = serf_operator_crds::CHART_CRD_DIR)]
        out: PathBuf,
    },
    /// Route one event through SerfHandler manifests and print, as YAML, the Jobs that would
    /// be created, the query answers, and why routes did not act.
    Route {
        /// SerfHandler manifests: files or directories (other kinds are ignored).
        #[arg(long = "handlers", required = true)]
        handlers: Vec<PathBuf>,
        /// The event: user:NAME, query:NAME, member-join, member-leave, member-failed,
        /// member-update or member-reap.
        #[arg(long)]
        event: String,
        /// The payload of a user event or query.
        #[arg(long, default_value = "")]
        payload: String,
        /// The Lamport time of a user event or query.
        #[arg(long, default_value_t = 1)]
        ltime: u64,
        /// A member of a member event: NAME=ADDR[:PORT][,TAG=VALUE...]; repeat for several.
        #[arg(long = "members")]
        members: Vec<String>,
        /// The operator node's name (SERF_SELF_NAME).
        #[arg(long, default_value = "local")]
        self_name: String,
        /// The operator node's tags: role=web,dc=eu.
        #[arg(long, default_value = "")]
        self_tags: String,
    },
    /// Run the operator on Kubernetes: follow the Serf agent, create Jobs for SerfHandlers,
    /// answer queries, write status. Uses the kubeconfig, or the in-cluster config.
    Run {
        /// The agent's RPC address.
        #[arg(long, env = "SERF_RPC_ADDR", default_value = serf_client::DEFAULT_RPC_ADDR)]
        rpc_addr: String,
        /// The agent's RPC auth key (never logged).
        #[arg(long, env = "SERF_RPC_AUTH", hide_env_values = true)]
        rpc_auth: Option<String>,
        /// A file holding the agent's RPC auth key (e.g. a mounted Secret).
        #[arg(long, env = "SERF_RPC_AUTH_FILE")]
        rpc_auth_file: Option<PathBuf>,
        /// Namespaces to watch, comma-separated; empty: all.
        #[arg(
            long,
            env = "SERF_OPERATOR_NAMESPACES",
            value_delimiter = ',',
            default_value = ""
        )]
        namespaces: Vec<String>,
        /// Events buffered between the agent's stream and the router.
        #[arg(long, env = "SERF_OPERATOR_QUEUE_SIZE", default_value_t = 4096)]
        queue_size: usize,
        /// Concurrent Job creates.
        #[arg(long, env = "SERF_OPERATOR_WORKERS", default_value_t = 8)]
        workers: usize,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(
            long,
            env = "SERF_OPERATOR_METRICS_ADDR",
            default_value = "0.0.0.0:8080"
        )]
        metrics_addr: std::net::SocketAddr,
        /// Namespace for the operator's own state (the membership record).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        state_namespace: String,
        /// This pod's name.
        #[arg(long, env = "POD_NAME", default_value = "")]
        pod_name: String,
        /// Log format: text or json.
        #[arg(long, env = "SERF_OPERATOR_LOG_FORMAT", default_value = "text")]
        log_format: String,
        /// Run several replicas: a Lease elects the one that acts on member events, fires
        /// triggers and prunes history.
        #[arg(long, env = "SERF_OPERATOR_LEADER_ELECT")]
        leader_elect: bool,
        /// The Lease's name (in the state namespace).
        #[arg(
            long,
            env = "SERF_OPERATOR_LEASE_NAME",
            default_value = "serf-operator"
        )]
        lease_name: String,
        /// Lease duration in seconds: how long a dead leader holds up the others.
        #[arg(long, env = "SERF_OPERATOR_LEASE_DURATION", default_value_t = 15)]
        lease_duration: u64,
        /// Seconds after its event that a Job create is still retried while the API server
        /// is unreachable or overloaded; past it the event is dropped (counted, in status).
        #[arg(long, env = "SERF_OPERATOR_LAUNCH_DEADLINE", default_value_t = 900)]
        launch_deadline: u64,
        /// Seconds one API call may take before it counts as failed (and is retried).
        #[arg(long, env = "SERF_OPERATOR_API_TIMEOUT", default_value_t = 10)]
        api_timeout: u64,
    },
    /// Write the Serf agent's config file: `{"rpc_auth": KEY}` from SERF_RPC_AUTH (RPC auth
    /// has no agent flag), or `{}` without a key. Used by the Helm chart's init container.
    AgentConfig {
        /// Where to write the file.
        #[arg(long)]
        out: PathBuf,
        /// The RPC auth key (never logged).
        #[arg(long, env = "SERF_RPC_AUTH", hide_env_values = true)]
        rpc_auth: Option<String>,
    },
    /// Follow a live Serf agent: route every event through SerfHandler manifests, print the
    /// results as YAML, and answer queries for `respond` routes.
    Local {
        /// SerfHandler manifests: files or directories (other kinds are ignored).
        #[arg(long = "handlers", required = true)]
        handlers: Vec<PathBuf>,
        /// The agent's RPC address.
        #[arg(long, env = "SERF_RPC_ADDR", default_value = serf_client::DEFAULT_RPC_ADDR)]
        rpc_addr: String,
        /// The agent's RPC auth key (never logged).
        #[arg(long, env = "SERF_RPC_AUTH", hide_env_values = true)]
        rpc_auth: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = matches!(&cli.command, Command::Run { log_format, .. } if log_format == "json");
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
    match cli.command {
        Command::Run {
            rpc_addr,
            rpc_auth,
            rpc_auth_file,
            namespaces,
            queue_size,
            workers,
            metrics_addr,
            state_namespace,
            pod_name,
            log_format,
            leader_elect,
            lease_name,
            lease_duration,
            launch_deadline,
            api_timeout,
        } => {
            if log_format != "text" && log_format != "json" {
                anyhow::bail!("--log-format must be text or json, not {log_format:?}");
            }
            let mut serf = ClientConfig::new(rpc_addr);
            serf.auth = match (rpc_auth.filter(|k| !k.is_empty()), rpc_auth_file) {
                (Some(k), _) => Some(k),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading the RPC auth key from {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => None,
            };
            let cfg = serf_operator::run::RunConfig {
                serf,
                namespaces: namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                queue_size,
                workers,
                metrics_addr,
                pod_namespace: state_namespace.clone(),
                state_namespace,
                pod_name: pod_name.clone(),
                flush_interval: std::time::Duration::from_secs(1),
                shutdown_grace: std::time::Duration::from_secs(10),
                launch_deadline: std::time::Duration::from_secs(launch_deadline),
                call_timeout: std::time::Duration::from_secs(api_timeout.max(1)),
                leader_election: leader_elect.then(|| serf_operator::run::LeaderElection {
                    lease_name,
                    identity: if pod_name.is_empty() {
                        format!("serf-operator-{}", std::process::id())
                    } else {
                        pod_name.clone()
                    },
                    duration_secs: lease_duration,
                }),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to Kubernetes (kubeconfig or in-cluster config)")?;
                serf_operator::run::run(client, cfg, shutdown_signal()).await
            })
        }
        Command::Crds { out } => write_crds(out),
        Command::AgentConfig { out, rpc_auth } => {
            let cfg = match rpc_auth.filter(|k| !k.is_empty()) {
                Some(k) => serde_json::json!({ "rpc_auth": k }),
                None => serde_json::json!({}),
            };
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&out, serde_json::to_vec(&cfg)?)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Command::Route {
            handlers,
            event,
            payload,
            ltime,
            members,
            self_name,
            self_tags,
        } => {
            let handlers = manifests::load_handlers(&handlers)?;
            let node = SelfNode {
                name: self_name,
                tags: local::parse_tags(&self_tags)?,
            };
            let event = local::event_from_args(&event, payload.as_bytes(), ltime, &members)?;
            let (text, errors) = local::route_once(&handlers, &node, &event)?;
            for e in errors {
                eprintln!("warning: {e}");
            }
            print!("{text}");
            Ok(())
        }
        Command::Local {
            handlers,
            rpc_addr,
            rpc_auth,
        } => {
            let handlers = manifests::load_handlers(&handlers)?;
            let mut client = ClientConfig::new(rpc_addr);
            client.auth = rpc_auth.filter(|k| !k.is_empty());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(local::run_local(
                handlers,
                client,
                std::io::stdout(),
                shutdown_signal(),
            ))
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

fn write_crds(out: PathBuf) -> anyhow::Result<()> {
    let files = serf_operator_crds::crd_files()?;
    if out.as_os_str() == "-" {
        for (_, yaml) in files {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for (name, yaml) in files {
        let path = out.join(name);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
