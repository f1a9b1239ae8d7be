//! The Job contract against the real thing: a real `serf agent -event-handler` script records
//! the environment and stdin Serf gives it; the same events, read from the agent's RPC
//! stream, go through the engine; the Job's environment and `/serf/stdin` must match.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serf_client::{Client, ClientConfig, Event, QueryParams};
use serf_operator::contract::{SelfNode, container_env_after_expansion};
use serf_operator::engine::{Action, Context, Engine, Membership, NoActiveJobs};
use serf_operator::manifests::parse_handlers;
use serf_testkit::{Agent, AgentConfig};

const CATCH_ALL: &str = r#"
apiVersion: serf.operator.io/v1alpha1
kind: SerfHandler
metadata: {name: all, namespace: test}
spec:
  routes:
    - name: all
      events: "*"
      job:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers:
                - name: c
                  image: busybox
                  env:
                    - name: DB_PASSWORD
                      valueFrom: {secretKeyRef: {name: db, key: pw}}
"#;

/// What the secret-backed variable of the template resolves to in the Pod.
const SECRET: &str = "s3cret-value";

/// One invocation of the handler script.
#[derive(Debug)]
struct Record {
    env: BTreeMap<String, String>,
    stdin: Vec<u8>,
}

fn read_records(dir: &Path) -> Vec<Record> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("done").exists())
        .collect();
    dirs.sort();
    dirs.iter()
        .map(|d| Record {
            env: std::fs::read_to_string(d.join("env"))
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stdin: std::fs::read(d.join("stdin")).unwrap(),
        })
        .collect()
}

/// Member lines with each line's tags sorted (Serf writes tags in random order).
fn normalize_member_stdin(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| {
            let mut parts: Vec<String> = l.split('\t').map(str::to_string).collect();
            if let Some(tags) = parts.get_mut(3) {
                let mut t: Vec<&str> = tags.split(',').collect();
                t.sort();
                *tags = t.join(",");
            }
            parts.join("\t")
        })
        .collect();
    lines.sort();
    lines
}

/// The member names in a Job's member-event stdin.
fn launch_members(stdin: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdin)
        .lines()
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect()
}

