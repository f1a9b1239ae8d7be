//! End to end on a real cluster (KUBECONFIG, root for the test network, and a Ready node for
//! the Pod): Serf membership published as Kubernetes service discovery. Real agents gossip
//! on addresses of a bridge interface of their own (EndpointSlices refuse loopback
//! addresses), next to an operator run with `--discovery`. Checked through the API: after
//! the joins the EndpointSlice lists the selected members ready; a member killed with
//! SIGKILL turns not ready, then is removed after `removeAfter`; a graceful leave turns
//! terminating, then is removed; a tag change moving a member out of the selector removes
//! it; the ConfigMap holds the members as JSON and as lines, and a busybox Pod on the node
//! reads it; an operator restart rewrites nothing; deleting the SerfService deletes what it
//! published.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, ResourceExt};
use serf_operator_crds::SerfService;
use serf_operator_e2e::{
    OperatorProcess, TempNamespace, cluster_or_skip, eventually, http_get, install_crds,
    node_image_or_skip, wait_for_default_service_account,
};
use serf_testkit::{Agent, AgentConfig};

/// A bridge interface with test addresses, deleted when dropped (also when the test fails).
struct TestNet {
    name: String,
}

impl TestNet {
    /// Creates interface `name` holding `10.77.0.1` .. `10.77.0.N`; `None` when this process
    /// may not (not root, no bridge support).
    fn create(name: &str, n: u8) -> Option<(TestNet, Vec<IpAddr>)> {
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| {
                    if !o.status.success() {
                        eprintln!(
                            "ip {}: {}",
                            args.join(" "),
                            String::from_utf8_lossy(&o.stderr)
                        );
                    }
                    o.status.success()
                })
                .unwrap_or(false)
        };
        // Left by an earlier run killed before its cleanup.
        let _ = Command::new("ip").args(["link", "del", name]).output();
        if !ip(&["link", "add", name, "type", "bridge"]) {
            return None;
        }
        let net = TestNet {
            name: name.to_string(),
        };
        let mut addrs = Vec::new();
        for i in 1..=n {
            let a = Ipv4Addr::new(10, 77, 0, i);
            if !ip(&["addr", "add", &format!("{a}/24"), "dev", name]) {
                return None;
            }
            addrs.push(IpAddr::V4(a));
        }
        if !ip(&["link", "set", name, "up"]) {
            return None;
        }
        Some((net, addrs))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Per endpoint address: (ready, serving, terminating).
type View = std::collections::BTreeMap<String, (bool, bool, bool)>;

async fn view(api: &Api<EndpointSlice>) -> View {
    let lp = ListParams::default().labels("kubernetes.io/service-name=db");
    let mut out = View::new();
    for s in api.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        for e in s.endpoints {
            let c = e.conditions.unwrap_or_default();
            out.insert(
                e.addresses[0].clone(),
                (
                    c.ready.unwrap_or(false),
                    c.serving.unwrap_or(false),
                    c.terminating.unwrap_or(false),
                ),
            );
        }
    }
    out
}

async fn until(
    api: &Api<EndpointSlice>,
    what: &str,
    within: Duration,
    ok: impl Fn(&View) -> bool,
) -> View {
    let started = std::time::Instant::now();
    let v = eventually(what, within, || async {
        let v = view(api).await;
        ok(&v).then_some(v)
    })
    .await;
    eprintln!("{what}: after {:?}: {v:?}", started.elapsed());
    v
}

