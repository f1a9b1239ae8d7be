//! The membership record, sharded so that it holds Serf's own pool sizes (tens of thousands
//! of members) and each write carries only the members that changed.
//!
//! Layout, in the state namespace:
//! - `<prefix>-membership` (the header): key `record.json` with the format, the number of
//!   shards, the Lamport epoch and the user-event clock;
//! - `<prefix>-membership-00` … `-63` (the shards): one key per member, the member's record
//!   as JSON (name, status, tags, version, address, port, since). A member's shard is a
//!   stable hash of its name; a shard exists once it holds a member.
//!
//! A write is one JSON merge patch per shard touched, naming only the changed members' keys
//! (a shard that does not exist yet is created with them), then the header, with a leader's
//! first change and when the clocks move. Shards are read even when the header is missing. A record of 50,000 members is some 64 objects of about 120 KiB each, far
//! inside the API server's 1 MiB limit; one member's change writes about 200 bytes.
//!
//! Earlier versions kept every member in the header under `membership.json`: such a record
//! is read as it is and, on the first write, moved into the shards (the header is rewritten
//! without it once every shard is written).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use crate::engine::{MemberRecord, Membership};
use crate::error::{Error, kube_call};

/// Shards of the record.
pub const SHARDS: u32 = 64;
/// The header's key.
pub const HEADER_KEY: &str = "record.json";
/// The key that held the whole record before it was sharded.
pub const LEGACY_KEY: &str = "membership.json";
/// Label on the header and the shards: the header's name.
pub const LABEL_RECORD: &str = "serf.operator.io/membership-record";
/// The record's format.
pub const FORMAT: u32 = 2;
/// The most shard reads in flight at once.
const READ_CONCURRENCY: usize = 8;

/// The shard `name` lives in: FNV-1a of the name (stable across versions and platforms).
pub fn shard_of(name: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(SHARDS)) as u32
}

/// The ConfigMap of shard `shard`.
pub fn shard_name(shard: u32) -> String {
    format!("{}-{shard:02}", crate::objects::membership())
}

/// The ConfigMap key of member `name`: the name itself when it is a valid key (letters,
/// digits, `-`, `_`, `.`; at most 200 characters; not starting with `_`), otherwise `_`
/// and a SHA-256 prefix of it. The value always holds the name.
pub fn key_of(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        return name.to_string();
    }
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("_{hex}")
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    shards: u32,
    #[serde(default)]
    epoch: u64,
    #[serde(default, rename = "eventClock")]
    event_clock: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    name: String,
    #[serde(flatten)]
    record: MemberRecord,
}

/// The changes not yet written, shared by the dispatcher (which adds to them) and the state
/// writer (which takes them).
pub type SharedRecord = std::sync::Arc<std::sync::Mutex<RecordChanges>>;

/// What changed in the record since it was last written.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RecordChanges {
    /// Members whose record changed, newest state.
    pub members: BTreeMap<String, MemberRecord>,
    /// The clocks (epoch, user-event clock), when they moved.
    pub header: Option<(u64, u64)>,
    /// The header still holds the unsharded record: rewrite it once the shards are written.
    pub legacy: bool,
    /// Shards the last read found absent: created at once rather than patched first (a hint;
    /// a shard that exists after all is patched).
    pub absent: BTreeSet<u32>,
}

impl RecordChanges {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.header.is_none() && !self.legacy
    }

    /// Every member of `m` and its clocks: a record to write whole (moving an unsharded
    /// record into shards).
    pub fn whole(m: &Membership) -> RecordChanges {
        RecordChanges {
            members: m.members.clone(),
            header: Some((m.epoch, m.event_clock)),
            legacy: true,
            absent: BTreeSet::new(),
        }
    }

    /// Adds newer changes.
    pub fn extend(&mut self, newer: RecordChanges) {
        self.members.extend(newer.members);
        if newer.header.is_some() {
            self.header = newer.header;
        }
        self.legacy |= newer.legacy;
        self.absent.extend(newer.absent);
    }

    /// Puts back `older` changes that could not be written, under anything newer.
    pub fn restore(&mut self, older: RecordChanges) {
        for (k, v) in older.members {
            self.members.entry(k).or_insert(v);
        }
        if self.header.is_none() {
            self.header = older.header;
        }
        self.legacy |= older.legacy;
        self.absent.extend(older.absent);
    }

    /// The changed members' names by shard.
    fn by_shard(&self) -> BTreeMap<u32, Vec<&String>> {
        let mut out: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
        for name in self.members.keys() {
            out.entry(shard_of(name)).or_default().push(name);
        }
        out
    }

    /// One shard's entries: key → the member's JSON (serialized shard by shard, so that a
    /// write of the whole record never holds it all as text).
    fn entries(&self, names: &[&String]) -> BTreeMap<String, String> {
        names
            .iter()
            .filter_map(|name| {
                let record = self.members.get(*name)?;
                // A record of strings and numbers always serializes.
                let text = serde_json::to_string(&StoredRef { name, record }).ok()?;
                Some((key_of(name), text))
            })
            .collect()
    }
}

