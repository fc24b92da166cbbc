//! The thin write layer: server-side apply with one field manager, skipped when the cluster
//! already holds what would be applied, and deletion of children no longer wanted.
use crate::build::FIELD_MANAGER;
use crate::error::Error;
use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt::Debug;

pub use kandle_contract::keys::APPLIED_HASH_ANNOTATION as APPLIED_HASH;

/// What a child kind is to this layer: a namespaced, typed Kubernetes object.
pub trait Object:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + k8s_openapi::Resource
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
{
}

impl<K> Object for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
{
}

/// Applies `desired` unless `observed` already matches it; returns whether it wrote.
pub async fn apply<K: Object>(
    client: &Client,
    desired: &K,
    observed: Option<&K>,
) -> Result<bool, Error> {
    let mut desired = desired.clone();
    let hash = hash(&desired);
    desired
        .annotations_mut()
        .insert(APPLIED_HASH.into(), hash.clone());
    if let Some(observed) = observed
        && observed.annotations().get(APPLIED_HASH) == Some(&hash)
        && contains(&to_value(observed), &to_value(&desired))
    {
        return Ok(false);
    }
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &desired.namespace().unwrap_or_default());
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(|source| Error::Api {
        verb: "apply",
        kind: <K as k8s_openapi::Resource>::KIND,
        name,
        source,
    })?;
    Ok(true)
}

/// Deletes a child; its dependants (a Job's pods) go in the background.
pub async fn delete<K: Object>(client: &Client, child: &K) -> Result<(), Error> {
    delete_named::<K>(
        client,
        &child.namespace().unwrap_or_default(),
        &child.name_any(),
    )
    .await
}

/// Deletes the child of kind `K` named `name`; one already gone is no error.
pub async fn delete_named<K: Object>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Api {
            verb: "delete",
            kind: <K as k8s_openapi::Resource>::KIND,
            name: name.to_string(),
            source,
        }),
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("Kubernetes objects are JSON")
}

fn hash<T: Serialize>(v: &T) -> String {
    hex::encode(&Sha256::digest(to_value(v).to_string().as_bytes())[..8])
}

/// Whether `have` holds every field of `want` with the same value, as the API server
/// stores what was applied: it adds defaults, writes quantities in canonical form (`1Gi`
/// for `1024Mi`), and keeps other managers' entries in lists merged by key (a sidecar's
/// container, an injected env var). It may not change or drop what was applied.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (_, Value::Null) => true,
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv)) || wv.is_null()),
        (Value::Array(h), Value::Array(w)) => match merge_key(w) {
            Some(key) => w.iter().all(|wv| {
                h.iter()
                    .any(|hv| hv.get(key) == wv.get(key) && contains(hv, wv))
            }),
            None => h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv)),
        },
        (Value::String(h), Value::String(w)) => {
            h == w
                || crate::quantity::nanos(h).is_some_and(|n| crate::quantity::nanos(w) == Some(n))
        }
        (h, w) => h == w,
    }
}

/// The key server-side apply merges a list of objects by (the Kubernetes API's
/// `x-kubernetes-list-map-keys` for the lists the operator writes: containers, env,
/// volumes by `name`, mounts by `mountPath`, ports by number); `None` for an atomic list.
fn merge_key(items: &[Value]) -> Option<&'static str> {
    ["mountPath", "containerPort", "port", "name"]
        .into_iter()
        .find(|key| !items.is_empty() && items.iter().all(|i| i.get(key).is_some()))
}

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn canonical_quantities_and_other_managers_entries_still_match() {
        let want = json!({"containers": [{"name": "server", "resources": {"limits": {"memory": "1024Mi", "cpu": "0.5"}},
            "env": [{"name": "A", "value": "1"}]}]});
        let have = json!({"containers": [
            {"name": "istio-proxy", "image": "proxy"},
            {"name": "server", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}},
             "env": [{"name": "INJECTED", "value": "x"}, {"name": "A", "value": "1"}],
             "terminationMessagePath": "/dev/termination-log"}]});
        assert!(contains(&have, &want));
        let changed = json!({"containers": [{"name": "server", "resources": {"limits": {"memory": "2Gi", "cpu": "500m"}},
            "env": [{"name": "A", "value": "1"}]}]});
        assert!(!contains(&changed, &want));
        let dropped = json!({"containers": [{"name": "server", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}},
            "env": [{"name": "B", "value": "1"}]}]});
        assert!(!contains(&dropped, &want));
        // Lists without a merge key (args) stay exact.
        assert!(!contains(
            &json!({"args": ["a", "b"]}),
            &json!({"args": ["a"]})
        ));
    }

    #[test]
    fn server_defaults_are_allowed_but_changed_or_missing_fields_are_not() {
        let want = json!({"spec": {"replicas": 2, "ports": [{"port": 80}]}});
        let have = json!({"spec": {"replicas": 2, "ports": [{"port": 80, "protocol": "TCP"}],
                                   "revisionHistoryLimit": 10}});
        assert!(contains(&have, &want));
        assert!(!contains(
            &json!({"spec": {"replicas": 3, "ports": [{"port": 80}]}}),
            &want
        ));
        assert!(!contains(
            &json!({"spec": {"replicas": 2, "ports": []}}),
            &want
        ));
        assert!(!contains(
            &json!({"spec": {"ports": [{"port": 80}]}}),
            &want
        ));
    }
}
