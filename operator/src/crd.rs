//! The `ModelDeployment` API. Doc comments here become the CRD's descriptions, which
//! `kubectl explain` shows, so they are written for the platform team reading them there.
use k8s_openapi::api::core::v1::{Affinity, EnvVar, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The CRD as installed: kube-derive's, with `metadata.name` bounded in the schema. The
/// API server estimates each CEL rule's cost from the bounds of what it reads, and the root
/// rule reads the name: unbounded, it would count as a string of megabytes and the API
/// server would refuse the CRD.
pub fn definition() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = ModelDeployment::crd();
    let root = crd.spec.versions[0]
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .expect("the derived CRD has a schema");
    let name = JSONSchemaProps {
        type_: Some("string".into()),
        description: Some(
            "The ModelDeployment's name: a DNS label of at most 49 characters.".into(),
        ),
        max_length: Some(MAX_NAME_LEN as i64),
        ..JSONSchemaProps::default()
    };
    root.properties.get_or_insert_default().insert(
        "metadata".into(),
        JSONSchemaProps {
            type_: Some("object".into()),
            description: Some("Standard object metadata.".into()),
            properties: Some(BTreeMap::from([("name".into(), name)])),
            ..JSONSchemaProps::default()
        },
    );
    crd
}

/// The longest `metadata.name`: the pull Job's name (`NAME-pull-HASH8`) and the pods'
/// labels must stay within Kubernetes' 63-character limits.
pub const MAX_NAME_LEN: usize = 49;

/// A model served over the OpenAI API by kandle-server pods: the operator pulls the model,
/// runs the pods, keeps a Service in front of them and reports what is happening in status.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kandle.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "mdep",
    category = "kandle",
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A model served over the OpenAI API by kandle-server pods.",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 49").message("metadata.name must be a DNS label: lower-case letters, digits and '-', starting with a letter, at most 49 characters (the pull Job and pod labels derive from it)"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.uri"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("set either replicas or autoscaling, not both: with autoscaling the operator sets the replica count"),
    validation = Rule::new("!(self.model.uri.startsWith('pvc://') && has(self.cache))").message("a pvc:// model is served from its own claim: remove cache"),
    validation = Rule::new("!(has(self.model.task) && self.model.task == 'tabular' && has(self.resources) && has(self.resources.gpu))").message("tabular models run on CPU: remove resources.gpu"),
    validation = Rule::new("!(has(self.model.oci) && has(self.model.oci.mode) && self.model.oci.mode == 'volume' && has(self.cache))").message("an image volume is cached by the node's runtime: remove cache, or set model.oci.mode: pull"),
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model to serve and where to fetch it from.
    pub model: ModelSpec,
    /// Number of serving pods when `autoscaling` is not set (default 1). The scale
    /// subresource sets it, so `kubectl scale`, an HPA or KEDA can drive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Scale the pods with the load the servers report. Mutually exclusive with `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Compute for each serving pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// Where the pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
    /// The inference server in each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSpec>,
    /// Where the pulled model is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// How pods are replaced when the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// The Service in front of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// Who may reach the pods. When set, a NetworkPolicy admits the serving port only
    /// from pods of the model's own namespace, of `fromNamespaces`, and of the operator's
    /// namespace (which reads the pods' metrics); nothing else gets in. Absent: no policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
}

/// A NetworkPolicy in front of the serving pods (enforced where the cluster's network
/// plugin enforces NetworkPolicies).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Further namespaces, by name, whose pods may call the model (an ingress
    /// controller's, a gateway's, the applications').
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub from_namespaces: Vec<String>,
}

