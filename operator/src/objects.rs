//! Names of the operator's own state objects in its namespace (the membership record, the
//! Job creates handed over at shutdown, the key rotation record, the Lease): a prefix and a
//! fixed suffix each, so that two installations in one namespace (two Helm releases) keep
//! apart. The prefix is set once at start (`--state-prefix`); it is `serf-operator` unless
//! set.

use std::sync::OnceLock;

/// The prefix when none is set.
pub const DEFAULT_PREFIX: &str = "serf-operator";
/// The longest prefix: the names stay DNS subdomains (253) with room for the suffixes.
pub const MAX_PREFIX: usize = 200;

static PREFIX: OnceLock<String> = OnceLock::new();
static OWNER: OnceLock<serde_json::Value> = OnceLock::new();

/// Checks `prefix`: lower-case letters, digits, `-` and `.`, starting and ending with a
/// letter or digit, at most [`MAX_PREFIX`] characters.
///
/// # Errors
/// What is wrong with it.
pub fn validate(prefix: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if prefix.is_empty() || prefix.len() > MAX_PREFIX {
        return Err(format!(
            "state prefix {prefix:?}: 1 to {MAX_PREFIX} characters"
        ));
    }
    if !prefix.chars().all(ok_char)
        || !alnum(prefix.chars().next())
        || !alnum(prefix.chars().last())
    {
        return Err(format!(
            "state prefix {prefix:?}: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Sets the prefix for this process; the first call wins.
///
/// # Errors
/// The prefix is invalid ([`validate`]), or a different one was set already.
pub fn set_prefix(prefix: &str) -> Result<(), String> {
    validate(prefix)?;
    let set = PREFIX.get_or_init(|| prefix.to_string());
    if set != prefix {
        return Err(format!("state prefix already set to {set:?}"));
    }
    Ok(())
}

/// The prefix in use.
pub fn prefix() -> &'static str {
    PREFIX.get().map_or(DEFAULT_PREFIX, String::as_str)
}

/// Makes the Deployment `name` (in `namespace`) the owner of every state object written from
/// now on, so that deleting it (`helm uninstall`) has Kubernetes' garbage collector delete
/// them too. The first call wins.
///
/// # Errors
/// The Deployment cannot be read (absent, forbidden, the API server did not answer).
pub async fn own_by_deployment(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    timeout: std::time::Duration,
) -> Result<(), crate::error::Error> {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(client.clone(), namespace);
    let d = crate::error::kube_call(
        &format!("read the owner of the state objects, Deployment {namespace}/{name}"),
        timeout,
        api.get(name),
    )
    .await?;
    let uid = d.metadata.uid.unwrap_or_default();
    let _ = OWNER.set(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
    }));
    tracing::info!(deployment = %name, "state objects owned by the Deployment");
    Ok(())
}

/// The owner reference every state object carries, if one was set.
pub fn owner() -> Option<serde_json::Value> {
    OWNER.get().cloned()
}

/// Adds the owner reference (if any) to an object's metadata.
pub fn add_owner(meta: &mut serde_json::Value) {
    if let Some(o) = owner() {
        meta["ownerReferences"] = serde_json::json!([o]);
    }
}

/// The ConfigMap holding the membership last acted on.
pub fn membership() -> String {
    format!("{}-membership", prefix())
}

/// The ConfigMap holding Job creates a shutdown cut short.
pub fn pending_launches() -> String {
    format!("{}-pending-launches", prefix())
}

/// The ConfigMap holding the gossip key rotation's record.
pub fn keyring_record() -> String {
    format!("{}-keyring", prefix())
}

/// The Lease the replicas elect their leader with.
pub fn lease() -> String {
    prefix().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_names_of_earlier_versions() {
        // Unset in this test process: an upgrade without --state-prefix finds its state.
        assert_eq!(membership(), "serf-operator-membership");
        assert_eq!(pending_launches(), "serf-operator-pending-launches");
        assert_eq!(keyring_record(), "serf-operator-keyring");
        assert_eq!(lease(), "serf-operator");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(validate("blue").is_ok());
        assert!(validate("serf-operator-2.eu").is_ok());
        for bad in [
            "",
            "Blue",
            "-a",
            "a-",
            "a_b",
            "a b",
            &"a".repeat(MAX_PREFIX + 1),
        ] {
            let e = validate(bad).unwrap_err();
            assert!(e.starts_with("state prefix"), "{e}");
        }
    }
}
