//! The serving Deployment: pods that pull (unless a Job did), then run `kandle-server serve`
//! on the GPUs asked for, hardened, probed, and drained before they stop.
use super::REVISION_LABEL;
use super::Settings;
use super::cache::ModelSource;
use super::labels::{meta, selector};
use super::pod::{
    MODELS, container_security, credentials_volume, mount, pod_security, pull_container, tmp_volume,
};
use super::quantity;
use crate::crd::{ModelDeployment, Task, default_cache_size};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, HostPathVolumeSource,
    ImageVolumeSource, Lifecycle, LifecycleHandler, LocalObjectReference, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, SleepAction,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// Where kandle-server listens in the pods (API, probes and `/metrics`).
pub const SERVER_PORT: u16 = 8080;
const PORT: i32 = SERVER_PORT as i32;
/// Seconds between SIGTERM's preStop and the server's drain: long enough for the endpoint
/// controllers and kube-proxy to stop sending new connections.
const PRE_STOP_SECONDS: i64 = 5;
/// How long the server lets requests in flight finish once terminated.
const DRAIN_SECONDS: i64 = 30;
const PROBE_PERIOD: i32 = 5;
const API_KEY_DIR: &str = "/var/run/kandle/api-key";

/// The spec's image, else the CUDA build for pods with GPUs (the CPU build refuses
/// `--device cuda`) and the CPU build for the others.
pub fn image(md: &ModelDeployment, settings: &Settings) -> String {
    let named = md.spec.server.as_ref().and_then(|s| s.image.clone());
    let gpu = md.spec.resources.as_ref().is_some_and(|r| r.gpu.is_some());
    named.unwrap_or_else(|| match gpu {
        true => settings.server_image_cuda.clone(),
        false => settings.server_image.clone(),
    })
}

/// The Deployment and the revision (hash of its pod template) it carries.
pub fn deployment(
    md: &ModelDeployment,
    settings: &Settings,
    source: &ModelSource,
    replicas: i32,
) -> (Deployment, String) {
    let image = image(md, settings);
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(meta(md, String::new(), "server").labels.unwrap_or_default()),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec(md, &image, source)),
    };
    let revision = revision(&template);
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.insert(REVISION_LABEL.into(), revision.clone());
    }
    let rollout = md.spec.rollout.clone().unwrap_or_default();
    let deployment = Deployment {
        metadata: meta(md, md.name_any(), "server"),
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector(md)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(rollout.max_surge),
                    max_unavailable: Some(rollout.max_unavailable),
                }),
            }),
            progress_deadline_seconds: Some(rollout.progress_deadline_seconds),
            revision_history_limit: Some(3),
            template,
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };
    (deployment, revision)
}

/// Ten hex digits of the template's hash: changes exactly when the pods would.
fn revision(template: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(template).expect("a pod template is JSON");
    hex::encode(&Sha256::digest(&json)[..5])
}

