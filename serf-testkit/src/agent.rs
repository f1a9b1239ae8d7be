//! [`Agent`]: one real `serf agent` process on loopback, and [`MemberInfo`] from `serf members`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::cli::{
    DEFAULT_CLI_TIMEOUT, describe_output, display_args, output_with_timeout, serf_command,
    spawn_error,
};
use crate::config::AgentConfig;
use crate::port::free_port;

/// How long [`Agent::start`] and [`Agent::restart`] wait for the agent to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between readiness checks while an agent starts.
const START_POLL: Duration = Duration::from_millis(50);

/// Pause between polls in [`Agent::wait_for`].
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Timeout of one `serf members` call made while waiting.
const MEMBERS_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of the agent log quoted in error messages.
const ERROR_LOG_LINES: usize = 40;

/// Name of the log file (agent stdout + stderr) in the agent directory.
pub const LOG_FILE: &str = "agent.log";

/// Name of the JSON config file in the agent directory (only written when needed).
pub const CONFIG_FILE: &str = "agent.json";
/// Name of the keyring file (`-keyring-file`) in the agent's directory, when the config has a keyring.
pub const KEYRING_FILE: &str = "keyring.json";

/// Environment variable: when set (to anything but `0` or empty), agent
/// directories are kept after the [`Agent`] is dropped.
pub const KEEP_DIRS_ENV: &str = "SERF_TESTKIT_KEEP_DIRS";

/// One member as listed by `serf members -format=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemberInfo {
    /// Node name.
    pub name: String,
    /// Gossip address, `ip:port`.
    pub addr: String,
    /// Gossip port.
    #[serde(default)]
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `alive`, `leaving`, `left`, `failed` or `none`.
    pub status: String,
}

impl MemberInfo {
    /// Whether the status is `alive`.
    pub fn is_alive(&self) -> bool {
        self.status == "alive"
    }
}

impl fmt::Display for MemberInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.name, self.addr, self.status)?;
        let mut sep = " ";
        for (k, v) in &self.tags {
            write!(f, "{sep}{k}={v}")?;
            sep = ",";
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct MembersJson {
    #[serde(default)]
    members: Vec<MemberInfo>,
}

/// Parses the output of `serf members -format=json`; members are sorted by name.
pub fn parse_members_json(json: &str) -> io::Result<Vec<MemberInfo>> {
    let parsed: MembersJson = serde_json::from_str(json).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "serf-testkit: cannot parse `serf members -format=json` output ({e}): {json:?}"
            ),
        )
    })?;
    let mut members = parsed.members;
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(members)
}

