//! What a real API server does to an object before storing it, for the kinds the operator
//! writes: fill in defaults and write quantities in canonical form. An operator that
//! compares what it applied with what it reads back meets these here, as on a cluster.
//!
//! The defaults, from the API reference of Kubernetes 1.37 (the version k8s-openapi's
//! `latest` feature targets), for fields the operator leaves out:
//! - Deployment: `replicas` 1, `strategy` RollingUpdate with `maxSurge`/`maxUnavailable`
//!   25%, `revisionHistoryLimit` 10, `progressDeadlineSeconds` 600.
//! - Job: `backoffLimit` 6, `completions` and `parallelism` 1, `completionMode`
//!   NonIndexed, `suspend` false, `podReplacementPolicy` TerminatingOrFailed, and the
//!   `batch.kubernetes.io/controller-uid` and `job-name` labels on its pods and selector.
//! - PodSpec (in Deployments and Jobs): `restartPolicy` Always, `terminationGracePeriodSeconds`
//!   30, `dnsPolicy` ClusterFirst, `schedulerName` default-scheduler, `securityContext` {};
//!   each container's `terminationMessagePath` /dev/termination-log,
//!   `terminationMessagePolicy` File, `imagePullPolicy` (Always for `:latest` or no tag,
//!   else IfNotPresent), port `protocol` TCP, probes' `timeoutSeconds` 1, `periodSeconds`
//!   10, `successThreshold` 1, `failureThreshold` 3 and `httpGet.scheme` HTTP; secret and
//!   configMap volumes' `defaultMode` 0644.
//! - Service: `type` ClusterIP, `sessionAffinity` None, `ipFamilies` [IPv4],
//!   `ipFamilyPolicy` SingleStack, `internalTrafficPolicy` Cluster, an allocated
//!   `clusterIP`/`clusterIPs`, port `protocol` TCP and `targetPort` = `port`.
//! - PersistentVolumeClaim: `volumeMode` Filesystem. NetworkPolicy: `policyTypes` [Ingress]
//!   and port `protocol` TCP.
//! - Quantities anywhere under `resources` (requests, limits), `sizeLimit` and
//!   PodDisruptionBudget's `maxUnavailable`/`minAvailable` stay as given except that
//!   quantities are canonical (`1024Mi` is stored as `1Gi`, `0.5` as `500m`).
//!
//! Not emulated: admission plugins (a default StorageClass, LimitRanges), the defaults of
//! fields the operator always sets itself, and server-side apply's conflicts.
use super::store::Kind;
use serde_json::{Value, json};

/// Fills in `obj`'s defaults; `uid` is the object's, for Jobs' selectors.
pub fn apply(kind: &Kind, obj: &mut Value) {
    let defaulted = [
        "Deployment",
        "Job",
        "Service",
        "PersistentVolumeClaim",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ];
    if !defaulted.contains(&kind.kind) {
        return;
    }
    let uid = obj["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec = &mut obj["spec"];
    match kind.kind {
        "Deployment" => {
            default(spec, "replicas", json!(1));
            default(
                spec,
                "strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
            );
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            pod_spec(&mut spec["template"]["spec"]);
        }
        "Job" => {
            for (field, value) in [
                ("backoffLimit", json!(6)),
                ("completions", json!(1)),
                ("parallelism", json!(1)),
                ("completionMode", json!("NonIndexed")),
                ("suspend", json!(false)),
                ("podReplacementPolicy", json!("TerminatingOrFailed")),
            ] {
                default(spec, field, value);
            }
            let name = obj["metadata"]["name"].clone();
            let spec = &mut obj["spec"];
            let labels = json!({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                "batch.kubernetes.io/job-name": name, "job-name": name});
            default(
                spec,
                "selector",
                json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
            );
            let template_labels = &mut spec["template"]["metadata"]["labels"];
            for (k, v) in labels.as_object().expect("labels") {
                default(template_labels, k, v.clone());
            }
            pod_spec(&mut spec["template"]["spec"]);
        }
        "Service" => {
            default(spec, "type", json!("ClusterIP"));
            default(spec, "sessionAffinity", json!("None"));
            default(spec, "ipFamilies", json!(["IPv4"]));
            default(spec, "ipFamilyPolicy", json!("SingleStack"));
            default(spec, "internalTrafficPolicy", json!("Cluster"));
            let ip = cluster_ip(&uid);
            default(spec, "clusterIP", json!(ip));
            default(spec, "clusterIPs", json!([ip]));
            for port in spec["ports"].as_array_mut().into_iter().flatten() {
                default(port, "protocol", json!("TCP"));
                let number = port["port"].clone();
                default(port, "targetPort", number);
            }
        }
        "PersistentVolumeClaim" => default(spec, "volumeMode", json!("Filesystem")),
        "NetworkPolicy" => {
            default(spec, "policyTypes", json!(["Ingress"]));
            for rule in spec["ingress"].as_array_mut().into_iter().flatten() {
                for port in rule["ports"].as_array_mut().into_iter().flatten() {
                    default(port, "protocol", json!("TCP"));
                }
            }
        }
        _ => {}
    }
    canonical_quantities(obj, false);
}

fn pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            container(c);
        }
    }
    for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
        for source in ["secret", "configMap"] {
            if volume[source].is_object() {
                default(&mut volume[source], "defaultMode", json!(0o644));
            }
        }
    }
}

