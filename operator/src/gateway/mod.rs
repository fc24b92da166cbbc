//! `kandle-operator gateway`: one OpenAI endpoint for every ModelDeployment. Requests are
//! routed by their `model` to that model's ready pods (`watch`, `table`), spread by load or
//! prompt prefix (`balance`), held while a model scaled to zero starts (`proxy`; the held
//! count is a metric the operator's autoscaler reads), and checked against API keys and
//! their limits (`keys`).
pub mod balance;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod proxy;
pub mod table;
pub mod watch;

use crate::cli::GatewayArgs;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::GatewayError;
use kandle_listen::ConnectionLimits;
use keys::Keys;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use table::Table;
use tokio::net::TcpListener;

/// How the gateway routes and holds, from its flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub affinity: bool,
    pub affinity_prefix_bytes: usize,
    pub affinity_load_factor: f64,
    /// Other pods tried after one refuses or answers 503.
    pub retries: usize,
    pub hold_timeout: Duration,
    pub hold_queue: usize,
    /// `Retry-After` of a request that waited its whole hold in vain.
    pub hold_retry_after: Duration,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
}

pub struct Gateway {
    settings: Settings,
    table: tokio::sync::watch::Receiver<Arc<Table>>,
    synced: tokio::sync::watch::Receiver<bool>,
    /// `None`: no keys file, every caller may call every model.
    keys: Option<tokio::sync::watch::Receiver<Arc<Keys>>>,
    balancer: balance::Balancer,
    http: proxy::Upstream,
    metrics: metrics::Metrics,
    draining: Drain,
}

/// Requests in flight (counted until their response body ends), and whether new ones
/// are refused.
#[derive(Default)]
struct Drain {
    refusing: AtomicBool,
    in_flight: Arc<AtomicUsize>,
}

struct DrainGuard(Arc<AtomicUsize>);

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    fn track(&self) -> DrainGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        DrainGuard(self.in_flight.clone())
    }
}

impl Gateway {
    pub fn new(
        settings: Settings,
        routes: watch::Routes,
        keys: Option<tokio::sync::watch::Receiver<Arc<Keys>>>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let http = proxy::upstream(connect_timeout);
        Arc::new(Self {
            settings,
            table: routes.table,
            synced: routes.synced,
            keys,
            balancer: balance::Balancer::default(),
            http,
            metrics: metrics::Metrics::default(),
            draining: Drain::default(),
        })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(forward))
            .route("/v1/completions", post(forward))
            .route("/v1/embeddings", post(forward))
            .route("/v1/rerank", post(forward))
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(ready))
            .fallback(|| async { GatewayError::NotFound })
            .layer(DefaultBodyLimit::max(self.settings.max_body_bytes))
            .with_state(self.clone())
    }

    /// Drops the counts of pods that left every model's endpoints, as the table changes, so
    /// pod churn does not grow them.
    async fn forget_gone_pods(self: Arc<Self>) {
        let mut changes = self.table.clone();
        while changes.changed().await.is_ok() {
            let table = changes.borrow_and_update().clone();
            let alive: std::collections::HashSet<_> = table
                .models
                .values()
                .flat_map(|m| m.endpoints.iter().copied())
                .collect();
            self.balancer.retain(|addr| alive.contains(addr));
        }
    }

    /// Refuses new requests, then waits until those in flight end or `grace` runs out.
    pub async fn drain(&self, grace: Duration) {
        self.draining.refusing.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        tracing::info!(
            in_flight = self.draining.in_flight.load(Ordering::Acquire),
            "draining"
        );
        while self.draining.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn forward(State(gateway): State<Arc<Gateway>>, mut request: Request) -> Response {
    if gateway.draining.refusing.load(Ordering::Acquire) {
        return GatewayError::Draining.into_response();
    }
    let method = request.method().clone();
    let uri = request.uri().clone();
    let headers = std::mem::take(request.headers_mut());
    let read = tokio::time::timeout(
        gateway.settings.body_timeout,
        Bytes::from_request(request, &()),
    );
    let body = match read.await {
        Err(_) => {
            return GatewayError::BodyTimeout(gateway.settings.body_timeout.as_secs())
                .into_response();
        }
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return GatewayError::PayloadTooLarge(gateway.settings.max_body_bytes).into_response();
        }
        Ok(Err(rejection)) => {
            let message = format!("Could not read the request body: {}", rejection.body_text());
            return GatewayError::InvalidRequest(message).into_response();
        }
        Ok(Ok(body)) => body,
    };
    let tracked = gateway.draining.track();
    let response = gateway
        .clone()
        .proxy(proxy::Incoming {
            method,
            uri,
            headers,
            body,
        })
        .await;
    drop(tracked);
    response
}

