//! SerfHandler status, kept in memory and written in batches: per-route counters and the
//! latest match and skip, the Ready condition from route validation, and membership. An
//! event storm becomes at most one status patch per handler per flush interval.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Api, Client};
use serf_operator_crds::{
    LastMatched, LastReported, LastSkipped, MemberItem, MembershipStatus, RouteStatus, SerfHandler,
    SerfHandlerStatus,
};

/// Writes a handler's whole status: server-side apply on the status subresource under the
/// operator's one field manager. A handler that is gone (404) is not an error.
///
/// # Errors
/// Any other API error.
pub async fn write_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &SerfHandlerStatus,
) -> Result<(), kube::Error> {
    let api: Api<SerfHandler> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", serf_operator_crds::GROUP, serf_operator_crds::VERSION),
        "kind": "SerfHandler",
        "status": status,
    });
    match crate::ledger::apply_unread(client, api.resource_url(), name, Some("status"), patch).await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

use crate::engine::{MemberRecord, RouteError};
use crate::jobs::HandlerRef;

/// At most this many members are listed in a handler's status (`total` counts all).
pub const MAX_MEMBER_ITEMS: usize = 50;

type Key = (String, String);

fn key(h: &HandlerRef) -> Key {
    (h.namespace.clone(), h.name.clone())
}

#[derive(Default)]
struct Entry {
    status: SerfHandlerStatus,
    seeded: bool,
    dirty: bool,
}

/// What happened on a route, for its counters.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteEvent {
    /// A Job was created.
    Launched {
        /// Job name.
        job: String,
    },
    /// The query was answered.
    Answered,
    /// Added to a coalescing window.
    Coalesced,
    /// Not acted on: a reason (PascalCase) and details.
    Skipped {
        /// Why.
        reason: String,
        /// Details.
        message: String,
    },
    /// A Job's outcome was reported into Serf (or could not be).
    Reported {
        /// The Job.
        job: String,
        /// `Succeeded` or `Failed`.
        outcome: String,
        /// `Sent`, `Interrupted`, `TooLarge`, `SendFailed`.
        result: String,
        /// The Serf user event.
        event: String,
        /// Details.
        message: Option<String>,
    },
}

/// The status of every handler, as this operator last computed it.
#[derive(Default)]
pub struct StatusBook {
    entries: BTreeMap<Key, Entry>,
}

impl StatusBook {
    /// Takes a handler's current spec and stored status into account: counters continue from
    /// the stored status (once), and the Ready condition follows route validation.
    pub fn sync_handler(&mut self, h: &SerfHandler, errors: &[RouteError], now: &str) {
        let href = HandlerRef {
            namespace: h.metadata.namespace.clone().unwrap_or_default(),
            name: h.metadata.name.clone().unwrap_or_default(),
            uid: None,
        };
        let e = self.entries.entry(key(&href)).or_default();
        if !e.seeded {
            if let Some(stored) = &h.status {
                e.status = stored.clone();
            }
            e.seeded = true;
        }
        let mine: Vec<&RouteError> = errors
            .iter()
            .filter(|x| x.handler.namespace == href.namespace && x.handler.name == href.name)
            .collect();
        let (status, reason, message) = if mine.is_empty() {
            (
                "True",
                "RoutesValid",
                format!("{} route(s) routing", h.spec.routes.len()),
            )
        } else {
            let text: Vec<String> = mine
                .iter()
                .map(|x| {
                    if x.route.is_empty() {
                        x.problem.clone()
                    } else {
                        format!("route {}: {}", x.route, x.problem)
                    }
                })
                .collect();
            ("False", "InvalidRoutes", text.join("; "))
        };
        let generation = h.metadata.generation;
        let route_count = i32::try_from(h.spec.routes.len()).unwrap_or(i32::MAX);
        let names: Vec<&str> = h.spec.routes.iter().map(|r| r.name.as_str()).collect();
        let s = &mut e.status;
        let before = (
            s.observed_generation,
            s.route_count,
            s.conditions.clone(),
            s.routes.len(),
        );
        set_condition(
            &mut s.conditions,
            "Ready",
            status,
            reason,
            &message,
            generation,
            now,
        );
        s.observed_generation = generation;
        s.route_count = Some(route_count);
        // Keep the counters of routes that still exist, in spec order.
        let mut old: BTreeMap<String, RouteStatus> =
            s.routes.drain(..).map(|r| (r.name.clone(), r)).collect();
        s.routes = names
            .iter()
            .map(|n| {
                old.remove(*n).unwrap_or_else(|| RouteStatus {
                    name: (*n).to_string(),
                    ..Default::default()
                })
            })
            .collect();
        if before
            != (
                s.observed_generation,
                s.route_count,
                s.conditions.clone(),
                s.routes.len(),
            )
        {
            e.dirty = true;
        }
    }

    /// Keeps only the handlers whose (namespace, name) `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&(String, String)) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }

