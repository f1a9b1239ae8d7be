//! The routing engine: from handlers, the operator's own node, one Serf event and the active
//! Jobs, to the actions to take (Jobs to create, query answers) or the reasons not to act.
//! No I/O: time and the active Jobs come in as arguments, so the live operator, local mode,
//! the `route` command and the tests share one engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::Secret;
use regex::Regex;
use serf_client::{
    Event, EventFilter, FilterItem, Member, MemberEvent, MemberEventKind, MemberStatus,
};
use serf_operator_crds::{ConcurrencyPolicy, QueryAnswer, SerfHandler};
use sha2::{Digest, Sha256};

use crate::contract::{self, SelfNode};
use crate::jobs::{self, HandlerRef, JobRequest};
use crate::naming;

/// Default history limits, as in the CRD docs.
pub const DEFAULT_HISTORY_LIMIT: i32 = 3;

/// Serf refuses query answers over 1024 encoded bytes; the engine refuses answers whose
/// payload alone exceeds this, leaving room for the envelope.
pub const MAX_ANSWER: usize = 1000;

/// A route that cannot work, and why. Its handler's other routes still route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// The handler.
    pub handler: HandlerRef,
    /// The route's name (`""` for a handler-wide problem such as a bad role regex).
    pub route: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.route.is_empty() {
            write!(f, "SerfHandler {}: {}", self.handler, self.problem)
        } else {
            write!(
                f,
                "SerfHandler {} route {}: {}",
                self.handler, self.route, self.problem
            )
        }
    }
}

enum RouteAction {
    Job(Template),
    Respond(String),
}

/// A route's Job template, validated when compiled but kept as JSON text until the route
/// first launches (then decoded once): a typed template is about 4.5 KiB however small the
/// template, and most routes of a large set wait long between launches, or never launch.
struct Template {
    json: Box<str>,
    decoded: std::sync::OnceLock<Result<Box<JobTemplateSpec>, String>>,
}

impl Template {
    fn new(spec: &JobTemplateSpec) -> Result<Template, String> {
        Ok(Template {
            json: serde_json::to_string(spec)
                .map_err(|e| e.to_string())?
                .into_boxed_str(),
            decoded: std::sync::OnceLock::new(),
        })
    }

    /// The typed template, decoded at the first call.
    fn get(&self) -> Result<&JobTemplateSpec, &str> {
        self.decoded
            .get_or_init(|| serde_json::from_str(&self.json).map_err(|e| e.to_string()))
            .as_deref()
            .map_err(String::as_str)
    }
}

struct CompiledRoute {
    name: String,
    filter: EventFilter,
    members: Vec<(String, Regex)>,
    coalesce: Option<Duration>,
    policy: ConcurrencyPolicy,
    action: RouteAction,
    answer: QueryAnswer,
    report: bool,
}

struct CompiledHandler {
    handler: HandlerRef,
    /// What it was compiled from: (uid, generation); a change recompiles it.
    version: (Option<String>, Option<i64>),
    /// Its route errors.
    errors: Vec<RouteError>,
    role: Option<(String, Regex)>,
    self_tags: Vec<(String, String, Regex)>,
    routes: Vec<CompiledRoute>,
    /// False when the handler-wide filters are broken: no route of it can run.
    usable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IndexKey {
    All,
    AnyUser,
    User(String),
    AnyQuery,
    Query(String),
    Member(MemberEventKind),
}

/// Handlers compiled for routing, with routes indexed by event type and name.
///
/// A compiled handler sits in a slot that stays put while other handlers come and go, and the
/// index refers to routes by (slot, route): adding, changing or removing one handler touches
/// its own index entries only, whatever the number of handlers.
pub struct Router {
    slots: Vec<Option<CompiledHandler>>,
    /// Slots emptied by removals, reused first.
    free: Vec<usize>,
    /// (namespace, name) → slot: the handlers in name order.
    by_name: BTreeMap<(String, String), usize>,
    /// Each list sorted by (slot, route).
    index: HashMap<IndexKey, Vec<(usize, usize)>>,
}

/// Compiles an anchored regex, as `serf members -tag` anchors its filters.
pub(crate) fn anchored(re: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("regex {re:?} does not compile: {e}"))
}

/// Parses a Go-style duration such as `10s`, `1m30s`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?} (examples: 10s, 1m30s, 500ms)");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        total += Duration::try_from_secs_f64(value * unit).map_err(|_| err())?;
    }
    Ok(total)
}

impl Router {
    /// Compiles handlers. Invalid routes are left out and listed in [`Router::errors`];
    /// every valid route routes.
    pub fn new(handlers: &[SerfHandler]) -> Router {
        let mut out = Router {
            slots: Vec::new(),
            free: Vec::new(),
            by_name: BTreeMap::new(),
            index: HashMap::new(),
        };
        let refs: Vec<&SerfHandler> = handlers.iter().collect();
        out.sync(&refs);
        out
    }

    /// Brings the table to `handlers`: a handler whose spec changed (by UID and generation)
    /// is compiled again, a new one compiled, a gone one dropped; the others are kept as
    /// they are. Returns the handlers compiled.
    pub fn sync(&mut self, handlers: &[&SerfHandler]) -> Vec<HandlerRef> {
        let present: std::collections::BTreeSet<(String, String)> =
            handlers.iter().map(|h| name_of(h)).collect();
        let gone: Vec<(String, String)> = self
            .by_name
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        self.update(handlers, &gone)
    }

