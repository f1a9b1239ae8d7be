//! The pure decision of a key rotation: given the keyring the Secret asks for, the state
//! recorded so far and what the cluster reports (`list-keys`, `members`), what comes next
//! and what to record before doing it. No I/O, no clock: the caller passes the time.
//!
//! The order is Serf's safe one: **install** each key of the Secret on every member, then
//! **use** the new primary once `list-keys` shows every alive member holds it, then
//! **remove** the keys the Secret no longer has, only after a `use-key` of the primary was
//! answered by every alive member (so the key removed is in use nowhere). Every step is
//! idempotent in Serf, so a step recorded and then interrupted is simply done again.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Key, Keyring, fingerprint_of};

/// What the cluster reports: `list-keys` (asked of every alive member) and `members`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Each installed key (base64) and how many members hold it.
    pub keys: BTreeMap<String, i64>,
    /// Alive members the agent counted when it asked.
    pub num_nodes: i64,
    /// Members that answered.
    pub num_resp: i64,
    /// Members that answered with an error.
    pub num_err: i64,
    /// The errors, by member.
    pub messages: BTreeMap<String, String>,
    /// Members alive in the agent's view.
    pub alive: BTreeSet<String>,
    /// Members failed in the agent's view (they cannot be asked).
    pub failed: BTreeSet<String>,
}

impl Observed {
    /// Every member counted answered, none with an error.
    pub fn complete(&self) -> bool {
        self.num_err == 0 && self.num_resp == self.num_nodes && self.num_nodes > 0
    }

    /// How many members hold the key with this fingerprint.
    fn holding(&self, fp: &str) -> i64 {
        self.keys
            .iter()
            .filter(|(k, _)| fingerprint_of(k) == fp)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Members holding each key, by fingerprint, as `fp: n/total`.
    pub fn summary(&self) -> BTreeMap<String, String> {
        self.keys
            .iter()
            .map(|(k, n)| (fingerprint_of(k), format!("{n}/{}", self.num_nodes)))
            .collect()
    }
}

/// A step of a rotation, recorded before it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", content = "key", rename_all = "camelCase")]
pub enum Step {
    /// `install-key` of the key with this fingerprint.
    Install(String),
    /// `use-key` (make it the primary).
    Use(String),
    /// `remove-key`.
    Remove(String),
}

impl Step {
    /// `Install 1a2b…`, for status and Events.
    pub fn describe(&self) -> String {
        match self {
            Step::Install(k) => format!("Install {k}"),
            Step::Use(k) => format!("Use {k}"),
            Step::Remove(k) => format!("Remove {k}"),
        }
    }
}

/// The rotation under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// Counts rotations (one per target the Secret asked for).
    pub id: u64,
    /// The keyring it brings the cluster to ([`Keyring::target`]).
    pub target: String,
    /// The primary in use when it began, if known.
    #[serde(default)]
    pub from: Option<String>,
    /// When it began (RFC 3339).
    pub started: String,
    /// The step recorded last (done, or interrupted and done again on resume).
    #[serde(default)]
    pub step: Option<Step>,
    /// Keys removed so far (fingerprints).
    #[serde(default)]
    pub removed: Vec<String>,
    /// Members that were failed while it ran: they missed its steps.
    #[serde(default)]
    pub unreachable: BTreeSet<String>,
}

/// A rotation that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    /// The rotation's number.
    pub id: u64,
    /// Its target.
    pub target: String,
    /// The primary before it.
    #[serde(default)]
    pub from: Option<String>,
    /// `Succeeded`, or `Superseded` (the Secret changed again before it finished).
    pub result: String,
    /// When it began and ended (RFC 3339).
    pub started: String,
    /// When it ended.
    pub finished: String,
    /// Keys removed (fingerprints).
    #[serde(default)]
    pub removed: Vec<String>,
    /// Members failed while it ran: to rejoin they need the new keyring in their keyring file.
    #[serde(default)]
    pub unreachable: BTreeSet<String>,
}

