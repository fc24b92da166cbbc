//! Diagnosis of what the cluster shows: whether pods and Jobs are ready or done, and
//! what keeps pods from serving (unschedulable, image pulls, crash loops, bad config),
//! as causes that status conditions and rollout decisions quote.
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kandle_contract::keys::REVISION_LABEL;
use kube::ResourceExt;

/// A cause worth a condition: reason (CamelCase) and a message naming it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: &'static str,
    pub message: String,
}

/// Whether a pod's `Ready` condition is true (it passes its readiness probe).
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the pull Job of a pvc cache has finished, so the Deployment may use the model.
pub fn job_complete(job: Option<&Job>) -> bool {
    job_condition(job, "Complete")
}

/// Whether a Job has a condition of `type_` that is true (`Complete`, `Failed`).
pub fn job_condition(job: Option<&Job>, type_: &str) -> bool {
    job.and_then(|j| j.status.as_ref()?.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Whether a pod's `pull` init container is running.
pub fn pulling(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.name == "pull" && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// What keeps the pods of `revision` (or else older ones) from being ready, as
/// "Reason: message".
pub fn pod_problem(pods: &[&Pod], revision: &str) -> Option<String> {
    pods_cause(pods, revision).map(|c| format!("{}: {}", c.reason, c.message))
}

/// The most telling problem among the serving pods, preferring the current revision's.
pub fn pods_cause(pods: &[&Pod], revision: &str) -> Option<Cause> {
    let current = |p: &&&Pod| p.labels().get(REVISION_LABEL).map(String::as_str) == Some(revision);
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
