//! Status as a pure function of the spec, what was built, and what the cluster shows:
//! a phase, four conditions whose messages name the cause, and the numbers behind them.
//! Deterministic: the same inputs give the same status, and a condition's
//! `lastTransitionTime` moves only when its status does, so an unchanged world writes nothing.
mod conditions;
pub mod invalid;
mod model;
mod phase;

use crate::autoscale::policy::Decision;
use crate::build::{Desired, Settings, endpoint, selector_string};
use crate::canary::Canary;
use crate::crd::{ModelDeployment, ModelDeploymentStatus, Phase, RolledBack};
use crate::diagnosis::{self, Cause};
use crate::rollout::Fallback;
use conditions::{autoscaled, condition, truth};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use model::Model;

/// What the cluster shows of one ModelDeployment's children.
#[derive(Debug, Default)]
pub struct Observed<'a> {
    pub deployment: Option<&'a Deployment>,
    /// Serving pods, any revision.
    pub pods: Vec<&'a Pod>,
    /// The pull Job of the current model (pvc cache only).
    pub job: Option<&'a Job>,
    /// Pods of that Job.
    pub job_pods: Vec<&'a Pod>,
    /// The API server refused a child built from the spec (an immutable field changed).
    pub rejected: Option<String>,
    /// The autoscaler's last decision (with `spec.autoscaling`), once pods have reported.
    pub scaling: Option<Decision>,
    /// The rollout replaces one pod at a time because no GPU is free for a surge pod.
    pub fallback: Option<Fallback>,
    /// The spec's rollout missed its deadline and the last Ready spec is deployed instead.
    pub rolled_back: Option<RolledBack>,
    /// A canary of the spec's revision runs beside the last Ready spec, or was decided.
    pub canary: Option<Canary>,
}

