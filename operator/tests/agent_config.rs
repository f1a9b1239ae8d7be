//! `serf-operator agent-config`, the Helm chart's init container: the file it writes from
//! the environment is private (mode 0600) and a real `serf agent` runs with it: the gossip key
//! lets it join an encrypted cluster, the RPC key is required of clients. A bad key is refused
//! without being shown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};
use std::time::Duration;

use serf_testkit::{Agent, AgentConfig};

fn agent_config(out: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_serf-operator"));
    cmd.args(["agent-config", "--out"])
        .arg(out)
        .env_remove("SERF_RPC_AUTH")
        .env_remove("SERF_ENCRYPT_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_real_agent_runs_with_the_file_and_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("agent.json");
    let key = serf_testkit::keygen().unwrap();
    let done = agent_config(
        &out,
        &[("SERF_ENCRYPT_KEY", &key), ("SERF_RPC_AUTH", "rpc-token")],
    );
    assert!(done.status.success(), "{done:?}");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!printed.contains(&key) && !printed.contains("rpc-token"));
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        cfg,
        serde_json::json!({"encrypt_key": key, "rpc_auth": "rpc-token", "leave_on_terminate": true})
    );

    // A peer with the same key; the agent started with the file joins it (the start waits for
    // the join), which an agent without the key could not.
    let peer = Agent::start(
        AgentConfig::new("ac-peer").config_entry("encrypt_key", key.clone()),
        &[],
    )
    .unwrap();
    let agent = Agent::start(
        AgentConfig::new("ac-agent")
            .arg(format!("-config-file={}", out.display()))
            // the harness's own calls authenticate with the same key
            .rpc_auth("rpc-token"),
        &[peer.bind_addr()],
    )
    .unwrap();
    assert!(agent.log().contains("Encrypted: true"), "{}", agent.log());
    peer.wait_for_status("ac-agent", "alive", Duration::from_secs(10))
        .unwrap();
    let anonymous = serf_testkit::serf_output(
        &["members", &format!("-rpc-addr={}", agent.rpc_addr())],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        !anonymous.status.success(),
        "the agent answers RPC without its key"
    );
}

#[test]
fn without_keys_the_file_holds_the_settings_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("agent.json");
    let done = agent_config(&out, &[("SERF_RPC_AUTH", "")]);
    assert!(done.status.success(), "{done:?}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(cfg, serde_json::json!({"leave_on_terminate": true}));
}

#[test]
fn a_bad_gossip_key_is_refused_without_being_shown() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("agent.json");
    let short = "c2hvcnQta2V5"; // "short-key": 9 bytes
    for key in [short, "not base64 at all!"] {
        let done = agent_config(&out, &[("SERF_ENCRYPT_KEY", key)]);
        assert!(!done.status.success());
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert!(stderr.contains("SERF_ENCRYPT_KEY"), "{stderr}");
        assert!(!stderr.contains(key), "the key is shown: {stderr}");
        assert!(!out.exists(), "a file was written for a bad key");
    }
}

#[test]
fn with_a_keyring_file_the_agent_keeps_rpc_keyring_changes_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("agent.json");
    let ring = dir.path().join("keyring").join("keyring.json");
    let (old, other, new) = (
        serf_testkit::keygen().unwrap(),
        serf_testkit::keygen().unwrap(),
        serf_testkit::keygen().unwrap(),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_serf-operator"));
    cmd.args(["agent-config", "--out"])
        .arg(&out)
        .arg("--keyring-file")
        .arg(&ring)
        .env_remove("SERF_RPC_AUTH")
        .env("SERF_ENCRYPT_KEY", &old)
        .env("SERF_ENCRYPT_KEYS", &other);
    let done = cmd.output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        cfg,
        serde_json::json!({"keyring_file": ring.to_str().unwrap(), "leave_on_terminate": true}),
        "no encrypt_key: Serf refuses it next to a keyring file"
    );
    assert_eq!(
        std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let read =
        || -> Vec<String> { serde_json::from_slice(&std::fs::read(&ring).unwrap()).unwrap() };
    assert_eq!(read(), [old.clone(), other.clone()]);

    let mut agent = Agent::start(
        AgentConfig::new("ac-ring").arg(format!("-config-file={}", out.display())),
        &[],
    )
    .unwrap();
    assert!(agent.log().contains("Encrypted: true"), "{}", agent.log());
    for args in [
        ["keys", "-install", &new],
        ["keys", "-use", &new],
        ["keys", "-remove", &old],
    ] {
        agent.serf_ok(&args).unwrap();
    }
    let mut now = read();
    now.sort();
    let mut want = vec![new.clone(), other.clone()];
    want.sort();
    assert_eq!(now, want, "the agent wrote its keyring file");
    assert_eq!(read()[0], new, "the primary first");
    agent.restart(&[]).unwrap();
    let listed = agent.serf_ok(&["keys", "-list"]).unwrap();
    assert!(listed.contains(&new) && !listed.contains(&old), "{listed}");
}
