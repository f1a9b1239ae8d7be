//! End to end: the Helm chart installed with the real Helm engine (helm-python-sdk) on a real
//! node of this machine, its pod on the node's network next to a Serf agent the test starts
//! outside Kubernetes, whose event handler logs every event it sees. Needs KUBECONFIG, a
//! Ready node whose address is this machine's, the operator's image on that node
//! (`localhost/serf-operator:dev`, or SERF_E2E_OPERATOR_IMAGE) and a Python with
//! helm-python-sdk (`target/test-venv`, made by scripts/test.sh, or SERF_E2E_HELM_PYTHON);
//! without one of them it is skipped, loudly.
//!
//! What it checks: the pod becomes Ready; neither the gossip key nor the RPC key is on any
//! command line of the machine; the agent's config file is mode 0600; deleting the pod and a
//! rollout show the outside agent member-leave and member-join, never member-failed; a pod
//! whose join address does not answer starts anyway (no crash loop), is not Ready, and is
//! Ready once the address answers; with exactly the chart's RBAC, a user event becomes a Job
//! and the handler's launch ledger records it. A second test rotates the gossip keys of a
//! Serf cluster of four from the Secret (see its doc); a third installs two releases side
//! by side in one namespace (see its doc).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serf_operator_crds::SerfHandler;
use serf_operator_e2e::{
    TempNamespace, cluster_or_skip, install_crds, wait_for_default_service_account,
};
use serf_testkit::{Agent, AgentConfig};

const SUITE: &str = "the chart suite";
const RELEASE: &str = "serf-chart-e2e";

/// Installs or uninstalls the release with helm-python-sdk; the arguments come as JSON on
/// stdin. Helm reads KUBECONFIG itself.
const HELM: &str = r#"
import json, sys, helm_python
a = json.load(sys.stdin)
cfg = helm_python.Config(namespace=a["namespace"])
if a["op"] == "install":
    cfg.install(a["chart"], a["release"], a["values"], namespace=a["namespace"])
else:
    cfg.uninstall(a["release"], ignore_not_found=True)
"#;

/// Logs each member line of every event the outside agent sees: `EVENT NAME ...`.
const HANDLER: &str = r#"#!/bin/sh
while IFS= read -r line || [ -n "$line" ]; do
  printf '%s %s\n' "$SERF_EVENT" "$line"
