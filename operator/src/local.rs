//! Local mode: routing without Kubernetes. `route` routes one event given on the command
//! line; `local` follows a live Serf agent. Both run the dispatcher that `run` runs, with a
//! printer as its effects ([`PrintEffects`]): they print, as YAML, the Jobs that would be
//! created, the query answers, and why routes did not act.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;
use serf_client::{
    ClientConfig, Event, Member, MemberEvent, MemberEventKind, MemberStatus, QueryEvent,
    Subscription, SubscriptionConfig, SubscriptionItem, UserEvent,
};
use serf_operator_crds::SerfHandler;

use crate::contract::SelfNode;
use crate::dispatch::{Control, Dispatcher, DropReason, Effects, Input, RouteEvent, Severity};
use crate::engine::{Action, Launch, Membership, NoActiveJobs, Outcome};
use crate::jobs::HandlerRef;

/// Errors of the command-line event description.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EventSpecError(String);

/// Builds the event for `serf-operator route`: `user:NAME`, `query:NAME`, or a member event
/// type with members given as `NAME=ADDR[:PORT][,TAG=VALUE...]`.
///
/// # Errors
/// An unknown event type, a missing name, or a member that does not parse.
pub fn event_from_args(
    event: &str,
    payload: &[u8],
    ltime: u64,
    members: &[String],
) -> Result<Event, EventSpecError> {
    if let Some(name) = event.strip_prefix("user:") {
        return Ok(Event::User(UserEvent {
            ltime,
            name: name.to_string(),
            payload: payload.to_vec(),
            coalesce: false,
        }));
    }
    if let Some(name) = event.strip_prefix("query:") {
        return Ok(Event::Query(QueryEvent {
            id: 1,
            ltime,
            name: name.to_string(),
            payload: payload.to_vec(),
        }));
    }
    let Some(kind) = MemberEventKind::parse(event) else {
        return Err(EventSpecError(format!(
            "unknown event {event:?}: use user:NAME, query:NAME, member-join, member-leave, \
             member-failed, member-update or member-reap"
        )));
    };
    if members.is_empty() {
        return Err(EventSpecError(format!(
            "{event} needs at least one --members NAME=ADDR[,TAG=VALUE...]"
        )));
    }
    let status = match kind {
        MemberEventKind::Join | MemberEventKind::Update => MemberStatus::Alive,
        MemberEventKind::Failed => MemberStatus::Failed,
        MemberEventKind::Leave | MemberEventKind::Reap => MemberStatus::Left,
    };
    let members = members
        .iter()
        .map(|spec| parse_member(spec, status.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Event::Member(MemberEvent { kind, members }))
}

fn parse_member(spec: &str, status: MemberStatus) -> Result<Member, EventSpecError> {
    let bad = |why: &str| EventSpecError(format!("--members {spec:?}: {why}"));
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let (name, addr) = first
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=ADDR first"))?;
    if name.is_empty() {
        return Err(bad("empty member name"));
    }
    let (ip, port) = match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') || ip.starts_with('[') => (
            ip.trim_matches(['[', ']']),
            port.parse::<u16>().map_err(|_| bad("invalid port"))?,
        ),
        _ => (addr, 7946),
    };
    let addr: IpAddr = ip.parse().map_err(|_| bad("invalid IP address"))?;
    let mut tags = BTreeMap::new();
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad("tags must be TAG=VALUE"))?;
        tags.insert(k.to_string(), v.to_string());
    }
    Ok(Member::new(name, addr, port, tags, status))
}

/// Parses one `TAG=VALUE` (the value may hold anything, `,` and `=` included).
///
/// # Errors
/// No `=`, or an empty tag name.
pub fn parse_tag(kv: &str) -> Result<(String, String), EventSpecError> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(EventSpecError(format!("tag {kv:?}: expected TAG=VALUE"))),
    }
}

