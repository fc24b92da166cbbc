//! The contract between `kandle-server` and `kandle-operator`, written once: each side
//! builds against these definitions, so neither can change its half alone. Serde only, so
//! the operator does not pull in candle and the server does not pull in kube.
#![forbid(unsafe_code)]

pub mod keys;
pub mod metrics;
pub mod openai;
pub mod pull;

/// API group of kandle's custom resources.
pub const GROUP: &str = "kandle.dev";
/// The one served version of the group.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of a ModelDeployment.
pub const API_VERSION: &str = "kandle.dev/v1alpha1";

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_is_group_and_version() {
        assert_eq!(
            super::API_VERSION,
            format!("{}/{}", super::GROUP, super::VERSION)
        );
    }
}
