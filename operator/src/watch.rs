//! Triggers that watch Kubernetes objects (`SerfEventTrigger.spec.watch`): one task per
//! trigger, on the leader, watches the kind and fires the trigger's event once per change of
//! the chosen fields of each object (a burst inside the debounce window once, with the newest
//! state). What it last fired per object is kept in a ConfigMap owned by the trigger, so a
//! restart neither repeats nor misses a change; a firing is recorded there before the send.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use serde_json_path::JsonPath;
use serf_operator_crds::{SerfEventTrigger, TriggerWatch, WatchFired};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::dispatch::Severity;
use crate::effects::Sinks;
use crate::trigger::{condition, merge_conditions};

/// Firings shown in status, newest first.
pub const FIRED_SHOWN: usize = 20;
/// The default debounce window.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(2);
/// The ConfigMap data key of the state.
const STATE_KEY: &str = "state.json";

/// One piece of a payload template.
#[derive(Debug)]
enum Piece {
    Text(String),
    Path(JsonPath),
}

/// A watch, compiled: the change fields, the payload template, the debounce window.
#[derive(Debug)]
pub struct Compiled {
    fields: Vec<JsonPath>,
    payload: Vec<Piece>,
    /// Changes closer together than this fire once.
    pub debounce: Duration,
    /// What the state was computed for: a different spec starts from a new baseline.
    pub spec_key: String,
}

/// A kubectl JSONPath expression (`{.data.version}`, `.data`, `{.items[0]}`) as an RFC 9535
/// path (`$.data.version`).
///
/// # Errors
/// The expression does not parse; the message names it.
pub fn kubectl_path(expr: &str) -> Result<JsonPath, String> {
    let e = expr.trim();
    let e = e
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(e)
        .trim();
    let q = if e.starts_with('$') {
        e.to_string()
    } else if e.starts_with('.') || e.starts_with('[') {
        format!("${e}")
    } else {
        format!("$.{e}")
    };
    JsonPath::parse(&q).map_err(|err| format!("{expr:?} is not a JSONPath expression: {err}"))
}

