//! The record that keeps an event from launching twice after its Job is gone.
//!
//! A Job's deterministic name makes a second create fail with 409 only while the Job exists.
//! History pruning and `ttlSecondsAfterFinished` delete Jobs, and Serf can deliver an event
//! again later (an agent joining with `-replay` re-delivers up to 512 past user events). So
//! every launched Job's name is also recorded, per handler, in the handler's launch ledger:
//! up to 8 segments of 2,048 names, each a ConfigMap in the handler's namespace owned by the
//! handler (`<handler>-serf-launched` for slot 0, `<handler>-serf-launched-<slot>` for the
//! others). Launches go to the newest segment; when it is full the next slot starts, and the
//! segment held there before (the oldest) is replaced whole. A flush writes only the
//! segments that changed (the newest, about 66 KB at most, and the one before it when that
//! has just filled), not the whole ledger; a name counts as recorded once its segment's
//! write is confirmed. An old segment is also dropped once all its names are older than the
//! horizon (7 days) and the newer segments keep at least 2,048 names. So the newest 2,048
//! names are always kept, names younger than 7 days are kept while among the newest 14,336
//! or more, and never more than 16,384 are kept (about 530 KiB, in memory and in the
//! cluster): all of these bounds exceed what Serf can replay (512 user events). A name in the
//! ledger is not launched again.

use std::collections::{BTreeMap, VecDeque};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::error::Error;
use crate::jobs::HandlerRef;

/// Field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "serf-operator";
/// Entries kept per handler regardless of age.
pub const KEEP_NEWEST: usize = 2048;
/// Entries younger than this (seconds) are kept while the newest segments hold them.
pub const HORIZON_SECS: i64 = 7 * 24 * 3600;
/// Names a segment holds (about 33 bytes each: some 66 KB a segment).
pub const SEGMENT_ENTRIES: usize = 2048;
/// Segments a handler's ledger has at most.
pub const SEGMENTS: u64 = 8;
/// The most entries a handler's ledger keeps, however young: the ConfigMaps stay well
/// inside their 1 MiB each, and memory is bounded under any event rate.
pub const MAX_ENTRIES: usize = SEGMENT_ENTRIES * SEGMENTS as usize;
const DATA_KEY: &str = "launched";
/// Annotation of a ledger segment: its sequence number (the slot is the sequence modulo
/// [`SEGMENTS`]; a higher sequence is newer).
pub const ANNOTATION_SEQUENCE: &str = "serf.operator.io/ledger-sequence";

/// Now, in unix seconds (the ledger's clock).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The ConfigMap name of a handler's ledger segment in `slot` (0 to [`SEGMENTS`] - 1).
pub fn ledger_name(handler: &str, slot: u64) -> String {
    let mut base = handler.to_string();
    if slot == 0 {
        base.truncate(253 - "-serf-launched".len());
        format!("{base}-serf-launched")
    } else {
        base.truncate(253 - "-serf-launched-0".len());
        format!("{base}-serf-launched-{slot}")
    }
}

/// One segment of a handler's ledger as stored in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSegment {
    /// Its slot (which ConfigMap).
    pub slot: u64,
    /// Its sequence number; `None` for a ledger written before segments (slot 0 only).
    pub seq: Option<u64>,
    /// Its lines, `<job name> <unix seconds>`.
    pub text: String,
}

/// What a flush writes for one handler: the segments that changed, and the slots of the
/// segments dropped whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerChanges {
    /// Segments to write (slot, sequence, lines).
    pub write: Vec<StoredSegment>,
    /// Slots whose ConfigMap is deleted.
    pub delete: Vec<u64>,
}

impl LedgerChanges {
    /// Nothing to write or delete.
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.delete.is_empty()
    }
}

#[derive(Debug, Default)]
struct Segment {
    seq: u64,
    /// Job name → launch time (unix seconds).
    entries: BTreeMap<String, i64>,
    newest: i64,
    /// Names stored in the cluster: names are only added to a segment, so it holds what was
    /// last written while it has as many.
    written: usize,
}

impl Segment {
    fn new(seq: u64) -> Segment {
        Segment {
            seq,
            ..Default::default()
        }
    }

    fn insert(&mut self, name: String, t: i64) {
        self.newest = self.newest.max(t);
        self.entries.insert(name, t);
    }

    fn dirty(&self) -> bool {
        self.entries.len() != self.written
    }

