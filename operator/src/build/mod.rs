//! The child objects a `ModelDeployment` wants, as pure functions of its spec and what is
//! observed. No client here: the controller applies what these return, `render` prints it.
mod cache;
mod deployment;
mod labels;
mod pod;
mod quantity;
mod service;

pub use cache::{ModelSource, node_folder};
pub use deployment::SERVER_PORT;

pub use kandle_contract::keys::{REVISION_LABEL, TRACK_LABEL};
pub use labels::{
    FIELD_MANAGER, MANAGED_BY, instance_selector, selector_string, template_revision,
};

use crate::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::Serialize;

/// Operator-wide settings the children depend on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of CPU pods whose spec names none.
    pub server_image: String,
    /// Image of GPU pods whose spec names none: the server built with CUDA.
    pub server_image_cuda: String,
    /// DNS suffix of Services, for `status.endpoint`.
    pub cluster_domain: String,
    /// Where the operator runs: its scrapes of the pods' metrics come from there.
    pub operator_namespace: String,
    /// The API server enables image volumes by default (Kubernetes 1.35+): `oci://`
    /// models are mounted as image volumes unless their spec says otherwise.
    pub image_volumes: bool,
    /// The node cache's folder on every node (`cache.volume: node`), prepared and
    /// collected by the chart's `nodeCache` DaemonSet.
    pub node_cache_root: String,
}

/// Whether an API server of this version enables image volumes by default: Kubernetes
/// 1.35 and later (providers write minors such as `35+`).
pub fn image_volumes_by_default(major: &str, minor: &str) -> bool {
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(major), _) if major > 1 => true,
        (Some(1), Some(minor)) => minor >= 35,
        _ => false,
    }
}

/// Every child kind, in the order they are applied and printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Child {
    Pvc(Box<PersistentVolumeClaim>),
    Job(Box<Job>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Pdb(Box<PodDisruptionBudget>),
    NetworkPolicy(Box<NetworkPolicy>),
}

/// A child's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pvc,
    Job,
    Deployment,
    Service,
    Pdb,
    NetworkPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pvc => "PersistentVolumeClaim",
            Self::Job => "Job",
            Self::Deployment => "Deployment",
            Self::Service => "Service",
            Self::Pdb => "PodDisruptionBudget",
            Self::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// A child by kind and name: what is applied, found, or pruned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChildRef {
    pub kind: Kind,
    pub name: String,
}

impl Child {
    pub fn kind(&self) -> &'static str {
        self.key().kind.as_str()
    }

    pub fn name(&self) -> String {
        self.key().name
    }

    pub fn key(&self) -> ChildRef {
        let (kind, name) = match self {
            Self::Pvc(o) => (Kind::Pvc, o.name_any()),
            Self::Job(o) => (Kind::Job, o.name_any()),
            Self::Deployment(o) => (Kind::Deployment, o.name_any()),
            Self::Service(o) => (Kind::Service, o.name_any()),
            Self::Pdb(o) => (Kind::Pdb, o.name_any()),
            Self::NetworkPolicy(o) => (Kind::NetworkPolicy, o.name_any()),
        };
        ChildRef { kind, name }
    }
}

/// Every child a ModelDeployment can own whose name is fixed, as the builders below name
/// them: the controller finds its children by these names (and pull Jobs, named for their
/// templates, by owner), so a reconcile costs the same with 10 or 10,000 ModelDeployments.
pub fn named_children(md: &ModelDeployment) -> [ChildRef; 6] {
    let name = md.name_any();
    let child = |kind, name| ChildRef { kind, name };
    [
        child(Kind::Pvc, cache::claim_name(md)),
        child(Kind::Deployment, canary_name(&name)),
        child(Kind::Deployment, name.clone()),
        child(Kind::Service, name.clone()),
        child(Kind::Pdb, name.clone()),
        child(Kind::NetworkPolicy, name),
    ]
}

/// The canary Deployment's name, beside the serving Deployment `name`.
pub fn canary_name(name: &str) -> String {
    format!("{name}-canary")
}