/// What is recorded between steps and across restarts (fingerprints only, never a key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The primary every alive member was last confirmed to use (a `use-key` answered by
    /// all, or the only key installed).
    #[serde(default)]
    pub in_use: Option<String>,
    /// The rotation under way.
    #[serde(default)]
    pub rotation: Option<Rotation>,
    /// The last rotation that ended.
    #[serde(default)]
    pub last: Option<Finished>,
    /// How many rotations began (the next one's number is this plus one).
    #[serde(default)]
    pub rotations: u64,
    /// Alive members at the last complete check.
    #[serde(default)]
    pub members_alive: usize,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The cluster holds exactly the Secret's keyring with its primary in use.
    InSync,
    /// Nothing can be done safely now; why (shown in status). Checked again later.
    Wait(String),
    /// `install-key`.
    Install(Key),
    /// `use-key` of the Secret's primary.
    Use(Key),
    /// `use-key` of the primary (it must be answered by every alive member), then
    /// `remove-key` of this key (base64, as the cluster reported it).
    Remove {
        /// The primary, confirmed in use first.
        primary: Key,
        /// The key to remove.
        key: String,
    },
}

/// Something worth a Kubernetes Event and a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A warning (else normal).
    pub warning: bool,
    /// The Event's reason.
    pub reason: &'static str,
    /// The Event's message.
    pub message: String,
}

impl Note {
    fn normal(reason: &'static str, message: String) -> Note {
        Note {
            warning: false,
            reason,
            message,
        }
    }
    fn warning(reason: &'static str, message: String) -> Note {
        Note {
            warning: true,
            reason,
            message,
        }
    }
}

/// The decision: the record to write before acting (when it differs from the one read),
/// the action, and what happened worth telling.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The record to write before the action.
    pub record: Record,
    /// The action.
    pub action: Action,
    /// Events to publish once the record is written.
    pub notes: Vec<Note>,
    /// Rotations that ended with this decision (counted once, when the record is written).
    pub ended: Vec<Finished>,
}

/// What a failed member needs before it rejoins.
pub fn needs(desired: &Keyring, removed: &[String]) -> String {
    let mut s = format!(
        "the primary key {} in its keyring (keyring_file) before it rejoins",
        desired.primary.fingerprint()
    );
    if !removed.is_empty() {
        s.push_str(&format!("; keys removed meanwhile: {}", removed.join(", ")));
    }
    s
}

/// Decides the next step. `now` is the time to record (RFC 3339).
pub fn next(desired: &Keyring, record: &Record, obs: &Observed, now: &str) -> Plan {
    let mut rec = record.clone();
    let mut notes = Vec::new();
    let mut ended = Vec::new();
    let primary = desired.primary.fingerprint();
    let target = desired.target();

    // An agent that sees nobody else (not joined yet, or joined with keys the cluster lacks)
    // would report a keyring of one: acting on it would "rotate" a cluster of one.
    if obs.alive.len() <= 1 && record.members_alive > 1 {
        return Plan {
            record: rec,
            action: Action::Wait(format!(
                "the agent sees no other alive member ({} were alive at the last check): it may not have joined, or holds none of the cluster's keys",
                record.members_alive
            )),
            notes,
            ended,
        };
    }
    if !obs.complete() {
        let mut why = format!(
            "{} of {} alive members answered list-keys",
            obs.num_resp - obs.num_err,
            obs.num_nodes
        );
        if !obs.messages.is_empty() {
            let errs: Vec<String> = obs
                .messages
                .iter()
                .map(|(m, e)| format!("{m}: {e}"))
                .collect();
            why.push_str(&format!(" ({})", errs.join("; ")));
        } else {
            why.push_str("; waiting until the others answer or are marked failed");
        }
        return Plan {
            record: rec,
            action: Action::Wait(why),
            notes,
            ended,
        };
    }
    rec.members_alive = obs.alive.len().max(1);

    // The only key installed on every member is necessarily everyone's primary.
    if obs.keys.len() == 1
        && let Some((k, n)) = obs.keys.iter().next()
        && *n == obs.num_nodes
    {
        rec.in_use = Some(fingerprint_of(k));
    }

    // A rotation towards another keyring than the Secret's is superseded.
    if let Some(r) = rec.rotation.take_if(|r| r.target != target) {
        notes.push(Note::warning(
            "KeyRotationSuperseded",
            format!(
                "rotation {} to {} superseded: the Secret now asks for {target}",
                r.id, r.target
            ),
        ));
        let f = finish(r, "Superseded", now, &obs.failed);
        ended.push(f.clone());
        rec.last = Some(f);
    }

    let missing: Vec<&Key> = desired
        .all()
        .filter(|k| obs.holding(&k.fingerprint()) < obs.num_nodes)
        .collect();
    let extra: Vec<&String> = obs.keys.keys().filter(|k| !desired.contains(k)).collect();
    let in_sync = missing.is_empty() && extra.is_empty() && rec.in_use.as_deref() == Some(&primary);

    if in_sync {
        if let Some(r) = rec.rotation.take() {
            let f = finish(r, "Succeeded", now, &obs.failed);
            let mut msg = format!(
                "rotation {} finished: every alive member ({}) holds the keyring {} with primary {}",
                f.id, obs.num_nodes, f.target, primary
            );
            if !f.unreachable.is_empty() {
                msg.push_str(&format!(
                    "; unreachable members {} need {}",
                    join(&f.unreachable),
                    needs(desired, &f.removed)
                ));
            }
            notes.push(Note::normal("KeyRotationFinished", msg));
            ended.push(f.clone());
            rec.last = Some(f);
        }
        return Plan {
            record: rec,
            action: Action::InSync,
            notes,
            ended,
        };
    }

    let rotation = rec.rotation.get_or_insert_with(|| {
        let r = Rotation {
            id: record.rotations + 1,
            target: target.clone(),
            from: record.in_use.clone(),
            started: now.to_string(),
            step: None,
            removed: Vec::new(),
            unreachable: BTreeSet::new(),
        };
        notes.push(Note::normal(
            "KeyRotationStarted",
            format!(
                "rotation {} to the Secret's keyring {target} (primary {primary}) began, from primary {}",
                r.id,
                r.from.as_deref().unwrap_or("unknown")
            ),
        ));
        r
    });
    rec.rotations = rec.rotations.max(rotation.id);
    let newly: Vec<String> = obs
        .failed
        .iter()
        .filter(|m| !rotation.unreachable.contains(*m))
        .cloned()
        .collect();
    if !newly.is_empty() {
        rotation.unreachable.extend(newly.iter().cloned());
        notes.push(Note::warning(
            "KeyRotationMembersUnreachable",
            format!(
                "failed members miss rotation {}: {}; each needs {}",
                rotation.id,
                newly.join(", "),
                needs(desired, &rotation.removed)
            ),
        ));
    }

    let (step, action) = if let Some(k) = missing.first() {
        (
            Step::Install(k.fingerprint()),
            Action::Install((*k).clone()),
        )
    } else if rec.in_use.as_deref() != Some(&primary) {
        (
            Step::Use(primary.clone()),
            Action::Use(desired.primary.clone()),
        )
    } else {
        // Not in sync, nothing missing, primary in use: a key to remove.
        let key = extra.first().map(|k| (*k).clone()).unwrap_or_default();
        (
            Step::Remove(fingerprint_of(&key)),
            Action::Remove {
                primary: desired.primary.clone(),
                key,
            },
        )
    };
    if let Some(r) = rec.rotation.as_mut() {
        r.step = Some(step);
    }
    Plan {
        record: rec,
        action,
        notes,
        ended,
    }
}

