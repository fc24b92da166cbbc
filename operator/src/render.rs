//! `kandle-operator render`: the children the operator would apply for the
//! ModelDeployments in a file, checked first as a strict API server would check them.
use crate::build::{self, Settings};
use crate::validate;

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
/// left out, since only the cluster knows the owner's uid; a `pvc` cache's Deployment is
/// shown as it is applied once the pull Job has finished.
pub fn render(input: &str, settings: &Settings, namespace: &str) -> Result<String, RenderError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(input).map_err(|e| RenderError::Yaml(e.to_string()))?;
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
            Ok(md) => {
                let wanted = crate::replicas::wanted(&md, None);
                for child in build::desired(&md, settings, wanted).children {
                    out.push(child);
                }
            }
            Err(e) => problems.push(format!("document {} ({name}): {e}", i + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(RenderError::Invalid(problems.join("\n")));
    }
    serde_saphyr::to_string_multiple(&out).map_err(|e| RenderError::Yaml(e.to_string()))
}
