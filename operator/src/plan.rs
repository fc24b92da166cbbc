//! The plan step: from what the caches hold of one ModelDeployment, everything the
//! controller then does, decided in one pure function. The children to apply (each built
//! by `build/`), the owned children to prune, the canary and rollback decisions, the GPU
//! fallback, whether the canary's pods must be scraped first, when to look again, and the
//! events those decisions publish. No client here: unit tests and `render --observed`
//! reach every rollout state through it.
use crate::autoscale::policy::Decision;
use crate::autoscale::scrape::{PodMetrics, PodTarget};
use crate::build::{self, ChildRef, Desired, Kind, Settings, TRACK_LABEL};
use crate::canary::{self, Canary};
use crate::crd::{CanaryCounters, CanaryVerdict, ModelDeployment, RolledBack};
use crate::diagnosis;
use crate::events;
use crate::rollout::{self, Fallback};
use crate::status::Observed;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::events::Event;
use std::sync::Arc;
use std::time::Duration;

/// Without changes, each ModelDeployment is looked at again this often (reads only).
pub const RESYNC: Duration = Duration::from_secs(600);

/// What the caches hold of one ModelDeployment's children: the read step's result.
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    /// The serving Deployment, by name.
    pub deployment: Option<Arc<Deployment>>,
    /// The canary Deployment, by name.
    pub canary: Option<Arc<Deployment>>,
    /// Pull Jobs this ModelDeployment owns.
    pub jobs: Vec<Arc<Job>>,
    /// Its pods: serving ones of any revision, and those of its pull Jobs.
    pub pods: Vec<Arc<Pod>>,
    /// Every child found that this very ModelDeployment owns (by uid): the prune candidates.
    pub owned: Vec<ChildRef>,
    /// The autoscaler's last decision, with `spec.autoscaling`.
    pub scaling: Option<Decision>,
    /// The serving pods' request counters, once the plan asked for them.
    pub scraped: Scraped,
}

/// Whether the canary's request counters were read for this reconcile.
#[derive(Debug, Default, Clone, PartialEq)]
pub enum Scraped {
    #[default]
    No,
    /// Summed per track; `None` when no pod answered.
    Yes(Option<CanaryCounters>),
}

/// A ready serving pod whose counters a canary verdict needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeTarget {
    pub canary: bool,
    pub pod: PodTarget,
}

/// What the plan step returns.
pub enum Step {
    /// A canary is being judged: scrape these pods, then plan again with what they said.
    Scrape(Vec<ScrapeTarget>),
    Plan(Box<Plan>),
}

/// Everything one reconcile does.
pub struct Plan {
    /// The children to apply, in order.
    pub desired: Desired,
    /// Owned children the plan does not list: delete them.
    pub prune: Vec<ChildRef>,
    /// When to look again without a change.
    pub recheck: Duration,
    /// Events of the plan's own decisions (status changes add theirs when written).
    pub events: Vec<Event>,
    pub fallback: Option<Fallback>,
    pub rolled_back: Option<RolledBack>,
    pub canary: Option<Canary>,
}

/// The plan for `md`, given what `cluster` holds, at `now`.
pub fn plan(md: &ModelDeployment, settings: &Settings, cluster: &Cluster, now: &Time) -> Step {
    let replicas = crate::replicas::wanted(md, cluster.scaling.map(|d| d.replicas));
    let mut desired = build::desired(md, settings, replicas);
    let serving = cluster.serving();
    let deployment = cluster.deployment.as_deref();
    let canary = match canary_applies(md, &desired.revision) {
        false => None,
        true => {
            let counters = match &cluster.scraped {
                Scraped::Yes(counters) => *counters,
                Scraped::No if canary_decided(md, &desired.revision) => None,
                Scraped::No => return Step::Scrape(scrape_targets(md, &serving)),
            };
            let ready = canary_ready(cluster.canary.as_deref(), &desired.revision);
            canary::decide(md, &desired.revision, replicas, ready, counters, now)
        }
    };
    // A running canary is looked at again when its step ends.
    let recheck = match &canary {
        Some(Canary::Running { recheck, .. }) => (*recheck).clamp(Duration::from_secs(1), RESYNC),
        _ => RESYNC,
    };
    let rolled_back = match &canary {
        Some(_) => None,
        None => rollout::rolled_back(md, deployment, &serving, &desired.revision),
    };
    if let Some(previous) = previous_spec(md) {
        let build = |md: &ModelDeployment, replicas| build::desired(md, settings, replicas);
        match &canary {
            Some(Canary::Running {
                stable_replicas,
                canary_replicas,
                ..
            }) => {
                desired =
                    build(&previous, *stable_replicas).with_canary(build(md, *canary_replicas));
            }
            Some(Canary::Aborted(_)) => desired = build(&previous, replicas),
            // Until the promoted revision is rolled out, its canary pods keep serving.
            Some(Canary::Promoted(c)) => {
                let (_, canary_replicas) = canary::split(replicas, c.weight);
                desired = desired.with_canary(build(md, canary_replicas));
            }
            None if rolled_back.is_some() => desired = build(&previous, replicas),
            None => {}
        }
    }
    let mut events = Vec::new();
    let fallback = rollout::gpu_fallback(md, deployment, &serving, &desired.revision);
    if let Some(f) = &fallback {
        if !rollout::one_at_a_time(deployment) {
            events.push(events::gpu_fallback(f, &desired.revision));
        }
        desired = desired.one_at_a_time();
    }
    let job = cluster.job(&desired);
    if desired.pull_job.is_some() && !diagnosis::job_complete(job) {
        desired = desired.hold_deployment();
    }
    let prune = cluster
        .owned
        .iter()
        .filter(|found| !wanted(&desired, found))
        .cloned()
        .collect();
    Step::Plan(Box::new(Plan {
        desired,
        prune,
        recheck,
        events,
        fallback,
        rolled_back,
        canary,
    }))
}

