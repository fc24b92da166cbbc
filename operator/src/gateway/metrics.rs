//! The gateway's Prometheus metrics (`kandle_gateway_…`).
use kandle_contract::metrics::{GATEWAY_HELD_REQUESTS, PREFIX};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelCode {
    pub model: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    pub model: String,
    /// `connect` (refused, unreachable, timed out) or `unavailable` (a 503).
    pub reason: &'static str,
}

/// The ModelDeployment, as the operator's autoscaler reads it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Deployment {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyReason {
    pub key: String,
    /// `rate` or `concurrency`.
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Answered requests by model (the served name, or `-` when none was known) and code.
    pub requests: Family<ModelCode, Counter>,
    /// From the request's arrival to the upstream's response headers (or the gateway's own
    /// answer), holding included.
    pub duration: Family<ModelLabel, Histogram>,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub upstream_errors: Family<UpstreamError, Counter>,
    pub held: Family<Deployment, Gauge>,
    pub hold_wait: Family<ModelLabel, Histogram>,
    pub limited: Family<KeyReason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let mut metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            in_flight: Family::default(),
            upstream_errors: Family::default(),
            held: Family::default(),
            hold_wait: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            }),
            limited: Family::default(),
            registry: Registry::with_prefix(PREFIX),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "gateway_requests",
            "Requests the gateway answered, by model and HTTP status code",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "gateway_request_duration",
            "Time from a request's arrival to its response headers",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "gateway_requests_in_flight",
            "Requests being proxied, by model",
            metrics.in_flight.clone(),
        );
        registry.register(
            "gateway_upstream_errors",
            "Attempts on a serving pod that failed before any byte of an answer, by reason",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            GATEWAY_HELD_REQUESTS,
            "Requests held for a ModelDeployment with no ready pod",
            metrics.held.clone(),
        );
        registry.register_with_unit(
            "gateway_hold_wait",
            "Time held requests waited for a ready pod",
            Unit::Seconds,
            metrics.hold_wait.clone(),
        );
        registry.register(
            "gateway_rate_limited",
            "Requests refused with 429 by their API key's limits",
            metrics.limited.clone(),
        );
        metrics
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