/// What is served, from where.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.uri.matches('^(hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[A-Za-z0-9][-_.A-Za-z0-9]*(@[^@]+)?|s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/.*)?|https?://[^/]+/.+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*|oci://[A-Za-z0-9][-.A-Za-z0-9]*(:[0-9]+)?/[a-z0-9]+([._/-]+[a-z0-9]+)*(:[A-Za-z0-9_][-._A-Za-z0-9]{0,127}|@sha256:[a-f0-9]{64})?)$')").message("uri must be hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX, oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST], https://HOST/PATH or pvc://CLAIM/PATH"),
    validation = Rule::new("!has(self.oci) || self.uri.startsWith('oci://')").message("oci applies to oci:// models"),
    validation = Rule::new("!(has(self.oci) && has(self.oci.mode) && self.oci.mode == 'volume' && (has(self.include) || has(self.exclude)))").message("an image volume mounts the whole artifact: remove include and exclude, or set oci.mode: pull"),
    validation = Rule::new("!has(self.revision) || (self.uri.startsWith('hf://') && !self.uri.contains('@'))").message("revision applies to hf:// URIs without an @REVISION of their own"),
    validation = Rule::new("!has(self.sha256) || self.uri.startsWith('https://') || self.uri.startsWith('http://')").message("sha256 applies to a single-file https:// model"),
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the model is: `hf://ORG/NAME[@REVISION]` (the Hugging Face hub),
    /// `s3://BUCKET/PREFIX` (AWS or any S3-compatible store),
    /// `oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]` (an OCI artifact, as
    /// `kandle-server push` makes), `https://HOST/PATH` (one file, such as a GGUF) or
    /// `pvc://CLAIM/PATH` (already on a PersistentVolumeClaim in this namespace; nothing is
    /// pulled).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Branch, tag or commit of an `hf://` model (default `main`). It is resolved to a commit
    /// when pulled; `status.model.resolvedRevision` records which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,
    /// The name clients send as the OpenAI `model` (default: `metadata.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub served_name: Option<String>,
    /// What the model serves (default: read from the model's config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// Secret mounted as files (one per key) into the pull step only: `HF_TOKEN` for gated
    /// hub models, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for S3, `OCI_USERNAME` and `OCI_PASSWORD` or `.dockerconfigjson`
    /// (a `kubernetes.io/dockerconfigjson` Secret) for a registry; an image volume gets it
    /// as the pod's image pull secret. The serving container never sees it. Until it
    /// exists the phase is `Failed`, naming it, and the pull is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// Expected sha256 (hex) of a single-file `https://` model; the pull fails on a mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"), length(max = 64))]
    pub sha256: Option<String>,
    /// Only pull files matching these globs (replaces kandle's own choice), for example
    /// `["*Q4_K_M.gguf"]` to pick one quantisation from a GGUF repository.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub include: Vec<String>,
    /// Leave out files matching these globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub exclude: Vec<String>,
    /// How an `oci://` model reaches the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSpec>,
}

/// How an `oci://` model reaches the pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OciSpec {
    /// `volume`: a Kubernetes image volume, mounted read-only with no pull step: the
    /// node's container runtime pulls the artifact once and keeps it for every pod on the
    /// node (Kubernetes 1.35+, or 1.33+ with the `ImageVolume` feature gate, and a runtime
    /// that mounts OCI artifacts, such as CRI-O 1.31+). `pull`: pulled like any other model,
    /// by each pod or by the `pvc` cache's Job. Default: `volume` where the API server
    /// enables image volumes by default (1.35+) and neither `cache` nor `include`/`exclude`
    /// is set, else `pull`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<OciMode>,
    /// Reach the registry over plain HTTP, not TLS, when pulling (registries on localhost
    /// and 127.0.0.0/8 always are). Image volumes follow the node runtime's own registry
    /// configuration instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

/// How an `oci://` model reaches the pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OciMode {
    /// A read-only image volume the node's runtime pulls and caches.
    Volume,
    /// Pulled by `kandle-server pull`, verified, into the model volume.
    Pull,
}

/// What a model serves, which decides the OpenAI routes it answers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `/v1/chat/completions` and `/v1/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
    /// `/v1/embeddings`.
    Embedding,
    /// `/v1/rerank`: a cross-encoder (a sequence classifier with one score).
    Rerank,
    /// `/v1/classify`: a sequence classifier's labels.
    Classify,
    /// `/v2/models/{name}/infer`: an XGBoost or LightGBM model over KServe's Open Inference
    /// Protocol. Runs on CPU; the gateway, which speaks OpenAI's API, leaves it out.
    Tabular,
}

/// Replica bounds and the load each replica should carry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods; 0 scales to zero when idle.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    /// Most pods.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Requests in flight (running plus queued) each replica should carry.
    #[serde(default = "default_target_in_flight")]
    #[schemars(range(min = 1))]
    pub target_in_flight: i32,
    /// How long demand must stay lower before pods are removed.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0))]
    pub scale_down_delay_seconds: i32,
}

/// Compute for each serving pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// NVIDIA GPUs for each pod. Without it the model runs on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    /// Resource requests of the serving container (`cpu`, `memory`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub requests: BTreeMap<String, Quantity>,
    /// Resource limits of the serving container. The memory limit also sizes how long
    /// the server may take to load the model before its startup probe gives up.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub limits: BTreeMap<String, Quantity>,
}

