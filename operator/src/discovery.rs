//! Serf membership as service discovery, the pure part: which members a selector picks, the
//! endpoints they become (alive → ready, leaving → terminating, failed/left kept not-ready
//! for a grace, then removed), their placement into slices of at most 1,000 endpoints that
//! changes as few slices as possible, and the member list rendered as JSON and as lines.
//!
//! No Kubernetes client here: a caller turns [`Slice`]s into EndpointSlices and
//! [`render_json`] / [`render_lines`] into ConfigMap data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;
use serf_client::{Member, MemberStatus};

use crate::engine::anchored;

/// Kubernetes' limit of endpoints in one EndpointSlice.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// A member selector on tags: every listed tag must be present and match its anchored regex
/// (as `serf members -tag` and routes' `members` filters match).
#[derive(Debug, Clone)]
pub struct Selector {
    filters: Vec<(String, Regex)>,
}

impl Selector {
    /// Compiles `tags` (tag → regex). An empty map selects every member.
    ///
    /// # Errors
    /// The first regex that does not compile, named by its tag.
    pub fn new(tags: &BTreeMap<String, String>) -> Result<Selector, String> {
        let mut filters = Vec::with_capacity(tags.len());
        for (k, v) in tags {
            filters.push((
                k.clone(),
                anchored(v).map_err(|e| format!("selector.{k}: {e}"))?,
            ));
        }
        Ok(Selector { filters })
    }

    /// Whether `m` matches.
    pub fn matches(&self, m: &Member) -> bool {
        self.filters
            .iter()
            .all(|(k, re)| m.tags.get(k).is_some_and(|v| re.is_match(v)))
    }
}

/// Where a member's service port comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSource {
    /// The same port for every member.
    Fixed(u16),
    /// A tag holding the port, e.g. `port=5432`; a member without a valid one is left out
    /// (and counted in [`Plan::skipped`]).
    Tag(String),
}

/// One endpoint: a selected member as Kubernetes would see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The member's name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Its first service port (the one `lines` shows).
    pub port: u16,
    /// All its service ports, in the order the ports were given.
    pub ports: Vec<u16>,
    /// Its Serf status (`alive`, `leaving`, `failed`, `left`).
    pub status: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Receives traffic: alive.
    #[serde(skip)]
    pub ready: bool,
    /// Going away on purpose: leaving or left.
    #[serde(skip)]
    pub terminating: bool,
}

/// Which slices an endpoint may share: EndpointSlices have one address type and one port
/// list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
    /// The ports, in the order the ports were given.
    pub ports: Vec<u16>,
}

/// One slice: its key and its endpoints by member name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// A stable number within the service (the caller names the object from it).
    pub id: u32,
    /// Address type and port.
    pub key: SliceKey,
    /// Endpoints by member name.
    pub endpoints: BTreeMap<String, Endpoint>,
}

/// What the membership should be published as, and what changed since the previous plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Every slice, by id.
    pub slices: Vec<Slice>,
    /// Ids of the slices that are new or differ from the previous plan: the only ones to
    /// write.
    pub changed: Vec<u32>,
    /// Ids of the previous slices now empty: to delete.
    pub removed: Vec<u32>,
    /// Selected members left out for want of a usable port.
    pub skipped: Vec<String>,
    /// Counts by readiness.
    pub ready: usize,
    /// Endpoints not ready (terminating, failed within grace).
    pub not_ready: usize,
}

/// Members that stopped being alive or leaving (failed, left), with the time they were first
/// seen so: the grace is counted from there. The caller keeps it between plans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GoneSince {
    since: BTreeMap<String, Duration>,
}

impl GoneSince {
    /// The time `name` was first seen failed or left, if it is.
    pub fn get(&self, name: &str) -> Option<Duration> {
        self.since.get(name).copied()
    }

    /// The earliest time a kept failed/left endpoint's grace runs out after `now`, if any:
    /// when to plan again.
    pub fn next_expiry(&self, grace: Duration, now: Duration) -> Option<Duration> {
        self.since
            .values()
            .map(|t| *t + grace)
            .filter(|t| *t > now)
            .min()
    }
}

