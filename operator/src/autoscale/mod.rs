//! Autoscaling on the load the serving pods report (`spec.autoscaling`): `policy` decides,
//! `scrape` reads the pods' `/metrics`, and [`Autoscaler::run`] does both for every
//! autoscaled ModelDeployment each tick, asking for a reconcile when a decision changes.
//! Decisions live here, in memory; reconciles read them and write the Deployment's replicas
//! and `status.desiredReplicas`, never the spec. After a restart the first decision starts
//! from `status.desiredReplicas`.
pub mod policy;
pub mod scrape;

use crate::crd::ModelDeployment;
use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use policy::{Bounds, Decision, State, Windows};
use scrape::{LoadSource, PodTarget};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Autoscaler {
    source: Arc<dyn LoadSource>,
    windows: Windows,
    tick: Duration,
    clock: Instant,
    scalers: Mutex<HashMap<ObjectRef<ModelDeployment>, Scaler>>,
}

struct Scaler {
    state: State,
    /// The decision last published (to reconciles, status and events): it changes when the
    /// replicas or the number of pods reporting do, so status does not churn with the load.
    published: Option<Decision>,
}

/// ModelDeployments scraped at once.
const PARALLEL: usize = 32;

impl Autoscaler {
    pub fn new(source: Arc<dyn LoadSource>, windows: Windows, tick: Duration) -> Self {
        Self {
            source,
            windows,
            tick,
            clock: Instant::now(),
            scalers: Mutex::new(HashMap::new()),
        }
    }

    /// Where pod metrics come from (canary verdicts use it too).
    pub fn source(&self) -> &Arc<dyn LoadSource> {
        &self.source
    }

    /// The decision for `md`, once its pods have reported.
    pub fn decision(&self, md: &ObjectRef<ModelDeployment>) -> Option<Decision> {
        let scalers = self.scalers.lock().expect("not poisoned");
        scalers.get(md).and_then(|s| s.published)
    }

    /// Every tick: scrape the ready pods of each autoscaled ModelDeployment of `mds()`,
    /// decide, and send the ones whose decision changed to `changed`. Runs until `changed`
    /// is closed.
    pub async fn run(
        &self,
        mds: impl Fn() -> Vec<Arc<ModelDeployment>>,
        ready_pods: impl Fn(&str, &str) -> Vec<PodTarget>,
        changed: tokio::sync::mpsc::UnboundedSender<ObjectRef<ModelDeployment>>,
    ) {
        let mut ticks = tokio::time::interval(self.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !changed.is_closed() {
            ticks.tick().await;
            let scaled: Vec<_> = mds()
                .into_iter()
                .filter(|md| md.spec.autoscaling.is_some())
                .collect();
            self.forget_all_but(&scaled);
            let held = self.source.held().await;
            let rounds = futures::stream::iter(scaled)
                .map(|md| {
                    let pods = ready_pods(&md.namespace().unwrap_or_default(), &md.name_any());
                    async move {
                        let metrics = self.source.scrape(&pods).await;
                        let loads: Vec<_> = metrics.iter().map(|m| m.map(|m| m.load)).collect();
                        (md, loads)
                    }
                })
                .buffer_unordered(PARALLEL)
                .collect::<Vec<_>>()
                .await;
            for (md, loads) in rounds {
                let key = (md.namespace().unwrap_or_default(), md.name_any());
                let held = held.get(&key).copied().unwrap_or(0.0);
                if self.observe(&md, &loads, held) {
                    let _ = changed.send(ObjectRef::from_obj(md.as_ref()));
                }
            }
        }
    }

    fn forget_all_but(&self, scaled: &[Arc<ModelDeployment>]) {
        let keep: std::collections::HashSet<_> = scaled
            .iter()
            .map(|md| ObjectRef::from_obj(md.as_ref()))
            .collect();
        self.scalers
            .lock()
            .expect("not poisoned")
            .retain(|key, _| keep.contains(key));
    }

    /// Takes one scrape round of `md` (its pods' loads and the requests gateways hold for
    /// it) into account; true when the published decision changed.
    fn observe(&self, md: &ModelDeployment, loads: &[Option<f64>], held: f64) -> bool {
        let Some(spec) = &md.spec.autoscaling else {
            return false;
        };
        let now = self.clock.elapsed();
        let bounds = Bounds {
            min: spec.min_replicas,
            max: spec.max_replicas,
            target: f64::from(spec.target_in_flight),
            scale_down_delay: Duration::from_secs(spec.scale_down_delay_seconds.max(0) as u64),
        };
        let mut scalers = self.scalers.lock().expect("not poisoned");
        let scaler = scalers
            .entry(ObjectRef::from_obj(md))
            .or_insert_with(|| Scaler {
                state: State::new(crate::replicas::wanted(md, None), now),
                published: None,
            });
        let Some(sample) = policy::estimate(loads, held, now) else {
            return false;
        };
        let decision = scaler.state.observe(&bounds, &self.windows, sample);
        let changed = scaler.published.is_none_or(|p| {
            (p.replicas, p.answered, p.ready)
                != (decision.replicas, decision.answered, decision.ready)
        });
        if changed {
            tracing::info!(
                namespace = md.namespace().unwrap_or_default(),
                name = %md.name_any(),
                replicas = decision.replicas,
                stable_load = decision.stable_load,
                panic_load = decision.panic_load,
                panicking = decision.panicking,
                answered = decision.answered,
                ready = decision.ready,
                "autoscaling decision"
            );
            scaler.published = Some(decision);
        }
        changed
    }
}
