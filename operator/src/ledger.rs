//! The record that keeps an event from launching twice after its Job is gone.
//!
//! A Job's deterministic name makes a second create fail with 409 only while the Job exists.
//! History pruning and `ttlSecondsAfterFinished` delete Jobs, and Serf can deliver an event
//! again later (an agent joining with `-replay` re-delivers up to 512 past user events). So
//! every launched Job's name is also recorded, per handler, in a ConfigMap
//! `<handler>-serf-launched` in the handler's namespace (owned by the handler). An entry is
//! kept while it is among the newest 2,048 of the handler, or younger than the horizon (7
//! days) and among the newest 16,384; both bounds exceed what Serf can replay (512 user
//! events), and the last keeps a ledger near 500 KiB, inside a ConfigMap's 1 MiB, and its
//! memory bounded under any event rate. A name in the ledger is not launched again. Also
//! persisted here: the membership last acted on.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::engine::Membership;
use crate::error::Error;
use crate::jobs::HandlerRef;

/// Field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "serf-operator";
/// Entries kept per handler regardless of age.
pub const KEEP_NEWEST: usize = 2048;
/// Entries younger than this (seconds) are kept up to [`MAX_ENTRIES`].
pub const HORIZON_SECS: i64 = 7 * 24 * 3600;
/// The most entries a handler's ledger keeps, however young: about 33 bytes each, so the
/// ConfigMap stays well inside its 1 MiB.
pub const MAX_ENTRIES: usize = 16 * 1024;
const DATA_KEY: &str = "launched";

/// Now, in unix seconds (the ledger's clock).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The ConfigMap name of a handler's ledger.
pub fn ledger_name(handler: &str) -> String {
    let mut base = handler.to_string();
    base.truncate(253 - "-serf-launched".len());
    format!("{base}-serf-launched")
}

#[derive(Default)]
struct HandlerLedger {
    /// Job name → launch time (unix seconds).
    entries: BTreeMap<String, i64>,
    loaded: bool,
    dirty: bool,
}

/// Launched Job names by handler.
#[derive(Default)]
pub struct Ledger {
    handlers: BTreeMap<(String, String), HandlerLedger>,
}

impl Ledger {
    /// Whether the handler's ledger has been read from the cluster.
    pub fn is_loaded(&self, h: &HandlerRef) -> bool {
        self.handlers
            .get(&(h.namespace.clone(), h.name.clone()))
            .is_some_and(|l| l.loaded)
    }

    /// Whether `job` is in the handler's ledger and that ledger has been written since
    /// (nothing recorded is waiting to be persisted).
    pub fn is_recorded(&self, h: &HandlerRef, job: &str) -> bool {
        self.handlers
            .get(&(h.namespace.clone(), h.name.clone()))
            .is_some_and(|l| l.loaded && !l.dirty && l.entries.contains_key(job))
    }

    /// Merges what was read from the cluster.
    pub fn load(&mut self, h: &HandlerRef, text: &str) {
        let l = self
            .handlers
            .entry((h.namespace.clone(), h.name.clone()))
            .or_default();
        for line in text.lines() {
            if let Some((name, t)) = line.split_once(' ')
                && let Ok(t) = t.parse()
            {
                l.entries.entry(name.to_string()).or_insert(t);
            }
        }
        l.loaded = true;
    }

    /// Whether `job` was launched before.
    pub fn contains(&self, h: &HandlerRef, job: &str) -> bool {
        self.handlers
            .get(&(h.namespace.clone(), h.name.clone()))
            .is_some_and(|l| l.entries.contains_key(job))
    }

    /// Records a launch.
    pub fn record(&mut self, h: &HandlerRef, job: &str, now: i64) {
        let l = self
            .handlers
            .entry((h.namespace.clone(), h.name.clone()))
            .or_default();
        if l.entries.insert(job.to_string(), now).is_none() {
            l.dirty = true;
        }
    }