    /// Applies changes: each handler in `changed` compiled again when its spec changed (by
    /// UID and generation) or added, each `(namespace, name)` in `gone` dropped; the others
    /// are not looked at. Returns the handlers compiled.
    pub fn update(
        &mut self,
        changed: &[&SerfHandler],
        gone: &[(String, String)],
    ) -> Vec<HandlerRef> {
        for key in gone {
            if let Some(slot) = self.by_name.remove(key) {
                self.unindex(slot);
                self.slots[slot] = None;
                self.free.push(slot);
            }
        }
        let mut compiled = Vec::new();
        for h in changed {
            let key = name_of(h);
            let version = (h.metadata.uid.as_ref(), h.metadata.generation);
            let slot = match self.by_name.get(&key) {
                Some(&slot) => {
                    let same = self.slots[slot].as_ref().is_some_and(|o| {
                        (o.version.0.as_ref(), o.version.1) == version && version.1.is_some()
                    });
                    if same {
                        continue;
                    }
                    self.unindex(slot);
                    slot
                }
                None => {
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.slots.push(None);
                        self.slots.len() - 1
                    });
                    self.by_name.insert(key, slot);
                    slot
                }
            };
            let handler = Router::compile(h);
            compiled.push(handler.handler.clone());
            self.slots[slot] = Some(handler);
            self.index_slot(slot);
        }
        compiled
    }

    /// Adds the routes of the handler in `slot` to the index.
    fn index_slot(&mut self, slot: usize) {
        let Some(compiled) = self.slots[slot].as_ref().filter(|c| c.usable) else {
            return;
        };
        for (ri, route) in compiled.routes.iter().enumerate() {
            for key in index_keys(&route.filter) {
                let list = self.index.entry(key).or_default();
                if let Err(at) = list.binary_search(&(slot, ri)) {
                    list.insert(at, (slot, ri));
                }
            }
        }
    }

    /// Takes the routes of the handler in `slot` out of the index.
    fn unindex(&mut self, slot: usize) {
        let Some(compiled) = self.slots[slot].as_ref().filter(|c| c.usable) else {
            return;
        };
        for route in &compiled.routes {
            for key in index_keys(&route.filter) {
                if let Some(list) = self.index.get_mut(&key) {
                    let from = list.partition_point(|&(s, _)| s < slot);
                    let to = list.partition_point(|&(s, _)| s <= slot);
                    list.drain(from..to);
                    if list.is_empty() {
                        self.index.remove(&key);
                    }
                }
            }
        }
    }

    /// The compiled handlers, in (namespace, name) order.
    fn handlers(&self) -> impl Iterator<Item = &CompiledHandler> {
        self.by_name
            .values()
            .filter_map(|&slot| self.slots[slot].as_ref())
    }

    /// Every handler in the table, in (namespace, name) order.
    pub fn handler_refs(&self) -> impl Iterator<Item = &HandlerRef> {
        self.handlers().map(|h| &h.handler)
    }

    /// The compiled handler in `slot`.
    fn slot(&self, slot: usize) -> Option<&CompiledHandler> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// The slot of a handler.
    fn slot_of(&self, handler: &HandlerRef) -> Option<usize> {
        self.by_name
            .get(&(handler.namespace.clone(), handler.name.clone()))
            .copied()
    }

    /// The routes that could not be compiled, with the reason, in handler order.
    pub fn errors(&self) -> impl Iterator<Item = &RouteError> {
        self.handlers().flat_map(|h| h.errors.iter())
    }

    /// The route errors of one handler.
    pub fn errors_of(&self, handler: &HandlerRef) -> &[RouteError] {
        self.slot_of(handler)
            .and_then(|s| self.slot(s))
            .map_or(&[], |h| h.errors.as_slice())
    }

    /// Number of routes that route.
    pub fn route_count(&self) -> usize {
        self.handlers()
            .filter(|h| h.usable)
            .map(|h| h.routes.len())
            .sum()
    }

    fn compile(h: &SerfHandler) -> CompiledHandler {
        let handler = HandlerRef {
            namespace: h
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: h.metadata.name.clone().unwrap_or_default(),
            uid: h.metadata.uid.clone(),
        };
        let mut errors: Vec<RouteError> = Vec::new();
        let mut err = |route: &str, problem: String| {
            errors.push(RouteError {
                handler: handler.clone(),
                route: route.to_string(),
                problem,
            })
        };
        let mut usable = true;
        let role = match h.spec.role.as_deref() {
            None => None,
            Some(r) => match anchored(r) {
                Ok(re) => Some((r.to_string(), re)),
                Err(e) => {
                    err("", format!("role: {e}"));
                    usable = false;
                    None
                }
            },
        };
        let mut self_tags = Vec::new();
        for (k, v) in &h.spec.self_tags {
            match anchored(v) {
                Ok(re) => self_tags.push((k.clone(), v.clone(), re)),
                Err(e) => {
                    err("", format!("selfTags.{k}: {e}"));
                    usable = false;
                }
            }
        }
        let mut routes: Vec<CompiledRoute> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for r in &h.spec.routes {
            let name = r.name.clone();
            if !seen.insert(name.clone()) {
                err(
                    &name,
                    "duplicate route name; only the first route of that name routes".into(),
                );
                continue;
            }
            if naming::dns_label(&name, 63) != name {
                err(
                    &name,
                    "route name must be a DNS label (lower-case letters, digits and -)".into(),
                );
                continue;
            }
            let filter = match EventFilter::parse(&r.events) {
                Ok(f) => f,
                Err(e) => {
                    err(&name, format!("events: {e}"));
                    continue;
                }
            };
            let member_only = filter
                .items()
                .iter()
                .all(|i| matches!(i, FilterItem::AnyMember | FilterItem::Member(_)));
            let query_only = filter
                .items()
                .iter()
                .all(|i| matches!(i, FilterItem::AnyQuery | FilterItem::Query(_)));
            let mut members = Vec::new();
            let mut bad = None;
            for (k, v) in r.members.iter().flatten() {
                match anchored(v) {
                    Ok(re) => members.push((k.clone(), re)),
                    Err(e) => bad = Some(format!("members.{k}: {e}")),
                }
            }
            if let Some(b) = bad {
                err(&name, b);
                continue;
            }
            if r.members.is_some() && !member_only {
                err(&name, "members filters apply to member events only; `events` must list only member events".into());
                continue;
            }
            let coalesce = match r.coalesce.as_deref().map(parse_duration).transpose() {
                Ok(c) => c,
                Err(e) => {
                    err(&name, format!("coalesce: {e}"));
                    continue;
                }
            };
            if coalesce.is_some() && !member_only {
                err(
                    &name,
                    "coalesce applies to member events only; `events` must list only member events"
                        .into(),
                );
                continue;
            }
            let action = match (&r.job, &r.respond) {
                (Some(t), None) => match t.decode() {
                    Ok(mut spec)
                        if spec
                            .spec
                            .as_ref()
                            .and_then(|s| s.template.spec.as_ref())
                            .is_some_and(|p| !p.containers.is_empty()) =>
                    {
                        if let Some(agent) = &r.agent {
                            jobs::give_agent(&mut spec, agent);
                        }
                        match Template::new(&spec) {
                            Ok(t) => RouteAction::Job(t),
                            Err(e) => {
                                err(&name, format!("job: {e}"));
                                continue;
                            }
                        }
                    }
                    Ok(_) => {
                        err(
                            &name,
                            "job: the template has no spec.template.spec.containers".into(),
                        );
                        continue;
                    }
                    Err(e) => {
                        err(&name, format!("job: not a valid JobTemplateSpec: {e}"));
                        continue;
                    }
                },
                (None, Some(resp)) => {
                    if !query_only {
                        err(
                            &name,
                            "respond answers queries only; `events` must list only query or query:NAME"
                                .into(),
                        );
                        continue;
                    }
                    RouteAction::Respond(resp.payload.clone())
                }
                _ => {
                    err(
                        &name,
                        "a route needs exactly one action: job or respond".into(),
                    );
                    continue;
                }
            };
            routes.push(CompiledRoute {
                name,
                filter,
                members,
                coalesce,
                policy: r.concurrency_policy.unwrap_or_default(),
                action,
                answer: r.answer.unwrap_or_default(),
                report: r.report.is_some(),
            });
        }
        CompiledHandler {
            handler,
            version: (h.metadata.uid.clone(), h.metadata.generation),
            errors,
            role,
            self_tags,
            routes,
            usable,
        }
    }

    /// Whether a handler's member filters select `m`: any route's `members` filters match,
    /// or the handler has none.
    pub fn selects_member(&self, handler: &HandlerRef, m: &Member) -> bool {
        let Some(h) = self.slot_of(handler).and_then(|s| self.slot(s)) else {
            return false;
        };
        let filters: Vec<&Vec<(String, Regex)>> = h
            .routes
            .iter()
            .map(|r| &r.members)
            .filter(|f| !f.is_empty())
            .collect();
        filters.is_empty()
            || filters.iter().any(|f| {
                f.iter()
                    .all(|(k, re)| m.tags.get(k).is_some_and(|v| re.is_match(v)))
            })
    }

    /// The routes whose filter takes an event of `kind` named `name` as (slot, route), in
    /// handler order, found through the index (not by scanning every route).
    fn candidates(&self, kind: &str, name: &str) -> Vec<(usize, usize)> {
        let mut keys = vec![IndexKey::All];
        match kind {
            "user" => keys.extend([IndexKey::AnyUser, IndexKey::User(name.to_string())]),
            "query" => keys.extend([IndexKey::AnyQuery, IndexKey::Query(name.to_string())]),
            k => keys.extend(MemberEventKind::parse(k).map(IndexKey::Member)),
        }
        let mut out: Vec<(usize, usize)> = keys
            .iter()
            .filter_map(|k| self.index.get(k))
            .flatten()
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        let order = |&(slot, ri): &(usize, usize)| {
            self.slot(slot)
                .map(|h| (h.handler.namespace.as_str(), h.handler.name.as_str(), ri))
        };
        out.sort_by(|a, b| order(a).cmp(&order(b)));
        out
    }
}

