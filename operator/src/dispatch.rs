//! The event path, the same in `run`, `local` and `route`: Serf link → bounded queue →
//! [`Dispatcher`]. The pure engine decides; its decisions go to an [`Effects`]
//! implementation (Kubernetes: [`crate::effects::KubeEffects`]; local mode: a printer).
//! Nothing here awaits the API server: effects hand API work to tasks of their own and
//! return at once. The only awaits are on the Serf agent (answers, `members`, `stats`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serf_client::{Event, MemberEventKind, MemberStatus};
use serf_operator_crds::{MembershipStatus, SerfHandler};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::contract::SelfNode;
use crate::engine::{Action, ActiveJobs, Context, Engine, Launch, Membership, Outcome, SkipReason};
use crate::jobs::HandlerRef;
use crate::record::RecordChanges;

/// What the Serf link delivers, in order.
#[derive(Debug)]
pub enum Input {
    /// A (re)connection to the agent, with its client.
    Connected(serf_client::Client),
    /// An event and when it came off the stream.
    Event(Event, Instant),
    /// The connection broke.
    Disconnected(String),
    /// The stream skipped this many records (the consumer fell behind).
    Lagged(u64),
}

/// Changes from the Kubernetes side, on a channel of their own (never dropped).
#[derive(Debug)]
pub enum Control {
    /// The SerfHandlers changed: the whole current set (shared with the cache; only the
    /// handlers whose spec changed are compiled again).
    Handlers(Vec<Arc<SerfHandler>>),
    /// Some SerfHandlers changed: those added or updated, and those deleted (namespace,
    /// name). Only these are looked at.
    HandlersChanged {
        /// Added or updated.
        changed: Vec<Arc<SerfHandler>>,
        /// Deleted.
        gone: Vec<(String, String)>,
    },
    /// This replica became (or stopped being) the one that acts on member events. On
    /// becoming it, the membership last acted on by the previous leader.
    Leader {
        /// The verdict.
        leader: bool,
        /// The persisted membership to take over, if it could be read.
        membership: Option<Membership>,
    },
}

/// A Kubernetes Event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Normal.
    Normal,
    /// Warning.
    Warning,
}

/// Why an event, or a route's work for it, was dropped: the `reason` label of
/// `serf_operator_events_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No route of any handler takes the event.
    NoRoute,
    /// A route's filters (role, self tags, members) exclude it.
    Filtered,
    /// A route's concurrency policy (Forbid) skipped it.
    Concurrency,
    /// The event queue was full, or the stream lagged.
    Overflow,
    /// Its Job was launched before.
    Duplicate,
    /// The launch queue was full (the API server has been unreachable for long).
    LaunchQueueFull,
    /// The launch deadline passed while the API server stayed unreachable.
    LaunchDeadline,
    /// The operator stopped before the launch finished and could not hand it over.
    Shutdown,
}

impl DropReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Filtered => "filtered",
            DropReason::Concurrency => "concurrency",
            DropReason::Overflow => "overflow",
            DropReason::Duplicate => "duplicate",
            DropReason::LaunchQueueFull => "launch_queue_full",
            DropReason::LaunchDeadline => "launch_deadline",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// What a route did with an event, for its status counters.
pub use crate::status::RouteEvent;

/// Where the dispatcher's decisions go. Every method returns at once; the Kubernetes
/// implementation queues API work for tasks of its own.
pub trait Effects: Send {
    /// Every decision, before its actions are carried out (local mode prints it).
    fn decided(&mut self, _outcome: &Outcome) {}
    /// Create this Job (queued; the result is reported by the implementation).
    fn launch(&mut self, launch: Box<Launch>, event: &str, received: Instant);
    /// Answer a query on the connection that received it. Serf only: never the API server.
    fn answer(
        &mut self,
        serf: Option<&serf_client::Client>,
        query_id: u64,
        payload: &[u8],
    ) -> impl std::future::Future<Output = Result<(), serf_client::Error>> + Send {
        respond(serf, query_id, payload, false)
    }
    /// Count what a route did.
    fn record(&mut self, handler: &HandlerRef, route: &str, event: &str, what: RouteEvent);
    /// Publish a Kubernetes Event on a handler.
    fn notify(
        &mut self,
        handler: &HandlerRef,
        severity: Severity,
        reason: &'static str,
        note: String,
    );
    /// Count dropped events or route matches.
    fn dropped(&mut self, reason: DropReason, count: u64);
    /// An event at least one route acted on.
    fn routed(&mut self) {}
    /// A query answered.
    fn answered(&mut self) {}
    /// The members each of these handlers' filters select (their status shows them).
    fn selected(&mut self, _selected: Vec<(HandlerRef, MembershipStatus)>) {}
    /// What changed in the membership record, to persist.
    fn record_changed(&mut self, _changes: RecordChanges) {}
    /// The Serf link went up or down.
    fn serf_link(&mut self, _up: bool) {}
    /// The agent connection now in use (None: disconnected).
    fn connection(&mut self, _serf: Option<&serf_client::Client>) {}
    /// An event left the queue.
    fn dequeued(&mut self) {}
    /// The route table took `took` to take in handler changes, `compiled` of them compiled.
    fn routes_compiled(&mut self, _compiled: usize, _took: std::time::Duration) {}
}

