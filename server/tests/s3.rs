//! `kandle-server pull` from S3, through a real S3-compatible server (moto) on loopback.
mod common;

use common::{TinyLlama, status_of, venv_bin};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Moto(Child, String);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> Moto {
    // Port 0, and the address from moto's "Running on" line: a port picked beforehand could
    // be taken by another test's server in between.
    let mut child = Command::new(venv_bin("moto_server"))
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moto_server from the test virtualenv (scripts/test installs it)");
    let (found, address) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    // moto logs every request to stderr: read it to the end, or it would block on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("Running on ").nth(1) {
                let _ = found.send(url.trim().to_string());
            }
        }
    });
    let url = address
        .recv_timeout(Duration::from_secs(30))
        .expect("moto_server did not say where it listens");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&format!("{url}/")).is_none() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Moto(child, url)
}

/// moto accepts unsigned requests, so plain PUTs create the bucket and objects.
fn put(url: &str, body: Vec<u8>) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "PUT {url}: {response}"
    );
}

fn pull(moto: &Moto, uri: &str, dest: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kandle-server"))
        .args(["pull", "--model", uri, "--dest"])
        .arg(dest)
        .env("AWS_ENDPOINT_URL", &moto.1)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap()
}

#[test]
fn pulls_a_model_from_s3_verified_against_etags() {
    let moto = moto();
    let model = tempfile::tempdir().unwrap();
    TinyLlama::FAST.write(model.path());
    put(&format!("{}/models", moto.1), Vec::new());
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        put(
            &format!("{}/models/team/tiny/{name}", moto.1),
            std::fs::read(model.path().join(name)).unwrap(),
        );
    }
    put(
        &format!("{}/models/team/tiny/onnx/model.onnx", moto.1),
        vec![0; 100],
    );

    let dest = tempfile::tempdir().unwrap();
    let out = pull(&moto, "s3://models/team/tiny", dest.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(dest.path().join(name)).unwrap(),
            std::fs::read(model.path().join(name)).unwrap()
        );
    }
    assert!(!dest.path().join("onnx").exists());
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.path().join(".kandle-pull.json")).unwrap())
            .unwrap();
    assert_eq!(marker["source"], "s3://models/team/tiny");
    assert_eq!(marker["files"].as_array().unwrap().len(), 4);

    let missing = tempfile::tempdir().unwrap();
    let out = pull(&moto, "s3://no-such-bucket/x", missing.path());
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