/// What one ModelDeployment wants to exist.
#[derive(Debug, Clone)]
pub struct Desired {
    /// Objects to apply, in order.
    pub children: Vec<Child>,
    /// The serving Deployment exists but must not be touched yet: its new model is still
    /// being pulled into the PVC, so the pods keep serving the old one until then.
    pub hold_deployment: bool,
    /// Name of the Job that pulls into a PVC cache, if there is one.
    pub pull_job: Option<String>,
    /// Hash of the pod template the spec asks for.
    pub revision: String,
    /// Serving pods wanted.
    pub replicas: i32,
}

impl Desired {
    /// Rolls one pod at a time: no surge pod, one old pod down at once (the GPU fallback).
    pub fn one_at_a_time(mut self) -> Self {
        for child in &mut self.children {
            if let Child::Deployment(d) = child
                && let Some(rolling) = d
                    .spec
                    .strategy
                    .as_mut()
                    .and_then(|s| s.rolling_update.as_mut())
            {
                rolling.max_surge = Some(IntOrString::Int(0));
                rolling.max_unavailable = Some(IntOrString::Int(1));
            }
        }
        self
    }

    /// Adds the canary: the Deployment of `canary` (built for the new spec) as
    /// `NAME-canary`, its pods labelled `kandle.dev/track: canary` so that the two
    /// Deployments' selectors stay apart while the Service selects both.
    pub fn with_canary(mut self, canary: Desired) -> Self {
        let deployment = canary.children.into_iter().find_map(|c| match c {
            Child::Deployment(d) => Some(d),
            _ => None,
        });
        if let Some(mut d) = deployment {
            d.metadata.name = Some(canary_name(&d.name_any()));
            let track = || (TRACK_LABEL.to_string(), "canary".to_string());
            d.metadata.labels.get_or_insert_default().extend([track()]);
            d.spec
                .selector
                .match_labels
                .get_or_insert_default()
                .extend([track()]);
            if let Some(meta) = d.spec.template.metadata.as_mut() {
                meta.labels.get_or_insert_default().extend([track()]);
            }
            self.children.push(Child::Deployment(d));
        }
        self
    }

    /// Leaves the Deployment out until the pull Job has filled the cache.
    pub fn hold_deployment(mut self) -> Self {
        self.children.retain(|c| !matches!(c, Child::Deployment(_)));
        self.hold_deployment = true;
        self
    }
}

/// Builds every child, as applied once the model is in place; `replicas` is what the
/// spec or the autoscaler asks for.
pub fn desired(md: &ModelDeployment, settings: &Settings, replicas: i32) -> Desired {
    let source = ModelSource::of(md, settings);
    let mut children = Vec::new();
    let mut pull_job = None;
    if let ModelSource::PvcCache { .. } = &source {
        let job = cache::pull_job(md, settings, &source);
        pull_job = Some(job.name_any());
        children.push(Child::Pvc(Box::new(cache::claim(md))));
        children.push(Child::Job(Box::new(job)));
    }
    let (deployment, revision) = deployment::deployment(md, settings, &source, replicas);
    children.push(Child::Deployment(Box::new(deployment)));
    children.push(Child::Service(Box::new(service::service(md))));
    if replicas > 1 {
        children.push(Child::Pdb(Box::new(service::disruption_budget(md))));
    }
    if let Some(policy) = service::network_policy(md, settings) {
        children.push(Child::NetworkPolicy(Box::new(policy)));
    }
    Desired {
        children,
        hold_deployment: false,
        pull_job,
        revision,
        replicas,
    }
}

/// A Deployment's rolling-update settings (every Deployment kandle builds has them).
pub fn rolling_update(
    d: &Deployment,
) -> Option<&k8s_openapi::api::apps::v1::RollingUpdateDeployment> {
    d.spec.strategy.as_ref()?.rolling_update.as_ref()
}

/// The in-cluster base URL of the OpenAI API.
pub fn endpoint(md: &ModelDeployment, settings: &Settings) -> String {
    let port = md.spec.service.clone().unwrap_or_default().port;
    let host = format!(
        "{}.{}.svc.{}",
        md.name_any(),
        md.namespace().unwrap_or_default(),
        settings.cluster_domain
    );
    match port {
        80 => format!("http://{host}/v1"),
        p => format!("http://{host}:{p}/v1"),
    }
}

#[cfg(test)]
pub(crate) mod tests;
