//! The `serf-operator` command: `crds` writes the CRDs, `route` routes one event offline,
//! `local` follows a live Serf agent without Kubernetes.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serf_client::ClientConfig;
use serf_operator::contract::SelfNode;
use serf_operator::{local, manifests};

/// jemalloc hands memory freed after a burst (a thousand handlers synced, a storm of events)
/// back to the system, where the system allocator keeps it. Without the `jemalloc` feature the
/// system allocator is used (heap profilers such as heaptrack see it).
#[cfg(feature = "jemalloc")]
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
        /// The payload of a user event or query, as text (it may start with `-`).
        #[arg(long, allow_hyphen_values = true, group = "payload_source")]
        payload: Option<String>,
        /// The payload's exact bytes from a file (`-`: standard input): any bytes, NUL and
        /// invalid UTF-8 included.
        #[arg(long, value_name = "PATH", group = "payload_source")]
        payload_file: Option<PathBuf>,
        /// The payload's exact bytes, base64-encoded.
        #[arg(long, value_name = "BASE64", group = "payload_source")]
        payload_base64: Option<String>,
        /// The Lamport time of a user event or query.
        #[arg(long, default_value_t = 1)]
        ltime: u64,
        /// A member of a member event: NAME=ADDR[:PORT][,TAG=VALUE...]; repeat for several.
        #[arg(long = "members")]
        members: Vec<String>,
        /// One tag of a member given with --members, any value (commas and `=` included):
        /// `--member-tag NAME TAG=VALUE`; repeat for several.
        #[arg(long = "member-tag", num_args = 2, value_names = ["MEMBER", "TAG=VALUE"], allow_hyphen_values = true)]
        member_tags: Vec<String>,
        /// The operator node's name (SERF_SELF_NAME).
        #[arg(long, default_value = "local")]
        self_name: String,
        /// The operator node's tags: role=web,dc=eu.
        #[arg(long, default_value = "")]
        self_tags: String,
        /// One tag of the operator node, any value (commas included): TAG=VALUE; repeat
        /// for several.
        #[arg(
            long = "self-tag",
            value_name = "TAG=VALUE",
            allow_hyphen_values = true
        )]
        self_tag: Vec<String>,
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
        /// Prefix of the names of the operator's state objects in the state namespace: the
        /// ConfigMaps PREFIX-membership, PREFIX-pending-launches and PREFIX-keyring, and the
        /// Lease PREFIX. Two installations in one namespace need two prefixes (the chart
        /// uses the release's name).
        #[arg(
            long,
            env = "SERF_OPERATOR_STATE_PREFIX",
            default_value = serf_operator::objects::DEFAULT_PREFIX
        )]
        state_prefix: String,
        /// The Lease's name (in the state namespace); the state prefix unless given.
        #[arg(long, env = "SERF_OPERATOR_LEASE_NAME")]
        lease_name: Option<String>,
        /// A Deployment in the state namespace (the chart's own) that owns the state objects,
        /// so that deleting it (`helm uninstall`) deletes them too.
        #[arg(long, env = "SERF_OPERATOR_OWNER_DEPLOYMENT")]
        owner_deployment: Option<String>,
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
        /// Rotate the Serf cluster's gossip keys to the keyring in this Secret (in the state
        /// namespace): the primary key under --keyring-secret-key, more keys to keep
        /// installed under `keys`. Empty: off.
        #[arg(long, env = "SERF_OPERATOR_KEYRING_SECRET", default_value = "")]
        keyring_secret: String,
        /// The keyring Secret's entry holding the primary key.
        #[arg(long, env = "SERF_OPERATOR_KEYRING_SECRET_KEY", default_value = "key")]
        keyring_secret_key: String,
        /// Seconds between checks of the cluster's keys while they match the Secret.
        #[arg(long, env = "SERF_OPERATOR_KEYRING_RECHECK", default_value_t = 60)]
        keyring_recheck: u64,
        /// Publish SerfServices: the Serf members they select as headless Services with
        /// EndpointSlices and/or ConfigMaps (needs RBAC for services, endpointslices and
        /// configmaps in the watched namespaces).
        #[arg(long, env = "SERF_OPERATOR_DISCOVERY")]
        discovery: bool,
    },
    /// Write the Serf agent's config file (mode 0600, replaced atomically): the secrets, which
    /// would be readable by anyone on the host on the agent's command line, and what the
    /// agent has no flag for. `rpc_auth` from SERF_RPC_AUTH, `encrypt_key` from
    /// SERF_ENCRYPT_KEY (checked: base64 of 16, 24 or 32 bytes), `leave_on_terminate`.
    /// Without keys: `{"leave_on_terminate": true}`. Used by the Helm chart's init container.
    AgentConfig {
        /// Where to write the file.
        #[arg(long)]
        out: PathBuf,
        /// The RPC auth key (never logged); empty: none.
        #[arg(long, env = "SERF_RPC_AUTH", hide_env_values = true)]
        rpc_auth: Option<String>,
        /// The gossip encryption key, base64 (`serf keygen`); never logged. Pass it in the
        /// environment, not on the command line.
        #[arg(long, env = "SERF_ENCRYPT_KEY", hide_env_values = true)]
        encrypt_key: Option<String>,
        /// Whether the agent leaves the cluster gracefully on SIGTERM (its peers then see
        /// member-leave, not member-failed).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leave_on_terminate: bool,
        /// More gossip keys to keep installed (the keyring Secret's `keys`: base64 keys
        /// separated by whitespace or commas); only with --keyring-file. Never logged.
        #[arg(long, env = "SERF_ENCRYPT_KEYS", hide_env_values = true)]
        encrypt_keys: Option<String>,
        /// Give the agent a keyring file here instead of `encrypt_key`: the primary key
        /// first, then the other keys, then any key the file already held (the agent writes
        /// every keyring change made over RPC into it, so a rotation survives its restart).
        /// Written with mode 0600, on a volume the agent can write.
        #[arg(long)]
        keyring_file: Option<PathBuf>,
        /// A file holding the fingerprint of the primary key the cluster uses now (the key
        /// rotation record's `primary`, mounted from its ConfigMap); when it is one of the
        /// Secret's keys, the keyring file starts with it, so that a pod started in the middle
        /// of a rotation joins with the key the others still use. Absent: ignored.
        #[arg(long)]
        primary_in_use_file: Option<PathBuf>,
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
        // Colours only on a terminal: a log file or a container log gets plain text.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            state_prefix,
            lease_name,
            owner_deployment,
            lease_duration,
            launch_deadline,
            api_timeout,
            keyring_secret,
            keyring_secret_key,
            keyring_recheck,
            discovery,
        } => {
            if log_format != "text" && log_format != "json" {
                anyhow::bail!("--log-format must be text or json, not {log_format:?}");
            }
            serf_operator::objects::set_prefix(&state_prefix)
                .map_err(|e| anyhow::anyhow!("--state-prefix: {e}"))?;
            let lease_name = lease_name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(serf_operator::objects::lease);
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
                keyring: (!keyring_secret.is_empty()).then(|| serf_operator::run::KeyringConfig {
                    secret: keyring_secret,
                    primary_entry: keyring_secret_key,
                    configmap: serf_operator::objects::keyring_record(),
                    recheck: std::time::Duration::from_secs(keyring_recheck.max(1)),
                }),
                owner_deployment: owner_deployment.filter(|d| !d.is_empty()),
                discovery,
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
        Command::AgentConfig {
            out,
            rpc_auth,
            encrypt_key,
            leave_on_terminate,
            encrypt_keys,
            keyring_file,
            primary_in_use_file,
        } => {
            let mut cfg = agent_config(rpc_auth, encrypt_key, leave_on_terminate)?;
            if let (Some(path), Some(obj)) = (keyring_file, cfg.as_object_mut())
                && let Some(primary) = obj.remove("encrypt_key")
            {
                let existing = match std::fs::read_to_string(&path) {
                    Ok(t) => Some(t),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e).with_context(|| format!("reading {}", path.display()));
                    }
                };
                let in_use = primary_in_use_file
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty());
                let text = keyring_file_contents(
                    primary.as_str().unwrap_or_default(),
                    encrypt_keys.as_deref(),
                    existing.as_deref(),
                    in_use.as_deref(),
                )?;
                write_private(&path, text.as_bytes())?;
                obj.insert(
                    "keyring_file".into(),
                    path.to_string_lossy().into_owned().into(),
                );
            }
            write_private(&out, &serde_json::to_vec(&cfg)?)
        }
        Command::Route {
            handlers,
            event,
            payload,
            payload_file,
            payload_base64,
            ltime,
            members,
            member_tags,
            self_name,
            self_tags,
            self_tag,
        } => {
            let handlers = manifests::load_handlers(&handlers)?;
            let mut tags = local::parse_tags(&self_tags)?;
            for kv in &self_tag {
                let (k, v) = local::parse_tag(kv)?;
                tags.insert(k, v);
            }
            let node = SelfNode {
                name: self_name,
                tags,
            };
            let payload: Vec<u8> = match (payload, payload_file, payload_base64) {
                (Some(text), _, _) => text.into_bytes(),
                (_, Some(path), _) if path.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .context("reading the payload from standard input")?;
                    buf
                }
                (_, Some(path), _) => std::fs::read(&path)
                    .with_context(|| format!("reading the payload from {}", path.display()))?,
                (_, _, Some(b64)) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|e| anyhow::anyhow!("--payload-base64: not base64: {e}"))?
                }
                (None, None, None) => Vec::new(),
            };
            let mut event = local::event_from_args(&event, &payload, ltime, &members)?;
            local::set_member_tags(&mut event, &member_tags)?;
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

