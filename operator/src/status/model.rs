//! Where the model stands, read from the pull step's report
//! ([`kandle_contract::pull::Report`], the pull container's termination message).
use super::Observed;
use crate::build::{ModelSource, Settings};
use crate::crd::{ModelDeployment, ModelStatus};
use crate::diagnosis;
use k8s_openapi::api::core::v1::ContainerStatus;
use kandle_contract::pull::Report;
use kube::ResourceExt;

/// Where the model stands.
pub enum Model {
    Ready(Option<ModelStatus>),
    Pulling(String),
    /// Failed; `permanent` when no retry can help (401, 404, bad hash).
    Failed {
        message: String,
        permanent: bool,
    },
}

/// Where the model of `md` stands, from its pull Job's pods (pvc cache) or its serving
/// pods' pull containers (per-pod pulls).
pub fn model_state(md: &ModelDeployment, settings: &Settings, observed: &Observed) -> Model {
    let source = ModelSource::of(md, settings);
    match source {
        ModelSource::UserClaim { .. } => Model::Ready(None),
        // The kubelet pulls it; a pull it cannot make shows on the pods (their cause).
        ModelSource::ImageVolume { reference } => Model::Ready(Some(ModelStatus {
            source: Some(format!("oci://{reference} (image volume)")),
            ..ModelStatus::default()
        })),
        ModelSource::PvcCache { .. } => {
            let report = observed
                .job_pods
                .iter()
                .filter_map(|p| pull_report(p.status.as_ref()?.container_statuses.as_ref()?))
                .max_by_key(|(_, finished)| finished.clone());
            if diagnosis::job_complete(observed.job) {
                return Model::Ready(report.map(|(r, _)| model_status(&r)));
            }
            let failed = diagnosis::job_condition(observed.job, "Failed");
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
        ModelSource::PerPod | ModelSource::NodeCache { .. } => {
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
                Some((r, _)) => {
                    let mut status = model_status(&r);
                    if let ModelSource::NodeCache { .. } = source {
                        status.source = status.source.map(|s| format!("{s} (node cache)"));
                    }
                    Model::Ready(Some(status))
                }
                None if observed.pods.iter().any(|p| diagnosis::pulling(p)) => {
                    Model::Pulling(format!("pods are pulling {}", md.spec.model.uri))
                }
                None => Model::Pulling(format!("waiting for a pod to pull {}", md.spec.model.uri)),
            }
        }
    }
}

pub fn model_status(r: &Report) -> ModelStatus {
    ModelStatus {
        source: r.source.clone(),
        resolved_revision: r.revision.clone(),
        pull_seconds: r.seconds.map(|s| s.round() as i64),
        pulled_bytes: r.pulled_bytes.map(saturate),
        size_bytes: r.size_bytes.map(saturate),
        files: r.files.map(saturate),
        unverified_files: r.unverified_files.map(saturate),
    }
}

/// The newest report of a `pull` container (current or last run), with when it finished.
fn pull_report(statuses: &[ContainerStatus]) -> Option<(Report, String)> {
    let pull = statuses.iter().find(|c| c.name == "pull")?;
    [pull.state.as_ref(), pull.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .filter_map(|t| {
            let report = serde_json::from_str::<Report>(t.message.as_deref()?.trim())
                .ok()
                .or_else(|| {
                    // No report: the pull died before writing one (OOM, a signal).
                    (t.exit_code != 0).then(|| {
                        Report::from_exit(t.exit_code, t.reason.as_deref().unwrap_or_default())
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

/// Counts from a hostile pod's report are at most what the status field holds.
fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