/// A handler's (namespace, name), as the route table keys it.
fn name_of(h: &SerfHandler) -> (String, String) {
    (
        h.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        h.metadata.name.clone().unwrap_or_default(),
    )
}

fn index_keys(filter: &EventFilter) -> Vec<IndexKey> {
    let mut keys = Vec::new();
    for item in filter.items() {
        match item {
            FilterItem::All => keys.push(IndexKey::All),
            FilterItem::AnyUser => keys.push(IndexKey::AnyUser),
            FilterItem::User(n) => keys.push(IndexKey::User(n.clone())),
            FilterItem::AnyQuery => keys.push(IndexKey::AnyQuery),
            FilterItem::Query(n) => keys.push(IndexKey::Query(n.clone())),
            FilterItem::AnyMember => {
                keys.extend(MemberEventKind::ALL.into_iter().map(IndexKey::Member))
            }
            FilterItem::Member(k) => keys.push(IndexKey::Member(*k)),
        }
    }
    keys
}

/// Why a route did not act on an event that its filter takes: the one list of skip reasons,
/// as they appear in status (`lastSkipped.reason`) and Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The operator node's role does not match the handler's `role`.
    RoleMismatch,
    /// The operator node's tags do not match the handler's `selfTags`.
    SelfTagsMismatch,
    /// No member of the member event matches the route's `members` filters.
    MembersFiltered,
    /// A Job of the route is active and the policy is Forbid.
    ConcurrencyForbid,
    /// Another route already answered this query (Serf takes one answer per node).
    AlreadyAnswered,
    /// The expanded answer is over Serf's response limit.
    ResponseTooLarge,
    /// The answer could not be sent to the agent.
    AnswerFailed,
    /// The event's Job was launched before (the Job exists, or the launch ledger has it).
    Duplicate,
    /// The API server refused the Job, or stayed unreachable past the launch deadline.
    JobCreateFailed,
    /// The launch could not even be queued (the launch queue was full) or was cut short by
    /// a shutdown.
    LaunchDropped,
}