    /// Forgets a deleted handler.
    pub fn remove(&mut self, h: &HandlerRef) {
        self.entries.remove(&key(h));
    }

    /// Counts what happened on a route for `event` (e.g. `user:deploy@42`).
    pub fn record(
        &mut self,
        h: &HandlerRef,
        route: &str,
        event: &str,
        what: RouteEvent,
        now: &str,
    ) {
        let e = self.entries.entry(key(h)).or_default();
        e.dirty = true;
        let routes = &mut e.status.routes;
        let idx = match routes.iter().position(|r| r.name == route) {
            Some(i) => i,
            None => {
                routes.push(RouteStatus {
                    name: route.to_string(),
                    ..Default::default()
                });
                routes.len() - 1
            }
        };
        let r = &mut routes[idx];
        match what {
            RouteEvent::Launched { job } => {
                r.matched += 1;
                r.jobs_created += 1;
                r.last_matched = Some(LastMatched {
                    event: event.into(),
                    time: now.into(),
                    job: Some(job),
                });
            }
            RouteEvent::Answered => {
                r.matched += 1;
                r.answered += 1;
                r.last_matched = Some(LastMatched {
                    event: event.into(),
                    time: now.into(),
                    job: None,
                });
            }
            RouteEvent::Coalesced => r.matched += 1,
            RouteEvent::Reported {
                job,
                outcome,
                result,
                event,
                message,
            } => {
                if result == "Sent" {
                    r.reported += 1;
                }
                r.last_reported = Some(LastReported {
                    job,
                    outcome,
                    result,
                    event,
                    message,
                    time: now.into(),
                });
            }
            RouteEvent::Skipped { reason, message } => {
                r.skipped += 1;
                r.last_skipped = Some(LastSkipped {
                    event: event.into(),
                    reason,
                    message: Some(message),
                    time: now.into(),
                });
            }
        }
    }

    /// Sets the membership a handler's member filters select (see [`summarize`]).
    pub fn set_members(&mut self, h: &HandlerRef, ms: MembershipStatus) {
        let e = self.entries.entry(key(h)).or_default();
        if e.status.members.as_ref() != Some(&ms) {
            e.status.members = Some(ms);
            e.dirty = true;
        }
    }

    /// Shows in a handler's status that `total` Serf events were dropped before routing
    /// (the operator's queue overflowed or its stream lagged): condition `EventsDropped`.
    pub fn set_events_dropped(&mut self, h: &HandlerRef, total: u64, now: &str) {
        let e = self.entries.entry(key(h)).or_default();
        let message = format!(
            "{total} Serf event(s) dropped before routing since the operator started (queue full or stream lagging); raise --queue-size or --workers"
        );
        let same = e
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "EventsDropped" && c.message == message);
        if !same {
            let generation = e.status.observed_generation;
            set_condition(
                &mut e.status.conditions,
                "EventsDropped",
                "True",
                "QueueOverflow",
                &message,
                generation,
                now,
            );
            e.dirty = true;
        }
    }

    /// The statuses changed since the last call, to be written.
    pub fn take_dirty(&mut self) -> Vec<((String, String), SerfHandlerStatus)> {
        self.entries
            .iter_mut()
            .filter(|(_, e)| e.dirty)
            .map(|(k, e)| {
                e.dirty = false;
                (k.clone(), e.status.clone())
            })
            .collect()
    }

    /// Marks a handler's status as not written (after a failed patch).
    pub fn mark_dirty(&mut self, k: &(String, String)) {
        if let Some(e) = self.entries.get_mut(k) {
            e.dirty = true;
        }
    }

    /// The current status of a handler.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&SerfHandlerStatus> {
        self.entries
            .get(&(namespace.to_string(), name.to_string()))
            .map(|e| &e.status)
    }
}

fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) {
    let time = now
        .parse::<jiff::Timestamp>()
        .map(Time)
        .unwrap_or_else(|_| Time(jiff::Timestamp::UNIX_EPOCH));
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = time;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: time,
        }),
    }
}

/// The status summary of the members `selected` yields in name order (the membership
/// record's order): counts by status and the first [`MAX_MEMBER_ITEMS`]. Reaped members are
/// not counted. One pass, no copy of the members: a pool of 50,000 is summarized in place.
pub fn summarize<'a>(
    selected: impl Iterator<Item = (&'a String, &'a MemberRecord)>,
) -> MembershipStatus {
    let mut ms = MembershipStatus::default();
    for (name, r) in selected {
        match r.status.as_str() {
            "alive" => ms.alive += 1,
            "failed" => ms.failed += 1,
            "left" | "leaving" => ms.left += 1,
            _ => continue,
        }
        ms.total += 1;
        if ms.items.len() < MAX_MEMBER_ITEMS {
            let addr = r
                .addr
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            ms.items.push(MemberItem {
                name: name.clone(),
                addr: format!("{addr}:{}", r.port),
                role: r.tags.get("role").cloned().unwrap_or_default(),
                status: r.status.clone(),
            });
        }
    }
    ms
}
