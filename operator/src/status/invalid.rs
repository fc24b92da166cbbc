//! The status of a ModelDeployment that does not decode: `Failed`, with the validator's
//! words in its conditions, written once per generation.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

/// The status patch for the raw object `raw` that fails with `message`; `None` when its
/// status already says so for its generation.
pub fn patch(raw: &Value, message: &str, now: &Time) -> Option<Value> {
    let generation = &raw["metadata"]["generation"];
    let conditions = raw["status"]["conditions"].as_array();
    let reported = conditions.is_some_and(|cs| {
        cs.iter().any(|c| {
            c["type"] == "Ready" && c["reason"] == "InvalidSpec" && c["message"] == message
        })
    });
    if reported && raw["status"]["observedGeneration"] == *generation {
        return None;
    }
    let condition = |type_: &str, status: &str| {
        json!({
            "type": type_, "status": status, "reason": "InvalidSpec", "message": message,
            "observedGeneration": generation, "lastTransitionTime": now,
        })
    };
    Some(json!({
        "apiVersion": kandle_contract::API_VERSION, "kind": "ModelDeployment",
        "status": {
            "observedGeneration": generation,
            "phase": "Failed",
            "conditions": [condition("Ready", "False"), condition("Degraded", "True")],
        },
    }))
}