impl Plan {
    /// What status is computed from: the cluster as the plan saw it, its decisions, and
    /// the API server's refusal of a child, if any.
    pub fn observed<'a>(&'a self, cluster: &'a Cluster, rejected: Option<String>) -> Observed<'a> {
        let job = cluster.job(&self.desired);
        let job_pods = cluster
            .pulling()
            .into_iter()
            .filter(|p| {
                p.labels().get("batch.kubernetes.io/job-name") == self.desired.pull_job.as_ref()
            })
            .collect();
        Observed {
            deployment: cluster.deployment.as_deref(),
            pods: cluster.serving(),
            job,
            job_pods,
            rejected,
            scaling: cluster.scaling,
            fallback: self.fallback.clone(),
            rolled_back: self.rolled_back.clone(),
            canary: self.canary.clone(),
        }
    }
}

impl Cluster {
    fn serving(&self) -> Vec<&Pod> {
        self.pods
            .iter()
            .map(Arc::as_ref)
            .filter(|p| !is_pull(p))
            .collect()
    }

    fn pulling(&self) -> Vec<&Pod> {
        self.pods
            .iter()
            .map(Arc::as_ref)
            .filter(|p| is_pull(p))
            .collect()
    }

    /// The pull Job of what `desired` pulls, if it exists.
    fn job(&self, desired: &Desired) -> Option<&Job> {
        let name = desired.pull_job.as_ref()?;
        self.jobs
            .iter()
            .map(Arc::as_ref)
            .find(|j| j.metadata.name.as_ref() == Some(name))
    }
}

fn is_pull(pod: &Pod) -> bool {
    pod.labels()
        .get("app.kubernetes.io/component")
        .map(String::as_str)
        == Some("pull")
}

/// Whether the plan keeps `found`: it is listed, or it is the Deployment held while its
/// new model is pulled.
fn wanted(desired: &Desired, found: &ChildRef) -> bool {
    desired.children.iter().any(|c| c.key() == *found)
        || (found.kind == Kind::Deployment && desired.hold_deployment)
}

/// The spec that was last Ready, which canaries run beside and rollbacks return to.
fn previous_spec(md: &ModelDeployment) -> Option<ModelDeployment> {
    let spec = md.status.as_ref()?.ready_spec.as_ref()?;
    let mut previous = md.clone();
    previous.spec = *spec.clone();
    Some(previous)
}

/// Only a revision other than the one serving can be a canary, and only with
/// `rollout.canary` and a Ready spec to compare with.
fn canary_applies(md: &ModelDeployment, revision: &str) -> bool {
    let configured = md.spec.rollout.as_ref().is_some_and(|r| r.canary.is_some());
    let status = md.status.as_ref();
    configured
        && status.is_some_and(|s| s.ready_spec.is_some())
        && status.and_then(|s| s.current_revision.as_deref()) != Some(revision)
}

/// Whether this generation's canary already has its verdict: then no scrape is needed.
fn canary_decided(md: &ModelDeployment, revision: &str) -> bool {
    let canary = md.status.as_ref().and_then(|s| s.canary.as_ref());
    canary.is_some_and(|c| {
        c.revision == revision
            && c.generation == md.metadata.generation.unwrap_or_default()
            && c.verdict != CanaryVerdict::Progressing
    })
}