#[derive(Serialize)]
struct StoredRef<'a> {
    name: &'a str,
    #[serde(flatten)]
    record: &'a MemberRecord,
}

/// What one write sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// API calls made.
    pub calls: u64,
    /// Request body bytes sent.
    pub bytes: u64,
}

/// The record as read back.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The membership.
    pub membership: Membership,
    /// It was stored unsharded: write it whole ([`RecordChanges::whole`]).
    pub legacy: bool,
    /// Entries that could not be read (named in the log), skipped.
    pub skipped: usize,
    /// The shards that do not exist.
    pub absent: BTreeSet<u32>,
}

/// Reads the record: the header, then every shard.
///
/// # Errors
/// Any API error but 404 (no record: empty), a call that does not answer within `timeout`,
/// or a header that does not decode. A member entry that does not decode is logged, named
/// by shard and key, and skipped.
pub async fn read(client: &Client, namespace: &str, timeout: Duration) -> Result<Loaded, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let name = crate::objects::membership();
    let header_cm = kube_call("read the membership record", timeout, api.get_opt(&name)).await?;
    let mut data = header_cm.and_then(|cm| cm.data).unwrap_or_default();
    let header = match data.remove(HEADER_KEY) {
        Some(text) => Some(
            serde_json::from_str::<Header>(&text).map_err(|e| Error::Corrupt {
                what: format!("ConfigMap {name} key {HEADER_KEY}"),
                message: e.to_string(),
            })?,
        ),
        None => None,
    };
    let header = match (header, data.remove(LEGACY_KEY)) {
        (Some(h), _) => h,
        // A record from before the shards.
        (None, Some(legacy)) => return read_legacy(&name, legacy),
        // No header: its clocks never moved (or it was lost); the shards are read all the
        // same, so that members written before their header are not taken for new.
        (None, None) => Header {
            format: FORMAT,
            shards: SHARDS,
            epoch: 0,
            event_clock: 0,
        },
    };
    if header.format != FORMAT {
        return Err(Error::Corrupt {
            what: format!("ConfigMap {name}"),
            message: format!(
                "membership record format {} (this version reads {FORMAT})",
                header.format
            ),
        });
    }
    let shards: Vec<Result<(u32, Option<ConfigMap>), Error>> =
        futures::stream::iter(0..header.shards)
            .map(|s| {
                let api = api.clone();
                async move {
                    let n = shard_name(s);
                    kube_call("read a membership record shard", timeout, api.get_opt(&n))
                        .await
                        .map(|cm| (s, cm))
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect()
            .await;
    let mut membership = Membership {
        members: BTreeMap::new(),
        epoch: header.epoch,
        event_clock: header.event_clock,
        ..Membership::default()
    };
    let mut skipped = 0;
    let mut absent = BTreeSet::new();
    for shard in shards {
        let (s, cm) = shard?;
        if cm.is_none() {
            absent.insert(s);
        }
        for (key, text) in cm.and_then(|cm| cm.data).unwrap_or_default() {
            match serde_json::from_str::<Stored>(&text) {
                Ok(st) => {
                    // A name in two shards (a layout change cut short): the newer state.
                    let newer = membership
                        .members
                        .get(&st.name)
                        .is_none_or(|r| r.version < st.record.version);
                    if newer {
                        membership.members.insert(st.name, st.record);
                    }
                }
                Err(e) => {
                    skipped += 1;
                    tracing::error!(shard = %shard_name(s), %key, error = %e, "a membership record entry cannot be read; skipped (the member counts as unknown)");
                }
            }
        }
    }
    membership.intern_all();
    Ok(Loaded {
        membership,
        legacy: false,
        skipped,
        absent,
    })
}

/// A record of an earlier version: every member under one key of the header.
fn read_legacy(name: &str, text: String) -> Result<Loaded, Error> {
    let mut membership: Membership = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        what: format!("ConfigMap {name} key {LEGACY_KEY}"),
        message: e.to_string(),
    })?;
    membership.intern_all();
    tracing::info!(
        members = membership.members.len(),
        "membership record of an earlier version: it moves into shards on the next write"
    );
    Ok(Loaded {
        membership,
        legacy: true,
        skipped: 0,
        absent: (0..SHARDS).collect(),
    })
}

