//! The Serf event-handler contract: the `SERF_*` environment and the stdin bytes that
//! `serf agent -event-handler` gives a handler script, computed for one event.

use std::collections::BTreeMap;

use base64::Engine as _;
use serf_client::{Event, Member};

/// The node the operator's Serf agent runs as: what handlers see as `SERF_SELF_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelfNode {
    /// Node name (`SERF_SELF_NAME`).
    pub name: String,
    /// The node's tags; `role` is `SERF_SELF_ROLE`.
    pub tags: BTreeMap<String, String>,
}

impl SelfNode {
    /// The `role` tag, or `""`.
    pub fn role(&self) -> &str {
        self.tags.get("role").map(String::as_str).unwrap_or("")
    }

    /// Follows the node through its own member events: a member-join or member-update of
    /// it carries its current tags (after `serf tags -set` on its agent), as Serf's own
    /// handlers then see them. True when the tags changed.
    pub fn follow(&mut self, event: &Event) -> bool {
        let Event::Member(m) = event else {
            return false;
        };
        if !matches!(
            m.kind,
            serf_client::MemberEventKind::Join | serf_client::MemberEventKind::Update
        ) {
            return false;
        }
        match m.members.iter().find(|x| x.name == self.name) {
            Some(me) if me.tags != self.tags => {
                self.tags = me.tags.clone();
                true
            }
            _ => false,
        }
    }
}

/// Serf's name for a tag's environment variable, computed as Serf computes it: `SERF_TAG_`
/// and the tag name upper-cased with Unicode's simple case mapping (Go's `strings.ToUpper`:
/// `ſite` → `SITE`, `ß` unchanged), then every character outside `[A-Z0-9_]` replaced by
/// one `_` (`my-tag.x` → `SERF_TAG_MY_TAG_X`).
pub fn tag_env_name(tag: &str) -> String {
    let mut out = String::with_capacity(9 + tag.len());
    out.push_str("SERF_TAG_");
    for c in tag.chars() {
        // A one-character upper case is the simple mapping; a longer one (ß → SS) is a
        // special casing that Go does not apply: the character stays, and is not ASCII.
        let mut upper = c.to_uppercase();
        let c = match (upper.next(), upper.next()) {
            (Some(u), None) => u,
            _ => c,
        };
        out.push(
            if c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            },
        );
    }
    out
}

/// The `SERF_TAG_*` variables for `tags`, one per name. Tags whose names clean up to the
/// same variable (`my-tag`, `my_tag`) give it the value of the last in name order; under
/// Serf the winner depends on Go's random map order, here it is always the same.
pub fn tag_env(tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in tags {
        env.insert(tag_env_name(k), v.clone());
    }
    env
}

/// The environment Serf gives a handler for `event` on `node`, in a stable order, plus
/// `SERF_PAYLOAD` (and `SERF_PAYLOAD_BASE64` when the payload is not plain text) for user
/// events and queries.
///
/// A payload is plain text when it is UTF-8 without NUL bytes (an environment variable
/// cannot hold a NUL). Otherwise `SERF_PAYLOAD` carries it with invalid bytes replaced and
/// `SERF_PAYLOAD_BASE64` carries the exact bytes.
pub fn environment(event: &Event, node: &SelfNode) -> Vec<(String, String)> {
    let mut env = vec![
        ("SERF_EVENT".to_string(), event.kind().to_string()),
        ("SERF_SELF_NAME".to_string(), node.name.clone()),
        ("SERF_SELF_ROLE".to_string(), node.role().to_string()),
    ];
    env.extend(tag_env(&node.tags));
    let payload = match event {
        Event::User(u) => {
            env.push(("SERF_USER_EVENT".into(), u.name.clone()));
            env.push(("SERF_USER_LTIME".into(), u.ltime.to_string()));
            Some(&u.payload)
        }
        Event::Query(q) => {
            env.push(("SERF_QUERY_NAME".into(), q.name.clone()));
            env.push(("SERF_QUERY_LTIME".into(), q.ltime.to_string()));
            Some(&q.payload)
        }
        _ => None,
    };
    if let Some(p) = payload {
        match plain_text(p) {
            Some(text) => env.push(("SERF_PAYLOAD".into(), text.to_string())),
            None => {
                let lossy = String::from_utf8_lossy(p).replace('\0', "\u{fffd}");
                env.push(("SERF_PAYLOAD".into(), lossy));
                env.push((
                    "SERF_PAYLOAD_BASE64".into(),
                    base64::engine::general_purpose::STANDARD.encode(p),
                ));
            }
        }
    }
    env
}

/// The payload as text, when it is UTF-8 without NUL bytes.
pub fn plain_text(payload: &[u8]) -> Option<&str> {
    std::str::from_utf8(payload)
        .ok()
        .filter(|s| !s.contains('\0'))
}

