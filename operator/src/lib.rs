//! serf-operator: the routing engine, the Job contract and local mode.

pub mod contract;
pub mod engine;
pub mod error;
pub mod jobs;
pub mod launcher;
pub mod ledger;
pub mod local;
pub mod manifests;
pub mod metrics;
pub mod naming;
pub mod run;
pub mod status;
pub mod trigger;
