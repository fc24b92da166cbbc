//! Rollout decisions, as pure functions of the spec and what the cluster shows.
//!
//! The GPU fallback: a rolling update with `maxUnavailable: 0` adds a surge pod before it
//! removes an old one. When every GPU is held by the old pods, that surge pod can never be
//! scheduled and the rollout waits forever (KServe's users know this deadlock). Then the
//! rollout replaces one pod at a time instead (surge 0, one unavailable) until no pod of an
//! older revision is left, and the configured strategy comes back.
//!
//! Rollback: with `autoRollback`, a rollout whose Deployment reports its progress deadline
//! exceeded goes back to the last spec that was Ready (`status.readySpec`); the failure is
//! kept in `status.rolledBack` for this generation, so the failed revision is not tried
//! again until the spec changes.
use crate::build::REVISION_LABEL;
use crate::crd::{ModelDeployment, RolledBack};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

/// Why the rollout replaces one pod at a time: the scheduler's words about the surge pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    pub message: String,
}

/// Whether the rollout to `revision` must replace one pod at a time now.
pub fn gpu_fallback(
    md: &ModelDeployment,
    deployment: Option<&Deployment>,
    pods: &[&Pod],
    revision: &str,
) -> Option<Fallback> {
    let rollout = md.spec.rollout.clone().unwrap_or_default();
    // With room to take an old pod down first, a rollout cannot deadlock on GPUs.
    if rollout.max_unavailable != IntOrString::Int(0) {
        return None;
    }
    let of_revision =
        |p: &&&Pod| p.labels().get(REVISION_LABEL).map(String::as_str) == Some(revision);
    let old_pods_left = pods.iter().any(|p| !of_revision(&p));
    if !old_pods_left {
        return None;
    }
    let blocked = pods.iter().filter(of_revision).find_map(|p| {
        let c = p
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        let message = c.message.clone().unwrap_or_default();
        (c.reason.as_deref() == Some("Unschedulable") && message.contains("nvidia.com/gpu"))
            .then_some(message)
    });
    // Once switched, the fallback holds until the old pods are gone: the surge pod it
    // was blocked on is no longer there to show why.
    match (blocked, one_at_a_time(deployment)) {
        (Some(message), _) => Some(Fallback { message }),
        (None, true) => Some(Fallback {
            message: "a surge pod could not get a GPU".into(),
        }),
        (None, false) => None,
    }
}

/// Whether the rollout to `revision` is (or, for this generation, was) rolled back.
pub fn rolled_back(
    md: &ModelDeployment,
    deployment: Option<&Deployment>,
    pods: &[&Pod],
    revision: &str,
) -> Option<RolledBack> {
    if !md.spec.rollout.clone().unwrap_or_default().auto_rollback {
        return None;
    }
    let status = md.status.as_ref()?;
    let generation = md.metadata.generation.unwrap_or_default();
    if let Some(rb) = status
        .rolled_back
        .as_ref()
        .filter(|r| r.generation == generation)
    {
        return Some(rb.clone());
    }
    status.ready_spec.as_ref()?;
    if status.current_revision.as_deref() == Some(revision) {
        return None;
    }
    let d = deployment?;
    if crate::build::template_revision(d) != Some(revision) {
        return None;
    }
    let exceeded = d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    })?;
    let message = crate::diagnosis::pod_problem(pods, revision)
        .or_else(|| exceeded.message.clone())
        .unwrap_or_default();
    Some(RolledBack {
        generation,
        revision: revision.to_string(),
        message,
    })
}

