//! Command line: every flag is also an environment variable, so the chart can set either.
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Image of the serving pods when a ModelDeployment names none: the server release
/// that matches this operator.
pub const DEFAULT_SERVER_IMAGE: &str = concat!(
    "ghcr.io/kandle-dev/kandle-server:",
    env!("CARGO_PKG_VERSION")
);
/// The same release built with CUDA, for ModelDeployments with GPUs.
pub const DEFAULT_SERVER_IMAGE_CUDA: &str = concat!(
    "ghcr.io/kandle-dev/kandle-server-cuda:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Debug, Parser)]
#[command(
    name = "kandle-operator",
    version,
    about = "Runs ModelDeployments on Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller against the cluster of the kubeconfig or the pod's service account.
    Run(RunArgs),
    /// Print the ModelDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print the ModelDeployment reference (Markdown) from the CRD's descriptions.
    Reference,
    /// Print, offline, every object the operator would apply for the ModelDeployments in a
    /// file, after checking them as a strict API server would.
    Render(RenderArgs),
    /// Serve one OpenAI endpoint for every ModelDeployment, routing by the request's model.
    Gateway(GatewayArgs),
    /// The node cache's DaemonSet: prepare the node's cache folder, or collect unused models.
    #[command(subcommand)]
    NodeCache(NodeCacheCommand),
}

#[derive(Debug, Subcommand)]
pub enum NodeCacheCommand {
    /// Create the cache folder and give it to the serving pods' user (needs CAP_CHOWN).
    Prepare {
        #[arg(long, env = "KANDLE_NODE_CACHE_ROOT")]
        root: PathBuf,
        /// The serving pods' uid and gid.
        #[arg(long, default_value_t = 65532)]
        owner: u32,
    },
    /// Remove models no ModelDeployment uses, least recently used first, while the cache
    /// holds more than `--max-size`.
    Collect(CollectArgs),
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    #[arg(long, env = "KANDLE_NODE_CACHE_ROOT")]
    pub root: PathBuf,
    /// Most the cache may hold before unused models are removed (a Kubernetes quantity).
    #[arg(long, env = "KANDLE_NODE_CACHE_MAX_SIZE", default_value = "100Gi")]
    pub max_size: String,
    /// Seconds between two collections.
    #[arg(long, env = "KANDLE_NODE_CACHE_INTERVAL_SECONDS", default_value_t = 60)]
    pub interval_seconds: u64,
    /// Only ModelDeployments of this namespace use the cache (default: all namespaces).
    #[arg(long, env = "KANDLE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    #[arg(long, env = "KANDLE_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

/// What the children depend on, shared by `run` and `render`.
#[derive(Debug, Clone, Args)]
pub struct ChildArgs {
    /// kandle-server image for ModelDeployments that name none.
    #[arg(long, env = "KANDLE_SERVER_IMAGE", default_value = DEFAULT_SERVER_IMAGE)]
    pub server_image: String,
    /// kandle-server image built with CUDA, for ModelDeployments with GPUs that name none.
    #[arg(long, env = "KANDLE_SERVER_IMAGE_CUDA", default_value = DEFAULT_SERVER_IMAGE_CUDA)]
    pub server_image_cuda: String,
    /// DNS suffix of the cluster's Services, for `status.endpoint`.
    #[arg(long, env = "KANDLE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The operator's own namespace, which NetworkPolicies admit for its metric scrapes.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kandle-system")]
    pub operator_namespace: String,
    /// Whether the cluster mounts image volumes, which `oci://` models use unless their spec
    /// says `oci.mode: pull`. Default: `run` asks the API server (on by default from
    /// Kubernetes 1.35); `render` assumes a current cluster (true).
    #[arg(long, env = "KANDLE_IMAGE_VOLUMES", action = clap::ArgAction::Set)]
    pub image_volumes: Option<bool>,
    /// The node cache's folder on every node, for `cache.volume: node` (the chart's
    /// `nodeCache.root`).
    #[arg(
        long,
        env = "KANDLE_NODE_CACHE_ROOT",
        default_value = "/var/lib/kandle/models"
    )]
    pub node_cache_root: String,
}

