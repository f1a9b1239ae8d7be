//! serf-operator: the routing engine, the Job contract and local mode.
