//! Real Serf agents on loopback for tests, and a synthetic agent that speaks their RPC
//! protocol for scale tests ([`synthetic`]).
//!
//! Starts HashiCorp `serf agent` processes (Debian package `serf`; the binary
//! is `$SERF_BIN` or `serf` in `PATH`) on 127.0.0.1 with free ports, one
//! temporary directory per agent, and kills them with SIGKILL when dropped,
//! also when a test panics. The API is synchronous (std::process, std::net),
//! so it works from plain and from async tests (in async tests, call the
//! blocking functions through `spawn_blocking` or before entering the runtime
//! if blocking a worker thread matters).
//!
//! ```no_run
//! use std::time::Duration;
//! use serf_testkit::{AgentConfig, Cluster};
//!
//! fn main() -> std::io::Result<()> {
//!     let mut cluster = Cluster::start(vec![
//!         AgentConfig::new("doc-a").tag("role", "web"),
//!         AgentConfig::new("doc-b").rpc_auth("s3cret"),
//!     ])?;
//!     let rpc = cluster[0].rpc_addr(); // point the RPC client here
//!     # let _ = rpc;
//!     cluster[1].kill()?;
//!     cluster[0].wait_for_status("doc-b", "failed", Duration::from_secs(30))?;
//!     let seed = cluster[0].bind_addr();
//!     cluster[1].restart(&[seed])?;
//!     cluster.wait_converged(Duration::from_secs(20))?;
//!     Ok(())
//! }
//! ```
//!
//! Set `SERF_TESTKIT_KEEP_DIRS=1` to keep the agents' directories (logs) after
//! the test; they are always kept when the agent is dropped during a panic.

mod agent;
mod cli;
mod cluster;
mod config;
mod port;
pub mod synthetic;

pub use agent::{
    Agent, CONFIG_FILE, KEEP_DIRS_ENV, KEYRING_FILE, LOG_FILE, MemberInfo, START_TIMEOUT,
    parse_members_json,
};
pub use cli::{DEFAULT_CLI_TIMEOUT, keygen, serf_binary, serf_output};
pub use cluster::{CONVERGE_TIMEOUT, Cluster};
pub use config::AgentConfig;
pub use port::{free_port, port_is_free};
pub use synthetic::{SyntheticAgent, SyntheticConfig, SyntheticMember};
