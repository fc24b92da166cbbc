//! Operator scenarios written once against a `kube::Client`: the emulated API server in
//! `cargo test`, or a real cluster (with the operator installed) when `KANDLE_E2E=1`.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kandle_operator::crd::{ModelDeployment, Phase};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A namespaced Kubernetes object the scenarios read.
pub trait Object:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Object for K where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// Where scenarios run.
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub namespace: String,
    /// How long a scenario waits for the operator (and, on a real cluster, for pulls and pods).
    pub timeout: Duration,
    /// A real cluster: models are really pulled and served.
    pub real: bool,
}

impl Target {
    pub fn api<K: Object>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A small real model on a real cluster; in the emulator any URI pulls.
    fn model_uri(&self) -> &'static str {
        "hf://sentence-transformers/all-MiniLM-L6-v2"
    }

    pub async fn create(&self, name: &str, spec: Value) -> ModelDeployment {
        let md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("a ModelDeployment");
        self.api::<ModelDeployment>()
            .create(&PostParams::default(), &md)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
    }

    /// Polls `name` until `done` holds, failing with the last state seen.
    pub async fn wait<K: Object>(&self, name: &str, what: &str, done: impl Fn(&K) -> bool) -> K {
        let api = self.api::<K>();
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < self.timeout {
            if let Ok(Some(obj)) = api.get_opt(name).await {
                if done(&obj) {
                    return obj;
                }
                last = Some(obj);
            }
            tokio::time::sleep(if self.real {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(20)
            })
            .await;
        }
        panic!(
            "{name}: not {what} after {:?}; last seen: {last:#?}",
            self.timeout
        )
    }

    /// The owner references of an object that must exist.
    pub async fn owners<K: Object>(
        &self,
        name: &str,
    ) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
        let obj = self
            .api::<K>()
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        obj.owner_references().to_vec()
    }

    pub async fn wait_gone<K: Object>(&self, name: &str) {
        let api = self.api::<K>();
        let started = Instant::now();
        while started.elapsed() < self.timeout {
            if matches!(api.get_opt(name).await, Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(if self.real { 1000 } else { 20 })).await;
        }
        panic!("{name} still exists after {:?}", self.timeout)
    }

    /// Reason and note of every event about the object `name`.
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Waits for an event about `name` with `reason` and a note containing `note`, and
    /// returns them all: events are recorded after the writes they report, so they may
    /// trail the state a test waited for.
    pub async fn wait_event(&self, name: &str, reason: &str, note: &str) -> Vec<(String, String)> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let events = self.events(name).await;
            if events.iter().any(|(r, n)| r == reason && n.contains(note)) {
                return events;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {reason} event about {name} with {note:?}: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_phase(&self, name: &str, phase: Phase) -> ModelDeployment {
        self.wait::<ModelDeployment>(name, &format!("{phase:?}"), |md| {
            md.status.as_ref().is_some_and(|s| {
                s.phase == Some(phase) && s.observed_generation == md.metadata.generation
            })
        })
        .await
    }
}

pub fn condition<'a>(
    md: &'a ModelDeployment,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    md.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

/// A new ModelDeployment comes up: children with owner references, status that
/// `kubectl wait --for=condition=Ready` and GitOps tools read.
pub async fn create_and_converge(t: &Target) {
    let md = t
        .create(
            "converge",
            json!({"model": {"uri": t.model_uri()}, "replicas": 2}),
        )
        .await;
    let ready = t.wait_phase("converge", Phase::Ready).await;
    let status = ready.status.clone().unwrap();
    let ready_condition = condition(&ready, "Ready");
    assert_eq!(ready_condition.status, "True");
    assert_eq!(
        ready_condition.observed_generation,
        ready.metadata.generation
    );
    assert_eq!(condition(&ready, "ModelReady").status, "True");
    assert_eq!(condition(&ready, "Degraded").status, "False");
    assert_eq!((status.ready_replicas, status.replicas), (Some(2), Some(2)));
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("http://converge.{}.svc.cluster.local/v1", t.namespace).as_str())
    );
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=converge,app.kubernetes.io/name=kandle-server")
    );
    let model = status.model.expect("what was pulled");
    assert_eq!(
        model.resolved_revision.as_deref().map(str::len),
        Some(40),
        "a commit: {model:?}"
    );
    assert!(model.size_bytes.unwrap_or(0) > 0);
    assert_eq!(status.current_revision, status.update_revision);
    for (kind, owners) in [
        ("Deployment", t.owners::<Deployment>("converge").await),
        ("Service", t.owners::<Service>("converge").await),
        (
            "PodDisruptionBudget",
            t.owners::<PodDisruptionBudget>("converge").await,
        ),
    ] {
        assert_eq!(owners.len(), 1, "{kind}");
        assert_eq!(
            owners[0].uid,
            md.uid().unwrap(),
            "{kind} is owned by its ModelDeployment"
        );
    }
}

