//! The SerfService controller: publishes the Serf members a SerfService selects as a
//! headless Service with EndpointSlices and/or a ConfigMap ([`crate::discovery`] decides
//! what; this module writes it).
//!
//! - The membership comes from a Serf subscription of its own ([`follow_members`]): the
//!   agent's `members` on every (re)connect, then member events, published at most once per
//!   [`DEBOUNCE`] so a burst becomes one pass.
//! - Level-triggered: every SerfService is reconciled on each membership change, on a change
//!   of its spec, and when this replica becomes leader. The first pass after a start lists
//!   the EndpointSlices already there and writes only those whose content differs, so a
//!   restart rebuilds the same objects; after that only changed slices are written
//!   (server-side apply), so a change of one member among 10,000 is one write.
//! - Only the leader writes; a standby forgets what it knew and lists again when it leads.
//! - Every object carries an owner reference to its SerfService: deleting it deletes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use serf_client::{
    ClientConfig, Event, Member, MemberEventKind, Subscription, SubscriptionConfig,
    SubscriptionItem,
};
use serf_operator_crds::{Protocol, SerfService, SerfServiceSpec};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::discovery::{self, Endpoint, GoneSince, PortSource, Selector, Slice, SliceKey};
use crate::error::{Error, kube_call};

/// The member events the membership follows.
pub const MEMBER_EVENTS: &str = "member-join,member-leave,member-failed,member-update,member-reap";
/// How long a burst of member events is gathered before the services are reconciled.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// `endpointslice.kubernetes.io/managed-by` of the operator's EndpointSlices.
pub const SLICE_MANAGER: &str = "serf-operator";
/// The label holding a slice's number within its service.
pub const SLICE_LABEL: &str = "serf.operator.io/slice";
/// Largest ConfigMap data written (Kubernetes refuses objects over 1 MiB).
pub const CONFIGMAP_LIMIT: usize = 1_000_000;
/// How often the published objects are listed again, to repair what others changed.
const RELIST: Duration = Duration::from_secs(600);
/// The grace for failed and left members when `removeAfter` is not set.
const DEFAULT_REMOVE_AFTER: Duration = Duration::from_secs(60);

/// The membership as last read from the agent, by name.
pub type Members = Arc<Vec<Member>>;

type Key = (String, String);

