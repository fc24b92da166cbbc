//! What the serving pods' `/metrics` would report in the simulated cluster: the load each
//! ModelDeployment's clients offer (requests in flight or queued) spread evenly over its
//! ready pods; request counters that grow by ten at each scrape, with a chosen share of 5xx
//! for pods whose names start with a given prefix (a Deployment's name); and pods that stop
//! answering.
use futures::future::BoxFuture;
use kandle_operator::autoscale::scrape::{HttpLoad, LoadSource, PodMetrics, PodTarget};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct SimulatedLoad {
    offered: Mutex<HashMap<String, f64>>,
    silent: Mutex<HashSet<String>>,
    error_rates: Mutex<Vec<(String, f64)>>,
    counters: Mutex<HashMap<String, (f64, f64)>>,
    /// A real gateway whose held requests count, read as the operator reads them.
    gateway: Mutex<Option<Arc<HttpLoad>>>,
}

impl SimulatedLoad {
    /// Clients of the ModelDeployment `name` now keep `load` requests in flight.
    pub fn offer(&self, name: &str, load: f64) {
        self.offered.lock().unwrap().insert(name.into(), load);
    }

    /// The pod stops answering scrapes.
    pub fn silence(&self, pod: &str) {
        self.silent.lock().unwrap().insert(pod.into());
    }

    /// Requests the gateway at `addr` holds count as load from now on.
    pub fn read_gateway(&self, addr: std::net::SocketAddr) {
        let source = HttpLoad::new(0, std::time::Duration::from_secs(1), Some(addr.to_string()));
        *self.gateway.lock().unwrap() = Some(Arc::new(source));
    }

    /// Pods whose names start with `prefix` fail this share of their requests from now on.
    pub fn fail(&self, prefix: &str, rate: f64) {
        self.error_rates.lock().unwrap().push((prefix.into(), rate));
    }
}

impl LoadSource for SimulatedLoad {
    fn scrape<'a>(&'a self, pods: &'a [PodTarget]) -> BoxFuture<'a, Vec<Option<PodMetrics>>> {
        let offered = self.offered.lock().unwrap();
        let silent = self.silent.lock().unwrap();
        let rates = self.error_rates.lock().unwrap();
        let mut counters = self.counters.lock().unwrap();
        let answers = pods
            .iter()
            .map(|p| {
                if silent.contains(&p.name) {
                    return None;
                }
                let rate = rates
                    .iter()
                    .rev()
                    .find(|(prefix, _)| p.name.starts_with(prefix.as_str()))
                    .map_or(0.0, |(_, r)| *r);
                let (requests, errors) = counters.entry(p.name.clone()).or_default();
                *requests += 10.0;
                *errors += 10.0 * rate;
                let total = offered.get(&p.instance).copied().unwrap_or(0.0);
                Some(PodMetrics {
                    load: total / pods.len() as f64,
                    requests: *requests,
                    errors: *errors,
                })
            })
            .collect();
        Box::pin(std::future::ready(answers))
    }

    fn held(&self) -> BoxFuture<'_, HashMap<(String, String), f64>> {
        let gateway = self.gateway.lock().unwrap().clone();
        Box::pin(async move {
            match gateway {
                Some(g) => g.held().await,
                None => HashMap::new(),
            }
        })
    }
}
