//! `kandle-server pull` against a hub-like server on loopback with injected faults.
mod common;

use common::hub::{self, Faults, Hub, Repo};
use common::{Server, TinyLlama, post};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub holding `org/tiny`: a tiny Llama plus files a model does not need.
fn hub_with_tiny() -> (Arc<Hub>, String) {
    hub_with(&TinyLlama::FAST)
}

fn hub_with(model: &TinyLlama) -> (Arc<Hub>, String) {
    let dir = tempfile::tempdir().unwrap();
    model.write(dir.path());
    let mut files = std::collections::BTreeMap::new();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.insert(
            name.to_string(),
            std::fs::read(dir.path().join(name)).unwrap(),
        );
    }
    for junk in [
        "README.md",
        "onnx/model.onnx",
        "pytorch_model.bin",
        "flax_model.msgpack",
    ] {
        files.insert(junk.to_string(), vec![7u8; 2000]);
    }
    let hub = Arc::new(Hub::default());
    hub.add_repo(
        "org/tiny",
        Repo {
            commit: COMMIT.into(),
            files,
            token: None,
            listing: None,
        },
    );
    let url = hub::start(hub.clone());
    (hub, url)
}

fn pull_cmd(endpoint: &str, uri: &str, dest: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kandle-server"));
    cmd.args(["pull", "--model", uri, "--dest"])
        .arg(dest)
        .args(extra);
    cmd.env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env("RUST_LOG", "info");
    cmd
}

fn pull(endpoint: &str, uri: &str, dest: &Path, extra: &[&str]) -> Output {
    pull_cmd(endpoint, uri, dest, extra).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first and last byte a hit asked for (`bytes=A-B`).
fn range(hit: &hub::Hit) -> (u64, u64) {
    let (a, b) = hit
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.split_once('-'))
        .unwrap_or_else(|| panic!("a bounded range: {hit:?}"));
    (a.parse().unwrap(), b.parse().unwrap())
}

fn marker(dest: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dest.join(".kandle-pull.json")).unwrap()).unwrap()
}