/// Follows the agent's membership with a subscription of its own: `members` on every
/// (re)connect (and after a lag), member events in between, published into `tx` at most once
/// per `debounce`. While disconnected the last membership stays published.
pub async fn follow_members(
    serf: ClientConfig,
    tx: watch::Sender<Option<Members>>,
    debounce: Duration,
) {
    let mut sub = match Subscription::start(SubscriptionConfig::new(serf, MEMBER_EVENTS)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow the Serf membership");
            return;
        }
    };
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    let mut conn: Option<serf_client::Client> = None;
    let mut list_at: Option<Instant> = None;
    let mut flush_at: Option<Instant> = None;
    loop {
        let wake = match (list_at, flush_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            item = sub.next() => match item {
                None => return,
                Some(SubscriptionItem::Connected { client, .. }) => {
                    conn = Some(client);
                    list_at = Some(Instant::now());
                }
                Some(SubscriptionItem::Event(Event::Member(ev))) => {
                    for m in ev.members {
                        if ev.kind == MemberEventKind::Reap {
                            members.remove(&m.name);
                        } else {
                            members.insert(m.name.clone(), m);
                        }
                    }
                    flush_at.get_or_insert_with(|| Instant::now() + debounce);
                }
                Some(SubscriptionItem::Lagged { missed }) => {
                    tracing::warn!(missed, "member events missed; reading the membership again");
                    list_at = Some(Instant::now());
                }
                Some(SubscriptionItem::Disconnected { error }) => {
                    tracing::warn!(error = %error, "membership not followed until the agent is back; keeping the last one");
                    conn = None;
                    list_at = None;
                }
                Some(_) => {}
            },
            () = sleep_until(wake), if wake.is_some() => {}
        }
        let now = Instant::now();
        if list_at.is_some_and(|t| t <= now)
            && let Some(c) = &conn
        {
            match tokio::time::timeout(Duration::from_secs(30), c.members()).await {
                Ok(Ok(ms)) => {
                    tracing::info!(members = ms.len(), "membership read");
                    members = ms.into_iter().map(|m| (m.name.clone(), m)).collect();
                    list_at = None;
                    flush_at = Some(now);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the membership; trying again");
                    list_at = Some(now + Duration::from_secs(1));
                }
                Err(_) => {
                    tracing::warn!("reading the membership timed out; trying again");
                    list_at = Some(now + Duration::from_secs(1));
                }
            }
        }
        if flush_at.is_some_and(|t| t <= Instant::now()) {
            flush_at = None;
            tx.send_replace(Some(Arc::new(members.values().cloned().collect())));
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A SerfService's spec, checked.
#[derive(Debug, Clone)]
pub struct Compiled {
    selector: Selector,
    ports: Vec<PortSource>,
    names: Vec<(String, Protocol)>,
    grace: Duration,
    service: bool,
    config_map: bool,
}

/// Checks a spec: the selector's regexes, the ports, the grace.
///
/// # Errors
/// What is wrong, naming the field.
pub fn compile(spec: &SerfServiceSpec) -> Result<Compiled, String> {
    let selector = Selector::new(&spec.selector.tags)?;
    if spec.ports.is_empty() {
        return Err("ports: at least one port is needed".into());
    }
    let mut ports = Vec::new();
    let mut names = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let src = match (p.port, &p.port_tag) {
            (Some(n), None) => PortSource::Fixed(
                u16::try_from(n)
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| format!("ports[{i}].port: {n} is not a port number"))?,
            ),
            (None, Some(t)) if !t.is_empty() => PortSource::Tag(t.clone()),
            _ => return Err(format!("ports[{i}]: give exactly one of port and portTag")),
        };
        if names.iter().any(|(n, _)| *n == p.name) {
            return Err(format!("ports[{i}].name: {:?} is given twice", p.name));
        }
        ports.push(src);
        names.push((p.name.clone(), p.protocol.unwrap_or_default()));
    }
    let grace = match &spec.remove_after {
        None => DEFAULT_REMOVE_AFTER,
        Some(s) => crate::engine::parse_duration(s).map_err(|e| format!("removeAfter: {e}"))?,
    };
    if !spec.publish.service && !spec.publish.config_map {
        return Err("publish: at least one of service and configMap".into());
    }
    Ok(Compiled {
        selector,
        ports,
        names,
        grace,
        service: spec.publish.service,
        config_map: spec.publish.config_map,
    })
}

/// What was published for one SerfService, as this replica knows it.
#[derive(Default, Clone)]
struct Published {
    uid: String,
    /// Listed from the API at this time (none: list first).
    listed: Option<Instant>,
    gone: GoneSince,
    slices: Vec<Slice>,
    /// The content of each slice in the API, by number.
    written: BTreeMap<u32, SliceContent>,
    service: Option<Value>,
    config_map: Option<Value>,
    endpoints: Option<Vec<Endpoint>>,
    status: Option<Value>,
}

/// What the reconciles share.
pub struct ServiceContext {
    /// The API client.
    pub client: Client,
    /// Whether this replica writes.
    pub leader: watch::Receiver<bool>,
    /// The membership ([`follow_members`]); `None` until first read.
    pub members: watch::Receiver<Option<Members>>,
    /// How long one API call may take.
    pub call_timeout: Duration,
    origin: Instant,
    published: Mutex<HashMap<Key, Published>>,
    attempts: Mutex<HashMap<Key, u32>>,
}

impl ServiceContext {
    /// A context.
    pub fn new(
        client: Client,
        leader: watch::Receiver<bool>,
        members: watch::Receiver<Option<Members>>,
        call_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(ServiceContext {
            client,
            leader,
            members,
            call_timeout,
            origin: Instant::now(),
            published: Mutex::default(),
            attempts: Mutex::default(),
        })
    }