/// Answers query `query_id` on `serf`. Without a connection: an error, or, when
/// `offline_ok` (`route`, which only prints), nothing to do.
pub fn respond(
    serf: Option<&serf_client::Client>,
    query_id: u64,
    payload: &[u8],
    offline_ok: bool,
) -> impl std::future::Future<Output = Result<(), serf_client::Error>> + Send + use<> {
    let serf = serf.cloned();
    let payload = payload.to_vec();
    async move {
        match serf {
            Some(c) => c.respond(query_id, &payload).await,
            None if offline_ok => Ok(()),
            None => Err(serf_client::Error::Invalid(
                "not connected to the Serf agent".into(),
            )),
        }
    }
}

/// The event path's state: the engine, the operator's own Serf node, the current agent
/// connection, and whether this replica acts on member events.
pub struct Dispatcher<E> {
    engine: Engine,
    node: SelfNode,
    serf: Option<serf_client::Client>,
    pod: (String, String),
    leader: bool,
    active: Box<dyn ActiveJobs + Send>,
    effects: E,
    catch_up: bool,
    /// The agent had not joined anyone when its clock was read: read it again at the next
    /// member-join.
    epoch_check_pending: bool,
    /// The record's clocks (epoch, user-event clock) as last handed to be persisted.
    clocks: (u64, u64),
    /// Members changed since the handlers' selections were last published.
    selection_dirty: bool,
    /// When the handlers' selections were last published after member events.
    selection_at: Option<Instant>,
}

/// The record's clocks before this replica wrote them: its first change writes the header
/// too (it exists from the first member on, whatever the clocks).
const UNWRITTEN: (u64, u64) = (u64::MAX, u64::MAX);

/// How often, at most, member events republish every handler's member selection (a storm
/// of thousands of member events is one selection a second, not one an event).
pub const SELECTION_EVERY: Duration = Duration::from_secs(1);

impl<E: Effects> Dispatcher<E> {
    /// A dispatcher starting from `membership` (the persisted record), with `pod` (name,
    /// namespace) for `$(POD_NAME)`/`$(POD_NAMESPACE)` in answers.
    pub fn new(
        membership: Membership,
        pod: (String, String),
        leader: bool,
        active: Box<dyn ActiveJobs + Send>,
        effects: E,
    ) -> Self {
        Dispatcher {
            engine: Engine::new(&[], membership),
            node: SelfNode::default(),
            serf: None,
            pod,
            leader,
            active,
            effects,
            catch_up: true,
            epoch_check_pending: false,
            clocks: UNWRITTEN,
            selection_dirty: false,
            selection_at: None,
        }
    }

    /// Does not replay missed member events on connecting (local mode, which keeps no
    /// membership record: every start would replay every member's join).
    pub fn without_catch_up(mut self) -> Self {
        self.catch_up = false;
        self
    }

