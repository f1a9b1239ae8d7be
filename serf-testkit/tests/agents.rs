//! Integration tests against real `serf agent` processes on loopback.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serf_testkit::{Agent, AgentConfig, Cluster, keygen, serf_output};

/// Polls until `path` holds exactly `want`.
fn wait_file(path: &Path, want: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{} holds {got:?}, want {want:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn three_agent_cluster_with_tags() {
    let cluster = Cluster::start(vec![
        AgentConfig::new("tk-tags-1")
            .tag("role", "web")
            .tag("dc", "east"),
        AgentConfig::new("tk-tags-2").tag("role", "db"),
        AgentConfig::new("tk-tags-3").tag("role", "db"),
    ])
    .expect("cluster starts");
    assert_eq!(cluster.len(), 3);

    let mut addrs = HashSet::new();
    for a in &cluster {
        assert!(a.is_running());
        assert!(a.pid().is_some());
        assert!(addrs.insert(a.bind_addr()));
        assert!(addrs.insert(a.rpc_addr()));
        let ms = a.members().expect("members");
        let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tk-tags-1", "tk-tags-2", "tk-tags-3"]);
        assert!(ms.iter().all(|m| m.is_alive()), "{ms:?}");
        for m in &ms {
            let agent = cluster.agent(&m.name).expect("known agent");
            assert_eq!(m.addr, agent.bind_addr().to_string());
            assert_eq!(m.port, agent.bind_addr().port());
            assert_eq!(&m.tags, agent.config().tags());
        }
        assert_eq!(ms[0].tags["dc"], "east");
        assert_eq!(ms[2].tags["role"], "db");
    }

    // Flags after the subcommand, positional arguments after the RPC flags.
    let out = cluster[0]
        .serf_ok(&["members", "-tag", "role=db"])
        .expect("filtered members");
    assert!(
        out.contains("tk-tags-2") && out.contains("tk-tags-3"),
        "{out}"
    );
    assert!(!out.contains("tk-tags-1"), "{out}");

    cluster[2]
        .serf_ok(&["tags", "-set", "ver=2"])
        .expect("serf tags");
    cluster[0]
        .wait_for(Duration::from_secs(15), "tk-tags-3 to get ver=2", |ms| {
            ms.iter().any(|m| {
                m.name == "tk-tags-3" && m.tags.get("ver").map(String::as_str) == Some("2")
            })
        })
        .expect("tag update gossiped");
}

#[test]
fn rpc_auth_is_required() {
    let agent = Agent::start(AgentConfig::new("tk-auth-1").rpc_auth("s3cret-token"), &[])
        .expect("agent starts");
    assert_eq!(agent.rpc_auth(), Some("s3cret-token"));
    let config =
        std::fs::read_to_string(agent.dir().join(serf_testkit::CONFIG_FILE)).expect("config file");
    assert_eq!(config, r#"{"rpc_auth":"s3cret-token"}"#);

    let rpc = format!("-rpc-addr={}", agent.rpc_addr());
    let t = Duration::from_secs(10);
    let out = serf_output(&["members", rpc.as_str()], t).expect("serf runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Authentication required"), "{text}");

    let out = serf_output(&["members", rpc.as_str(), "-rpc-auth=wrong"], t).expect("serf runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Invalid authentication token"), "{text}");

    let out = agent.serf(&["members"]).expect("serf runs");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tk-auth-1"));
    let ms = agent.members().expect("members with auth");
    assert_eq!(ms.len(), 1);
    assert!(ms[0].is_alive());
}

#[test]
fn killed_agent_fails_and_comes_back_after_restart() {
    let mut cluster = Cluster::start(vec![
        AgentConfig::new("tk-kill-1"),
        AgentConfig::new("tk-kill-2"),
        AgentConfig::new("tk-kill-3").tag("role", "victim"),
    ])
    .expect("cluster starts");
    let old_pid = cluster[2].pid().expect("pid");
    let (bind, rpc) = (cluster[2].bind_addr(), cluster[2].rpc_addr());

    cluster[2].kill().expect("kill");
    cluster[2].kill().expect("second kill is a no-op");
    assert!(!cluster[2].is_running());
    assert_eq!(cluster[2].pid(), None);
    assert!(cluster[2].exit_status().is_some());
    assert!(!pid_alive(old_pid));
    assert!(cluster[2].members().is_err());

    cluster[0]
        .wait_for_status("tk-kill-3", "failed", Duration::from_secs(30))
        .expect("tk-kill-3 seen as failed");
    // Only running agents count.
    cluster
        .wait_converged(Duration::from_secs(10))
        .expect("the two survivors agree");

    let seed = cluster[0].bind_addr();
    cluster[2].restart(&[seed]).expect("restart");
    assert!(cluster[2].is_running());
    assert_ne!(cluster[2].pid(), Some(old_pid));
    assert_eq!(cluster[2].bind_addr(), bind);
    assert_eq!(cluster[2].rpc_addr(), rpc);
    cluster[1]
        .wait_for_status("tk-kill-3", "alive", Duration::from_secs(30))
        .expect("tk-kill-3 alive again");
    cluster
        .wait_converged(Duration::from_secs(30))
        .expect("converged after restart");
    let log = cluster.agent("tk-kill-3").expect("agent").log();
    assert!(log.contains("serf-testkit: start #1"), "{log}");
    assert!(log.contains("serf-testkit: start #2"), "{log}");
}

#[test]
fn encrypted_cluster_rejects_plain_agent() {
    let key = keygen().expect("keygen");
    let cluster = Cluster::start(vec![
        AgentConfig::new("tk-enc-1").encrypt(key.clone()),
        AgentConfig::new("tk-enc-2").encrypt(key.clone()),
    ])
    .expect("encrypted cluster starts");
    assert!(cluster[0].log().contains("Encrypted: true"));
    let keys = cluster[1].serf_ok(&["keys", "-list"]).expect("keys -list");
    assert!(keys.contains(&key), "{keys}");

    let err = Agent::start(AgentConfig::new("tk-enc-plain"), &[cluster[0].bind_addr()])
        .expect_err("plain agent cannot join");
    let msg = err.to_string();
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(msg.contains("encryption is not configured"), "{msg}");
    assert_eq!(cluster[0].members().expect("members").len(), 2);
}

#[test]
fn event_handler_and_replay() {
    let a = Agent::start(
        AgentConfig::new("tk-ev-1")
            .tag("role", "web")
            .event_handler("user:greet=env > greet.env; cat > greet.payload"),
        &[],
    )
    .expect("agent starts");
    a.serf_ok(&["event", "-coalesce=false", "greet", "hello"])
        .expect("serf event");
    wait_file(
        &a.dir().join("greet.payload"),
        "hello\n",
        Duration::from_secs(10),
    )
    .expect("handler ran");
    let env = std::fs::read_to_string(a.dir().join("greet.env")).expect("env file");
    assert!(env.contains("SERF_USER_EVENT=greet"), "{env}");
    assert!(env.contains("SERF_SELF_NAME=tk-ev-1"), "{env}");
    assert!(env.contains("SERF_TAG_ROLE=web"), "{env}");

    // A joiner with -replay gets the earlier user event too.
    let b = Agent::start(
        AgentConfig::new("tk-ev-2")
            .replay(true)
            .event_handler("user:greet=cat > greet.payload"),
        &[a.bind_addr()],
    )
    .expect("joiner starts");
    assert!(b.log().contains("replay: true"));
    wait_file(
        &b.dir().join("greet.payload"),
        "hello\n",
        Duration::from_secs(10),
    )
    .expect("event replayed to the joiner");
}

#[test]
fn startup_errors_are_descriptive() {
    let err =
        Agent::start(AgentConfig::new("tk-bad-1").arg("-no-such-flag"), &[]).expect_err("bad flag");
    let msg = err.to_string();
    assert!(msg.contains("tk-bad-1"), "{msg}");
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(msg.contains("flag provided but not defined"), "{msg}");

    let err = Agent::start(
        AgentConfig::new("tk-bad-2").binary("/nonexistent/serf-testkit/serf"),
        &[],
    )
    .expect_err("missing binary");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("apt-get install -y serf"), "{err}");

    let err = Cluster::start(vec![AgentConfig::new("tk-dup"), AgentConfig::new("tk-dup")])
        .expect_err("duplicate names");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(Cluster::start(Vec::new()).is_err());
}

