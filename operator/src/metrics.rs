//! Prometheus metrics: every figure the operator exports, under `serf_operator_`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set with one `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Serf event type.
    pub kind: String,
}

/// Label set with one `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// no_route, filtered, concurrency, overflow, duplicate.
    pub reason: String,
}

/// Label set with one `code` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status, or `transport`.
    pub code: String,
}

/// Label set with one `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// sent, failed, retry, interrupted.
    pub result: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Events received from the agent, by type.
    pub events_received: Family<KindLabel, Counter>,
    /// Events at least one route acted on.
    pub events_routed: Counter,
    /// Events or route matches not acted on, by reason.
    pub events_dropped: Family<ReasonLabel, Counter>,
    /// Jobs created.
    pub jobs_created: Counter,
    /// Job creates that failed, by HTTP status.
    pub job_create_errors: Family<CodeLabel, Counter>,
    /// From the stream record's arrival to the created Job, seconds.
    pub event_to_job_seconds: Histogram,
    /// Queries answered.
    pub queries_answered: Counter,
    /// Events waiting in the internal queue.
    pub queue_depth: Gauge,
    /// Job creates waiting for a launch worker (grows while the API server is away).
    pub launch_queue_depth: Gauge,
    /// 1 while the Serf agent connection is up.
    pub serf_connected: Gauge,
    /// Reconnections to the agent.
    pub serf_reconnects: Counter,
    /// Trigger sends, by result.
    pub triggers_fired: Family<ResultLabel, Counter>,
    /// Job outcomes reported into Serf, by result (Sent, Interrupted, TooLarge,
    /// SendFailed).
    pub reports: Family<ResultLabel, Counter>,
    /// Gossip key rotations that ended, by result (Succeeded, Superseded).
    pub key_rotations: Family<ResultLabel, Counter>,
    /// Key rotation steps that failed (agent unreachable, record not written).
    pub key_rotation_errors: Counter,
    /// 1 while this replica holds the lease (or runs alone).
    pub leader: Gauge,
    /// Leadership changes of this replica.
    pub lease_transitions: Counter,
    /// Handlers compiled into the route table (new or changed specs).
    pub handlers_compiled: Counter,
    /// Time spent bringing the route table up to date with handler changes.
    pub route_table_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Member state changes acted on (a member event's members whose state it changed).
    pub members_changed: Counter,
    /// API calls writing the membership record.
    pub record_writes: Counter,
    /// Request bytes sent writing the membership record.
    pub record_bytes: Counter,
    ready_serf: AtomicBool,
    ready_caches: AtomicBool,
}