    /// The effects (for tests and for shutdown).
    pub fn effects(&mut self) -> &mut E {
        &mut self.effects
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The operator's own node as last read.
    pub fn node(&self) -> &SelfNode {
        &self.node
    }

    /// Sets the operator's own node (tests, and `route`).
    pub fn set_node(&mut self, node: SelfNode) {
        self.node = node;
    }

    /// Whether this replica acts on member events.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Applies a change from the Kubernetes side. On becoming the leader it takes over the
    /// persisted membership and replays the member events missed (a Serf call).
    pub async fn control(&mut self, c: Control) {
        match c {
            Control::Handlers(handlers) => {
                let refs: Vec<&SerfHandler> = handlers.iter().map(|h| h.as_ref()).collect();
                let started = crate::metrics::thread_cpu_time();
                let compiled = self.engine.sync_handlers(&refs);
                self.routes_updated(refs.len(), &compiled, started);
            }
            Control::HandlersChanged { changed, gone } => {
                let refs: Vec<&SerfHandler> = changed.iter().map(|h| h.as_ref()).collect();
                let started = crate::metrics::thread_cpu_time();
                let compiled = self.engine.update_handlers(&refs, &gone);
                self.routes_updated(refs.len(), &compiled, started);
            }
            Control::Leader { leader, membership } => {
                let became = leader && !self.leader;
                self.leader = leader;
                if became {
                    if let Some(m) = membership {
                        self.engine.set_membership(m);
                    }
                    // The new leader writes the header with its first change.
                    self.clocks = UNWRITTEN;
                    if let Some(c) = self.serf.clone() {
                        self.catch_up_members(&c).await;
                    }
                }
            }
        }
    }

    /// After a change of the handlers (`compiled`: those new or changed; `started`: this
    /// thread's CPU time before the route table was updated):
    /// only these get their member selection published (a change of one handler is not a
    /// write for every handler).
    fn routes_updated(&mut self, seen: usize, compiled: &[HandlerRef], started: Duration) {
        self.effects.routes_compiled(
            compiled.len(),
            crate::metrics::thread_cpu_time().saturating_sub(started),
        );
        tracing::debug!(handlers = seen, compiled = compiled.len(), "routes updated");
        for h in compiled {
            for e in self.engine.router().errors_of(h) {
                tracing::debug!("{e}");
            }
        }
        self.publish_membership_for(compiled);
    }

    /// Handles one item from the Serf link.
    pub async fn input(&mut self, item: Input) {
        match item {
            Input::Connected(c) => {
                match crate::local::self_node(&c).await {
                    Ok(node) => self.node = node,
                    Err(e) => tracing::warn!(error = %e, "cannot read the agent's own node"),
                }
                tracing::info!(node = %self.node.name, role = self.node.role(), "following the Serf agent");
                self.serf = Some(c.clone());
                self.effects.connection(Some(&c));
                self.effects.serf_link(true);
                self.check_epoch(&c).await;
                if self.leader && self.catch_up {
                    self.catch_up_members(&c).await;
                }
            }
            Input::Event(ev, received) => {
                self.effects.dequeued();
                let key = crate::engine::describe(&ev).1;
                let span = tracing::info_span!("event", event = %key);
                self.event(&ev, received, false).instrument(span).await;
            }
            Input::Disconnected(error) => {
                tracing::warn!(%error, "Serf agent connection lost; user events and queries sent until it is back are lost");
                self.serf = None;
                self.effects.connection(None);
                self.effects.serf_link(false);
            }
            Input::Lagged(missed) => {
                tracing::error!(
                    missed,
                    "the dispatcher fell behind the agent's stream; events dropped"
                );
                self.effects.dropped(DropReason::Overflow, missed);
            }
        }
    }

    /// Reads the agent's user-event clock to tell whether the whole Serf cluster restarted
    /// (a new Lamport epoch). Only once the agent has joined another member: until then its
    /// clock is its own, not the cluster's.
    async fn check_epoch(&mut self, c: &serf_client::Client) {
        let joined = match c.members().await {
            Ok(ms) => ms
                .iter()
                .any(|m| m.name != self.node.name && m.status == MemberStatus::Alive),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list members for the epoch check");
                false
            }
        };
        if !joined {
            self.epoch_check_pending = true;
            return;
        }
        self.epoch_check_pending = false;
        let event_time = match c.stats().await {
            Ok(stats) => stats
                .get("serf")
                .and_then(|s| s.get("event_time"))
                .and_then(|t| t.parse::<u64>().ok()),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the agent's clocks");
                None
            }
        };
        if let Some(t) = event_time
            && self.engine.witness_agent_clock(t)
        {
            tracing::warn!(
                event_time = t,
                epoch = self.engine.membership().epoch,
                "the Serf cluster's event clock is behind the newest event seen: the cluster restarted, a new Lamport epoch begins"
            );
            self.publish_membership();
        }
    }

    /// Follows the operator's own node (see [`SelfNode::follow`]): routing and
    /// `SERF_SELF_*` use its tags as they are now.
    fn follow_self(&mut self, ev: &Event) {
        if self.node.follow(ev) {
            tracing::info!(node = %self.node.name, role = self.node.role(), tags = ?self.node.tags, "this node's tags changed");
        }
    }

    async fn event(&mut self, ev: &Event, received: Instant, replayed: bool) {
        let member = matches!(ev, Event::Member(_));
        self.follow_self(ev);
        if self.epoch_check_pending
            && matches!(ev, Event::Member(m) if m.kind == MemberEventKind::Join)
            && let Some(c) = self.serf.clone()
        {
            self.check_epoch(&c).await;
        }
        if member && !self.leader {
            tracing::debug!("not the leader: member event left to the leader");
            return;
        }
        let outcome = {
            let ctx = Context {
                node: &self.node,
                pod: (&self.pod.0, &self.pod.1),
                active: self.active.as_ref(),
                now: SystemTime::now(),
                replayed,
            };
            self.engine.route(ev, &ctx)
        };
        if outcome.no_news {
            tracing::debug!("member event changes nothing known: not routed");
            self.effects.dropped(DropReason::Duplicate, 1);
            return;
        }
        self.act(outcome, received).await;
        if member {
            self.publish_membership();
        } else {
            // The user-event clock moved (and perhaps the epoch): the record's header.
            self.publish_record();
        }
    }

    /// Routes the member events missed while disconnected, down, or not the leader: the
    /// difference between the agent's members and the membership last acted on.
    async fn catch_up_members(&mut self, c: &serf_client::Client) {
        match c.members().await {
            Ok(current) => {
                let started = Instant::now();
                let missed = self
                    .engine
                    .membership()
                    .diff(&current, crate::ledger::unix_now());
                let (events, members) = (
                    missed.len(),
                    missed.iter().map(|e| e.members.len()).sum::<usize>(),
                );
                for ev in missed {
                    let ev = Event::Member(ev);
                    let key = crate::engine::describe(&ev).1;
                    let span = tracing::info_span!("event", event = %key, replayed = true);
                    async {
                        tracing::info!(
                            members = match &ev {
                                Event::Member(m) => m.members.len(),
                                _ => 0,
                            },
                            "replaying a missed member event"
                        );
                    }
                    .instrument(span.clone())
                    .await;
                    self.event(&ev, Instant::now(), true).instrument(span).await;
                }
                self.publish_membership();
                tracing::info!(
                    agent_members = current.len(),
                    events,
                    members,
                    took_ms = started.elapsed().as_millis() as u64,
                    "membership caught up with the agent"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the agent's members"),
        }
    }

    /// When the earliest coalescing window closes.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.engine.next_deadline()
    }

    /// Launches what the coalescing windows that have closed gathered.
    pub fn flush_due(&mut self) {
        self.flush_at(SystemTime::now());
    }

    /// Launches what the coalescing windows closed at `now` gathered.
    pub fn flush_at(&mut self, now: SystemTime) {
        let outcomes = {
            let ctx = Context {
                node: &self.node,
                pod: (&self.pod.0, &self.pod.1),
                active: self.active.as_ref(),
                now,
                replayed: false,
            };
            self.engine.flush(&ctx)
        };
        for o in outcomes {
            let span = tracing::info_span!("event", event = %o.event);
            let _g = span.enter();
            self.effects.decided(&o);
            for a in o.actions {
                self.act_one(a, &o.event, Instant::now());
            }
        }
    }

    async fn act(&mut self, outcome: Outcome, received: Instant) {
        self.effects.decided(&outcome);
        if outcome.actions.is_empty() {
            tracing::debug!("no route takes the event");
            self.effects.dropped(DropReason::NoRoute, 1);
            return;
        }
        if outcome.actions.iter().any(|a| {
            matches!(
                a,
                Action::Launch(_) | Action::Answer { .. } | Action::Deferred { .. }
            )
        }) {
            self.effects.routed();
        }
        for a in outcome.actions {
            if let Action::Answer {
                handler,
                route,
                query_id,
                payload,
            } = &a
            {
                // Answers go out inline, on the connection that received the query.
                let result = self
                    .effects
                    .answer(self.serf.as_ref(), *query_id, payload)
                    .await;
                match result {
                    Ok(()) => {
                        tracing::info!(handler = %handler, route = %route, "query answered");
                        self.effects.answered();
                        self.effects
                            .record(handler, route, &outcome.event, RouteEvent::Answered);
                        self.effects.notify(
                            handler,
                            Severity::Normal,
                            "QueryAnswered",
                            format!("route {route} answered {}", outcome.event),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(handler = %handler, route = %route, error = %e, "cannot answer the query");
                        self.effects.record(
                            handler,
                            route,
                            &outcome.event,
                            RouteEvent::Skipped {
                                reason: SkipReason::AnswerFailed.as_str().into(),
                                message: e.to_string(),
                            },
                        );
                        self.effects.notify(
                            handler,
                            Severity::Warning,
                            "RouteSkipped",
                            format!("route {route} could not answer {}: {e}", outcome.event),
                        );
                    }
                }
                continue;
            }
            self.act_one(a, &outcome.event, received);
        }
    }

    fn act_one(&mut self, a: Action, event: &str, received: Instant) {
        match a {
            Action::Launch(l) => {
                tracing::debug!(handler = %l.handler, route = %l.route, job = l.job.metadata.name.as_deref().unwrap_or(""), "launch queued");
                self.effects.launch(l, event, received);
            }
            Action::Skip {
                handler,
                route,
                reason,
                message,
            } => {
                tracing::debug!(handler = %handler, route = %route, %reason, "{message}");
                self.effects.dropped(reason.drop_reason(), 1);
                self.effects.notify(
                    &handler,
                    Severity::Normal,
                    "RouteSkipped",
                    format!("route {route} skipped {event}: {reason}: {message}"),
                );
                self.effects.record(
                    &handler,
                    &route,
                    event,
                    RouteEvent::Skipped {
                        reason: reason.to_string(),
                        message,
                    },
                );
            }
            Action::Deferred { handler, route, .. } => {
                self.effects
                    .record(&handler, &route, event, RouteEvent::Coalesced);
            }
            Action::Answer { .. } => {}
        }
    }

    /// After member events: the record's changes now, the handlers' selections at most
    /// every [`SELECTION_EVERY`] (the run loop publishes what is left when it is up).
    fn publish_membership(&mut self) {
        self.publish_record();
        if self
            .selection_at
            .is_some_and(|at| at.elapsed() < SELECTION_EVERY)
        {
            self.selection_dirty = true;
        } else {
            self.publish_selection();
        }
    }

    /// Every handler's member selection, now.
    pub fn publish_selection(&mut self) {
        self.selection_dirty = false;
        self.selection_at = Some(Instant::now());
        let all: Vec<HandlerRef> = self.engine.router().handler_refs().cloned().collect();
        self.publish_selection_for(&all);
    }

    /// When the run loop has to publish the selections held back, if any.
    fn selection_due(&self) -> Option<Instant> {
        if !self.selection_dirty {
            return None;
        }
        Some(
            self.selection_at
                .map_or_else(Instant::now, |at| at + SELECTION_EVERY),
        )
    }

    /// Hands the members changed since the last call (and the clocks, when they moved) to
    /// be persisted.
    fn publish_record(&mut self) {
        let members = self.engine.take_changed();
        let m = self.engine.membership();
        let clocks = (m.epoch, m.event_clock);
        let header = (clocks != self.clocks).then_some(clocks);
        self.clocks = clocks;
        let changes = RecordChanges {
            members,
            header,
            legacy: false,
            absent: Default::default(),
        };
        if !changes.is_empty() {
            self.effects.record_changed(changes);
        }
    }

    /// Publishes the record's changes and, for `handlers`, the members their filters select.
    fn publish_membership_for(&mut self, handlers: &[HandlerRef]) {
        self.publish_record();
        self.publish_selection_for(handlers);
    }

    fn publish_selection_for(&mut self, handlers: &[HandlerRef]) {
        if handlers.is_empty() {
            return;
        }
        let router = self.engine.router();
        let members = &self.engine.membership().members;
        let selected: Vec<(HandlerRef, MembershipStatus)> = handlers
            .iter()
            .map(|h| {
                let ms = crate::status::summarize(
                    members
                        .iter()
                        .filter(|(_, r)| router.selects_tags(h, &r.tags)),
                );
                (h.clone(), ms)
            })
            .collect();
        self.effects.selected(selected);
    }

    /// Runs until `input` closes or `shutdown` resolves: Serf items in order, Kubernetes
    /// changes as they come, and the coalescing windows as they close.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        mut control: mpsc::Receiver<Control>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Self {
        tokio::pin!(shutdown);
        loop {
            let due = self.next_deadline();
            let selection = self.selection_due();
            let sleep = async {
                match due {
                    Some(d) => {
                        if let Ok(left) = d.duration_since(SystemTime::now()) {
                            tokio::time::sleep(left).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(c) = control.recv() => self.control(c).await,
                item = input.recv() => match item {
                    Some(item) => self.input(item).await,
                    None => break,
                },
                _ = sleep => self.flush_due(),
                _ = async {
                    match selection {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.publish_selection(),
            }
        }
        self
    }
}

impl SkipReason {
    /// The dropped-events reason this skip counts under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            SkipReason::ConcurrencyForbid => DropReason::Concurrency,
            SkipReason::Duplicate => DropReason::Duplicate,
            _ => DropReason::Filtered,
        }
    }
}