/// The exact bytes Serf pipes to a handler's stdin: the payload with a newline appended
/// when it lacks one (nothing for an empty payload), or for member events one line per
/// member: `NAME\tADDR\tROLE\tk=v,k=v`.
pub fn stdin(event: &Event) -> Vec<u8> {
    match event {
        Event::User(u) => payload_stdin(&u.payload),
        Event::Query(q) => payload_stdin(&q.payload),
        Event::Member(m) => member_lines(&m.members),
        _ => Vec::new(),
    }
}

fn payload_stdin(payload: &[u8]) -> Vec<u8> {
    let mut out = payload.to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// Member lines as Serf writes them; tabs and newlines inside fields are escaped as `\t`
/// and `\n`. Serf writes tags in random (Go map) order; these are sorted by name.
pub fn member_lines<'a>(members: impl IntoIterator<Item = &'a Member>) -> Vec<u8> {
    let mut out = String::new();
    for m in members {
        let tags: Vec<String> = m
            .tags
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            escape(&m.name),
            m.addr,
            escape(m.role()),
            tags.join(",")
        ));
    }
    out.into_bytes()
}

fn escape(s: &str) -> String {
    s.replace('\t', "\\t").replace('\n', "\\n")
}

/// Kubernetes' `$(VAR)` expansion, as for container args: `$(NAME)` becomes the value of
/// `NAME` when it is defined and stays as written otherwise; `$$(NAME)` is a literal
/// `$(NAME)`.
pub fn expand(template: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(body) = tail.strip_prefix("$(")
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &body[end + 1..];
            continue;
        }
        out.push('$');
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

/// A Serf-derived value made safe for a Pod spec field that Kubernetes expands (`env[].value`,
/// `command`, `args`): every `$` is doubled, so Kubernetes' expansion (`$$` → `$`,
/// `$(NAME)` → NAME's value) gives back exactly `value`. Without it a payload such as
/// `$(DB_PASSWORD)` would be replaced by the value of a variable the template defines
/// (a Secret, say) before the container sees it.
///
/// Every value the operator derives from Serf data and writes into a Pod spec goes through
/// this function ([`crate::jobs::serf_env_var`] is its one caller for the environment).
pub fn kube_literal(value: &str) -> String {
    value.replace('$', "$$")
}