/// OpenAI's model list: the models that serve or wake on demand, that this key may call.
async fn models(
    State(gateway): State<Arc<Gateway>>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, GatewayError> {
    let tenant = gateway.tenant(&headers)?;
    let table = gateway.table.borrow().clone();
    let data: Vec<serde_json::Value> = table
        .models
        .values()
        .filter(|m| m.listed() && tenant.as_ref().is_none_or(|t| t.may_call(m)))
        .map(|m| {
            serde_json::json!({
                "id": m.served, "object": "model", "created": m.created,
                "owned_by": m.namespace,
            })
        })
        .collect();
    Ok(axum::Json(
        serde_json::json!({"object": "list", "data": data}),
    ))
}

async fn render_metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gateway.metrics.encode(),
    )
}

/// Ready once the routes are synced, until draining begins.
async fn ready(State(gateway): State<Arc<Gateway>>) -> StatusCode {
    if *gateway.synced.borrow() && !gateway.draining.refusing.load(Ordering::Acquire) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Loads the keys file and reloads it when it changes (a Secret volume is updated in place
/// by the kubelet); a file that stops parsing keeps the keys last read, loudly.
pub fn watch_keys(
    path: PathBuf,
    every: Duration,
) -> Result<tokio::sync::watch::Receiver<Arc<Keys>>, keys::KeysError> {
    let first = Keys::load(&path)?;
    tracing::info!(path = %path.display(), keys = first.len(), "API keys loaded");
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(first));
    // Bounded, and off the async threads.
    let read_file = {
        let path = path.clone();
        move || {
            let path = path.clone();
            async move {
                tokio::task::spawn_blocking(move || keys::read_limited(&path))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        }
    };
    tokio::spawn(async move {
        let mut last = read_file().await;
        loop {
            tokio::time::sleep(every).await;
            if tx.is_closed() {
                return;
            }
            let now = read_file().await;
            if now == last {
                continue;
            }
            last = now;
            let read = match &last {
                Some(bytes) => Keys::from_bytes(bytes, &path),
                None => Keys::load(&path),
            };
            match read {
                Ok(keys) => {
                    tracing::info!(path = %path.display(), keys = keys.len(), "API keys reloaded");
                    tx.send_replace(Arc::new(keys));
                }
                Err(error) => {
                    tracing::error!(%error, "API keys file invalid; keeping the keys last loaded");
                }
            }
        }
    });
    Ok(rx)
}

/// Runs the gateway on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    client: kube::Client,
    args: &GatewayArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let keys = match &args.api_keys_file {
        Some(path) => Some(watch_keys(path.clone(), Duration::from_secs(5))?),
        None => None,
    };
    let routes = watch::start(&client, args.watch_namespace.as_deref());
    let gateway = Gateway::new(
        args.settings(),
        routes,
        keys,
        Duration::from_secs(args.connect_timeout_seconds.max(1)),
    );
    tokio::spawn(gateway.clone().forget_gone_pods());
    let limits = ConnectionLimits {
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_seconds.max(1)),
    };
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let draining = gateway.clone();
    let drained = async move {
        shutdown.await;
        draining.drain(grace).await;
    };
    kandle_listen::serve(listener, gateway.router(), limits, drained).await;
    tracing::info!("gateway stopped");
    Ok(())
}
