//! serf-operator: the routing engine, the Job contract and local mode.

pub mod contract;
pub mod engine;
pub mod jobs;
pub mod launcher;
pub mod local;
pub mod manifests;
pub mod naming;
