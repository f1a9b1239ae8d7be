//! [`AgentConfig`]: what one Serf agent is started with (name, tags, keys, handlers, flags).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Settings for one `serf agent` process, built with chained calls.
///
/// The harness always passes `-node`, `-bind`, `-advertise`, `-rpc-addr` and
/// `-log-level=debug`; everything here is added on top of that.
///
/// ```
/// use serf_testkit::AgentConfig;
///
/// let cfg = AgentConfig::new("node1")
///     .tag("role", "web")
///     .rpc_auth("s3cret")
///     .event_handler("user:deploy=/path/to/deploy.sh");
/// assert_eq!(cfg.name(), "node1");
/// assert_eq!(cfg.rpc_auth_key(), Some("s3cret"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    name: String,
    tags: BTreeMap<String, String>,
    encrypt: Option<String>,
    keyring: Option<Vec<String>>,
    event_handlers: Vec<String>,
    args: Vec<String>,
    replay: bool,
    config_file: Map<String, Value>,
    binary: Option<PathBuf>,
    bind_ip: Option<IpAddr>,
}

impl AgentConfig {
    /// A config for a node named exactly `name` (`-node=NAME`).
    ///
    /// Node names must be unique within a cluster; tests that run in parallel
    /// should use names that are unique per test.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            tags: BTreeMap::new(),
            encrypt: None,
            keyring: None,
            event_handlers: Vec::new(),
            args: Vec::new(),
            replay: false,
            config_file: Map::new(),
            binary: None,
            bind_ip: None,
        }
    }

    /// Adds the tag `k=v` (`-tag k=v`). Setting the same key again replaces the value.
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.insert(k.into(), v.into());
        self
    }

    /// Enables gossip encryption with a base64 32-byte key (`-encrypt=KEY`), see [`crate::keygen`].
    pub fn encrypt(mut self, key_base64: impl Into<String>) -> Self {
        self.encrypt = Some(key_base64.into());
        self
    }

    /// Starts the agent with a keyring file (`-keyring-file`): a JSON array of base64 keys,
    /// the first one the primary. The file is written into the agent's directory at the
    /// first start only; the agent writes every keyring change made over RPC into it, so a
    /// restarted agent comes back with the keyring it had (see [`crate::Agent::keyring`]).
    /// Serf refuses `-encrypt` together with a keyring file.
    pub fn keyring<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keyring = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Requires RPC clients to authenticate with `key`.
    ///
    /// The agent has no CLI flag for this: the key is written as `{"rpc_auth": key}`
    /// into a JSON config file that is passed with `-config-file`.
    pub fn rpc_auth(self, key: impl Into<String>) -> Self {
        self.config_entry("rpc_auth", key.into())
    }

    /// Adds an event handler (`-event-handler=SPEC`); can be called several times.
    ///
    /// `SPEC` is `script`, `TYPE=script` or `user:NAME=script`. Handlers run via
    /// `/bin/sh -c` with the agent's temporary directory as working directory.
    pub fn event_handler(mut self, spec: impl Into<String>) -> Self {
        self.event_handlers.push(spec.into());
        self
    }

    /// Adds any extra `serf agent` argument, e.g. `-profile=local`.
    ///
    /// Extra arguments come after the harness's own flags, so for single-valued
    /// flags such as `-log-level` they win.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Whether the startup join replays past user events (`-replay`); only used
    /// when the agent is started with join addresses.
    pub fn replay(mut self, on: bool) -> Self {
        self.replay = on;
        self
    }

    /// Sets a key in the agent's JSON config file (passed with `-config-file`),
    /// e.g. `config_entry("query_response_size_limit", 2048)`.
    ///
    /// The file is only written when at least one entry (or [`Self::rpc_auth`]) is set.
    pub fn config_entry(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.config_file.insert(key.into(), value.into());
        self
    }

    /// Uses this `serf` executable instead of [`crate::serf_binary`] for the agent
    /// and for the CLI calls made through it.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Gossips on `ip` (`-bind` and `-advertise`) instead of 127.0.0.1, e.g. an address of a
    /// test interface where a consumer refuses loopback addresses. The RPC stays on
    /// 127.0.0.1.
    pub fn bind_ip(mut self, ip: IpAddr) -> Self {
        self.bind_ip = Some(ip);
        self
    }

    /// The address gossip binds to: [`AgentConfig::bind_ip`], or 127.0.0.1.
    pub fn gossip_ip(&self) -> IpAddr {
        self.bind_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tags passed with `-tag`.
    pub fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }

    /// The keyring the agent's keyring file starts with, if any.
    pub fn initial_keyring(&self) -> Option<&[String]> {
        self.keyring.as_deref()
    }

    /// The gossip encryption key, if any.
    pub fn encrypt_key(&self) -> Option<&str> {
        self.encrypt.as_deref()
    }

    /// The RPC auth key, if any (the `rpc_auth` config file entry).
    pub fn rpc_auth_key(&self) -> Option<&str> {
        self.config_file.get("rpc_auth").and_then(Value::as_str)
    }

    /// The event handler specs, in order.
    pub fn event_handlers(&self) -> &[String] {
        &self.event_handlers
    }

    /// The extra agent arguments, in order.
    pub fn extra_args(&self) -> &[String] {
        &self.args
    }

    /// Whether a startup join uses `-replay`.
    pub fn replays(&self) -> bool {
        self.replay
    }

    /// The entries of the JSON config file.
    pub fn config_entries(&self) -> &Map<String, Value> {
        &self.config_file
    }

    /// The `serf` executable used for this agent.
    pub fn binary_path(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(crate::serf_binary)
    }

    /// The JSON config file content, or `None` when no entries are set.
    pub(crate) fn config_file_json(&self) -> Option<String> {
        if self.config_file.is_empty() {
            None
        } else {
            Some(Value::Object(self.config_file.clone()).to_string())
        }
    }

    /// The full `serf agent ...` argument list (without the program name).
    pub(crate) fn agent_args(
        &self,
        bind: std::net::SocketAddr,
        rpc: std::net::SocketAddr,
        config_file: Option<&Path>,
        keyring_file: Option<&Path>,
        join: &[std::net::SocketAddr],
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            format!("-node={}", self.name).into(),
            format!("-bind={bind}").into(),
            format!("-advertise={bind}").into(),
            format!("-rpc-addr={rpc}").into(),
            "-log-level=debug".into(),
        ];
        for (k, v) in &self.tags {
            args.push("-tag".into());
            args.push(format!("{k}={v}").into());
        }
        if let Some(key) = &self.encrypt {
            args.push(format!("-encrypt={key}").into());
        }
        if let Some(path) = config_file {
            let mut a = OsString::from("-config-file=");
            a.push(path);
            args.push(a);
        }
        if let Some(path) = keyring_file {
            let mut a = OsString::from("-keyring-file=");
            a.push(path);
            args.push(a);
        }
        for h in &self.event_handlers {
            args.push(format!("-event-handler={h}").into());
        }
        args.extend(self.args.iter().map(OsString::from));
        for addr in join {
            args.push(format!("-join={addr}").into());
        }
        if !join.is_empty() && self.replay {
            args.push("-replay".into());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_agent_args() {
        let cfg = AgentConfig::new("n1")
            .tag("role", "web")
            .tag("dc", "east")
            .encrypt("KEY")
            .rpc_auth("tok")
            .event_handler("user:x=echo")
            .arg("-profile=local")
            .replay(true);
        let bind = "127.0.0.1:20001".parse().unwrap();
        let rpc = "127.0.0.1:20002".parse().unwrap();
        let join = ["127.0.0.1:20003".parse().unwrap()];
        let args = cfg.agent_args(bind, rpc, Some(Path::new("/d/agent.json")), None, &join);
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "agent",
                "-node=n1",
                "-bind=127.0.0.1:20001",
                "-advertise=127.0.0.1:20001",
                "-rpc-addr=127.0.0.1:20002",
                "-log-level=debug",
                "-tag",
                "dc=east",
                "-tag",
                "role=web",
                "-encrypt=KEY",
                "-config-file=/d/agent.json",
                "-event-handler=user:x=echo",
                "-profile=local",
                "-join=127.0.0.1:20003",
                "-replay",
            ]
        );
        assert_eq!(cfg.rpc_auth_key(), Some("tok"));
        assert_eq!(cfg.config_file_json().unwrap(), r#"{"rpc_auth":"tok"}"#);
        // -replay only with a join
        let args = cfg.agent_args(bind, rpc, None, None, &[]);
        assert!(!args.iter().any(|a| a == "-replay"));
        assert_eq!(AgentConfig::new("x").config_file_json(), None);
    }
}
