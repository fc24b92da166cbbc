//! The operator's own Prometheus metrics, and the readiness its probes read.
use crate::error::Error;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKind {
    kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<ErrorKind, Counter>,
    duration: Histogram,
    writes: Counter,
    leader: Gauge,
    synced: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kandle_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorKind, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let writes = Counter::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "ModelDeployment reconciles",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind of error",
            errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile takes",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "writes",
            "Creates, updates and deletes sent to the API server (zero while nothing changes)",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            synced: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.errors
                .get_or_create(&ErrorKind {
                    kind: e.metric_label(),
                })
                .inc();
        }
    }

    pub fn wrote(&self, n: usize) {
        self.writes.inc_by(n as u64);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Ready to serve as leader (caches filled) or as a standby that is not leading.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire) || self.leader.get() == 0
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