done >> "$(dirname "$0")/events.log"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_survives_its_own_life_cycle() {
    let Some(client) = cluster_or_skip(SUITE).await else {
        return;
    };
    let Some(image) = local_node_with_image_or_skip(&client).await else {
        return;
    };
    let Some(python) = helm_python_or_skip().await else {
        return;
    };
    // The CRDs as the other suites install them (from the types); Helm gets the chart
    // without them, so that it never fights over CRDs another suite or release applied.
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "chart").await.unwrap();
    let ns = ns.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-chart-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let chart = work.join("serf-operator");
    copy_chart_without_crds(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/serf-operator"),
        &chart,
    );
    let handler = work.join("handler.sh");
    std::fs::write(&handler, HANDLER).unwrap();
    std::fs::set_permissions(
        &handler,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let events_log = work.join("events.log");
    eprintln!("outside agent's events: {}", events_log.display());

    // The keys: Secrets for the chart; the outside agent reads them from its config file, so
    // that no command line on this machine holds them.
    let gossip = serf_testkit::keygen().unwrap();
    let token = format!("rpc-{}-{}", std::process::id(), unix_millis());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, value) in [("serf-keys", &gossip), ("serf-rpc", &token)] {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "stringData": {"key": value},
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let mut outside = Agent::start(
        AgentConfig::new("e2e-chart-outside")
            .config_entry("encrypt_key", gossip.clone())
            .rpc_auth(token.clone())
            .event_handler(handler.to_str().unwrap()),
        &[],
    )
    .unwrap();
    let events = Events(events_log);

    let free = || serf_testkit::free_port().unwrap();
    let (bind_port, rpc_port, metrics_port) = (free(), free(), free());
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let values = serde_json::json!({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "watchNamespaces": [ns],
        "hostNetwork": true,
        "tolerations": [{"operator": "Exists"}],
        "serf": {
            "join": [outside.bind_addr().to_string()],
            "retryInterval": "1s",
            "bindAddr": "127.0.0.1",
            "bindPort": bind_port,
            "advertiseAddr": "127.0.0.1",
            "rpcPort": rpc_port,
            "role": "operator",
            "encryptKeySecret": {"name": "serf-keys"},
            "rpcAuthSecret": {"name": "serf-rpc"},
        },
        "operator": {"logFormat": "text", "extraEnv": api_server_env().await},
        "metrics": {"port": metrics_port},
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut figures = Vec::new();

    // Install: Ready, joined.
    let t = Instant::now();
    helm(&python, &chart, "install", &ns, &values).await;
    let pod = ready_pod(&pods, None, Duration::from_secs(90)).await;
    figures.push(format!(
        "install → pod Ready: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    events
        .wait_for("member-join", &pod, Duration::from_secs(30))
        .await;

    // With exactly the chart's permissions: a user event at the outside agent becomes a Job,
    // and the handler's launch ledger is read (one list of its ConfigMaps) and written.
    let t = Instant::now();
    let (job, segment) = launch_under_the_charts_rbac(&client, &ns, &outside, &token).await;
    figures.push(format!(
        "user event → Job {job} and launch ledger {segment}, under the chart's RBAC: {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    // No key on any command line of this machine (the node is this machine); the agent's
    // config file, seen through its process's root, is private.
    assert_eq!(
        processes_showing(gossip.as_bytes()),
        Vec::<String>::new(),
        "the gossip key is on a command line"
    );
    assert_eq!(
        processes_showing(token.as_bytes()),
        Vec::<String>::new(),
        "the RPC key is on a command line"
    );
    let (pid, cmdline) = agent_process(&pod).expect("the pod's serf agent runs on this machine");
    assert!(
        cmdline.contains(&format!("-retry-join={}", outside.bind_addr())),
        "{cmdline}"
    );
    assert!(!cmdline.contains("-encrypt"), "{cmdline}");
    let config = PathBuf::from(format!("/proc/{pid}/root/serf-config/agent.json"));
    match std::fs::metadata(&config) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt as _;
            assert_eq!(m.mode() & 0o777, 0o600, "mode of the agent's config file");
            assert_eq!(m.uid(), 65532, "owner of the agent's config file");
            figures.push("agent's config file: mode 0600, uid 65532".into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "NOTE: {} is not readable here ({e}): mode not checked",
                config.display()
            );
        }
        Err(e) => panic!("{}: {e}", config.display()),
    }

    // Deleting the pod: the outside agent sees it leave, then its successor join.
    let t = Instant::now();
    pods.delete(&pod, &DeleteParams::default()).await.unwrap();
    events
        .wait_for("member-leave", &pod, Duration::from_secs(45))
        .await;
    figures.push(format!(
        "pod deleted → member-leave at the outside agent: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let pod = ready_pod(&pods, Some(&pod), Duration::from_secs(90)).await;
    figures.push(format!(
        "pod deleted → successor Ready: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    events
        .wait_for("member-join", &pod, Duration::from_secs(30))
        .await;

    // A rollout: leave and join again.
    let t = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .patch(
            RELEASE,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": unix_millis().to_string()}}}}}),
            ),
        )
        .await
        .unwrap();
    events
        .wait_for("member-leave", &pod, Duration::from_secs(45))
        .await;
    let pod = ready_pod(&pods, Some(&pod), Duration::from_secs(90)).await;
    figures.push(format!(
        "rollout → new pod Ready: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    events
        .wait_for("member-join", &pod, Duration::from_secs(30))
        .await;

    // The join address goes away: the pod, alone, is not Ready. Its successor starts while
    // the address does not answer (no crash loop), and is Ready once it answers.
    outside.kill().unwrap();
    wait_not_ready(&pods, &pod, Duration::from_secs(60)).await;
    pods.delete(&pod, &DeleteParams::default()).await.unwrap();
    let next = running_pod(&pods, &pod, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let p = pods.get(&next).await.unwrap();
    assert!(
        !is_ready(&p),
        "{next} is Ready while its join address is down"
    );
    assert_eq!(
        restarts(&p),
        0,
        "{next} restarted while its join address was down"
    );
    let t = Instant::now();
    outside.restart(&[]).unwrap();
    let pod = ready_pod(&pods, Some(&pod), Duration::from_secs(60)).await;
    assert_eq!(pod, next);
    figures.push(format!(
        "join address back → pod Ready: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    assert_eq!(restarts(&pods.get(&pod).await.unwrap()), 0);

    // Uninstall: a last leave.
    helm(&python, &chart, "uninstall", &ns, &values).await;
    events
        .wait_for("member-leave", &pod, Duration::from_secs(45))
        .await;

    let seen = events.all();
    let count = |kind: &str| {
        seen.iter()
            .filter(|(e, n)| e == kind && n.starts_with(RELEASE))
            .count()
    };
    figures.push(format!(
        "operator pods seen by the outside agent: member-join {}, member-leave {}, member-failed {}",
        count("member-join"),
        count("member-leave"),
        count("member-failed")
    ));
    eprintln!("\n{SUITE}:\n  {}\n", figures.join("\n  "));
    assert_eq!(count("member-failed"), 0, "events: {seen:?}");
    assert_eq!(count("member-leave"), 3, "events: {seen:?}");
    let _ = std::fs::remove_dir_all(&work);
}

/// Applies a SerfHandler routing the user event `chart-e2e` to a Job, fires the event at the
/// outside agent until the chart's operator launches it (the handler may not be in its
/// cache yet), and waits for the handler's launch ledger to record the Job. Returns the
/// Job's name and the ledger segment's.
async fn launch_under_the_charts_rbac(
    client: &Client,
    ns: &str,
    outside: &Agent,
    token: &str,
) -> (String, String) {
    let handlers: Api<SerfHandler> = Api::namespaced(client.clone(), ns);
    let handler = serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "chart-e2e", "namespace": ns},
        "spec": {"routes": [{"name": "go", "events": "user:chart-e2e", "job": {"spec": {
            "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}}]}
    });
    handlers
        .patch(
            "chart-e2e",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&handler),
        )
        .await
        .unwrap();
    let serf = serf_client::Client::connect(
        serf_client::ClientConfig::new(outside.rpc_addr().to_string()).with_auth(token),
    )
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let by_handler = ListParams::default().labels("serf.operator.io/handler=chart-e2e");
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        if let Some(j) = jobs
            .list(&by_handler)
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
        {
            break j.metadata.name.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the chart's operator launched no Job for user:chart-e2e within 60 s"
        );
        serf.event("chart-e2e", b"", false).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(cm) = configmaps.get_opt("chart-e2e-serf-launched").await.unwrap() {
            let seq = cm
                .metadata
                .annotations
                .unwrap_or_default()
                .remove("serf.operator.io/ledger-sequence");
            let text = cm.data.unwrap_or_default().remove("launched");
            if text.is_some_and(|t| t.lines().any(|l| l.starts_with(&format!("{job} ")))) {
                assert_eq!(seq.as_deref(), Some("0"), "the ledger's first segment");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the launch ledger did not record {job} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    handlers
        .delete("chart-e2e", &DeleteParams::default())
        .await
        .unwrap();
    (job, "chart-e2e-serf-launched".into())
}

/// The outside agent's event log.
struct Events(PathBuf);

impl Events {
    /// Every (event, member name) logged so far.
    fn all(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect()
    }

    async fn wait_for(&self, event: &str, member: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.all().iter().any(|(e, n)| e == event && n == member) {
            assert!(
                Instant::now() < deadline,
                "no {event} of {member} at the outside agent; it saw {:?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// The image on a Ready node that is this machine (its address can be bound here), or `None`
/// after a loud notice.
async fn local_node_with_image_or_skip(client: &Client) -> Option<String> {
    let image = std::env::var("SERF_E2E_OPERATOR_IMAGE")
        .unwrap_or_else(|_| "localhost/serf-operator:dev".into());
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default()).await.unwrap().items;
    let ready_here: Vec<&Node> = list
        .iter()
        .filter(|n| {
            let st = n.status.as_ref();
            let ready = st
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let here = st.and_then(|s| s.addresses.as_ref()).is_some_and(|a| {
                a.iter().any(|a| {
                    a.type_ == "InternalIP"
                        && a.address
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| std::net::TcpListener::bind((ip, 0)).is_ok())
                })
            });
            ready && here
        })
        .collect();
    if ready_here.is_empty() {
        eprintln!(
            "\n*** SKIPPED: {SUITE} needs a Ready node on this machine (the pod runs on the \
             node's network next to a Serf agent the test starts); the cluster has none ***\n"
        );
        return None;
    }
    let has_image = ready_here.iter().any(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.images.as_ref())
            .is_some_and(|imgs| {
                imgs.iter().any(|i| {
                    i.names
                        .as_ref()
                        .is_some_and(|n| n.iter().any(|x| x.ends_with(&image)))
                })
            })
    });
    if !has_image {
        eprintln!(
            "\n*** SKIPPED: {SUITE} needs the operator's image {image} on the node (build it \
             from this tree and import it, or set SERF_E2E_OPERATOR_IMAGE) ***\n"
        );
        return None;
    }
    Some(image)
}

/// A Python that imports helm_python, or `None` after a loud notice.
async fn helm_python_or_skip() -> Option<PathBuf> {
    let python = match std::env::var_os("SERF_E2E_HELM_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("test-venv/bin/python"),
    };
    let ok = tokio::process::Command::new(&python)
        .args(["-c", "import helm_python"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n*** SKIPPED: {SUITE} needs the Helm engine: {} with helm-python-sdk (scripts/test.sh \
             makes it; or set SERF_E2E_HELM_PYTHON) ***\n",
            python.display()
        );
        return None;
    }
    Some(python)
}

/// Where a pod on the node's network reaches the API server, when the kubeconfig's server is
/// a loopback address (no Service leads there): KUBERNETES_SERVICE_HOST and _PORT.
async fn api_server_env() -> serde_json::Value {
    let cfg = kube::Config::infer().await.unwrap();
    let url = &cfg.cluster_url;
    match url.host().map(|h| h.trim_matches(['[', ']'])) {
        Some(h)
            if h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()) =>
        {
            serde_json::json!([
                {"name": "KUBERNETES_SERVICE_HOST", "value": h},
                {"name": "KUBERNETES_SERVICE_PORT", "value": url.port_u16().unwrap_or(443).to_string()},
            ])
        }
        _ => serde_json::json!([]),
    }
}

/// The chart's files, `crds/` left out.
fn copy_chart_without_crds(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "crds" {
                copy_chart_without_crds(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

async fn helm(python: &Path, chart: &Path, op: &str, ns: &str, values: &serde_json::Value) {
    helm_release(python, chart, op, ns, RELEASE, values).await;
}

async fn helm_release(
    python: &Path,
    chart: &Path,
    op: &str,
    ns: &str,
    release: &str,
    values: &serde_json::Value,
) {
    use tokio::io::AsyncWriteExt as _;
    let args = serde_json::json!({
        "op": op, "chart": chart, "release": release, "namespace": ns, "values": values,
    });
    let mut child = tokio::process::Command::new(python)
        .args(["-c", HELM])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(args.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "helm {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

/// The release's pods not being deleted.
async fn live_pods(pods: &Api<Pod>) -> Vec<Pod> {
    live_pods_of(pods, RELEASE).await
}

/// The pods of `release` not being deleted.
async fn live_pods_of(pods: &Api<Pod>, release: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn describe(list: &[Pod]) -> String {
    list.iter()
        .map(|p| {
            format!(
                "{}: {}",
                p.metadata.name.clone().unwrap_or_default(),
                serde_json::to_string(&p.status).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits for a pod matching `pred`, other than `not`; its name.
async fn wait_pod(
    pods: &Api<Pod>,
    not: Option<&str>,
    what: &str,
    within: Duration,
    pred: fn(&Pod) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let list = live_pods(pods).await;
        if let Some(p) = list
            .iter()
            .find(|p| p.metadata.name.as_deref() != not && pred(p))
        {
            return p.metadata.name.clone().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} pod within {within:?}:\n{}",
            describe(&list)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn ready_pod(pods: &Api<Pod>, not: Option<&str>, within: Duration) -> String {
    wait_pod(pods, not, "Ready", within, is_ready).await
}

async fn running_pod(pods: &Api<Pod>, not: &str, within: Duration) -> String {
    wait_pod(pods, Some(not), "running", within, |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            })
    })
    .await
}

async fn wait_not_ready(pods: &Api<Pod>, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while is_ready(&pods.get(name).await.unwrap()) {
        assert!(
            Instant::now() < deadline,
            "{name} still Ready {within:?} after its only peer went away"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The command lines of this machine's processes that hold `needle`.
fn processes_showing(needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

/// The pid and command line of the pod's `serf agent` on this machine.
fn agent_process(pod: &str) -> Option<(u32, String)> {
    let node = format!("-node={pod}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (args.len() > 2
                && args[0].ends_with("serf")
                && args[1] == "agent"
                && args.contains(&node))
            .then(|| (pid, args.join(" ")))
        })
}

/// Gossip key rotation on the real node with the chart: an encrypted Serf cluster of four
/// (three agents outside Kubernetes with keyring files, and the chart's pod), the Secret's
/// key replaced, one outside agent killed as the rotation begins; the rotation finishes
/// without it, reports it, and counts once; every alive agent's keyring file (the pod's
/// too) holds the new key only; the pod's agent container killed comes back with the
/// rotated keyring (its keyring file) and rejoins; a new pod starts from the Secret and
/// rotates nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rotates_the_gossip_keys_of_the_whole_cluster() {
    const KEYS_SUITE: &str = "the chart's key rotation";
    let Some(client) = cluster_or_skip(KEYS_SUITE).await else {
        return;
    };
    let Some(image) = local_node_with_image_or_skip(&client).await else {
        return;
    };
    let Some(python) = helm_python_or_skip().await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns = TempNamespace::create(&client, "keys").await.unwrap();
    let ns = ns.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-keys-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let chart = work.join("serf-operator");
    copy_chart_without_crds(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/serf-operator"),
        &chart,
    );

    let (old, new) = (
        serf_testkit::keygen().unwrap(),
        serf_testkit::keygen().unwrap(),
    );
    let token = format!("rpc-{}-{}", std::process::id(), unix_millis());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, value) in [("serf-keys", &old), ("serf-rpc", &token)] {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "stringData": {"key": value},
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let (o, t) = (old.clone(), token.clone());
    let mut outside = tokio::task::spawn_blocking(move || {
        serf_testkit::Cluster::start(
            (1..=3)
                .map(|i| {
                    AgentConfig::new(format!("e2e-keys-out-{i}"))
                        .keyring([o.clone()])
                        .rpc_auth(t.clone())
                })
                .collect(),
        )
        .unwrap()
    })
    .await
    .unwrap();

    let free = || serf_testkit::free_port().unwrap();
    let (bind_port, rpc_port, metrics_port) = (free(), free(), free());
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let values = serde_json::json!({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "watchNamespaces": [ns],
        "hostNetwork": true,
        "tolerations": [{"operator": "Exists"}],
        "serf": {
            "join": [outside[0].bind_addr().to_string()],
            "retryInterval": "1s",
            "bindAddr": "127.0.0.1",
            "bindPort": bind_port,
            "advertiseAddr": "127.0.0.1",
            "rpcPort": rpc_port,
            "encryptKeySecret": {"name": "serf-keys"},
            "rpcAuthSecret": {"name": "serf-rpc"},
        },
        "operator": {"logFormat": "text", "extraEnv": api_server_env().await},
        "metrics": {"port": metrics_port},
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut figures = Vec::new();
    helm(&python, &chart, "install", &ns, &values).await;
    let pod = ready_pod(&pods, None, Duration::from_secs(90)).await;
    let status = |want: &'static str| {
        let configmaps = configmaps.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let data = configmaps
                    .get_opt(&format!("{RELEASE}-keyring"))
                    .await
                    .unwrap()
                    .and_then(|c| c.data)
                    .unwrap_or_default();
                if data.get("step").map(String::as_str) == Some("InSync")
                    && data
                        .get("lastRotation")
                        .map(String::as_str)
                        .unwrap_or("")
                        .contains(want)
                {
                    return data;
                }
                assert!(
                    Instant::now() < deadline,
                    "the rotation record never showed InSync with {want:?}: {data:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    // The cluster already holds the Secret's one key: in sync, no rotation.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let data = configmaps
            .get_opt(&format!("{RELEASE}-keyring"))
            .await
            .unwrap()
            .and_then(|c| c.data)
            .unwrap_or_default();
        if data.get("step").map(String::as_str) == Some("InSync") {
            assert!(!data.contains_key("lastRotation"), "{data:?}");
            assert!(data["keys"].ends_with("4/4"), "{data:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never in sync: {data:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The Secret gets a new primary; an outside member dies as the rotation begins.
    let t = Instant::now();
    secrets
        .patch(
            "serf-keys",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"key": new}})),
        )
        .await
        .unwrap();
    let dead = outside[2].name().to_string();
    outside[2].kill().unwrap();
    let new_fp = serf_operator::keyring::fingerprint_of(&new);
    let data = status(" Succeeded ").await;
    figures.push(format!(
        "Secret changed → rotation finished with a member killed: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let last = &data["lastRotation"];
    assert!(last.contains(&new_fp) && last.contains(&dead), "{last}");
    assert_eq!(data["primary"], new_fp);
    assert_eq!(data["keys"], format!("{new_fp} 3/3"), "{data:?}");
    figures.push(format!("lastRotation: {last}"));

    // Events on the Secret, and the metric.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("serf-keys"))
        .filter_map(|e| e.reason)
        .collect();
    for want in [
        "KeyRotationStarted",
        "KeyInstalled",
        "PrimaryKeyChanged",
        "KeyRemoved",
        "KeyRotationFinished",
        "KeyRotationMembersUnreachable",
    ] {
        assert!(reasons.iter().any(|r| r == want), "{want}: {reasons:?}");
    }
    let metrics = http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics").await;
    assert!(
        metrics.contains("serf_operator_key_rotations_total{result=\"Succeeded\"} 1"),
        "{metrics}"
    );

    // Every alive agent's keyring file holds the new key only; the pod's agent too.
    for a in outside.iter().take(2) {
        assert_eq!(
            a.keyring().unwrap(),
            std::slice::from_ref(&new),
            "{}",
            a.name()
        );
    }
    let (pid, _) = agent_process(&pod).expect("the pod's serf agent runs on this machine");
    let ring = PathBuf::from(format!("/proc/{pid}/root/serf-keyring/keyring.json"));
    match std::fs::read_to_string(&ring) {
        Ok(text) => {
            let keys: Vec<String> = serde_json::from_str(&text).unwrap();
            assert_eq!(keys, std::slice::from_ref(&new), "the pod's keyring file");
            figures.push("the pod's keyring file: the new key only".into());
        }
        Err(e) => panic!("{}: {e}", ring.display()),
    }

    // The pod's agent container dies: it comes back with its keyring file (the rotated
    // keyring, not the key the pod started with) and rejoins.
    let t = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let p = pods.get(&pod).await.unwrap();
        let alive = outside[0]
            .members()
            .unwrap()
            .into_iter()
            .any(|m| m.name == pod && m.status == "alive");
        if restarts(&p) >= 1
            && is_ready(&p)
            && alive
            && agent_process(&pod).is_some_and(|(p2, _)| p2 != pid)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod's agent did not come back and rejoin: {}",
            outside[0].serf_ok(&["members"]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    figures.push(format!(
        "the pod's agent killed → restarted and rejoined with the rotated keyring: {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    // A new pod (operator restart): starts from the Secret, joins, rotates nothing again.
    pods.delete(&pod, &DeleteParams::default()).await.unwrap();
    let next = ready_pod(&pods, Some(&pod), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let data = status(" Succeeded ").await;
    let record: serde_json::Value = serde_json::from_str(&data["record.json"]).unwrap();
    assert_eq!(record["rotations"], 1, "{record}");
    assert_eq!(data["keys"], format!("{new_fp} 3/3"), "{data:?}");
    let listed = outside[0].serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && !listed.contains(&old), "{listed}");
    figures.push(format!(
        "new pod {next}: joined with the Secret's key, no second rotation"
    ));

    helm(&python, &chart, "uninstall", &ns, &values).await;
    eprintln!("\n{KEYS_SUITE}:\n  {}\n", figures.join("\n  "));
    drop(outside);
    let _ = std::fs::remove_dir_all(&work);
}

/// A plain HTTP GET; the answer.
async fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

/// Two releases of the chart in one namespace, each watching a handler namespace of its own,
/// each electing its leader: each keeps its state under its own name (ConfigMap
/// `<release>-membership`, Lease `<release>`), and nothing under the default prefix; a user
/// event launches one Job in each handler namespace; uninstalling one leaves the other
/// launching, and takes its own state objects with it (garbage-collected with its
/// Deployment), none of the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_releases_side_by_side_in_one_namespace() {
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(client) = cluster_or_skip(SUITE).await else {
        return;
    };
    let Some(image) = local_node_with_image_or_skip(&client).await else {
        return;
    };
    let Some(python) = helm_python_or_skip().await else {
        return;
    };
    install_crds(&client).await.unwrap();
    let ns_guard = TempNamespace::create(&client, "releases").await.unwrap();
    let ns = ns_guard.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-releases-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let chart = work.join("serf-operator");
    copy_chart_without_crds(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/serf-operator"),
        &chart,
    );
    let outside = Agent::start(AgentConfig::new("e2e-releases-outside"), &[]).unwrap();
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let mut handler_ns = Vec::new();
    let mut guards = Vec::new();
    for release in ["blue", "green"] {
        let g = TempNamespace::create(&client, release).await.unwrap();
        wait_for_default_service_account(&client, &g.name)
            .await
            .unwrap();
        let handlers: Api<SerfHandler> = Api::namespaced(client.clone(), &g.name);
        let handler = serde_json::json!({
            "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
            "metadata": {"name": "go", "namespace": g.name},
            "spec": {"routes": [{"name": "go", "events": "user:side-by-side", "job": {"spec": {
                "template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}}]}
        });
        handlers
            .patch(
                "go",
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&handler),
            )
            .await
            .unwrap();
        handler_ns.push(g.name.clone());
        guards.push(g);
        let free = || serf_testkit::free_port().unwrap();
        let mut extra_env = api_server_env().await;
        // One replica that still elects itself: the Lease is in use.
        extra_env
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "SERF_OPERATOR_LEADER_ELECT", "value": "true"}));
        let values = serde_json::json!({
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            "watchNamespaces": [handler_ns.last().unwrap()],
            "hostNetwork": true,
            "tolerations": [{"operator": "Exists"}],
            "serf": {
                "join": [outside.bind_addr().to_string()],
                "retryInterval": "1s",
                "bindAddr": "127.0.0.1",
                "bindPort": free(),
                "advertiseAddr": "127.0.0.1",
                "rpcPort": free(),
                "role": release,
            },
            "operator": {"logFormat": "text", "extraEnv": extra_env},
            "metrics": {"port": free()},
        });
        helm_release(&python, &chart, "install", &ns, release, &values).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let ready_of = |release: &'static str| {
        let pods = pods.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let list = live_pods_of(&pods, release).await;
                if let Some(p) = list.iter().find(|p| {
                    p.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with(release))
                        && is_ready(p)
                }) {
                    return p.metadata.name.clone().unwrap();
                }
                assert!(
                    Instant::now() < deadline,
                    "{release} not Ready:\n{}",
                    describe(&list)
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let blue_pod = ready_of("blue").await;
    let green_pod = ready_of("green").await;

    // Each release's own state objects; none under the default prefix.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    for (release, pod) in [("blue", &blue_pod), ("green", &green_pod)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let cm = cms.get_opt(&format!("{release}-membership")).await.unwrap();
            let holder = leases
                .get_opt(release)
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity);
            if cm.is_some() && holder.as_deref() == Some(pod.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{release}: membership record {} / Lease holder {holder:?} (want {pod})",
                cm.is_some()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        cms.get_opt("serf-operator-membership")
            .await
            .unwrap()
            .is_none()
    );
    assert!(leases.get_opt("serf-operator").await.unwrap().is_none());

    // One user event: one Job in each release's handler namespace.
    let serf = serf_client::Client::connect(serf_client::ClientConfig::new(
        outside.rpc_addr().to_string(),
    ))
    .await
    .unwrap();
    let count = |ns: String| {
        let client = client.clone();
        async move {
            Api::<Job>::namespaced(client, &ns)
                .list(&ListParams::default().labels("serf.operator.io/handler=go"))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    let fire_until = |want: [usize; 2], payload: &'static str| {
        let serf = serf.clone();
        let (a, b) = (handler_ns[0].clone(), handler_ns[1].clone());
        let count = &count;
        async move {
            serf.event("side-by-side", payload.as_bytes(), false)
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let got = [count(a.clone()).await, count(b.clone()).await];
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "Jobs {got:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    fire_until([1, 1], "one").await;

    // Uninstall green: blue goes on, green's handler namespace gets nothing more.
    let values = serde_json::json!({});
    helm_release(&python, &chart, "uninstall", &ns, "green", &values).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while live_pods(&pods).await.iter().any(|p| {
        p.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("green"))
    }) {
        assert!(Instant::now() < deadline, "green's pod still there");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fire_until([2, 1], "two").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(handler_ns[1].clone()).await, 1);
    assert!(cms.get_opt("blue-membership").await.unwrap().is_some());
    // Green's state objects went with its Deployment (owner references, garbage collector);
    // blue's stay.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        let cm = cms.get_opt("green-membership").await.unwrap();
        let lease = leases.get_opt("green").await.unwrap();
        if cm.is_none() && lease.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "green's state left after uninstall: membership {} Lease {}",
            cm.is_some(),
            lease.is_some()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = t.elapsed();
    assert!(leases.get_opt("blue").await.unwrap().is_some());
    eprintln!(
        "\ntwo releases in {ns}: blue ({blue_pod}) and green ({green_pod}) Ready, each with its \
         own membership record and Lease; one event → one Job each; green uninstalled → \
         blue launched the next, green's namespace nothing\n"
    );
    eprintln!(
        "green's membership record and Lease gone {:.1} s after the uninstall returned",
        gone.as_secs_f64()
    );
    helm_release(&python, &chart, "uninstall", &ns, "blue", &values).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|c| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("blue-"))
        })
        || leases.get_opt("blue").await.unwrap().is_some()
    {
        assert!(
            Instant::now() < deadline,
            "blue's state left after uninstall"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(guards);
    let _ = std::fs::remove_dir_all(&work);
}
