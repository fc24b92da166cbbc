//! Load for the autoscaler in the simulated cluster: what each ModelDeployment's clients
//! offer (requests in flight or queued), spread evenly over its ready pods, as their
//! `/metrics` would report it; and pods that stop answering.
use kandle_operator::autoscale::scrape::{LoadSource, PodTarget};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Default)]
pub struct SimulatedLoad {
    offered: Mutex<HashMap<String, f64>>,
    silent: Mutex<HashSet<String>>,
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
}

impl LoadSource for SimulatedLoad {
    fn loads<'a>(
        &'a self,
        pods: &'a [PodTarget],
    ) -> futures::future::BoxFuture<'a, Vec<Option<f64>>> {
        let offered = self.offered.lock().unwrap();
        let silent = self.silent.lock().unwrap();
        let answers = pods
            .iter()
            .map(|p| {
                let total = offered.get(&p.instance).copied().unwrap_or(0.0);
                (!silent.contains(&p.name)).then(|| total / pods.len() as f64)
            })
            .collect();
        Box::pin(std::future::ready(answers))
    }
}