    fn render(&self) -> String {
        let mut text = String::with_capacity(self.entries.len() * 36);
        for (n, t) in &self.entries {
            text.push_str(n);
            text.push(' ');
            text.push_str(&t.to_string());
            text.push('\n');
        }
        text
    }
}

#[derive(Default)]
struct HandlerLedger {
    /// Oldest first; at most [`SEGMENTS`], each in its own slot.
    segments: VecDeque<Segment>,
    /// Slots whose ConfigMaps are to be deleted.
    deletes: Vec<u64>,
    loaded: bool,
}

impl HandlerLedger {
    fn contains(&self, job: &str) -> bool {
        self.segments.iter().any(|s| s.entries.contains_key(job))
    }

    fn len(&self) -> usize {
        self.segments.iter().map(|s| s.entries.len()).sum()
    }

    fn is_dirty(&self) -> bool {
        !self.deletes.is_empty() || self.segments.iter().any(Segment::dirty)
    }

    /// Adds a name to the newest segment, starting the next one (in the oldest's slot, which
    /// it replaces) when that is full.
    fn add(&mut self, job: String, t: i64) {
        let full = self
            .segments
            .back()
            .is_none_or(|s| s.entries.len() >= SEGMENT_ENTRIES);
        if full {
            let seq = self.segments.back().map_or(0, |s| s.seq + 1);
            self.segments.retain(|s| s.seq % SEGMENTS != seq % SEGMENTS);
            self.deletes.retain(|slot| *slot != seq % SEGMENTS);
            self.segments.push_back(Segment::new(seq));
        }
        if let Some(head) = self.segments.back_mut() {
            head.insert(job, t);
        }
    }

    /// Drops the oldest segments whose names are all older than the horizon, while the newer
    /// segments keep at least [`KEEP_NEWEST`] names.
    fn age_out(&mut self, now: i64) {
        let mut total = self.len();
        while let Some(front) = self.segments.front() {
            let rest = total - front.entries.len();
            if self.segments.len() < 2 || rest < KEEP_NEWEST || now - front.newest < HORIZON_SECS {
                break;
            }
            total = rest;
            if let Some(gone) = self.segments.pop_front() {
                self.deletes.push(gone.seq % SEGMENTS);
            }
        }
    }
}

/// Launched Job names by handler.
#[derive(Default)]
pub struct Ledger {
    handlers: BTreeMap<(String, String), HandlerLedger>,
}

fn key(h: &HandlerRef) -> (String, String) {
    (h.namespace.clone(), h.name.clone())
}

fn parse_lines(text: &str) -> impl Iterator<Item = (&str, i64)> {
    text.lines().filter_map(|line| {
        let (name, t) = line.split_once(' ')?;
        Some((name, t.parse().ok()?))
    })
}

impl Ledger {
    /// Whether the handler's ledger has been read from the cluster.
    pub fn is_loaded(&self, h: &HandlerRef) -> bool {
        self.handlers.get(&key(h)).is_some_and(|l| l.loaded)
    }

    /// Whether `job` is in the handler's ledger and its segment has been written since
    /// (nothing recorded there is waiting to be persisted).
    pub fn is_recorded(&self, h: &HandlerRef, job: &str) -> bool {
        self.handlers.get(&key(h)).is_some_and(|l| {
            l.loaded
                && l.segments
                    .iter()
                    .any(|s| !s.dirty() && s.entries.contains_key(job))
        })
    }

