//! The RPC commands, one method each.

use std::collections::BTreeMap;

use crate::codec;
use crate::error::{Error, Result};
use crate::filter::EventFilter;
use crate::protocol::{self, KeyResponse, Member, Stats, cmd};

use super::*;

impl Client {
    /// `handshake` (done by [`Client::connect`]; a second one is refused by the agent).
    pub async fn handshake(&self) -> Result<()> {
        self.call_empty(
            cmd::HANDSHAKE,
            Some(&protocol::HandshakeRequest {
                version: protocol::IPC_VERSION,
            }),
        )
        .await
    }

    /// `auth` (done by [`Client::connect`] when the config has a key).
    ///
    /// # Errors
    /// [`Error::Auth`] with the agent's text when the key is wrong.
    pub async fn auth(&self, key: &str) -> Result<()> {
        self.call_empty(cmd::AUTH, Some(&protocol::AuthRequest { auth_key: key }))
            .await
    }

    /// `members`: every member the agent knows, in any status.
    pub async fn members(&self) -> Result<Vec<Member>> {
        let body = self.call_body::<()>(cmd::MEMBERS, None).await?;
        Ok(codec::decode::<protocol::MembersResponse>(&body, "members reply")?.members)
    }

    /// `members-filtered`: members whose tags, status and name match anchored regexes.
    ///
    /// # Errors
    /// [`Error::Invalid`] when a regex does not compile: the agent would drop the connection
    /// without an answer, so the client checks first.
    pub async fn members_filtered(&self, filter: &MembersFilter) -> Result<Vec<Member>> {
        for (what, re) in filter
            .tags
            .iter()
            .map(|(k, v)| (format!("tag {k}"), v))
            .chain([
                ("status".to_string(), &filter.status),
                ("name".to_string(), &filter.name),
            ])
        {
            check_regex(&what, re)?;
        }
        let body = self
            .call_body(
                cmd::MEMBERS_FILTERED,
                Some(&protocol::MembersFilteredRequest {
                    tags: &filter.tags,
                    status: &filter.status,
                    name: &filter.name,
                }),
            )
            .await?;
        Ok(codec::decode::<protocol::MembersResponse>(&body, "members-filtered reply")?.members)
    }

    /// `join`: joins the agent to the nodes at `addrs` (`host:port`). With `replay`, the
    /// agent re-delivers past user events it learns from them. Returns how many were joined.
    ///
    /// # Errors
    /// [`Error::Agent`] with [`ErrorBody::Join`] carrying how many joined before the failure.
    pub async fn join<S: AsRef<str>>(&self, addrs: &[S], replay: bool) -> Result<u32> {
        let existing: Vec<String> = addrs.iter().map(|a| a.as_ref().to_string()).collect();
        let body = self
            .call_body(
                cmd::JOIN,
                Some(&protocol::JoinRequest {
                    existing: &existing,
                    replay,
                }),
            )
            .await?;
        let num = codec::decode::<protocol::JoinResponse>(&body, "join reply")?.num;
        Ok(u32::try_from(num).unwrap_or(0))
    }

    /// `leave`: the agent leaves the cluster gracefully and shuts down. The agent may close
    /// the connection before or after it answers; both count as success.
    pub async fn leave(&self) -> Result<()> {
        match self.call_empty::<()>(cmd::LEAVE, None).await {
            Err(Error::ConnectionClosed { .. }) => Ok(()),
            other => other,
        }
    }

    /// `force-leave`: marks a failed node as left; with `prune`, also removes (reaps) it
    /// at once. An unknown node is not an error.
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<()> {
        self.call_empty(
            cmd::FORCE_LEAVE,
            Some(&protocol::ForceLeaveRequest { node, prune }),
        )
        .await
    }

    /// `event`: fires a user event. With `coalesce`, receivers may deliver only the newest
    /// event of that name within their coalescing window.
    ///
    /// # Errors
    /// [`Error::Invalid`] over 9 KiB (Serf's hard cap); [`Error::Agent`] over the agent's
    /// configured limit (512 bytes of name and payload by default).
    pub async fn event(&self, name: &str, payload: &[u8], coalesce: bool) -> Result<()> {
        let size = name.len() + payload.len();
        if size > USER_EVENT_HARD_LIMIT {
            return Err(Error::Invalid(format!(
                "user event {name:?} is {size} bytes (name and payload); Serf refuses more \
                 than {USER_EVENT_HARD_LIMIT} whatever its configuration (default limit 512)"
            )));
        }
        self.call_empty(
            cmd::EVENT,
            Some(&protocol::EventRequest {
                name,
                payload,
                coalesce,
            }),
        )
        .await
    }

