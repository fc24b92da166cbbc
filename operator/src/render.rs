//! `kandle-operator render`: the children the operator would apply for the
//! ModelDeployments in a file, checked first as a strict API server would check them.
//! With `--observed`, what the cluster holds goes through the same plan step as a
//! reconcile, so canary steps, rollbacks and held pulls show as the operator would act.
use crate::build::{self, Settings};
use crate::crd::ModelDeployment;
use crate::plan::{self, Cluster, Scraped, Step};
use crate::validate;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;

/// Why a file cannot be rendered: each invalid document, named, with its errors.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("not YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Invalid(String),
}

/// Multi-document YAML of every child, in input order and, for each ModelDeployment, in
/// apply order. Deterministic: the same input prints the same bytes. Owner references are
/// left out, since only the cluster knows the owner's uid. Without `observed`, a `pvc`
/// cache's Deployment is shown as it is applied once the pull Job has finished; with it
/// (YAML of Deployments, Jobs and Pods, as `kubectl get -o yaml` prints them), what the
/// plan step decides for that cluster now (canary counters are taken as unanswered).
pub fn render(
    input: &str,
    settings: &Settings,
    namespace: &str,
    observed: Option<&str>,
) -> Result<String, RenderError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(input).map_err(|e| RenderError::Yaml(e.to_string()))?;
    let cluster = observed.map(Observed::parse).transpose()?;
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
        if doc.pointer("/metadata/namespace").is_none()
            && let Some(meta) = doc.get_mut("metadata").and_then(|m| m.as_object_mut())
        {
            meta.insert("namespace".into(), namespace.into());
        }
        let name = doc
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        match validate::model_deployment(&doc) {
            Ok(md) => out.extend(children(&md, settings, cluster.as_ref())),
            Err(e) => problems.push(format!("document {} ({name}): {e}", i + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(RenderError::Invalid(problems.join("\n")));
    }
    serde_saphyr::to_string_multiple(&out).map_err(|e| RenderError::Yaml(e.to_string()))
}

fn children(
    md: &ModelDeployment,
    settings: &Settings,
    observed: Option<&Observed>,
) -> Vec<build::Child> {
    let Some(observed) = observed else {
        let wanted = crate::replicas::wanted(md, None);
        return build::desired(md, settings, wanted).children;
    };
    let cluster = observed.cluster(md);
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    match plan::plan(md, settings, &cluster, &now) {
        Step::Plan(plan) => plan.desired.children,
        // Offline, the pods cannot be asked: the plan goes on as if none answered.
        Step::Scrape(_) => unreachable!("the cluster is marked scraped"),
    }
}

/// The objects of an `--observed` file.
#[derive(Default)]
struct Observed {
    deployments: Vec<Arc<Deployment>>,
    jobs: Vec<Arc<Job>>,
    pods: Vec<Arc<Pod>>,
}

impl Observed {
    /// Documents and `kind: List` items; kinds other than these three are ignored.
    fn parse(text: &str) -> Result<Self, RenderError> {
        let mut observed = Self::default();
        let mut docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| RenderError::Yaml(e.to_string()))?;
        while let Some(doc) = docs.pop() {
            match doc["kind"].as_str().unwrap_or_default() {
                "List" => docs.extend(doc["items"].as_array().cloned().unwrap_or_default()),
                "Deployment" => observed.deployments.push(object(doc)?),
                "Job" => observed.jobs.push(object(doc)?),
                "Pod" => observed.pods.push(object(doc)?),
                _ => {}
            }
        }
        Ok(observed)
    }

    /// What a reconcile of `md` would read: its children by name and label.
    fn cluster(&self, md: &ModelDeployment) -> Cluster {
        let ns = md.namespace();
        let name = md.name_any();
        let mine = |meta: &ObjectMeta| {
            meta.namespace == ns
                && meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app.kubernetes.io/instance"))
                    == Some(&name)
        };
        let named = |n: &str| {
            self.deployments
                .iter()
                .find(|d| d.metadata.namespace == ns && d.name_any() == n)
                .cloned()
        };
        Cluster {
            deployment: named(&name),
            canary: named(&build::canary_name(&name)),
            jobs: self
                .jobs
                .iter()
                .filter(|j| mine(&j.metadata))
                .cloned()
                .collect(),
            pods: self
                .pods
                .iter()
                .filter(|p| mine(&p.metadata))
                .cloned()
                .collect(),
            scraped: Scraped::Yes(None),
            ..Cluster::default()
        }
    }
}

fn object<K: DeserializeOwned>(doc: Value) -> Result<Arc<K>, RenderError> {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    serde_json::from_value(doc)
        .map(Arc::new)
        .map_err(|e| RenderError::Invalid(format!("observed {what}: {e}")))
}
