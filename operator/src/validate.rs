//! Checks a `ModelDeployment` as a strict API server would, offline: the CRD's structural
//! schema (types, bounds, enums, required and unknown fields) and its CEL rules. `render`
//! uses it, and so do the tests' API server and the example checks.
use crate::crd::ModelDeployment;
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Map, Value};
use std::sync::LazyLock;

/// Why a document is not a valid `ModelDeployment`: every field at fault, each with its cause.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// The CRD's openAPIV3Schema, as the API server and kube's CEL validator read it.
static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = ModelDeployment::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the derived CRD has a schema");
    serde_json::to_value(schema).expect("a schema is JSON")
});

/// The same schema in plain JSON Schema, for the structural checks.
static STRUCTURAL: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let mut schema = SCHEMA.clone();
    // The API server owns these root fields, so the CRD schema leaves them out.
    let root = schema["properties"]
        .as_object_mut()
        .expect("root properties");
    for field in ["apiVersion", "kind"] {
        root.insert(field.into(), serde_json::json!({"type": "string"}));
    }
    root.insert("metadata".into(), serde_json::json!({"type": "object"}));
    to_json_schema(&mut schema);
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .expect("the translated CRD schema compiles")
});

/// Validates a whole object (apiVersion, kind, metadata, spec) and returns it typed.
pub fn model_deployment(doc: &Value) -> Result<ModelDeployment, Invalid> {
    let mut errors = Vec::new();
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let kind = doc.get("kind").and_then(Value::as_str);
    if api_version != Some("kandle.dev/v1alpha1") || kind != Some("ModelDeployment") {
        return Err(Invalid(vec![format!(
            "not a kandle.dev/v1alpha1 ModelDeployment (apiVersion {}, kind {})",
            api_version.unwrap_or("missing"),
            kind.unwrap_or("missing")
        )]));
    }
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => {}
        _ => errors.push("metadata.name: Required value".into()),
    }
    errors.extend(STRUCTURAL.iter_errors(doc).map(describe));
    if errors.is_empty()
        && let Err(failed) = Validator::new().validate(&SCHEMA, doc, None)
    {
        errors.extend(failed.iter().map(|e| {
            let path = if e.field_path.is_empty() {
                "<root>"
            } else {
                &e.field_path
            };
            format!("{path}: Invalid value: {} (rule: {})", e.message, e.rule)
        }));
    }
    if !errors.is_empty() {
        return Err(Invalid(errors));
    }
    serde_json::from_value(doc.clone()).map_err(|e| Invalid(vec![e.to_string()]))
}