/// A spec change rolls a new pod template; status follows it to Ready.
pub async fn spec_change_rolls_a_new_revision(t: &Target) {
    t.create(
        "rolling",
        json!({"model": {"uri": t.model_uri()}, "replicas": 1}),
    )
    .await;
    let before = t
        .wait_phase("rolling", Phase::Ready)
        .await
        .status
        .unwrap()
        .current_revision
        .unwrap();
    let patch = json!({"spec": {"server": {"env": [{"name": "RUST_LOG", "value": "debug"}]}}});
    t.api::<ModelDeployment>()
        .patch("rolling", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let after = t
        .wait::<ModelDeployment>("rolling", "rolled out", |md| {
            md.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Ready)
                    && s.current_revision.as_deref() != Some(before.as_str())
                    && s.observed_generation == md.metadata.generation
            })
        })
        .await;
    let revision = after.status.unwrap().current_revision.unwrap();
    let deployment = t.api::<Deployment>().get("rolling").await.unwrap();
    let labels = deployment.spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["kandle.dev/revision"], revision);
    let env = &deployment.spec.template.spec.unwrap().containers[0].env;
    assert_eq!(env.as_ref().unwrap()[0].name, "RUST_LOG");
}

/// A child deleted or edited by someone else is put back.
pub async fn drift_is_repaired(t: &Target) {
    t.create(
        "drift",
        json!({"model": {"uri": t.model_uri()}, "replicas": 1}),
    )
    .await;
    t.wait_phase("drift", Phase::Ready).await;
    let services = t.api::<Service>();
    let uid = services.get("drift").await.unwrap().uid();
    services
        .delete("drift", &DeleteParams::default())
        .await
        .unwrap();
    t.wait::<Service>("drift", "recreated", |s| s.uid() != uid)
        .await;
    let edit = json!({"spec": {"replicas": 5}});
    t.api::<Deployment>()
        .patch("drift", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    t.wait::<Deployment>("drift", "scaled back to 1", |d| d.spec.replicas == Some(1))
        .await;
}

/// Deleting a ModelDeployment takes its children with it.
pub async fn deletion_collects_children(t: &Target) {
    t.create(
        "doomed",
        json!({"model": {"uri": t.model_uri()}, "replicas": 2}),
    )
    .await;
    t.wait_phase("doomed", Phase::Ready).await;
    t.api::<ModelDeployment>()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    t.wait_gone::<ModelDeployment>("doomed").await;
    t.wait_gone::<Deployment>("doomed").await;
    t.wait_gone::<Service>("doomed").await;
    t.wait_gone::<PodDisruptionBudget>("doomed").await;
}

/// A model that cannot be pulled fails with the hub's answer in status.
pub async fn pull_failure_is_reported(t: &Target) {
    let uri = "hf://kandle-e2e/does-not-exist";
    t.create("unpullable", json!({"model": {"uri": uri}})).await;
    let failed = t.wait_phase("unpullable", Phase::Failed).await;
    let ready = condition(&failed, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PullFailed")
    );
    assert!(ready.message.contains(uri), "{}", ready.message);
    assert_eq!(condition(&failed, "ModelReady").reason, "PullFailed");
}

/// What the schema cannot catch, a missing secret, is reported; creating it heals. The
/// pull reads the secret as files from an `optional` volume, so it runs, says what is
/// missing, and is retried (by the kubelet, or by the Job, which does not count it as a
/// failure) until the secret exists. `cache` is the spec's cache (`{}` for the pods' own).
pub async fn missing_secret_is_reported_until_created(t: &Target, name: &str, cache: Value) {
    let secret_name = format!("{name}-token");
    t.create(
        name,
        json!({"model": {"uri": t.model_uri(), "credentialsSecret": secret_name}, "cache": cache}),
    )
    .await;
    let failed = t.wait_phase(name, Phase::Failed).await;
    let message = &condition(&failed, "Ready").message;
    assert!(
        message.contains(&format!("secret \"{secret_name}\" not found")),
        "{message}"
    );
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": secret_name}, "stringData": {"KANDLE_E2E_UNUSED": "1"}}),
    )
    .unwrap();
    t.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    t.wait_phase(name, Phase::Ready).await;
}