/// The agent's config: `rpc_auth` (an empty key is none, as for `run`), `encrypt_key` (a
/// key given must be base64 of 16, 24 or 32 bytes: an agent refuses any other at start, with
/// a less helpful message) and `leave_on_terminate`. Errors never hold a key.
fn agent_config(
    rpc_auth: Option<String>,
    encrypt_key: Option<String>,
    leave_on_terminate: bool,
) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let mut cfg = serde_json::Map::new();
    cfg.insert("leave_on_terminate".into(), leave_on_terminate.into());
    if let Some(k) = rpc_auth.filter(|k| !k.is_empty()) {
        cfg.insert("rpc_auth".into(), k.into());
    }
    if let Some(k) = encrypt_key {
        let k = k.trim();
        anyhow::ensure!(
            !k.is_empty(),
            "the gossip encryption key (SERF_ENCRYPT_KEY) is set but empty"
        );
        let len = base64::engine::general_purpose::STANDARD
            .decode(k)
            .map_err(|_| anyhow::anyhow!("the gossip encryption key (SERF_ENCRYPT_KEY) is not base64 (make one with `serf keygen`)"))?
            .len();
        anyhow::ensure!(
            matches!(len, 16 | 24 | 32),
            "the gossip encryption key (SERF_ENCRYPT_KEY) is {len} bytes; Serf takes 16, 24 or 32 (make one with `serf keygen`)"
        );
        cfg.insert("encrypt_key".into(), k.into());
    }
    Ok(serde_json::Value::Object(cfg))
}

