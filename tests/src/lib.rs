//! Test support for the operator: an in-process Kubernetes API server, a simulated
//! cluster behind it, and the scenarios that run against it or, with `KANDLE_E2E=1`,
//! against the cluster of the current kubeconfig.
pub mod apiserver;
pub mod cluster;
pub mod emulated;
pub mod load;
pub mod scenarios;
pub mod serving;