#[test]
fn wait_for_fails_fast_when_the_agent_is_gone() {
    let mut a = Agent::start(AgentConfig::new("tk-gone-1"), &[]).expect("agent starts");
    a.kill().expect("kill");
    let t = Instant::now();
    let err = a
        .wait_for(Duration::from_secs(30), "nothing", |_| false)
        .expect_err("agent is dead");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(err.to_string().contains("agent exited"), "{err}");

    let b = Agent::start(AgentConfig::new("tk-gone-2"), &[]).expect("agent starts");
    let err = b
        .wait_for(Duration::from_millis(300), "the impossible", |_| false)
        .expect_err("times out");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(err.to_string().contains("the impossible"), "{err}");
    assert!(err.to_string().contains("tk-gone-2"), "{err}");
}

#[test]
fn drop_kills_the_agent_even_on_panic() {
    let a = Agent::start(AgentConfig::new("tk-drop-1"), &[]).expect("agent starts");
    let (pid, dir) = (a.pid().expect("pid"), a.dir().to_path_buf());
    drop(a);
    assert!(!pid_alive(pid));
    assert!(!dir.exists());

    let seen: std::sync::Mutex<Option<(u32, PathBuf)>> = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let a = Agent::start(AgentConfig::new("tk-drop-2"), &[]).expect("agent starts");
        *seen.lock().expect("lock") = Some((a.pid().expect("pid"), a.dir().to_path_buf()));
        panic!("test panic with a running agent");
    });
    assert!(result.is_err());
    let (pid, dir) = seen.lock().expect("lock").take().expect("agent started");
    assert!(!pid_alive(pid), "agent {pid} still running after the panic");
    // The directory (with the log) is kept for debugging after a panic.
    assert!(dir.join(serf_testkit::LOG_FILE).exists());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn restart_waits_for_its_port_to_be_released() {
    let mut a = Agent::start(AgentConfig::new("tk-port-1"), &[]).expect("agent starts");
    a.kill().expect("kill");
    let squatter = std::net::TcpListener::bind(a.bind_addr()).expect("take the bind port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(squatter);
    });
    let t = Instant::now();
    a.restart(&[]).expect("restart once the port is free");
    assert!(t.elapsed() >= Duration::from_millis(1000));
    release.join().expect("release thread");
    assert!(a.is_running());
    let log = a.log();
    assert!(log.contains("address already in use"), "{log}");
    assert_eq!(a.members().expect("members").len(), 1);
}
