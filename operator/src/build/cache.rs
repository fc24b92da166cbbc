//! Where a model comes from and lives: pulled by each pod, pulled once per node into the
//! node's shared cache, pulled once by a Job into a PersistentVolumeClaim, already on the
//! user's own claim, or an OCI artifact the node's runtime mounts as an image volume.
use super::Settings;
use super::labels::meta;
use super::pod::{MODELS, credentials_volume, pod_security, pull_container, tmp_volume};
use crate::crd::{CacheVolume, ModelDeployment, OciMode};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Volume, VolumeResourceRequirements,
};
use kandle_contract::pull;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Each pod pulls into an emptyDir with an init container.
    PerPod,
    /// Each pod's init container pulls into the node's cache (a hostPath `root`), under a
    /// folder named for the model; the pull's lock makes the node's later pods wait for the
    /// first and find the model there.
    NodeCache { root: String, folder: String },
    /// A Job pulls into the operator's claim, under a folder named for the model.
    PvcCache { claim: String, folder: String },
    /// `pvc://CLAIM/PATH`: served read-only from the user's claim, nothing pulled.
    UserClaim { claim: String, path: String },
    /// `oci://REFERENCE` as an image volume: the node's runtime pulls and caches it.
    ImageVolume { reference: String },
}

impl ModelSource {
    pub fn of(md: &ModelDeployment, settings: &Settings) -> Self {
        let uri = &md.spec.model.uri;
        if let Some(reference) = uri.strip_prefix("oci://") {
            let model = &md.spec.model;
            let mode = model.oci.as_ref().and_then(|o| o.mode);
            // A cache or a choice of files is a request to pull: a volume mounts it all.
            let pull_asked =
                md.spec.cache.is_some() || !model.include.is_empty() || !model.exclude.is_empty();
            let volume = mode == Some(OciMode::Volume)
                || (mode.is_none() && settings.image_volumes && !pull_asked);
            if volume {
                return Self::ImageVolume {
                    reference: reference.into(),
                };
            }
        }
        if let Some(rest) = uri.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            return Self::UserClaim {
                claim: claim.into(),
                path: path.trim_matches('/').into(),
            };
        }
        match md.spec.cache.as_ref().map(|c| c.volume) {
            Some(CacheVolume::Pvc) => Self::PvcCache {
                claim: claim_name(md),
                folder: model_hash(md),
            },
            Some(CacheVolume::Node) => Self::NodeCache {
                root: settings.node_cache_root.clone(),
                folder: node_folder(md).expect("cache.volume is node"),
            },
            _ => Self::PerPod,
        }
    }

    /// Whether each pod pulls the model itself, in an init container.
    pub fn pulled_by_pod(&self) -> bool {
        matches!(self, Self::PerPod | Self::NodeCache { .. })
    }

    /// The folder `serve --model` loads, inside the model volume.
    pub fn model_path(&self) -> String {
        match self {
            Self::PerPod => format!("{MODELS}/model"),
            Self::ImageVolume { .. } => MODELS.into(),
            Self::PvcCache { folder, .. } | Self::NodeCache { folder, .. } => {
                format!("{MODELS}/{folder}")
            }
            Self::UserClaim { path, .. } if path.is_empty() => MODELS.into(),
            Self::UserClaim { path, .. } => format!("{MODELS}/{path}"),
        }
    }

    /// The URI given to `pull`: the spec's, with its revision appended for the hub.
    pub fn pull_uri(&self, md: &ModelDeployment) -> String {
        let model = &md.spec.model;
        match &model.revision {
            Some(rev) => format!("{}@{rev}", model.uri),
            None => model.uri.clone(),
        }
    }
}

/// The operator's cache claim of a ModelDeployment.
pub fn claim_name(md: &ModelDeployment) -> String {
    format!("{}-cache", md.name_any())
}

