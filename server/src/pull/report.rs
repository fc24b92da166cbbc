//! The one-line JSON outcome of a pull, for whoever started it: the operator reads it
//! from the pull container's termination message, so its shape is part of the contract.
use super::Marker;
use super::error::PullError;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(skip)]
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<usize>,
    /// Files checked by size alone: their source published no hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unverified_files: Option<usize>,
    /// The failure as users should read it (it names the URI and the cause).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether a later retry may succeed (exit code 4) or not (3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transient: Option<bool>,
}

impl Report {
    pub fn of(outcome: &Result<Marker, PullError>) -> Self {
        match outcome {
            Ok(marker) => Self {
                exit_code: 0,
                revision: marker.revision.clone(),
                size_bytes: Some(marker.files.iter().map(|f| f.size).sum()),
                files: Some(marker.files.len()),
                unverified_files: Some(marker.files.iter().filter(|f| !f.verified).count())
                    .filter(|&n| n > 0),
                error: None,
                transient: None,
            },
            Err(e) => Self {
                exit_code: e.exit_code(),
                revision: None,
                size_bytes: None,
                files: None,
                unverified_files: None,
                error: Some(e.to_string()),
                transient: Some(e.is_transient()),
            },
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut line = serde_json::to_string(self).map_err(std::io::Error::other)?;
        line.push('\n');
        std::fs::write(path, line)
    }
}