/// Whether the canary Deployment runs `revision` with every pod it wants ready.
fn canary_ready(deployment: Option<&Deployment>, revision: &str) -> bool {
    deployment.is_some_and(|d| {
        let status = d.status.clone().unwrap_or_default();
        build::template_revision(d) == Some(revision)
            && status.observed_generation >= d.metadata.generation
            && status.updated_replicas == d.spec.replicas
            && status.ready_replicas == d.spec.replicas
    })
}

/// The ready serving pods, each with its track.
fn scrape_targets(md: &ModelDeployment, serving: &[&Pod]) -> Vec<ScrapeTarget> {
    serving
        .iter()
        .filter(|p| diagnosis::pod_ready(p))
        .map(|p| ScrapeTarget {
            canary: p.labels().get(TRACK_LABEL).map(String::as_str) == Some("canary"),
            pod: PodTarget::of(p, &md.name_any()),
        })
        .collect()
}

/// The canary's counters from what each target answered (in order), summed per track;
/// `None` when no pod answered.
pub fn counters(
    targets: &[ScrapeTarget],
    answers: &[Option<PodMetrics>],
) -> Option<CanaryCounters> {
    let mut counters = CanaryCounters::default();
    let mut answered = false;
    for (target, m) in targets.iter().zip(answers) {
        let Some(m) = m else { continue };
        answered = true;
        if target.canary {
            counters.canary_requests += m.requests;
            counters.canary_errors += m.errors;
        } else {
            counters.stable_requests += m.requests;
            counters.stable_errors += m.errors;
        }
    }
    answered.then_some(counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{md, settings};
    use crate::build::{Child, REVISION_LABEL};
    use crate::crd::ModelDeploymentStatus;
    use serde_json::{Value, json};

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    /// `spec` was Ready; the spec now asks for another model, with `rollout`.
    fn changed(rollout: Value) -> ModelDeployment {
        let mut m = md(json!({"model": {"uri": "hf://o/old"}, "replicas": 4}));
        let ready = m.clone();
        m.spec =
            md(json!({"model": {"uri": "hf://o/new"}, "replicas": 4, "rollout": rollout})).spec;
        m.status = Some(ModelDeploymentStatus {
            current_revision: Some(revision(&ready)),
            ready_spec: Some(Box::new(ready.spec.clone())),
            ..Default::default()
        });
        m
    }

    fn revision(md: &ModelDeployment) -> String {
        build::desired(md, &settings(), 4).revision
    }

    fn planned(md: &ModelDeployment, cluster: &Cluster) -> Plan {
        match plan(md, &settings(), cluster, &at(0)) {
            Step::Plan(p) => *p,
            Step::Scrape(t) => panic!("asked to scrape {t:?}"),
        }
    }

    /// Name, replicas and revision of each Deployment the plan applies.
    fn deployments(plan: &Plan) -> Vec<(String, i32, String)> {
        plan.desired
            .children
            .iter()
            .filter_map(|c| match c {
                Child::Deployment(d) => Some((
                    d.name_any(),
                    d.spec.replicas.unwrap_or_default(),
                    build::template_revision(d).unwrap_or_default().to_string(),
                )),
                _ => None,
            })
            .collect()
    }

    fn ready_pod(name: &str, revision: &str, track: Option<&str>) -> Arc<Pod> {
        let mut labels = json!({"app.kubernetes.io/instance": "smollm", REVISION_LABEL: revision});
        if let Some(t) = track {
            labels[TRACK_LABEL] = t.into();
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ml", "labels": labels},
                "status": {"podIP": "10.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_canary_being_judged_asks_for_the_pods_counters_by_track_first() {
        let m = changed(json!({"canary": {"steps": [{"weight": 25, "pauseSeconds": 60}]}}));
        let cluster = Cluster {
            pods: vec![
                ready_pod("stable", &revision(&m), None),
                ready_pod("canary", "new", Some("canary")),
            ],
            ..Cluster::default()
        };
        let Step::Scrape(targets) = plan(&m, &settings(), &cluster, &at(0)) else {
            panic!("no scrape asked");
        };
        let tracks: Vec<_> = targets
            .iter()
            .map(|t| (t.pod.name.as_str(), t.canary))
            .collect();
        assert_eq!(tracks, [("stable", false), ("canary", true)]);
        let answers = [
            Some(PodMetrics {
                load: 0.0,
                requests: 10.0,
                errors: 1.0,
            }),
            Some(PodMetrics {
                load: 0.0,
                requests: 4.0,
                errors: 2.0,
            }),
        ];
        let summed = counters(&targets, &answers).unwrap();
        assert_eq!((summed.stable_errors, summed.canary_errors), (1.0, 2.0));
        assert_eq!(counters(&targets, &[None, None]), None);
    }

    #[test]
    fn a_running_canary_deploys_both_revisions_split_by_weight() {
        let m = changed(json!({"canary": {"steps": [{"weight": 25, "pauseSeconds": 60}]}}));
        let cluster = Cluster {
            scraped: Scraped::Yes(None),
            ..Cluster::default()
        };
        let p = planned(&m, &cluster);
        let ready = md(json!({"model": {"uri": "hf://o/old"}, "replicas": 4}));
        assert_eq!(
            deployments(&p),
            [
                ("smollm".into(), 3, revision(&ready)),
                ("smollm-canary".into(), 1, revision(&m)),
            ]
        );
        assert!(matches!(p.canary, Some(Canary::Running { .. })));
        assert_eq!(p.recheck, Duration::from_secs(60));
    }

    #[test]
    fn an_aborted_canary_returns_to_the_ready_spec_and_prunes_its_deployment() {
        let mut m = changed(json!({"canary": {"steps": [{"weight": 25, "pauseSeconds": 60}]}}));
        m.metadata.annotations = Some([(crate::canary::ANNOTATION.into(), "abort".into())].into());
        let cluster = Cluster {
            scraped: Scraped::Yes(None),
            owned: build::named_children(&m)
                .into_iter()
                .filter(|c| c.kind == Kind::Deployment)
                .collect(),
            ..Cluster::default()
        };
        let p = planned(&m, &cluster);
        let ready = md(json!({"model": {"uri": "hf://o/old"}, "replicas": 4}));
        assert_eq!(deployments(&p), [("smollm".into(), 4, revision(&ready))]);
        assert_eq!(
            p.prune,
            [ChildRef {
                kind: Kind::Deployment,
                name: "smollm-canary".into()
            }]
        );
    }

    #[test]
    fn a_rollout_past_its_deadline_rolls_back_to_the_ready_spec() {
        let m = changed(json!({"autoRollback": true}));
        let stuck: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "smollm", "namespace": "ml"},
            "spec": {"selector": {}, "template": {"metadata": {"labels": {REVISION_LABEL: revision(&m)}}}},
            "status": {"conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}}))
        .unwrap();
        let cluster = Cluster {
            deployment: Some(Arc::new(stuck)),
            ..Cluster::default()
        };
        let p = planned(&m, &cluster);
        let ready = md(json!({"model": {"uri": "hf://o/old"}, "replicas": 4}));
        assert_eq!(deployments(&p), [("smollm".into(), 4, revision(&ready))]);
        assert_eq!(p.rolled_back.map(|r| r.revision), Some(revision(&m)));
    }

    #[test]
    fn a_surge_pod_without_a_gpu_is_announced_once_and_rolls_one_at_a_time() {
        let m = changed(json!({}));
        let mut blocked = (*ready_pod("new", &revision(&m), None)).clone();
        blocked.status = serde_json::from_value(json!({"conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}))
        .unwrap();
        let mut cluster = Cluster {
            pods: vec![ready_pod("old", "old", None), Arc::new(blocked)],
            ..Cluster::default()
        };
        let p = planned(&m, &cluster);
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "GPUFallback");
        let Child::Deployment(d) = &p.desired.children[0] else {
            panic!("the Deployment first");
        };
        cluster.deployment = Some(Arc::new((**d).clone()));
        let again = planned(&m, &cluster);
        assert!(again.fallback.is_some());
        assert!(
            again.events.is_empty(),
            "already one at a time: no new event"
        );
    }

    #[test]
    fn a_pvc_cache_holds_the_deployment_until_its_pull_job_completes() {
        let m = md(
            json!({"model": {"uri": "hf://o/m"}, "cache": {"volume": "pvc", "pvc": {"size": "2Gi"}}}),
        );
        let owned = build::named_children(&m)
            .into_iter()
            .filter(|c| c.kind == Kind::Deployment && c.name == "smollm")
            .collect();
        let cluster = Cluster {
            owned,
            ..Cluster::default()
        };
        let p = planned(&m, &cluster);
        assert!(p.desired.hold_deployment);
        assert!(deployments(&p).is_empty());
        assert!(p.prune.is_empty(), "a held Deployment is kept");
    }
}
