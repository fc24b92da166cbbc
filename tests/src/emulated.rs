//! The operator under test, in process: the real controller against the emulated API
//! server and simulated cluster, with the chart's RBAC and a simulated load.
use crate::apiserver::ApiServer;
use crate::apiserver::rbac::Policy;
use crate::cluster::Cluster;
use crate::load::SimulatedLoad;
use crate::scenarios::Target;
use kandle_operator::autoscale::{Autoscaler, policy::Windows};
use kandle_operator::build::Settings;
use kandle_operator::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct Emulated {
    pub server: ApiServer,
    pub cluster: Cluster,
    operator: JoinHandle<()>,
    pub metrics: Arc<Metrics>,
    pub load: Arc<SimulatedLoad>,
}

/// The autoscaler on a fast clock: a 25 ms tick, a 500 ms stable and a 100 ms panic window.
pub fn autoscaler(load: &Arc<SimulatedLoad>) -> Arc<Autoscaler> {
    let windows = Windows {
        stable: Duration::from_millis(500),
        panic: Duration::from_millis(100),
        ..Windows::default()
    };
    Arc::new(Autoscaler::new(
        load.clone(),
        windows,
        Duration::from_millis(25),
    ))
}

pub fn settings() -> Settings {
    Settings {
        server_image: "kandle-server:test".into(),
        server_image_cuda: "kandle-server-cuda:test".into(),
        cluster_domain: "cluster.local".into(),
        operator_namespace: "kandle-system".into(),
        image_volumes: false,
        node_cache_root: "/var/lib/kandle/models".into(),
    }
}

impl Emulated {
    pub fn start() -> Self {
        Self::start_with_second(Duration::from_secs(1))
    }

    /// With deadlines counted in simulated seconds of length `second`.
    pub fn start_with_second(second: Duration) -> Self {
        let server = ApiServer::default();
        let cluster = Cluster::start_with_second(&server, second);
        let metrics = Arc::new(Metrics::default());
        let load = Arc::new(SimulatedLoad::default());
        let operator = tokio::spawn(kandle_operator::controller::run(
            operator_client(&server),
            settings(),
            None,
            metrics.clone(),
            autoscaler(&load),
        ));
        Self {
            server,
            cluster,
            operator,
            metrics,
            load,
        }
    }

    pub fn target(&self) -> Target {
        Target {
            client: self.server.client(),
            namespace: "default".into(),
            // Generous: waits end as soon as the state is there, and a loaded 2-core
            // machine may take seconds for what usually takes milliseconds.
            timeout: Duration::from_secs(30),
            real: false,
        }
    }
}

/// The operator's client: only what the Helm chart's RBAC grants its service account.
pub fn operator_client(server: &ApiServer) -> kube::Client {
    server.as_user(Policy::chart("kandle-system")).client()
}

/// Requests the chart's RBAC refused: a denied event or status write would not stop a
/// scenario from passing, so every test checks this at its end.
pub fn assert_nothing_forbidden(server: &ApiServer) {
    let forbidden: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|((verb, _), _)| verb == "forbidden")
        .collect();
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused {forbidden:?}"
    );
}

impl Drop for Emulated {
    fn drop(&mut self) {
        self.operator.abort();
        if !std::thread::panicking() {
            assert_nothing_forbidden(&self.server);
        }
    }
}
