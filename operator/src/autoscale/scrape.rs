//! Reading the serving pods' `/metrics`: their load (for the autoscaler) and their request
//! counters (for canary verdicts).
use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use std::collections::HashMap;
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

impl PodTarget {
    /// A pod serving the ModelDeployment `instance`.
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod, instance: &str) -> Self {
        use kube::ResourceExt;
        Self {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            instance: instance.to_string(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        }
    }
}

pub use kandle_contract::metrics::{Load as PodMetrics, parse};

/// Where pod metrics come from: the pods over HTTP, or a simulation in tests.
pub trait LoadSource: Send + Sync {
    /// Per pod, in order; `None` for a pod that did not answer in time or answered nonsense.
    fn scrape<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<PodMetrics>>>;

    /// Requests waiting in gateways per ModelDeployment (namespace, name): load that no pod
    /// reports, and the only load of a model scaled to zero.
    fn held(&self) -> BoxFuture<'_, HashMap<(String, String), f64>> {
        Box::pin(async { HashMap::new() })
    }
}

/// Scrapes `http://POD_IP:PORT/metrics`, every pod of a round at once.
pub struct HttpLoad {
    client: reqwest::Client,
    port: u16,
    /// The gateway's metrics (`host:port`), for the requests it holds.
    gateway: Option<String>,
}

impl HttpLoad {
    pub fn new(port: u16, timeout: Duration, gateway: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("an HTTP client without TLS settings builds");
        Self {
            client,
            port,
            gateway,
        }
    }

    async fn one(&self, pod: &PodTarget) -> Option<PodMetrics> {
        let url = format!("http://{}:{}/metrics", pod.ip.as_deref()?, self.port);
        let text = self.text(&url).await;
        if text.is_none() {
            tracing::debug!(pod = %pod.name, namespace = %pod.namespace, "cannot scrape");
        }
        parse(&text?)
    }

    /// A `/metrics` page, `None` when it fails or runs past [`MAX_METRICS_BYTES`].
    async fn text(&self, url: &str) -> Option<String> {
        let answer = async {
            let response = self.client.get(url).send().await?.error_for_status()?;
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
            Ok(body) => body.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Err(e) => {
                tracing::debug!(url, error = %e, "cannot scrape");
                None
            }
        }
    }

    /// Requests held by every gateway replica (each address `host:port` resolves to; a
    /// headless Service resolves to them all), per ModelDeployment.
    async fn held(&self) -> HashMap<(String, String), f64> {
        let mut held = HashMap::new();
        let Some(target) = &self.gateway else {
            return held;
        };
        let addrs = match tokio::net::lookup_host(target.as_str()).await {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(gateway = %target, error = %e, "cannot resolve the gateway");
                return held;
            }
        };
        let urls: Vec<String> = addrs
            .iter()
            .map(|a| format!("http://{a}/metrics"))
            .collect();
        let pages = join_all(urls.iter().map(|u| self.text(u))).await;
        for page in pages.into_iter().flatten() {
            for (key, value) in kandle_contract::metrics::parse_held(&page) {
                *held.entry(key).or_default() += value;
            }
        }
        held
    }
}

impl LoadSource for HttpLoad {
    fn scrape<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<PodMetrics>>> {
        Box::pin(join_all(pods.iter().map(|p| self.one(p))))
    }

    fn held(&self) -> BoxFuture<'_, HashMap<(String, String), f64>> {
        Box::pin(HttpLoad::held(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let source = HttpLoad::new(port, Duration::from_secs(1), None);
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
        let metrics = HttpLoad::new(port, Duration::from_secs(5), None)
            .scrape(std::slice::from_ref(&pod))
            .await;
        assert_eq!(metrics[0], None);
    }
}
