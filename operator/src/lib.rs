//! kandle's operator: `ModelDeployment` in, pulled models and serving pods out.
#![forbid(unsafe_code)]
pub mod apply;
pub mod autoscale;
pub mod build;
pub mod canary;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod diagnosis;
pub mod error;
pub mod events;
pub mod gateway;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod nodecache;
pub mod plan;
pub mod quantity;
pub mod reference;
pub mod render;
pub mod replicas;
pub mod rollout;
pub mod status;
pub mod validate;

/// The CRD as `kandle-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    serde_saphyr::to_string(&crd::definition()).expect("the CRD serializes")
}