/// The agent's keyring file: the primary, the other keys, then keys the file already held
/// that are neither (the agent may have been given them over RPC; the rotation removes them
/// once the Secret no longer has them). When `in_use` (a fingerprint: the primary the
/// cluster uses now) names one of these keys, that key goes first. Errors never hold a key.
fn keyring_file_contents(
    primary: &str,
    others: Option<&str>,
    existing: Option<&str>,
    in_use: Option<&str>,
) -> anyhow::Result<String> {
    use serf_operator::keyring::{Key, Keyring};
    let mut data = std::collections::BTreeMap::new();
    data.insert("key".to_string(), primary.as_bytes().to_vec());
    if let Some(o) = others {
        data.insert("keys".to_string(), o.as_bytes().to_vec());
    }
    let ring = Keyring::from_secret_data(&data).map_err(|e| {
        anyhow::anyhow!("the gossip keyring (SERF_ENCRYPT_KEY, SERF_ENCRYPT_KEYS): {e}")
    })?;
    let mut keys: Vec<String> = ring.all().map(|k| k.expose().to_string()).collect();
    if let Some(text) = existing {
        match serde_json::from_str::<Vec<String>>(text) {
            Ok(held) => {
                for k in held.iter().filter_map(|k| Key::parse(k).ok()) {
                    if !ring.contains(k.expose()) {
                        keys.push(k.expose().to_string());
                    }
                }
            }
            Err(_) => eprintln!("the existing keyring file is not a JSON list of keys; rewritten"),
        }
    }
    if let Some(fp) = in_use
        && let Some(i) = keys
            .iter()
            .position(|k| serf_operator::keyring::fingerprint_of(k) == fp)
    {
        let k = keys.remove(i);
        keys.insert(0, k);
    }
    Ok(serde_json::to_string(&keys)?)
}