impl ChildArgs {
    /// The settings, with `image_volumes` (what the cluster supports) where the flag is unset.
    pub fn settings(&self, image_volumes: bool) -> crate::build::Settings {
        crate::build::Settings {
            server_image: self.server_image.clone(),
            server_image_cuda: self.server_image_cuda.clone(),
            cluster_domain: self.cluster_domain.clone(),
            operator_namespace: self.operator_namespace.clone(),
            image_volumes: self.image_volumes.unwrap_or(image_volumes),
            node_cache_root: self.node_cache_root.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// File of ModelDeployments (multi-document YAML); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Namespace of documents that name none.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// What the cluster holds (`kubectl get deploy,job,pod -o yaml` of the
    /// ModelDeployments' children): render what the operator would apply now, with their
    /// status (canary steps, rollbacks, pulls still running) taken into account.
    #[arg(long)]
    pub observed: Option<PathBuf>,
    #[command(flatten)]
    pub children: ChildArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub children: ChildArgs,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "KANDLE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "KANDLE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect a leader on a Lease so that only one replica reconciles.
    #[arg(long, env = "KANDLE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "KANDLE_LEASE_NAME", default_value = "kandle-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, from POD_NAME).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[command(flatten)]
    pub autoscaling: AutoscalingArgs,
    /// Log format: `json` for clusters, `text` for a terminal.
    #[arg(long, env = "KANDLE_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address of the API, `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "KANDLE_GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// Only route to ModelDeployments of this namespace (default: all namespaces).
    #[arg(long, env = "KANDLE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// API keys file (YAML, a Secret mounted as a file; see `gateway::keys`). Without
    /// one, every caller may call every model.
    #[arg(long, env = "KANDLE_GATEWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// `least-in-flight`, or `prefix-affinity` (requests sharing a prompt prefix go to
    /// the same pod while it carries no more than `--affinity-load-factor` times the mean).
    #[arg(
        long,
        env = "KANDLE_GATEWAY_ROUTING",
        value_enum,
        default_value = "least-in-flight"
    )]
    pub routing: crate::gateway::balance::Routing,
    /// Bytes of the prompt (messages, prompt or input as sent) that make its prefix.
    #[arg(
        long,
        env = "KANDLE_GATEWAY_AFFINITY_PREFIX_BYTES",
        default_value_t = 512
    )]
    pub affinity_prefix_bytes: usize,
    /// How far above the mean load an affine pod may go before the next is taken.
    #[arg(
        long,
        env = "KANDLE_GATEWAY_AFFINITY_LOAD_FACTOR",
        default_value_t = 1.25
    )]
    pub affinity_load_factor: f64,
    /// Other pods tried when one refuses the connection or answers 503 (never once an
    /// answer has begun).
    #[arg(long, env = "KANDLE_GATEWAY_RETRIES", default_value_t = 2)]
    pub retries: usize,
    /// How long a request waits for a model with no ready pod (scaled to zero, starting).
    #[arg(
        long,
        env = "KANDLE_GATEWAY_HOLD_TIMEOUT_SECONDS",
        default_value_t = 300
    )]
    pub hold_timeout_seconds: u64,
    /// Requests held per model at most; more get 503 at once.
    #[arg(long, env = "KANDLE_GATEWAY_HOLD_QUEUE", default_value_t = 256)]
    pub hold_queue: usize,
    /// Largest request body accepted (413 past it).
    #[arg(long, env = "KANDLE_GATEWAY_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Time a request body may take to arrive (408 past it).
    #[arg(
        long,
        env = "KANDLE_GATEWAY_BODY_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub body_timeout_seconds: u64,
    /// Time to connect to a pod before another is tried.
    #[arg(
        long,
        env = "KANDLE_GATEWAY_CONNECT_TIMEOUT_SECONDS",
        default_value_t = 5
    )]
    pub connect_timeout_seconds: u64,
    /// Client connections open at once; more wait in the kernel's backlog.
    #[arg(long, env = "KANDLE_GATEWAY_MAX_CONNECTIONS", default_value_t = 8192)]
    pub max_connections: usize,
    /// Time a connection may take to send a request's headers, or sit idle between requests.
    #[arg(
        long,
        env = "KANDLE_GATEWAY_HEADER_TIMEOUT_SECONDS",
        default_value_t = 60
    )]
    pub header_timeout_seconds: u64,
    /// After SIGTERM: how long requests in flight (streams included) may take to finish.
    #[arg(
        long,
        env = "KANDLE_GATEWAY_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 30
    )]
    pub shutdown_grace_seconds: u64,
    /// Serving threads, each an event loop of its own (0: one per CPU the container may use).
    #[arg(
        long,
        env = "KANDLE_GATEWAY_WORKERS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u16).range(..=1024)
    )]
    pub workers: u16,
    #[arg(long, env = "KANDLE_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

