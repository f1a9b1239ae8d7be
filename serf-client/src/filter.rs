//! Serf's event filter syntax (`member-join,user:deploy,query:load,*`), as `stream` and
//! `serf agent -event-handler` take it: parsing with clear errors, and matching.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::event::MemberEventKind;

/// One item of an event filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterItem {
    /// `*`: every event.
    All,
    /// `user`: every user event.
    AnyUser,
    /// `user:NAME`: user events with exactly this name.
    User(String),
    /// `query`: every query.
    AnyQuery,
    /// `query:NAME`: queries with exactly this name.
    Query(String),
    /// `member-*`: every member event (an extension of Serf's syntax that this client
    /// expands to the five member kinds when it talks to the agent).
    AnyMember,
    /// One member event kind.
    Member(MemberEventKind),
}

impl FilterItem {
    /// Whether an event of `kind` (Serf's `SERF_EVENT` spelling) named `name` (user event
    /// or query name; ignored for member events) passes this item.
    pub fn matches(&self, kind: &str, name: &str) -> bool {
        match self {
            FilterItem::All => true,
            FilterItem::AnyUser => kind == "user",
            FilterItem::User(n) => kind == "user" && n == name,
            FilterItem::AnyQuery => kind == "query",
            FilterItem::Query(n) => kind == "query" && n == name,
            FilterItem::AnyMember => MemberEventKind::parse(kind).is_some(),
            FilterItem::Member(k) => k.as_str() == kind,
        }
    }
}

impl fmt::Display for FilterItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterItem::All => f.write_str("*"),
            FilterItem::AnyUser => f.write_str("user"),
            FilterItem::User(n) => write!(f, "user:{n}"),
            FilterItem::AnyQuery => f.write_str("query"),
            FilterItem::Query(n) => write!(f, "query:{n}"),
            FilterItem::AnyMember => f.write_str("member-*"),
            FilterItem::Member(k) => f.write_str(k.as_str()),
        }
    }
}

/// A parsed event filter: a comma-separated list of [`FilterItem`]s. An empty string
/// means `*`, as for the agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventFilter {
    items: Vec<FilterItem>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        EventFilter {
            items: vec![FilterItem::All],
        }
    }

    /// Parses Serf's syntax. Items are not trimmed (the agent does not trim them either),
    /// so `user, query` is refused with an error naming the item `" query"`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Ok(Self::all());
        }
        let items = s
            .split(',')
            .map(|item| {
                Ok(match item {
                    "*" => FilterItem::All,
                    "user" => FilterItem::AnyUser,
                    "query" => FilterItem::AnyQuery,
                    "member-*" => FilterItem::AnyMember,
                    _ => {
                        if let Some(kind) = MemberEventKind::parse(item) {
                            FilterItem::Member(kind)
                        } else if let Some(name) = item.strip_prefix("user:") {
                            FilterItem::User(name.to_string())
                        } else if let Some(name) = item.strip_prefix("query:") {
                            FilterItem::Query(name.to_string())
                        } else {
                            return Err(Error::Invalid(format!(
                                "invalid event filter item {item:?} in {s:?}: expected one of \
                                 member-join, member-leave, member-failed, member-update, \
                                 member-reap, member-*, user, user:NAME, query, query:NAME, *"
                            )));
                        }
                    }
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(EventFilter { items })
    }

    /// The items.
    pub fn items(&self) -> &[FilterItem] {
        &self.items
    }

    /// Whether an event of `kind` named `name` passes any item.
    pub fn matches(&self, kind: &str, name: &str) -> bool {
        self.items.iter().any(|i| i.matches(kind, name))
    }

    /// The filter in the agent's own syntax (`member-*` expanded).
    pub fn to_agent_syntax(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for item in &self.items {
            match item {
                FilterItem::AnyMember => {
                    out.extend(MemberEventKind::ALL.iter().map(|k| k.as_str().to_string()))
                }
                other => out.push(other.to_string()),
            }
        }
        out.join(",")
    }
}

impl FromStr for EventFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.items.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serf_syntax() {
        let f = EventFilter::parse("member-join,user:deploy,query:load,member-*").unwrap();
        assert!(f.matches("member-join", ""));
        assert!(f.matches("member-reap", ""));
        assert!(f.matches("user", "deploy"));
        assert!(!f.matches("user", "deployx"));
        assert!(f.matches("query", "load"));
        assert!(!f.matches("query", "where"));
        assert_eq!(
            f.to_agent_syntax(),
            "member-join,user:deploy,query:load,member-join,member-leave,member-failed,member-update,member-reap"
        );
        assert!(EventFilter::parse("").unwrap().matches("user", "x"));
        assert!(
            EventFilter::parse("*")
                .unwrap()
                .matches("member-failed", "")
        );
    }

    #[test]
    fn bad_items_are_named() {
        let e = EventFilter::parse("user, query").unwrap_err().to_string();
        assert!(e.contains("\" query\""), "{e}");
        let e = EventFilter::parse("bogus").unwrap_err().to_string();
        assert!(e.contains("\"bogus\""), "{e}");
    }
}
