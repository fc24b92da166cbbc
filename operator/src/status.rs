//! Status as a pure function of the spec, what was built, and what the cluster shows:
//! a phase, four conditions whose messages name the cause, and the numbers behind them.
//! Deterministic: the same inputs give the same status, and a condition's
//! `lastTransitionTime` moves only when its status does, so an unchanged world writes nothing.
use crate::autoscale::policy::Decision;
use crate::build::{Desired, ModelSource, Settings, endpoint, selector_string};
use crate::canary::Canary;
use crate::crd::{ModelDeployment, ModelDeploymentStatus, ModelStatus, Phase, RolledBack};
use crate::rollout::Fallback;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use serde::Deserialize;

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

/// The pull step's report (`kandle-server pull --report-file`), read from its
/// container's termination message.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PullReport {
    revision: Option<String>,
    size_bytes: Option<i64>,
    files: Option<i64>,
    unverified_files: Option<i64>,
    error: Option<String>,
    transient: Option<bool>,
}

/// A cause worth a condition: reason (CamelCase) and a message naming it.
#[derive(Debug, Clone, PartialEq)]
struct Cause {
    reason: &'static str,
    message: String,
}

/// Where the model stands.
enum Model {
    Ready(Option<ModelStatus>),
    Pulling(String),
    /// Failed; `permanent` when no retry can help (401, 404, bad hash).
    Failed {
        message: String,
        permanent: bool,
    },
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
    let model = model_state(md, observed);
    let pod_cause = pods_cause(&observed.pods, &desired.revision);
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

    let (phase, cause) = if let Some(message) = &observed.rejected {
        (
            Phase::Failed,
            Cause {
                reason: "Rejected",
                message: message.clone(),
            },
        )
    } else if let Some(Canary::Running { status: c, .. }) = &observed.canary {
        (
            Phase::Deploying,
            Cause {
                reason: "Canary",
                message: format!(
                    "canary of revision {} beside revision {}: {}",
                    c.revision, desired.revision, c.message
                ),
            },
        )
    } else if let Some(Canary::Aborted(c)) = &observed.canary {
        (
            Phase::Degraded,
            Cause {
                reason: "CanaryAborted",
                message: format!(
                    "the canary of revision {} was aborted ({}); revision {} serves; change the spec to try again",
                    c.revision, c.message, desired.revision
                ),
            },
        )
    } else if let Some(rb) = &observed.rolled_back {
        (
            Phase::Degraded,
            Cause {
                reason: "RolledBack",
                message: format!(
                    "revision {} made no progress for {} s ({}); rolled back to revision {}, the last \
                     spec that was Ready ({ready} ready); change the spec to try again",
                    rb.revision,
                    md.spec
                        .rollout
                        .clone()
                        .unwrap_or_default()
                        .progress_deadline_seconds,
                    rb.message,
                    desired.revision
                ),
            },
        )
    } else if let Model::Failed {
        message,
        permanent: true,
    } = &model
    {
        (
            Phase::Failed,
            Cause {
                reason: "PullFailed",
                message: message.clone(),
            },
        )
    } else if let Some(c) = pod_cause.as_ref().filter(|c| c.reason == "ConfigError") {
        (Phase::Failed, c.clone())
    } else if desired.replicas == 0 && replicas == 0 {
        (
            Phase::ScaledToZero,
            Cause {
                reason: "ScaledToZero",
                message: "no replicas wanted".into(),
            },
        )
    } else if rolled_out {
        (
            Phase::Ready,
            Cause {
                reason: "Ready",
                message: format!(
                    "{ready}/{} replicas ready on revision {}",
                    desired.replicas, desired.revision
                ),
            },
        )
    } else if let Some(f) = observed.fallback.as_ref().filter(|_| deadline.is_none()) {
        (
            Phase::Deploying,
            Cause {
                reason: "ReplacingOneAtATime",
                message: format!(
                    "no free GPU for a surge pod ({}): replacing one pod at a time, so one of {} \
                     replicas is down until revision {} is rolled out; {updated} updated, {ready} ready",
                    f.message, desired.replicas, desired.revision
                ),
            },
        )
    } else if let Some(c) = deadline.clone().or(pod_cause.clone()) {
        let phase = if c.reason == "Unschedulable" && ready == 0 {
            Phase::Pending
        } else {
            Phase::Degraded
        };
        (phase, c)
    } else if let Model::Pulling(message) | Model::Failed { message, .. } = &model
        && (desired.hold_deployment || !observed.pods.is_empty())
    {
        (
            Phase::Pulling,
            Cause {
                reason: "Pulling",
                message: message.clone(),
            },
        )
    } else if observed.deployment.is_none() || replicas == 0 {
        (
            Phase::Pending,
            Cause {
                reason: "Pending",
                message: "waiting for the serving pods to be created".into(),
            },
        )
    } else {
        (
            Phase::Deploying,
            Cause {
                reason: "Deploying",
                message: format!(
                    "{updated}/{} replicas on revision {}, {ready} ready",
                    desired.replicas, desired.revision
                ),
            },
        )
    };