/// Eight hex digits naming what is pulled (source, revision and file choice): a new
/// model gets a new folder, and the pods serving the old one keep it meanwhile.
fn model_hash(md: &ModelDeployment) -> String {
    let m = &md.spec.model;
    let key = serde_json::json!([m.uri, m.revision, m.include, m.exclude, m.sha256]);
    hex::encode(&Sha256::digest(key.to_string().as_bytes())[..4])
}

/// The folder of the node cache holding `md`'s model, when it uses the node cache: 32 hex
/// digits of what is pulled, so that a tenant cannot aim another model at a folder someone
/// else serves. A model pulled with credentials is keyed by the namespace and Secret too:
/// only those who could pull it themselves find it there.
pub fn node_folder(md: &ModelDeployment) -> Option<String> {
    if md.spec.cache.as_ref()?.volume != CacheVolume::Node {
        return None;
    }
    let m = &md.spec.model;
    let owner = m
        .credentials_secret
        .as_ref()
        .map(|secret| [md.namespace().unwrap_or_default(), secret.clone()]);
    let key = serde_json::json!([m.uri, m.revision, m.include, m.exclude, m.sha256, owner]);
    Some(hex::encode(
        &Sha256::digest(key.to_string().as_bytes())[..16],
    ))
}

/// The claim of a `pvc` cache.
pub fn claim(md: &ModelDeployment) -> PersistentVolumeClaim {
    let pvc = md
        .spec
        .cache
        .as_ref()
        .and_then(|c| c.pvc.clone())
        .unwrap_or_else(|| {
            serde_json::from_value(serde_json::json!({})).expect("PvcSpec has defaults for all")
        });
    PersistentVolumeClaim {
        metadata: meta(md, claim_name(md), "cache"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(pvc.access_modes),
            storage_class_name: pvc.storage_class_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), pvc.size)])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// The Job that pulls the model into the claim once. A permanent pull failure fails the
/// Job at once; transient ones are retried by the Job's backoff, a missing Secret for as
/// long as it is missing.
pub fn pull_job(md: &ModelDeployment, settings: &Settings, source: &ModelSource) -> Job {
    let ModelSource::PvcCache { claim, .. } = source else {
        unreachable!("a pull Job exists only for a pvc cache")
    };
    let image = super::deployment::image(md, settings);
    let mut meta = meta(md, String::new(), "pull");
    let mut pod = PodSpec {
        restart_policy: Some("Never".into()),
        containers: vec![pull_container(md, &image, source)],
        volumes: Some(
            [
                Some(Volume {
                    name: "model".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: None,
                    }),
                    ..Volume::default()
                }),
                Some(tmp_volume().0),
                credentials_volume(md),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        security_context: Some(pod_security()),
        automount_service_account_token: Some(false),
        ..PodSpec::default()
    };
    // Scheduled like the serving pods: a ReadWriteOnce claim binds to the Job's node.
    super::deployment::schedule(md, &mut pod);
    // A Job's template cannot change, so another template (a new model, image or
    // scheduling) is another Job; a pull the cache already holds takes a second.
    let template = serde_json::to_vec(&pod).expect("a pod spec is JSON");
    meta.name = Some(format!(
        "{}-pull-{}",
        md.name_any(),
        hex::encode(&Sha256::digest(&template)[..4])
    ));
    Job {
        spec: Some(JobSpec {
            backoff_limit: Some(6),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: [
                    ("FailJob", pull::EXIT_PERMANENT),
                    // Not counted against the backoff: the Job waits for the Secret.
                    ("Ignore", pull::EXIT_MISSING_SECRET),
                ]
                .into_iter()
                .map(|(action, code)| PodFailurePolicyRule {
                    action: action.into(),
                    on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                        container_name: Some("pull".into()),
                        operator: "In".into(),
                        values: vec![i32::from(code)],
                    }),
                    ..PodFailurePolicyRule::default()
                })
                .collect(),
            }),
            template: PodTemplateSpec {
                metadata: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    labels: meta.labels.clone(),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        metadata: meta,
        ..Job::default()
    }
}