/// The endpoints `members` yield: selected, with every port, and not past the grace. `now`
/// is a monotonic time (any origin, the same as in `gone`); `gone` is updated.
pub fn endpoints(
    members: &[Member],
    selector: &Selector,
    ports: &[PortSource],
    grace: Duration,
    now: Duration,
    gone: &mut GoneSince,
    skipped: &mut Vec<String>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    let mut still_gone = BTreeSet::new();
    for m in members {
        if !selector.matches(m) {
            continue;
        }
        let (ready, terminating) = match &m.status {
            MemberStatus::Alive => (true, false),
            MemberStatus::Leaving => (false, true),
            MemberStatus::Failed | MemberStatus::Left => {
                let since = *gone.since.entry(m.name.clone()).or_insert(now);
                still_gone.insert(m.name.clone());
                if now.saturating_sub(since) >= grace {
                    continue;
                }
                (false, m.status == MemberStatus::Left)
            }
            MemberStatus::None | MemberStatus::Other(_) => continue,
        };
        let found: Option<Vec<u16>> = ports
            .iter()
            .map(|port| match port {
                PortSource::Fixed(p) => Some(*p),
                PortSource::Tag(t) => m
                    .tags
                    .get(t)
                    .and_then(|v| v.parse::<u16>().ok())
                    .filter(|p| *p != 0),
            })
            .collect();
        let Some((p, found)) = found.and_then(|f| Some((*f.first()?, f))) else {
            skipped.push(m.name.clone());
            continue;
        };
        out.push(Endpoint {
            name: m.name.clone(),
            address: m.addr,
            port: p,
            ports: found,
            status: m.status.as_str().to_string(),
            tags: m.tags.clone(),
            ready,
            terminating,
        });
    }
    gone.since.retain(|n, _| still_gone.contains(n));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Places `endpoints` into slices of at most `max` (1,000 in Kubernetes), starting from
/// `previous`: an endpoint stays in the slice it was in when its key is unchanged, a new one
/// fills the lowest slice of its key with room, or a new slice. So one member joining,
/// leaving or changing touches one slice (two when it moves), whatever the size.
pub fn place(previous: &[Slice], endpoints: Vec<Endpoint>, max: usize) -> Plan {
    let max = max.max(1);
    let mut plan = Plan::default();
    let was: BTreeMap<&str, u32> = previous
        .iter()
        .flat_map(|s| s.endpoints.keys().map(move |n| (n.as_str(), s.id)))
        .collect();
    let mut slices: BTreeMap<u32, Slice> = previous
        .iter()
        .map(|s| {
            (
                s.id,
                Slice {
                    id: s.id,
                    key: s.key.clone(),
                    endpoints: BTreeMap::new(),
                },
            )
        })
        .collect();
    let mut fresh = Vec::new();
    for e in endpoints {
        if e.ready {
            plan.ready += 1;
        } else {
            plan.not_ready += 1;
        }
        let key = SliceKey {
            ipv6: e.address.is_ipv6(),
            ports: e.ports.clone(),
        };
        match was.get(e.name.as_str()).and_then(|id| slices.get_mut(id)) {
            Some(s) if s.key == key => {
                s.endpoints.insert(e.name.clone(), e);
            }
            _ => fresh.push((key, e)),
        }
    }
    for (key, e) in fresh {
        let slot = slices
            .values_mut()
            .find(|s| s.key == key && s.endpoints.len() < max)
            .map(|s| s.id);
        let id = match slot {
            Some(id) => id,
            None => {
                let id = (0..).find(|i| !slices.contains_key(i)).unwrap_or(u32::MAX);
                slices.insert(
                    id,
                    Slice {
                        id,
                        key: key.clone(),
                        endpoints: BTreeMap::new(),
                    },
                );
                id
            }
        };
        if let Some(s) = slices.get_mut(&id) {
            s.endpoints.insert(e.name.clone(), e);
        }
    }
    let before: BTreeMap<u32, &Slice> = previous.iter().map(|s| (s.id, s)).collect();
    for (id, s) in slices {
        if s.endpoints.is_empty() {
            if before.contains_key(&id) {
                plan.removed.push(id);
            }
            continue;
        }
        if before.get(&id).is_none_or(|b| **b != s) {
            plan.changed.push(id);
        }
        plan.slices.push(s);
    }
    plan
}

/// The endpoints as a JSON array of `{name, address, port, ports, status, tags}`, by name.
///
/// # Errors
/// A JSON encoding error (not expected).
pub fn render_json(endpoints: &[Endpoint]) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(endpoints)
}