    /// Takes what was read from the cluster as the handler's ledger. Names recorded before
    /// it was read are kept, as the newest. A ledger that does not have the segments' shape
    /// (one written before segments, or slots that disagree with their sequence) is
    /// rebuilt: its newest [`MAX_ENTRIES`] names, oldest first, in segments written anew.
    /// Once loaded, later reads are ignored: this process is the ledger's one writer.
    pub fn load(&mut self, h: &HandlerRef, stored: &[StoredSegment]) {
        let l = self.handlers.entry(key(h)).or_default();
        if l.loaded {
            return;
        }
        let earlier: Vec<(String, i64)> = std::mem::take(&mut l.segments)
            .into_iter()
            .flat_map(|s| s.entries)
            .collect();
        let mut read: Vec<(u64, Option<u64>, Segment)> = stored
            .iter()
            .map(|s| {
                let mut seg = Segment::new(s.seq.unwrap_or(0));
                for (name, t) in parse_lines(&s.text) {
                    seg.insert(name.to_string(), t);
                }
                seg.written = seg.entries.len();
                (s.slot, s.seq, seg)
            })
            .collect();
        read.sort_by_key(|(_, seq, _)| *seq);
        let shaped = read.iter().all(|(slot, seq, seg)| {
            seq.is_some_and(|q| q % SEGMENTS == *slot) && seg.entries.len() <= SEGMENT_ENTRIES
        });
        if shaped {
            l.segments = read.into_iter().map(|(_, _, seg)| seg).collect();
        } else {
            // Each name once, at its latest launch time, oldest first.
            let mut latest: BTreeMap<String, i64> = BTreeMap::new();
            for (name, t) in read.iter().flat_map(|(_, _, seg)| &seg.entries) {
                let at = latest.entry(name.clone()).or_insert(*t);
                *at = (*at).max(*t);
            }
            let mut all: Vec<(i64, String)> = latest.into_iter().map(|(n, t)| (t, n)).collect();
            all.sort_unstable();
            let skip = all.len().saturating_sub(MAX_ENTRIES);
            for (t, name) in all.into_iter().skip(skip) {
                l.add(name, t);
            }
            let used: Vec<u64> = l.segments.iter().map(|s| s.seq % SEGMENTS).collect();
            l.deletes = read
                .iter()
                .map(|(slot, _, _)| *slot)
                .filter(|slot| !used.contains(slot))
                .collect();
        }
        for (name, t) in earlier {
            if !l.contains(&name) {
                l.add(name, t);
            }
        }
        l.loaded = true;
    }

    /// Whether `job` was launched before.
    pub fn contains(&self, h: &HandlerRef, job: &str) -> bool {
        self.handlers.get(&key(h)).is_some_and(|l| l.contains(job))
    }

    /// Names in the handler's ledger.
    pub fn len(&self, h: &HandlerRef) -> usize {
        self.handlers.get(&key(h)).map_or(0, HandlerLedger::len)
    }

    /// Records a launch.
    pub fn record(&mut self, h: &HandlerRef, job: &str, now: i64) {
        let l = self.handlers.entry(key(h)).or_default();
        if !l.contains(job) {
            l.add(job.to_string(), now);
        }
    }

    /// Handlers with launches recorded whose ledger has not been read yet: read it before
    /// anything is written, so that nothing stored is overwritten.
    pub fn unloaded(&self) -> Vec<HandlerRef> {
        self.handlers
            .iter()
            .filter(|(_, l)| !l.loaded && l.is_dirty())
            .map(|((namespace, name), _)| HandlerRef {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: None,
            })
            .collect()
    }

    /// The changes to write, by handler (loaded ledgers only). A segment counts as written
    /// (its names as recorded) only once [`Ledger::finished`] says so.
    pub fn take_changes(&mut self, now: i64) -> Vec<((String, String), LedgerChanges)> {
        let mut out = Vec::new();
        for (k, l) in &mut self.handlers {
            if !l.loaded || !l.is_dirty() {
                continue;
            }
            l.age_out(now);
            let changes = LedgerChanges {
                write: l
                    .segments
                    .iter()
                    .filter(|s| s.dirty())
                    .map(|s| StoredSegment {
                        slot: s.seq % SEGMENTS,
                        seq: Some(s.seq),
                        text: s.render(),
                    })
                    .collect(),
                delete: std::mem::take(&mut l.deletes),
            };
            out.push((k.clone(), changes));
        }
        out
    }

    /// After `changes` were written: all of them, or, when `left` is given, all but what it
    /// holds (the writes not made are still pending; the deletes not made are done again at
    /// the next flush).
    pub fn finished(
        &mut self,
        k: &(String, String),
        changes: &LedgerChanges,
        left: Option<&LedgerChanges>,
    ) {
        let Some(l) = self.handlers.get_mut(k) else {
            return;
        };
        let empty = LedgerChanges::default();
        let left = left.unwrap_or(&empty);
        for w in changes.write.iter().filter(|w| !left.write.contains(w)) {
            if let Some(s) = l.segments.iter_mut().find(|s| Some(s.seq) == w.seq) {
                s.written = s.written.max(w.text.lines().count());
            }
        }
        for slot in &left.delete {
            if !l.deletes.contains(slot) && l.segments.iter().all(|s| s.seq % SEGMENTS != *slot) {
                l.deletes.push(*slot);
            }
        }
    }
}