/// GPUs for each pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.count <= 1").message("kandle-server runs a model on one GPU: more GPUs per pod would be allocated and left idle (splitting a model across GPUs is not supported yet); use replicas to use more GPUs"))]
pub struct GpuSpec {
    /// `nvidia.com/gpu` for each pod: 1, as kandle-server runs a model on one GPU.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub count: i32,
    /// Only nodes whose `nvidia.com/gpu.product` label (set by NVIDIA's GPU feature
    /// discovery) has this value, for example `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub product: Option<String>,
}

/// Where the pods may run; merged with what the GPU settings require.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels the pods require.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (the `nvidia.com/gpu` taint is tolerated when GPUs are asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Pod affinity rules; a GPU product requirement is added to every node selector term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// RuntimeClass of the pods (often `nvidia` on GPU nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

/// The inference server in each pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// kandle-server image (default: the operator's `--server-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Requests each pod runs at once; beyond it they queue, and past the queue get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_concurrent_requests: Option<i32>,
    /// Longest prompt accepted, in tokens (default: the model's context length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_input_tokens: Option<i32>,
    /// Secret holding the API key(s) under the key `api-key`, one per line; clients must then
    /// send `Authorization: Bearer KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub api_key_secret: Option<String>,
    /// How long the server may take to load the model once pulled, in seconds (default:
    /// estimated from the memory limit, at least 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub startup_timeout_seconds: Option<i32>,
    /// Extra environment variables of the serving container (`KANDLE_*` set server flags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// Where the pulled model is kept.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.volume == 'pvc' || !has(self.pvc)").message("cache.pvc applies only with volume: pvc"))]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// `emptyDir`: each pod pulls the model into its own volume before serving.
    /// `pvc`: a Job pulls it once into a PersistentVolumeClaim that pods mount read-only.
    /// `node`: the node's shared cache (a hostPath folder the chart's `nodeCache` prepares
    /// and collects): the first pod on a node pulls, the others on that node wait for it and
    /// pull nothing. Models pulled with a `credentialsSecret` are shared only by
    /// ModelDeployments of the same namespace naming the same Secret. The namespace must
    /// admit hostPath volumes (Pod Security `privileged`).
    #[serde(default)]
    pub volume: CacheVolume,
    /// Most the `emptyDir` may hold (its `sizeLimit`): a pod whose model outgrows it is
    /// evicted rather than filling the node's disk. Set it above the model's size.
    #[serde(default = "default_cache_size")]
    #[schemars(schema_with = "quantity")]
    pub size_limit: Quantity,
    /// The claim made for `volume: pvc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSpec>,
}

/// Kind of volume the model is pulled into.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheVolume {
    /// A volume of each pod's own: pulled again by every new pod.
    #[default]
    #[serde(rename = "emptyDir")]
    EmptyDir,
    /// A PersistentVolumeClaim filled once by a Job.
    #[serde(rename = "pvc")]
    Pvc,
    /// A folder of the node's shared cache: pulled once per node.
    #[serde(rename = "node")]
    Node,
}

/// The PersistentVolumeClaim of a `pvc` cache.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSpec {
    /// StorageClass of the claim (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Size of the claim; it must hold the model.
    #[serde(default = "default_pvc_size")]
    #[schemars(schema_with = "quantity")]
    pub size: Quantity,
    /// Access modes of the claim. Pods on several nodes need `ReadWriteMany` or `ReadOnlyMany`
    /// support from the storage class; `ReadWriteOnce` keeps them on the node that pulled.
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1))]
    pub access_modes: Vec<String>,
}

/// How pods are replaced when the spec changes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Extra pods allowed during a rollout (number or percentage).
    #[serde(default = "default_max_surge")]
    pub max_surge: IntOrString,
    /// Pods that may be unavailable during a rollout; 0 means no serving capacity is lost.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
    /// Seconds a rollout may take to make progress before it is reported as Degraded.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 30))]
    pub progress_deadline_seconds: i32,
    /// When a rollout misses its progress deadline, go back to the last spec that was Ready
    /// (kept in `status.readySpec`), and do not try the failed one again until the spec
    /// changes.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Roll a new revision out as a canary beside the last Ready one, under the same
    /// Service, promoting or aborting it by its error rate. The annotation
    /// `kandle.dev/canary: promote` or `abort` decides at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

