//! The operator's errors, and the one place that decides what each means for retries.
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not deserialize: schema skew, or written around the CRD's checks.
    #[error("invalid ModelDeployment: {0}")]
    InvalidObject(String),
    #[error("{verb} {kind} {name}: {source}")]
    Api {
        verb: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Low-cardinality label for `kandle_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidObject(_) => "invalid_object",
            Self::Api { .. } if self.needs_spec_change() => "rejected",
            Self::Api { .. } => "api",
        }
    }

    /// Only a change of the ModelDeployment can fix it: retrying would fail the same way.
    pub fn needs_spec_change(&self) -> bool {
        match self {
            Self::InvalidObject(_) => true,
            // The API server refused what the spec asked for (an immutable field, a
            // quantity it will not take).
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => status.code == 400 || status.code == 422,
            Self::Api { .. } => false,
        }
    }
}

/// Delay before retrying after the `failures`-th consecutive transient error: 2 s,
/// doubling, at most 256 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.clamp(1, 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 256, 256]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(256));
    }
}