/// One structural error in the API server's words: `spec.replicas: ...`.
fn describe(e: jsonschema::ValidationError<'_>) -> String {
    let path = e
        .instance_path
        .as_str()
        .trim_start_matches('/')
        .replace('/', ".");
    if let jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } = &e.kind {
        return unexpected
            .iter()
            .map(|field| match path.as_str() {
                "" => format!("unknown field \"{field}\""),
                p => format!("unknown field \"{p}.{field}\""),
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let path = if path.is_empty() { "<root>" } else { &path };
    format!("{path}: Invalid value: {e}")
}

/// Turns a Kubernetes structural schema into JSON Schema draft 4: `nullable` becomes a
/// null type, int-or-string an `anyOf`, and objects with declared properties refuse
/// others (a strict API server's unknown-field check) unless they preserve unknown fields.
fn to_json_schema(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    let nullable = obj.remove("nullable") == Some(Value::Bool(true));
    if obj.remove("x-kubernetes-int-or-string") == Some(Value::Bool(true)) {
        let mut types = vec![
            serde_json::json!({"type": "integer"}),
            serde_json::json!({"type": "string"}),
        ];
        if nullable {
            types.push(serde_json::json!({"type": "null"}));
        }
        obj.insert("anyOf".into(), Value::Array(types));
    } else if nullable && let Some(Value::String(t)) = obj.get("type").cloned() {
        obj.insert("type".into(), serde_json::json!([t, "null"]));
        // An enum must list null too, or a null value fails it.
        if let Some(Value::Array(values)) = obj.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    let preserves = obj.remove("x-kubernetes-preserve-unknown-fields") == Some(Value::Bool(true));
    if obj.contains_key("properties") && !preserves && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    // `format` is advisory in JSON Schema and k8s formats (int32, date-time) need no check here.
    obj.remove("format");
    for (key, child) in obj.iter_mut() {
        match key.as_str() {
            "properties" => child
                .as_object_mut()
                .into_iter()
                .flat_map(Map::values_mut)
                .for_each(to_json_schema),
            "items" | "additionalProperties" => to_json_schema(child),
            "anyOf" | "allOf" | "oneOf" => child
                .as_array_mut()
                .into_iter()
                .flatten()
                .for_each(to_json_schema),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(spec: Value) -> Value {
        json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "smollm", "namespace": "ml"}, "spec": spec})
    }

    fn errors(spec: Value) -> String {
        model_deployment(&doc(spec)).unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_spec_is_valid_and_typed() {
        let md = model_deployment(&doc(json!({"model": {"uri": "hf://org/name"}}))).unwrap();
        assert_eq!(md.spec.model.uri, "hf://org/name");
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let e = errors(json!({"model": {"uri": "hf://a/b", "revison": "x"}, "replica": 2}));
        assert!(e.contains(r#"unknown field "spec.model.revison""#), "{e}");
        assert!(e.contains(r#"unknown field "spec.replica""#), "{e}");
        let e = model_deployment(&json!({"apiVersion": "kandle.dev/v1alpha1",
            "kind": "ModelDeployment", "metadata": {"name": "a"}, "spec": {"model": {"uri": "hf://a/b"}},
            "extra": 1}))
        .unwrap_err()
        .to_string();
        assert!(e.contains(r#"unknown field "extra""#), "{e}");
    }

    #[test]
    fn schema_violations_name_the_field() {
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "replicas": -1}));
        assert!(e.contains("spec.replicas: Invalid value"), "{e}");
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "cache": {"volume": "disk"}}));
        assert!(e.contains("spec.cache.volume"), "{e}");
        let e = errors(json!({"model": {}}));
        assert!(e.contains("uri"), "{e}");
        let e =
            errors(json!({"model": {"uri": "hf://a/b"}, "resources": {"gpu": {"count": "two"}}}));
        assert!(e.contains("spec.resources.gpu.count"), "{e}");
    }

    #[test]
    fn cel_rules_are_enforced_with_their_messages() {
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "replicas": 2,
                              "autoscaling": {"maxReplicas": 3}}));
        assert!(e.contains("either replicas or autoscaling"), "{e}");
        let e = errors(json!({"model": {"uri": "hf://a/b"},
                              "autoscaling": {"minReplicas": 5, "maxReplicas": 3}}));
        assert!(
            e.contains("spec.autoscaling") && e.contains("minReplicas must not exceed"),
            "{e}"
        );
        // The default minReplicas (1) is applied before the rule runs, as the API server does.
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "autoscaling": {"maxReplicas": 0}}));
        assert!(e.contains("spec.autoscaling.maxReplicas"), "{e}");
        for uri in [
            "gs://bucket/x",
            "hf://only-org",
            "ftp://h/m",
            "pvc://Bad_Claim/x",
            "/models/x",
        ] {
            let e = errors(json!({"model": {"uri": uri}}));
            assert!(e.contains("uri must be hf://"), "{uri}: {e}");
        }
        for uri in [
            "hf://a/b@v1",
            "s3://bucket/prefix",
            "https://h/m.gguf",
            "pvc://models/smol",
        ] {
            model_deployment(&doc(json!({"model": {"uri": uri}}))).unwrap();
        }
        let e = errors(json!({"model": {"uri": "s3://b/p", "revision": "main"}}));
        assert!(e.contains("revision applies to hf://"), "{e}");
        let e = errors(json!({"model": {"uri": "pvc://c/p"}, "cache": {"volume": "pvc"}}));
        assert!(e.contains("pvc:// model"), "{e}");
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "cache": {"pvc": {"size": "1Gi"}}}));
        assert!(e.contains("only with volume: pvc"), "{e}");
    }

    #[test]
    fn names_that_cannot_become_child_names_are_refused() {
        for name in ["Upper", "1starts-with-digit", &"a".repeat(50)] {
            let mut d = doc(json!({"model": {"uri": "hf://a/b"}}));
            d["metadata"]["name"] = json!(name);
            let e = model_deployment(&d).unwrap_err().to_string();
            assert!(e.contains("DNS label"), "{name}: {e}");
        }
    }
}
