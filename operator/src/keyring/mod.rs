//! **Gossip key rotation** from a Kubernetes Secret across the whole Serf cluster: the
//! Secret's keyring format ([`Keyring`], [`Key`]), the pure decision of what comes next
//! ([`plan`]), the RPC steps that carry it out with the state recorded before each one
//! ([`rotate`]), and the controller that watches the Secret
//! ([`crate::controller::keyring`]).
//!
//! The Secret (the chart's `serf.encryptKeySecret`) holds the primary key under `key` (as it
//! always did) and, optionally, more keys to keep installed under `keys` (base64 keys
//! separated by whitespace or commas). Keys never leave the Secret and the agents: records,
//! status, Events and logs name a key by its [fingerprint](Key::fingerprint).

pub mod plan;
pub mod rotate;

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The Secret's entry with the primary key (the one the chart has always read).
pub const PRIMARY_ENTRY: &str = "key";
/// The Secret's optional entry with more keys to keep installed.
pub const OTHERS_ENTRY: &str = "keys";

/// One gossip key: base64 of 16, 24 or 32 bytes, as Serf takes it. Its `Debug` and
/// `Display` show the fingerprint only.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Checks `text` (surrounding whitespace ignored) and keeps it in Serf's standard
    /// base64 form. The error never contains the text.
    ///
    /// # Errors
    /// Not base64, or not 16, 24 or 32 bytes.
    pub fn parse(text: &str) -> Result<Key, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| "is not base64 (make one with `serf keygen`)".to_string())?;
        if !matches!(raw.len(), 16 | 24 | 32) {
            return Err(format!(
                "is {} bytes; Serf takes 16, 24 or 32 (make one with `serf keygen`)",
                raw.len()
            ));
        }
        Ok(Key(base64::engine::general_purpose::STANDARD.encode(raw)))
    }

    /// The key in base64, for the agent.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A name for the key that does not reveal it: the first 12 hex digits of the SHA-256
    /// of its bytes (the same whatever the base64 spelling).
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.0)
    }
}

/// The fingerprint of a base64 key as an agent reports it (see [`Key::fingerprint`]); text
/// that is not base64 is fingerprinted as it is.
pub fn fingerprint_of(base64_key: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(base64_key.trim())
        .unwrap_or_else(|_| base64_key.as_bytes().to_vec());
    let digest = Sha256::digest(&raw);
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// The keyring a Secret asks for: the primary key and the others to keep installed (no
/// duplicates, the primary not among them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    /// The key every member encrypts with.
    pub primary: Key,
    /// More keys every member keeps installed (decrypts with), in the Secret's order.
    pub others: Vec<Key>,
}