impl GatewayArgs {
    pub fn settings(&self) -> crate::gateway::Settings {
        crate::gateway::Settings {
            affinity: self.routing == crate::gateway::balance::Routing::PrefixAffinity,
            affinity_prefix_bytes: self.affinity_prefix_bytes,
            affinity_load_factor: self.affinity_load_factor.max(1.0),
            retries: self.retries,
            hold_timeout: Duration::from_secs(self.hold_timeout_seconds),
            hold_queue: self.hold_queue,
            // A model that did not start within the hold will not in the next second.
            hold_retry_after: Duration::from_secs(30),
            max_body_bytes: self.max_body_bytes,
            body_timeout: Duration::from_secs(self.body_timeout_seconds.max(1)),
            // The standard library counts the CPUs the cgroup's quota allows.
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => usize::from(n),
            },
        }
    }
}

/// How the autoscaler reads and averages the serving pods' load.
#[derive(Debug, Clone, Args)]
pub struct AutoscalingArgs {
    /// Seconds between two scrapes of every autoscaled pod's `/metrics`.
    #[arg(long, env = "KANDLE_AUTOSCALE_INTERVAL_SECONDS", default_value_t = 2)]
    pub autoscale_interval_seconds: u64,
    /// Seconds of load averaged for ordinary decisions.
    #[arg(
        long,
        env = "KANDLE_AUTOSCALE_STABLE_WINDOW_SECONDS",
        default_value_t = 60
    )]
    pub autoscale_stable_window_seconds: u64,
    /// Seconds of load averaged to catch bursts (scale up at once when this short window
    /// shows twice what the replicas should carry).
    #[arg(
        long,
        env = "KANDLE_AUTOSCALE_PANIC_WINDOW_SECONDS",
        default_value_t = 6
    )]
    pub autoscale_panic_window_seconds: u64,
    /// The gateway's `host:port` (a headless Service, so that every replica is read):
    /// requests it holds for a ModelDeployment count as load, and wake one scaled to zero.
    #[arg(long, env = "KANDLE_GATEWAY_METRICS_ADDRESS")]
    pub gateway_metrics_address: Option<String>,
}

impl AutoscalingArgs {
    /// The autoscaler, scraping pods over HTTP on the server's port.
    pub fn autoscaler(&self) -> crate::autoscale::Autoscaler {
        use crate::autoscale::{Autoscaler, policy::Windows, scrape::HttpLoad};
        let interval = Duration::from_secs(self.autoscale_interval_seconds.max(1));
        Autoscaler::new(
            std::sync::Arc::new(HttpLoad::new(
                crate::build::SERVER_PORT,
                interval,
                self.gateway_metrics_address.clone(),
            )),
            Windows {
                stable: Duration::from_secs(self.autoscale_stable_window_seconds),
                panic: Duration::from_secs(self.autoscale_panic_window_seconds),
                ..Windows::default()
            },
            interval,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
