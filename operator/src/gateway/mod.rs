//! `kandle-operator gateway`: one OpenAI endpoint for every ModelDeployment. Requests are
//! routed by their `model` to that model's ready pods (`watch`, `table`), spread by load or
//! prompt prefix (`balance`), held while a model scaled to zero starts (`proxy`; the held
//! count is a metric the operator's autoscaler reads), and checked against API keys and
//! their limits (`keys`). Both of its sides speak HTTP/1.1 on the sockets themselves
//! (`front` to clients, `upstream` to pods), on one event loop per serving thread.
pub mod balance;
pub mod error;
mod framing;
mod front;
mod head;
pub mod keys;
mod link;
pub mod metrics;
pub mod proxy;
pub mod table;
pub mod upstream;
pub mod watch;

use crate::cli::GatewayArgs;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use error::GatewayError;
use kandle_listen::ConnectionLimits;
use keys::Keys;
use proxy::GatewayBody;
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
    /// Serving threads, each with its own event loop (see `serving_threads`).
    pub workers: usize,
}

pub struct Gateway {
    settings: Settings,
    table: tokio::sync::watch::Receiver<Arc<Table>>,
    synced: tokio::sync::watch::Receiver<bool>,
    /// `None`: no keys file, every caller may call every model.
    keys: Option<tokio::sync::watch::Receiver<Arc<Keys>>>,
    balancer: balance::Balancer,
    /// Connections to pods between requests, a pool per serving thread.
    idle: Vec<Arc<upstream::Idle>>,
    connect_timeout: Duration,
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
        let idle = (0..settings.workers.max(1))
            .map(|_| Arc::default())
            .collect();
        Arc::new(Self {
            settings,
            table: routes.table,
            synced: routes.synced,
            keys,
            balancer: balance::Balancer::default(),
            idle,
            connect_timeout,
            metrics: metrics::Metrics::default(),
            draining: Drain::default(),
        })
    }

    /// What answers the requests of serving thread `worker`: the OpenAI routes it
    /// forwards, then axum's router for the rest, with that thread's connections to pods.
    fn worker(self: &Arc<Self>, worker: usize) -> Worker {
        Worker {
            gateway: self.clone(),
            router: self.router(),
            upstreams: upstream::Upstreams::new(self.idle[worker].clone(), self.connect_timeout),
        }
    }

    fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(ready))
            .fallback(|| async { GatewayError::NotFound })
            .with_state(self.clone())
    }

    /// Drops the counts of and connections to pods that left every model's endpoints, as the
    /// table changes, so pod churn does not grow them.
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
            for idle in &self.idle {
                idle.retain(|addr| alive.contains(addr));
            }
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

/// How long a write to a client may wait for it to read (nginx's default `send_timeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// The paths whose requests go to a model's pods.
const FORWARDED: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
];

/// What a serving thread's requests share.
struct Worker {
    gateway: Arc<Gateway>,
    router: Router,
    upstreams: upstream::Upstreams,
}

impl front::Answer for Worker {
    /// Forwarded requests go straight to the proxy: through axum's router each would also
    /// pay for its routing, a boxed service clone and a matched-path extension, for four
    /// fixed paths.
    async fn answer(&self, request: Request<Bytes>) -> Response<GatewayBody> {
        if FORWARDED.contains(&request.uri().path()) {
            return forward(self, request).await;
        }
        let request = request.map(axum::body::Body::from);
        match tower::ServiceExt::oneshot(self.router.clone(), request).await {
            Ok(response) => proxy::own(response),
            Err(never) => match never {},
        }
    }

    /// Refusals count as answers for no model: none was read yet.
    fn refused(&self, status: StatusCode) {
        let metrics = &self.gateway.metrics;
        metrics.answered(&metrics.model("-"), status.as_u16());
    }
}

async fn forward(worker: &Worker, request: Request<Bytes>) -> Response<GatewayBody> {
    let gateway = &worker.gateway;
    if request.method() != Method::POST {
        return proxy::own(GatewayError::MethodNotAllowed.into_response());
    }
    if gateway.draining.refusing.load(Ordering::Acquire) {
        return proxy::own(GatewayError::Draining.into_response());
    }
    let (parts, body) = request.into_parts();
    let tracked = gateway.draining.track();
    let request = proxy::Incoming {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    };
    let response = gateway.proxy(&worker.upstreams, request).await;
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

/// Threads serving `listener`, one per worker, each on a single-threaded runtime of its own
/// that accepts connections, serves their requests and keeps its own connections to pods:
/// nginx's shape, an event loop per core. On tokio's work-stealing runtime the two workers
/// woke each other through futexes (0.4 calls a request at 64 connections, `strace -c`) and
/// a request's I/O could be picked up by either. They stop when `stopped` says so or its
/// sender is dropped (`run`'s future, dropped).
fn serving_threads(
    gateway: &Arc<Gateway>,
    listener: std::net::TcpListener,
    limits: ConnectionLimits,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let requests = Arc::new(front::Limits {
        header_timeout: limits.header_timeout,
        body_timeout: gateway.settings.body_timeout,
        max_body_bytes: gateway.settings.max_body_bytes,
        send_timeout: SEND_TIMEOUT,
    });
    (0..gateway.idle.len())
        .map(|index| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let listener = {
                let _in = runtime.enter();
                TcpListener::from_std(listener.try_clone()?)?
            };
            let worker = Arc::new(gateway.worker(index));
            let requests = requests.clone();
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("gateway-{index}"))
                .spawn(move || {
                    let stop = async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    };
                    let serve = kandle_listen::serve_connections(
                        listener,
                        limits,
                        stop,
                        move |stream, closing| {
                            let (worker, requests) = (worker.clone(), requests.clone());
                            async move { front::serve(stream, &*worker, &requests, closing).await }
                        },
                    );
                    runtime.block_on(serve);
                })
        })
        .collect()
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
    let gateway_for_sweep = gateway.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(upstream::SWEEP_EVERY);
        loop {
            every.tick().await;
            for idle in &gateway_for_sweep.idle {
                idle.sweep();
            }
        }
    });
    let limits = ConnectionLimits {
        max_connections: args.max_connections.div_ceil(gateway.idle.len()),
        header_timeout: Duration::from_secs(args.header_timeout_seconds.max(1)),
    };
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let threads = serving_threads(&gateway, listener.into_std()?, limits, &stopped)?;
    tracing::info!(%address, workers = threads.len(), "gateway listening");
    shutdown.await;
    gateway
        .drain(Duration::from_secs(args.shutdown_grace_seconds))
        .await;
    stop.send_replace(true);
    for thread in threads {
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a serving thread panicked"))?;
    }
    tracing::info!("gateway stopped");
    Ok(())
}
