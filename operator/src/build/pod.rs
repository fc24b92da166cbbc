//! Pieces shared by the serving pods and the pull Job's pods: the hardened security
//! settings, the pull container with its credentials volume, and the writable scratch
//! volume.
use super::cache::ModelSource;
use crate::crd::ModelDeployment;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PodSecurityContext,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// What a pull needs: a few buffers per connection and sha256 on about one core
/// (`kandle-server pull` peaks near 50 MiB). Requests let it run under a ResourceQuota;
/// limits bound a multi-GB download and leave room for page cache that the kernel
/// reclaims under the limit.
const PULL_REQUESTS: [(&str, &str); 2] = [("cpu", "250m"), ("memory", "128Mi")];
const PULL_LIMITS: [(&str, &str); 2] = [("cpu", "2"), ("memory", "1Gi")];
/// `/tmp` holds no model data, only what libraries write there.
const TMP_SIZE: &str = "1Gi";

/// The uid and gid of the images' non-root user.
const USER: i64 = 65532;
/// Where the model volume is mounted in every container.
pub const MODELS: &str = "/models";
/// Where the pull container finds `spec.model.credentialsSecret`, one file per key.
const CREDENTIALS: &str = "/var/run/secrets/kandle/credentials";

/// Pod-level security: non-root, the runtime's default seccomp profile, and a group that
/// can write the model volume.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        fs_group: Some(USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container-level security: read-only root, no privilege escalation, no capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// `/tmp`, the only writable place besides the model volume.
pub fn tmp_volume() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(TMP_SIZE.into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        mount("tmp", "/tmp", false),
    )
}

pub fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// `spec.model.credentialsSecret` as files, for the pull container only: files, not
/// environment variables, which `/proc` and crash dumps show. `optional`, so that a Secret
/// not created yet lets the pull start and say so in its report (the status shows it)
/// instead of leaving the pod stuck in ContainerCreating; the kubelet fills the volume
/// once the Secret exists.
pub fn credentials_volume(md: &ModelDeployment) -> Option<Volume> {
    let name = md.spec.model.credentials_secret.as_ref()?;
    Some(Volume {
        name: "credentials".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(name.clone()),
            optional: Some(true),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    })
}

/// `kandle-server pull` into `dest`, with the credentials secret as files (the only
/// container that sees it) and its JSON report as the termination message, which the
/// operator reads into status.
pub fn pull_container(md: &ModelDeployment, image: &str, source: &ModelSource) -> Container {
    let model = &md.spec.model;
    let mut args = vec![
        "pull".to_string(),
        "--model".into(),
        source.pull_uri(md),
        "--dest".into(),
        source.model_path(),
        "--report-file".into(),
        "/dev/termination-log".into(),
        "--log-format".into(),
        "json".into(),
    ];
    for (flag, globs) in [("--include", &model.include), ("--exclude", &model.exclude)] {
        if !globs.is_empty() {
            args.extend([flag.to_string(), globs.join(",")]);
        }
    }
    if let Some(sha) = &model.sha256 {
        args.extend(["--sha256".to_string(), sha.clone()]);
    }
    if model.oci.as_ref().is_some_and(|o| o.plain_http) {
        args.push("--plain-http".into());
    }
    let mut mounts = vec![mount("model", MODELS, false), tmp_volume().1];
    if let Some(secret) = &model.credentials_secret {
        args.extend([
            "--credentials-dir".to_string(),
            CREDENTIALS.into(),
            "--credentials-secret".into(),
            secret.clone(),
        ]);
        mounts.push(mount("credentials", CREDENTIALS, true));
    }
    Container {
        name: "pull".into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "HOME".into(),
            value: Some("/tmp".into()),
            ..EnvVar::default()
        }]),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&PULL_REQUESTS)),
            limits: Some(quantities(&PULL_LIMITS)),
            ..ResourceRequirements::default()
        }),
        security_context: Some(container_security()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}