/// A canary: the new revision's share of the replicas, step by step.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// The canary's share of the replicas at each step, held for the step's pause; after
    /// the last step the new revision replaces the old one everywhere.
    #[schemars(length(min = 1, max = 10))]
    pub steps: Vec<CanaryStep>,
    /// Highest share of the canary's requests over a step that may fail with a 5xx; above
    /// it the canary is aborted.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
}

/// One canary step.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStep {
    /// Percentage of the replicas that run the new revision (at least one pod).
    #[schemars(range(min = 1, max = 99))]
    pub weight: i32,
    /// Seconds the step lasts before the error rates are compared.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub pause_seconds: i32,
}

/// The Service in front of the pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port the Service listens on.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations of the Service (load balancer settings, for example).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service types the operator creates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

/// What the operator observed, last computed for `observedGeneration`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One word for where things stand: Pending, Pulling, Deploying, Ready, Degraded,
    /// Failed or ScaledToZero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `ModelReady`, `Progressing` and `Degraded`, with reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Serving pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Serving pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Serving pods running the current spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// Pods the operator wants (from `replicas` or the autoscaler); never written into spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Label selector of the serving pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Base URL of the OpenAI API inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// What was pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    /// Revision (hash of the pod template) of the pods last seen all ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Revision the current spec asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// The spec last seen Ready in full (its pods are `currentRevision`), which
    /// `rollout.autoRollback` returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub ready_spec: Option<Box<ModelDeploymentSpec>>,
    /// Set when a rollout missed its progress deadline and was rolled back: what failed,
    /// not tried again until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBack>,
    /// The canary of the last revision rolled out with `rollout.canary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
}

/// Where a canary stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// The revision under test.
    pub revision: String,
    /// The `metadata.generation` it comes from.
    pub generation: i64,
    /// The current step (from 0).
    pub step: i32,
    /// The canary's share of the replicas now, in percent.
    pub weight: i32,
    /// When the current step began.
    pub step_started: Time,
    /// Whether the canary is still being judged, passed, or failed.
    pub verdict: CanaryVerdict,
    /// What the last comparison found.
    pub message: String,
    /// Request and 5xx counters of both revisions when the step began.
    pub baseline: CanaryCounters,
}

/// Requests and 5xx answers summed over a revision's pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CanaryCounters {
    /// Requests the canary's pods answered.
    pub canary_requests: f64,
    /// Of those, answered with a 5xx.
    pub canary_errors: f64,
    /// Requests the stable revision's pods answered.
    pub stable_requests: f64,
    /// Of those, answered with a 5xx.
    pub stable_errors: f64,
}

/// A canary's verdict.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CanaryVerdict {
    /// Stepping through its weights.
    #[default]
    Progressing,
    /// It passed: the new revision replaces the old one.
    Promoted,
    /// It failed: the old revision serves; not tried again until the spec changes.
    Aborted,
}

/// A rollout that was rolled back.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolledBack {
    /// The `metadata.generation` whose rollout failed.
    pub generation: i64,
    /// The revision that did not become ready.
    pub revision: String,
    /// Why it did not.
    pub message: String,
}

/// Kubernetes' quantity grammar (`500m`, `1.5`, `8Gi`, `1e3`) without a sign: a negative
/// or malformed request, limit or size is refused here rather than by the children's
/// API calls later.
pub const QUANTITY_PATTERN: &str = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// A resource quantity as controller-gen writes one: an integer, or a string of the
/// grammar (the pattern applies to strings only).
fn quantity(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "pattern": QUANTITY_PATTERN,
        "maxLength": 64,
    })
}

fn quantity_map(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": quantity(g),
        "maxProperties": 32,
    })
}

/// Kept as written: a copy of the spec, not validated again.
fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Where things stand, in one word.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for pods to be scheduled or created.
    Pending,
    /// The model is being pulled.
    Pulling,
    /// Pods are starting or being replaced.
    Deploying,
    /// Every wanted pod serves the current spec.
    Ready,
    /// Serving less than wanted, or a rollout is stuck; conditions say why.
    Degraded,
    /// Cannot work until the spec or its secrets change; conditions say why.
    Failed,
    /// No pods wanted.
    ScaledToZero,
}

