//! The RPC side of a key rotation: asks the cluster (`list-keys`, `members`), has
//! [`plan::next`] decide, records the decision (before acting, in a [`RecordStore`]), then
//! does the one step through the agent (`install-key`, `use-key`, `remove-key`). One
//! [`Rotator::step`] does one step; a new `Rotator` on the same store (an operator restart, a
//! new leader) carries on from what was recorded.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::plan::{self, Action, Finished, Note, Observed, Record};
use super::{Keyring, fingerprint_of};
use crate::error::Error;

/// Where the rotation's record (and the status shown to users) is kept. A write carries the
/// version read; a store refuses a write over a newer one (another replica wrote meanwhile).
pub trait RecordStore: Send + Sync {
    /// The record and its version (`None` when there is none yet).
    fn load(&self) -> impl Future<Output = Result<(Record, Option<String>), Error>> + Send;
    /// Writes the record and the status, if the stored version is still `version`; returns
    /// the new version.
    fn save(
        &self,
        record: &Record,
        status: &BTreeMap<String, String>,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;
}

/// A store in memory, for tests and local use: shared by clones (as a ConfigMap is by
/// operator runs).
#[derive(Clone, Default)]
pub struct MemoryStore(Arc<Mutex<Stored>>);

/// What a [`MemoryStore`] holds: the record, its version, the status.
type Stored = (Record, u64, BTreeMap<String, String>);

impl MemoryStore {
    /// The record stored now.
    pub fn record(&self) -> Record {
        self.0.lock().map(|g| g.0.clone()).unwrap_or_default()
    }
    /// The status stored now.
    pub fn status(&self) -> BTreeMap<String, String> {
        self.0.lock().map(|g| g.2.clone()).unwrap_or_default()
    }
}

impl RecordStore for MemoryStore {
    async fn load(&self) -> Result<(Record, Option<String>), Error> {
        let g = self
            .0
            .lock()
            .map_err(|_| Error::Invalid("store poisoned".into()))?;
        Ok((g.0.clone(), (g.1 > 0).then(|| g.1.to_string())))
    }
    async fn save(
        &self,
        record: &Record,
        status: &BTreeMap<String, String>,
        version: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let mut g = self
            .0
            .lock()
            .map_err(|_| Error::Invalid("store poisoned".into()))?;
        let now = (g.1 > 0).then(|| g.1.to_string());
        if version.is_some() && now.as_deref() != version {
            return Err(Error::Invalid(format!(
                "the record changed meanwhile (version {now:?}, read {version:?})"
            )));
        }
        g.0 = record.clone();
        g.1 += 1;
        g.2 = status.clone();
        Ok(Some(g.1.to_string()))
    }
}

/// The key rotation record in a ConfigMap the operator owns: `record.json` (the state, read
/// back) and the status for `kubectl get configmap NAME -o yaml` (`step`, `primary`, `keys`,
/// `lastRotation`, `updated`). Written by server-side apply carrying the resourceVersion read,
/// so a replica that lost the lease cannot write over the new leader's record.
#[derive(Clone)]
pub struct ConfigMapStore {
    client: kube::Client,
    namespace: String,
    name: String,
    timeout: std::time::Duration,
}

/// The record's entry in the ConfigMap.
pub const RECORD_ENTRY: &str = "record.json";

impl ConfigMapStore {
    /// The ConfigMap `name` in `namespace`; each call bounded by `timeout`.
    pub fn new(
        client: kube::Client,
        namespace: impl Into<String>,
        name: impl Into<String>,
        timeout: std::time::Duration,
    ) -> Self {
        ConfigMapStore {
            client,
            namespace: namespace.into(),
            name: name.into(),
            timeout,
        }
    }
}

impl RecordStore for ConfigMapStore {
    async fn load(&self) -> Result<(Record, Option<String>), Error> {
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let cm = crate::error::kube_call(
            "read the key rotation record",
            self.timeout,
            api.get_opt(&self.name),
        )
        .await?;
        let Some(cm) = cm else {
            return Ok((Record::default(), None));
        };
        let version = cm.metadata.resource_version.clone();
        let record = match cm.data.and_then(|mut d| d.remove(RECORD_ENTRY)) {
            Some(text) => serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                what: format!(
                    "ConfigMap {}/{} entry {RECORD_ENTRY}",
                    self.namespace, self.name
                ),
                message: e.to_string(),
            })?,
            None => Record::default(),
        };
        Ok((record, version))
    }

    async fn save(
        &self,
        record: &Record,
        status: &BTreeMap<String, String>,
        version: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let text = serde_json::to_string(record).map_err(|e| Error::Corrupt {
            what: "the key rotation record".into(),
            message: e.to_string(),
        })?;
        let mut data: BTreeMap<String, String> = status.clone();
        data.insert(RECORD_ENTRY.into(), text);
        let mut meta = json!({
            "name": self.name, "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": crate::jobs::MANAGED_BY},
        });
        if let Some(v) = version {
            meta["resourceVersion"] = json!(v);
        }
        crate::objects::add_owner(&mut meta);
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data});
        let pp = kube::api::PatchParams::apply(crate::ledger::FIELD_MANAGER).force();
        let cm = crate::error::kube_call(
            "write the key rotation record",
            self.timeout,
            api.patch(&self.name, &pp, &kube::api::Patch::Apply(body)),
        )
        .await?;
        Ok(cm.metadata.resource_version)
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The action decided (and done, unless [`Action::InSync`] or [`Action::Wait`]).
    pub action: Action,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// Rotations that ended (recorded): count each once.
    pub ended: Vec<Finished>,
    /// What the cluster reported before the step.
    pub observed: Observed,
}