/// Applies `--member-tag MEMBER TAG=VALUE` pairs (a flat list) to the members of a member
/// event.
///
/// # Errors
/// A member not in the event, a malformed tag, or tags given for an event without members.
pub fn set_member_tags(event: &mut Event, pairs: &[String]) -> Result<(), EventSpecError> {
    if pairs.is_empty() {
        return Ok(());
    }
    let Event::Member(m) = event else {
        return Err(EventSpecError(
            "--member-tag is for member events (with --members)".into(),
        ));
    };
    for pair in pairs.chunks(2) {
        let [name, kv] = pair else {
            return Err(EventSpecError(
                "--member-tag takes two values: MEMBER TAG=VALUE".into(),
            ));
        };
        let (k, v) = parse_tag(kv)?;
        let member = m
            .members
            .iter_mut()
            .find(|x| &x.name == name)
            .ok_or_else(|| {
                EventSpecError(format!("--member-tag {name}: no such member in --members"))
            })?;
        member.tags.insert(k, v);
    }
    Ok(())
}

/// Parses `k=v,k=v`.
///
/// # Errors
/// An item without `=`.
pub fn parse_tags(s: &str) -> Result<BTreeMap<String, String>, EventSpecError> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| EventSpecError(format!("tag {kv:?}: expected TAG=VALUE")))
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    results: Vec<ResultLine>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultLine {
    handler: String,
    route: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    replaces: Vec<String>,
}

/// Renders an outcome as YAML documents: a summary of every route's result, then each Job
/// and its stdin Secret.
///
/// # Errors
/// A YAML encoding error.
pub fn render(outcome: &Outcome) -> Result<String, serde_yaml::Error> {
    let mut results = Vec::new();
    let mut docs = Vec::new();
    for a in &outcome.actions {
        let (handler, route) = a.route();
        let mut line = ResultLine {
            handler: handler.to_string(),
            route: route.to_string(),
            action: "",
            job: None,
            answer: None,
            reason: None,
            message: None,
            replaces: Vec::new(),
        };
        match a {
            Action::Launch(l) => {
                line.action = "createJob";
                line.job = l.job.metadata.name.clone();
                line.replaces = l.replace.clone();
                docs.push(serde_yaml::to_string(&l.job)?);
                if let Some(secret) = &l.stdin {
                    docs.push(serde_yaml::to_string(secret)?);
                }
            }
            Action::Answer { payload, .. } => {
                line.action = "answer";
                line.answer = Some(String::from_utf8_lossy(payload).into_owned());
            }
            Action::Skip {
                reason, message, ..
            } => {
                line.action = "skip";
                line.reason = Some(reason.to_string());
                line.message = Some(message.clone());
            }
            Action::Deferred { until, .. } => {
                line.action = "coalesce";
                line.message = Some(format!(
                    "added to the coalescing window that closes at {}",
                    rfc3339(*until)
                ));
            }
        }
        results.push(line);
    }
    let summary = Summary {
        event: outcome.event.clone(),
        message: outcome
            .actions
            .is_empty()
            .then(|| format!("no route of any handler takes {}", outcome.event)),
        results,
    };
    let mut out = format!("---\n{}", serde_yaml::to_string(&summary)?);
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d);
    }
    Ok(out)
}

/// Formats a time as RFC 3339 (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    jiff::Timestamp::from_second(secs)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// The dispatcher's effects in local mode: every decision is printed as YAML; answers go to
/// the agent when there is one (offline, `route`, they are only printed).
pub struct PrintEffects<W> {
    out: W,
}

impl<W: Write + Send> PrintEffects<W> {
    /// A printer writing to `out`.
    pub fn new(out: W) -> Self {
        PrintEffects { out }
    }

    /// The writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write + Send> Effects for PrintEffects<W> {
    fn decided(&mut self, outcome: &Outcome) {
        let text = match render(outcome) {
            Ok(t) => t,
            Err(e) => format!("# cannot render {}: {e}\n", outcome.event),
        };
        let written = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush());
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the output");
        }
    }

    fn launch(&mut self, _launch: Box<Launch>, _event: &str, _received: std::time::Instant) {}

    fn answer(
        &mut self,
        serf: Option<&serf_client::Client>,
        query_id: u64,
        payload: &[u8],
    ) -> impl std::future::Future<Output = Result<(), serf_client::Error>> + Send {
        crate::dispatch::respond(serf, query_id, payload, true)
    }

    fn record(&mut self, _: &HandlerRef, _: &str, _: &str, _: RouteEvent) {}

    fn notify(&mut self, _: &HandlerRef, _: Severity, _: &'static str, _: String) {}

    fn dropped(&mut self, reason: DropReason, count: u64) {
        if reason == DropReason::Overflow {
            tracing::warn!(count, "events dropped: the dispatcher fell behind");
        }
    }
}