    fn take(&self, k: &Key) -> Published {
        self.published
            .lock()
            .ok()
            .and_then(|mut m| m.remove(k))
            .unwrap_or_default()
    }

    fn put(&self, k: Key, p: Published) {
        if let Ok(mut m) = self.published.lock() {
            m.insert(k, p);
        }
    }
}

fn key(s: &SerfService) -> Key {
    (s.namespace().unwrap_or_default(), s.name_any())
}

/// The name of a SerfService's ConfigMap.
pub fn config_map_name(service: &str) -> String {
    format!("{service}-members")
}

/// The name of a SerfService's EndpointSlice number `id`.
pub fn slice_name(service: &str, id: u32) -> String {
    format!("{service}-serf-{id}")
}

fn owner(s: &SerfService) -> Value {
    json!({
        "apiVersion": "serf.operator.io/v1alpha1",
        "kind": "SerfService",
        "name": s.name_any(),
        "uid": s.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What the operator cares about in one EndpointSlice, comparable between what it would
/// write and what the API holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceContent {
    address_type: String,
    ports: Vec<(String, i32, String)>,
    /// (address, ready, serving, terminating, hostname), sorted.
    endpoints: Vec<(String, bool, bool, bool, Option<String>)>,
    owner: String,
}

fn conditions(e: &Endpoint) -> (bool, bool, bool) {
    // Serving: still answering (alive, or leaving on purpose).
    (
        e.ready,
        e.status == "alive" || e.status == "leaving",
        e.terminating,
    )
}

fn content_of(s: &Slice, names: &[(String, Protocol)], owner_uid: &str) -> SliceContent {
    let mut endpoints: Vec<_> = s
        .endpoints
        .values()
        .map(|e| {
            let (r, sv, t) = conditions(e);
            (
                e.address.to_string(),
                r,
                sv,
                t,
                is_dns_label(&e.name).then(|| e.name.clone()),
            )
        })
        .collect();
    endpoints.sort();
    SliceContent {
        address_type: if s.key.ipv6 { "IPv6" } else { "IPv4" }.into(),
        ports: names
            .iter()
            .zip(&s.key.ports)
            .map(|((n, p), port)| (n.clone(), i32::from(*port), p.as_str().to_string()))
            .collect(),
        endpoints,
        owner: owner_uid.to_string(),
    }
}

fn content_from_api(s: &EndpointSlice) -> SliceContent {
    let mut endpoints: Vec<_> = s
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            (
                e.addresses.first().cloned().unwrap_or_default(),
                c.ready.unwrap_or(false),
                c.serving.unwrap_or(false),
                c.terminating.unwrap_or(false),
                e.hostname.clone(),
            )
        })
        .collect();
    endpoints.sort();
    SliceContent {
        address_type: s.address_type.clone(),
        ports: s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.port.unwrap_or(0),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                )
            })
            .collect(),
        endpoints,
        owner: s
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "SerfService")
            .map(|o| o.uid.clone())
            .unwrap_or_default(),
    }
}

/// The slices as they stand in the API, in terms of the endpoints now: each API endpoint
/// is taken to be the member that now has its address and ports (an address no member has
/// any more is left out, so its slice counts as changed).
fn previous_from_api(api: &[EndpointSlice], now: &[Endpoint]) -> Vec<Slice> {
    let mut by_addr: HashMap<(String, Vec<u16>), Vec<&Endpoint>> = HashMap::new();
    for e in now {
        by_addr
            .entry((e.address.to_string(), e.ports.clone()))
            .or_default()
            .push(e);
    }
    let mut out = Vec::new();
    for s in api {
        let Some(id) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SLICE_LABEL))
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        let key = SliceKey {
            ipv6: s.address_type == "IPv6",
            ports: s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
                .collect(),
        };
        let mut endpoints = BTreeMap::new();
        for e in &s.endpoints {
            let Some(addr) = e.addresses.first() else {
                continue;
            };
            if let Some(list) = by_addr.get_mut(&(addr.clone(), key.ports.clone()))
                && let Some(ep) = list.pop()
            {
                endpoints.insert(ep.name.clone(), ep.clone());
            }
        }
        out.push(Slice { id, key, endpoints });
    }
    out
}

