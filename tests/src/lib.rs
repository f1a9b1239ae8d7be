//! Support for the end-to-end suite: a real cluster from `KUBECONFIG` (or a loud skip), a
//! temporary namespace, the CRDs installed, and the `serf-operator` binary run as a process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// A client for the cluster `KUBECONFIG` names, or `None` after printing a loud notice that
/// the cluster suite is skipped.
pub async fn cluster_or_skip(suite: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "\n*** SKIPPED: {suite} needs a real Kubernetes cluster: set KUBECONFIG to run it ***\n"
        );
        return None;
    }
    match Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => panic!("KUBECONFIG is set but no cluster answers: {e}"),
    }
}

/// A namespace deleted when dropped.
pub struct TempNamespace {
    /// Its name.
    pub name: String,
    client: Client,
}

impl TempNamespace {
    /// Creates `serf-e2e-<tag>-<unique>`.
    ///
    /// # Errors
    /// The API error.
    pub async fn create(client: &Client, tag: &str) -> anyhow::Result<TempNamespace> {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            % 1_000_000_000;
        let name = format!("serf-e2e-{tag}-{unique}");
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))?;
        api.create(&PostParams::default(), &ns).await?;
        Ok(TempNamespace {
            name,
            client: client.clone(),
        })
    }
}

impl TempNamespace {
    /// Takes charge of the namespace `name`, made by someone else (e.g. `kubectl apply`):
    /// deleted on drop like one this crate created. A namespace of that name left by an
    /// earlier run is deleted first (waiting at most 120 s until it is gone).
    ///
    /// # Errors
    /// The API error, or the old namespace still there after 120 s.
    pub async fn adopt(client: &Client, name: &str) -> anyhow::Result<TempNamespace> {
        let api: Api<Namespace> = Api::all(client.clone());
        if api.get_opt(name).await?.is_some() {
            eprintln!("namespace {name} exists (an earlier run?): deleting it first");
            let _ = api.delete(name, &DeleteParams::background()).await;
            let deadline = Instant::now() + Duration::from_secs(120);
            while api.get_opt(name).await?.is_some() {
                anyhow::ensure!(Instant::now() < deadline, "namespace {name} is not gone");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(TempNamespace {
            name: name.to_string(),
            client: client.clone(),
        })
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        if std::env::var_os("SERF_E2E_KEEP").is_some() {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        // Delete from a thread of its own and wait for the API call, so that the namespace
        // (and every Job in it) is gone even when the test's runtime is ending.
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    api.delete(&name, &DeleteParams::background()),
                )
                .await
                .ok()?
                .ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(_))) {
            eprintln!("could not delete namespace {}", self.name);
        }
    }
}

/// Installs (server-side apply) the CRDs and waits until they are established.
///
/// # Errors
/// The API error, or a CRD not established within 30 s.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in serf_operator_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("serf-operator-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = api.get(&name).await?;
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The `serf-operator` binary, built if needed (`SERF_OPERATOR_BIN` overrides).
///
/// # Errors
/// The build failing.
pub fn operator_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SERF_OPERATOR_BIN") {
        return Ok(p.into());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "serf-operator",
            "--bin",
            "serf-operator",
        ])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "building serf-operator failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug").join("serf-operator"))
}

/// A running `serf-operator` process, killed when dropped; its log is kept in a file.
pub struct OperatorProcess {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts `serf-operator run` with `args` and `env`.
    ///
    /// # Errors
    /// The process cannot start.
    pub fn start(args: &[&str], env: &[(&str, String)], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(operator_binary()?);
        cmd.arg("run").args(args).stdout(Stdio::null()).stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(OperatorProcess {
            child: cmd.spawn()?,
            log,
        })
    }

    /// `serf-operator run` as the suites start it: serving namespace `ns` (its state lives
    /// there too), following the agent at `rpc`, metrics on 127.0.0.1:`metrics`, debug logs
    /// appended to `log`.
    ///
    /// # Errors
    /// The process cannot start.
    pub fn in_namespace(
        ns: &str,
        rpc: std::net::SocketAddr,
        metrics: u16,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start(
            &[
                "--namespaces",
                ns,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
            ],
            &[
                ("SERF_RPC_ADDR", rpc.to_string()),
                ("POD_NAMESPACE", ns.to_string()),
                ("RUST_LOG", "info,serf_operator=debug".to_string()),
            ],
            log,
        )
    }

    /// Waits (30 s at most) until the log shows the operator following its agent `times`
    /// times in all: each start and each reconnect is one.
    pub async fn following(&self, times: usize) {
        eventually(
            "the operator following its agent",
            Duration::from_secs(30),
            || async {
                (std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .matches("following the Serf agent")
                    .count()
                    >= times)
                    .then_some(())
            },
        )
        .await;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit (at most 20 s); returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        self.terminate_timed().is_some()
    }