/// Writes `bytes` to `out` readable by its owner only: into a temporary file of the same
/// directory, created with mode 0600 (never wider, not even for a moment), then renamed over
/// `out`. A reader sees the old file or the new one, never a part.
fn write_private(out: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let name = out
        .file_name()
        .with_context(|| format!("{} names no file", out.display()))?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // Left by an earlier attempt that died (in a container, the same pid every time).
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const KEY: &str = "5Ryvsc0TikrmZ36jAtWvRQ=="; // 16 bytes

    fn read(path: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn agent_config_holds_the_keys_in_a_file_of_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/agent.json");
        let cfg = agent_config(Some("tok".into()), Some(format!(" {KEY}\n")), true).unwrap();
        write_private(&out, &serde_json::to_vec(&cfg).unwrap()).unwrap();
        assert_eq!(
            read(&out),
            serde_json::json!({"leave_on_terminate": true, "rpc_auth": "tok", "encrypt_key": KEY})
        );
        assert_eq!(mode(&out), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.json"], "no temporary file left behind");
    }

    #[test]
    fn the_keyring_file_has_the_primary_first_and_keeps_keys_the_agent_held() {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
        let c = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
        let text = keyring_file_contents(KEY, Some(&format!("{b}\n")), None, None).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&text).unwrap(),
            [KEY, &b]
        );
        // After a restart: the file the agent kept (a rotation made `c` the primary there).
        let kept = serde_json::to_string(&[&c, KEY]).unwrap();
        let text = keyring_file_contents(KEY, None, Some(&kept), None).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&text).unwrap(),
            [KEY, &c]
        );
        // In mid-rotation the cluster still uses the old key (kept in `keys`): it goes first.
        let fp = serf_operator::keyring::fingerprint_of(&b);
        let text = keyring_file_contents(KEY, Some(&b), None, Some(&fp)).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&text).unwrap(),
            [&b, KEY]
        );
        let text = keyring_file_contents(KEY, Some(&b), None, Some("000000000000")).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&text).unwrap(),
            [KEY, &b]
        );
        let e = keyring_file_contents(KEY, Some("nope!"), None, None).unwrap_err();
        assert!(format!("{e:#}").contains("SERF_ENCRYPT_KEYS"), "{e:#}");
    }

    #[test]
    fn agent_config_without_keys_has_the_settings_only() {
        let cfg = agent_config(None, None, true).unwrap();
        assert_eq!(cfg, serde_json::json!({"leave_on_terminate": true}));
        let cfg = agent_config(Some(String::new()), None, false).unwrap();
        assert_eq!(cfg, serde_json::json!({"leave_on_terminate": false}));
    }

    #[test]
    fn a_bad_encrypt_key_is_refused_without_showing_it() {
        for bad in ["", "  ", "not base64!", "c2hvcnQ="] {
            let e = agent_config(None, Some(bad.to_string()), true).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains("SERF_ENCRYPT_KEY"), "{msg}");
            if !bad.trim().is_empty() {
                assert!(!msg.contains(bad.trim()), "the key is in the error: {msg}");
            }
        }
        for len in [24, 32] {
            use base64::Engine as _;
            let k = base64::engine::general_purpose::STANDARD.encode(vec![7u8; len]);
            assert!(agent_config(None, Some(k), true).is_ok(), "{len} bytes");
        }
    }

    #[test]
    fn write_private_replaces_a_wider_file_and_a_stale_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("agent.json");
        std::fs::write(&out, "old").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(dir.path().join(".agent.json.tmp"), "stale").unwrap();
        write_private(&out, b"{}").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"{}");
        assert_eq!(mode(&out), 0o600, "a new file, not the old one rewritten");
        assert!(!dir.path().join(".agent.json.tmp").exists());
    }
}