fn container(c: &mut Value) {
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    let image = c["image"].as_str().unwrap_or_default();
    let latest = image
        .rsplit('/')
        .next()
        .is_none_or(|last| !last.contains(':'))
        || image.ends_with(":latest");
    default(
        c,
        "imagePullPolicy",
        json!(if latest { "Always" } else { "IfNotPresent" }),
    );
    default(c, "resources", json!({}));
    for port in c["ports"].as_array_mut().into_iter().flatten() {
        default(port, "protocol", json!("TCP"));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let probe = &mut c[probe];
        if !probe.is_object() {
            continue;
        }
        for (field, value) in [
            ("timeoutSeconds", 1),
            ("periodSeconds", 10),
            ("successThreshold", 1),
            ("failureThreshold", 3),
        ] {
            default(probe, field, json!(value));
        }
        if probe["httpGet"].is_object() {
            default(&mut probe["httpGet"], "scheme", json!("HTTP"));
        }
    }
    // Indexing made these `null` where the object had none.
    if let Some(obj) = c.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
}

/// Sets `field` unless present (indexing a missing key of a JSON object inserts null).
fn default(obj: &mut Value, field: &str, value: Value) {
    if let Some(map) = obj.as_object_mut() {
        let slot = map.entry(field).or_insert(Value::Null);
        if slot.is_null() {
            *slot = value;
        }
    }
}

/// Quantity strings in canonical form wherever a quantity is stored.
fn canonical_quantities(v: &mut Value, in_quantities: bool) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            for (k, child) in map.iter_mut() {
                let quantities = in_quantities
                    || matches!(k.as_str(), "requests" | "limits" | "sizeLimit" | "capacity");
                canonical_quantities(child, quantities);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| canonical_quantities(i, in_quantities)),
        Value::String(s) if in_quantities => {
            if let Some(c) = kandle_operator::quantity::canonical(s) {
                *s = c;
            }
        }
        _ => {}
    }
}

/// A stable address from the Service's uid, in the usual 10.96.0.0/12 range.
fn cluster_ip(uid: &str) -> String {
    let h = uid
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("10.96.{}.{}", (h >> 8) % 256, h % 254 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::store::kind;

    #[test]
    fn deployments_come_back_defaulted_with_canonical_quantities() {
        let mut d = json!({"metadata": {"name": "m", "uid": "u"}, "spec": {"template": {"spec": {
            "containers": [{"name": "s", "image": "kandle-server:1", "ports": [{"containerPort": 8080}],
                "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}}}],
            "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "20480Mi"}}]}}}});
        apply(kind("deployments").unwrap(), &mut d);
        let spec = &d["spec"];
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["dnsPolicy"], "ClusterFirst");
        let c = &pod["containers"][0];
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "500m", "memory": "1Gi"})
        );
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(c["readinessProbe"]["periodSeconds"], 10);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert_eq!(pod["volumes"][0]["emptyDir"]["sizeLimit"], "20Gi");
    }
}
