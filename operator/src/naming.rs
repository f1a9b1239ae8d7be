//! Deterministic Job names and label values. A Job's name is a pure function of its event,
//! so a duplicated or replayed event, a restart or a second replica creates the same name and
//! the API server refuses the second create (409). The scheme is versioned and pinned by
//! golden tests: changing it would launch old events again.

use sha2::{Digest, Sha256};

/// The version of the naming scheme, part of every hash.
const SCHEME: &[u8] = b"serf-operator/job-name/v1";

/// Length of the hash suffix (hex characters; 48 bits).
const HASH_LEN: usize = 12;

/// Kubernetes' limit for names that also become label values (`job-name`).
pub const MAX_NAME: usize = 63;

/// The deterministic name of the Job that `route` of `handler` launches for the event
/// identified by `key` (the event's identity: see [`crate::engine::EventKey`]).
///
/// The name is `<handler>-<route>-<hash>`, shortened to fit 63 characters; the hash covers
/// the full handler and route names and the key, so shortening never merges two events.
pub fn job_name(handler: &str, route: &str, key: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(SCHEME);
    for part in [handler.as_bytes(), route.as_bytes()]
        .into_iter()
        .chain(key.iter().copied())
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let hash: String = digest
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .take(HASH_LEN)
        .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('0'))
        .collect();
    let prefix = dns_label(&format!("{handler}-{route}"), MAX_NAME - HASH_LEN - 1);
    if prefix.is_empty() {
        format!("serf-{hash}")
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Makes `s` a DNS-1123 label of at most `max` characters: lower-case alphanumerics and
/// `-`, starting and ending with an alphanumeric. May return an empty string.
pub fn dns_label(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(max);
    out.trim_matches('-').to_string()
}

/// Makes `s` a valid label value (at most 63 characters of `[A-Za-z0-9._-]`, starting and
/// ending with an alphanumeric). Anything else becomes `_`; longer values are cut.
pub fn label_value(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(MAX_NAME);
    out.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden names: these must never change between releases.
    #[test]
    fn golden_names() {
        assert_eq!(
            job_name("web", "deploy", &[b"user", b"deploy", b"42", b"v1.2.3"]),
            GOLDEN[0]
        );
        assert_eq!(
            job_name(
                "a-very-long-handler-name-that-goes-on-and-on",
                "and-a-long-route-name-too",
                &[b"member-failed", b"db-1", b"failed", b"3"]
            ),
            GOLDEN[1]
        );
    }

    const GOLDEN: [&str; 2] = [
        "web-deploy-4d84b85ebeb1",
        "a-very-long-handler-name-that-goes-on-and-on-and-a-d38d163405d7",
    ];

    #[test]
    fn names_are_labels_and_distinct() {
        let a = job_name("h", "r", &[b"user", b"x", b"1"]);
        let b = job_name("h", "r", &[b"user", b"x", b"2"]);
        let c = job_name("h", "r", &[b"user", b"x1", b""]);
        let d = job_name("h", "r", &[b"user", b"x", b"1", b""]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        for n in [&a, &b, &c] {
            assert!(n.len() <= MAX_NAME);
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
        }
        let long = job_name(&"x".repeat(250), &"y".repeat(40), &[b"k"]);
        assert_eq!(long.len(), MAX_NAME);
        // Two handlers that share a long prefix still get different names.
        let p = "x".repeat(60);
        assert_ne!(
            job_name(&format!("{p}a"), "r", &[b"k"]),
            job_name(&format!("{p}b"), "r", &[b"k"])
        );
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value("deploy"), "deploy");
        assert_eq!(label_value("dé ploy!"), "d__ploy");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"a".repeat(100)).len(), 63);
    }
}