impl SkipReason {
    /// The reason as it appears in status, Events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::RoleMismatch => "RoleMismatch",
            SkipReason::SelfTagsMismatch => "SelfTagsMismatch",
            SkipReason::MembersFiltered => "MembersFiltered",
            SkipReason::ConcurrencyForbid => "ConcurrencyForbid",
            SkipReason::AlreadyAnswered => "AlreadyAnswered",
            SkipReason::ResponseTooLarge => "ResponseTooLarge",
            SkipReason::AnswerFailed => "AnswerFailed",
            SkipReason::Duplicate => "Duplicate",
            SkipReason::JobCreateFailed => "JobCreateFailed",
            SkipReason::LaunchDropped => "LaunchDropped",
        }
    }

    /// The dropped-events metric label this reason counts under.
    pub fn metric_label(self) -> &'static str {
        match self {
            SkipReason::ConcurrencyForbid => "concurrency",
            _ => "filtered",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Job to create.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// The handler.
    pub handler: HandlerRef,
    /// The route.
    pub route: String,
    /// The Job, with its deterministic name.
    pub job: Job,
    /// The Secret holding `/serf/stdin` when the Job's pod template cannot (non-UTF-8,
    /// NUL, over 64 KiB); same name; created before the Job.
    pub stdin: Option<Secret>,
    /// Active Jobs to delete first (concurrency policy Replace).
    pub replace: Vec<String>,
    /// The query (its id, on the connection that received it) to answer with the Job's
    /// output once its Pod finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_query: Option<u64>,
}

impl Launch {
    /// The bytes its containers read at `/serf/stdin`.
    pub fn stdin_bytes(&self) -> Vec<u8> {
        jobs::stdin_bytes(&self.job, self.stdin.as_ref())
    }
}

/// What to do, or why not, for one route.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Create a Job.
    Launch(Box<Launch>),
    /// Answer the query (with `respond`, on the connection that received it).
    Answer {
        /// The handler.
        handler: HandlerRef,
        /// The route.
        route: String,
        /// The query's connection-local ID.
        query_id: u64,
        /// The answer.
        payload: Vec<u8>,
    },
    /// The route takes the event but does not act on it.
    Skip {
        /// The handler.
        handler: HandlerRef,
        /// The route.
        route: String,
        /// Why.
        reason: SkipReason,
        /// Details.
        message: String,
    },
    /// A member event was added to the route's coalescing window; the Job comes from
    /// [`Engine::flush`] at `until`.
    Deferred {
        /// The handler.
        handler: HandlerRef,
        /// The route.
        route: String,
        /// When the window closes.
        until: SystemTime,
    },
}

impl Action {
    /// The handler and route the action belongs to.
    pub fn route(&self) -> (&HandlerRef, &str) {
        match self {
            Action::Launch(l) => (&l.handler, &l.route),
            Action::Answer { handler, route, .. }
            | Action::Skip { handler, route, .. }
            | Action::Deferred { handler, route, .. } => (handler, route),
        }
    }
}

/// Everything the engine decided for one event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The event, e.g. `user:deploy@42`.
    pub event: String,
    /// One entry per route that took the event. Empty: no route takes this event, or
    /// the event was no news.
    pub actions: Vec<Action>,
    /// A member event that changed nothing known (every member already in that state):
    /// not routed.
    pub no_news: bool,
}

/// The Jobs currently active (not finished), by handler and route.
pub trait ActiveJobs {
    /// Names of the active Jobs of `route` of `handler`.
    fn active(&self, handler: &HandlerRef, route: &str) -> Vec<String>;
}

/// No Job is active.
pub struct NoActiveJobs;

impl ActiveJobs for NoActiveJobs {
    fn active(&self, _: &HandlerRef, _: &str) -> Vec<String> {
        Vec::new()
    }
}

impl ActiveJobs for BTreeMap<(String, String, String), Vec<String>> {
    fn active(&self, handler: &HandlerRef, route: &str) -> Vec<String> {
        self.get(&(
            handler.namespace.clone(),
            handler.name.clone(),
            route.to_string(),
        ))
        .cloned()
        .unwrap_or_default()
    }
}

/// What the engine knows about one member: its last state and how many times the state
/// changed. The count tells a flap (failed, alive, failed) from a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberRecord {
    /// `alive`, `failed`, `left`, `leaving`, or `reaped` after member-reap.
    pub status: String,
    /// The member's tags at that time.
    pub tags: BTreeMap<String, String>,
    /// Number of state changes seen, from 1.
    pub version: u64,
    /// The member's address when last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::IpAddr>,
    /// The member's gossip port when last seen.
    #[serde(default)]
    pub port: u16,
    /// When the state last changed (Unix seconds); a record from before this field counts
    /// from when it was read.
    #[serde(default = "crate::ledger::unix_now")]
    pub since: i64,
}

