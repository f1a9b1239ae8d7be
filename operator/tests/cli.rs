//! The `serf-operator` command: `route` on the shipped examples, `local` against real
//! Serf agents (Jobs printed as events arrive, queries answered), and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serf_client::{Client, ClientConfig, QueryParams};
use serf_testkit::{Agent, AgentConfig};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_serf-operator"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn route_prints_jobs_answers_and_reasons_as_yaml() {
    let ex = examples();
    let ex = ex.to_str().unwrap();
    let (ok, out, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "user:deploy",
        "--payload",
        "v1.2.3",
        "--self-name",
        "web-1",
        "--self-tags",
        "role=web",
    ]);
    assert!(ok, "{err}");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "one Job, no second object: {out}");
    assert_eq!(docs[0]["event"], "user:deploy@1");
    assert_eq!(docs[0]["results"][0]["action"], "createJob");
    let job: k8s_openapi::api::batch::v1::Job = serde_yaml::from_value(docs[1].clone()).unwrap();
    assert_eq!(job.metadata.namespace.as_deref(), Some("serf-examples"));
    assert_eq!(
        serf_operator::jobs::stdin_bytes(&job, None),
        b"v1.2.3\n",
        "/serf/stdin travels in the Job"
    );

    // Why nothing ran: the role, and events no route takes.
    let (ok, out, _) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "user:backup",
        "--self-tags",
        "role=web",
    ]);
    assert!(ok);
    assert!(out.contains("reason: RoleMismatch"), "{out}");
    let (ok, out, _) = run(&["route", "--handlers", ex, "--event", "user:nothing"]);
    assert!(ok);
    assert!(
        out.contains("no route of any handler takes user:nothing@1"),
        "{out}"
    );

    // A member failure goes through the coalescing window of the remediation handler.
    let (ok, out, _) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "member-failed",
        "--members",
        "db-1=10.0.0.5,role=db",
        "--members",
        "web-1=10.0.0.6:7950,role=web",
    ]);
    assert!(ok);
    assert!(out.contains("action: coalesce"), "{out}");
    assert!(out.contains("event: member-failed:db-1\n"), "{out}");
    assert!(out.contains("kind: Job"), "{out}");
}

#[test]
fn bad_input_is_named() {
    let ex = examples();
    let ex = ex.to_str().unwrap();
    let (ok, _, err) = run(&["route", "--handlers", ex, "--event", "bogus"]);
    assert!(!ok);
    assert!(err.contains("unknown event \"bogus\""), "{err}");
    let (ok, _, err) = run(&["route", "--handlers", ex, "--event", "member-join"]);
    assert!(!ok);
    assert!(err.contains("needs at least one --members"), "{err}");
    let (ok, _, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "member-join",
        "--members",
        "x=not-an-ip",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid IP address"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n---\napiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {name: h}\nspec: {routes: 7}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "route",
        "--handlers",
        bad.to_str().unwrap(),
        "--event",
        "user:x",
    ]);
    assert!(!ok);
    assert!(err.contains("bad.yaml, document 2: SerfHandler"), "{err}");

    // An invalid route is a warning naming it; the other routes still route.
    std::fs::write(
        &bad,
        "apiVersion: serf.operator.io/v1alpha1\nkind: SerfHandler\nmetadata: {name: h, namespace: n}\nspec:\n  routes:\n  - {name: ok, events: 'query:q', respond: {payload: yes}}\n  - {name: broken, events: 'user:x', members: {role: db}, respond: {payload: no}}\n",
    )
    .unwrap();
    let (ok, out, err) = run(&[
        "route",
        "--handlers",
        bad.to_str().unwrap(),
        "--event",
        "query:q",
    ]);
    assert!(ok);
    assert!(
        err.contains("warning: SerfHandler n/h route broken:"),
        "{err}"
    );
    assert!(out.contains("answer: yes"), "{out}");
}

/// Kills the child when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_follows_a_live_agent() {
    let web = Agent::start(
        AgentConfig::new("local-web")
            .tag("role", "web")
            .rpc_auth("tok"),
        &[],
    )
    .unwrap();
    let mut child = Running(
        bin()
            .args(["local", "--handlers", examples().to_str().unwrap()])
            .env("SERF_RPC_ADDR", web.rpc_addr().to_string())
            .env("SERF_RPC_AUTH", "tok")
            .env("POD_NAMESPACE", "serf-system")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(needle) {
                        return seen;
                    }
                }
                Err(_) => panic!("no {needle:?} in the output:\n{seen}"),
            }
        }
    };

    let client = Client::connect(ClientConfig::new(web.rpc_addr().to_string()).with_auth("tok"))
        .await
        .unwrap();
    // Local mode subscribes asynchronously: fire until its first result appears.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ltime_seen = false;
    while !ltime_seen {
        client.event("deploy", b"v9", false).await.unwrap();
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => ltime_seen = line.contains("event: user:deploy@"),
            Err(_) => assert!(Instant::now() < deadline, "local mode printed nothing"),
        }
    }
    let out = wait_for("value: v9");
    assert!(
        out.contains("kind: Job") || out.contains("SERF_PAYLOAD"),
        "{out}"
    );

    // The where query is answered inline by local mode.
    let mut p = QueryParams::new("where", Vec::new());
    p.timeout = Some(Duration::from_secs(2));
    let outcome = client.query(&p).await.unwrap().collect().await.unwrap();
    assert_eq!(
        outcome.responses,
        vec![(
            "local-web".to_string(),
            b"local-web in serf-system".to_vec()
        )]
    );
    wait_for("answer: local-web in serf-system");
}