impl Keyring {
    /// Reads the Secret's data (`key`, optional `keys`). Errors name the entry and the
    /// problem, never a key.
    ///
    /// # Errors
    /// No `key`, an entry that is not UTF-8, or a key that is not a Serf key.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Keyring, String> {
        Self::from_entries(data, PRIMARY_ENTRY)
    }

    /// As [`Keyring::from_secret_data`], with the primary key under `primary_entry` (the
    /// chart's `serf.encryptKeySecret.key`).
    ///
    /// # Errors
    /// As [`Keyring::from_secret_data`].
    pub fn from_entries(
        data: &BTreeMap<String, Vec<u8>>,
        primary_entry: &str,
    ) -> Result<Keyring, String> {
        let text = |entry: &str| -> Result<Option<&str>, String> {
            data.get(entry)
                .map(|b| {
                    std::str::from_utf8(b)
                        .map_err(|_| format!("the Secret's entry {entry:?} is not text"))
                })
                .transpose()
        };
        let primary = text(primary_entry)?.ok_or_else(|| {
            format!("the Secret has no entry {primary_entry:?} (the primary key)")
        })?;
        let primary =
            Key::parse(primary).map_err(|e| format!("the Secret's entry {primary_entry:?} {e}"))?;
        let mut others = Vec::new();
        if let Some(list) = text(OTHERS_ENTRY)? {
            for (i, k) in list
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .enumerate()
            {
                let k = Key::parse(k).map_err(|e| {
                    format!("key {} of the Secret's entry {OTHERS_ENTRY:?} {e}", i + 1)
                })?;
                if k != primary && !others.contains(&k) {
                    others.push(k);
                }
            }
        }
        Ok(Keyring { primary, others })
    }

    /// Every key, the primary first.
    pub fn all(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.primary).chain(self.others.iter())
    }

    /// Whether `base64_key` is one of the keyring's keys.
    pub fn contains(&self, base64_key: &str) -> bool {
        let fp = fingerprint_of(base64_key);
        self.all().any(|k| k.fingerprint() == fp)
    }

    /// The keyring as Serf's keyring file holds it: a JSON array of base64 keys, the primary
    /// first.
    pub fn to_keyring_file(&self) -> String {
        serde_json::Value::from(
            self.all()
                .map(|k| k.expose().to_string())
                .collect::<Vec<_>>(),
        )
        .to_string()
    }

    /// A name for the whole keyring (its primary and its set of keys), to tell one rotation
    /// from the next: the primary's fingerprint, then the others' in sorted order.
    pub fn target(&self) -> String {
        let mut others: Vec<String> = self.others.iter().map(Key::fingerprint).collect();
        others.sort();
        if others.is_empty() {
            self.primary.fingerprint()
        } else {
            format!("{}+{}", self.primary.fingerprint(), others.join("+"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "5Ryvsc0TikrmZ36jAtWvRQ=="; // 16 bytes

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn data(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_existing_one_key_secret_is_a_keyring_of_one() {
        let k = Keyring::from_secret_data(&data(&[("key", &format!("{A}\n"))])).unwrap();
        assert_eq!(k.primary.expose(), A);
        assert!(k.others.is_empty());
        assert_eq!(k.to_keyring_file(), format!("[\"{A}\"]"));
        assert_eq!(k.target(), k.primary.fingerprint());
    }

    #[test]
    fn other_keys_are_split_on_whitespace_and_commas_without_duplicates() {
        let b = b64(&[2; 32]);
        let c = b64(&[3; 24]);
        let k = Keyring::from_secret_data(&data(&[
            ("key", A),
            ("keys", &format!("{b}, {c}\n{A}\n{b}")),
        ]))
        .unwrap();
        let others: Vec<&str> = k.others.iter().map(Key::expose).collect();
        assert_eq!(others, [b.as_str(), c.as_str()]);
        assert!(k.contains(&c) && k.contains(A) && !k.contains(&b64(&[9; 16])));
        assert_eq!(k.to_keyring_file(), format!("[\"{A}\",\"{b}\",\"{c}\"]"));
    }

    #[test]
    fn bad_keys_are_refused_by_entry_without_showing_them() {
        let short = b64(&[1; 8]);
        for (d, want) in [
            (data(&[]), "no entry \"key\""),
            (
                data(&[("key", "not base64!")]),
                "entry \"key\" is not base64",
            ),
            (data(&[("key", &short)]), "is 8 bytes"),
            (
                data(&[("key", A), ("keys", "zz!")]),
                "key 1 of the Secret's entry \"keys\"",
            ),
        ] {
            let e = Keyring::from_secret_data(&d).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains(&short) && !e.contains("zz!"), "{e}");
        }
        let mut d = data(&[]);
        d.insert("key".into(), vec![0xff, 0xfe]);
        assert!(
            Keyring::from_secret_data(&d)
                .unwrap_err()
                .contains("not text")
        );
    }

    #[test]
    fn a_key_shows_only_its_fingerprint() {
        let k = Key::parse(A).unwrap();
        assert_eq!(k.fingerprint().len(), 12);
        assert!(!format!("{k:?} {k}").contains(A));
        assert_eq!(fingerprint_of(A), k.fingerprint());
    }
}
