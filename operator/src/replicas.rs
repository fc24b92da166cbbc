//! How many serving pods a ModelDeployment wants right now.
use crate::crd::ModelDeployment;

/// `spec.replicas` (default 1), or with autoscaling the autoscaler's `decision`, else its
/// last one kept in `status.desiredReplicas` (after a restart), within the bounds; before
/// any decision, `minReplicas` but at least one pod, so a new model comes up and can be
/// tried.
pub fn wanted(md: &ModelDeployment, decision: Option<i32>) -> i32 {
    match &md.spec.autoscaling {
        None => md.spec.replicas.unwrap_or(1),
        Some(a) => decision
            .or_else(|| md.status.as_ref().and_then(|s| s.desired_replicas))
            .unwrap_or(a.min_replicas.max(1))
            .clamp(a.min_replicas, a.max_replicas),
    }
}
