//! The routing table, as a pure function of what the gateway watches: every
//! ModelDeployment by the name clients send (`spec.model.servedName`), with the ready
//! endpoints of its Service's EndpointSlices.
use crate::crd::{ModelDeployment, Phase, Task};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Label the EndpointSlice controller puts on every slice, naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The port of the serving pods' Service (see `build::service`).
const PORT_NAME: &str = "http";

/// One ModelDeployment, as the gateway routes to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub namespace: String,
    pub name: String,
    /// What clients send as `model`.
    pub served: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch, for `/v1/models`.
    pub created: i64,
    /// Ready serving pods, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// Why requests cannot wait for this model: the spec or its secrets must change first.
    pub failed: Option<String>,
    /// No pods wanted: requests wait for the autoscaler to start one.
    pub scaled_to_zero: bool,
}

impl Model {
    /// Listed by `/v1/models`: it serves now or wakes on demand.
    pub fn listed(&self) -> bool {
        !self.endpoints.is_empty() || self.scaled_to_zero
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Table {
    /// By served name.
    pub models: BTreeMap<String, Arc<Model>>,
}

impl Table {
    pub fn get(&self, served: &str) -> Option<&Arc<Model>> {
        self.models.get(served)
    }
}

/// The table for these objects. Two ModelDeployments that serve the same name: the oldest
/// wins (then the one first by namespace and name), so every gateway replica agrees.
pub fn build(mds: &[Arc<ModelDeployment>], slices: &[Arc<EndpointSlice>]) -> Table {
    let mut endpoints: HashMap<(String, String), Vec<SocketAddr>> = HashMap::new();
    for slice in slices {
        let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        let key = (slice.namespace().unwrap_or_default(), service.clone());
        endpoints.entry(key).or_default().extend(ready(slice));
    }
    let mut ordered: Vec<_> = mds.iter().collect();
    ordered.sort_by_key(|md| {
        (
            md.metadata.creation_timestamp.as_ref().map(|t| t.0),
            md.namespace(),
            md.name_any(),
        )
    });
    let mut models = BTreeMap::new();
    for md in ordered {
        // Tabular models speak the Open Inference Protocol, not OpenAI's API.
        if md.metadata.deletion_timestamp.is_some() || md.spec.model.task == Some(Task::Tabular) {
            continue;
        }
        let served = md.spec.model.served_name.clone().unwrap_or(md.name_any());
        if models.contains_key(&served) {
            tracing::warn!(
                namespace = md.namespace().unwrap_or_default(),
                name = %md.name_any(),
                served,
                "another ModelDeployment already serves this name through the gateway"
            );
            continue;
        }
        let key = (md.namespace().unwrap_or_default(), md.name_any());
        let mut ready = endpoints.remove(&key).unwrap_or_default();
        ready.sort();
        ready.dedup();
        let status = md.status.as_ref();
        let phase = status.and_then(|s| s.phase);
        let failed = (phase == Some(Phase::Failed)).then(|| {
            status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .map_or_else(|| "it failed".to_string(), |c| c.message.clone())
        });
        let model = Model {
            namespace: key.0,
            name: key.1,
            served: served.clone(),
            labels: md.labels().clone(),
            created: md
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
            endpoints: ready,
            failed,
            scaled_to_zero: phase == Some(Phase::ScaledToZero),
        };
        models.insert(served, Arc::new(model));
    }
    Table { models }
}

/// The ready endpoints of one slice on the serving port. An endpoint whose `ready` is
/// unset counts as ready, as the API documents.
fn ready(slice: &EndpointSlice) -> Vec<SocketAddr> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .or_else(|| ports.first().filter(|_| ports.len() == 1))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    let Some(port) = port else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn md(name: &str, created: &str, served: Option<&str>, phase: &str) -> Arc<ModelDeployment> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created,
                             "labels": {"team": "a"}},
                "spec": {"model": {"uri": "hf://org/m", "servedName": served}},
                "status": {"phase": phase, "conditions": [
                    {"type": "Ready", "status": "False", "reason": "Rejected",
                     "message": "the model needs 3 GPUs", "lastTransitionTime": created}]},
            }))
            .unwrap(),
        )
    }

    fn slice(service: &str, port: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-x"), "namespace": "ml",
                             "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": "IPv4",
                "ports": [{"name": port, "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn routes_each_served_name_to_its_ready_endpoints() {
        let mds = [
            md("chat", "2026-01-01T00:00:00Z", Some("llama"), "Ready"),
            md("idle", "2026-01-01T00:00:00Z", None, "ScaledToZero"),
            md("broken", "2026-01-01T00:00:00Z", None, "Failed"),
        ];
        let slices = [
            slice(
                "chat",
                "http",
                json!([
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.1"]},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                ]),
            ),
            slice("chat", "http", json!([{"addresses": ["10.0.0.1"]}])),
            slice("idle", "metrics", json!([{"addresses": ["10.0.0.9"]}])),
        ];
        let table = build(&mds, &slices);
        let chat = table.get("llama").unwrap();
        assert_eq!(
            chat.endpoints,
            [
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap()
            ]
        );
        assert!(chat.listed() && chat.failed.is_none());
        assert!(table.get("chat").is_none(), "routed by served name only");
        // A lone port is the serving one whatever its name.
        let idle = table.get("idle").unwrap();
        assert_eq!(idle.endpoints, ["10.0.0.9:8080".parse().unwrap()]);
        let broken = table.get("broken").unwrap();
        assert_eq!(broken.failed.as_deref(), Some("the model needs 3 GPUs"));
        assert!(!broken.listed());
    }

    #[test]
    fn tabular_models_are_left_to_their_own_protocol() {
        let mut scoring = (*md("scoring", "2026-01-01T00:00:00Z", None, "Ready")).clone();
        scoring.spec.model.task = Some(Task::Tabular);
        let slices = [slice(
            "scoring",
            "http",
            json!([{"addresses": ["10.0.0.4"]}]),
        )];
        assert!(
            build(&[Arc::new(scoring)], &slices)
                .get("scoring")
                .is_none()
        );
    }

    #[test]
    fn the_oldest_of_two_models_serving_one_name_wins() {
        let mds = [
            md("young", "2026-02-01T00:00:00Z", Some("llama"), "Ready"),
            md("old", "2026-01-01T00:00:00Z", Some("llama"), "Ready"),
        ];
        assert_eq!(build(&mds, &[]).get("llama").unwrap().name, "old");
        let reversed = [mds[1].clone(), mds[0].clone()];
        assert_eq!(build(&mds, &[]), build(&reversed, &[]));
    }
}
