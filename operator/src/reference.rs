//! The ModelDeployment reference (`docs/modeldeployment.md`), written from the CRD's own
//! schema so it says exactly what `kubectl explain` says; a test keeps the file current.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray,
};

/// Fields whose type is Kubernetes' own: described by `kubectl explain`, not repeated here.
const EMBEDDED: &[&str] = &[
    "spec.scheduling.affinity",
    "spec.scheduling.tolerations",
    "spec.server.env",
    "status.conditions",
];

pub fn markdown() -> String {
    let crd = crate::crd::definition();
    let version = &crd.spec.versions[0];
    let root = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    let mut out = format!(
        "# ModelDeployment reference\n\n\
         `{}/{}`, kind `{}`, short name `{}`. Generated from the CRD by \
         `kandle-operator reference`; `kubectl explain modeldeployment.spec` says the same.\n",
        crd.spec.group,
        version.name,
        crd.spec.names.kind,
        crd.spec
            .names
            .short_names
            .as_deref()
            .unwrap_or_default()
            .join(", "),
    );
    for part in ["spec", "status"] {
        let schema = &root.properties.as_ref().expect("properties")[part];
        out += &format!(
            "\n## {part}\n\n{}{}\n",
            one_line(schema.description.as_deref()),
            rules(schema)
        );
        out += "\n| Field | Type | Default | Description |\n| --- | --- | --- | --- |\n";
        fields(part, schema, &mut out);
    }
    out
}

/// The schema of an object, or of an array's items.
fn object_of(schema: &JSONSchemaProps) -> (&JSONSchemaProps, &'static str) {
    match &schema.items {
        Some(JSONSchemaPropsOrArray::Schema(item)) => (item.as_ref(), "[]"),
        _ => (schema, ""),
    }
}

/// The CEL rules' messages on an object, as a sentence.
fn rules(schema: &JSONSchemaProps) -> String {
    let messages: Vec<_> = (object_of(schema)
        .0
        .x_kubernetes_validations
        .iter()
        .flatten())
    .filter_map(|r| r.message.as_deref())
    .collect();
    if messages.is_empty() {
        return String::new();
    }
    format!(" Rules: {}.", messages.join("; "))
}

/// One row per field below `schema`, depth first in the schema's (alphabetical) order.
fn fields(path: &str, schema: &JSONSchemaProps, out: &mut String) {
    let (object, suffix) = object_of(schema);
    let Some(properties) = &object.properties else {
        return;
    };
    let required = object.required.clone().unwrap_or_default();
    for (name, field) in properties {
        let field_path = format!("{path}{suffix}.{name}");
        let mut description = one_line(field.description.as_deref());
        if required.contains(name) {
            description = format!("**Required.** {description}");
        }
        if let Some(values) = &field.enum_ {
            let values: Vec<_> = values
                .iter()
                .map(|v| format!("`{}`", plain(&v.0)))
                .collect();
            description += &format!(" One of {}.", values.join(", "));
        }
        match (field.minimum, field.maximum) {
            (Some(min), Some(max)) => description += &format!(" From {min} to {max}."),
            (Some(min), None) => description += &format!(" At least {min}."),
            (None, Some(max)) => description += &format!(" At most {max}."),
            _ => {}
        }
        description += &rules(field);
        let embedded = EMBEDDED.contains(&field_path.as_str());
        if embedded {
            description += &format!(" See `kubectl explain modeldeployment.{field_path}`.");
        }
        let default = field
            .default
            .as_ref()
            .map(|d| format!("`{}`", plain(&d.0)))
            .unwrap_or_default();
        *out += &format!(
            "| `{field_path}` | {} | {} | {} |\n",
            type_of(field),
            escape(&default),
            escape(&description)
        );
        if !embedded {
            fields(&field_path, field, out);
        }
    }
}

fn type_of(schema: &JSONSchemaProps) -> String {
    if schema.x_kubernetes_int_or_string == Some(true) {
        return "int or string".into();
    }
    match (schema.type_.as_deref(), &schema.items) {
        (Some("array"), Some(JSONSchemaPropsOrArray::Schema(item))) => {
            format!("[]{}", type_of(item))
        }
        (Some("object"), _) if schema.properties.is_none() => "map".into(),
        (Some(t), _) => t.into(),
        (None, _) => "any".into(),
    }
}

/// A JSON value as a user writes it in YAML: strings without their quotes.
fn plain(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_string)
}

fn one_line(text: Option<&str>) -> String {
    text.unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}
