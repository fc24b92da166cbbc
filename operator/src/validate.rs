//! Checks a `ModelDeployment` as a strict API server would, offline: the CRD's structural
//! schema (types, bounds, enums, required and unknown fields) and its CEL rules. `render`
//! uses it, and so do the tests' API server and the example checks.
use crate::crd::ModelDeployment;
use kube::core::cel::Validator;
use serde_json::{Map, Value};
use std::sync::LazyLock;

/// Why a document is not a valid `ModelDeployment`: every field at fault, each with its cause.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// The CRD's openAPIV3Schema, as the API server and kube's CEL validator read it.
static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = crate::crd::definition();
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
    // The CRD bounds metadata.name; the API server checks the rest of metadata itself.
    let metadata = root
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({"type": "object"}));
    metadata["x-kubernetes-preserve-unknown-fields"] = Value::Bool(true);
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
    if api_version != Some(kandle_contract::API_VERSION) || kind != Some("ModelDeployment") {
        return Err(Invalid(vec![format!(
            "not a {} ModelDeployment (apiVersion {}, kind {})",
            kandle_contract::API_VERSION,
            api_version.unwrap_or("missing"),
            kind.unwrap_or("missing")
        )]));
    }
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => {}
        _ => errors.push("metadata.name: Required value".into()),
    }
    errors.extend(metadata_errors(doc));
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

/// What the API server checks of every object's metadata, and of the label maps the
/// children carry: a namespace is a DNS label; label and annotation keys are qualified
/// names; label values are at most 63 name characters.
fn metadata_errors(doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(ns) = doc.pointer("/metadata/namespace").and_then(Value::as_str)
        && !dns_label(ns)
    {
        errors.push(format!(
            "metadata.namespace: Invalid value: {ns:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', start and end with one, and be at most 63 characters"
        ));
    }
    let maps = [
        ("metadata.labels", "/metadata/labels", true),
        ("metadata.annotations", "/metadata/annotations", false),
        (
            "spec.scheduling.nodeSelector",
            "/spec/scheduling/nodeSelector",
            true,
        ),
        (
            "spec.service.annotations",
            "/spec/service/annotations",
            false,
        ),
    ];
    for (path, pointer, values_are_labels) in maps {
        let Some(map) = doc.pointer(pointer).and_then(Value::as_object) else {
            continue;
        };
        for (key, value) in map {
            if !qualified_name(key) {
                errors.push(format!(
                    "{path}: Invalid value: {key:?}: a key must be a name of at most 63 alphanumeric characters, '-', '_' or '.' (starting and ending alphanumeric), with an optional DNS subdomain prefix and '/'"
                ));
            }
            if values_are_labels
                && let Some(v) = value.as_str()
                && !(v.is_empty() || name_part(v))
            {
                errors.push(format!(
                    "{path}.{key}: Invalid value: {v:?}: a label value must be empty or at most 63 alphanumeric characters, '-', '_' or '.', starting and ending alphanumeric"
                ));
            }
        }
    }
    errors
}

fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `[prefix/]name` as label and annotation keys take.
fn qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    name_part(name) && prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(dns_label))
}

fn name_part(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
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
            "oci://registry.example:5000/team/models/smol:v1.2",
            "oci://ghcr.io/org/smol",
            "oci://localhost/smol@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            model_deployment(&doc(json!({"model": {"uri": uri}}))).unwrap();
        }
        for uri in [
            "oci://registry.example/Upper/case",
            "oci://registry.example/smol:",
            "oci://registry.example/smol@sha256:short",
            "oci://registry.example",
        ] {
            let e = errors(json!({"model": {"uri": uri}}));
            assert!(e.contains("oci://REGISTRY/REPOSITORY"), "{uri}: {e}");
        }
        let e = errors(json!({"model": {"uri": "hf://a/b", "oci": {"mode": "pull"}}}));
        assert!(e.contains("oci applies to oci:// models"), "{e}");
        let e = errors(
            json!({"model": {"uri": "oci://r/m", "oci": {"mode": "volume"}},
                              "cache": {"volume": "pvc"}}),
        );
        assert!(e.contains("an image volume is cached by the node"), "{e}");
        let e = errors(
            json!({"model": {"uri": "oci://r/m", "oci": {"mode": "volume"},
                                        "include": ["*.gguf"]}}),
        );
        assert!(e.contains("mounts the whole artifact"), "{e}");
        let e = errors(json!({"model": {"uri": "oci://r/m", "oci": {"mode": "disk"}}}));
        assert!(e.contains("mode"), "{e}");
        let e = errors(json!({"model": {"uri": "s3://b/p", "revision": "main"}}));
        assert!(e.contains("revision applies to hf://"), "{e}");
        let e = errors(json!({"model": {"uri": "pvc://c/p"}, "cache": {"volume": "pvc"}}));
        assert!(e.contains("pvc:// model"), "{e}");
        let e = errors(json!({"model": {"uri": "hf://a/b"}, "cache": {"pvc": {"size": "1Gi"}}}));
        assert!(e.contains("only with volume: pvc"), "{e}");
        let e = errors(json!({"model": {"uri": "hf://a/b", "task": "tabular"},
                              "resources": {"gpu": {"count": 1}}}));
        assert!(e.contains("tabular models run on CPU"), "{e}");
        model_deployment(&doc(
            json!({"model": {"uri": "s3://models/scoring", "task": "tabular"}}),
        ))
        .unwrap();
    }

    #[test]
    fn what_the_api_server_refuses_in_metadata_and_quantities_is_refused() {
        let mut bad = doc(json!({"model": {"uri": "hf://o/m"},
            "resources": {"requests": {"cpu": "abc"}, "limits": {"memory": "-5Gi"}},
            "scheduling": {"nodeSelector": {"bad key!": "v", "ok": "bad value!"}},
            "cache": {"volume": "pvc", "pvc": {"size": "20 GB"}}}));
        bad["metadata"]["namespace"] = json!("Bad NS!");
        bad["metadata"]["labels"] = json!({"-x": "1", "a/b/c": "2", "team": "ml"});
        let errors = model_deployment(&bad).unwrap_err().0.join("\n");
        for field in [
            "metadata.namespace",
            "\"-x\"",
            "\"a/b/c\"",
            "spec.resources.requests.cpu",
            "spec.resources.limits.memory",
            "spec.cache.pvc.size",
            "\"bad key!\"",
            "nodeSelector.ok",
        ] {
            assert!(errors.contains(field), "{field} not in:\n{errors}");
        }
        assert!(!errors.contains("\"team\""), "{errors}");
        let mut good = doc(json!({"model": {"uri": "hf://o/m"},
            "resources": {"requests": {"cpu": "500m", "memory": "1.5Gi"}, "limits": {"memory": 8589934592u64}},
            "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}));
        good["metadata"]["namespace"] = json!("ml-prod");
        good["metadata"]["labels"] = json!({"app.kubernetes.io/part-of": "llm", "empty": ""});
        model_deployment(&good).unwrap();
    }

    #[test]
    fn names_that_cannot_become_child_names_are_refused() {
        for name in ["Upper", "1starts-with-digit", &"a".repeat(50)] {
            let mut d = doc(json!({"model": {"uri": "hf://a/b"}}));
            d["metadata"]["name"] = json!(name);
            let e = model_deployment(&d).unwrap_err().to_string();
            // The schema bounds the length; the CEL rule says what a name must look like.
            assert!(
                e.contains("DNS label") || e.contains("longer than 49"),
                "{name}: {e}"
            );
        }
    }
}
