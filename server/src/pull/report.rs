//! A pull's outcome as the operator reads it: the exit code and the one-line JSON report
//! (their shape is [`kandle_contract::pull`]'s).
use super::Pulled;
use super::error::PullError;
use kandle_contract::pull::Report;
use std::path::Path;

/// The exit code and report of a pull.
pub fn report(outcome: &Result<Pulled, PullError>) -> (u8, Report) {
    match outcome {
        Ok(Pulled {
            marker,
            fetched_bytes,
            seconds,
        }) => {
            let unverified = marker.files.iter().filter(|f| !f.verified).count();
            let report = Report {
                source: Some(marker.source.clone()),
                revision: marker.revision.clone(),
                pulled_bytes: Some(*fetched_bytes),
                seconds: Some((seconds * 10.0).round() / 10.0),
                size_bytes: Some(marker.files.iter().map(|f| f.size).sum()),
                files: Some(marker.files.len() as u64),
                unverified_files: Some(unverified as u64).filter(|&n| n > 0),
                ..Report::default()
            };
            (0, report)
        }
        Err(e) => {
            let report = Report {
                error: Some(e.to_string()),
                transient: Some(e.is_transient()),
                ..Report::default()
            };
            (e.exit_code(), report)
        }
    }
}

/// Writes the report as one line, as the container's termination message is read.
pub fn write(report: &Report, path: &Path) -> std::io::Result<()> {
    let mut line = serde_json::to_string(report).map_err(std::io::Error::other)?;
    line.push('\n');
    std::fs::write(path, line)
}