#[tokio::test]
async fn pulls_what_a_model_needs_verified_and_serves_it() {
    let (hub, endpoint) = hub_with_tiny();
    let dest = tempfile::tempdir().unwrap();
    let report = dest.path().join("report.json");
    let out = pull(
        &endpoint,
        "hf://org/tiny",
        &dest.path().join("model"),
        &["--report-file", report.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dest = dest.path().join("model");
    let read_report = || -> serde_json::Value {
        let mut r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let seconds = r.as_object_mut().unwrap().remove("seconds").unwrap();
        assert!(seconds.as_f64().is_some_and(|s| s >= 0.0), "{seconds}");
        r
    };
    let first = read_report();
    let m = marker(&dest);
    assert_eq!(m["source"], "hf://org/tiny");
    assert_eq!(
        m["revision"], COMMIT,
        "the branch is resolved to its commit"
    );
    let files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for f in m["files"].as_array().unwrap() {
        let data = std::fs::read(dest.join(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(f["sha256"], hub::sha256_hex(&data));
        assert_eq!(f["size"], data.len());
    }
    let total: u64 = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["size"].as_u64().unwrap())
        .sum();
    let expected = |fetched: u64| {
        serde_json::json!({"source": "hf://org/tiny", "revision": COMMIT, "sizeBytes": total,
            "files": 4, "pulledBytes": fetched})
    };
    assert_eq!(
        first,
        expected(total),
        "the report the operator reads from the termination message"
    );
    assert!(!dest.join("onnx").exists() && !dest.join("pytorch_model.bin").exists());

    // Pulled again: the listing only, no file fetched or hashed again.
    let before = hub.resolve_hits();
    let again = pull(
        &endpoint,
        "hf://org/tiny",
        &dest,
        &["--report-file", report.to_str().unwrap()],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(hub.resolve_hits(), before, "no file was fetched twice");
    assert_eq!(read_report(), expected(0), "nothing came over the network");
    assert!(
        stderr(&again).contains("already pulled"),
        "{}",
        stderr(&again)
    );

    let server = Server::start(&dest, &["--served-model-name", "tiny"]);
    let (status, _) = post(
        &server,
        "/v1/completions",
        serde_json::json!({"model": "tiny", "prompt": "hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200);
}

#[test]
fn transient_faults_are_retried_and_dropped_downloads_resume_with_range() {
    let (hub, endpoint) = hub_with_tiny();
    hub.fault("config.json", Faults::unavailable(2));
    // Paced so the client reads what came before the drop (a reset discards unread bytes).
    hub.fault(
        "model.safetensors",
        Faults::drop_after(40_000, 1).throttled(5),
    );
    let dest = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, "hf://org/tiny", dest.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let statuses: Vec<u16> = hub
        .hits_for("config.json")
        .iter()
        .map(|h| h.status)
        .collect();
    // A file of known size is always asked for as a range.
    assert_eq!(statuses, [503, 503, 206]);
    let hits = hub.hits_for("model.safetensors");
    assert_eq!(hits.len(), 2, "{hits:?}");
    let (resumed_at, _) = range(&hits[1]);
    assert!(
        resumed_at > 0 && resumed_at <= 40_000,
        "the retry continues where the drop left off: {hits:?}"
    );
    let data = std::fs::read(dest.path().join("model.safetensors")).unwrap();
    assert_eq!(
        marker(dest.path())["files"][1]["sha256"],
        hub::sha256_hex(&data)
    );
}

#[test]
fn a_source_without_ranges_resumes_by_skipping_what_is_there() {
    let (hub, endpoint) = hub_with_tiny();
    hub.fault(
        "model.safetensors",
        Faults::drop_after(40_000, 1).throttled(5).ignoring_ranges(),
    );
    let dest = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, "hf://org/tiny", dest.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let statuses: Vec<u16> = hub
        .hits_for("model.safetensors")
        .iter()
        .map(|h| h.status)
        .collect();
    assert_eq!(statuses, [200, 200]);
    let data = hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"].clone();
    assert_eq!(
        std::fs::read(dest.path().join("model.safetensors")).unwrap(),
        data
    );

    // A URL of unknown size: the part is thrown away when the whole file comes again.
    hub.fault(
        "model.safetensors",
        Faults::drop_after(40_000, 1).throttled(5).ignoring_ranges(),
    );
    let url = format!("{endpoint}/org/tiny/resolve/main/model.safetensors");
    let single = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, &url, single.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hits = hub.hits_for("model.safetensors");
    assert!(hits[hits.len() - 1].range.is_some(), "{hits:?}");
    assert_eq!(
        std::fs::read(single.path().join("model.safetensors")).unwrap(),
        data
    );
}

#[test]
fn corrupted_files_are_fetched_again_then_refused_naming_both_hashes() {
    let (hub, endpoint) = hub_with_tiny();
    hub.fault("tokenizer.json", Faults::corrupt(1));
    let once = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, "hf://org/tiny", once.path(), &[]);
    assert!(
        out.status.success(),
        "one bad download is retried from scratch: {}",
        stderr(&out)
    );
    assert_eq!(hub.hits_for("tokenizer.json").len(), 2);

    hub.fault("model.safetensors", Faults::corrupt(2));
    let twice = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, "hf://org/tiny", twice.path(), &[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "integrity failures are permanent"
    );
    let err = stderr(&out);
    let expected =
        hub::sha256_hex(&hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"]);
    assert!(
        err.contains("model.safetensors")
            && err.contains(&expected)
            && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(
        !twice.path().join(".kandle-pull.json").exists(),
        "no marker for a failed pull"
    );
    assert!(
        !twice.path().join("model.safetensors").exists(),
        "no bad file is published"
    );
}

#[test]
fn auth_and_missing_repos_fail_at_once_with_a_cause() {
    let (hub, endpoint) = hub_with_tiny();
    let mut files = std::collections::BTreeMap::new();
    files.insert("model.gguf".to_string(), vec![1u8; 4096]);
    hub.add_repo(
        "org/gated",
        Repo {
            commit: COMMIT.into(),
            files,
            token: Some("hf_secret_token".into()),
            listing: None,
        },
    );
    let dest = tempfile::tempdir().unwrap();

    let started = Instant::now();
    let report = dest.path().join("report.json");
    let out = pull(
        &endpoint,
        "hf://org/gated",
        dest.path(),
        &["--report-file", report.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["transient"], false);
    assert!(
        report["error"].as_str().unwrap().contains("401"),
        "{report}"
    );
    assert!(
        stderr(&out).contains("hf://org/gated") && stderr(&out).contains("HF_TOKEN"),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "permanent errors are not retried"
    );

    // The operator mounts the token's Secret as files, `optional`: a Secret not created yet
    // is an empty folder, waited for, then reported with an exit code of its own.
    let mounted = tempfile::tempdir().unwrap();
    let credentials = mounted.path().join("credentials");
    let report = mounted.path().join("report.json");
    let flags = [
        "--credentials-dir",
        credentials.to_str().unwrap(),
        "--credentials-secret",
        "hf-token",
        "--credentials-wait-seconds",
        "1",
        "--report-file",
        report.to_str().unwrap(),
    ];
    let out = pull(&endpoint, "hf://org/gated", dest.path(), &flags);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let missing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(
        missing["error"]
            .as_str()
            .unwrap()
            .contains("secret \"hf-token\" not found"),
        "{missing}"
    );
    assert_eq!(missing["transient"], false, "it needs someone to act");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("HF_TOKEN"), "hf_secret_token\n").unwrap();
    let out = pull(&endpoint, "hf://org/gated", dest.path(), &flags);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hf_secret_token"));

    let out = pull_cmd(&endpoint, "hf://org/gated", dest.path(), &[])
        .env("HF_TOKEN", "hf_secret_token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("hf_secret_token"),
        "secrets never reach the logs"
    );

    let out = pull(&endpoint, "hf://org/missing", dest.path(), &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[test]
fn persistent_server_errors_are_transient_with_their_own_exit_code() {
    let (hub, endpoint) = hub_with_tiny();
    hub.fault("config.json", Faults::unavailable(1000));
    let dest = tempfile::tempdir().unwrap();
    let out = pull(
        &endpoint,
        "hf://org/tiny",
        dest.path(),
        &["--retry-seconds", "2"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        hub.hits_for("config.json").len() >= 3,
        "retried with backoff before giving up"
    );
}

#[test]
fn concurrent_pulls_into_one_folder_download_once() {
    let (hub, endpoint) = hub_with_tiny();
    hub.fault("model.safetensors", Faults::default().throttled(20));
    let dest = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            pull_cmd(&endpoint, "hf://org/tiny", dest.path(), &[])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(
        hub.hits_for("model.safetensors").len(),
        1,
        "one process downloaded, the other waited"
    );
    assert_eq!(marker(dest.path())["revision"], COMMIT);
}

#[test]
fn a_killed_pull_resumes_with_range_requests_for_the_missing_bytes_only() {
    // About 30 MiB from a source pacing each connection, so the file takes more of them.
    let (hub, endpoint) = hub_with(&TinyLlama::SLOW);
    hub.fault("model.safetensors", Faults::default().throttled(2));
    let size = hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"].len() as u64;
    let dest = tempfile::tempdir().unwrap();
    let mut child = pull_cmd(
        &endpoint,
        "hf://org/tiny",
        dest.path(),
        &["--range-min-bytes", "1048576"],
    )
    .spawn()
    .unwrap();
    let marks = dest
        .path()
        .join(".kandle-staging/.kandle-ranges-model.safetensors");
    let written = || -> Vec<(u64, u64)> {
        std::fs::read_to_string(&marks)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while written().iter().map(|(a, b)| b - a).sum::<u64>() < 8 << 20 {
        assert!(Instant::now() < deadline, "the download never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = written();
    let before = hub.hits_for("model.safetensors").len();
    hub.fault("model.safetensors", Faults::default());
    let out = pull(&endpoint, "hf://org/tiny", dest.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let resumed = hub.hits_for("model.safetensors")[before..].to_vec();
    assert!(!resumed.is_empty());
    for hit in &resumed {
        let (first, last) = range(hit);
        assert!(
            kept.iter().all(|&(a, b)| last < a || first >= b),
            "{hit:?} asks again for bytes written before the kill: {kept:?}"
        );
        assert!(last < size);
    }
    let data = std::fs::read(dest.path().join("model.safetensors")).unwrap();
    assert_eq!(
        data,
        hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"]
    );
}

#[test]
fn single_urls_are_checked_against_sha256_and_local_paths_are_copied_unchanged() {
    let (hub, endpoint) = hub_with_tiny();
    let data = hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"].clone();
    let url = format!("{endpoint}/org/tiny/resolve/main/model.safetensors");
    let dest = tempfile::tempdir().unwrap();
    let good = pull(
        &endpoint,
        &url,
        dest.path(),
        &["--sha256", &hub::sha256_hex(&data)],
    );
    assert!(good.status.success(), "{}", stderr(&good));
    assert_eq!(
        std::fs::read(dest.path().join("model.safetensors")).unwrap(),
        data
    );
    let wrong = tempfile::tempdir().unwrap();
    let bad = pull(
        &endpoint,
        &url,
        wrong.path(),
        &["--sha256", &"0".repeat(64)],
    );
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));

    let copy = tempfile::tempdir().unwrap();
    let out = pull(
        &endpoint,
        &format!("file://{}", dest.path().display()),
        copy.path(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(copy.path().join("model.safetensors")).unwrap(),
        data
    );
    assert_eq!(
        std::fs::read(dest.path().join("model.safetensors")).unwrap(),
        data,
        "the source is untouched"
    );
}

#[test]
fn a_file_takes_more_connections_while_each_is_paced_and_a_dropped_one_resumes() {
    let (hub, endpoint) = hub_with(&TinyLlama::SLOW);
    hub.fault(
        "model.safetensors",
        Faults::drop_after(100_000, 1).throttled(1),
    );
    let dest = tempfile::tempdir().unwrap();
    let out = pull(
        &endpoint,
        "hf://org/tiny",
        dest.path(),
        &["--range-min-bytes", "1048576", "--concurrency", "4"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let hits = hub.hits_for("model.safetensors");
    let starts: Vec<u64> = hits.iter().map(|h| range(h).0).collect();
    assert_eq!(starts[0], 0, "{hits:?}");
    assert!(
        starts.iter().any(|&s| s > 0 && s <= 100_000),
        "the dropped connection resumed where it stopped: {hits:?}"
    );
    assert!(
        starts.iter().any(|&s| s > 1 << 20),
        "a paced file was split across connections: {hits:?}"
    );
    let data = std::fs::read(dest.path().join("model.safetensors")).unwrap();
    assert_eq!(
        data,
        hub.repos.lock().unwrap()["org/tiny"].files["model.safetensors"]
    );
    assert!(!dest.path().join(".kandle-staging").exists());
}