/// `kubectl scale mdep/NAME --replicas 3` (and HPA, KEDA) go through the scale
/// subresource into `spec.replicas`; the operator follows, and reports the replicas and
/// selector the scale subresource reads back.
pub async fn scale_subresource_is_followed(t: &Target) {
    t.create(
        "scaled",
        json!({"model": {"uri": t.model_uri()}, "replicas": 1}),
    )
    .await;
    t.wait_phase("scaled", Phase::Ready).await;
    let api = t.api::<ModelDeployment>();
    api.patch_scale(
        "scaled",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    let md = t
        .wait::<ModelDeployment>("scaled", "at 3 ready replicas", |md| {
            md.status.as_ref().is_some_and(|s| {
                s.ready_replicas == Some(3) && s.observed_generation == md.metadata.generation
            })
        })
        .await;
    assert_eq!(md.spec.replicas, Some(3));
    assert_eq!(md.status.as_ref().unwrap().desired_replicas, Some(3));
    let deployment = t.api::<Deployment>().get("scaled").await.unwrap();
    assert_eq!(deployment.spec.replicas, Some(3));
    let scale = api.get_scale("scaled").await.unwrap();
    let status = scale.status.unwrap();
    assert_eq!(status.replicas, 3);
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=scaled,app.kubernetes.io/name=kandle-server")
    );
}

/// `cache.volume: node`: pods of one model on one node share its folder; one pod pulls, the
/// others wait for it and fetch nothing (none, when an earlier run left the model there).
/// Returns the bytes each pod fetched.
pub async fn node_cache_pulls_once_per_node(t: &Target) -> Vec<u64> {
    t.create(
        "node-cached",
        json!({"model": {"uri": t.model_uri()}, "replicas": 2, "cache": {"volume": "node"}}),
    )
    .await;
    let ready = t.wait_phase("node-cached", Phase::Ready).await;
    let pods = t
        .api::<Pod>()
        .list(&ListParams::default().labels("app.kubernetes.io/instance=node-cached"))
        .await
        .expect("list pods");
    let mut fetched_per_node: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for pod in &pods.items {
        let status = pod.status.as_ref().expect("a pod status");
        let pull = status
            .init_container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "pull")
            .expect("each pod pulls");
        let report: Value = pull
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| serde_json::from_str(t.message.as_deref()?).ok())
            .expect("the pull's report");
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        fetched_per_node
            .entry(node.unwrap_or_default())
            .or_default()
            .push(report["pulledBytes"].as_u64().expect("pulledBytes"));
    }
    assert_eq!(pods.items.len(), 2);
    for (node, fetched) in &fetched_per_node {
        assert!(
            fetched.iter().filter(|&&b| b > 0).count() <= 1,
            "more than one pod on node {node:?} pulled: {fetched:?}"
        );
    }
    let model = ready.status.and_then(|s| s.model).expect("status.model");
    assert!(model.size_bytes.unwrap_or(0) > 0, "{model:?}");
    assert_eq!(
        model.source.as_deref(),
        Some(format!("{} (node cache)", t.model_uri()).as_str()),
        "status says where the model came from"
    );
    t.api::<ModelDeployment>()
        .delete("node-cached", &DeleteParams::default())
        .await
        .expect("delete");
    fetched_per_node.into_values().flatten().collect()
}