/// Formats members one per line, for messages.
pub(crate) fn describe_members(members: &[MemberInfo]) -> String {
    if members.is_empty() {
        return "(none)".to_owned();
    }
    members
        .iter()
        .map(|m| format!("  {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first `head` and last `tail` lines of `text`, or all of it if that is not longer.
fn head_and_tail(text: &str, head: usize, tail: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    if lines.len() <= head + tail {
        return lines.join("\n");
    }
    format!(
        "{}\n[... {} lines ...]\n{}",
        lines[..head].join("\n"),
        lines.len() - head - tail,
        lines[lines.len() - tail..].join("\n")
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why one launch attempt failed.
struct LaunchFailure {
    error: io::Error,
    /// The agent exited saying one of its ports was already in use.
    addr_in_use: bool,
}

/// A running (or killed) `serf agent` process on 127.0.0.1.
///
/// The agent gets its own temporary directory holding its log file
/// ([`LOG_FILE`], stdout and stderr, kept across restarts) and, when needed, its JSON
/// config file ([`CONFIG_FILE`]). Dropping the `Agent` kills the process with
/// SIGKILL and removes the directory; this also happens when a test panics.
/// When the drop happens during a panic, the log's path and tail are printed
/// to stderr and the directory is kept, as it is whenever [`KEEP_DIRS_ENV`] is set.
pub struct Agent {
    cfg: AgentConfig,
    bind_addr: SocketAddr,
    rpc_addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    last_exit: Mutex<Option<ExitStatus>>,
    starts: u32,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.cfg.name())
            .field("bind_addr", &self.bind_addr)
            .field("rpc_addr", &self.rpc_addr)
            .field("dir", &self.dir.path())
            .field("pid", &self.pid())
            .finish()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Agent {
    /// Starts an agent with fresh free ports on 127.0.0.1 (gossip on
    /// [`AgentConfig::bind_ip`] if set) and waits until it is usable.
    ///
    /// If `join` is non-empty the agent is started with `-join=ADDR` for each
    /// address (and `-replay` if [`AgentConfig::replay`] is set), and the start
    /// only succeeds once the join has completed. The agent is ready when its RPC
    /// port accepts a TCP connection and `serf members` (with the auth key, if any)
    /// lists it. Waits up to [`START_TIMEOUT`]; on failure the error includes the
    /// tail of the agent's log and the process is killed.
    pub fn start(cfg: AgentConfig, join: &[SocketAddr]) -> io::Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("serf-testkit-{}-", sanitize(cfg.name())))
            .tempdir()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "serf-testkit: agent {}: cannot create a temporary directory: {e}",
                        cfg.name()
                    ),
                )
            })?;
        let mut agent = Agent {
            bind_addr: SocketAddr::new(cfg.gossip_ip(), free_port()?),
            rpc_addr: loopback(free_port()?),
            cfg,
            dir,
            child: Mutex::new(None),
            last_exit: Mutex::new(None),
            starts: 0,
        };
        if let Some(keys) = agent.cfg.initial_keyring() {
            let path = agent.keyring_file_path();
            let json = serde_json::Value::from(keys.to_vec()).to_string();
            fs::write(&path, json).map_err(|e| {
                agent.err(
                    e.kind(),
                    format!("cannot write keyring file {}: {e}", path.display()),
                )
            })?;
        }
        if let Some(json) = agent.cfg.config_file_json() {
            let path = agent.config_file_path();
            fs::write(&path, json).map_err(|e| {
                agent.err(
                    e.kind(),
                    format!("cannot write config file {}: {e}", path.display()),
                )
            })?;
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match agent.launch(join, Instant::now() + START_TIMEOUT) {
                Ok(()) => return Ok(agent),
                // Someone else took a port between free_port() and the agent's bind.
                Err(f) if f.addr_in_use && attempts < 4 => {
                    agent.bind_addr = SocketAddr::new(agent.cfg.gossip_ip(), free_port()?);
                    agent.rpc_addr = loopback(free_port()?);
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// Starts the agent again after [`Agent::kill`] or an exit, with the same
    /// name, ports, directory and config; `join` as for [`Agent::start`].
    ///
    /// A still running agent is killed first. The log file is appended to.
    pub fn restart(&mut self, join: &[SocketAddr]) -> io::Result<()> {
        self.kill()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch(join, deadline) {
                Ok(()) => return Ok(()),
                // The old ports may be briefly held by something else; retry until the deadline.
                Err(f) if f.addr_in_use && Instant::now() + START_POLL * 4 < deadline => {
                    thread::sleep(START_POLL * 4);
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// The node name.
    pub fn name(&self) -> &str {
        self.cfg.name()
    }

    /// The RPC address (`-rpc-addr`), for RPC clients.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The gossip address (`-bind` and `-advertise`), to join this agent.
    pub fn bind_addr(&self) -> SocketAddr {
        self.bind_addr
    }

    /// The RPC auth key, if the agent requires one.
    pub fn rpc_auth(&self) -> Option<&str> {
        self.cfg.rpc_auth_key()
    }

    /// The config the agent was started with.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The agent's temporary directory (log file, config file, handler working directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the log file (agent stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    fn config_file_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    /// Path of the keyring file (`-keyring-file`), used when the config has a keyring.
    pub fn keyring_file_path(&self) -> PathBuf {
        self.dir.path().join(KEYRING_FILE)
    }

    /// The keys in the agent's keyring file, the primary first, as the agent last wrote
    /// them (it writes every change made over RPC).
    ///
    /// # Errors
    /// The file cannot be read or is not a JSON array of strings.
    pub fn keyring(&self) -> io::Result<Vec<String>> {
        let path = self.keyring_file_path();
        let text = fs::read_to_string(&path)
            .map_err(|e| self.err(e.kind(), format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            self.err(
                io::ErrorKind::InvalidData,
                format!("{} is not a JSON list of keys: {e}", path.display()),
            )
        })
    }

    /// The process id, or `None` once the agent has been killed or has exited
    /// and that was noticed.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// The whole log file (every start of this agent; lines starting with
    /// `==> serf-testkit:` are written by the harness).
    pub fn log(&self) -> String {
        match fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!(
                "<serf-testkit: cannot read log file {}: {e}>",
                self.log_path().display()
            ),
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log(), n)
    }

    /// Kills the agent with SIGKILL and waits for it. Does nothing if it is not running.
    pub fn kill(&mut self) -> io::Result<()> {
        self.kill_inner()
    }

    fn kill_inner(&self) -> io::Result<()> {
        let mut guard = lock(&self.child);
        let Some(mut child) = guard.take() else {
            return Ok(());
        };
        if let Err(e) = child.kill() {
            // Already reaped or similar: only wait if it is really gone.
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let pid = child.id();
                *guard = Some(child);
                return Err(self.err(e.kind(), format!("cannot kill pid {pid}: {e}")));
            }
        }
        let status = child
            .wait()
            .map_err(|e| self.err(e.kind(), format!("cannot wait for pid {}: {e}", child.id())))?;
        *lock(&self.last_exit) = Some(status);
        Ok(())
    }

    /// Whether the agent process is still running.
    ///
    /// Takes `&self` (a `&mut Agent` works too), so it can be used on agents
    /// shared between tasks or threads.
    pub fn is_running(&self) -> bool {
        let mut guard = lock(&self.child);
        let exited = match guard.as_mut().map(Child::try_wait) {
            None => return false,
            Some(Ok(None)) => return true,
            Some(Ok(Some(status))) => Some(status),
            // Cannot tell; assume it still runs (Drop will kill it).
            Some(Err(_)) => return true,
        };
        *guard = None;
        *lock(&self.last_exit) = exited;
        false
    }

    /// The exit status of the last process of this agent once it has been killed
    /// or has exited (and that was noticed by [`Agent::is_running`] or [`Agent::kill`]).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        if self.is_running() {
            None
        } else {
            *lock(&self.last_exit)
        }
    }

    /// Runs `serf <args[0]> -rpc-addr=<this agent> [-rpc-auth=KEY] <args[1..]>`
    /// and returns its output whatever the exit status (see [`Agent::serf_ok`]).
    ///
    /// `args[0]` is the subcommand (`members`, `event`, `query`, `tags`, `keys`, ...).
    /// The RPC flags go right after it because the CLI stops parsing flags at the
    /// first positional argument, e.g. `serf event -rpc-addr=.. deploy payload`.
    /// Times out after [`DEFAULT_CLI_TIMEOUT`].
    pub fn serf(&self, args: &[&str]) -> io::Result<Output> {
        self.serf_with_timeout(args, DEFAULT_CLI_TIMEOUT)
    }

    /// [`Agent::serf`] with a timeout; the CLI process is killed when it expires.
    pub fn serf_with_timeout(&self, args: &[&str], timeout: Duration) -> io::Result<Output> {
        let Some((sub, rest)) = args.split_first() else {
            return Err(self.err(
                io::ErrorKind::InvalidInput,
                "Agent::serf needs a subcommand as args[0]".to_owned(),
            ));
        };
        let mut full: Vec<String> = vec![(*sub).to_owned(), format!("-rpc-addr={}", self.rpc_addr)];
        if let Some(key) = self.rpc_auth() {
            full.push(format!("-rpc-auth={key}"));
        }
        full.extend(rest.iter().map(|s| (*s).to_owned()));
        let binary = self.cfg.binary_path();
        let mut cmd = serf_command(&binary);
        cmd.args(&full);
        let what = format!("agent {}: `serf {}`", self.name(), display_args(&full));
        output_with_timeout(cmd, &binary, timeout, &what)
    }

    /// Like [`Agent::serf`], but a non-zero exit status is an error (with the
    /// command's output); returns stdout.
    pub fn serf_ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.serf(args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(self.err(
                io::ErrorKind::Other,
                format!(
                    "`serf {}` failed: {}",
                    args.join(" "),
                    describe_output(&out)
                ),
            ))
        }
    }

    /// The members this agent knows, via `serf members -format=json`, sorted by name.
    pub fn members(&self) -> io::Result<Vec<MemberInfo>> {
        self.members_with_timeout(MEMBERS_TIMEOUT)
    }

    fn members_with_timeout(&self, timeout: Duration) -> io::Result<Vec<MemberInfo>> {
        let out = self.serf_with_timeout(&["members", "-format=json"], timeout)?;
        if !out.status.success() {
            return Err(self.err(
                io::ErrorKind::Other,
                format!("`serf members` failed: {}", describe_output(&out)),
            ));
        }
        parse_members_json(&String::from_utf8_lossy(&out.stdout))
    }

    /// The member named `name` as this agent sees it, if listed.
    pub fn member(&self, name: &str) -> io::Result<Option<MemberInfo>> {
        Ok(self.members()?.into_iter().find(|m| m.name == name))
    }

    /// Polls [`Agent::members`] every 100 ms until `f` returns true.
    ///
    /// Fails with [`io::ErrorKind::TimedOut`] after `timeout`, and at once if the
    /// agent process is no longer running; the error names `what` and includes
    /// the last member list (or error) and the tail of the agent's log.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&[MemberInfo]) -> bool,
    ) -> io::Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let last = match self
                .members_with_timeout(MEMBERS_TIMEOUT.min(timeout.max(Duration::from_secs(2))))
            {
                Ok(members) => {
                    if f(&members) {
                        return Ok(());
                    }
                    format!("last members:\n{}", describe_members(&members))
                }
                Err(e) => format!("last error: {e}"),
            };
            if !self.is_running() {
                return Err(self.err_with_log(
                    io::ErrorKind::Other,
                    format!(
                        "agent exited ({}) while waiting for {what}; {last}",
                        self.exit_text()
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(self.err_with_log(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {timeout:?} waiting for {what}; {last}"),
                ));
            }
            thread::sleep(WAIT_POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// Waits until this agent lists `name` with status `status` (`alive`, `failed`, `left`, ...).
    pub fn wait_for_status(&self, name: &str, status: &str, timeout: Duration) -> io::Result<()> {
        self.wait_for(timeout, &format!("{name} to be {status}"), |ms| {
            ms.iter().any(|m| m.name == name && m.status == status)
        })
    }

    fn exit_text(&self) -> String {
        match *lock(&self.last_exit) {
            Some(s) => s.to_string(),
            None => "exit status unknown".to_owned(),
        }
    }

    fn err(&self, kind: io::ErrorKind, msg: String) -> io::Error {
        io::Error::new(
            kind,
            format!("serf-testkit: agent {}: {msg}", self.cfg.name()),
        )
    }

    fn err_with_log(&self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.err(
            kind,
            format!(
                "{msg}\n--- last {ERROR_LOG_LINES} lines of {} ---\n{}\n---",
                self.log_path().display(),
                self.log_tail(ERROR_LOG_LINES)
            ),
        )
    }

    fn open_log(&self) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
    }

    /// Spawns the agent process and waits until it is ready or `deadline` passes.
    fn launch(&mut self, join: &[SocketAddr], deadline: Instant) -> Result<(), LaunchFailure> {
        let fail = |error: io::Error| LaunchFailure {
            error,
            addr_in_use: false,
        };
        self.starts += 1;
        let config_file = self.cfg.config_file_json().map(|_| self.config_file_path());
        let keyring_file = self.cfg.initial_keyring().map(|_| self.keyring_file_path());
        let args = self.cfg.agent_args(
            self.bind_addr,
            self.rpc_addr,
            config_file.as_deref(),
            keyring_file.as_deref(),
            join,
        );
        let binary = self.cfg.binary_path();

        let mut log = self.open_log().map_err(|e| {
            fail(self.err(
                e.kind(),
                format!("cannot open log file {}: {e}", self.log_path().display()),
            ))
        })?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let header = format!(
            "==> serf-testkit: start #{}: {} {}\n",
            self.starts,
            binary.display(),
            display_args(&args)
        );
        let stderr = log
            .write_all(header.as_bytes())
            .and_then(|()| log.try_clone());
        let stderr = stderr.map_err(|e| {
            fail(self.err(
                e.kind(),
                format!("cannot write log file {}: {e}", self.log_path().display()),
            ))
        })?;

        let mut cmd = serf_command(&binary);
        cmd.args(&args)
            .current_dir(self.dir.path())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        let child = cmd.spawn().map_err(|e| {
            fail(spawn_error(
                &binary,
                &format!("start agent {}", self.name()),
                e,
            ))
        })?;
        *lock(&self.child) = Some(child);

        match self.wait_ready(join, log_start, deadline) {
            Ok(()) => Ok(()),
            Err(mut failure) => {
                if let Err(e) = self.kill_inner() {
                    failure.error = io::Error::new(
                        failure.error.kind(),
                        format!("{}\n(and killing it failed: {e})", failure.error),
                    );
                }
                Err(failure)
            }
        }
    }

    /// The log written since byte `from`.
    fn log_since(&self, from: u64) -> String {
        let log = self.log();
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        log.get(from..).unwrap_or(&log).to_owned()
    }

    fn wait_ready(
        &self,
        join: &[SocketAddr],
        log_start: u64,
        deadline: Instant,
    ) -> Result<(), LaunchFailure> {
        let started = Instant::now();
        let mut rpc_open = false;
        let mut last = String::from("RPC port not open yet");
        loop {
            if !self.is_running() {
                let log = self.log_since(log_start);
                return Err(LaunchFailure {
                    error: self.err(
                        io::ErrorKind::Other,
                        format!(
                            "agent exited during startup ({}), bind {}, rpc {}\n\
                             --- agent log of this start ---\n{}\n---",
                            self.exit_text(),
                            self.bind_addr,
                            self.rpc_addr,
                            head_and_tail(&log, 15, ERROR_LOG_LINES)
                        ),
                    ),
                    addr_in_use: log.contains("address already in use"),
                });
            }
            if !rpc_open {
                match TcpStream::connect_timeout(&self.rpc_addr, Duration::from_millis(200)) {
                    Ok(_) => rpc_open = true,
                    Err(e) => last = format!("RPC port {} not open: {e}", self.rpc_addr),
                }
            }
            let joined = join.is_empty() || self.log_since(log_start).contains("Join completed");
            if rpc_open && !joined {
                last = "startup join not completed".to_owned();
            }
            if rpc_open && joined {
                match self.members_with_timeout(Duration::from_secs(5)) {
                    Ok(ms) if ms.iter().any(|m| m.name == self.name()) => return Ok(()),
                    Ok(ms) => {
                        last = format!(
                            "`serf members` does not list {} yet:\n{}",
                            self.name(),
                            describe_members(&ms)
                        );
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(LaunchFailure {
                    error: self.err(
                        io::ErrorKind::TimedOut,
                        format!(
                            "agent not ready after {:?} (bind {}, rpc {}): {last}\n\
                             --- agent log of this start ---\n{}\n---",
                            started.elapsed(),
                            self.bind_addr,
                            self.rpc_addr,
                            head_and_tail(&self.log_since(log_start), 15, ERROR_LOG_LINES)
                        ),
                    ),
                    addr_in_use: false,
                });
            }
            thread::sleep(START_POLL);
        }
    }
}

fn keep_dirs_requested() -> bool {
    std::env::var_os(KEEP_DIRS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Never panics: errors are ignored; a stuck kill only leaves the process behind.
        let _ = self.kill_inner();
        let panicking = thread::panicking();
        if panicking || keep_dirs_requested() {
            self.dir.disable_cleanup(true);
        }
        if panicking {
            eprintln!(
                "serf-testkit: agent {} killed during a panic; log kept at {}; last lines:\n{}",
                self.cfg.name(),
                self.log_path().display(),
                self.log_tail(10)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members_json() {
        let json = r#"{"members":[
            {"name":"node2","addr":"127.0.0.1:7947","port":7947,"tags":{"role":"db"},"status":"alive","protocol":{"max":5,"min":2,"version":5}},
            {"name":"node1","addr":"127.0.0.1:7946","port":7946,"tags":{},"status":"failed","protocol":{"max":5,"min":2,"version":5}}]}"#;
        let ms = parse_members_json(json).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].name, "node1");
        assert_eq!(ms[0].status, "failed");
        assert!(!ms[0].is_alive());
        assert_eq!(ms[1].tags["role"], "db");
        assert_eq!(ms[1].port, 7947);
        assert_eq!(ms[1].to_string(), "node2 127.0.0.1:7947 alive role=db");
        assert!(parse_members_json("nope").is_err());
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(head_and_tail("1\n2\n3\n", 1, 2), "1\n2\n3");
        assert_eq!(
            head_and_tail("1\n2\n3\n4\n5", 1, 2),
            "1\n[... 2 lines ...]\n4\n5"
        );
    }
}