/// Reads a handler's ledger segments (none when there are none), by one list of the
/// handler's ConfigMaps.
///
/// # Errors
/// The API error.
pub async fn read_ledger(
    client: &Client,
    h: &HandlerRef,
) -> Result<Vec<StoredSegment>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &h.namespace);
    let selector = format!(
        "{}={},app.kubernetes.io/managed-by={}",
        crate::jobs::LABEL_HANDLER,
        crate::naming::label_value(&h.name),
        crate::jobs::MANAGED_BY
    );
    let list = api.list(&ListParams::default().labels(&selector)).await?;
    let mut out = Vec::new();
    for cm in list.items {
        let name = cm.metadata.name.as_deref().unwrap_or_default();
        let Some(slot) = (0..SEGMENTS).find(|slot| ledger_name(&h.name, *slot) == name) else {
            continue;
        };
        let seq = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SEQUENCE))
            .and_then(|v| v.parse().ok());
        let text = cm
            .data
            .and_then(|mut d| d.remove(DATA_KEY))
            .unwrap_or_default();
        out.push(StoredSegment { slot, seq, text });
    }
    Ok(out)
}

/// Reads the handler's ledger into `ledger`, unless it was read before.
///
/// # Errors
/// The read failed or timed out (after `timeout`).
pub async fn load_once(
    client: &Client,
    ledger: &std::sync::Mutex<Ledger>,
    h: &HandlerRef,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    if ledger.lock().is_ok_and(|l| l.is_loaded(h)) {
        return Ok(());
    }
    let stored =
        crate::error::kube_call("read the launch ledger", timeout, read_ledger(client, h)).await?;
    if let Ok(mut l) = ledger.lock() {
        l.load(h, &stored);
    }
    Ok(())
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
    apply_configmap(client, namespace, name, labels, json!({}), owner, key, text).await
}

