//! Names, labels and owner references shared by every child.
use crate::crd::ModelDeployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// The one field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kandle-operator";
/// `app.kubernetes.io/managed-by` of every child: how the operator finds its own.
pub const MANAGED_BY: &str = "kandle-operator";
use kandle_contract::keys::REVISION_LABEL;

const NAME: &str = "app.kubernetes.io/name";
const INSTANCE: &str = "app.kubernetes.io/instance";

/// The revision a Deployment's pod template carries (what it is rolling out).
pub fn template_revision(d: &k8s_openapi::api::apps::v1::Deployment) -> Option<&str> {
    d.spec
        .template
        .metadata
        .as_ref()?
        .labels
        .as_ref()?
        .get(REVISION_LABEL)
        .map(String::as_str)
}

/// Labels that select the serving pods of one ModelDeployment (the Deployment's
/// immutable selector, the Service's and the PDB's).
pub fn selector(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), "kandle-server".to_string()),
        (INSTANCE.to_string(), md.name_any()),
    ])
}

/// `status.selector`, for the scale subresource.
pub fn selector_string(md: &ModelDeployment) -> String {
    selector(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every pod of one ModelDeployment, serving or pulling.
pub fn instance_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INSTANCE.to_string(), md.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ])
}

/// Selects every child of one ModelDeployment, whatever its component.
pub fn instance_selector(name: &str) -> String {
    format!("{INSTANCE}={name},app.kubernetes.io/managed-by={MANAGED_BY}")
}

/// The `app.kubernetes.io/*` labels of a child of the given component.
pub fn labels(md: &ModelDeployment, name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), name.to_string()),
        (INSTANCE.to_string(), md.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "kandle".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ])
}

/// Metadata of a child: its name, the ModelDeployment's namespace, labels, and the
/// controller owner reference that garbage-collects it with its parent.
pub fn meta(md: &ModelDeployment, name: String, component: &str) -> ObjectMeta {
    let app = if component == "pull" {
        "kandle-pull"
    } else {
        "kandle-server"
    };
    ObjectMeta {
        name: Some(name),
        namespace: md.namespace(),
        labels: Some(labels(md, app, component)),
        owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}