impl Outcome {
    /// Whether more steps follow at once (not in sync, not waiting).
    pub fn more(&self) -> bool {
        !matches!(self.action, Action::InSync | Action::Wait(_))
    }
}

/// Carries a rotation out through one agent.
pub struct Rotator<S> {
    serf: serf_client::Client,
    store: S,
    /// The status last written (a wait's reason is written once, not each time).
    written: StatusCache,
}

/// The status last written, shared by the rotators of one process (one per agent connection).
pub type StatusCache = Arc<Mutex<Option<BTreeMap<String, String>>>>;

fn serf_err(what: &str) -> impl FnOnce(serf_client::Error) -> Error + '_ {
    move |source| Error::Serf {
        what: what.to_string(),
        source,
    }
}

/// A keyring command's answer: `Ok` when every alive member answered without an error,
/// otherwise the answer (counts and per-member messages) if the agent sent one.
fn answer(
    r: serf_client::Result<serf_client::KeyResponse>,
    what: &str,
) -> Result<Result<serf_client::KeyResponse, serf_client::KeyResponse>, Error> {
    match r {
        Ok(k) if k.num_err == 0 && k.num_resp == k.num_nodes => Ok(Ok(k)),
        Ok(k) => Ok(Err(k)),
        Err(serf_client::Error::Agent {
            command,
            message,
            body: Some(body),
        }) => match *body {
            serf_client::ErrorBody::Keys(k) => Ok(Err(k)),
            other => Err(serf_err(what)(serf_client::Error::Agent {
                command,
                message,
                body: Some(Box::new(other)),
            })),
        },
        Err(e) => Err(serf_err(what)(e)),
    }
}

fn failures(k: &serf_client::KeyResponse) -> String {
    let mut s = format!(
        "{} of {} alive members answered, {} with an error",
        k.num_resp, k.num_nodes, k.num_err
    );
    for (m, e) in &k.messages {
        s.push_str(&format!("; {m}: {e}"));
    }
    s
}