/// Reads the record to act from; one of an earlier version is queued in `pending` to be
/// written whole into shards.
///
/// # Errors
/// As [`read`].
pub async fn load(
    client: &Client,
    namespace: &str,
    timeout: Duration,
    pending: &SharedRecord,
) -> Result<Membership, Error> {
    // The header and the shards, each call within `timeout`; the whole within a minute.
    let loaded = crate::error::timed(
        "read the membership record",
        timeout.max(Duration::from_secs(60)),
        read(client, namespace, timeout),
    )
    .await?;
    if let Ok(mut p) = pending.lock() {
        if loaded.legacy {
            p.restore(RecordChanges::whole(&loaded.membership));
        }
        p.absent = loaded.absent.clone();
    }
    Ok(loaded.membership)
}

/// Writes `changes`: each shard touched by one merge patch of its changed keys, then the
/// header. Returns the shards still known absent (not created by this write). Stops at the
/// first error and returns, with it, what is left to write.
///
/// # Errors
/// The first API error or timeout, and the changes not written.
pub async fn write(
    client: &Client,
    namespace: &str,
    changes: RecordChanges,
    timeout: Duration,
) -> (WriteStats, Result<BTreeSet<u32>, (Error, RecordChanges)>) {
    let mut stats = WriteStats::default();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let by_shard = changes.by_shard();
    let mut written: BTreeSet<u32> = BTreeSet::new();
    for (shard, names) in &by_shard {
        let name = shard_name(*shard);
        let entries = changes.entries(names);
        let absent = changes.absent.contains(shard);
        let r = write_shard(
            client, &api, namespace, &name, &entries, absent, timeout, &mut stats,
        )
        .await;
        if let Err(e) = r {
            let left = RecordChanges {
                absent: changes.absent.difference(&written).copied().collect(),
                header: changes.header,
                legacy: changes.legacy,
                members: changes
                    .members
                    .into_iter()
                    .filter(|(n, _)| !written.contains(&shard_of(n)))
                    .collect(),
            };
            return (stats, Err((e, left)));
        }
        written.insert(*shard);
    }
    if changes.header.is_some() || changes.legacy {
        let (epoch, event_clock) = changes.header.unwrap_or_default();
        let header = Header {
            format: FORMAT,
            shards: SHARDS,
            epoch,
            event_clock,
        };
        let text = serde_json::to_string(&header).unwrap_or_default();
        let mut meta = json!({"name": crate::objects::membership(), "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": crate::jobs::MANAGED_BY,
                       LABEL_RECORD: crate::objects::membership()}});
        crate::objects::add_owner(&mut meta);
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                        "data": {HEADER_KEY: text}});
        stats.calls += 1;
        stats.bytes += cm.to_string().len() as u64;
        let r = kube_call(
            "write the membership record's header",
            timeout,
            crate::ledger::apply_unread(
                client,
                api.resource_url(),
                &crate::objects::membership(),
                None,
                cm,
            ),
        )
        .await;
        if let Err(e) = r {
            let left = RecordChanges {
                members: BTreeMap::new(),
                header: changes.header,
                legacy: changes.legacy,
                absent: changes.absent.difference(&written).copied().collect(),
            };
            return (stats, Err((e, left)));
        }
    }
    (
        stats,
        Ok(changes.absent.difference(&written).copied().collect()),
    )
}