fn slice_body(svc: &SerfService, s: &Slice, names: &[(String, Protocol)]) -> Value {
    let name = svc.name_any();
    let endpoints: Vec<Value> = s
        .endpoints
        .values()
        .map(|e| {
            let (ready, serving, terminating) = conditions(e);
            let mut v = json!({
                "addresses": [e.address.to_string()],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            });
            if is_dns_label(&e.name) {
                v["hostname"] = json!(e.name);
            }
            v
        })
        .collect();
    let ports: Vec<Value> = names
        .iter()
        .zip(&s.key.ports)
        .map(|((n, p), port)| json!({"name": n, "port": port, "protocol": p.as_str()}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(&name, s.id),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
                SLICE_LABEL: s.id.to_string(),
            },
            "ownerReferences": [owner(svc)],
        },
        "addressType": if s.key.ipv6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    })
}

fn service_body(svc: &SerfService, c: &Compiled) -> Value {
    // Headless and without a selector: Kubernetes leaves its endpoints to the operator.
    // Fixed ports are listed for readers; DNS serves the EndpointSlices' ports.
    let ports: Vec<Value> = c
        .names
        .iter()
        .zip(&c.ports)
        .filter_map(|((n, p), src)| match src {
            PortSource::Fixed(port) => {
                Some(json!({"name": n, "port": port, "targetPort": port, "protocol": p.as_str()}))
            }
            PortSource::Tag(_) => None,
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc.name_any(),
            "labels": {"app.kubernetes.io/managed-by": SLICE_MANAGER},
            "ownerReferences": [owner(svc)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "ports": ports,
        },
    })
}

fn config_map_body(svc: &SerfService, eps: &[Endpoint]) -> Result<Value, String> {
    let json = discovery::render_json(eps).map_err(|e| format!("members.json: {e}"))?;
    let lines = discovery::render_lines(eps);
    let size = json.len() + lines.len();
    if size > CONFIGMAP_LIMIT {
        return Err(format!(
            "the member list is {size} bytes, over a ConfigMap's {CONFIGMAP_LIMIT}; narrow the selector or publish the Service only"
        ));
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(&svc.name_any()),
            "labels": {"app.kubernetes.io/managed-by": SLICE_MANAGER},
            "ownerReferences": [owner(svc)],
        },
        "data": {"members.json": json, "members.txt": lines},
    }))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(crate::ledger::FIELD_MANAGER).force()
}

async fn apply<K>(ctx: &ServiceContext, api: &Api<K>, name: &str, body: &Value) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("apply {} {name}", K::kind(&()));
    kube_call(
        &what,
        ctx.call_timeout,
        api.patch(name, &apply_params(), &Patch::Apply(body)),
    )
    .await
    .map(|_| ())
}

/// Deletes `name` if it exists (and, when `owned_by` is given, only if that SerfService owns
/// it: an object someone else made is left alone).
async fn delete_owned<K>(
    ctx: &ServiceContext,
    api: &Api<K>,
    name: &str,
    owned_by: Option<&str>,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    if let Some(uid) = owned_by {
        let got = kube_call(
            &format!("read {kind} {name}"),
            ctx.call_timeout,
            api.get_opt(name),
        )
        .await?;
        let ours = got.is_some_and(|o| o.owner_references().iter().any(|r| r.uid == uid));
        if !ours {
            return Ok(());
        }
    }
    match kube_call(
        &format!("delete {kind} {name}"),
        ctx.call_timeout,
        api.delete(name, &DeleteParams::default()),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.http_code() == Some(404) => Ok(()),
        Err(e) => Err(e),
    }
}

