//! `kandle-server pull` against sources that lie: a hub whose listing names files outside
//! the destination, reuses names, omits sizes and hashes or understates them; URLs and
//! options that are malformed. Each is refused at once (exit 3) and writes nothing
//! outside the destination.
mod common;

use common::hub::{self, Faults, Hub, Repo};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub serving `org/evil`: `files` as stored, `listing` as announced.
fn evil_hub(files: &[(&str, Vec<u8>)], listing: Vec<serde_json::Value>) -> (Arc<Hub>, String) {
    let hub = Arc::new(Hub::default());
    let files: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(n, d)| (n.to_string(), d.clone()))
        .collect();
    hub.add_repo(
        "org/evil",
        Repo {
            commit: COMMIT.into(),
            files,
            token: None,
            listing: Some(listing),
        },
    );
    let url = hub::start(hub.clone());
    (hub, url)
}

fn pull(endpoint: &str, uri: &str, dest: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let report = dest.with_extension("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kandle-server"))
        .args(["pull", "--model", uri, "--retry-seconds", "30", "--dest"])
        .arg(dest)
        .arg("--report-file")
        .arg(&report)
        .args(extra)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let report = std::fs::read(&report)
        .map(|r| serde_json::from_slice(&r).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (out, report)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file below `root`, relative to it.
fn files_below(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

/// A permanent failure with a report saying why, reached without retrying.
fn assert_refused(out: &Output, report: &serde_json::Value, started: Instant, cause: &str) {
    assert_eq!(out.status.code(), Some(3), "{}", stderr(out));
    assert_eq!(report["transient"], false, "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains(cause), "expected {cause:?} in {report}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not retried"
    );
}

#[test]
fn names_that_leave_the_destination_or_touch_kandles_files_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("a/b/dest");
    let absolute = root.path().join("abs.gguf").display().to_string();
    let data = vec![9u8; 4096];
    let long = format!("{}.gguf", "x".repeat(300));
    for name in [
        absolute.as_str(),
        "../../escaped.gguf",
        "sub/../../../escaped.gguf",
        "a//b.gguf",
        "nul\0.gguf",
        long.as_str(),
        ".kandle-pull.json",
        ".kandle-staging/x.gguf",
    ] {
        let (hub, endpoint) = evil_hub(&[(name, data.clone())], vec![Repo::entry(name, &data)]);
        let started = Instant::now();
        let (out, report) = pull(&endpoint, "hf://org/evil", &dest, &["--include", "*"]);
        assert_refused(&out, &report, started, "refused");
        assert_eq!(hub.resolve_hits(), 0, "{name:?}: nothing was downloaded");
        let outside: Vec<_> = files_below(root.path())
            .into_iter()
            .filter(|f| !f.starts_with("a/b/dest"))
            .collect();
        assert!(
            outside.is_empty(),
            "{name:?} wrote outside the destination: {outside:?}"
        );
    }
}

#[test]
fn duplicate_names_and_files_without_size_or_hash_are_refused() {
    let data = vec![1u8; 64];
    let dest = tempfile::tempdir().unwrap();
    for (listing, cause) in [
        (
            vec![
                Repo::entry("model.gguf", &data),
                Repo::entry("model.gguf", &data),
            ],
            "listed twice",
        ),
        (
            vec![json!({"rfilename": "model.gguf"})],
            "without the size and hash",
        ),
        (
            vec![json!({"rfilename": "model.gguf", "size": 64})],
            "without the size and hash",
        ),
        (
            vec![
                json!({"rfilename": "model.gguf", "size": 1u64 << 63, "blobId": "ab"}),
                json!({"rfilename": "config.json", "size": 1u64 << 63, "blobId": "ab"}),
            ],
            "add up to more than 2^64 bytes",
        ),
    ] {
        let (hub, endpoint) = evil_hub(&[("model.gguf", data.clone())], listing);
        let started = Instant::now();
        let (out, report) = pull(&endpoint, "hf://org/evil", &dest.path().join("m"), &[]);
        assert_refused(&out, &report, started, cause);
        assert_eq!(hub.resolve_hits(), 0);
    }
}

#[test]
fn a_file_larger_than_announced_is_cut_at_its_size_and_refused() {
    // The listing announces 4 KiB; the hub ignores ranges and sends 1 MiB.
    let big = vec![5u8; 1 << 20];
    let mut entry = Repo::entry("model.gguf", &big[..4096]);
    entry["lfs"]["sha256"] = json!(hub::sha256_hex(&big));
    let (hub, endpoint) = evil_hub(&[("model.gguf", big.clone())], vec![entry]);
    hub.fault("model.gguf", Faults::default().ignoring_ranges());
    let dest = tempfile::tempdir().unwrap();
    let (out, report) = pull(&endpoint, "hf://org/evil", &dest.path().join("m"), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        report["error"].as_str().unwrap().contains("checksum"),
        "{report}"
    );
    for f in files_below(dest.path()) {
        let len = std::fs::metadata(dest.path().join(&f)).unwrap().len();
        assert!(len <= 4096, "{f} grew to {len} bytes");
    }
}

#[test]
fn urls_need_an_announced_size_and_are_reported_unverified_without_sha256() {
    let data = vec![3u8; 10_000];
    let (hub, endpoint) = evil_hub(
        &[("model.gguf", data.clone())],
        vec![Repo::entry("model.gguf", &data)],
    );
    let url = format!("{endpoint}/org/evil/resolve/main/model.gguf");
    let dest = tempfile::tempdir().unwrap();

    let (out, report) = pull(&endpoint, &url, &dest.path().join("ok"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(report["unverifiedFiles"], 1, "{report}");
    let (out, report) = pull(
        &endpoint,
        &url,
        &dest.path().join("checked"),
        &["--sha256", &hub::sha256_hex(&data)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(report.get("unverifiedFiles").is_none(), "{report}");

    hub.fault(
        "model.gguf",
        Faults {
            no_length: true,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    let (out, report) = pull(&endpoint, &url, &dest.path().join("unbounded"), &[]);
    assert_refused(&out, &report, started, "announced no size");
}

#[test]
fn malformed_uris_and_hashes_fail_at_once_before_any_download() {
    let data = vec![3u8; 100];
    let (hub, endpoint) = evil_hub(
        &[("model.gguf", data.clone())],
        vec![Repo::entry("model.gguf", &data)],
    );
    let url = format!("{endpoint}/org/evil/resolve/main/model.gguf");
    let dest = tempfile::tempdir().unwrap();
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        ("https://".into(), vec![], "not a valid URL"),
        ("https://[::1".into(), vec![], "not a valid URL"),
        ("https://h:99999/m.gguf".into(), vec![], "not a valid URL"),
        ("s3://a b/x".into(), vec![], "an S3 model is"),
        ("hf://../..".into(), vec![], "a hub model is"),
        ("hf://org/evil@../../x".into(), vec![], "a hub model is"),
        (url.clone(), vec!["--sha256", ""], "64 hexadecimal digits"),
        (
            url.clone(),
            vec!["--sha256", "xyz"],
            "64 hexadecimal digits",
        ),
    ];
    for (uri, extra, cause) in cases {
        let started = Instant::now();
        let (out, report) = pull(&endpoint, &uri, &dest.path().join("m"), &extra);
        assert_refused(&out, &report, started, cause);
    }
    assert_eq!(hub.resolve_hits(), 0, "nothing was downloaded");
}