/// How long a member that the agent no longer lists is kept before the catch-up reaps it:
/// Serf's own defaults for reaping a failed member (`reconnect_timeout`) and forgetting a
/// member that left (`tombstone_timeout`) are both 24 hours. Before that, an absent member
/// is more likely unknown to a freshly started agent than reaped.
pub const REAP_HORIZON_SECS: i64 = 24 * 3600;

/// How far back of the newest user event a Serf agent still accepts one (its event buffer,
/// 512 by default): a user event older than that cannot come from the same Lamport epoch.
pub const EVENT_BUFFER: u64 = 512;

/// What [`Membership::observe`] made of one member of a member event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The member's state-change count.
    pub version: u64,
    /// The event changed what is known of the member (a join of a member already known
    /// alive with the same tags is not news).
    pub news: bool,
}

/// The membership the engine last acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// By node name.
    pub members: BTreeMap<String, MemberRecord>,
    /// The Serf cluster's Lamport epoch: 0 until its user-event clock is seen going back
    /// (the whole cluster restarted), one more each time. Part of user events' and queries'
    /// Job names from 1 on, so that `deploy@1` of a new epoch is not a duplicate of the
    /// old one's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The user-event Lamport clock as this epoch's events moved it: one past the newest
    /// event seen (an agent that delivered that event has a clock at least this far).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub event_clock: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Membership {
    /// Records a member's new state from a member event at `now` (Unix seconds): its
    /// version is unchanged for a duplicate and one higher for a real change.
    pub fn observe(&mut self, kind: MemberEventKind, m: &Member, now: i64) -> Observed {
        let status = if kind == MemberEventKind::Reap {
            "reaped".to_string()
        } else {
            m.status.as_str().to_string()
        };
        match self.members.get_mut(&m.name) {
            Some(r) if r.status == status && r.tags == m.tags => Observed {
                version: r.version,
                news: false,
            },
            Some(r) => {
                r.version += 1;
                r.status = status;
                r.tags = m.tags.clone();
                r.addr = Some(m.addr);
                r.port = m.port;
                r.since = now;
                Observed {
                    version: r.version,
                    news: true,
                }
            }
            None => {
                self.members.insert(
                    m.name.clone(),
                    MemberRecord {
                        status,
                        tags: m.tags.clone(),
                        version: 1,
                        addr: Some(m.addr),
                        port: m.port,
                        since: now,
                    },
                );
                Observed {
                    version: 1,
                    news: true,
                }
            }
        }
    }

    /// Takes note of a user event's Lamport time; true when it opens a new epoch: a time
    /// further back than Serf's event buffer from the newest one seen cannot be of the same
    /// epoch (Serf itself ignores such events).
    pub fn witness_event(&mut self, ltime: u64) -> bool {
        // As a Lamport clock witnesses a time: it moves past it.
        let next = ltime.saturating_add(1);
        let new_epoch = ltime.saturating_add(EVENT_BUFFER) < self.event_clock;
        if new_epoch {
            self.epoch += 1;
            self.event_clock = next;
        } else {
            self.event_clock = self.event_clock.max(next);
        }
        new_epoch
    }

    /// Takes note of the agent's user-event clock as read on connecting (after the agent
    /// has joined its cluster, so that the clock is the cluster's): behind the newest
    /// event seen, the whole cluster restarted and a new epoch began. True when it did.
    pub fn witness_agent_clock(&mut self, event_time: u64) -> bool {
        if event_time < self.event_clock {
            self.epoch += 1;
            self.event_clock = event_time;
            true
        } else {
            false
        }
    }

    /// The member events missed while the operator was not following the agent: the
    /// difference between `current` (the agent's `members`) and the membership last acted
    /// on, as Serf would have delivered it (one event per type). A member not known before
    /// has joined.
    ///
    /// A member missing from `current` is reaped only once its state is older than
    /// [`REAP_HORIZON_SECS`] at `now`, as Serf would: a freshly started agent may not have
    /// heard of a member that the rest of the cluster still lists as failed or left.
    pub fn diff(&self, current: &[Member], now: i64) -> Vec<MemberEvent> {
        let mut by_kind: BTreeMap<MemberEventKind, Vec<Member>> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for m in current {
            seen.insert(m.name.as_str());
            let now = m.status.as_str();
            let before = self.members.get(&m.name);
            let kind = match (before.map(|r| r.status.as_str()), now) {
                (None | Some("reaped"), "alive") => Some(MemberEventKind::Join),
                (None | Some("reaped"), _) => None,
                (Some(b), n) if b == n => {
                    let tags_changed = before.is_some_and(|r| r.tags != m.tags);
                    (tags_changed && n == "alive").then_some(MemberEventKind::Update)
                }
                (Some(_), "alive") => Some(MemberEventKind::Join),
                (Some(_), "failed") => Some(MemberEventKind::Failed),
                (Some(_), "left" | "leaving") => Some(MemberEventKind::Leave),
                _ => None,
            };
            if let Some(k) = kind {
                by_kind.entry(k).or_default().push(m.clone());
            }
        }
        for (name, r) in &self.members {
            if r.status != "reaped"
                && !seen.contains(name.as_str())
                && now.saturating_sub(r.since) >= REAP_HORIZON_SECS
            {
                let status = match r.status.as_str() {
                    "failed" => MemberStatus::Failed,
                    _ => MemberStatus::Left,
                };
                by_kind
                    .entry(MemberEventKind::Reap)
                    .or_default()
                    .push(Member::new(
                        name.clone(),
                        r.addr
                            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                        r.port,
                        r.tags.clone(),
                        status,
                    ));
            }
        }
        by_kind
            .into_iter()
            .map(|(kind, members)| MemberEvent { kind, members })
            .collect()
    }
}

