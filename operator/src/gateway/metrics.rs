//! The gateway's Prometheus metrics (`kandle_gateway_…`).
use kandle_contract::metrics::{GATEWAY_HELD_REQUESTS, PREFIX};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

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
    /// Each model's series that every request touches, by served name.
    by_model: RwLock<HashMap<Arc<str>, Arc<ModelSeries>, foldhash::fast::RandomState>>,
}

/// The series of one model (its served name, or `-`) that every request touches, found
/// once per request: through the families each was a lookup by label set, a String to
/// build and hash (SipHash) under a lock, three times a request.
pub struct ModelSeries {
    model: Arc<str>,
    /// `requests{code="200"}`, nearly every answer's, made on the first.
    ok: OnceLock<Counter>,
    pub duration: Histogram,
    pub in_flight: Gauge,
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
            by_model: RwLock::default(),
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
    /// The series of the model served as `served` (a known model's name, or `-`: a caller's
    /// made-up names are not series).
    pub fn model(&self, served: &str) -> Arc<ModelSeries> {
        let known = self.by_model.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = known.get(served) {
            return series.clone();
        }
        drop(known);
        let mut all = self
            .by_model
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        all.entry(served.into())
            .or_insert_with(|| {
                let label = ModelLabel {
                    model: served.to_string(),
                };
                Arc::new(ModelSeries {
                    model: served.into(),
                    ok: OnceLock::new(),
                    duration: self.duration.get_or_create(&label).clone(),
                    in_flight: self.in_flight.get_or_create(&label).clone(),
                })
            })
            .clone()
    }

    /// Counts a request `series`' model answered with `code`.
    pub fn answered(&self, series: &ModelSeries, code: u16) {
        let count = |code| {
            self.requests.get_or_create_owned(&ModelCode {
                model: series.model.to_string(),
                code,
            })
        };
        match code {
            200 => series.ok.get_or_init(|| count(200)).inc(),
            _ => count(code).inc(),
        };
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