fn template(text: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            out.push(Piece::Text(rest[..start].to_string()));
        }
        let Some(len) = rest[start..].find('}') else {
            return Err(format!("payload {text:?}: a `{{` without its `}}`"));
        };
        out.push(Piece::Path(kubectl_path(&rest[start..start + len + 1])?));
        rest = &rest[start + len + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

/// Compiles a watch and its event's payload template.
///
/// # Errors
/// A field or template expression that does not parse, or a bad debounce window.
pub fn compile(w: &TriggerWatch, payload: &str) -> Result<Compiled, String> {
    let fields = w
        .fields
        .iter()
        .map(|f| kubectl_path(f).map_err(|e| format!("fields: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let payload = template(payload)?;
    let debounce = match &w.debounce {
        Some(d) => crate::engine::parse_duration(d).map_err(|e| format!("debounce: {e}"))?,
        None => DEFAULT_DEBOUNCE,
    };
    let spec_key = hex(&Sha256::digest(
        serde_json::to_vec(&json!([
            w.api_version,
            w.kind,
            w.namespace,
            w.selector,
            w.fields
        ]))
        .unwrap_or_default(),
    ));
    Ok(Compiled {
        fields,
        payload,
        debounce,
        spec_key,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The values of the change fields of `obj`, hashed: equal fingerprints, no change.
pub fn fingerprint(c: &Compiled, obj: &Value) -> String {
    let values: Vec<Vec<&Value>> = c.fields.iter().map(|p| p.query(obj).all()).collect();
    hex(&Sha256::digest(
        serde_json::to_vec(&values).unwrap_or_default(),
    ))
}

/// The payload for `obj`: each `{...}` replaced by what it selects (a string as is, other
/// values as JSON; several joined by spaces; nothing selected: empty).
pub fn render(c: &Compiled, obj: &Value) -> String {
    let mut out = String::new();
    for p in &c.payload {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Path(path) => {
                let parts: Vec<String> = path
                    .query(obj)
                    .all()
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                out.push_str(&parts.join(" "));
            }
        }
    }
    out
}

/// What was last fired for one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The fingerprint fired (or taken as the baseline).
    pub fp: String,
    /// Recorded before the send; still set after a restart: interrupted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sending: bool,
}

/// The persisted state of one watching trigger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The spec it was computed for ([`Compiled::spec_key`]).
    pub spec: String,
    /// By `namespace/name`.
    pub objects: BTreeMap<String, Seen>,
}

/// What an object's current fields mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Taken as the starting point (a new trigger, or a changed watch spec): not fired.
    Baseline,
    /// What was last fired: nothing to do.
    Same,
    /// New values (or a new object): fire.
    Changed,
}

impl State {
    /// Classifies `fp` for `key`; `baseline` while the first listing of a new watch runs.
    pub fn classify(&self, key: &str, fp: &str, baseline: bool) -> Change {
        match self.objects.get(key) {
            Some(s) if s.fp == fp => Change::Same,
            _ if baseline => Change::Baseline,
            _ => Change::Changed,
        }
    }

    /// After a restart: the firings recorded but not completed. They are kept as fired (not
    /// sent again) and returned, to be reported as interrupted.
    pub fn take_interrupted(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, s) in &mut self.objects {
            if s.sending {
                s.sending = false;
                out.push(k.clone());
            }
        }
        out
    }
}

fn state_name(trigger: &str) -> String {
    format!("{trigger}-serf-watch")
}

/// Reads the trigger's watch state (`None` when there is none yet, or it does not decode).
///
/// # Errors
/// The API call failed.
pub async fn read_state(
    client: &Client,
    t: &SerfEventTrigger,
) -> Result<Option<State>, kube::Error> {
    let text = crate::ledger::read_key(
        client,
        &t.namespace().unwrap_or_default(),
        &state_name(&t.name_any()),
        STATE_KEY,
    )
    .await?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

/// Writes the trigger's watch state (server-side apply; owned by the trigger).
///
/// # Errors
/// The API call failed.
pub async fn write_state(
    client: &Client,
    t: &SerfEventTrigger,
    state: &State,
) -> Result<(), kube::Error> {
    let name = t.name_any();
    crate::ledger::write_key(
        client,
        &t.namespace().unwrap_or_default(),
        &state_name(&name),
        json!({}),
        t.metadata
            .uid
            .as_deref()
            .map(|uid| crate::ledger::owner("SerfEventTrigger", &name, uid)),
        STATE_KEY,
        &serde_json::to_string(state).unwrap_or_default(),
    )
    .await
}

/// The running task of one watching trigger.
pub struct Runner {
    client: Client,
    serf: tokio::sync::watch::Receiver<Option<serf_client::Client>>,
    sinks: Sinks,
    t: Arc<SerfEventTrigger>,
    timeout: Duration,
    fired_count: i64,
    fired: Vec<WatchFired>,
    objects: usize,
    /// The conditions as this runner last wrote them (the trigger it started from is not
    /// updated).
    conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

fn key(o: &DynamicObject) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

impl Runner {
    /// A runner for `t`.
    pub fn new(
        client: Client,
        serf: tokio::sync::watch::Receiver<Option<serf_client::Client>>,
        sinks: Sinks,
        t: Arc<SerfEventTrigger>,
        timeout: Duration,
    ) -> Self {
        let status = t.status.clone().unwrap_or_default();
        Runner {
            client,
            serf,
            sinks,
            fired_count: status.fired_count,
            fired: status.watch.map(|w| w.fired).unwrap_or_default(),
            objects: 0,
            conditions: status.conditions,
            t,
            timeout,
        }
    }

    async fn status(
        &mut self,
        extra: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
        last: Option<&str>,
    ) {
        self.conditions = merge_conditions(&self.conditions, extra);
        let mut s = json!({
            "observedGeneration": self.t.metadata.generation.unwrap_or(0),
            "conditions": self.conditions,
            "firedCount": self.fired_count,
            "watch": {"objects": self.objects, "fired": self.fired},
        });
        if let Some(l) = last {
            s["lastFired"] = json!(l);
        }
        let call = crate::trigger::patch_status(&self.client, &self.t, json!({"status": s}));
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the watch status"),
            Err(_) => tracing::warn!("writing the watch status timed out"),
        }
    }

    async fn not_ready(&mut self, reason: &str, msg: String) {
        tracing::warn!(reason, "watch not running: {msg}");
        let g = self.t.metadata.generation.unwrap_or(0);
        let now = jiff::Timestamp::now().to_string();
        self.status(
            vec![condition("Ready", "False", reason, &msg, g, &now)],
            None,
        )
        .await;
        self.publish(Severity::Warning, "TriggerFailed", msg);
    }

    fn publish(&self, severity: Severity, reason: &'static str, note: String) {
        let r = crate::jobs::HandlerRef {
            namespace: self.t.namespace().unwrap_or_default(),
            name: self.t.name_any(),
            uid: self.t.metadata.uid.clone(),
        };
        self.sinks
            .notify("SerfEventTrigger", &r, severity, reason, note);
    }

    fn record(&mut self, object: &str, payload: &str, result: &str, now: &str) {
        let shown: String = payload.chars().take(256).collect();
        // One entry per object: what was last fired for it.
        self.fired.retain(|f| f.object != object);
        self.fired.insert(
            0,
            WatchFired {
                object: object.to_string(),
                time: now.to_string(),
                payload: shown,
                result: result.to_string(),
            },
        );
        self.fired.truncate(FIRED_SHOWN);
    }

    /// Runs until aborted (leadership lost, spec changed) or the trigger is gone.
    pub async fn run(mut self) {
        let Some(w) = self.t.spec.watch.clone() else {
            return;
        };
        let Some(ev) = self.t.spec.event.clone() else {
            return;
        };
        let compiled = match compile(&w, ev.payload.as_deref().unwrap_or("")) {
            Ok(c) => c,
            Err(e) => return self.not_ready("InvalidSpec", e).await,
        };
        let (group, version) = match w.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), w.api_version.clone()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &w.kind);
        let ns = w
            .namespace
            .clone()
            .unwrap_or_else(|| self.t.namespace().unwrap_or_default());
        // The kind must exist and be readable; RBAC may be granted later: look again.
        let api = loop {
            let found = tokio::time::timeout(
                self.timeout,
                kube::discovery::pinned_kind(&self.client, &gvk),
            )
            .await;
            let ar: ApiResource = match found {
                Ok(Ok((ar, _))) => ar,
                Ok(Err(e)) => {
                    self.not_ready(
                        "UnknownKind",
                        format!(
                            "{} {}: not served by the API server: {e}",
                            w.api_version, w.kind
                        ),
                    )
                    .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!("API discovery timed out; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            tracing::debug!(plural = %ar.plural, "kind discovered");
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &ar);
            let mut lp = ListParams::default().limit(1);
            if let Some(sel) = &w.selector {
                lp = lp.labels(sel);
            }
            match tokio::time::timeout(self.timeout, api.list(&lp)).await {
                Ok(Ok(_)) => break api,
                Ok(Err(e)) => {
                    let reason = match &e {
                        kube::Error::Api(s) if s.code == 403 => "WatchForbidden",
                        kube::Error::Api(s) if s.code == 400 => "InvalidSpec",
                        _ => "WatchFailed",
                    };
                    self.not_ready(reason, format!("cannot list {} in {ns}: {e}", ar.plural))
                        .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Err(_) => {
                    tracing::warn!("listing the watched kind timed out; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await
                }
            }
        };
        tracing::debug!("the watched kind is readable");
        let mut state = loop {
            match tokio::time::timeout(self.timeout, read_state(&self.client, &self.t)).await {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the watch state; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(_) => tracing::warn!("reading the watch state timed out; retrying"),
            }
        };
        let mut baseline = state.as_ref().is_none_or(|s| s.spec != compiled.spec_key);
        let mut state = match state.take() {
            Some(s) if !baseline => s,
            _ => State {
                spec: compiled.spec_key.clone(),
                objects: BTreeMap::new(),
            },
        };
        let now = jiff::Timestamp::now().to_string();
        let interrupted = state.take_interrupted();
        for k in &interrupted {
            self.record(k, "", "Interrupted", &now);
            self.publish(
                Severity::Warning,
                "TriggerFailed",
                format!(
                    "the firing for {k} was interrupted between record and send; not sent again"
                ),
            );
        }
        let g = self.t.metadata.generation.unwrap_or(0);
        self.status(
            vec![condition(
                "Ready",
                "True",
                "Watching",
                &format!("watching {} {} in {ns}", w.api_version, w.kind),
                g,
                &now,
            )],
            None,
        )
        .await;

        let mut cfg = watcher::Config::default();
        if let Some(sel) = &w.selector {
            cfg = cfg.labels(sel);
        }
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        let mut pending: BTreeMap<String, (Value, Instant)> = BTreeMap::new();
        let mut listing: BTreeSet<String> = BTreeSet::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut alive = tokio::time::interval(Duration::from_secs(30));
        loop {
            let next_due = pending.values().map(|(_, d)| *d).min();
            let sleep = async {
                match next_due {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = stream.next() => {
                    let Some(item) = item else { break };
                    match item {
                        Ok(watcher::Event::Init) => listing.clear(),
                        Ok(watcher::Event::InitApply(o)) | Ok(watcher::Event::Apply(o)) => {
                            let k = key(&o);
                            listing.insert(k.clone());
                            seen.insert(k.clone());
                            let obj = serde_json::to_value(&o).unwrap_or(Value::Null);
                            let fp = fingerprint(&compiled, &obj);
                            match state.classify(&k, &fp, baseline) {
                                Change::Same => { pending.remove(&k); }
                                Change::Baseline => {
                                    state.objects.insert(k, Seen { fp, sending: false });
                                }
                                Change::Changed => {
                                    let due = pending
                                        .get(&k)
                                        .map(|(_, d)| *d)
                                        .unwrap_or_else(|| Instant::now() + compiled.debounce);
                                    pending.insert(k, (obj, due));
                                }
                            }
                        }
                        Ok(watcher::Event::InitDone) => {
                            // Objects deleted while nobody watched are forgotten.
                            let before = state.objects.len();
                            state.objects.retain(|k, _| listing.contains(k));
                            seen = listing.clone();
                            self.objects = seen.len();
                            if baseline || state.objects.len() != before {
                                baseline = false;
                                if let Err(e) = write_state(&self.client, &self.t, &state).await {
                                    tracing::warn!(error = %e, "cannot write the watch state");
                                }
                            }
                            self.status(vec![], None).await;
                        }
                        Ok(watcher::Event::Delete(o)) => {
                            let k = key(&o);
                            pending.remove(&k);
                            seen.remove(&k);
                            self.objects = seen.len();
                            if state.objects.remove(&k).is_some()
                                && let Err(e) = write_state(&self.client, &self.t, &state).await
                            {
                                tracing::warn!(error = %e, "cannot write the watch state");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watch error; the watcher retries"),
                    }
                }
                _ = sleep => {
                    let now_i = Instant::now();
                    let due: Vec<String> = pending
                        .iter()
                        .filter(|(_, (_, d))| *d <= now_i)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in due {
                        let Some((obj, _)) = pending.remove(&k) else { continue };
                        if !self.fire(&k, &obj, &compiled, &ev, &mut state).await {
                            // Not recorded (the agent or the API server is away): later.
                            pending.insert(k, (obj, Instant::now() + Duration::from_secs(2)));
                        }
                    }
                }
                _ = alive.tick() => {
                    let api: Api<SerfEventTrigger> = Api::namespaced(self.client.clone(), &self.t.namespace().unwrap_or_default());
                    if let Ok(Ok(current)) = tokio::time::timeout(self.timeout, api.get_opt(&self.t.name_any())).await
                        && current.as_ref().and_then(|c| c.metadata.uid.clone()) != self.t.metadata.uid
                    {
                        tracing::info!("the trigger is gone; its watch ends");
                        break;
                    }
                }
            }
        }
    }

    /// Fires for one object: recorded, sent, recorded. False when it could not start (to
    /// be tried again); true once it is decided (sent, or failed for good).
    async fn fire(
        &mut self,
        k: &str,
        obj: &Value,
        c: &Compiled,
        ev: &serf_operator_crds::TriggerEvent,
        state: &mut State,
    ) -> bool {
        use tracing::Instrument as _;
        // Instrumented, not entered: a span entered across an await is left on whatever
        // thread the task resumes on.
        let span = tracing::info_span!("watch-fire", object = k);
        self.fire_in_span(k, obj, c, ev, state)
            .instrument(span)
            .await
    }

    async fn fire_in_span(
        &mut self,
        k: &str,
        obj: &Value,
        c: &Compiled,
        ev: &serf_operator_crds::TriggerEvent,
        state: &mut State,
    ) -> bool {
        let Some(serf) = self.serf.borrow().clone() else {
            tracing::debug!(object = k, "no agent connection; the firing waits");
            return false;
        };
        let fp = fingerprint(c, obj);
        let payload = render(c, obj);
        state.objects.insert(
            k.to_string(),
            Seen {
                fp: fp.clone(),
                sending: true,
            },
        );
        if let Err(e) = write_state(&self.client, &self.t, state).await {
            tracing::warn!(error = %e, "cannot record the firing; it waits");
            state.objects.remove(k);
            return false;
        }
        let result = serf.event(&ev.name, payload.as_bytes(), ev.coalesce).await;
        state
            .objects
            .insert(k.to_string(), Seen { fp, sending: false });
        if let Err(e) = write_state(&self.client, &self.t, state).await {
            tracing::warn!(error = %e, "cannot record the firing's outcome");
        }
        let now = jiff::Timestamp::now().to_string();
        let g = self.t.metadata.generation.unwrap_or(0);
        match result {
            Ok(()) => {
                tracing::info!(event = %ev.name, "fired for a watched object's change");
                self.fired_count += 1;
                self.record(k, &payload, "Sent", &now);
                self.sinks
                    .metrics
                    .triggers_fired
                    .get_or_create(&crate::metrics::ResultLabel {
                        result: "sent".into(),
                    })
                    .inc();
                self.publish(
                    Severity::Normal,
                    "TriggerFired",
                    format!("fired {} for {k}", ev.name),
                );
                self.status(
                    vec![condition(
                        "Sent",
                        "True",
                        "Fired",
                        &format!("fired for {k}"),
                        g,
                        &now,
                    )],
                    Some(&now),
                )
                .await;
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!("Serf refused the send: {msg}");
                self.record(k, &payload, "Failed", &now);
                self.sinks
                    .metrics
                    .triggers_fired
                    .get_or_create(&crate::metrics::ResultLabel {
                        result: "failed".into(),
                    })
                    .inc();
                self.publish(Severity::Warning, "TriggerFailed", format!("{k}: {msg}"));
                self.status(
                    vec![condition("Sent", "False", "SendFailed", &msg, g, &now)],
                    None,
                )
                .await;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn watch(fields: &[&str]) -> TriggerWatch {
        TriggerWatch {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: None,
            selector: None,
            fields: fields.iter().map(|f| f.to_string()).collect(),
            debounce: None,
        }
    }

    #[test]
    fn kubectl_paths_and_templates() {
        let obj = json!({"metadata": {"name": "web", "resourceVersion": "7"},
            "data": {"version": "1.2", "url": "http://x"}, "status": {"readyReplicas": 3}});
        let c = compile(
            &watch(&["{.data}"]),
            "{.metadata.name} v={.data.version} ready={.status.readyReplicas} {.data} none={.nope}",
        )
        .unwrap();
        assert_eq!(
            render(&c, &obj),
            r#"web v=1.2 ready=3 {"url":"http://x","version":"1.2"} none="#
        );
        for ok in [
            "{.data.version}",
            ".data",
            "data",
            "$.data",
            "{.items[0]}",
            "{.data['a.b']}",
        ] {
            assert!(kubectl_path(ok).is_ok(), "{ok}");
        }
        assert!(
            kubectl_path("{.data[}")
                .unwrap_err()
                .contains("is not a JSONPath")
        );
        assert!(compile(&watch(&["{.data"]), "").is_err());
        assert!(
            compile(&watch(&[".data"]), "a {.b")
                .unwrap_err()
                .contains("without")
        );
    }

    #[test]
    fn only_the_chosen_fields_count() {
        let c = compile(&watch(&["{.data}"]), "").unwrap();
        let a =
            json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "v"}, "status": {"x": 1}});
        let b =
            json!({"metadata": {"resourceVersion": "2"}, "data": {"k": "v"}, "status": {"x": 2}});
        let d = json!({"metadata": {"resourceVersion": "3"}, "data": {"k": "w"}});
        assert_eq!(
            fingerprint(&c, &a),
            fingerprint(&c, &b),
            "resyncs and other fields"
        );
        assert_ne!(fingerprint(&c, &a), fingerprint(&c, &d));
        // A different spec is a different state.
        assert_ne!(
            c.spec_key,
            compile(&watch(&["{.status}"]), "").unwrap().spec_key
        );
    }

    #[test]
    fn once_per_change_baseline_and_interrupted() {
        let mut s = State::default();
        // A new trigger: what exists is the starting point.
        assert_eq!(s.classify("ns/a", "f1", true), Change::Baseline);
        s.objects.insert(
            "ns/a".into(),
            Seen {
                fp: "f1".into(),
                sending: false,
            },
        );
        assert_eq!(s.classify("ns/a", "f1", false), Change::Same);
        assert_eq!(s.classify("ns/a", "f2", false), Change::Changed);
        // After a restart, an object created meanwhile is a change.
        assert_eq!(s.classify("ns/b", "f9", false), Change::Changed);
        // Recorded but not completed before a restart: kept as fired, reported once.
        s.objects.insert(
            "ns/c".into(),
            Seen {
                fp: "f3".into(),
                sending: true,
            },
        );
        assert_eq!(s.take_interrupted(), ["ns/c"]);
        assert!(s.take_interrupted().is_empty());
        assert_eq!(s.classify("ns/c", "f3", false), Change::Same);
        let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