fn condition(
    svc: &SerfService,
    last: Option<&Value>,
    ok: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    // The transition time stays while the status does: as last written, or as the object
    // says.
    let written = last
        .and_then(|l| l["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .filter(|c| c["status"] == status)
        .map(|c| c["lastTransitionTime"].clone());
    let since = written
        .or_else(|| {
            svc.status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .filter(|c| c.status == status)
                .and_then(|c| serde_json::to_value(&c.last_transition_time).ok())
        })
        .unwrap_or_else(|| json!(now));
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": svc.metadata.generation,
        "lastTransitionTime": since,
    })
}

async fn write_status(
    ctx: &ServiceContext,
    svc: &SerfService,
    status: Value,
    last: &mut Option<Value>,
) -> Result<(), Error> {
    let current = match last {
        Some(v) => Some(v.clone()),
        None => svc
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok()),
    };
    if current.as_ref() == Some(&status) {
        *last = Some(status);
        return Ok(());
    }
    let api: Api<SerfService> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": "serf.operator.io/v1alpha1",
        "kind": "SerfService",
        "status": status,
    });
    kube_call(
        "write the SerfService's status",
        ctx.call_timeout,
        api.patch_status(&svc.name_any(), &apply_params(), &Patch::Apply(&body)),
    )
    .await?;
    *last = Some(status);
    Ok(())
}

/// One reconcile of one SerfService.
///
/// # Errors
/// A write refused or not answered (the objects are listed again on the next attempt).
#[tracing::instrument(skip_all, fields(serfservice = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())))]
pub async fn reconcile(svc: Arc<SerfService>, ctx: Arc<ServiceContext>) -> Result<Action, Error> {
    let k = key(&svc);
    if !*ctx.leader.borrow() {
        // Another replica writes; list again when this one leads.
        ctx.take(&k);
        return Ok(Action::await_change());
    }
    let Some(members) = ctx.members.borrow().clone() else {
        // Not read yet: the first membership reconciles every service.
        return Ok(Action::await_change());
    };
    let uid = svc.metadata.uid.clone().unwrap_or_default();
    let mut st = ctx.take(&k);
    if st.uid != uid {
        st = Published {
            uid: uid.clone(),
            ..Default::default()
        };
    }
    let result = publish(&svc, &ctx, &members, &mut st).await;
    if let Err(e) = &result
        && e.category() == crate::error::Category::Final
    {
        // Refused (not a passing outage): say so where the user looks.
        let now_s = crate::local::rfc3339(std::time::SystemTime::now());
        let mut status = serde_json::to_value(svc.status.clone().unwrap_or_default())
            .unwrap_or_else(|_| json!({}));
        status["observedGeneration"] = json!(svc.metadata.generation);
        status["conditions"] = json!([condition(
            &svc,
            st.status.as_ref(),
            false,
            "WriteFailed",
            &e.user_message(),
            &now_s
        )]);
        if let Err(e2) = write_status(&ctx, &svc, status, &mut st.status).await {
            tracing::debug!(error = %e2, "cannot record the failure in status");
        }
    }
    if result.is_err() {
        // What stands in the API is no longer known: list it again next time.
        st.listed = None;
        st.service = None;
        st.config_map = None;
    } else if let Ok(mut a) = ctx.attempts.lock() {
        a.remove(&k);
    }
    ctx.put(k, st);
    result
}