fn pod_spec(md: &ModelDeployment, image: &str, source: &ModelSource) -> PodSpec {
    let (tmp, _) = tmp_volume();
    let gpus = gpu_count(md);
    let model_volume = match source {
        ModelSource::PerPod => Volume {
            name: "model".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(
                    md.spec
                        .cache
                        .as_ref()
                        .map_or_else(default_cache_size, |c| c.size_limit.clone()),
                ),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Created by the kubelet (as root) where the chart's DaemonSet has not yet made it
        // the pods' own; a pull that cannot write there says so in its report.
        ModelSource::NodeCache { root, .. } => Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: root.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        },
        ModelSource::ImageVolume { reference } => Volume {
            name: "model".into(),
            image: Some(ImageVolumeSource {
                reference: Some(reference.clone()),
                pull_policy: None,
            }),
            ..Volume::default()
        },
        ModelSource::PvcCache { claim, .. } | ModelSource::UserClaim { claim, .. } => Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        },
    };
    let shm = Volume {
        name: "shm".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            // Room for the runtime's shared buffers: 1 GiB per GPU, 256 MiB on CPU.
            size_limit: Some(Quantity(if gpus > 0 {
                format!("{gpus}Gi")
            } else {
                "256Mi".into()
            })),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mut volumes = vec![model_volume, tmp, shm];
    if source.pulled_by_pod() {
        volumes.extend(credentials_volume(md));
    }
    let api_key = md
        .spec
        .server
        .as_ref()
        .and_then(|s| s.api_key_secret.clone());
    if let Some(secret) = &api_key {
        volumes.push(Volume {
            name: "api-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let mut spec = PodSpec {
        init_containers: source
            .pulled_by_pod()
            .then(|| vec![pull_container(md, image, source)]),
        containers: vec![server_container(md, image, source, api_key.is_some())],
        volumes: Some(volumes),
        security_context: Some(pod_security()),
        termination_grace_period_seconds: Some(PRE_STOP_SECONDS + DRAIN_SECONDS + 5),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        // The kubelet pulls an image volume with the pod's pull secrets.
        image_pull_secrets: match (source, &md.spec.model.credentials_secret) {
            (ModelSource::ImageVolume { .. }, Some(secret)) => Some(vec![LocalObjectReference {
                name: secret.clone(),
            }]),
            _ => None,
        },
        ..PodSpec::default()
    };
    schedule(md, &mut spec);
    spec
}

fn gpu_count(md: &ModelDeployment) -> i32 {
    md.spec
        .resources
        .as_ref()
        .and_then(|r| r.gpu.as_ref())
        .map_or(0, |g| g.count)
}

fn server_container(
    md: &ModelDeployment,
    image: &str,
    source: &ModelSource,
    api_key: bool,
) -> Container {
    let server = md.spec.server.clone().unwrap_or_default();
    let served = md
        .spec
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| md.name_any());
    let mut args: Vec<String> = [
        "serve",
        "--model",
        &source.model_path(),
        "--served-model-name",
        &served,
        "--port",
        &PORT.to_string(),
        "--log-format",
        "json",
        "--shutdown-grace-seconds",
        &DRAIN_SECONDS.to_string(),
    ]
    .map(String::from)
    .into();
    if let Some(task) = md.spec.model.task {
        let task = match task {
            Task::Chat => "chat",
            Task::Completion => "completion",
            Task::Embedding => "embedding",
            Task::Rerank => "rerank",
            Task::Classify => "classify",
            Task::Tabular => "tabular",
        };
        args.extend(["--task".into(), task.into()]);
    }
    if gpu_count(md) > 0 {
        args.extend(["--device".into(), "cuda".into()]);
    }
    if let Some(n) = server.max_concurrent_requests {
        args.extend(["--max-concurrent-requests".into(), n.to_string()]);
    }
    if let Some(n) = server.max_input_tokens {
        args.extend(["--max-input-tokens".into(), n.to_string()]);
    }
    let model = match source {
        // Its own model's folder only: the node's other models are not this pod's.
        ModelSource::NodeCache { folder, .. } => VolumeMount {
            sub_path: Some(folder.clone()),
            ..mount("model", &source.model_path(), true)
        },
        _ => mount("model", MODELS, true),
    };
    let mut mounts = vec![model, tmp_volume().1, mount("shm", "/dev/shm", false)];
    if api_key {
        args.extend(["--api-key-file".into(), format!("{API_KEY_DIR}/api-key")]);
        mounts.push(mount("api-key", API_KEY_DIR, true));
    }
    let probe = |path: &str, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(PROBE_PERIOD),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: "server".into(),
        image: Some(image.into()),
        args: Some(args),
        env: (!server.env.is_empty()).then_some(server.env.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(md)),
        // The server binds only once the model is loaded and warmed, so /healthz answering
        // means started; the budget grows with the model's size.
        startup_probe: Some(probe("/healthz", startup_seconds(md) / PROBE_PERIOD)),
        readiness_probe: Some(probe("/readyz", 2)),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            ..probe("/healthz", 3)
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// Requests and limits from the spec, with the GPUs as a limit (which the scheduler
/// also treats as the request).
fn resources(md: &ModelDeployment) -> ResourceRequirements {
    let spec = md.spec.resources.clone().unwrap_or_default();
    let mut limits = spec.limits;
    if let Some(gpu) = &spec.gpu {
        limits.insert(GPU_RESOURCE.into(), Quantity(gpu.count.to_string()));
    }
    ResourceRequirements {
        requests: (!spec.requests.is_empty()).then_some(spec.requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

/// Seconds a model may take to load: the spec's, else 300 plus 10 per GiB of memory
/// (limit, else request), since a model must fit in the memory it is given.
fn startup_seconds(md: &ModelDeployment) -> i32 {
    if let Some(s) = md
        .spec
        .server
        .as_ref()
        .and_then(|s| s.startup_timeout_seconds)
    {
        return s.max(PROBE_PERIOD);
    }
    let memory = md.spec.resources.as_ref().and_then(|r| {
        r.limits
            .get("memory")
            .or_else(|| r.requests.get("memory"))
            .and_then(quantity::bytes)
    });
    let gib = memory.unwrap_or(0) >> 30;
    300 + 10 * i32::try_from(gib).unwrap_or(i32::MAX / 20)
}

/// Applies the spec's scheduling and what GPUs require: the product's node label in every
/// required node selector term, and the toleration of the usual `nvidia.com/gpu` taint.
pub fn schedule(md: &ModelDeployment, pod: &mut PodSpec) {
    let scheduling = md.spec.scheduling.clone().unwrap_or_default();
    let gpu = md.spec.resources.as_ref().and_then(|r| r.gpu.clone());
    let mut affinity = scheduling.affinity;
    let mut tolerations = scheduling.tolerations;
    if let Some(gpu) = &gpu {
        if let Some(product) = &gpu.product {
            let requirement = NodeSelectorRequirement {
                key: GPU_PRODUCT_LABEL.into(),
                operator: "In".into(),
                values: Some(vec![product.clone()]),
            };
            let affinity = affinity.get_or_insert_with(Affinity::default);
            let node = affinity
                .node_affinity
                .get_or_insert_with(NodeAffinity::default);
            let required = node
                .required_during_scheduling_ignored_during_execution
                .get_or_insert_with(NodeSelector::default);
            if required.node_selector_terms.is_empty() {
                required
                    .node_selector_terms
                    .push(NodeSelectorTerm::default());
            }
            // Terms are alternatives, so each must carry the requirement.
            for term in &mut required.node_selector_terms {
                term.match_expressions
                    .get_or_insert_with(Vec::new)
                    .push(requirement.clone());
            }
        }
        let toleration = Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        if !tolerations.contains(&toleration) {
            tolerations.push(toleration);
        }
    }
    pod.node_selector = (!scheduling.node_selector.is_empty()).then_some(scheduling.node_selector);
    pod.affinity = affinity;
    pod.tolerations = (!tolerations.is_empty()).then_some(tolerations);
    pod.priority_class_name = scheduling.priority_class_name;
    pod.runtime_class_name = scheduling.runtime_class_name;
}