    /// Sends SIGTERM and waits for the exit (at most 20 s); returns the time from the signal
    /// to the exit when it exited 0.
    pub fn terminate_timed(&mut self) -> Option<Duration> {
        let pid = self.child.id().to_string();
        let start = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = start + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success().then(|| start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it yields a value; panics naming `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Jobs of one route in `ns`.
pub async fn jobs(client: &Client, ns: &str, route: &str) -> Vec<Job> {
    let api: Api<Job> = Api::namespaced(client.clone(), ns);
    match api
        .list(&ListParams::default().labels(&format!("serf.operator.io/route={route}")))
        .await
    {
        Ok(list) => list.items,
        Err(e) => panic!("listing the Jobs of route {route}: {e}"),
    }
}

/// A Job's first container's environment.
pub fn env_of(job: &Job) -> std::collections::BTreeMap<String, String> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect()
}

/// The image for Jobs that must really run on a node: `SERF_E2E_IMAGE`, else the local node's
/// `localhost/busybox:static` when the node holds it, else `busybox:1.36`. `None`, after a
/// loud notice, when no node is Ready (the cluster runs no Pods).
pub async fn node_image_or_skip(client: &Client, suite: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = match nodes.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => panic!("listing nodes: {e}"),
    };
    let ready: Vec<&Node> = list
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect();
    if ready.is_empty() {
        eprintln!(
            "\n*** SKIPPED: {suite} needs a Ready node that runs Pods; the cluster has none ***\n"
        );
        return None;
    }
    if let Ok(image) = std::env::var("SERF_E2E_IMAGE") {
        return Some(image);
    }
    let local = "localhost/busybox:static";
    let has_local = ready.iter().any(|n| holds_image(n, local));
    Some(if has_local { local } else { "busybox:1.36" }.to_string())
}

fn holds_image(node: &Node, image: &str) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .is_some_and(|imgs| {
            imgs.iter().any(|i| {
                i.names
                    .as_ref()
                    .is_some_and(|n| n.iter().any(|x| x.ends_with(image)))
            })
        })
}

/// Whether a node of the cluster holds `image` (so a Pod can use it without a registry).
pub async fn node_has_image(client: &Client, image: &str) -> bool {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .list(&ListParams::default())
        .await
        .is_ok_and(|l| l.items.iter().any(|n| holds_image(n, image)))
}

/// Waits (30 s at most) for the `default` ServiceAccount of `ns`, without which no Pod can be
/// created there.
///
/// # Errors
/// The API error, or no ServiceAccount within 30 s.
pub async fn wait_for_default_service_account(client: &Client, ns: &str) -> anyhow::Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.get_opt("default").await?.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no default ServiceAccount in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// What a [`Proxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards bytes both ways.
    Pass,
    /// Accepts connections and holds every byte (an API server that hangs).
    Pause,
    /// Closes every connection and refuses new ones (an API server that is down).
    Refuse,
}

/// A TCP proxy on loopback in front of an upstream address, which a test can pause or close.
pub struct Proxy {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    ///
    /// # Errors
    /// No port to listen on.
    pub async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = tokio::sync::watch::channel(ProxyMode::Pass);
        let task = tokio::spawn(proxy_loop(Some(listener), addr, upstream, rx));
        Ok(Proxy { addr, mode, task })
    }

    /// Switches the mode.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_loop(
    mut listener: Option<tokio::net::TcpListener>,
    addr: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    loop {
        let current = *mode.borrow_and_update();
        if current == ProxyMode::Refuse {
            listener = None;
        } else if listener.is_none() {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(l) = &listener else {
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            r = mode.changed() => if r.is_err() { return },
            accepted = l.accept() => {
                if let Ok((down, _)) = accepted {
                    tokio::spawn(proxy_conn(down, upstream, mode.clone()));
                }
            }
        }
    }
}

async fn proxy_conn(
    down: tokio::net::TcpStream,
    upstream: std::net::SocketAddr,
    mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    tokio::select! {
        _ = pipe(dr, uw, mode.clone()) => {}
        _ = pipe(ur, dw, mode.clone()) => {}
    }
}

/// Copies `from` to `to` while the mode is Pass, holds the bytes while Pause, ends on Refuse.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = mode.wait_for(|m| *m == ProxyMode::Refuse) => return,
        };
        // Hold the bytes while paused.
        match mode.wait_for(|m| *m != ProxyMode::Pause).await {
            Ok(m) if *m == ProxyMode::Refuse => return,
            Ok(_) => {}
            Err(_) => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A copy of the `KUBECONFIG` file whose server is `server` (e.g. a [`Proxy`]), and the
/// original server's address.
///
/// # Errors
/// The file cannot be read, parsed or written.
pub fn kubeconfig_via(
    server: std::net::SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<(PathBuf, std::net::SocketAddr)> {
    let path = std::env::var("KUBECONFIG")?;
    let text = std::fs::read_to_string(&path)?;
    let mut v: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let mut upstream = None;
    if let Some(clusters) = v.get_mut("clusters").and_then(|c| c.as_sequence_mut()) {
        for c in clusters {
            if let Some(s) = c.get_mut("cluster").and_then(|c| c.get_mut("server")) {
                let url = s.as_str().unwrap_or_default().to_string();
                let hostport = url
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string();
                upstream = hostport.parse().ok();
                *s = serde_yaml::Value::String(format!("https://{server}"));
            }
        }
    }
    let upstream = upstream.ok_or_else(|| anyhow::anyhow!("no IP:port server in {path}"))?;
    let out = dir.join("kubeconfig-via-proxy");
    std::fs::write(&out, serde_yaml::to_string(&v)?)?;
    Ok((out, upstream))
}

/// One `GET` of the operator's admin endpoint; the response's body.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.starts_with("HTTP/1.1 200")
        .then(|| buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// A field of a process's `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`); 0 when unknown.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A process's resident set, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// utime + stime of a process, in ms (100 Hz clock ticks).
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10
}