/// What was pulled, from the pull step's report.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Where the model came from: the URI pulled, or for an image volume the reference
    /// the node's runtime mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What the source's reference resolved to: the commit of an `hf://` revision, the
    /// manifest digest of an `oci://` tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_revision: Option<String>,
    /// How long the last pull took, in seconds (absent for image volumes: the node's
    /// runtime pulls them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_seconds: Option<i64>,
    /// Bytes the last pull fetched over the network: 0 when the volume held the model
    /// already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_bytes: Option<i64>,
    /// Bytes of model files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Number of model files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    /// Files checked by size alone, because their source published no hash (an https://
    /// URL without a sha256, an S3 multipart upload). Absent when every file was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unverified_files: Option<i64>,
}

fn one() -> i32 {
    1
}
fn default_target_in_flight() -> i32 {
    8
}
fn default_scale_down_delay() -> i32 {
    300
}
pub fn default_cache_size() -> Quantity {
    Quantity("20Gi".into())
}
fn default_pvc_size() -> Quantity {
    Quantity("20Gi".into())
}
fn default_access_modes() -> Vec<String> {
    vec!["ReadWriteOnce".into()]
}
fn default_max_surge() -> IntOrString {
    IntOrString::Int(1)
}
fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}
fn default_max_error_rate() -> f64 {
    0.01
}
fn default_true() -> bool {
    true
}
fn default_progress_deadline() -> i32 {
    1800
}
fn default_service_port() -> i32 {
    80
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
            progress_deadline_seconds: default_progress_deadline(),
            auto_rollback: true,
            canary: None,
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The derive needs literals; the contract is what everything else reads.
    #[test]
    fn the_group_and_version_are_the_contracts() {
        use kube::Resource;
        let api_version = super::ModelDeployment::api_version(&());
        assert_eq!(api_version, kandle_contract::API_VERSION);
        assert_eq!(super::ModelDeployment::group(&()), kandle_contract::GROUP);
    }

    /// The fields a CEL rule reads: `self.a.b` paths, relative to the rule's node.
    fn paths(rule: &str) -> Vec<Vec<&str>> {
        rule.match_indices("self.")
            .filter(|(i, _)| {
                rule[..*i]
                    .chars()
                    .last()
                    .is_none_or(|c| !c.is_alphanumeric() && c != '_' && c != '.')
            })
            .map(|(i, _)| {
                let rest = &rule[i + "self.".len()..];
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(rest.len());
                let mut path: Vec<&str> =
                    rest[..end].split('.').filter(|s| !s.is_empty()).collect();
                // `self.uri.matches(...)`: the last name is a method, not a field.
                if rest[end..].starts_with('(') {
                    path.pop();
                }
                path
            })
            .collect()
    }

    /// Walks the schema; at each rule, every value it reads must be bounded: strings by
    /// `maxLength` or an enum, lists by `maxItems`, maps by `maxProperties`.
    fn unbounded(schema: &Value, at: &str, out: &mut Vec<String>) {
        for rule in schema["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let rule = rule["rule"].as_str().unwrap();
            for path in paths(rule) {
                let mut node = schema;
                for field in &path {
                    node = &node["properties"][field];
                }
                let bounded = match node["type"].as_str() {
                    Some("string") => node.get("maxLength").is_some() || node.get("enum").is_some(),
                    Some("array") => node.get("maxItems").is_some(),
                    Some("object") if node.get("additionalProperties").is_some() => {
                        node.get("maxProperties").is_some()
                    }
                    // Numbers, booleans and plain objects cost a constant; an unknown path
                    // (a typo) is unbounded too.
                    Some(_) => true,
                    None => false,
                };
                if !bounded {
                    out.push(format!("{at}: `{rule}` reads self.{}", path.join(".")));
                }
            }
        }
        for (name, child) in schema["properties"].as_object().into_iter().flatten() {
            unbounded(child, &format!("{at}.{name}"), out);
        }
        for key in ["items", "additionalProperties"] {
            if schema[key].is_object() {
                unbounded(&schema[key], &format!("{at}[]"), out);
            }
        }
    }

    #[test]
    fn every_value_a_cel_rule_reads_is_bounded() {
        let crd = serde_json::to_value(super::definition()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut out = Vec::new();
        unbounded(schema, "", &mut out);
        assert!(out.is_empty(), "unbounded reads: {out:#?}");
        // The check itself can fail: an unbounded string is found.
        let bare = serde_json::json!({"type": "object",
            "properties": {"s": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "self.s.matches('^a$')"}]});
        let mut out = Vec::new();
        unbounded(&bare, "", &mut out);
        assert_eq!(out.len(), 1);
    }
}
