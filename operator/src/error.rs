//! The operator's one error type and its category: whether a failed call to the API server
//! or the Serf agent can succeed later (retry with backoff) or never will (report it).

use std::time::Duration;

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The other side is unreachable, overloaded or slow: the same call can succeed later
    /// (transport errors, timeouts, 429, 5xx).
    Transient,
    /// The request itself is refused (any other 4xx, an invalid object, Serf's refusal):
    /// retrying cannot help.
    Final,
}

/// Everything that can go wrong while the operator works.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A call to the API server did not answer in time.
    #[error("{what}: the API server did not answer within {after:?}")]
    KubeTimeout {
        /// What was being done.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// A call to the Serf agent failed.
    #[error("{what}: {source}")]
    Serf {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: serf_client::Error,
    },
    /// No connection to the Serf agent right now.
    #[error("not connected to the Serf agent")]
    SerfDisconnected,
    /// An object the operator cannot act on (its own status says why).
    #[error("{0}")]
    Invalid(String),
    /// A stored record that cannot be read.
    #[error("{what}: {message}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        message: String,
    },
}

impl Error {
    /// Wraps an API error with what was being done.
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Error {
        Error::Kube {
            what: what.into(),
            source,
        }
    }

    /// Retry or report.
    pub fn category(&self) -> Category {
        match self {
            Error::Kube { source, .. } => kube_category(source),
            Error::KubeTimeout { .. } | Error::SerfDisconnected => Category::Transient,
            Error::Serf { source, .. } => {
                if source.is_connection_error()
                    || matches!(source, serf_client::Error::Timeout { .. })
                {
                    Category::Transient
                } else {
                    Category::Final
                }
            }
            Error::Invalid(_) | Error::Corrupt { .. } => Category::Final,
        }
    }

    /// The HTTP status of an API error, if there is one.
    pub fn http_code(&self) -> Option<u16> {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }

    /// The metric label of an API error: its HTTP status, `timeout` or `transport`.
    pub fn code_label(&self) -> String {
        match self {
            Error::KubeTimeout { .. } => "timeout".into(),
            other => other
                .http_code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "transport".into()),
        }
    }

    /// The message to show a user: the API server's own text where there is one.
    pub fn user_message(&self) -> String {
        match self {
            Error::Kube {
                what,
                source: kube::Error::Api(s),
            } => format!("{what}: {}", s.message),
            other => other.to_string(),
        }
    }
}

/// Retry or report, for an API error.
pub fn kube_category(e: &kube::Error) -> Category {
    match e {
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 => Category::Transient,
        kube::Error::Api(_) => Category::Final,
        kube::Error::HyperError(_) | kube::Error::Service(_) => Category::Transient,
        _ => Category::Final,
    }
}

/// Runs one API call with a deadline: an API server that accepts connections but never
/// answers becomes [`Error::KubeTimeout`] instead of a task that waits forever.
///
/// # Errors
/// The call's error, or the timeout.
pub async fn kube_call<T>(
    what: &str,
    after: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::kube(what, e)),
        Err(_) => Err(Error::KubeTimeout {
            what: what.to_string(),
            after,
        }),
    }
}

/// [`kube_call`] for a step that already returns this crate's [`Error`].
///
/// # Errors
/// The step's error, or the timeout.
pub async fn timed<T>(
    what: &str,
    after: Duration,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(after, step).await {
        Ok(r) => r,
        Err(_) => Err(Error::KubeTimeout {
            what: what.to_string(),
            after,
        }),
    }
}

/// Operator result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", "Reason")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn categories() {
        assert_eq!(kube_category(&api(500)), Category::Transient);
        assert_eq!(kube_category(&api(503)), Category::Transient);
        assert_eq!(kube_category(&api(429)), Category::Transient);
        assert_eq!(kube_category(&api(422)), Category::Final);
        assert_eq!(kube_category(&api(403)), Category::Final);
        let t = Error::KubeTimeout {
            what: "x".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(t.category(), Category::Transient);
        assert_eq!(t.code_label(), "timeout");
        assert_eq!(Error::kube("create", api(422)).code_label(), "422");
        assert_eq!(Error::Invalid("bad".into()).category(), Category::Final);
    }
}
