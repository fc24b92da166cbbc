//! The phase, decided by one ordered list of rules: the first that applies wins, and its
//! cause is what the `Ready` condition (and the phase's event) says.
use super::Observed;
use super::model::Model;
use crate::build::Desired;
use crate::canary::Canary;
use crate::crd::{ModelDeployment, Phase};
use crate::diagnosis::Cause;

/// What the phase is decided from, besides what was observed.
pub struct Facts<'a> {
    pub model: &'a Model,
    /// What keeps the serving pods from being ready, the current revision's first.
    pub pod_cause: Option<Cause>,
    /// The Deployment ran out of its progress deadline, with the pods' reason why.
    pub deadline: Option<Cause>,
    /// The Deployment runs the desired revision at full strength.
    pub rolled_out: bool,
    pub replicas: i32,
    pub updated: i32,
    pub ready: i32,
}

/// The phase and its cause, by rules in order of precedence: what the user must fix
/// first, then the rollout decisions, then progress.
pub fn decide(
    md: &ModelDeployment,
    desired: &Desired,
    observed: &Observed,
    facts: &Facts,
) -> (Phase, Cause) {
    let cause = |reason, message| Cause { reason, message };
    let Facts {
        replicas,
        updated,
        ready,
        ..
    } = *facts;
    let revision = &desired.revision;
    if let Some(message) = &observed.rejected {
        return (Phase::Failed, cause("Rejected", message.clone()));
    }
    match &observed.canary {
        Some(Canary::Running { status: c, .. }) => {
            let message = format!(
                "canary of revision {} beside revision {revision}: {}",
                c.revision, c.message
            );
            return (Phase::Deploying, cause("Canary", message));
        }
        Some(Canary::Aborted(c)) => {
            let message = format!(
                "the canary of revision {} was aborted ({}); revision {revision} serves; change \
                 the spec to try again",
                c.revision, c.message
            );
            return (Phase::Degraded, cause("CanaryAborted", message));
        }
        _ => {}
    }
    if let Some(rb) = &observed.rolled_back {
        let deadline = md
            .spec
            .rollout
            .clone()
            .unwrap_or_default()
            .progress_deadline_seconds;
        let message = format!(
            "revision {} made no progress for {deadline} s ({}); rolled back to revision \
             {revision}, the last spec that was Ready ({ready} ready); change the spec to try again",
            rb.revision, rb.message
        );
        return (Phase::Degraded, cause("RolledBack", message));
    }
    if let Model::Failed {
        message,
        permanent: true,
    } = facts.model
    {
        return (Phase::Failed, cause("PullFailed", message.clone()));
    }
    if let Some(c) = facts
        .pod_cause
        .as_ref()
        .filter(|c| c.reason == "ConfigError")
    {
        return (Phase::Failed, c.clone());
    }
    if desired.replicas == 0 && replicas == 0 {
        return (
            Phase::ScaledToZero,
            cause("ScaledToZero", "no replicas wanted".into()),
        );
    }
    if facts.rolled_out {
        let message = format!(
            "{ready}/{} replicas ready on revision {revision}",
            desired.replicas
        );
        return (Phase::Ready, cause("Ready", message));
    }
    if let Some(f) = observed
        .fallback
        .as_ref()
        .filter(|_| facts.deadline.is_none())
    {
        let message = format!(
            "no free GPU for a surge pod ({}): replacing one pod at a time, so one of {} \
             replicas is down until revision {revision} is rolled out; {updated} updated, {ready} ready",
            f.message, desired.replicas
        );
        return (Phase::Deploying, cause("ReplacingOneAtATime", message));
    }
    if let Some(c) = facts.deadline.clone().or(facts.pod_cause.clone()) {
        let phase = if c.reason == "Unschedulable" && ready == 0 {
            Phase::Pending
        } else {
            Phase::Degraded
        };
        return (phase, c);
    }
    if let Model::Pulling(message) | Model::Failed { message, .. } = facts.model
        && (desired.hold_deployment || !observed.pods.is_empty())
    {
        return (Phase::Pulling, cause("Pulling", message.clone()));
    }
    if observed.deployment.is_none() || replicas == 0 {
        let message = "waiting for the serving pods to be created".into();
        return (Phase::Pending, cause("Pending", message));
    }
    let message = format!(
        "{updated}/{} replicas on revision {revision}, {ready} ready",
        desired.replicas
    );
    (Phase::Deploying, cause("Deploying", message))
}