/// `route` can express every event: a payload with any bytes (from a file or base64), a
/// payload starting with `-`, and tag values holding commas.
#[test]
fn route_takes_any_payload_and_any_tag() {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Secret;
    let ex = examples();
    let ex = ex.to_str().unwrap();
    let docs = |out: &str| -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(out)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    };
    let env = |job: &Job, name: &str| -> Option<String> {
        job.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let deploy = |payload_args: &[&str]| {
        let mut args = vec![
            "route",
            "--handlers",
            ex,
            "--event",
            "user:deploy",
            "--self-tag",
            "role=web",
        ];
        args.extend_from_slice(payload_args);
        let (ok, out, err) = run(&args);
        assert!(ok, "{args:?}: {err}");
        let d = docs(&out);
        let job: Job = serde_yaml::from_value(d[1].clone()).unwrap();
        let secret: Option<Secret> = d.get(2).map(|s| serde_yaml::from_value(s.clone()).unwrap());
        (job, secret)
    };
    // Binary bytes, NUL included: from base64 and from a file, the same Job.
    let (job, secret) = deploy(&["--payload-base64", "/wD+eg=="]);
    assert_eq!(
        env(&job, "SERF_PAYLOAD_BASE64").as_deref(),
        Some("/wD+eg==")
    );
    assert_eq!(
        serf_operator::jobs::stdin_bytes(&job, secret.as_ref()),
        b"\xff\x00\xfez\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");
    std::fs::write(&file, b"\xff\x00\xfez").unwrap();
    let (from_file, _) = deploy(&["--payload-file", file.to_str().unwrap()]);
    assert_eq!(from_file.metadata.name, job.metadata.name);
    // A payload that looks like a flag.
    let (job, _) = deploy(&["--payload", "-rf"]);
    assert_eq!(env(&job, "SERF_PAYLOAD").as_deref(), Some("-rf"));
    assert_eq!(env(&job, "SERF_SELF_ROLE").as_deref(), Some("web"));

    // A member's tag value with commas and `=`, and the operator's own such tag.
    let (ok, out, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "member-join",
        "--members",
        "db-1=10.0.0.5,role=db",
        "--member-tag",
        "db-1",
        "note=a,b=c",
        "--self-tag",
        "role=web",
        "--self-tag",
        "zones=eu-1,eu-2",
    ]);
    assert!(ok, "{err}");
    let job: Job = serde_yaml::from_value(docs(&out)[1].clone()).unwrap();
    assert_eq!(
        serf_operator::jobs::stdin_bytes(&job, None),
        b"db-1\t10.0.0.5\tdb\tnote=a,b=c,role=db\n"
    );
    assert_eq!(env(&job, "SERF_TAG_ZONES").as_deref(), Some("eu-1,eu-2"));

    // Mistakes are named.
    let (ok, _, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "user:x",
        "--payload",
        "a",
        "--payload-base64",
        "YQ==",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "user:x",
        "--payload-base64",
        "!!",
    ]);
    assert!(!ok);
    assert!(err.contains("--payload-base64: not base64"), "{err}");
    let (ok, _, err) = run(&[
        "route",
        "--handlers",
        ex,
        "--event",
        "member-join",
        "--members",
        "a=10.0.0.1",
        "--member-tag",
        "b",
        "x=y",
    ]);
    assert!(!ok);
    assert!(err.contains("--member-tag b: no such member"), "{err}");
}

/// A kubeconfig for an API server that does not answer: `run` gets as far as its own
/// listeners without one.
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster: \
         {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  \
         user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\n",
    )
    .unwrap();
    p
}

#[test]
fn run_names_the_metrics_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bin()
        .args(["run", "--metrics-addr", &addr])
        .env("KUBECONFIG", unreachable_kubeconfig(dir.path()))
        .env_remove("SERF_OPERATOR_METRICS_ADDR")
        // anyhow appends a backtrace when these ask for one; a user without them sees one line.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines,
        [format!(
            "Error: cannot listen on {addr} (--metrics-addr, SERF_OPERATOR_METRICS_ADDR): \
             Address already in use (os error 98)"
        )],
        "{err}"
    );
}

#[test]
fn run_logs_json_lines_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child: Child = bin()
        .args(["run", "--metrics-addr", &addr, "--log-format", "json"])
        .env("KUBECONFIG", unreachable_kubeconfig(dir.path()))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    let first = first.expect("a log line");
    let v: serde_json::Value = serde_json::from_str(&first).expect(&first);
    assert_eq!(v["level"], "INFO", "{first}");
    assert_eq!(
        v["fields"]["message"], "serving /metrics, /healthz, /readyz",
        "{first}"
    );
    assert_eq!(v["fields"]["addr"], addr.as_str(), "{first}");
}

#[test]
fn run_refuses_an_invalid_state_prefix() {
    let out = bin()
        .args(["run", "--state-prefix", "Blue_1"])
        .env_remove("SERF_OPERATOR_STATE_PREFIX")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--state-prefix: state prefix \"Blue_1\": lower-case letters"),
        "{err}"
    );
}
