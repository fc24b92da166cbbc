//! Prometheus metrics with stable names; those the operator reads (load and request
//! counts) are named by [`kandle_contract::metrics`].
use kandle_contract::metrics as contract;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCode {
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub task: String,
    pub dtype: String,
    pub device: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests_in_flight: Gauge,
    pub requests_queued: Gauge,
    pub requests: Family<RouteCode, Counter>,
    pub request_duration: Family<Route, Histogram>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub tokens_generated: Counter,
    pub prompt_tokens: Counter,
    pub rows_predicted: Counter,
    pub batch_size: Histogram,
    pub kv_cache_blocks: Gauge,
    pub kv_cache_blocks_used: Gauge,
    pub kv_cache_bytes: Gauge,
    pub sequences_running: Gauge,
    pub sequences_waiting: Gauge,
    pub preemptions: Counter,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    pub model_info: Family<ModelLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(contract::PREFIX);
        let requests_in_flight = Gauge::default();
        let requests_queued = Gauge::default();
        let requests = Family::<RouteCode, Counter>::default();
        let request_duration = Family::<Route, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let inter_token_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let tokens_generated = Counter::default();
        let prompt_tokens = Counter::default();
        let rows_predicted = Counter::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let kv_cache_blocks = Gauge::default();
        let kv_cache_blocks_used = Gauge::default();
        let kv_cache_bytes = Gauge::default();
        let sequences_running = Gauge::default();
        let sequences_waiting = Gauge::default();
        let preemptions = Counter::default();
        let prefix_cache_queries = Counter::default();
        let prefix_cache_hits = Counter::default();
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        let model_info = Family::<ModelLabels, Gauge>::default();

        registry.register(
            contract::REQUESTS_IN_FLIGHT,
            "Requests being executed",
            requests_in_flight.clone(),
        );
        registry.register(
            contract::REQUESTS_QUEUED,
            "Admitted requests waiting to execute",
            requests_queued.clone(),
        );
        registry.register(
            contract::REQUESTS,
            "HTTP requests by route and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request duration, streams until their last event",
            request_duration.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from queueing to the first generated token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between generated tokens of one sequence",
            inter_token_latency.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens generated",
            tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "rows_predicted",
            "Rows a tabular model predicted",
            rows_predicted.clone(),
        );
        registry.register(
            "batch_size",
            "Sequences per embedding batch or generation step",
            batch_size.clone(),
        );
        registry.register(
            "kv_cache_blocks",
            "Blocks in the KV-cache pool (16 tokens each)",
            kv_cache_blocks.clone(),
        );
        registry.register(
            "kv_cache_blocks_used",
            "KV-cache blocks held by sequences",
            kv_cache_blocks_used.clone(),
        );
        registry.register_with_unit(
            "kv_cache",
            "Memory of the KV-cache pool",
            prometheus_client::registry::Unit::Bytes,
            kv_cache_bytes.clone(),
        );
        registry.register(
            "sequences_running",
            "Sequences the generation engine is advancing",
            sequences_running.clone(),
        );
        registry.register(
            "sequences_waiting",
            "Sequences waiting for KV-cache blocks or a place in the batch",
            sequences_waiting.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences set back to the queue to free KV-cache blocks (recomputed later)",
            preemptions.clone(),
        );
        registry.register(
            "prefix_cache_queries",
            "Prompt tokens of sequences admitted while prefix caching is on",
            prefix_cache_queries.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Of those tokens, the ones found in the prefix cache (hit rate: hits / queries)",
            prefix_cache_hits.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time taken to load and warm the model",
            model_load_seconds.clone(),
        );
        registry.register(
            "model_info",
            "The served model (value is always 1)",
            model_info.clone(),
        );
        Self {
            registry,
            requests_in_flight,
            requests_queued,
            requests,
            request_duration,
            time_to_first_token,
            inter_token_latency,
            tokens_generated,
            prompt_tokens,
            rows_predicted,
            batch_size,
            kv_cache_blocks,
            kv_cache_blocks_used,
            kv_cache_bytes,
            sequences_running,
            sequences_waiting,
            preemptions,
            prefix_cache_queries,
            prefix_cache_hits,
            model_load_seconds,
            model_info,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Publishes how long the model took to load and what it is.
    pub fn model_loaded(&self, labels: ModelLabels, load_seconds: f64) {
        self.model_load_seconds.set(load_seconds);
        self.model_info.get_or_create(&labels).set(1);
    }

    pub fn observe_duration(&self, route: &str, seconds: f64) {
        self.request_duration
            .get_or_create(&Route {
                route: route.to_string(),
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator reads these numbers with the contract's parser: if either side renames
    /// a metric or label, this fails.
    #[test]
    fn the_operator_reads_load_and_errors_from_what_the_server_exposes() {
        let metrics = Metrics::new();
        metrics.requests_in_flight.set(2);
        metrics.requests_queued.set(1);
        let count = |code, n| {
            let labels = RouteCode {
                route: "/v1/chat/completions".into(),
                code,
            };
            metrics.requests.get_or_create(&labels).inc_by(n);
        };
        count(200, 3);
        count(503, 1);
        count(429, 2);
        let read = contract::parse(&metrics.encode()).expect("both load gauges exposed");
        assert_eq!((read.load, read.requests, read.errors), (3.0, 6.0, 1.0));
    }
}