/// After a `use-key` of `primary`: answered by every alive member (`all`) makes it the key in
/// use; otherwise which key is in use is no longer known.
pub fn used(record: &mut Record, primary: &str, all: bool) {
    record.in_use = all.then(|| primary.to_string());
}

/// After a `remove-key` of `key` answered by every alive member.
pub fn removed(record: &mut Record, key: &str) {
    if let Some(r) = record.rotation.as_mut() {
        let fp = fingerprint_of(key);
        if !r.removed.contains(&fp) {
            r.removed.push(fp);
        }
    }
}

fn finish(r: Rotation, result: &str, now: &str, failed: &BTreeSet<String>) -> Finished {
    let mut unreachable = r.unreachable;
    unreachable.extend(failed.iter().cloned());
    Finished {
        id: r.id,
        target: r.target,
        from: r.from,
        result: result.to_string(),
        started: r.started,
        finished: now.to_string(),
        removed: r.removed,
        unreachable,
    }
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn key(n: u8) -> Key {
        Key::parse(&base64::engine::general_purpose::STANDARD.encode([n; 32])).unwrap()
    }

    fn ring(primary: u8, others: &[u8]) -> Keyring {
        Keyring {
            primary: key(primary),
            others: others.iter().map(|n| key(*n)).collect(),
        }
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// `n` alive members, keys held by how many.
    fn obs(n: i64, keys: &[(u8, i64)]) -> Observed {
        Observed {
            keys: keys
                .iter()
                .map(|(k, c)| (key(*k).expose().to_string(), *c))
                .collect(),
            num_nodes: n,
            num_resp: n,
            num_err: 0,
            messages: BTreeMap::new(),
            alive: (0..n).map(|i| format!("m{i}")).collect(),
            failed: BTreeSet::new(),
        }
    }

    const NOW: &str = "2026-12-03T23:00:00Z";

    /// Plays a rotation against a model cluster of `n` members whose keyrings follow the
    /// actions, the way Serf applies them; returns the actions taken.
    fn play(
        desired: &Keyring,
        rec: &mut Record,
        held: &mut BTreeMap<String, i64>,
        n: i64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for _ in 0..20 {
            let o = Observed {
                keys: held.clone(),
                ..obs(n, &[])
            };
            let p = next(desired, rec, &o, NOW);
            *rec = p.record;
            actions.push(p.action.clone());
            match p.action {
                Action::InSync | Action::Wait(_) => return actions,
                Action::Install(k) => {
                    held.insert(k.expose().to_string(), n);
                }
                Action::Use(k) => {
                    assert_eq!(
                        held.get(k.expose()),
                        Some(&n),
                        "use of a key some member lacks"
                    );
                    used(rec, &k.fingerprint(), true);
                }
                Action::Remove { primary, key } => {
                    assert_eq!(rec.in_use, Some(primary.fingerprint()));
                    assert_ne!(
                        fingerprint_of(&key),
                        primary.fingerprint(),
                        "removing the key in use"
                    );
                    held.remove(&key);
                    removed(rec, &key);
                }
            }
        }
        panic!("no end: {actions:?}");
    }

    #[test]
    fn a_new_primary_is_installed_then_used_then_the_old_one_removed() {
        let mut rec = Record::default();
        let mut held: BTreeMap<String, i64> = [(key(1).expose().to_string(), 4)].into();
        // First look: the one key in the cluster is the Secret's.
        assert_eq!(
            play(&ring(1, &[]), &mut rec, &mut held, 4),
            [Action::InSync]
        );
        assert_eq!(rec.in_use, Some(key(1).fingerprint()));
        assert_eq!(rec.rotation, None);
        assert_eq!(rec.last, None, "no rotation for a cluster already in sync");

        let actions = play(&ring(2, &[]), &mut rec, &mut held, 4);
        assert_eq!(
            actions,
            [
                Action::Install(key(2)),
                Action::Use(key(2)),
                Action::Remove {
                    primary: key(2),
                    key: key(1).expose().to_string()
                },
                Action::InSync
            ]
        );
        let last = rec.last.clone().unwrap();
        assert_eq!((last.id, last.result.as_str()), (1, "Succeeded"));
        assert_eq!(last.from, Some(key(1).fingerprint()));
        assert_eq!(last.removed, [key(1).fingerprint()]);
        assert_eq!(rec.rotation, None);
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn other_keys_of_the_secret_stay_installed() {
        let mut rec = Record::default();
        let mut held: BTreeMap<String, i64> = [(key(1).expose().to_string(), 3)].into();
        play(&ring(1, &[]), &mut rec, &mut held, 3);
        // Stage a key first (installed, not used), then make it the primary keeping the old.
        let a = play(&ring(1, &[2]), &mut rec, &mut held, 3);
        assert_eq!(a, [Action::Install(key(2)), Action::InSync]);
        let a = play(&ring(2, &[1]), &mut rec, &mut held, 3);
        assert_eq!(a, [Action::Use(key(2)), Action::InSync]);
        assert_eq!(held.len(), 2);
        assert_eq!(rec.last.as_ref().map(|l| l.id), Some(2));
        // Dropping the old key from the Secret removes it.
        let a = play(&ring(2, &[]), &mut rec, &mut held, 3);
        assert_eq!(a.len(), 2);
        assert!(matches!(&a[0], Action::Remove { key: k, .. } if *k == key(1).expose()));
        assert_eq!(rec.rotations, 3);
    }

    #[test]
    fn never_uses_a_key_some_alive_member_lacks() {
        let rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 4,
            ..Record::default()
        };
        let p = next(&ring(2, &[]), &rec, &obs(4, &[(1, 4), (2, 3)]), NOW);
        assert_eq!(
            p.action,
            Action::Install(key(2)),
            "installed again, not used"
        );
        assert_eq!(
            p.record.rotation.as_ref().unwrap().step,
            Some(Step::Install(key(2).fingerprint()))
        );
    }

    #[test]
    fn an_incomplete_answer_waits_and_changes_nothing() {
        let rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 4,
            ..Record::default()
        };
        let mut o = obs(4, &[(1, 3), (2, 3)]);
        o.num_resp = 3;
        let p = next(&ring(2, &[]), &rec, &o, NOW);
        assert!(
            matches!(&p.action, Action::Wait(w) if w.contains("3 of 4")),
            "{:?}",
            p.action
        );
        assert_eq!(p.record, rec);
        let mut o = obs(4, &[(1, 4)]);
        o.num_err = 4;
        o.messages.insert(
            "m0".into(),
            "Keyring is empty (encryption not enabled)".into(),
        );
        let p = next(&ring(2, &[]), &rec, &o, NOW);
        assert!(matches!(&p.action, Action::Wait(w) if w.contains("encryption not enabled")));
    }

    #[test]
    fn a_lone_agent_does_not_rotate_a_cluster_of_one() {
        let rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 4,
            ..Record::default()
        };
        let p = next(&ring(2, &[]), &rec, &obs(1, &[(2, 1)]), NOW);
        assert!(matches!(p.action, Action::Wait(_)));
        assert_eq!(p.record, rec);
    }

    #[test]
    fn the_key_in_use_is_never_removed_before_the_primary_is_confirmed() {
        // Both keys everywhere, but which one is primary is not known (no record): use first.
        let rec = Record::default();
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3), (2, 3)]), NOW);
        assert_eq!(p.action, Action::Use(key(2)));
        // A use-key not answered by all leaves the primary unknown: use again, not remove.
        let mut rec = p.record;
        used(&mut rec, &key(2).fingerprint(), false);
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3), (2, 3)]), NOW);
        assert_eq!(p.action, Action::Use(key(2)));
    }

    #[test]
    fn a_resumed_rotation_keeps_its_number_and_counts_once() {
        let mut rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 3,
            ..Record::default()
        };
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3)]), NOW);
        assert_eq!(p.notes[0].reason, "KeyRotationStarted");
        rec = p.record; // recorded, then the operator stopped before installing
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3)]), NOW);
        assert_eq!(p.action, Action::Install(key(2)), "the recorded step again");
        assert!(p.notes.is_empty(), "no second start");
        assert_eq!(p.record.rotation.as_ref().unwrap().id, 1);
        // Installed and used by the run before; the remove was recorded but not done.
        rec = p.record;
        used(&mut rec, &key(2).fingerprint(), true);
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3), (2, 3)]), NOW);
        assert!(matches!(p.action, Action::Remove { .. }));
        rec = p.record;
        // Done by the run that stopped: the next one only finishes the record, once.
        let p = next(&ring(2, &[]), &rec, &obs(3, &[(2, 3)]), NOW);
        assert_eq!(p.action, Action::InSync);
        assert_eq!(p.ended.len(), 1);
        let again = next(&ring(2, &[]), &p.record, &obs(3, &[(2, 3)]), NOW);
        assert!(again.ended.is_empty() && again.notes.is_empty());
        assert_eq!(again.record, p.record, "nothing more to record");
    }

    #[test]
    fn failed_members_are_reported_with_what_they_need() {
        let rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 4,
            ..Record::default()
        };
        let mut o = obs(3, &[(1, 3), (2, 3)]);
        o.failed = names(&["m3"]);
        let p = next(&ring(2, &[]), &rec, &o, NOW);
        assert_eq!(p.action, Action::Use(key(2)));
        let n = p
            .notes
            .iter()
            .find(|n| n.reason == "KeyRotationMembersUnreachable")
            .unwrap();
        assert!(n.warning && n.message.contains("m3") && n.message.contains(&key(2).fingerprint()));
        assert_eq!(
            p.record.rotation.as_ref().unwrap().unreachable,
            names(&["m3"])
        );
        // Not reported twice.
        let p2 = next(&ring(2, &[]), &p.record, &o, NOW);
        assert!(p2.notes.is_empty());
    }

    #[test]
    fn a_new_secret_mid_rotation_supersedes_it() {
        let mut rec = Record {
            in_use: Some(key(1).fingerprint()),
            members_alive: 3,
            ..Record::default()
        };
        rec = next(&ring(2, &[]), &rec, &obs(3, &[(1, 3)]), NOW).record;
        let p = next(&ring(3, &[]), &rec, &obs(3, &[(1, 3), (2, 3)]), NOW);
        assert_eq!(p.ended.len(), 1);
        assert_eq!(p.ended[0].result, "Superseded");
        assert_eq!(p.record.rotation.as_ref().unwrap().id, 2);
        assert_eq!(p.action, Action::Install(key(3)));
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let mut rec = Record::default();
        rec = next(&ring(2, &[]), &rec, &obs(2, &[(1, 2)]), NOW).record;
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains("\"step\":{\"step\":\"install\""), "{text}");
        assert!(!text.contains(key(2).expose()), "no key in the record");
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), rec);
    }
}