    /// Drops what is both older than the horizon and beyond the newest [`KEEP_NEWEST`], and
    /// everything beyond the newest [`MAX_ENTRIES`].
    fn compact(l: &mut HandlerLedger, now: i64) {
        if l.entries.len() <= KEEP_NEWEST {
            return;
        }
        let mut by_time: Vec<(i64, String)> =
            l.entries.iter().map(|(n, t)| (*t, n.clone())).collect();
        by_time.sort_unstable_by(|a, b| b.cmp(a));
        let keep: BTreeSet<String> = by_time
            .into_iter()
            .enumerate()
            .filter(|(i, (t, _))| *i < KEEP_NEWEST || (now - *t < HORIZON_SECS && *i < MAX_ENTRIES))
            .map(|(_, (_, n))| n)
            .collect();
        l.entries.retain(|n, _| keep.contains(n));
    }

    /// The ledgers changed since the last call, rendered for writing.
    pub fn take_dirty(&mut self, now: i64) -> Vec<((String, String), String)> {
        let mut out = Vec::new();
        for (k, l) in &mut self.handlers {
            if !l.dirty {
                continue;
            }
            Self::compact(l, now);
            l.dirty = false;
            let text: String = l
                .entries
                .iter()
                .map(|(n, t)| format!("{n} {t}\n"))
                .collect();
            out.push((k.clone(), text));
        }
        out
    }

    /// Marks a ledger as not written (after a failed write).
    pub fn mark_dirty(&mut self, k: &(String, String)) {
        if let Some(l) = self.handlers.get_mut(k) {
            l.dirty = true;
        }
    }
}

/// Reads a handler's ledger ConfigMap (empty when absent).
///
/// # Errors
/// Any API error but 404.
pub async fn read_ledger(client: &Client, h: &HandlerRef) -> Result<String, kube::Error> {
    Ok(
        read_key(client, &h.namespace, &ledger_name(&h.name), DATA_KEY)
            .await?
            .unwrap_or_default(),
    )
}

/// One key of a ConfigMap; `None` when the ConfigMap or the key is absent.
///
/// # Errors
/// Any API error but 404.
pub async fn read_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<String>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|cm| cm.data)
        .and_then(|mut d| d.remove(key)))
}

/// An owner reference to one of this project's objects (`SerfHandler`, `SerfEventTrigger`).
pub fn owner(kind: &str, name: &str, uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": format!("{}/{}", serf_operator_crds::GROUP, serf_operator_crds::VERSION),
        "kind": kind, "name": name, "uid": uid,
    })
}

/// Writes one key of a ConfigMap by server-side apply (field manager `serf-operator`),
/// labelled as the operator's (plus `labels`) and owned by `owner` when given.
///
/// # Errors
/// The API error.
pub async fn write_key(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    owner: Option<serde_json::Value>,
    key: &str,
    text: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut all = json!({"app.kubernetes.io/managed-by": crate::jobs::MANAGED_BY});
    if let (Some(all), Some(more)) = (all.as_object_mut(), labels.as_object()) {
        all.extend(more.clone());
    }
    let mut meta = json!({"name": name, "namespace": namespace, "labels": all});
    if let Some(o) = owner {
        meta["ownerReferences"] = json!([o]);
    }
    let cm =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {key: text}});
    apply_unread(client, api.resource_url(), name, None, cm).await
}

/// Server-side applies `body` to the object `name` under `url` (or to its `subresource`),
/// under the operator's field manager, forced. The answer is checked, not decoded: it is the
/// whole object again, with its managed fields, and nothing in it is read.
///
/// # Errors
/// The API error.
pub async fn apply_unread(
    client: &Client,
    url: &str,
    name: &str,
    subresource: Option<&str>,
    body: serde_json::Value,
) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(body);
    let request = kube::core::Request::new(url);
    let req = match subresource {
        Some(sub) => request.patch_subresource(sub, name, &pp, &patch),
        None => request.patch(name, &pp, &patch),
    }
    .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(|_| ())
}