/// Per-event context that is not part of the event.
pub struct Context<'a> {
    /// The operator's own Serf node.
    pub node: &'a SelfNode,
    /// The operator pod's name and namespace, for `$(POD_NAME)` and `$(POD_NAMESPACE)` in
    /// answers.
    pub pod: (&'a str, &'a str),
    /// Active Jobs.
    pub active: &'a dyn ActiveJobs,
    /// Now.
    pub now: SystemTime,
    /// The event was recovered after a reconnect.
    pub replayed: bool,
}

struct Batch {
    handler: HandlerRef,
    route: String,
    kind: MemberEventKind,
    members: BTreeMap<String, (Member, u64)>,
    until: SystemTime,
    replayed: bool,
}

/// The router plus the state routing needs over time: the membership ledger and the open
/// coalescing windows.
pub struct Engine {
    router: Router,
    membership: Membership,
    batches: BTreeMap<(HandlerRef, String, MemberEventKind), Batch>,
    /// Members whose record changed since [`Engine::take_changed`].
    changed: BTreeSet<String>,
}

impl Engine {
    /// An engine for `handlers`, starting from `membership`.
    pub fn new(handlers: &[SerfHandler], membership: Membership) -> Engine {
        Engine {
            router: Router::new(handlers),
            membership,
            batches: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }

    /// Brings the routes to `handlers`, compiling only the handlers whose spec changed
    /// (see [`Router::sync`]); returns the handlers compiled.
    pub fn sync_handlers(&mut self, handlers: &[&SerfHandler]) -> Vec<HandlerRef> {
        self.router.sync(handlers)
    }

    /// See [`Router::update`].
    pub fn update_handlers(
        &mut self,
        changed: &[&SerfHandler],
        gone: &[(String, String)],
    ) -> Vec<HandlerRef> {
        self.router.update(changed, gone)
    }

    /// The compiled handlers.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Replaces the membership last acted on (taking over from another replica).
    pub fn set_membership(&mut self, membership: Membership) {
        self.membership = membership;
        self.changed.clear();
    }

    /// The records of the members that changed since the last call (what the membership
    /// record has to write: O(changed), not the whole record).
    pub fn take_changed(&mut self) -> BTreeMap<String, MemberRecord> {
        let names = std::mem::take(&mut self.changed);
        names
            .into_iter()
            .filter_map(|n| {
                let r = self.membership.members.get(&n)?.clone();
                Some((n, r))
            })
            .collect()
    }

    /// The membership last acted on.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// See [`Membership::witness_agent_clock`].
    pub fn witness_agent_clock(&mut self, event_time: u64) -> bool {
        self.membership.witness_agent_clock(event_time)
    }

    /// When the earliest coalescing window closes.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.batches.values().map(|b| b.until).min()
    }