pub fn compute(
    md: &ModelDeployment,
    settings: &Settings,
    desired: &Desired,
    observed: &Observed,
    now: Time,
) -> ModelDeploymentStatus {
    let previous = md.status.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    let deployment_status = observed
        .deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let model = model::model_state(md, settings, observed);
    let pod_cause = diagnosis::pods_cause(&observed.pods, &desired.revision);
    let deadline = observed
        .deployment
        .and_then(|d| d.status.as_ref()?.conditions.as_ref())
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_.as_deref() == Some("Progressing")
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
        })
        // The Deployment says only that time ran out; the pods say why.
        .map(|c| Cause {
            reason: "ProgressDeadlineExceeded",
            message: match &pod_cause {
                Some(p) => format!(
                    "{} {}: {}",
                    c.message.clone().unwrap_or_default(),
                    p.reason,
                    p.message
                ),
                None => c.message.clone().unwrap_or_default(),
            },
        });
    let deployment_current = observed.deployment.is_some_and(|d| {
        d.status.as_ref().and_then(|s| s.observed_generation) >= d.metadata.generation
            && crate::build::template_revision(d) == Some(desired.revision.as_str())
    });
    let ready = deployment_status.ready_replicas.unwrap_or(0);
    let updated = deployment_status.updated_replicas.unwrap_or(0);
    let replicas = deployment_status.replicas.unwrap_or(0);
    let rolled_out = deployment_current
        && updated >= desired.replicas
        && replicas == updated
        && deployment_status.available_replicas.unwrap_or(0) >= desired.replicas;
    let facts = phase::Facts {
        model: &model,
        pod_cause,
        deadline,
        rolled_out,
        replicas,
        updated,
        ready,
    };
    let (phase, cause) = phase::decide(md, desired, observed, &facts);

    let (model_status, model_condition) = match &model {
        Model::Ready(status) => (
            status.clone().or(previous.model.clone()),
            ("True", "Pulled", "the model is in place".to_string()),
        ),
        Model::Pulling(message) => (
            previous.model.clone(),
            ("False", "Pulling", message.clone()),
        ),
        Model::Failed { message, .. } => (
            previous.model.clone(),
            ("False", "PullFailed", message.clone()),
        ),
    };
    let is_ready = matches!(phase, Phase::Ready | Phase::ScaledToZero);
    let degraded = matches!(phase, Phase::Degraded | Phase::Failed);
    let progressing =
        if matches!(observed.canary, Some(Canary::Aborted(_))) || observed.rolled_back.is_some() {
            !rolled_out
        } else {
            matches!(phase, Phase::Pending | Phase::Pulling | Phase::Deploying)
                || (phase == Phase::Degraded && facts.deadline.is_none())
        };
    let ok = |reason: &'static str, message: &str| Cause {
        reason,
        message: message.into(),
    };
    let (model_ok, model_reason, model_message) = model_condition;
    let mut wanted = vec![
        ("Ready", truth(is_ready), cause.clone()),
        ("ModelReady", model_ok, ok(model_reason, &model_message)),
        (
            "Progressing",
            truth(progressing),
            if progressing || degraded {
                cause.clone()
            } else {
                ok("RolloutComplete", "the current spec is rolled out")
            },
        ),
        (
            "Degraded",
            truth(degraded),
            if degraded {
                cause.clone()
            } else {
                ok("AsExpected", "no problem seen")
            },
        ),
    ];
    if let Some(a) = &md.spec.autoscaling {
        let (status, cause) = autoscaled(a.target_in_flight, observed.scaling);
        wanted.push(("Autoscaled", status, cause));
    }
    let conditions = wanted
        .into_iter()
        .map(|(type_, status, cause)| {
            condition(&previous.conditions, type_, status, cause, generation, &now)
        })
        .collect();

    ModelDeploymentStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        desired_replicas: Some(desired.replicas),
        selector: Some(selector_string(md)),
        endpoint: Some(endpoint(md, settings)),
        model: model_status,
        current_revision: if phase == Phase::Ready {
            Some(desired.revision.clone())
        } else {
            previous.current_revision.clone()
        },
        update_revision: Some(desired.revision.clone()),
        ready_spec: if phase == Phase::Ready {
            Some(Box::new(md.spec.clone()))
        } else {
            previous.ready_spec.clone()
        },
        rolled_back: observed.rolled_back.clone(),
        canary: match &observed.canary {
            Some(
                Canary::Running { status, .. } | Canary::Aborted(status) | Canary::Promoted(status),
            ) => Some(status.clone()),
            None => previous.canary.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{md, settings};
    use crate::build::{REVISION_LABEL, desired};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use serde_json::{Value, json};

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    fn model() -> ModelDeployment {
        md(json!({"model": {"uri": "hf://org/m"}, "replicas": 2}))
    }

    fn pod(revision: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "smollm-abc", "namespace": "ml",
                         "labels": {"app.kubernetes.io/instance": "smollm", REVISION_LABEL: revision}},
            "status": status,
        }))
        .unwrap()
    }

    fn deployment(revision: &str, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "smollm", "namespace": "ml", "generation": 1},
            "spec": {"selector": {}, "template": {"metadata": {"labels": {REVISION_LABEL: revision}}}},
            "status": status,
        }))
        .unwrap()
    }

    fn compute_with(md: &ModelDeployment, observed: &Observed, now: i64) -> ModelDeploymentStatus {
        let d = desired(md, &settings(), crate::replicas::wanted(md, None));
        compute(md, &settings(), &d, observed, at(now))
    }

    fn observe<'a>(deployment: Option<&'a Deployment>, pods: Vec<&'a Pod>) -> Observed<'a> {
        Observed {
            deployment,
            pods,
            ..Observed::default()
        }
    }

    fn condition<'a>(s: &'a ModelDeploymentStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn revision(md: &ModelDeployment) -> String {
        desired(md, &settings(), 2).revision
    }

    #[test]
    fn rolled_out_pods_make_it_ready_with_what_was_pulled() {
        let md = model();
        let rev = revision(&md);
        let dep = deployment(
            &rev,
            json!({"observedGeneration": 1, "replicas": 2, "readyReplicas": 2,
                                          "updatedReplicas": 2, "availableReplicas": 2}),
        );
        let report = r#"{"revision":"abc123","sizeBytes":269060552,"files":6}"#;
        let p = pod(
            &rev,
            json!({"initContainerStatuses": [{"name": "pull", "image": "i", "imageID": "",
            "ready": true, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": report, "finishedAt": "2026-01-01T00:00:00Z"}}}]}),
        );
        let s = compute_with(&md, &observe(Some(&dep), vec![&p]), 100);
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "ModelReady").status, "True");
        assert_eq!(condition(&s, "Progressing").status, "False");
        assert_eq!(condition(&s, "Degraded").status, "False");
        assert_eq!(
            (s.ready_replicas, s.replicas, s.desired_replicas),
            (Some(2), Some(2), Some(2))
        );
        let m = s.model.unwrap();
        assert_eq!(
            (m.resolved_revision.as_deref(), m.size_bytes, m.files),
            (Some("abc123"), Some(269060552), Some(6))
        );
        assert_eq!(s.current_revision, Some(rev.clone()));
        assert_eq!(s.update_revision, Some(rev));
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=smollm,app.kubernetes.io/name=kandle-server")
        );
    }

    #[test]
    fn a_permanent_pull_failure_fails_with_the_pulls_own_words() {
        let md = model();
        let report = r#"{"error":"hf://org/m: access denied (401); the model may be gated or private: set HF_TOKEN","transient":false}"#;
        let p = pod(
            &revision(&md),
            json!({"initContainerStatuses": [{"name": "pull", "image": "i", "imageID": "",
            "ready": false, "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "message": report}}}]}),
        );
        let s = compute_with(&md, &observe(None, vec![&p]), 100);
        assert_eq!(s.phase, Some(Phase::Failed));
        let ready = condition(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "PullFailed")
        );
        assert!(
            ready.message.contains("401") && ready.message.contains("HF_TOKEN"),
            "{}",
            ready.message
        );
        assert_eq!(condition(&s, "ModelReady").reason, "PullFailed");
        assert_eq!(condition(&s, "Degraded").status, "True");
    }

    #[test]
    fn unschedulable_pods_say_which_resource_is_missing() {
        let md = model();
        let msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.";
        let p = pod(
            &revision(&md),
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": msg}]}),
        );
        let dep = deployment(
            &revision(&md),
            json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1}),
        );
        let s = compute_with(&md, &observe(Some(&dep), vec![&p]), 100);
        assert_eq!(s.phase, Some(Phase::Pending));
        let ready = condition(&s, "Ready");
        assert_eq!(ready.reason, "Unschedulable");
        assert!(ready.message.contains(msg), "{}", ready.message);
    }

    #[test]
    fn image_pull_and_crash_loops_degrade_with_their_cause() {
        let md = model();
        let rev = revision(&md);
        let dep = deployment(
            &rev,
            json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0}),
        );
        let pulling = pod(
            &rev,
            json!({"containerStatuses": [{"name": "server", "image": "kandle-server:typo",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}}}]}),
        );
        let s = compute_with(&md, &observe(Some(&dep), vec![&pulling]), 100);
        assert_eq!(s.phase, Some(Phase::Degraded));
        let c = condition(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ImagePullBackOff")
        );
        assert!(
            c.message.contains("kandle-server:typo") && c.message.contains("manifest unknown"),
            "{}",
            c.message
        );

        let crashing = pod(
            &rev,
            json!({"containerStatuses": [{"name": "server", "image": "i", "imageID": "",
            "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "unsupported model architecture `mamba`"}}}]}),
        );
        let s = compute_with(&md, &observe(Some(&dep), vec![&crashing]), 100);
        let c = condition(&s, "Ready");
        assert_eq!(c.reason, "CrashLoopBackOff");
        assert!(
            c.message.contains("unsupported model architecture"),
            "{}",
            c.message
        );

        // Past the progress deadline the reason says so, and the message still says why.
        let late = deployment(
            &rev,
            json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0,
                   "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                   "message": "ReplicaSet \"smollm-abc\" has timed out progressing."}]}),
        );
        let s = compute_with(&md, &observe(Some(&late), vec![&crashing]), 100);
        assert_eq!(s.phase, Some(Phase::Degraded));
        let c = condition(&s, "Degraded");
        assert_eq!(c.reason, "ProgressDeadlineExceeded");
        assert!(
            c.message.contains("timed out progressing")
                && c.message.contains("CrashLoopBackOff")
                && c.message.contains("unsupported model architecture"),
            "{}",
            c.message
        );
        assert_eq!(condition(&s, "Progressing").status, "False");
    }

    #[test]
    fn a_missing_secret_fails_until_it_exists() {
        let md = model();
        let p = pod(
            &revision(&md),
            json!({"initContainerStatuses": [{"name": "pull", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"hf-token\" not found"}}}]}),
        );
        let s = compute_with(&md, &observe(None, vec![&p]), 100);
        assert_eq!(s.phase, Some(Phase::Failed));
        assert!(
            condition(&s, "Ready")
                .message
                .contains("secret \"hf-token\" not found")
        );
    }

    #[test]
    fn transition_times_move_only_with_the_status() {
        let mut md = model();
        let first = compute_with(&md, &Observed::default(), 100);
        assert_eq!(first.phase, Some(Phase::Pending));
        md.status = Some(first.clone());
        let again = compute_with(&md, &Observed::default(), 200);
        assert_eq!(again, first, "nothing changed, nothing to write");
        let rev = revision(&md);
        let dep = deployment(
            &rev,
            json!({"observedGeneration": 1, "replicas": 2, "readyReplicas": 2,
                                          "updatedReplicas": 2, "availableReplicas": 2}),
        );
        let ready = compute_with(
            &md,
            &Observed {
                deployment: Some(&dep),
                ..Observed::default()
            },
            300,
        );
        assert_eq!(condition(&ready, "Ready").last_transition_time, at(300));
        assert_eq!(
            condition(&ready, "ModelReady").last_transition_time,
            at(100),
            "ModelReady stayed False"
        );
    }

    #[test]
    fn zero_replicas_is_scaled_to_zero_and_ready() {
        let md = md(json!({"model": {"uri": "hf://org/m"}, "replicas": 0}));
        let s = compute_with(&md, &Observed::default(), 100);
        assert_eq!(s.phase, Some(Phase::ScaledToZero));
        assert_eq!(condition(&s, "Ready").status, "True");
    }
}
