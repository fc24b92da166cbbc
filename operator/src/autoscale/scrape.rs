//! Reading the serving pods' load from their `/metrics`.
use futures::future::{BoxFuture, join_all};
use std::time::Duration;

/// A ready serving pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    /// `app.kubernetes.io/instance`: the ModelDeployment it serves.
    pub instance: String,
    pub ip: Option<String>,
}

/// Where loads come from: the pods over HTTP, or a simulation in tests.
pub trait LoadSource: Send + Sync {
    /// Requests in flight plus queued, per pod, in order; `None` for a pod that did not
    /// answer in time or answered nonsense.
    fn loads<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<f64>>>;
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

    async fn load(&self, pod: &PodTarget) -> Option<f64> {
        let url = format!("http://{}:{}/metrics", pod.ip.as_deref()?, self.port);
        let answer = async {
            let response = self.client.get(&url).send().await?.error_for_status()?;
            response.text().await
        };
        match answer.await {
            Ok(text) => parse(&text),
            Err(e) => {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot scrape");
                None
            }
        }
    }
}

impl LoadSource for HttpLoad {
    fn loads<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<f64>>> {
        Box::pin(join_all(pods.iter().map(|p| self.load(p))))
    }
}

/// `kandle_requests_in_flight` plus `kandle_requests_queued` from Prometheus text;
/// `None` unless both are there.
pub fn parse(text: &str) -> Option<f64> {
    let value = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            // The metric itself, not a longer name that starts the same.
            let rest = rest.strip_prefix(' ').or_else(|| {
                rest.strip_prefix('{')
                    .and_then(|r| r.split_once("} ").map(|(_, v)| v))
            })?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    let total = value("kandle_requests_in_flight")? + value("kandle_requests_queued")?;
    (total.is_finite() && total >= 0.0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_two_gauges() {
        let text = "# HELP kandle_requests_in_flight Requests being executed.\n\
                    # TYPE kandle_requests_in_flight gauge\n\
                    kandle_requests_in_flight 3\n\
                    kandle_requests_in_flight_max 9\n\
                    kandle_requests_queued{model=\"m\"} 2.0\n\
                    kandle_requests_total{route=\"chat\",code=\"200\"} 10\n";
        assert_eq!(parse(text), Some(5.0));
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
        let loads = source.loads(&pods).await;
        assert_eq!(loads[0], Some(3.0));
        assert_eq!(loads[1], None, "no IP yet");
        // 127.0.0.2 is loopback too on Linux, but nothing listens there on that port.
        assert_eq!(loads[2], None);
    }
}
