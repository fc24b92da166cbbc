//! Graceful drain: on SIGTERM readiness fails at once, new requests get 503, and a stream
//! in flight runs to `[DONE]` before the process exits 0.
mod common;

use common::{TinyLlama, client, start_tiny, status_of};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn sigterm_lets_a_stream_in_flight_finish() {
    let (_dir, mut server) = start_tiny(
        &TinyLlama::SLOW,
        &["--shutdown-grace-seconds", "60", "--log-format", "json"],
    );
    let body = json!({"model": "tiny", "prompt": "drain", "temperature": 0, "max_tokens": 300, "stream": true});
    let response = client()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let readyz = server.url("/readyz");
    let mut saw_unready = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if tokio::task::spawn_blocking({
            let url = readyz.clone();
            move || status_of(&url)
        })
        .await
        .unwrap()
            == Some(503)
        {
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_unready, "/readyz turns 503 after SIGTERM");
    // Not a race the test may lose: the stream must still be running when draining began.
    let draining = server
        .log_line(|v| v["fields"]["message"] == "draining: refusing new requests")
        .await;
    assert_eq!(draining["fields"]["in_flight"], 1, "{draining}");
    let refused = client().get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(
        refused.status().as_u16(),
        503,
        "new requests are refused while draining"
    );
    // Logged as answers, not as errors: a kubelet probing readiness while the pod drains
    // must not fill the logs with ERROR lines.
    server
        .log_line(|v| v["fields"]["status"] == 503 && v["span"]["path"] == "/v1/models")
        .await;
    let errors: Vec<String> = server
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream completed: {}",
        &text[text.len().saturating_sub(200)..]
    );
    assert!(text.contains("\"finish_reason\":\"length\""));
    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
