//! The Service in front of the serving pods, their PodDisruptionBudget, and the
//! NetworkPolicy that says who may reach them.
use super::Settings;
use super::deployment::SERVER_PORT;
use super::labels::{instance_labels, meta, selector};
use crate::crd::{ModelDeployment, ServiceType};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

pub fn service(md: &ModelDeployment) -> Service {
    let spec = md.spec.service.clone().unwrap_or_default();
    let mut metadata = meta(md, md.name_any(), "server");
    metadata.annotations = (!spec.annotations.is_empty()).then_some(spec.annotations);
    let type_ = match spec.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector(md)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: spec.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Voluntary disruptions (node drains) take one serving pod at a time.
pub fn disruption_budget(md: &ModelDeployment) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(md, md.name_any(), "server"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(md)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The label every namespace carries with its own name (Kubernetes 1.22 and later).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Admits the serving port of the model's pods (serving and pulling: the pull pods listen
/// on nothing, so they admit nothing) from the model's namespace, the operator's and the
/// ones the spec names; `None` when the spec asks for no policy.
pub fn network_policy(md: &ModelDeployment, settings: &Settings) -> Option<NetworkPolicy> {
    let spec = md.spec.network_policy.as_ref()?;
    let mut namespaces: Vec<String> = [
        md.namespace().unwrap_or_default(),
        settings.operator_namespace.clone(),
    ]
    .into_iter()
    .chain(spec.from_namespaces.iter().cloned())
    .collect();
    namespaces.sort();
    namespaces.dedup();
    Some(NetworkPolicy {
        metadata: meta(md, md.name_any(), "server"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(instance_labels(md)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: NAMESPACE_NAME_LABEL.into(),
                            operator: "In".into(),
                            values: Some(namespaces),
                        }]),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(SERVER_PORT.into())),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    })
}