    /// Routes one event.
    pub fn route(&mut self, event: &Event, ctx: &Context<'_>) -> Outcome {
        let now = ctx
            .now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        let news_only;
        let event = match event {
            // Only the members whose state the event changes: a restarted agent announces
            // every member again, and a member known alive with the same tags is not news.
            Event::Member(m) => {
                let mut news = Vec::new();
                for mem in &m.members {
                    let o = self.membership.observe(m.kind, mem, now);
                    versions.insert(mem.name.clone(), o.version);
                    if o.news {
                        self.changed.insert(mem.name.clone());
                        news.push(mem.clone());
                    }
                }
                if news.is_empty() {
                    return Outcome {
                        event: describe(event).1,
                        actions: Vec::new(),
                        no_news: true,
                    };
                }
                news_only = Event::Member(MemberEvent {
                    kind: m.kind,
                    members: news,
                });
                &news_only
            }
            Event::User(u) => {
                if self.membership.witness_event(u.ltime) {
                    tracing::warn!(
                        ltime = u.ltime,
                        epoch = self.membership.epoch,
                        "the Serf cluster's event clock went back: a new Lamport epoch"
                    );
                }
                event
            }
            other => other,
        };
        let epoch = self.membership.epoch;
        let (name, description) = describe(event);
        let mut outcome = Outcome {
            event: description.clone(),
            actions: Vec::new(),
            no_news: false,
        };
        let mut answered = false;
        let mut job_name_answer: Option<Action> = None;
        let candidates = self.router.candidates(event.kind(), &name);
        for (hi, ri) in candidates {
            let Some(h) = self.router.slot(hi) else {
                continue;
            };
            let r = &h.routes[ri];
            let skip = |reason: SkipReason, message: String| Action::Skip {
                handler: h.handler.clone(),
                route: r.name.clone(),
                reason,
                message,
            };
            if let Some((src, re)) = &h.role
                && !re.is_match(ctx.node.role())
            {
                outcome.actions.push(skip(
                    SkipReason::RoleMismatch,
                    format!(
                        "this node ({}) has role {:?}; the handler wants {src:?}",
                        ctx.node.name,
                        ctx.node.role()
                    ),
                ));
                continue;
            }
            if let Some((k, src, _)) = h
                .self_tags
                .iter()
                .find(|(k, _, re)| !ctx.node.tags.get(k).is_some_and(|v| re.is_match(v)))
            {
                outcome.actions.push(skip(
                    SkipReason::SelfTagsMismatch,
                    format!(
                        "this node's tag {k} is {:?}; the handler wants {src:?}",
                        ctx.node.tags.get(k)
                    ),
                ));
                continue;
            }
            // Member events: only the members the route's filters select.
            let event_for_route = match event {
                Event::Member(m) if !r.members.is_empty() => {
                    let selected: Vec<Member> = m
                        .members
                        .iter()
                        .filter(|mem| {
                            r.members
                                .iter()
                                .all(|(k, re)| mem.tags.get(k).is_some_and(|v| re.is_match(v)))
                        })
                        .cloned()
                        .collect();
                    if selected.is_empty() {
                        outcome.actions.push(skip(
                            SkipReason::MembersFiltered,
                            "no member of the event matches the route's members filters".into(),
                        ));
                        continue;
                    }
                    Event::Member(MemberEvent {
                        kind: m.kind,
                        members: selected,
                    })
                }
                other => other.clone(),
            };
            if let (Event::Member(m), Some(window)) = (&event_for_route, r.coalesce) {
                let key = (h.handler.clone(), r.name.clone(), m.kind);
                let batch = self.batches.entry(key).or_insert_with(|| Batch {
                    handler: h.handler.clone(),
                    route: r.name.clone(),
                    kind: m.kind,
                    members: BTreeMap::new(),
                    until: ctx.now + window,
                    replayed: false,
                });
                batch.replayed |= ctx.replayed;
                for mem in &m.members {
                    let v = versions.get(&mem.name).copied().unwrap_or(0);
                    batch.members.insert(mem.name.clone(), (mem.clone(), v));
                }
                outcome.actions.push(Action::Deferred {
                    handler: h.handler.clone(),
                    route: r.name.clone(),
                    until: batch.until,
                });
                continue;
            }
            match &r.action {
                RouteAction::Respond(template) => {
                    let Event::Query(q) = &event_for_route else {
                        continue;
                    };
                    if answered {
                        outcome.actions.push(skip(
                            SkipReason::AlreadyAnswered,
                            "an earlier route already answered this query".into(),
                        ));
                        continue;
                    }
                    let mut vars: BTreeMap<String, String> =
                        contract::environment(&event_for_route, ctx.node)
                            .into_iter()
                            .collect();
                    vars.insert("POD_NAME".into(), ctx.pod.0.to_string());
                    vars.insert("POD_NAMESPACE".into(), ctx.pod.1.to_string());
                    let payload = contract::expand(template, &vars).into_bytes();
                    if payload.len() > MAX_ANSWER {
                        outcome.actions.push(skip(
                            SkipReason::ResponseTooLarge,
                            format!(
                                "the answer is {} bytes; Serf accepts about {MAX_ANSWER}",
                                payload.len()
                            ),
                        ));
                        continue;
                    }
                    answered = true;
                    outcome.actions.push(Action::Answer {
                        handler: h.handler.clone(),
                        route: r.name.clone(),
                        query_id: q.id,
                        payload,
                    });
                }
                RouteAction::Job(template) => {
                    let action = launch_or_skip(
                        &h.handler,
                        r,
                        template,
                        &event_for_route,
                        &versions,
                        epoch,
                        ctx,
                        &description,
                        ctx.replayed,
                    );
                    let mut action = action;
                    // A query's one answer (Serf takes one per node): the first job route
                    // that launches for it gives it, with the Job's output when it
                    // finishes, or with the Job's name at once.
                    if let (Event::Query(q), false, Action::Launch(l)) =
                        (event, answered, &mut action)
                    {
                        match r.answer {
                            QueryAnswer::Output => {
                                l.answer_query = Some(q.id);
                                answered = true;
                            }
                            QueryAnswer::JobName => {
                                if let Some(name) = &l.job.metadata.name {
                                    job_name_answer = Some(Action::Answer {
                                        payload: format!("{}/{name}", l.handler.namespace)
                                            .into_bytes(),
                                        handler: l.handler.clone(),
                                        route: l.route.clone(),
                                        query_id: q.id,
                                    });
                                    answered = true;
                                }
                            }
                            QueryAnswer::None => {}
                        }
                    }
                    outcome.actions.push(action);
                }
            }
        }
        outcome.actions.extend(job_name_answer);
        outcome
    }