/// Writes a handler's ledger ConfigMap (server-side apply), owned by the handler.
///
/// # Errors
/// The API error.
pub async fn write_ledger(client: &Client, h: &HandlerRef, text: &str) -> Result<(), kube::Error> {
    write_key(
        client,
        &h.namespace,
        &ledger_name(&h.name),
        json!({crate::jobs::LABEL_HANDLER: crate::naming::label_value(&h.name)}),
        h.uid
            .as_deref()
            .map(|uid| owner("SerfHandler", &h.name, uid)),
        DATA_KEY,
        text,
    )
    .await
}

/// Name of the ConfigMap holding the membership last acted on.
pub const MEMBERSHIP_CONFIGMAP: &str = "serf-operator-membership";
const MEMBERSHIP_KEY: &str = "membership.json";

/// Reads the persisted membership (empty when absent).
///
/// # Errors
/// Any API error but 404, or a record that does not decode.
pub async fn read_membership(client: &Client, namespace: &str) -> Result<Membership, Error> {
    match read_key(client, namespace, MEMBERSHIP_CONFIGMAP, MEMBERSHIP_KEY)
        .await
        .map_err(|e| Error::kube("read the membership record", e))?
    {
        Some(text) => serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            what: format!("ConfigMap {MEMBERSHIP_CONFIGMAP}"),
            message: e.to_string(),
        }),
        None => Ok(Membership::default()),
    }
}

/// Persists the membership last acted on.
///
/// # Errors
/// The API error.
pub async fn write_membership(
    client: &Client,
    namespace: &str,
    m: &Membership,
) -> Result<(), Error> {
    let text = serde_json::to_string(m).map_err(|e| Error::Corrupt {
        what: "the membership record".into(),
        message: e.to_string(),
    })?;
    write_key(
        client,
        namespace,
        MEMBERSHIP_CONFIGMAP,
        json!({}),
        None,
        MEMBERSHIP_KEY,
        &text,
    )
    .await
    .map_err(|e| Error::kube("write the membership record", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> HandlerRef {
        HandlerRef {
            namespace: "n".into(),
            name: "h".into(),
            uid: None,
        }
    }

    #[test]
    fn records_round_trip_and_compaction_keeps_the_horizon() {
        let mut l = Ledger::default();
        let now = 1_000_000_000;
        for i in 0..(KEEP_NEWEST + 100) {
            // 100 old ones beyond the horizon, the rest recent
            let t = if i < 100 {
                now - HORIZON_SECS - 10
            } else {
                now - 5
            };
            l.record(&h(), &format!("job-{i:05}"), t);
        }
        let written = l.take_dirty(now);
        assert_eq!(written.len(), 1);
        let mut back = Ledger::default();
        back.load(&h(), &written[0].1);
        assert!(back.contains(&h(), "job-00100"));
        assert!(
            !back.contains(&h(), "job-00000"),
            "old entries beyond the newest are dropped"
        );
        assert_eq!(written[0].1.lines().count(), KEEP_NEWEST);
        // Young entries are kept even past the count.
        let mut young = Ledger::default();
        for i in 0..(KEEP_NEWEST + 10) {
            young.record(&h(), &format!("y-{i}"), now - 1);
        }
        assert_eq!(young.take_dirty(now)[0].1.lines().count(), KEEP_NEWEST + 10);
        assert!(young.take_dirty(now).is_empty());
        // But not past MAX_ENTRIES: a high event rate keeps the ConfigMap under 1 MiB.
        let mut busy = Ledger::default();
        for i in 0..(MAX_ENTRIES + 500) {
            busy.record(
                &h(),
                &format!("bench-go-{i:012x}"),
                now - 1000 + (i / 100) as i64,
            );
        }
        let text = &busy.take_dirty(now)[0].1;
        assert_eq!(text.lines().count(), MAX_ENTRIES);
        assert!(text.len() < 700 * 1024, "{} bytes", text.len());
        let mut back = Ledger::default();
        back.load(&h(), text);
        let newest = format!("bench-go-{:012x}", MAX_ENTRIES + 499);
        assert!(back.contains(&h(), &newest));
        assert!(!back.contains(&h(), "bench-go-000000000000"));
    }
}