const READY: (bool, bool, bool) = (true, true, false);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serf_members_are_published_as_endpointslices_and_a_configmap() {
    let Some(client) = cluster_or_skip("the service discovery suite").await else {
        return;
    };
    let Some(image) = node_image_or_skip(&client, "the service discovery suite").await else {
        return;
    };
    let Some((_net, ips)) = TestNet::create("serfdisc0", 6) else {
        eprintln!(
            "\n*** SKIPPED: the service discovery suite needs root to add the test interface serfdisc0 (ip link add ... type bridge) ***\n"
        );
        return;
    };
    install_crds(&client).await.unwrap();
    let ns_guard = TempNamespace::create(&client, "disc").await.unwrap();
    let ns = ns_guard.name.clone();
    wait_for_default_service_account(&client, &ns)
        .await
        .unwrap();
    let work = std::env::temp_dir().join(format!("serf-e2e-disc-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // The operator's agent and five others, each on an address of its own.
    let pid = std::process::id();
    let on = |name: &str, ip: IpAddr, role: &str| {
        AgentConfig::new(format!("{name}-{pid}"))
            .bind_ip(ip)
            .tag("role", role)
    };
    let op = Agent::start(on("disc-op", ips[0], "op"), &[]).unwrap();
    let join = [op.bind_addr()];
    let db1 = Agent::start(on("db1", ips[1], "db"), &join).unwrap();
    let db2 = Agent::start(on("db2", ips[2], "db"), &join).unwrap();
    let mut db3 = Agent::start(on("db3", ips[3], "db"), &join).unwrap();
    let db4 = Agent::start(on("db4", ips[4], "db"), &join).unwrap();
    let _web = Agent::start(on("web", ips[5], "web"), &join).unwrap();
    op.wait_for(Duration::from_secs(30), "6 alive members", |m| {
        m.iter().filter(|m| m.status == "alive").count() == 6
    })
    .unwrap();
    let addr = |i: usize| ips[i].to_string();

    let svcs: Api<SerfService> = Api::namespaced(client.clone(), &ns);
    let ss: SerfService = serde_json::from_value(serde_json::json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfService",
        "metadata": {"name": "db"},
        "spec": {"selector": {"tags": {"role": "db"}},
                 "ports": [{"name": "pg", "port": 5432}],
                 "publish": {"service": true, "configMap": true},
                 "removeAfter": "10s"},
    }))
    .unwrap();
    svcs.create(&PostParams::default(), &ss).await.unwrap();

    let start_operator = |n: usize| {
        let metrics = serf_testkit::free_port().unwrap();
        let log = work.join(format!("operator-{n}.log"));
        eprintln!("operator log: {}", log.display());
        let p = OperatorProcess::start(
            &[
                "--namespaces",
                &ns,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
                "--discovery",
            ],
            &[
                ("SERF_RPC_ADDR", op.rpc_addr().to_string()),
                ("POD_NAMESPACE", ns.clone()),
                ("RUST_LOG", "info,serf_operator=debug".to_string()),
            ],
            log,
        )
        .unwrap();
        (p, metrics)
    };
    let (mut operator, metrics) = start_operator(1);
    eventually("/readyz", Duration::from_secs(60), || async {
        http_get(metrics, "/readyz").await.map(|_| ())
    })
    .await;

    // After the joins: the four db members, ready; the op and web members are not selected.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let started = std::time::Instant::now();
    until(
        &slices,
        "four db members ready",
        Duration::from_secs(60),
        |v| v.len() == 4 && (1..=4).all(|i| v.get(&addr(i)) == Some(&READY)),
    )
    .await;
    eprintln!(
        "published {:?} after the operator was ready",
        started.elapsed()
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = services.get("db").await.unwrap();
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    assert!(spec.selector.is_none());
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=db"))
        .await
        .unwrap()
        .items;
    assert_eq!(list.len(), 1);
    let slice = &list[0];
    assert_eq!(
        slice
            .labels()
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("serf-operator")
    );
    assert_eq!(
        slice.metadata.owner_references.as_ref().unwrap()[0].kind,
        "SerfService"
    );
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("pg"), Some(5432)));
    let hostnames: Vec<_> = slice
        .endpoints
        .iter()
        .filter_map(|e| e.hostname.clone())
        .collect();
    assert!(hostnames.contains(&format!("db1-{pid}")), "{hostnames:?}");
    let status = eventually("status counts", Duration::from_secs(20), || async {
        let s = svcs.get("db").await.ok()?.status?;
        (s.ready == 4 && s.total == 4).then_some(s)
    })
    .await;
    assert_eq!(status.slices, 1);
    assert!(status.last_change.is_some());

    // An operator restart: the same objects, nothing rewritten (the slice's resourceVersion
    // stays).
    let rv = slice.metadata.resource_version.clone();
    assert!(operator.terminate(), "the operator stops on SIGTERM");
    let (operator2, metrics2) = start_operator(2);
    operator = operator2;
    eventually(
        "/readyz after the restart",
        Duration::from_secs(60),
        || async { http_get(metrics2, "/readyz").await.map(|_| ()) },
    )
    .await;
    eventually(
        "the restarted operator's first pass",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(work.join("operator-2.log")).unwrap_or_default();
            log.contains("membership read").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = slices.get(&slice.name_any()).await.unwrap();
    assert_eq!(
        again.metadata.resource_version, rv,
        "rewritten after a restart"
    );

    // db3 is killed (SIGKILL): failed, not ready; removed after removeAfter (10 s).
    db3.kill().unwrap();
    until(
        &slices,
        "db3 not ready (failed)",
        Duration::from_secs(60),
        |v| v.get(&addr(3)) == Some(&(false, false, false)),
    )
    .await;
    let t = std::time::Instant::now();
    until(
        &slices,
        "db3 removed after the grace",
        Duration::from_secs(60),
        |v| !v.contains_key(&addr(3)) && v.len() == 3,
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "removed before the grace: {:?}",
        t.elapsed()
    );

    // db2 leaves gracefully: terminating, then removed after the grace.
    db2.serf_ok(&["leave"]).unwrap();
    until(&slices, "db2 terminating", Duration::from_secs(30), |v| {
        v.get(&addr(2)).is_some_and(|c| !c.0 && c.2)
    })
    .await;
    until(
        &slices,
        "db2 removed after the grace",
        Duration::from_secs(60),
        |v| !v.contains_key(&addr(2)) && v.len() == 2,
    )
    .await;

    // db4's role changes to web: out of the selector, removed at once.
    db4.serf_ok(&["tags", "-set", "role=web"]).unwrap();
    until(
        &slices,
        "db4 out of the selector",
        Duration::from_secs(30),
        |v| v.len() == 1 && v.get(&addr(1)) == Some(&READY),
    )
    .await;

    // The ConfigMap: JSON and lines.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let line = format!("db1-{pid} {}:5432\n", addr(1));
    let data = eventually(
        "the ConfigMap lists db1 only",
        Duration::from_secs(30),
        || async {
            let d = maps.get("db-members").await.ok()?.data?;
            (d.get("members.txt") == Some(&line)).then_some(d)
        },
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&data["members.json"]).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json[0]["name"], format!("db1-{pid}"));
    assert_eq!(json[0]["address"], addr(1));
    assert_eq!(json[0]["port"], 5432);
    assert_eq!(json[0]["status"], "alive");
    assert_eq!(json[0]["tags"]["role"], "db");

    // A Pod on the node reads it from a volume.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reader"},
        "spec": {
            "restartPolicy": "Never", "hostNetwork": true,
            "automountServiceAccountToken": false,
            "containers": [{"name": "cat", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "cat /members/members.txt"],
                "volumeMounts": [{"name": "m", "mountPath": "/members"}]}],
            "volumes": [{"name": "m", "configMap": {"name": "db-members"}}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually(
        "the reader Pod succeeds",
        Duration::from_secs(120),
        || async {
            let p = pods.get("reader").await.ok()?;
            let phase = p.status?.phase?;
            assert_ne!(phase, "Failed", "the reader Pod failed");
            (phase == "Succeeded").then_some(())
        },
    )
    .await;
    let out = pods.logs("reader", &LogParams::default()).await.unwrap();
    eprintln!("the Pod read:\n{out}");
    assert_eq!(out, line);

    // Deleting the SerfService deletes what it published (garbage collection).
    svcs.delete("db", &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "the published objects gone",
        Duration::from_secs(90),
        || async {
            let s = services.get_opt("db").await.ok()?;
            let m = maps.get_opt("db-members").await.ok()?;
            let v = view(&slices).await;
            (s.is_none() && m.is_none() && v.is_empty()).then_some(())
        },
    )
    .await;
    drop(operator);
    drop((db1, op));
}
