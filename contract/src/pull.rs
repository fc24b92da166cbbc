//! `kandle-server pull`'s outcome: its exit code, and the one-line JSON report it writes
//! to `--report-file` (the pull container's termination message, which the operator reads).
use serde::{Deserialize, Serialize};

/// The pull will fail again until something changes (auth, URI, integrity): the pull Job
/// stops retrying.
pub const EXIT_PERMANENT: u8 = 3;
/// The pull may succeed if retried later (network, 5xx, 429).
pub const EXIT_TRANSIENT: u8 = 4;
/// The credentials Secret does not exist: the pull fails until someone creates it, so it
/// is retried (slowly) but shown as failed.
pub const EXIT_MISSING_SECRET: u8 = 5;

/// Written last in a pulled folder: it holds every file it lists, verified.
pub const MARKER: &str = ".kandle-pull.json";
/// Locked (`flock`) by the one process pulling into a folder; others wait on it, and the
/// node cache's collector skips a folder whose lock is held.
pub const LOCK: &str = ".kandle-pull.lock";

/// The report: on success what was pulled, on failure why and whether a retry may help.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The model URI pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What the source's reference resolved to: a hub commit, an OCI manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Bytes that came over the network: 0 when the volume held the model already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_bytes: Option<u64>,
    /// How long the pull took, to a tenth of a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Files checked by size alone: their source published no hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unverified_files: Option<u64>,
    /// The failure as users should read it (it names the URI and the cause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether a later retry may succeed (exit code [`EXIT_TRANSIENT`]) or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transient: Option<bool>,
}

impl Report {
    /// The report of a pull that died before writing one (OOM, a signal), from its exit code.
    pub fn from_exit(code: i32, reason: &str) -> Self {
        Self {
            error: Some(format!("the pull exited with code {code} ({reason})")),
            transient: Some(code != i32::from(EXIT_PERMANENT)),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_one_camel_case_line_without_empty_fields() {
        let report = Report {
            revision: Some("abc".into()),
            size_bytes: Some(7),
            files: Some(2),
            ..Report::default()
        };
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(line, r#"{"revision":"abc","sizeBytes":7,"files":2}"#);
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), report);
    }

    #[test]
    fn an_exit_without_a_report_is_permanent_only_for_the_permanent_code() {
        assert_eq!(Report::from_exit(3, "Error").transient, Some(false));
        assert_eq!(Report::from_exit(137, "OOMKilled").transient, Some(true));
    }
}