async fn publish(
    svc: &SerfService,
    ctx: &ServiceContext,
    members: &[Member],
    st: &mut Published,
) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let now_s = crate::local::rfc3339(std::time::SystemTime::now());
    let c = match compile(&svc.spec) {
        Ok(c) => c,
        Err(msg) => {
            tracing::warn!("invalid SerfService: {msg}");
            let mut status = serde_json::to_value(svc.status.clone().unwrap_or_default())
                .unwrap_or_else(|_| json!({}));
            status["observedGeneration"] = json!(svc.metadata.generation);
            status["conditions"] = json!([condition(
                svc,
                st.status.as_ref(),
                false,
                "InvalidSpec",
                &msg,
                &now_s
            )]);
            write_status(ctx, svc, status, &mut st.status).await?;
            return Ok(Action::await_change());
        }
    };
    let slices_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);

    let now = ctx.origin.elapsed();
    let mut skipped = Vec::new();
    let eps = discovery::endpoints(
        members,
        &c.selector,
        &c.ports,
        c.grace,
        now,
        &mut st.gone,
        &mut skipped,
    );

    let fresh = st.listed.is_none_or(|t| t.elapsed() >= RELIST);
    if fresh {
        let lp = ListParams::default().labels(&format!(
            "kubernetes.io/service-name={name},endpointslice.kubernetes.io/managed-by={SLICE_MANAGER}"
        ));
        let listed = kube_call(
            "list the SerfService's EndpointSlices",
            ctx.call_timeout,
            slices_api.list(&lp),
        )
        .await?;
        st.slices = previous_from_api(&listed.items, &eps);
        st.written = listed
            .items
            .iter()
            .filter_map(|s| {
                let id = s.labels().get(SLICE_LABEL)?.parse::<u32>().ok()?;
                Some((id, content_from_api(s)))
            })
            .collect();
        // Slices listed without a number of ours are not ours to keep.
        for s in &listed.items {
            if s.labels()
                .get(SLICE_LABEL)
                .and_then(|v| v.parse::<u32>().ok())
                .is_none()
            {
                delete_owned(ctx, &slices_api, &s.name_any(), None).await?;
            }
        }
        st.listed = Some(Instant::now());
    }

    let mut writes = 0usize;
    let mut slice_writes = 0usize;
    let mut problem: Option<(&str, String)> = None;
    if c.service {
        let body = service_body(svc, &c);
        if st.service.as_ref() != Some(&body) {
            apply(ctx, &services, &name, &body).await?;
            writes += 1;
            st.service = Some(body);
        }
        let plan = discovery::place(&st.slices, eps.clone(), discovery::MAX_ENDPOINTS_PER_SLICE);
        for s in &plan.slices {
            let want = content_of(s, &c.names, &st.uid);
            if st.written.get(&s.id) != Some(&want) {
                apply(
                    ctx,
                    &slices_api,
                    &slice_name(&name, s.id),
                    &slice_body(svc, s, &c.names),
                )
                .await?;
                slice_writes += 1;
                st.written.insert(s.id, want);
            }
        }
        let keep: std::collections::BTreeSet<u32> = plan.slices.iter().map(|s| s.id).collect();
        let stale: Vec<u32> = st
            .written
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in stale {
            delete_owned(ctx, &slices_api, &slice_name(&name, id), None).await?;
            slice_writes += 1;
            st.written.remove(&id);
        }
        st.slices = plan.slices;
    } else {
        let ids: Vec<u32> = st.written.keys().copied().collect();
        for id in ids {
            delete_owned(ctx, &slices_api, &slice_name(&name, id), None).await?;
            slice_writes += 1;
            st.written.remove(&id);
        }
        st.slices.clear();
        if fresh || st.service.is_some() {
            delete_owned(ctx, &services, &name, Some(&st.uid)).await?;
            st.service = None;
        }
    }
    let cm_name = config_map_name(&name);
    if c.config_map {
        match config_map_body(svc, &eps) {
            Ok(body) => {
                if st.config_map.as_ref() != Some(&body) {
                    apply(ctx, &maps, &cm_name, &body).await?;
                    writes += 1;
                    st.config_map = Some(body);
                }
            }
            Err(msg) => {
                tracing::warn!("{msg}");
                problem = Some(("ConfigMapTooLarge", msg));
            }
        }
    } else if fresh || st.config_map.is_some() {
        delete_owned(ctx, &maps, &cm_name, Some(&st.uid)).await?;
        st.config_map = None;
    }

    // Status: counts, and when the listed endpoints last changed (after a start: when a
    // slice had to be written, else as the status said).
    let changed = match &st.endpoints {
        Some(before) => *before != eps,
        None => slice_writes > 0,
    };
    let said = st
        .status
        .as_ref()
        .and_then(|s| s["lastChange"].as_str().map(String::from))
        .or_else(|| svc.status.as_ref().and_then(|s| s.last_change.clone()));
    let last_change = match said {
        Some(t) if !changed => t,
        _ => now_s.clone(),
    };
    if writes + slice_writes > 0 {
        tracing::info!(
            writes = writes + slice_writes,
            endpoints = eps.len(),
            slices = st.slices.len(),
            "published"
        );
    }
    st.endpoints = Some(eps.clone());
    let ready = eps.iter().filter(|e| e.ready).count();
    let terminating = eps.iter().filter(|e| e.terminating).count();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let (ok, reason, message) = match &problem {
        Some((reason, msg)) => (false, *reason, msg.clone()),
        None => (
            true,
            "Published",
            format!(
                "{} of {} selected members published",
                eps.len(),
                eps.len() + skipped.len()
            ),
        ),
    };
    let mut status = json!({
        "observedGeneration": svc.metadata.generation,
        "conditions": [condition(
            svc,
            st.status.as_ref(),
            ok,
            reason,
            &message,
            &now_s
        )],
        "ready": count(ready),
        "terminating": count(terminating),
        "total": count(eps.len()),
        "slices": count(st.slices.len()),
        "lastChange": last_change,
    });
    if !skipped.is_empty() {
        status["skipped"] = json!(count(skipped.len()));
    }
    write_status(ctx, svc, status, &mut st.status).await?;

    // Look again when a kept failed/left member's grace ends, or to repair drift.
    let next = st
        .gone
        .next_expiry(c.grace, now)
        .map(|t| t.saturating_sub(now) + Duration::from_millis(50))
        .unwrap_or(RELIST)
        .min(RELIST);
    Ok(Action::requeue(next))
}