fn same_event(ev: &Event, r: &Record) -> bool {
    let env = &r.env;
    if env.get("SERF_EVENT").map(String::as_str) != Some(ev.kind()) {
        return false;
    }
    match ev {
        Event::User(u) => env.get("SERF_USER_LTIME") == Some(&u.ltime.to_string()),
        Event::Query(q) => env.get("SERF_QUERY_LTIME") == Some(&q.ltime.to_string()),
        Event::Member(m) => {
            let mut names: Vec<&str> = m.members.iter().map(|x| x.name.as_str()).collect();
            names.sort();
            let text = String::from_utf8_lossy(&r.stdin);
            let mut recorded: Vec<&str> =
                text.lines().filter_map(|l| l.split('\t').next()).collect();
            recorded.sort();
            // Members whose state the operator already knows are not delivered again:
            // the Job's members are those of Serf's batch that are news.
            names.iter().all(|n| recorded.contains(n))
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_environment_and_stdin_match_a_real_serf_handler() {
    let work = tempfile::tempdir().unwrap();
    let records = work.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let script = work.path().join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nd={}/$(date +%s%N)-$$\nmkdir -p \"$d\"\nenv | grep '^SERF_' | sort > \"$d/env\"\ncat > \"$d/stdin\"\ntouch \"$d/done\"\n",
            records.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();

    let node1 = Agent::start(
        AgentConfig::new("contract-1")
            .tag("role", "web")
            .tag("dc", "east")
            .tag("my-tag.x", "v1")
            .tag("note", "$(DB_PASSWORD) $$ $(SERF_EVENT)")
            // Unicode names, upper-cased as Go does, and two names that clean up to one.
            .tag("ſite", "long-s")
            .tag("zoné", "accent")
            .tag("my-tag", "dash")
            .tag("my_tag", "under")
            .event_handler(script.display().to_string()),
        &[],
    )
    .unwrap();
    let client = Client::connect(ClientConfig::new(node1.rpc_addr().to_string()))
        .await
        .unwrap();
    let mut stream = client.stream("*").await.unwrap();
    let node = serf_operator::local::self_node(&client).await.unwrap();
    let mut node = node;
    assert_eq!(
        node,
        SelfNode {
            name: "contract-1".into(),
            tags: [
                ("dc".to_string(), "east".to_string()),
                ("my-tag".to_string(), "dash".to_string()),
                ("my-tag.x".to_string(), "v1".to_string()),
                ("my_tag".to_string(), "under".to_string()),
                (
                    "note".to_string(),
                    "$(DB_PASSWORD) $$ $(SERF_EVENT)".to_string()
                ),
                ("role".to_string(), "web".to_string()),
                ("zoné".to_string(), "accent".to_string()),
                ("ſite".to_string(), "long-s".to_string()),
            ]
            .into()
        }
    );

    // User events: text without a trailing newline, binary, empty, with a newline.
    client.event("deploy", b"payload", false).await.unwrap();
    client
        .event("blob", &[0xff, 0x00, 0xfe, b'z'], false)
        .await
        .unwrap();
    client.event("empty", b"", false).await.unwrap();
    client.event("nl", b"line\n", false).await.unwrap();
    // Hostile payloads: Kubernetes' own `$(VAR)` syntax, escapes and a secret's name.
    client
        .event("hostile", b"a $(SERF_EVENT) b $$ c $(UNDEF) $(", false)
        .await
        .unwrap();
    client
        .event("secret", b"$(DB_PASSWORD)\xff$$(DB_PASSWORD)", false)
        .await
        .unwrap();
    // A member joins, changes its tags, fails.
    let mut node2 = Agent::start(
        AgentConfig::new("contract-2").tag("role", "db"),
        &[node1.bind_addr()],
    )
    .unwrap();
    node2.serf_ok(&["tags", "-set", "ver=2"]).unwrap();
    // A query.
    let mut p = QueryParams::new("load", b"15m".to_vec());
    p.timeout = Some(Duration::from_millis(500));
    client.query(&p).await.unwrap().collect().await.unwrap();
    node1
        .wait_for(Duration::from_secs(10), "contract-2 tags", |ms| {
            ms.iter()
                .any(|m| m.name == "contract-2" && m.tags.contains_key("ver"))
        })
        .unwrap();
    // Serf's handler for contract-2's new tags runs after the agent's coalescing period: it
    // reads the agent's own tags as they are when it runs, so the retag below waits for it
    // (else the handler may already see role=lb for the earlier update).
    let wait = Instant::now() + Duration::from_secs(15);
    // (A join and an update close together may come as one event: whichever carries ver=2.)
    while !read_records(&records).iter().any(|r| {
        String::from_utf8_lossy(&r.stdin)
            .lines()
            .any(|l| l.starts_with("contract-2\t") && l.contains("ver=2"))
    }) {
        assert!(
            Instant::now() < wait,
            "Serf's handler ran for contract-2's new tags"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator's own node is retagged: Serf's handlers see the new role from then on,
    // and so must the Jobs.
    // Serf delivers member events after its coalescing period (about a second): the
    // operator follows its node from that member-update on.
    let mut updates = client.stream("member-update").await.unwrap();
    node1.serf_ok(&["tags", "-set", "role=lb"]).unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), updates.next())
            .await
            .expect("the agent's own member-update")
            .unwrap()
            .unwrap();
        if matches!(&ev, Event::Member(m) if m.members.iter().any(|x| x.name == "contract-1")) {
            break;
        }
    }
    client.event("retagged", b"after", false).await.unwrap();
    node2.kill().unwrap();

    let handlers = parse_handlers(CATCH_ALL, Path::new("catch-all.yaml")).unwrap();
    let mut engine = Engine::new(&handlers, Membership::default());
    let mut kinds_checked = BTreeMap::<String, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !kinds_checked.contains_key("member-failed") {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, stream.next())
            .await
            .expect("all events within 40 s")
            .unwrap()
            .unwrap();
        // As the dispatcher does: the node's own member events carry its current tags.
        node.follow(&ev);
        let outcome = engine.route(
            &ev,
            &Context {
                node: &node,
                pod: ("", ""),
                active: &NoActiveJobs,
                now: SystemTime::now(),
                replayed: false,
            },
        );
        if outcome.no_news {
            // Serf delivered members whose state the operator knows already.
            continue;
        }
        let Some(Action::Launch(launch)) = outcome.actions.first() else {
            panic!("no Job for {ev:?}: {outcome:?}")
        };
        let container = &launch
            .job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        // The environment the container sees, after Kubernetes' `$(VAR)` expansion.
        let mut job_env = container_env_after_expansion(container.env.as_ref().unwrap(), |v| {
            (v.name == "DB_PASSWORD").then(|| SECRET.to_string())
        });
        assert_eq!(job_env.remove("DB_PASSWORD").as_deref(), Some(SECRET));
        for (k, v) in &job_env {
            assert!(!v.contains(SECRET), "{k} leaks the secret: {v:?}");
        }
        let job_stdin = launch.stdin_bytes();

        // The script's record of the same event (the handler runs synchronously in the
        // agent, before or around the stream delivery).
        let wait = Instant::now() + Duration::from_secs(10);
        let record = loop {
            if let Some(r) = read_records(&records)
                .into_iter()
                .find(|r| same_event(&ev, r))
            {
                break r;
            }
            assert!(Instant::now() < wait, "no handler record for {ev:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let names: Vec<&str> = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            names.len(),
            "one variable per name: {names:?}"
        );
        for (k, v) in &record.env {
            if k == "SERF_TAG_MY_TAG" {
                // Serf's winner follows Go's random map order; the Job's is always the
                // last tag in name order.
                assert!(v == "dash" || v == "under", "{v}");
                assert_eq!(job_env[k], "under");
                continue;
            }
            assert_eq!(job_env.get(k), Some(v), "{k} for {}", outcome.event);
        }
        if outcome.event.starts_with("user:retagged@") {
            assert_eq!(record.env["SERF_SELF_ROLE"], "lb");
        }
        for k in job_env.keys() {
            assert!(
                record.env.contains_key(k) || k.starts_with("SERF_PAYLOAD"),
                "{k} is not in Serf's environment for {}",
                outcome.event
            );
        }
        // The payload, which Serf gives only on stdin, reaches SERF_PAYLOAD exactly.
        if let Event::User(u) = &ev {
            match serf_operator::contract::plain_text(&u.payload) {
                Some(text) => assert_eq!(job_env["SERF_PAYLOAD"], text, "{}", outcome.event),
                None => {
                    use base64::Engine as _;
                    let b64 = &job_env["SERF_PAYLOAD_BASE64"];
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap();
                    assert_eq!(bytes, u.payload, "{}", outcome.event);
                    assert_eq!(
                        job_env["SERF_PAYLOAD"],
                        String::from_utf8_lossy(&u.payload).replace('\0', "\u{fffd}")
                    );
                }
            }
        }
        match &ev {
            Event::Member(m) => {
                let ours: Vec<String> = m.members.iter().map(|x| format!("{}\t", x.name)).collect();
                let news = &launch_members(&job_stdin);
                let serf: Vec<String> = normalize_member_stdin(&record.stdin)
                    .into_iter()
                    .filter(|l| news.iter().any(|n| l.starts_with(&format!("{n}\t"))))
                    .collect();
                assert!(!ours.is_empty());
                assert_eq!(
                    normalize_member_stdin(&job_stdin),
                    serf,
                    "{}",
                    outcome.event
                )
            }
            _ => assert_eq!(job_stdin, record.stdin, "{}", outcome.event),
        }
        *kinds_checked.entry(ev.kind().to_string()).or_default() += 1;
    }
    assert_eq!(kinds_checked.get("user"), Some(&7), "{kinds_checked:?}");
    for k in ["query", "member-join", "member-update", "member-failed"] {
        assert!(
            kinds_checked.contains_key(k),
            "{k} not checked: {kinds_checked:?}"
        );
    }
}