    let (model_status, model_condition) = match model {
        Model::Ready(status) => (
            status.or(previous.model.clone()),
            (
                "True",
                Cause {
                    reason: "Pulled",
                    message: "the model is in place".into(),
                },
            ),
        ),
        Model::Pulling(message) => (
            previous.model.clone(),
            (
                "False",
                Cause {
                    reason: "Pulling",
                    message,
                },
            ),
        ),
        Model::Failed { message, .. } => (
            previous.model.clone(),
            (
                "False",
                Cause {
                    reason: "PullFailed",
                    message,
                },
            ),
        ),
    };
    let is_ready = matches!(phase, Phase::Ready | Phase::ScaledToZero);
    let degraded = matches!(phase, Phase::Degraded | Phase::Failed);
    let progressing =
        if matches!(observed.canary, Some(Canary::Aborted(_))) || observed.rolled_back.is_some() {
            !rolled_out
        } else {
            matches!(phase, Phase::Pending | Phase::Pulling | Phase::Deploying)
                || (phase == Phase::Degraded && deadline.is_none())
        };
    let ok = |reason: &'static str, message: &str| Cause {
        reason,
        message: message.into(),
    };
    let wanted = [
        (
            "Ready",
            if is_ready { "True" } else { "False" },
            cause.clone(),
        ),
        ("ModelReady", model_condition.0, model_condition.1),
        (
            "Progressing",
            if progressing { "True" } else { "False" },
            if progressing || degraded {
                cause.clone()
            } else {
                ok("RolloutComplete", "the current spec is rolled out")
            },
        ),
        (
            "Degraded",
            if degraded { "True" } else { "False" },
            if degraded {
                cause.clone()
            } else {
                ok("AsExpected", "no problem seen")
            },
        ),
    ];
    let scaled = md.spec.autoscaling.as_ref().map(|a| {
        (
            "Autoscaled",
            autoscaled(a.target_in_flight, observed.scaling),
        )
    });
    let conditions = wanted
        .into_iter()
        .chain(scaled.map(|(type_, (status, cause))| (type_, status, cause)))
        .map(|(type_, status, cause)| {
            let kept = previous
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone());
            Condition {
                type_: type_.into(),
                status: status.into(),
                reason: cause.reason.into(),
                message: truncate(&cause.message, 1024),
                observed_generation: generation,
                last_transition_time: kept.unwrap_or_else(|| now.clone()),
            }
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

/// Whether a pod's `Ready` condition is true (it passes its readiness probe).
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `Autoscaled` condition: the numbers behind the autoscaler's last decision.
fn autoscaled(target: i32, decision: Option<Decision>) -> (&'static str, Cause) {
    let Some(d) = decision else {
        return (
            "Unknown",
            Cause {
                reason: "NoMetrics",
                message: "no ready pod has reported its load yet".into(),
            },
        );
    };
    let reason = match (d.replicas, d.panicking) {
        (0, _) => "ScaledToZero",
        (_, true) => "Burst",
        _ => "LoadAverage",
    };
    let message = format!(
        "{} replicas for {:.1} requests in flight or queued (stable window average; {:.1} in the panic window), \
         target {target} per replica; {} of {} ready pods reported their load",
        d.replicas, d.stable_load, d.panic_load, d.answered, d.ready
    );
    ("True", Cause { reason, message })
}

/// Whether the pull Job of a pvc cache has finished, so the Deployment may use the model.
pub fn job_complete(job: Option<&Job>) -> bool {
    job_condition(job, "Complete")
}

fn job_condition(job: Option<&Job>, type_: &str) -> bool {
    job.and_then(|j| j.status.as_ref()?.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn model_state(md: &ModelDeployment, observed: &Observed) -> Model {
    match ModelSource::of(md) {
        ModelSource::UserClaim { .. } => Model::Ready(None),
        ModelSource::PvcCache { .. } => {
            let report = observed
                .job_pods
                .iter()
                .filter_map(|p| pull_report(p.status.as_ref()?.container_statuses.as_ref()?))
                .max_by_key(|(_, finished)| finished.clone());
            if job_complete(observed.job) {
                return Model::Ready(report.map(|(r, _)| model_status(&r)));
            }
            let failed = job_condition(observed.job, "Failed");
            match report {
                Some((r, _)) if r.error.is_some() => Model::Failed {
                    message: r.error.unwrap_or_default(),
                    permanent: failed || r.transient == Some(false),
                },
                _ if failed => Model::Failed {
                    message: format!(
                        "pull Job {} failed",
                        observed.job.map(|j| j.name_any()).unwrap_or_default()
                    ),
                    permanent: true,
                },
                _ => Model::Pulling(format!(
                    "pulling {} into the cache volume",
                    md.spec.model.uri
                )),
            }
        }
        ModelSource::PerPod => {
            let mut reports: Vec<_> = observed
                .pods
                .iter()
                .filter_map(|p| pull_report(p.status.as_ref()?.init_container_statuses.as_ref()?))
                .collect();
            reports.sort_by(|a, b| a.1.cmp(&b.1));
            match reports.pop() {
                Some((r, _)) if r.error.is_some() => Model::Failed {
                    permanent: r.transient == Some(false),
                    message: r.error.unwrap_or_default(),
                },
                Some((r, _)) => Model::Ready(Some(model_status(&r))),
                None if observed.pods.iter().any(|p| pulling(p)) => {
                    Model::Pulling(format!("pods are pulling {}", md.spec.model.uri))
                }
                None => Model::Pulling(format!("waiting for a pod to pull {}", md.spec.model.uri)),
            }
        }
    }
}

fn model_status(r: &PullReport) -> ModelStatus {
    ModelStatus {
        resolved_revision: r.revision.clone(),
        size_bytes: r.size_bytes,
        files: r.files,
        unverified_files: r.unverified_files,
    }
}

fn pulling(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.name == "pull" && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// The newest report of a `pull` container (current or last run), with when it finished.
fn pull_report(statuses: &[ContainerStatus]) -> Option<(PullReport, String)> {
    let pull = statuses.iter().find(|c| c.name == "pull")?;
    [pull.state.as_ref(), pull.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .filter_map(|t| {
            let report = serde_json::from_str::<PullReport>(t.message.as_deref()?.trim())
                .ok()
                .or_else(|| {
                    // No report: the pull died before writing one (OOM, a signal).
                    (t.exit_code != 0).then(|| PullReport {
                        error: Some(format!(
                            "the pull exited with code {} ({})",
                            t.exit_code,
                            t.reason.clone().unwrap_or_default()
                        )),
                        transient: Some(t.exit_code != 3),
                        ..PullReport::default()
                    })
                })?;
            let finished = t
                .finished_at
                .as_ref()
                .map(|f| f.0.to_string())
                .unwrap_or_default();
            Some((report, finished))
        })
        .max_by(|a, b| a.1.cmp(&b.1))
}

/// The most telling problem among the serving pods, preferring the current revision's.
/// What keeps the pods of `revision` (or else older ones) from being ready, as
/// "Reason: message".
pub fn pod_problem(pods: &[&Pod], revision: &str) -> Option<String> {
    pods_cause(pods, revision).map(|c| format!("{}: {}", c.reason, c.message))
}

fn pods_cause(pods: &[&Pod], revision: &str) -> Option<Cause> {
    let current = |p: &&&Pod| {
        p.labels()
            .get(crate::build::REVISION_LABEL)
            .map(String::as_str)
            == Some(revision)
    };
    let (new, old): (Vec<&&Pod>, Vec<&&Pod>) = pods.iter().partition(current);
    new.into_iter().chain(old).find_map(|p| pod_cause(p))
}

fn pod_cause(pod: &Pod) -> Option<Cause> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    }) {
        return Some(Cause {
            reason: "Unschedulable",
            message: format!(
                "pod {name} cannot be scheduled: {}",
                c.message.clone().unwrap_or_default()
            ),
        });
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let detail = waiting.message.clone().unwrap_or_default();
        let cause = |reason: &'static str, what: String| {
            Some(Cause {
                reason,
                message: format!("pod {name}, container {}: {what}", c.name),
            })
        };
        match reason {
            "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => {
                return cause(
                    "ImagePullBackOff",
                    format!("cannot pull image {}: {detail}", c.image),
                );
            }
            "CreateContainerConfigError" => return cause("ConfigError", detail),
            "CrashLoopBackOff" if c.name == "server" => {
                let last = c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| {
                        format!(
                            "exited with code {}: {}",
                            t.exit_code,
                            t.message.clone().unwrap_or_default().trim()
                        )
                    })
                    .unwrap_or(detail);
                return cause(
                    "CrashLoopBackOff",
                    format!("the server keeps failing: {last}"),
                );
            }
            _ => {}
        }
    }
    None
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{md, settings};
    use crate::build::{REVISION_LABEL, desired};
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
        let s = compute_with(
            &md,
            &Observed {
                deployment: Some(&dep),
                pods: vec![&p],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                pods: vec![&p],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                deployment: Some(&dep),
                pods: vec![&p],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                deployment: Some(&dep),
                pods: vec![&pulling],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                deployment: Some(&dep),
                pods: vec![&crashing],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                deployment: Some(&late),
                pods: vec![&crashing],
                ..Observed::default()
            },
            100,
        );
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
        let s = compute_with(
            &md,
            &Observed {
                pods: vec![&p],
                ..Observed::default()
            },
            100,
        );
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