/// Whether the Deployment already rolls one pod at a time.
pub fn one_at_a_time(deployment: Option<&Deployment>) -> bool {
    deployment
        .and_then(crate::build::rolling_update)
        .is_some_and(|r| {
            r.max_surge == Some(IntOrString::Int(0))
                && r.max_unavailable == Some(IntOrString::Int(1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::md;
    use serde_json::json;

    fn pod(revision: &str, scheduled: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("p-{revision}"), "labels": {REVISION_LABEL: revision}},
            "status": {"conditions": [scheduled]},
        }))
        .unwrap()
    }

    fn running(revision: &str) -> Pod {
        pod(revision, json!({"type": "PodScheduled", "status": "True"}))
    }

    fn unschedulable(revision: &str, why: &str) -> Pod {
        pod(
            revision,
            json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}),
        )
    }

    fn deployment(surge: i32, unavailable: i32) -> Deployment {
        serde_json::from_value(json!({"spec": {
            "selector": {}, "template": {},
            "strategy": {"rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}}}))
        .unwrap()
    }

    const NO_GPU: &str = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.";

    #[test]
    fn a_surge_pod_without_a_gpu_switches_to_one_at_a_time() {
        let m = md(json!({"model": {"uri": "hf://o/m"}, "resources": {"gpu": {"count": 1}}}));
        let (old, new) = (running("a"), unschedulable("b", NO_GPU));
        let f = gpu_fallback(&m, Some(&deployment(1, 0)), &[&old, &old, &new], "b");
        assert_eq!(f.map(|f| f.message).as_deref(), Some(NO_GPU));
    }

    #[test]
    fn the_switch_holds_until_no_old_pod_is_left_then_ends() {
        let m = md(json!({"model": {"uri": "hf://o/m"}}));
        let (old, new) = (running("a"), running("b"));
        let switched = deployment(0, 1);
        assert!(gpu_fallback(&m, Some(&switched), &[&old, &new], "b").is_some());
        assert!(gpu_fallback(&m, Some(&switched), &[&new, &new], "b").is_none());
    }

    #[test]
    fn other_waits_are_not_a_gpu_deadlock() {
        let m = md(json!({"model": {"uri": "hf://o/m"}}));
        let old = running("a");
        let cpu = unschedulable("b", "0/3 nodes are available: 3 Insufficient cpu.");
        assert!(gpu_fallback(&m, Some(&deployment(1, 0)), &[&old, &cpu], "b").is_none());
        // A first rollout (no old pods) waits for GPUs like any pod.
        let new = unschedulable("b", NO_GPU);
        assert!(gpu_fallback(&m, None, &[&new], "b").is_none());
        // With maxUnavailable > 0 the controller already takes an old pod down first.
        let lenient = md(json!({"model": {"uri": "hf://o/m"}, "rollout": {"maxUnavailable": 1}}));
        assert!(gpu_fallback(&lenient, Some(&deployment(1, 1)), &[&old, &new], "b").is_none());
    }

    fn stuck(revision: &str) -> Deployment {
        serde_json::from_value(json!({"spec": {
            "selector": {}, "template": {"metadata": {"labels": {REVISION_LABEL: revision}}}},
            "status": {"conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out progressing."}]}}))
        .unwrap()
    }

    /// A ModelDeployment at `generation` whose last Ready revision was "a".
    fn was_ready(spec: serde_json::Value, generation: i64) -> ModelDeployment {
        let mut m = md(spec);
        m.metadata.generation = Some(generation);
        m.status = Some(crate::crd::ModelDeploymentStatus {
            current_revision: Some("a".into()),
            ready_spec: Some(Box::new(m.spec.clone())),
            ..Default::default()
        });
        m
    }

    #[test]
    fn a_missed_deadline_rolls_back_to_the_last_ready_spec() {
        let m = was_ready(json!({"model": {"uri": "hf://o/m"}}), 2);
        let crashing = pod(
            "b",
            json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": NO_GPU}),
        );
        let rb = rolled_back(&m, Some(&stuck("b")), &[&crashing], "b").expect("rolled back");
        assert_eq!((rb.generation, rb.revision.as_str()), (2, "b"));
        assert!(
            rb.message
                .starts_with("Unschedulable: pod p-b cannot be scheduled"),
            "{}",
            rb.message
        );
        // Still progressing, or nothing Ready to go back to, or not wanted: no rollback.
        assert_eq!(rolled_back(&m, Some(&deployment(1, 0)), &[], "b"), None);
        let first = md(json!({"model": {"uri": "hf://o/m"}}));
        assert_eq!(rolled_back(&first, Some(&stuck("b")), &[], "b"), None);
        let manual = was_ready(
            json!({"model": {"uri": "hf://o/m"}, "rollout": {"autoRollback": false}}),
            2,
        );
        assert_eq!(rolled_back(&manual, Some(&stuck("b")), &[], "b"), None);
    }

    #[test]
    fn a_rollback_holds_for_its_generation_only() {
        let mut m = was_ready(json!({"model": {"uri": "hf://o/m"}}), 2);
        let rb = RolledBack {
            generation: 2,
            revision: "b".into(),
            message: "m".into(),
        };
        m.status.as_mut().unwrap().rolled_back = Some(rb.clone());
        // The old revision is back and its Deployment no longer reports the deadline.
        assert_eq!(rolled_back(&m, Some(&deployment(1, 0)), &[], "b"), Some(rb));
        m.metadata.generation = Some(3);
        assert_eq!(rolled_back(&m, Some(&deployment(1, 0)), &[], "c"), None);
    }
}
