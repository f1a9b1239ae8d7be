//! serf-operator: makes a Kubernetes cluster a citizen of a HashiCorp Serf cluster.
//!
//! Where things are:
//! - the routing rules (pure, no Kubernetes client): [`engine`];
//! - the Job contract (`SERF_*`, `/serf/stdin`, what Kubernetes expands): [`contract`] and
//!   [`jobs`];
//! - the event path (Serf link → queue → dispatcher → effects): [`dispatch`], with the
//!   Kubernetes effects in [`effects`] and local mode's printer in [`local`];
//! - how a trigger fires: [`trigger`] (decision and send) and [`controller::trigger`];
//! - the operator's Jobs, indexed by handler and route: [`index`];
//! - gossip key rotation from a Secret: [`keyring`] (format, pure decision, RPC steps) and
//!   [`controller::keyring`];
//! - Serf membership as service discovery (selection, endpoints, slicing at 1,000): [`discovery`];
//! - leader election: [`leader`];
//! - the retry policy for Job creation: [`launcher`];
//! - the state written back (status, ledgers, membership): [`state`], [`status`], [`ledger`],
//!   [`record`];
//! - errors and their retry category: [`error`]; admin endpoints: [`admin`]; wiring: [`run`].

pub mod admin;
pub mod answer;
pub mod contract;
pub mod controller;
pub mod discovery;
pub mod dispatch;
pub mod effects;
pub mod engine;
pub mod error;
pub mod index;
pub mod jobs;
pub mod keyring;
pub mod launcher;
pub mod leader;
pub mod ledger;
pub mod local;
pub mod manifests;
pub mod metrics;
pub mod naming;
pub mod objects;
pub mod record;
pub mod report;
pub mod run;
pub mod state;
pub mod status;
pub mod trigger;
pub mod watch;
