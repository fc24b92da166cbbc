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
}

impl ChildArgs {
    pub fn settings(&self) -> crate::build::Settings {
        crate::build::Settings {
            server_image: self.server_image.clone(),
            server_image_cuda: self.server_image_cuda.clone(),
            cluster_domain: self.cluster_domain.clone(),
            operator_namespace: self.operator_namespace.clone(),
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
}

impl AutoscalingArgs {
    /// The autoscaler, scraping pods over HTTP on the server's port.
    pub fn autoscaler(&self) -> crate::autoscale::Autoscaler {
        use crate::autoscale::{Autoscaler, policy::Windows, scrape::HttpLoad};
        let interval = Duration::from_secs(self.autoscale_interval_seconds.max(1));
        Autoscaler::new(
            std::sync::Arc::new(HttpLoad::new(crate::build::SERVER_PORT, interval)),
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