/// The ready endpoints as lines `name address:port` (`[address]:port` for IPv6), by name:
/// for haproxy/nginx templates. Tag values never appear, so nothing a member says can add a
/// line.
pub fn render_lines(endpoints: &[Endpoint]) -> String {
    let mut s = String::new();
    for e in endpoints.iter().filter(|e| e.ready) {
        let name: String = e
            .name
            .chars()
            .map(|c| {
                if c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        match e.address {
            IpAddr::V4(a) => s.push_str(&format!("{name} {a}:{}\n", e.port)),
            IpAddr::V6(a) => s.push_str(&format!("{name} [{a}]:{}\n", e.port)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str, status: MemberStatus, tags: &[(&str, &str)]) -> Member {
        Member::new(
            name,
            addr.parse().unwrap(),
            7946,
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status,
        )
    }

    fn sel(tags: &[(&str, &str)]) -> Selector {
        Selector::new(
            &tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    fn eps(members: &[Member], port: &PortSource, now: u64, gone: &mut GoneSince) -> Vec<Endpoint> {
        let mut skipped = Vec::new();
        endpoints(
            members,
            &sel(&[("role", "db")]),
            std::slice::from_ref(port),
            Duration::from_secs(30),
            Duration::from_secs(now),
            gone,
            &mut skipped,
        )
    }

    #[test]
    fn the_selector_is_anchored_and_needs_every_tag() {
        let s = sel(&[("role", "db"), ("dc", "eu-.*")]);
        assert!(s.matches(&member(
            "a",
            "10.0.0.1",
            MemberStatus::Alive,
            &[("role", "db"), ("dc", "eu-1")]
        )));
        assert!(!s.matches(&member(
            "b",
            "10.0.0.2",
            MemberStatus::Alive,
            &[("role", "dbx"), ("dc", "eu-1")]
        )));
        assert!(!s.matches(&member(
            "c",
            "10.0.0.3",
            MemberStatus::Alive,
            &[("role", "db")]
        )));
        let err = Selector::new(&[("role".to_string(), "(".to_string())].into()).unwrap_err();
        assert!(err.contains("selector.role"), "{err}");
    }

    #[test]
    fn statuses_become_conditions_and_failed_members_go_after_the_grace() {
        let members = vec![
            member("a", "10.0.0.1", MemberStatus::Alive, &[("role", "db")]),
            member("b", "10.0.0.2", MemberStatus::Leaving, &[("role", "db")]),
            member("c", "10.0.0.3", MemberStatus::Failed, &[("role", "db")]),
            member("d", "10.0.0.4", MemberStatus::Left, &[("role", "db")]),
            member("e", "10.0.0.5", MemberStatus::Alive, &[("role", "web")]),
        ];
        let mut gone = GoneSince::default();
        let e = eps(&members, &PortSource::Fixed(5432), 100, &mut gone);
        let got: Vec<_> = e
            .iter()
            .map(|e| (e.name.as_str(), e.ready, e.terminating))
            .collect();
        assert_eq!(
            got,
            [
                ("a", true, false),
                ("b", false, true),
                ("c", false, false),
                ("d", false, true)
            ]
        );
        assert_eq!(
            gone.next_expiry(Duration::from_secs(30), Duration::from_secs(100)),
            Some(Duration::from_secs(130))
        );
        // Within the grace the failed and left members stay; at it they go.
        assert_eq!(
            eps(&members, &PortSource::Fixed(5432), 129, &mut gone).len(),
            4
        );
        let e = eps(&members, &PortSource::Fixed(5432), 130, &mut gone);
        assert_eq!(
            e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // A member back alive forgets it was gone.
        let mut back = members.clone();
        back[2].status = MemberStatus::Alive;
        eps(&back, &PortSource::Fixed(5432), 131, &mut gone);
        assert_eq!(gone.get("c"), None);
        assert_eq!(gone.get("d"), Some(Duration::from_secs(100)));
    }

    #[test]
    fn a_port_from_a_tag_leaves_out_members_without_one() {
        let members = vec![
            member(
                "a",
                "10.0.0.1",
                MemberStatus::Alive,
                &[("role", "db"), ("port", "6000")],
            ),
            member(
                "b",
                "10.0.0.2",
                MemberStatus::Alive,
                &[("role", "db"), ("port", "x")],
            ),
            member("c", "10.0.0.3", MemberStatus::Alive, &[("role", "db")]),
        ];
        let mut skipped = Vec::new();
        let e = endpoints(
            &members,
            &sel(&[("role", "db")]),
            &[PortSource::Tag("port".into())],
            Duration::ZERO,
            Duration::ZERO,
            &mut GoneSince::default(),
            &mut skipped,
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].port, 6000);
        assert_eq!(skipped, ["b", "c"]);
    }

    #[test]
    fn several_ports_come_in_order_and_all_are_needed() {
        let members = vec![
            member(
                "a",
                "10.0.0.1",
                MemberStatus::Alive,
                &[("role", "db"), ("admin", "9000")],
            ),
            member("b", "10.0.0.2", MemberStatus::Alive, &[("role", "db")]),
        ];
        let mut skipped = Vec::new();
        let e = endpoints(
            &members,
            &sel(&[("role", "db")]),
            &[PortSource::Fixed(5432), PortSource::Tag("admin".into())],
            Duration::ZERO,
            Duration::ZERO,
            &mut GoneSince::default(),
            &mut skipped,
        );
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].port, e[0].ports.clone()), (5432, vec![5432, 9000]));
        assert_eq!(skipped, ["b"]);
        let p = place(&[], e, 1000);
        assert_eq!(p.slices[0].key.ports, [5432, 9000]);
    }

    fn many(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| {
                member(
                    &format!("m{i:05}"),
                    &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                    MemberStatus::Alive,
                    &[("role", "db")],
                )
            })
            .collect()
    }

    #[test]
    fn slices_split_at_the_limit_and_a_change_touches_one_slice() {
        let mut gone = GoneSince::default();
        let members = many(10_000);
        let first = place(
            &[],
            eps(&members, &PortSource::Fixed(80), 0, &mut gone),
            MAX_ENDPOINTS_PER_SLICE,
        );
        assert_eq!(first.slices.len(), 10);
        assert!(first.slices.iter().all(|s| s.endpoints.len() == 1000));
        assert_eq!(first.changed.len(), 10);
        assert_eq!(first.ready, 10_000);

        // The same membership again: nothing to write.
        let again = place(
            &first.slices,
            eps(&members, &PortSource::Fixed(80), 1, &mut gone),
            1000,
        );
        assert!(again.changed.is_empty() && again.removed.is_empty());
        assert_eq!(again.slices, first.slices);

        // One member fails: one slice.
        let mut one = members.clone();
        one[4321].status = MemberStatus::Failed;
        let p = place(
            &again.slices,
            eps(&one, &PortSource::Fixed(80), 2, &mut gone),
            1000,
        );
        assert_eq!(p.changed.len(), 1);
        assert_eq!((p.ready, p.not_ready), (9_999, 1));

        // Past the grace it is removed, and a newcomer fills the room: one slice again.
        one.push(member(
            "zz",
            "10.200.0.1",
            MemberStatus::Alive,
            &[("role", "db")],
        ));
        let q = place(
            &p.slices,
            eps(&one, &PortSource::Fixed(80), 40, &mut gone),
            1000,
        );
        assert_eq!(q.changed, p.changed);
        assert_eq!(q.slices.len(), 10);
        assert!(q.slices.iter().all(|s| s.endpoints.len() <= 1000));

        // One more: no room left, a new slice.
        one.push(member(
            "zz2",
            "10.200.0.2",
            MemberStatus::Alive,
            &[("role", "db")],
        ));
        let r = place(
            &q.slices,
            eps(&one, &PortSource::Fixed(80), 41, &mut gone),
            1000,
        );
        assert_eq!(r.changed, [10]);
        assert_eq!(r.slices.len(), 11);
    }

    #[test]
    fn families_and_ports_get_slices_of_their_own_and_empty_slices_are_removed() {
        let members = vec![
            member(
                "a",
                "10.0.0.1",
                MemberStatus::Alive,
                &[("role", "db"), ("port", "1")],
            ),
            member(
                "b",
                "fd00::2",
                MemberStatus::Alive,
                &[("role", "db"), ("port", "1")],
            ),
            member(
                "c",
                "10.0.0.3",
                MemberStatus::Alive,
                &[("role", "db"), ("port", "2")],
            ),
        ];
        let port = PortSource::Tag("port".into());
        let mut gone = GoneSince::default();
        let p = place(&[], eps(&members, &port, 0, &mut gone), 1000);
        assert_eq!(p.slices.len(), 3);
        // c moves to port 1: its old slice empties and is removed, a's slice changes.
        let mut moved = members.clone();
        moved[2].tags.insert("port".into(), "1".into());
        let q = place(&p.slices, eps(&moved, &port, 1, &mut gone), 1000);
        assert_eq!(q.slices.len(), 2);
        assert_eq!(q.removed.len(), 1);
        assert_eq!(q.changed.len(), 1);
    }

    #[test]
    fn rendering_lists_members_as_json_and_ready_ones_as_lines() {
        let members = vec![
            member(
                "a b",
                "10.0.0.1",
                MemberStatus::Alive,
                &[("role", "db"), ("x", "1\nevil 1.2.3.4:5")],
            ),
            member("v6", "fd00::1", MemberStatus::Alive, &[("role", "db")]),
            member("c", "10.0.0.3", MemberStatus::Leaving, &[("role", "db")]),
        ];
        let e = eps(
            &members,
            &PortSource::Fixed(80),
            0,
            &mut GoneSince::default(),
        );
        assert_eq!(render_lines(&e), "a_b 10.0.0.1:80\nv6 [fd00::1]:80\n");
        let v: serde_json::Value = serde_json::from_str(&render_json(&e).unwrap()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 3);
        assert_eq!(v[0]["address"], "10.0.0.1");
        assert_eq!(v[0]["tags"]["x"], "1\nevil 1.2.3.4:5");
        assert_eq!(v[1]["status"], "leaving");
    }
}