    /// Closes the coalescing windows that end at or before `now` and returns their Jobs.
    pub fn flush(&mut self, ctx: &Context<'_>) -> Vec<Outcome> {
        let due: Vec<_> = self
            .batches
            .iter()
            .filter(|(_, b)| b.until <= ctx.now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in due {
            let Some(batch) = self.batches.remove(&key) else {
                continue;
            };
            let Some((h, r)) = self.find(&batch.handler, &batch.route) else {
                continue;
            };
            let RouteAction::Job(template) = &r.action else {
                continue;
            };
            let versions: BTreeMap<String, u64> = batch
                .members
                .iter()
                .map(|(n, (_, v))| (n.clone(), *v))
                .collect();
            let event = Event::Member(MemberEvent {
                kind: batch.kind,
                members: batch.members.into_values().map(|(m, _)| m).collect(),
            });
            let (_, description) = describe(&event);
            let action = launch_or_skip(
                &h.handler,
                r,
                template,
                &event,
                &versions,
                self.membership.epoch,
                ctx,
                &description,
                batch.replayed,
            );
            out.push(Outcome {
                event: description,
                actions: vec![action],
                no_news: false,
            });
        }
        out
    }

    fn find(
        &self,
        handler: &HandlerRef,
        route: &str,
    ) -> Option<(&CompiledHandler, &CompiledRoute)> {
        let h = self
            .router
            .slot_of(handler)
            .and_then(|s| self.router.slot(s))
            .filter(|h| h.usable)?;
        let r = h.routes.iter().find(|r| r.name == route)?;
        Some((h, r))
    }
}

/// The Job a route launches for an event, or the concurrency policy's reason not to.
#[allow(clippy::too_many_arguments)]
fn launch_or_skip(
    handler: &HandlerRef,
    route: &CompiledRoute,
    template: &Template,
    event: &Event,
    versions: &BTreeMap<String, u64>,
    epoch: u64,
    ctx: &Context<'_>,
    description: &str,
    replayed: bool,
) -> Action {
    let template = match template.get() {
        Ok(t) => t,
        Err(e) => {
            return Action::Skip {
                handler: handler.clone(),
                route: route.name.clone(),
                reason: SkipReason::JobCreateFailed,
                message: format!("the route's Job template cannot be read back: {e}"),
            };
        }
    };
    let key = event_key(event, versions, epoch);
    let key_refs: Vec<&[u8]> = key.iter().map(Vec::as_slice).collect();
    let job_name = naming::job_name(&handler.name, &route.name, &key_refs);
    // The event's own Job being active is not a conflict: creating it again is a no-op.
    // Asked only where the policy reads it.
    let active: Vec<String> = match route.policy {
        ConcurrencyPolicy::Allow => Vec::new(),
        ConcurrencyPolicy::Forbid | ConcurrencyPolicy::Replace => ctx
            .active
            .active(handler, &route.name)
            .into_iter()
            .filter(|n| *n != job_name)
            .collect(),
    };
    let replace = match route.policy {
        ConcurrencyPolicy::Forbid if !active.is_empty() => {
            return Action::Skip {
                handler: handler.clone(),
                route: route.name.clone(),
                reason: SkipReason::ConcurrencyForbid,
                message: format!("Job {} is still active", active.join(", ")),
            };
        }
        ConcurrencyPolicy::Replace => active,
        _ => Vec::new(),
    };
    Action::Launch(Box::new(build_launch(
        handler,
        route,
        template,
        job_name,
        event,
        ctx,
        description,
        replayed,
        replace,
    )))
}

#[allow(clippy::too_many_arguments)]
fn build_launch(
    handler: &HandlerRef,
    compiled: &CompiledRoute,
    template: &JobTemplateSpec,
    name: String,
    event: &Event,
    ctx: &Context<'_>,
    description: &str,
    replayed: bool,
    replace: Vec<String>,
) -> Launch {
    let route = compiled.name.as_str();
    let env = contract::environment(event, ctx.node);
    let event_name = match event {
        Event::User(u) => Some(u.name.as_str()),
        Event::Query(q) => Some(q.name.as_str()),
        _ => None,
    };
    let (job, stdin) = jobs::build(&JobRequest {
        handler,
        route,
        template,
        name,
        env: &env,
        stdin: contract::stdin(event),
        event_kind: event.kind(),
        event_name,
        event_description: description,
        replayed,
        report: compiled.report,
    });
    Launch {
        handler: handler.clone(),
        route: route.to_string(),
        job,
        stdin,
        replace,
        answer_query: None,
    }
}

/// The event's name (user event or query; empty otherwise) and a short description:
/// `user:deploy@42`, `query:where@3`, `member-failed:db-1,db-2`.
pub fn describe(event: &Event) -> (String, String) {
    match event {
        Event::User(u) => (u.name.clone(), format!("user:{}@{}", u.name, u.ltime)),
        Event::Query(q) => (q.name.clone(), format!("query:{}@{}", q.name, q.ltime)),
        Event::Member(m) => {
            let names: Vec<&str> = m.members.iter().map(|x| x.name.as_str()).collect();
            (String::new(), format!("{}:{}", m.kind, names.join(",")))
        }
        other => (String::new(), other.kind().to_string()),
    }
}

/// The identity of an event for Job naming: what Serf itself dedupes user events by (name,
/// Lamport time, payload), queries by name, Lamport time and payload, and member events by
/// type and, for each member, its name, status and state-change count (so that a flap gets
/// a new Job and a duplicate does not). User events and queries of a Lamport epoch after
/// the first (see [`Membership::epoch`]) carry it too.
pub fn event_key(event: &Event, versions: &BTreeMap<String, u64>, epoch: u64) -> Vec<Vec<u8>> {
    let digest = |p: &[u8]| Sha256::digest(p).to_vec();
    let with_epoch = |mut key: Vec<Vec<u8>>| {
        if epoch > 0 {
            key.push(format!("epoch-{epoch}").into_bytes());
        }
        key
    };
    match event {
        Event::User(u) => with_epoch(vec![
            b"user".to_vec(),
            u.name.as_bytes().to_vec(),
            u.ltime.to_string().into_bytes(),
            digest(&u.payload),
        ]),
        Event::Query(q) => with_epoch(vec![
            b"query".to_vec(),
            q.name.as_bytes().to_vec(),
            q.ltime.to_string().into_bytes(),
            digest(&q.payload),
        ]),
        Event::Member(m) => {
            let mut key = vec![m.kind.as_str().as_bytes().to_vec()];
            let mut members: Vec<&Member> = m.members.iter().collect();
            members.sort_by(|a, b| a.name.cmp(&b.name));
            for mem in members {
                key.push(mem.name.as_bytes().to_vec());
                key.push(mem.status.as_str().as_bytes().to_vec());
                key.push(
                    versions
                        .get(&mem.name)
                        .copied()
                        .unwrap_or(0)
                        .to_string()
                        .into_bytes(),
                );
            }
            key
        }
        other => vec![other.kind().as_bytes().to_vec()],
    }
}