/// Writes one shard's entries: a merge patch of these keys, or, for a shard not there (known
/// `absent`, or a patch answered 404), a create with them (a create answered 409: patched).
#[allow(clippy::too_many_arguments)]
async fn write_shard(
    client: &Client,
    api: &Api<ConfigMap>,
    namespace: &str,
    name: &str,
    entries: &BTreeMap<String, String>,
    absent: bool,
    timeout: Duration,
    stats: &mut WriteStats,
) -> Result<(), Error> {
    let send = |req: http::Request<Vec<u8>>, stats: &mut WriteStats| {
        stats.calls += 1;
        stats.bytes += req.body().len() as u64;
        tokio::time::timeout(timeout, client.request_text(req))
    };
    let fail = |e: kube::Error| Error::kube(format!("write {name}"), e);
    let late = || Error::KubeTimeout {
        what: format!("write {name}"),
        after: timeout,
    };
    let patch = || {
        kube::core::Request::new(api.resource_url())
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "data": entries })),
            )
            .map_err(|e| fail(kube::Error::BuildRequest(e)))
    };
    if !absent {
        match send(patch()?, stats).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => return Err(late()),
        }
    }
    let mut meta = json!({"name": name, "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": crate::jobs::MANAGED_BY,
                   LABEL_RECORD: crate::objects::membership()}});
    crate::objects::add_owner(&mut meta);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": entries});
    let body = serde_json::to_vec(&cm).map_err(|e| Error::Corrupt {
        what: format!("ConfigMap {name}"),
        message: e.to_string(),
    })?;
    let create = kube::core::Request::new(api.resource_url())
        .create(&kube::api::PostParams::default(), body)
        .map_err(|e| fail(kube::Error::BuildRequest(e)))?;
    match send(create, stats).await {
        Ok(Ok(_)) => Ok(()),
        // Created meanwhile (the hint was stale): patched after all.
        Ok(Err(kube::Error::Api(s))) if s.code == 409 => match send(patch()?, stats).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(late()),
        },
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(late()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: &str, version: u64) -> MemberRecord {
        MemberRecord {
            status: status.into(),
            tags: std::sync::Arc::new([("role".to_string(), "db".to_string())].into()),
            version,
            addr: Some("10.0.0.1".parse().unwrap()),
            port: 7946,
            since: 1,
        }
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("node-1"), shard_of("node-1"));
        let mut counts = vec![0u32; SHARDS as usize];
        for i in 0..50_000 {
            counts[shard_of(&format!("node-{i}")) as usize] += 1;
        }
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        // 781 a shard on average: none is far off.
        assert!(min > 650 && max < 920, "{min}..{max}");
        // Fixed values: a change of the hash would orphan every stored record.
        assert_eq!(shard_of(""), (0xcbf2_9ce4_8422_2325u64 % 64) as u32);
        assert_eq!(shard_name(3), "serf-operator-membership-03");
    }

    #[test]
    fn keys_are_valid_configmap_keys_and_distinct() {
        let valid = |k: &str| {
            !k.is_empty()
                && k.len() <= 253
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && k != "."
                && k != ".."
        };
        let names = [
            "db-1",
            "web.eu-1",
            "with space",
            "ünïcode",
            "_x",
            ".",
            "..",
            "",
            &"n".repeat(300),
            "a/b",
        ];
        let keys: Vec<String> = names.iter().map(|n| key_of(n)).collect();
        for (n, k) in names.iter().zip(&keys) {
            assert!(valid(k), "{n:?} → {k:?}");
        }
        assert_eq!(keys[0], "db-1");
        assert_eq!(keys[1], "web.eu-1");
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }

    #[test]
    fn changes_restore_under_newer_ones() {
        let mut now = RecordChanges::default();
        now.members.insert("a".into(), rec("failed", 2));
        let mut older = RecordChanges::default();
        older.members.insert("a".into(), rec("alive", 1));
        older.members.insert("b".into(), rec("alive", 1));
        older.header = Some((0, 7));
        now.restore(older);
        assert_eq!(now.members["a"].status, "failed");
        assert_eq!(now.members["b"].status, "alive");
        assert_eq!(now.header, Some((0, 7)));
    }

    #[test]
    fn one_change_is_one_shard_of_one_key() {
        let mut c = RecordChanges::default();
        c.members.insert("db-1".into(), rec("failed", 3));
        let by = c.by_shard();
        assert_eq!(by.len(), 1);
        let (shard, names) = by.iter().next().unwrap();
        assert_eq!(*shard, shard_of("db-1"));
        let entries = c.entries(names);
        let text = &entries["db-1"];
        let back: Stored = serde_json::from_str(text).unwrap();
        assert_eq!(back.name, "db-1");
        assert_eq!(back.record, rec("failed", 3));
        assert!(text.len() < 200, "{text}");
    }
}
