//! Clients that hold resources without sending a request, or send far more than a model
//! can take: each costs the server a bounded slot, a bounded time and bounded memory.
mod common;

use common::{Server, TinyLlama, client, error_message, start_tiny, status_of};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; returns what it sent and when it closed.
fn read_until_closed(mut stream: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open: {e}"),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The most resident memory the process has had (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn silent_half_sent_idle_and_slow_body_connections_are_closed() {
    let (_dir, server) = start_tiny(
        &TinyLlama::FAST,
        &[
            "--header-timeout-seconds",
            "1",
            "--body-timeout-seconds",
            "1",
        ],
    );
    let bound = Duration::from_secs(5);

    let (_, after) = read_until_closed(connect(&server));
    assert!(after < bound, "a silent connection stayed {after:?}");

    let mut half = connect(&server);
    half.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, after) = read_until_closed(half);
    assert!(after < bound, "half-sent headers held it {after:?}");

    let mut idle = connect(&server);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, after) = read_until_closed(idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        after < bound,
        "an idle keep-alive connection stayed {after:?}"
    );

    let mut slow = connect(&server);
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .unwrap();
    let (answer, after) = read_until_closed(slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        error_message(&body).contains("did not arrive within 1 s"),
        "{body}"
    );
    assert!(after < bound, "a trickling body held it {after:?}");
}

#[test]
fn connections_beyond_the_cap_wait_and_real_requests_still_get_through() {
    let (_dir, server) = start_tiny(
        &TinyLlama::FAST,
        &["--max-connections", "8", "--header-timeout-seconds", "1"],
    );
    let baseline = open_fds(server.pid());
    let silent: Vec<TcpStream> = (0..40).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let held = open_fds(server.pid()) - baseline;
    assert!(held <= 8, "{held} connections accepted past a cap of 8");
    let started = Instant::now();
    assert_eq!(status_of(&server.url("/readyz")), Some(200));
    // Each round of silent connections is closed by the header timeout; the request waits
    // behind them in the backlog, never forever.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn sigterm_with_a_half_sent_request_exits_within_the_grace_period() {
    let (_dir, mut server) = start_tiny(
        &TinyLlama::FAST,
        &[
            "--shutdown-grace-seconds",
            "2",
            "--header-timeout-seconds",
            "600",
        ],
    );
    let mut half = connect(&server);
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = started + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?} for a grace of 2 s",
        started.elapsed()
    );
}

#[tokio::test]
async fn many_huge_prompts_at_once_are_refused_before_tokenizing() {
    let (_dir, server) = start_tiny(&TinyLlama::FAST, &[]);
    let pid = server.pid();
    let before = peak_rss(pid);
    // Just under the 2 MiB body limit: 1.3M tokens each, were they tokenized.
    let huge = "word ".repeat(400_000);
    let requests = (0..32).map(|i| {
        let body = if i % 2 == 0 {
            json!({"model": "tiny", "prompt": huge, "max_tokens": 1})
        } else {
            json!({"model": "tiny", "messages": [{"role": "user", "content": huge}], "max_tokens": 1})
        };
        let route = if i % 2 == 0 {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        client().post(server.url(route)).json(&body).send()
    });
    for response in futures::future::join_all(requests).await {
        let response = response.unwrap();
        assert_eq!(response.status().as_u16(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            error_message(&body).contains("bytes"),
            "names the byte limit: {body}"
        );
    }
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(grown < 512 << 20, "peak memory grew by {} MiB", grown >> 20);
}