/// Routes one event and returns the rendered YAML, with the route errors of the handlers.
/// Coalesced routes also show the Job their window would produce.
///
/// # Errors
/// A YAML encoding error.
pub fn route_once(
    handlers: &[SerfHandler],
    node: &SelfNode,
    event: &Event,
) -> Result<(String, Vec<String>), serde_yaml::Error> {
    let (pod, ns) = pod_identity();
    let mut d = Dispatcher::new(
        Membership::default(),
        (pod, ns),
        true,
        Box::new(NoActiveJobs),
        PrintEffects::new(Vec::<u8>::new()),
    );
    d.set_node(node.clone());
    futures::executor::block_on(async {
        d.control(Control::Handlers(
            handlers.iter().cloned().map(std::sync::Arc::new).collect(),
        ))
        .await;
        d.input(Input::Event(event.clone(), std::time::Instant::now()))
            .await;
    });
    let errors = d
        .engine()
        .router()
        .errors()
        .map(ToString::to_string)
        .collect();
    if let Some(at) = d.next_deadline() {
        d.flush_at(at);
    }
    let out = std::mem::take(&mut d.effects().out);
    Ok((String::from_utf8_lossy(&out).into_owned(), errors))
}

/// `POD_NAME` and `POD_NAMESPACE` from the environment (empty when unset).
pub fn pod_identity() -> (String, String) {
    (
        std::env::var("POD_NAME").unwrap_or_default(),
        std::env::var("POD_NAMESPACE").unwrap_or_default(),
    )
}

/// Follows a live agent: routes every event, prints the results as YAML to `out`, and
/// answers queries for `respond` routes on the connection that received them. Runs until
/// `shutdown` resolves. The same dispatcher as `run`, with [`PrintEffects`].
///
/// # Errors
/// An invalid configuration; connection problems are retried, not returned.
pub async fn run_local(
    handlers: Vec<SerfHandler>,
    client: ClientConfig,
    out: impl Write + Send,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut sub = Subscription::start(SubscriptionConfig::new(client, "*"))?;
    let (input_tx, input_rx) = tokio::sync::mpsc::channel::<Input>(4096);
    let (control_tx, control_rx) = tokio::sync::mpsc::channel::<Control>(4);
    let mut d = Dispatcher::new(
        Membership::default(),
        pod_identity(),
        true,
        Box::new(NoActiveJobs),
        PrintEffects::new(out),
    )
    .without_catch_up();
    d.control(Control::Handlers(
        handlers.into_iter().map(std::sync::Arc::new).collect(),
    ))
    .await;
    for e in d.engine().router().errors() {
        tracing::warn!("{e}");
    }
    let reader = tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            let input = match item {
                SubscriptionItem::Connected { client, .. } => Input::Connected(client),
                SubscriptionItem::Event(ev) => Input::Event(ev, std::time::Instant::now()),
                SubscriptionItem::Disconnected { error } => Input::Disconnected(error.to_string()),
                SubscriptionItem::Lagged { missed } => Input::Lagged(missed),
                SubscriptionItem::Undecodable(e) => {
                    tracing::warn!(error = %e, "undecodable event");
                    continue;
                }
                _ => continue,
            };
            if input_tx.send(input).await.is_err() {
                return;
            }
        }
    });
    d.run(input_rx, control_rx, shutdown).await;
    drop(control_tx);
    reader.abort();
    Ok(())
}

/// The agent's own name and tags, from `stats`.
///
/// # Errors
/// The `stats` call failing.
pub async fn self_node(client: &serf_client::Client) -> serf_client::Result<SelfNode> {
    let stats = client.stats().await?;
    Ok(SelfNode {
        name: stats
            .get("agent")
            .and_then(|a| a.get("name"))
            .cloned()
            .unwrap_or_default(),
        tags: stats
            .get("tags")
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    })
}