#[allow(clippy::too_many_arguments)]
async fn apply_configmap(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
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
    if annotations.as_object().is_some_and(|a| !a.is_empty()) {
        meta["annotations"] = annotations;
    }
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

/// Writes a handler's ledger changes: each changed segment by server-side apply (owned by
/// the handler), then the deletes of the segments dropped whole. Stops at the first error;
/// what is left is returned with it, to be written again.
///
/// # Errors
/// The API error, with the changes not made.
pub async fn write_ledger(
    client: &Client,
    h: &HandlerRef,
    changes: &LedgerChanges,
) -> Result<(), (kube::Error, LedgerChanges)> {
    let labels = json!({crate::jobs::LABEL_HANDLER: crate::naming::label_value(&h.name)});
    let owner = h
        .uid
        .as_deref()
        .map(|uid| owner("SerfHandler", &h.name, uid));
    for (i, seg) in changes.write.iter().enumerate() {
        let annotations =
            json!({ANNOTATION_SEQUENCE: seg.seq.map(|q| q.to_string()).unwrap_or_default()});
        let name = ledger_name(&h.name, seg.slot);
        if let Err(e) = apply_configmap(
            client,
            &h.namespace,
            &name,
            labels.clone(),
            annotations,
            owner.clone(),
            DATA_KEY,
            &seg.text,
        )
        .await
        {
            let left = LedgerChanges {
                write: changes.write[i..].to_vec(),
                delete: changes.delete.clone(),
            };
            return Err((e, left));
        }
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &h.namespace);
    for (i, slot) in changes.delete.iter().enumerate() {
        match api
            .delete(&ledger_name(&h.name, *slot), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                let left = LedgerChanges {
                    write: Vec::new(),
                    delete: changes.delete[i..].to_vec(),
                };
                return Err((e, left));
            }
        }
    }
    Ok(())
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

    fn loaded() -> Ledger {
        let mut l = Ledger::default();
        l.load(&h(), &[]);
        l
    }

    /// What a flush writes, as the cluster would then hold it.
    fn flush_into(
        l: &mut Ledger,
        now: i64,
        cluster: &mut BTreeMap<u64, StoredSegment>,
    ) -> LedgerChanges {
        let mut all = l.take_changes(now);
        assert!(all.len() <= 1);
        let Some((k, changes)) = all.pop() else {
            return LedgerChanges::default();
        };
        l.finished(&k, &changes, None);
        for w in &changes.write {
            cluster.insert(w.slot, w.clone());
        }
        for d in &changes.delete {
            cluster.remove(d);
        }
        changes
    }

    #[test]
    fn a_flush_writes_only_the_segments_that_changed() {
        let now = 1_000_000_000;
        let mut l = loaded();
        let mut cluster = BTreeMap::new();
        for i in 0..(3 * SEGMENT_ENTRIES + 10) {
            l.record(&h(), &format!("job-{i:06}"), now);
        }
        let first = flush_into(&mut l, now, &mut cluster);
        assert_eq!(first.write.len(), 4);
        assert!(first.delete.is_empty());
        assert!(l.take_changes(now).is_empty(), "nothing changed since");
        // One more launch rewrites the newest segment only: 11 names, not 6,155.
        l.record(&h(), "job-new", now);
        l.record(&h(), "job-000005", now); // known: not recorded again
        let second = flush_into(&mut l, now, &mut cluster);
        assert_eq!(second.write.len(), 1);
        assert_eq!(second.write[0].slot, 3);
        assert_eq!(second.write[0].seq, Some(3));
        assert_eq!(second.write[0].text.lines().count(), 11);
        assert!(l.is_recorded(&h(), "job-new"));
        // Read back from what the cluster holds, the same names.
        let mut back = Ledger::default();
        back.load(&h(), &cluster.values().cloned().collect::<Vec<_>>());
        assert_eq!(back.len(&h()), 3 * SEGMENT_ENTRIES + 11);
        assert!(back.contains(&h(), "job-000000") && back.contains(&h(), "job-new"));
        assert!(
            back.take_changes(now).is_empty(),
            "read as it is, nothing to rewrite"
        );
    }

    #[test]
    fn the_oldest_segment_is_replaced_whole_at_the_bound() {
        let now = 1_000_000_000;
        let mut l = loaded();
        let mut cluster = BTreeMap::new();
        for i in 0..(MAX_ENTRIES + 500) {
            l.record(
                &h(),
                &format!("bench-go-{i:012x}"),
                now - 1000 + (i / 100) as i64,
            );
            if i % 1000 == 0 {
                flush_into(&mut l, now, &mut cluster);
            }
        }
        flush_into(&mut l, now, &mut cluster);
        // 8 segments: the first was replaced by the ninth, which holds 500.
        assert_eq!(l.len(&h()), MAX_ENTRIES - SEGMENT_ENTRIES + 500);
        assert_eq!(cluster.len(), SEGMENTS as usize);
        assert_eq!(cluster[&0].seq, Some(SEGMENTS));
        for seg in cluster.values() {
            assert!(seg.text.len() < 100 * 1024, "{} bytes", seg.text.len());
        }
        let mut back = Ledger::default();
        back.load(&h(), &cluster.values().cloned().collect::<Vec<_>>());
        let newest = format!("bench-go-{:012x}", MAX_ENTRIES + 499);
        assert!(back.contains(&h(), &newest));
        assert!(!back.contains(&h(), "bench-go-000000000000"));
        let oldest_kept = format!("bench-go-{SEGMENT_ENTRIES:012x}");
        assert!(back.contains(&h(), &oldest_kept));
        // The next launch goes on in the newest segment (slot 0), where it left off.
        back.record(&h(), "after-restart", now);
        let c = back.take_changes(now);
        assert_eq!(c[0].1.write.len(), 1);
        assert_eq!(c[0].1.write[0].slot, 0);
        assert_eq!(c[0].1.write[0].text.lines().count(), 501);
    }

    #[test]
    fn segments_older_than_the_horizon_go_once_the_newest_are_kept() {
        let now = 1_000_000_000;
        let old = now - HORIZON_SECS - 10;
        let mut l = loaded();
        let mut cluster = BTreeMap::new();
        // Three old segments, then the newest 2,048 + 1 recent names in two more.
        for i in 0..(3 * SEGMENT_ENTRIES) {
            l.record(&h(), &format!("old-{i:06}"), old);
        }
        let c = flush_into(&mut l, now, &mut cluster);
        // The two oldest are dropped (never written): the third keeps the newest 2,048.
        assert_eq!(c.delete, vec![0, 1]);
        assert_eq!(c.write.len(), 1);
        assert_eq!(cluster.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(l.len(&h()), KEEP_NEWEST);
        for i in 0..=KEEP_NEWEST {
            l.record(&h(), &format!("new-{i:06}"), now - 5);
        }
        let c = flush_into(&mut l, now, &mut cluster);
        assert_eq!(c.delete, vec![2]);
        assert_eq!(l.len(&h()), KEEP_NEWEST + 1);
        assert!(!l.contains(&h(), "old-000000"));
        assert_eq!(cluster.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        // Young names stay: a ledger of recent launches keeps up to its bound.
        let mut young = loaded();
        for i in 0..(KEEP_NEWEST * 3) {
            young.record(&h(), &format!("y-{i}"), now - 1);
        }
        assert!(young.take_changes(now)[0].1.delete.is_empty());
        assert_eq!(young.len(&h()), KEEP_NEWEST * 3);
    }

    #[test]
    fn a_ledger_written_before_segments_is_rebuilt_newest_first() {
        let now = 1_000_000_000;
        let text: String = (0..(MAX_ENTRIES + 100))
            .map(|i| format!("old-{i:06} {}\n", now - 100_000 + i as i64))
            .collect();
        // The same name in two old ConfigMaps is rebuilt once.
        let dup = StoredSegment {
            slot: 3,
            seq: None,
            text: format!("old-{:06} {now}\n", MAX_ENTRIES + 99),
        };
        let mut l = Ledger::default();
        l.record(&h(), "launched-before-the-read", now);
        assert!(
            l.take_changes(now).is_empty(),
            "nothing is written before the read"
        );
        assert_eq!(l.unloaded().len(), 1);
        l.load(
            &h(),
            &[
                StoredSegment {
                    slot: 0,
                    seq: None,
                    text,
                },
                dup,
            ],
        );
        // Rebuilt full (each name once); the launch recorded before the read starts a ninth
        // segment in the oldest's place.
        assert_eq!(l.len(&h()), MAX_ENTRIES - SEGMENT_ENTRIES + 1);
        assert!(l.unloaded().is_empty());
        assert!(l.contains(&h(), "launched-before-the-read"));
        assert!(!l.contains(&h(), "old-000000"), "beyond the newest 16,384");
        assert!(l.contains(&h(), &format!("old-{:06}", MAX_ENTRIES + 99)));
        let c = l.take_changes(now);
        let written = &c[0].1.write;
        assert_eq!(written.len(), SEGMENTS as usize, "rewritten in segments");
        assert!(
            written
                .iter()
                .all(|w| w.text.lines().count() <= SEGMENT_ENTRIES)
        );
        assert!(!l.is_recorded(&h(), "old-016000"), "not written yet");
        l.finished(&c[0].0, &c[0].1, None);
        assert!(!l.is_recorded(&h(), "nothing"));
        assert!(l.is_recorded(&h(), "old-016000"));
        // A second read, once loaded, changes nothing: this process writes the ledger.
        l.load(&h(), &[]);
        assert!(l.contains(&h(), "old-016000"));
    }

    #[test]
    fn names_count_as_recorded_only_once_their_segment_is_written() {
        let now = 1_000_000_000;
        let mut l = loaded();
        for i in 0..(SEGMENT_ENTRIES + 1) {
            l.record(&h(), &format!("job-{i:05}"), now);
        }
        let c = l.take_changes(now);
        let (k, changes) = &c[0];
        assert_eq!(changes.write.len(), 2);
        assert!(
            !l.is_recorded(&h(), "job-00000"),
            "in flight is not written"
        );
        // The first segment was written, then the API server refused the second.
        let left = LedgerChanges {
            write: changes.write[1..].to_vec(),
            delete: vec![5],
        };
        l.finished(k, changes, Some(&left));
        assert!(l.is_recorded(&h(), "job-00000"));
        assert!(!l.is_recorded(&h(), &format!("job-{SEGMENT_ENTRIES:05}")));
        // A name added while the write was in flight keeps its segment pending.
        l.record(&h(), "late", now);
        let again = l.take_changes(now);
        assert_eq!(again[0].1.write.len(), 1);
        assert_eq!(again[0].1.write[0].seq, Some(1));
        assert_eq!(again[0].1.write[0].text.lines().count(), 2);
        assert_eq!(
            again[0].1.delete,
            vec![5],
            "the delete not made is made again"
        );
        l.finished(k, &again[0].1, None);
        assert!(l.is_recorded(&h(), "late"));
        assert!(l.take_changes(now).is_empty());
    }
}