/// The status shown in the ConfigMap.
pub fn status_view(record: &Record, obs: &Observed, action: &Action) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let step = match action {
        Action::InSync => "InSync".to_string(),
        Action::Wait(why) => format!("Waiting: {why}"),
        _ => record
            .rotation
            .as_ref()
            .and_then(|r| r.step.as_ref())
            .map(|st| {
                format!(
                    "{} (rotation {})",
                    st.describe(),
                    record.rotation.as_ref().map(|r| r.id).unwrap_or(0)
                )
            })
            .unwrap_or_default(),
    };
    s.insert("step".into(), step);
    s.insert(
        "primary".into(),
        record.in_use.clone().unwrap_or_else(|| "unknown".into()),
    );
    let keys: Vec<String> = obs
        .summary()
        .into_iter()
        .map(|(fp, n)| format!("{fp} {n}"))
        .collect();
    s.insert("keys".into(), keys.join(", "));
    s.insert(
        "members".into(),
        format!("{} alive, {} failed", obs.alive.len(), obs.failed.len()),
    );
    if let Some(l) = &record.last {
        let mut t = format!(
            "{} {} {}: primary {} -> {}",
            l.id,
            l.result,
            l.finished,
            l.from.as_deref().unwrap_or("unknown"),
            l.target
        );
        if !l.removed.is_empty() {
            t.push_str(&format!("; removed {}", l.removed.join(", ")));
        }
        if !l.unreachable.is_empty() {
            t.push_str(&format!(
                "; unreachable (need the new keyring before they rejoin): {}",
                l.unreachable.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        s.insert("lastRotation".into(), t);
    }
    if let Some(r) = &record.rotation
        && !r.unreachable.is_empty()
    {
        s.insert(
            "unreachable".into(),
            r.unreachable.iter().cloned().collect::<Vec<_>>().join(", "),
        );
    }
    s
}

impl<S: RecordStore> Rotator<S> {
    /// A rotator through the agent behind `serf`, recording in `store`.
    pub fn new(serf: serf_client::Client, store: S) -> Self {
        Self::with_cache(serf, store, StatusCache::default())
    }

    /// A rotator that shares `written` (the status last written) with rotators before it.
    pub fn with_cache(serf: serf_client::Client, store: S, written: StatusCache) -> Self {
        Rotator {
            serf,
            store,
            written,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Asks the cluster: `list-keys` (every alive member) and `members`.
    ///
    /// # Errors
    /// The agent cannot be asked.
    pub async fn observe(&self) -> Result<Observed, Error> {
        let k = match answer(self.serf.list_keys().await, "list the cluster's keys")? {
            Ok(k) | Err(k) => k,
        };
        let members = self
            .serf
            .members()
            .await
            .map_err(serf_err("list the members"))?;
        let by = |s: serf_client::MemberStatus| {
            members
                .iter()
                .filter(|m| m.status == s)
                .map(|m| m.name.clone())
                .collect()
        };
        Ok(Observed {
            keys: k.keys,
            num_nodes: k.num_nodes,
            num_resp: k.num_resp,
            num_err: k.num_err,
            messages: k.messages,
            alive: by(serf_client::MemberStatus::Alive),
            failed: by(serf_client::MemberStatus::Failed),
        })
    }

    /// One step towards `desired`: observe, decide, record, act. `now` is the time to record.
    ///
    /// # Errors
    /// The agent or the store failed; nothing after the failure was done.
    pub async fn step(&self, desired: &Keyring, now: &str) -> Result<Outcome, Error> {
        let (record, version) = self.store.load().await?;
        let observed = self.observe().await?;
        let p = plan::next(desired, &record, &observed, now);
        let mut rec = p.record.clone();
        let mut notes = p.notes.clone();
        let status = status_view(&rec, &observed, &p.action);
        let version = if rec != record || self.differs(&status) {
            self.save(&rec, &status, version.as_deref()).await?
        } else {
            version
        };
        match &p.action {
            Action::InSync | Action::Wait(_) => {}
            Action::Install(k) => {
                let r = answer(self.serf.install_key(k.expose()).await, "install a key")?;
                notes.push(match r {
                    Ok(a) => Note {
                        warning: false,
                        reason: "KeyInstalled",
                        message: format!("key {k} installed on all {} alive members", a.num_nodes),
                    },
                    Err(a) => Note {
                        warning: true,
                        reason: "KeyInstallIncomplete",
                        message: format!("key {k} not installed everywhere: {}", failures(&a)),
                    },
                });
            }
            Action::Use(k) => {
                let r = answer(self.serf.use_key(k.expose()).await, "use a key")?;
                plan::used(&mut rec, &k.fingerprint(), r.is_ok());
                notes.push(match &r {
                    Ok(a) => Note {
                        warning: false,
                        reason: "PrimaryKeyChanged",
                        message: format!(
                            "key {k} is the primary on all {} alive members",
                            a.num_nodes
                        ),
                    },
                    Err(a) => Note {
                        warning: true,
                        reason: "PrimaryKeyChangeIncomplete",
                        message: format!(
                            "key {k} not made the primary everywhere: {}",
                            failures(a)
                        ),
                    },
                });
            }
            Action::Remove { primary, key } => {
                // The key removed must be in use nowhere: the primary is confirmed first, by
                // every alive member.
                let r = answer(
                    self.serf.use_key(primary.expose()).await,
                    "confirm the primary key",
                )?;
                if let Err(a) = r {
                    plan::used(&mut rec, &primary.fingerprint(), false);
                    notes.push(Note {
                        warning: true,
                        reason: "PrimaryKeyChangeIncomplete",
                        message: format!(
                            "key {} not removed: the primary {primary} is not confirmed everywhere: {}",
                            fingerprint_of(key),
                            failures(&a)
                        ),
                    });
                } else {
                    let r = answer(self.serf.remove_key(key).await, "remove a key")?;
                    let fp = fingerprint_of(key);
                    match r {
                        Ok(a) => {
                            plan::removed(&mut rec, key);
                            notes.push(Note {
                                warning: false,
                                reason: "KeyRemoved",
                                message: format!(
                                    "key {fp} removed from all {} alive members",
                                    a.num_nodes
                                ),
                            });
                        }
                        Err(a) => notes.push(Note {
                            warning: true,
                            reason: "KeyRemoveIncomplete",
                            message: format!("key {fp} not removed everywhere: {}", failures(&a)),
                        }),
                    }
                }
            }
        }
        if rec != p.record {
            // What the step changed (the primary confirmed or not, a key removed).
            let status = status_view(&rec, &observed, &p.action);
            self.save(&rec, &status, version.as_deref()).await?;
        }
        Ok(Outcome {
            action: p.action,
            notes,
            ended: p.ended,
            observed,
        })
    }

    /// Steps until the cluster is in sync, a step must wait, or `max_steps` were done.
    ///
    /// # Errors
    /// As [`Rotator::step`]; the outcomes before the error are lost with it.
    pub async fn run(
        &self,
        desired: &Keyring,
        max_steps: usize,
        now: impl Fn() -> String,
    ) -> Result<Vec<Outcome>, Error> {
        let mut out = Vec::new();
        for _ in 0..max_steps.max(1) {
            let o = self.step(desired, &now()).await?;
            let more = o.more();
            out.push(o);
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// Whether `status` differs from the one this rotator last wrote (none yet: it does).
    fn differs(&self, status: &BTreeMap<String, String>) -> bool {
        self.written
            .lock()
            .map(|w| w.as_ref() != Some(status))
            .unwrap_or(true)
    }

    async fn save(
        &self,
        record: &Record,
        status: &BTreeMap<String, String>,
        version: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let v = self.store.save(record, status, version).await?;
        if let Ok(mut w) = self.written.lock() {
            *w = Some(status.clone());
        }
        Ok(v)
    }
}