impl Metrics {
    /// A fresh registry with every metric registered under `serf_operator_`.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("serf_operator");
        let m = Metrics {
            events_received: Family::default(),
            events_routed: Counter::default(),
            events_dropped: Family::default(),
            jobs_created: Counter::default(),
            job_create_errors: Family::default(),
            event_to_job_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            queries_answered: Counter::default(),
            queue_depth: Gauge::default(),
            launch_queue_depth: Gauge::default(),
            serf_connected: Gauge::default(),
            serf_reconnects: Counter::default(),
            triggers_fired: Family::default(),
            reports: Family::default(),
            key_rotations: Family::default(),
            key_rotation_errors: Counter::default(),
            leader: Gauge::default(),
            lease_transitions: Counter::default(),
            handlers_compiled: Counter::default(),
            route_table_seconds: Counter::default(),
            members_changed: Counter::default(),
            record_writes: Counter::default(),
            record_bytes: Counter::default(),
            ready_serf: AtomicBool::new(false),
            ready_caches: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "events_received",
            "Serf events received, by type",
            m.events_received.clone(),
        );
        registry.register(
            "events_routed",
            "Serf events at least one route acted on",
            m.events_routed.clone(),
        );
        registry.register(
            "events_dropped",
            "Events or route matches not acted on, by reason (no_route, filtered, concurrency, overflow, duplicate, launch_queue_full, launch_deadline, shutdown, status_queue_full, event_queue_full)",
            m.events_dropped.clone(),
        );
        registry.register("jobs_created", "Jobs created", m.jobs_created.clone());
        registry.register(
            "job_create_errors",
            "Failed Job creates, by HTTP status",
            m.job_create_errors.clone(),
        );
        registry.register(
            "event_to_job_seconds",
            "Time from a Serf event's arrival to its Job's creation",
            m.event_to_job_seconds.clone(),
        );
        registry.register(
            "queries_answered",
            "Serf queries answered",
            m.queries_answered.clone(),
        );
        registry.register(
            "queue_depth",
            "Events waiting in the internal queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "launch_queue_depth",
            "Job creates waiting for a launch worker",
            m.launch_queue_depth.clone(),
        );
        registry.register(
            "serf_connected",
            "1 while connected to the Serf agent",
            m.serf_connected.clone(),
        );
        registry.register(
            "serf_reconnects",
            "Reconnections to the Serf agent",
            m.serf_reconnects.clone(),
        );
        registry.register(
            "triggers_fired",
            "SerfEventTrigger sends, by result (sent, failed, retry, interrupted)",
            m.triggers_fired.clone(),
        );
        registry.register(
            "reports",
            "Job outcomes reported into Serf, by result",
            m.reports.clone(),
        );
        registry.register(
            "key_rotations",
            "Gossip key rotations that ended, by result (Succeeded, Superseded)",
            m.key_rotations.clone(),
        );
        registry.register(
            "key_rotation_errors",
            "Key rotation steps that failed and are tried again (agent unreachable, record not written)",
            m.key_rotation_errors.clone(),
        );
        registry.register(
            "members_changed",
            "Member state changes acted on (joins, failures, leaves, updates, reaps of members whose state they changed)",
            m.members_changed.clone(),
        );
        registry.register(
            "membership_record_writes",
            "API calls writing the membership record (one a shard touched, and the header)",
            m.record_writes.clone(),
        );
        registry.register(
            "membership_record_bytes",
            "Request bytes sent writing the membership record",
            m.record_bytes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica does the once-only work",
            m.leader.clone(),
        );
        registry.register(
            "lease_transitions",
            "Leadership changes of this replica",
            m.lease_transitions.clone(),
        );
        registry.register(
            "handlers_compiled",
            "SerfHandlers compiled into the route table (new or changed specs only)",
            m.handlers_compiled.clone(),
        );
        registry.register(
            "route_table_seconds",
            "CPU time the dispatcher spent updating the route table for handler changes",
            m.route_table_seconds.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts a dropped event or route match.
    pub fn dropped(&self, reason: &str) {
        self.events_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records the Serf link's state (for `/readyz` and `serf_connected`).
    pub fn set_serf_ready(&self, up: bool) {
        self.ready_serf.store(up, Ordering::Relaxed);
        self.serf_connected.set(i64::from(up));
    }

    /// Records that the caches have synced.
    pub fn set_caches_ready(&self, ready: bool) {
        self.ready_caches.store(ready, Ordering::Relaxed);
    }

    /// True while the Serf link is up and the caches are synced.
    pub fn is_ready(&self) -> bool {
        self.ready_serf.load(Ordering::Relaxed) && self.ready_caches.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// CPU time used by the calling thread so far: what a piece of synchronous work cost, apart
/// from the time the thread waited for a core on a busy machine. Wall time where the
/// platform has no per-thread clock.
pub fn thread_cpu_time() -> std::time::Duration {
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        std::time::Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "freebsd")))]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    fn the_thread_clock_counts_work_not_waiting() {
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(200));
        let slept = thread_cpu_time().saturating_sub(before);
        assert!(slept < Duration::from_millis(50), "a sleep cost {slept:?}");

        let before = thread_cpu_time();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while thread_cpu_time().saturating_sub(before) < Duration::from_millis(20) {
            x = x.wrapping_mul(31).wrapping_add(7);
            assert!(
                Instant::now() < deadline,
                "the thread clock did not advance"
            );
        }
        std::hint::black_box(x);
    }
}