    /// `tags`: sets (adds or overwrites) and deletes tags of the agent's own node. Other
    /// nodes see a `member-update`.
    pub async fn tags(&self, set: &BTreeMap<String, String>, delete: &[String]) -> Result<()> {
        self.call_empty(
            cmd::TAGS,
            Some(&protocol::TagsRequest {
                tags: set,
                delete_tags: delete,
            }),
        )
        .await
    }

    /// `stream`: events that pass `filter` (Serf's syntax; see [`EventFilter`]).
    ///
    /// # Caveats
    /// Records arrive until the stream is stopped or dropped. The agent itself drops events
    /// for a client that has 512 undelivered, silently; this client counts what *it* drops
    /// for a slow consumer and reports it as [`Error::Lagged`]. Stopping or dropping a stream
    /// while the agent is dispatching events to it can crash Debian's 0.9.4 agent (a known
    /// agent bug): keep event streams open for the life of the connection.
    pub async fn stream(&self, filter: &str) -> Result<EventStream> {
        let filter = EventFilter::parse(filter)?;
        let raw = self
            .open_stream(
                cmd::STREAM,
                &protocol::StreamRequest {
                    kind: &filter.to_agent_syntax(),
                },
                false,
            )
            .await?;
        Ok(EventStream { raw })
    }

    /// `monitor`: the agent's log lines at `level` (`trace`, `debug`, `info`, `warn`,
    /// `err`), starting with a backlog of up to 512 recent lines. One per connection.
    pub async fn monitor(&self, level: &str) -> Result<LogStream> {
        let raw = self
            .open_stream(
                cmd::MONITOR,
                &protocol::MonitorRequest { log_level: level },
                false,
            )
            .await?;
        Ok(LogStream { raw })
    }

    /// `query`: sends a query and streams its acks and responses until its deadline.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a tag regex that does not compile; [`Error::Agent`] when the
    /// agent refuses the query (`query exceeds limit of 1024 bytes`, the `_serf_` prefix).
    pub async fn query(&self, params: &QueryParams) -> Result<QueryStream> {
        for (k, re) in &params.filter_tags {
            check_regex(&format!("query tag {k}"), re)?;
        }
        let timeout = match params.timeout {
            None => 0,
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX).max(1),
        };
        let raw = self
            .open_stream(
                cmd::QUERY,
                &protocol::QueryRequest {
                    filter_nodes: &params.filter_nodes,
                    filter_tags: &params.filter_tags,
                    request_ack: params.request_ack,
                    relay_factor: params.relay_factor,
                    timeout,
                    name: &params.name,
                    payload: &params.payload,
                },
                true,
            )
            .await?;
        Ok(QueryStream { raw, done: false })
    }

    /// `respond`: answers a query received on a stream of **this** connection, before its
    /// deadline, once.
    pub async fn respond(&self, id: u64, payload: &[u8]) -> Result<()> {
        self.call_empty(
            cmd::RESPOND,
            Some(&protocol::RespondRequest { id, payload }),
        )
        .await
    }

    async fn key_call(&self, command: &'static str, key: Option<&str>) -> Result<KeyResponse> {
        let body = match key {
            Some(key) => {
                self.call_body(command, Some(&protocol::KeyRequest { key }))
                    .await?
            }
            None => self.call_body::<()>(command, None).await?,
        };
        codec::decode(&body, "keyring reply")
    }

    /// `install-key`: adds a gossip encryption key (base64 of 16, 24 or 32 bytes) on every
    /// node.
    pub async fn install_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::INSTALL_KEY, Some(key)).await
    }

    /// `use-key`: makes an installed key the primary one on every node.
    pub async fn use_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::USE_KEY, Some(key)).await
    }

    /// `remove-key`: removes a key (not the primary one) from every node.
    pub async fn remove_key(&self, key: &str) -> Result<KeyResponse> {
        self.key_call(cmd::REMOVE_KEY, Some(key)).await
    }

    /// `list-keys`: the installed keys and how many nodes have each.
    pub async fn list_keys(&self) -> Result<KeyResponse> {
        self.key_call(cmd::LIST_KEYS, None).await
    }

    /// `stats`: the agent's statistics, every value a string.
    pub async fn stats(&self) -> Result<Stats> {
        let body = self.call_body::<()>(cmd::STATS, None).await?;
        codec::decode(&body, "stats reply")
    }

    /// `get-coordinate`: a node's network coordinate, `None` for an unknown node.
    pub async fn get_coordinate(&self, node: &str) -> Result<Option<protocol::Coordinate>> {
        let body = self
            .call_body(
                cmd::GET_COORDINATE,
                Some(&protocol::CoordinateRequest { node }),
            )
            .await?;
        let r: protocol::CoordinateResponse = codec::decode(&body, "get-coordinate reply")?;
        Ok(r.ok.then_some(r.coord))
    }
}

fn check_regex(what: &str, re: &str) -> Result<()> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|e| Error::Invalid(format!("{what}: regex {re:?} does not compile: {e}")))
}