/// The environment a container sees, computed from its `env` list as the kubelet does:
/// in order, each `value` is expanded ([`expand`]) against the variables defined before it,
/// and a `valueFrom` is taken from `resolve` (for a Secret or ConfigMap key, say) without
/// expansion. A later entry with the same name replaces an earlier one.
///
/// This is the model the tests compare against: a Job's environment is checked after
/// Kubernetes' expansion, not as written in the spec.
pub fn container_env_after_expansion(
    env: &[k8s_openapi::api::core::v1::EnvVar],
    resolve: impl Fn(&k8s_openapi::api::core::v1::EnvVar) -> Option<String>,
) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for var in env {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) if !v.is_empty() => expand(v, &seen),
            (_, Some(_)) => resolve(var).unwrap_or_default(),
            _ => String::new(),
        };
        seen.insert(var.name.clone(), value);
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use serf_client::{MemberEvent, MemberEventKind, MemberStatus, UserEvent};

    #[test]
    fn tag_names_follow_serf() {
        assert_eq!(tag_env_name("my-tag.x"), "SERF_TAG_MY_TAG_X");
        assert_eq!(tag_env_name("role"), "SERF_TAG_ROLE");
        assert_eq!(tag_env_name("dc_2"), "SERF_TAG_DC_2");
        // Unicode, as Go's strings.ToUpper and Serf's sanitizer do it.
        assert_eq!(tag_env_name("ſite"), "SERF_TAG_SITE");
        assert_eq!(tag_env_name("ıd"), "SERF_TAG_ID");
        assert_eq!(tag_env_name("straße"), "SERF_TAG_STRA_E");
        assert_eq!(tag_env_name("zoné"), "SERF_TAG_ZON_");
        assert_eq!(tag_env_name("日本"), "SERF_TAG___");
        // Colliding names: one variable, the last tag in name order.
        let tags: BTreeMap<String, String> =
            [("my-tag", "dash"), ("my_tag", "under"), ("MY.TAG", "dot")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let env = tag_env(&tags);
        assert_eq!(env.len(), 1);
        assert_eq!(env["SERF_TAG_MY_TAG"], "under");
    }

    #[test]
    fn expansion_matches_kubernetes() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x $(A) y", &vars), "x 1 y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$ $( $(A", &vars), "$ $( $(A");
        assert_eq!(expand("$(A)$(A)", &vars), "11");
        // A value containing $(..) is not expanded again.
        let vars: BTreeMap<String, String> = [("A".to_string(), "$(A)".to_string())].into();
        assert_eq!(expand("$(A)", &vars), "$(A)");
    }

    #[test]
    fn stdin_for_payloads_and_members() {
        let ev = Event::User(UserEvent {
            ltime: 1,
            name: "d".into(),
            payload: b"payload".to_vec(),
            coalesce: true,
        });
        assert_eq!(stdin(&ev), b"payload\n");
        let member = Member::new(
            "node\t3",
            "127.0.0.1".parse().unwrap(),
            7946,
            [
                ("role".to_string(), "db".to_string()),
                ("ver".to_string(), "2".to_string()),
            ]
            .into(),
            MemberStatus::Failed,
        );
        let ev = Event::Member(MemberEvent {
            kind: MemberEventKind::Failed,
            members: vec![member],
        });
        assert_eq!(stdin(&ev), b"node\\t3\t127.0.0.1\tdb\trole=db,ver=2\n");
    }

    #[test]
    fn non_text_payload_gets_base64() {
        let node = SelfNode {
            name: "n".into(),
            tags: [("role".to_string(), "web".to_string())].into(),
        };
        let ev = Event::User(UserEvent {
            ltime: 7,
            name: "blob".into(),
            payload: vec![0xff, 0x00, b'a'],
            coalesce: false,
        });
        let env: BTreeMap<_, _> = environment(&ev, &node).into_iter().collect();
        assert_eq!(env["SERF_PAYLOAD_BASE64"], "/wBh");
        assert_eq!(env["SERF_PAYLOAD"], "\u{fffd}\u{fffd}a");
        assert_eq!(env["SERF_USER_LTIME"], "7");
        assert_eq!(env["SERF_TAG_ROLE"], "web");
    }

    #[test]
    fn literal_values_survive_kubernetes_expansion() {
        use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
        let hostile: &[&str] = &[
            "$(X)",
            "$$",
            "$(",
            "$",
            "a $(SERF_EVENT) b $$ c $(UNDEF)",
            "$(DB_PASSWORD)",
            "$$(DB_PASSWORD)",
            "$$$(DB_PASSWORD)$",
            "x$(DB_PASSWORD",
            "\u{fffd}$(DB_PASSWORD)\u{fffd}",
            "",
        ];
        for &value in hostile {
            // The template defines a secret-backed variable first, then the Serf values.
            let env = vec![
                EnvVar {
                    name: "DB_PASSWORD".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "db".into(),
                            key: "pw".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                },
                EnvVar {
                    name: "SERF_EVENT".into(),
                    value: Some(kube_literal("user")),
                    value_from: None,
                },
                EnvVar {
                    name: "SERF_PAYLOAD".into(),
                    value: Some(kube_literal(value)),
                    value_from: None,
                },
            ];
            let seen = container_env_after_expansion(&env, |_| Some("s3cret".into()));
            assert_eq!(seen["DB_PASSWORD"], "s3cret");
            assert_eq!(seen["SERF_PAYLOAD"], value, "payload {value:?}");
            assert!(!seen["SERF_PAYLOAD"].contains("s3cret"));
            // args: ["$(SERF_PAYLOAD)"] still receives the payload, unexpanded.
            assert_eq!(expand("$(SERF_PAYLOAD)", &seen), value);
        }
        // Unescaped, the same payload would leak the secret: the model is not a no-op.
        let env = vec![
            EnvVar {
                name: "DB_PASSWORD".into(),
                value: Some("s3cret".into()),
                value_from: None,
            },
            EnvVar {
                name: "SERF_PAYLOAD".into(),
                value: Some("$(DB_PASSWORD)".into()),
                value_from: None,
            },
        ];
        let seen = container_env_after_expansion(&env, |_| None);
        assert_eq!(seen["SERF_PAYLOAD"], "s3cret");
    }

    #[test]
    fn non_utf8_payload_values_are_literal_too() {
        let node = SelfNode {
            name: "n$(A)".into(),
            tags: [("role".to_string(), "$(DB_PASSWORD)".to_string())].into(),
        };
        let ev = Event::User(UserEvent {
            ltime: 7,
            name: "$(X)".into(),
            payload: vec![0xff, b'$', b'(', b'A', b')', 0x00],
            coalesce: false,
        });
        let vars: BTreeMap<String, String> = [("A".to_string(), "leak".to_string())].into();
        for (k, v) in environment(&ev, &node) {
            let seen = expand(&kube_literal(&v), &vars);
            assert_eq!(seen, v, "{k}");
            assert!(!seen.contains("leak"), "{k}");
        }
    }
}