/// A failed reconcile is tried again: 1 s doubling to 60 s, per SerfService.
pub fn error_policy(svc: Arc<SerfService>, err: &Error, ctx: Arc<ServiceContext>) -> Action {
    let attempt = match ctx.attempts.lock() {
        Ok(mut m) => {
            let a = m.entry(key(&svc)).or_insert(0);
            *a += 1;
            *a
        }
        Err(_) => 1,
    };
    let delay =
        Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60));
    tracing::warn!(serfservice = %svc.name_any(), error = %err.user_message(), attempt, ?delay, "publishing failed; trying again");
    Action::requeue(delay)
}

fn on_change<T: Clone + Send + Sync + 'static>(
    rx: watch::Receiver<T>,
) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// Runs the controller over `api` until `shutdown` resolves: every SerfService is
/// reconciled on a change of its own, of the membership, and of the leadership.
pub async fn run(
    api: Api<SerfService>,
    ctx: Arc<ServiceContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let all = futures::stream::select(
        super::on_leadership_change(ctx.leader.clone()),
        on_change(ctx.members.clone()),
    );
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(all)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "serfservice controller");
            }
            std::future::ready(())
        })
        .await;
}

/// Starts the membership follower and one controller per scope (namespace, or all), until
/// `stop` turns true.
pub fn start(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &Client,
    serf: ClientConfig,
    scopes: &[Option<String>],
    leader: watch::Receiver<bool>,
    call_timeout: Duration,
    stop: &watch::Receiver<bool>,
) {
    let (tx, rx) = watch::channel(None);
    tasks.spawn(follow_members(serf, tx, DEBOUNCE));
    let ctx = ServiceContext::new(client.clone(), leader, rx, call_timeout);
    for ns in scopes {
        let mut stop = stop.clone();
        tasks.spawn(run(super::api_in(client, ns), ctx.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    tracing::info!("service discovery on: publishing SerfServices");
}
