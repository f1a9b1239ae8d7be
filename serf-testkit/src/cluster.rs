//! [`Cluster`]: several agents joined into one Serf cluster on loopback.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{Agent, describe_members};
use crate::config::AgentConfig;

/// How long [`Cluster::start`] waits for convergence.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// How many agents [`Cluster::start`] starts at the same time.
const PARALLEL_STARTS: usize = 16;

/// Agents started together; they are killed when the cluster is dropped.
#[derive(Debug)]
pub struct Cluster {
    /// The agents, in the order of the configs given to [`Cluster::start`].
    pub agents: Vec<Agent>,
}

impl Cluster {
    /// Starts the first agent alone, then the others (in parallel) joining the
    /// first one's bind address, then waits up to 20 s for [`Cluster::wait_converged`].
    ///
    /// Fails if `cfgs` is empty or has duplicate node names. On failure every
    /// agent started so far is killed.
    pub fn start(cfgs: Vec<AgentConfig>) -> io::Result<Cluster> {
        let mut names = HashSet::new();
        for c in &cfgs {
            if !names.insert(c.name()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "serf-testkit: duplicate node name {:?} in Cluster::start",
                        c.name()
                    ),
                ));
            }
        }
        let mut cfgs = cfgs.into_iter();
        let Some(first) = cfgs.next() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "serf-testkit: Cluster::start needs at least one agent config",
            ));
        };
        let first = Agent::start(first, &[])?;
        let seed = [first.bind_addr()];
        let mut agents = vec![first];
        let rest: Vec<AgentConfig> = cfgs.collect();
        for batch in rest.chunks(PARALLEL_STARTS) {
            let results: Vec<io::Result<Agent>> = thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|cfg| {
                        let cfg = cfg.clone();
                        s.spawn(move || Agent::start(cfg, &seed))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(io::Error::other(
                                "serf-testkit: a thread starting an agent panicked",
                            ))
                        })
                    })
                    .collect()
            });
            // Keep every started agent first, so all are killed if one failed.
            let mut first_err = None;
            for r in results {
                match r {
                    Ok(a) => agents.push(a),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        let cluster = Cluster { agents };
        cluster.wait_converged(CONVERGE_TIMEOUT)?;
        Ok(cluster)
    }

    /// Waits until every running agent lists every running agent (itself
    /// included) as `alive`; agents that were killed or exited are ignored
    /// on both sides. Polls every 100 ms; on timeout the error shows what each
    /// agent saw.
    pub fn wait_converged(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<&Agent> = self.agents.iter().filter(|a| a.is_running()).collect();
            let mut problems = Vec::new();
            for a in &running {
                match a.members() {
                    Ok(ms) => {
                        let bad: Vec<String> = running
                            .iter()
                            .filter_map(|b| match ms.iter().find(|m| m.name == b.name()) {
                                Some(m) if m.is_alive() => None,
                                Some(m) => Some(format!("{} is {}", m.name, m.status)),
                                None => Some(format!("{} missing", b.name())),
                            })
                            .collect();
                        if !bad.is_empty() {
                            problems.push(format!(
                                "{} sees {}; members:\n{}",
                                a.name(),
                                bad.join(", "),
                                describe_members(&ms)
                            ));
                        }
                    }
                    Err(e) => problems.push(format!("{}: {e}", a.name())),
                }
            }
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "serf-testkit: cluster not converged after {timeout:?} ({} running agents):\n{}",
                        running.len(),
                        problems.join("\n")
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts one more agent joining the first running agent of the cluster and
    /// returns it (it is also pushed to [`Cluster::agents`]). Does not wait for
    /// convergence.
    pub fn add(&mut self, cfg: AgentConfig) -> io::Result<&mut Agent> {
        if self.agent(cfg.name()).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "serf-testkit: the cluster already has an agent {:?}",
                    cfg.name()
                ),
            ));
        }
        let join: Vec<SocketAddr> = self.join_addr().into_iter().collect();
        let agent = Agent::start(cfg, &join)?;
        self.agents.push(agent);
        let last = self.agents.len() - 1;
        Ok(&mut self.agents[last])
    }

    /// The bind address of the first running agent, to join the cluster.
    pub fn join_addr(&self) -> Option<SocketAddr> {
        self.agents
            .iter()
            .find(|a| a.is_running())
            .map(Agent::bind_addr)
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name() == name)
    }

    /// The agent named `name`, mutably (to kill or restart it).
    pub fn agent_mut(&mut self, name: &str) -> Option<&mut Agent> {
        self.agents.iter_mut().find(|a| a.name() == name)
    }

    /// Number of agents (running or not).
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether the cluster has no agents.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Iterates over the agents.
    pub fn iter(&self) -> std::slice::Iter<'_, Agent> {
        self.agents.iter()
    }
}

impl Index<usize> for Cluster {
    type Output = Agent;

    fn index(&self, i: usize) -> &Agent {
        &self.agents[i]
    }
}

impl IndexMut<usize> for Cluster {
    fn index_mut(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }
}

impl<'a> IntoIterator for &'a Cluster {
    type Item = &'a Agent;
    type IntoIter = std::slice::Iter<'a, Agent>;

    fn into_iter(self) -> Self::IntoIter {
        self.agents.iter()
    }
}
