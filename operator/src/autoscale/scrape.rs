//! Reading the serving pods' `/metrics`: their load (for the autoscaler) and their request
//! counters (for canary verdicts).
use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use std::time::Duration;

/// A server's `/metrics` is a few KiB; a pod that sends more than this is not answering.
const MAX_METRICS_BYTES: usize = 1 << 20;

/// A ready serving pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    /// `app.kubernetes.io/instance`: the ModelDeployment it serves.
    pub instance: String,
    pub ip: Option<String>,
}

/// What one pod reported.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PodMetrics {
    /// Requests in flight plus queued.
    pub load: f64,
    /// Requests answered since the pod started, and those answered with a 5xx.
    pub requests: f64,
    pub errors: f64,
}

/// Where pod metrics come from: the pods over HTTP, or a simulation in tests.
pub trait LoadSource: Send + Sync {
    /// Per pod, in order; `None` for a pod that did not answer in time or answered nonsense.
    fn scrape<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<PodMetrics>>>;
}

/// Scrapes `http://POD_IP:PORT/metrics`, every pod of a round at once.
pub struct HttpLoad {
    client: reqwest::Client,
    port: u16,
}

impl HttpLoad {
    pub fn new(port: u16, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("an HTTP client without TLS settings builds");
        Self { client, port }
    }

    async fn one(&self, pod: &PodTarget) -> Option<PodMetrics> {
        let url = format!("http://{}:{}/metrics", pod.ip.as_deref()?, self.port);
        let answer = async {
            let response = self.client.get(&url).send().await?.error_for_status()?;
            let mut body = Vec::new();
            let mut chunks = response.bytes_stream();
            while let Some(chunk) = chunks.next().await {
                body.extend_from_slice(&chunk?);
                if body.len() > MAX_METRICS_BYTES {
                    return Ok(None);
                }
            }
            Ok::<_, reqwest::Error>(Some(body))
        };
        match answer.await {
            Ok(Some(body)) => parse(&String::from_utf8_lossy(&body)),
            Ok(None) => {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, "metrics larger than {MAX_METRICS_BYTES} bytes; ignored");
                None
            }
            Err(e) => {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot scrape");
                None
            }
        }
    }
}

impl LoadSource for HttpLoad {
    fn scrape<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<PodMetrics>>> {
        Box::pin(join_all(pods.iter().map(|p| self.one(p))))
    }
}

/// The samples of one metric: labels (the text between braces) and values.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        // The metric itself, not a longer name that starts the same.
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let value = value.split_whitespace().next()?.parse::<f64>().ok()?;
        value.is_finite().then_some((labels, value))
    })
}

/// kandle-server's metrics: `kandle_requests_in_flight` plus `kandle_requests_queued` (both
/// needed), and `kandle_requests_total` by `code`; `None` unless the two gauges are there.
pub fn parse(text: &str) -> Option<PodMetrics> {
    let gauge = |name| samples(text, name).next().map(|(_, v)| v);
    let load = gauge("kandle_requests_in_flight")? + gauge("kandle_requests_queued")?;
    let (mut requests, mut errors) = (0.0, 0.0);
    for (labels, value) in samples(text, "kandle_requests_total") {
        requests += value;
        if labels.contains("code=\"5") {
            errors += value;
        }
    }
    (load >= 0.0).then_some(PodMetrics {
        load,
        requests,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gauges_and_the_counters() {
        let text = "# HELP kandle_requests_in_flight Requests being executed.\n\
                    # TYPE kandle_requests_in_flight gauge\n\
                    kandle_requests_in_flight 3\n\
                    kandle_requests_in_flight_max 9\n\
                    kandle_requests_queued{model=\"m\"} 2.0\n\
                    kandle_requests_total{route=\"chat\",code=\"200\"} 10\n\
                    kandle_requests_total{route=\"chat\",code=\"503\"} 2\n\
                    kandle_requests_total{route=\"embeddings\",code=\"429\"} 1\n";
        let m = parse(text).unwrap();
        assert_eq!((m.load, m.requests, m.errors), (5.0, 13.0, 2.0));
        assert_eq!(parse("kandle_requests_in_flight 3\n"), None);
        assert_eq!(
            parse("kandle_requests_in_flight NaN\nkandle_requests_queued 1\n"),
            None
        );
        assert_eq!(parse("<html>not metrics</html>"), None);
    }

    #[tokio::test]
    async fn scrapes_pods_over_http_and_tolerates_the_ones_that_fail() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                "kandle_requests_in_flight 2\nkandle_requests_queued 1\n"
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let pod = |ip: Option<&str>| PodTarget {
            namespace: "ml".into(),
            name: "p".into(),
            instance: "m".into(),
            ip: ip.map(str::to_string),
        };
        let source = HttpLoad::new(port, Duration::from_secs(1));
        let pods = [pod(Some("127.0.0.1")), pod(None), pod(Some("127.0.0.2"))];
        let metrics = source.scrape(&pods).await;
        assert_eq!(metrics[0].map(|m| m.load), Some(3.0));
        assert_eq!(metrics[1], None, "no IP yet");
        // 127.0.0.2 is loopback too on Linux, but nothing listens there on that port.
        assert_eq!(metrics[2], None);
    }

    #[tokio::test]
    async fn an_oversized_answer_is_ignored_unread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Valid metrics, padded past the bound with comment lines.
        let huge = format!(
            "kandle_requests_in_flight 2\nkandle_requests_queued 1\n{}",
            "# padding\n".repeat(MAX_METRICS_BYTES / 8)
        );
        let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { huge }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let pod = PodTarget {
            namespace: "ml".into(),
            name: "p".into(),
            instance: "m".into(),
            ip: Some("127.0.0.1".into()),
        };
        let metrics = HttpLoad::new(port, Duration::from_secs(5))
            .scrape(std::slice::from_ref(&pod))
            .await;
        assert_eq!(metrics[0], None);
    }
}
