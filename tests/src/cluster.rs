//! What the rest of a cluster would do, simulated over the emulated API server's store:
//! the Deployment controller (pods for the current template, old ones removed once the
//! new ones are ready), the scheduler (a cluster-wide count of free `nvidia.com/gpu`),
//! the Job controller, and the kubelet running the pull and the server. A pull of a URI
//! containing `does-not-exist` fails as a 404 from the hub would.
use crate::apiserver::ApiServer;
use crate::apiserver::store::{Part, Store, kind, now};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tokio::sync::Notify;

pub const PULLED_REVISION: &str = "0123456789abcdef0123456789abcdef01234567";
pub const PULLED_BYTES: i64 = 269_060_552;

#[derive(Clone)]
pub struct Cluster {
    store: Arc<Store>,
    /// GPUs in the whole cluster; negative means unlimited.
    gpus: Arc<AtomicI64>,
    names: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl Cluster {
    /// Starts simulating; it runs until the test's runtime ends.
    pub fn start(server: &ApiServer) -> Self {
        let cluster = Self {
            store: server.store().clone(),
            gpus: Arc::new(AtomicI64::new(-1)),
            names: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(Notify::new()),
        };
        let sim = cluster.clone();
        let mut events = sim.store.subscribe();
        tokio::spawn(async move {
            sim.sync_all();
            loop {
                // What changed decides what to look at, so a large cluster stays cheap.
                let mut touched = Vec::new();
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(e) => touched.push(e),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            sim.sync_all();
                            continue;
                        }
                        Err(_) => return,
                    },
                    () = sim.wake.notified() => {
                        sim.sync_all();
                        continue;
                    }
                }
                while let Ok(e) = events.try_recv() {
                    touched.push(e);
                }
                sim.sync_touched(&touched);
            }
        });
        cluster
    }

    /// GPUs the scheduler may hand out, across all nodes.
    pub fn set_gpus(&self, n: i64) {
        self.gpus.store(n, Ordering::SeqCst);
        // Pending pods may fit now.
        self.wake.notify_one();
    }

    /// Syncs the owners of what changed: a Deployment or Job itself, or a pod's owner.
    /// A new secret may unblock any pod, so it syncs everything.
    fn sync_touched(&self, events: &[crate::apiserver::store::WatchEvent]) {
        let mut owners = std::collections::BTreeSet::new();
        for e in events {
            let ns = e.object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match e.plural {
                "deployments" | "jobs" => {
                    owners.insert((
                        e.plural,
                        ns,
                        e.object["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ));
                }
                "pods" => {
                    for r in e.object["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        let plural = if r["kind"] == "Job" {
                            "jobs"
                        } else {
                            "deployments"
                        };
                        owners.insert((
                            plural,
                            ns.clone(),
                            r["name"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
                "secrets" => return self.sync_all(),
                _ => {}
            }
        }
        for (plural, ns, name) in owners {
            if let Some(owner) = self.store.get(kind(plural).unwrap(), &ns, &name) {
                match plural {
                    "jobs" => self.sync_job(&owner),
                    _ => self.sync_deployment(&owner),
                }
            }
        }
    }

    fn sync_all(&self) {
        let deployments = kind("deployments").unwrap();
        for d in self.store.list(deployments, None, |_| true).0 {
            self.sync_deployment(&d);
        }
        let jobs = kind("jobs").unwrap();
        for j in self.store.list(jobs, None, |_| true).0 {
            self.sync_job(&j);
        }
    }

    fn owned(&self, plural: &str, owner: &Value) -> Vec<Value> {
        let uid = owner["metadata"]["uid"].clone();
        self.store
            .list(
                kind(plural).unwrap(),
                owner["metadata"]["namespace"].as_str(),
                |o| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|r| r["uid"] == uid))
                },
            )
            .0
    }

    fn sync_deployment(&self, d: &Value) {
        let pods_kind = kind("pods").unwrap();
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let template = &d["spec"]["template"];
        let hash = hex::encode(&Sha256::digest(template.to_string().as_bytes())[..4]);
        let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let pods = self.owned("pods", d);
        let (new, old): (Vec<Value>, Vec<Value>) = pods
            .into_iter()
            .partition(|p| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str());
        for _ in new.len() as i64..want {
            let name = format!(
                "{}-{hash}-{}",
                d["metadata"]["name"].as_str().unwrap_or_default(),
                self.names.fetch_add(1, Ordering::SeqCst)
            );
            let mut labels = template["metadata"]["labels"].clone();
            labels["pod-template-hash"] = json!(hash);
            let pod = json!({
                "metadata": {"name": name, "labels": labels, "ownerReferences": [owner_ref(d, "apps/v1", "Deployment")]},
                "spec": template["spec"],
                "status": {"phase": "Pending"},
            });
            let _ = self.store.create(pods_kind, &ns, pod);
        }
        for extra in new.iter().skip(want.max(0) as usize) {
            let _ = self.store.delete(
                pods_kind,
                &ns,
                extra["metadata"]["name"].as_str().unwrap_or_default(),
            );
        }
        // The kubelet and scheduler: pending pods start if their GPUs fit.
        for pod in self.owned("pods", d) {
            // Pods waiting for GPUs or a secret are tried again; a failed pull stays failed.
            let waiting =
                pod["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"].as_str();
            if pod["status"]["phase"] == "Pending"
                && waiting.is_none_or(|r| r == "CreateContainerConfigError")
            {
                let status = self.run_pod(&pod);
                let _ = self.store.update(
                    pods_kind,
                    &ns,
                    pod["metadata"]["name"].as_str().unwrap(),
                    json!({"status": status}),
                    Part::Status,
                    None,
                );
            }
        }
        let pods = self.owned("pods", d);
        let ready = |p: &Value| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        };
        let current: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str())
            .collect();
        let current_ready = current.iter().filter(|p| ready(p)).count() as i64;
        if current_ready >= want {
            for p in &old {
                let _ = self.store.delete(
                    pods_kind,
                    &ns,
                    p["metadata"]["name"].as_str().unwrap_or_default(),
                );
            }
        }
        let pods = self.owned("pods", d);
        let ready_count = pods.iter().filter(|p| ready(p)).count() as i64;
        let status = json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": pods.len(),
            "updatedReplicas": current.len(),
            "readyReplicas": ready_count,
            "availableReplicas": ready_count,
            "conditions": [
                {"type": "Available", "status": if ready_count >= want { "True" } else { "False" }},
                {"type": "Progressing", "status": "True", "reason": if current_ready >= want { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
            ],
        });
        let _ = self.store.update(
            kind("deployments").unwrap(),
            &ns,
            d["metadata"]["name"].as_str().unwrap(),
            json!({"status": status}),
            Part::Status,
            None,
        );
    }

    /// What the kubelet reports for a pod: unschedulable, a failed pull, or serving.
    fn run_pod(&self, pod: &Value) -> Value {
        let spec = &pod["spec"];
        let wants = gpus(spec);
        let capacity = self.gpus.load(Ordering::SeqCst);
        if wants > 0 && capacity >= 0 {
            let used: i64 = self
                .store
                .list(kind("pods").unwrap(), None, |p| {
                    p["status"]["phase"] == "Running"
                })
                .0
                .iter()
                .map(|p| gpus(&p["spec"]))
                .sum();
            if capacity - used < wants {
                return json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."}]});
            }
        }
        let pull = spec["initContainers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "pull"));
        let ip = self.names.fetch_add(1, Ordering::SeqCst);
        let mut status = json!({"phase": "Running", "podIP": format!("10.1.{}.{}", ip / 250, ip % 250 + 1),
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]});
        if let Some(pull) = pull {
            if let Some(secret) = self.missing_secret(pod, pull) {
                status["conditions"][1]["status"] = json!("False");
                status["phase"] = json!("Pending");
                status["initContainerStatuses"] = json!([{"name": "pull", "image": pull["image"], "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError",
                    "message": format!("secret \"{secret}\" not found")}}}]);
                return status;
            }
            let (state, failed) = pull_outcome(pull);
            if failed {
                status["conditions"][1]["status"] = json!("False");
                status["initContainerStatuses"] = json!([{"name": "pull", "image": pull["image"], "imageID": "", "ready": false,
                    "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"}},
                    "lastState": state}]);
                status["phase"] = json!("Pending");
                return status;
            }
            status["initContainerStatuses"] = json!([{"name": "pull", "image": pull["image"], "imageID": "", "ready": true,
                "restartCount": 0, "state": state}]);
        }
        status["containerStatuses"] = json!([{"name": "server", "image": spec["containers"][0]["image"], "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {"startedAt": now()}}}]);
        status
    }

    /// A secret the container takes its environment from that does not exist.
    fn missing_secret(&self, pod: &Value, container: &Value) -> Option<String> {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        container["envFrom"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["secretRef"]["name"].as_str())
            .find(|name| self.store.get(kind("secrets").unwrap(), ns, name).is_none())
            .map(str::to_string)
    }

    fn sync_job(&self, job: &Value) {
        let pods_kind = kind("pods").unwrap();
        let ns = job["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = job["metadata"]["name"].as_str().unwrap_or_default();
        if self.owned("pods", job).is_empty() {
            let template = &job["spec"]["template"];
            let mut labels = template["metadata"]["labels"].clone();
            labels["batch.kubernetes.io/job-name"] = json!(name);
            let pull = &template["spec"]["containers"][0];
            let (state, failed) = pull_outcome(pull);
            let pod = json!({
                "metadata": {"name": format!("{name}-{}", self.names.fetch_add(1, Ordering::SeqCst)), "labels": labels,
                             "ownerReferences": [owner_ref(job, "batch/v1", "Job")]},
                "spec": template["spec"],
                "status": {"phase": if failed { "Failed" } else { "Succeeded" },
                           "containerStatuses": [{"name": "pull", "image": pull["image"], "imageID": "", "ready": false,
                                                  "restartCount": 0, "state": state}]},
            });
            let _ = self.store.create(pods_kind, &ns, pod);
        }
        let failed = self
            .owned("pods", job)
            .iter()
            .any(|p| p["status"]["phase"] == "Failed");
        let condition = if failed { "Failed" } else { "Complete" };
        let status = json!({"conditions": [{"type": condition, "status": "True"}], "succeeded": i32::from(!failed), "failed": i32::from(failed)});
        let _ = self.store.update(
            kind("jobs").unwrap(),
            &ns,
            name,
            json!({"status": status}),
            Part::Status,
            None,
        );
    }
}

/// `nvidia.com/gpu` a pod spec's containers ask for.
fn gpus(spec: &Value) -> i64 {
    spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            c["resources"]["limits"]["nvidia.com/gpu"]
                .as_str()?
                .parse::<i64>()
                .ok()
        })
        .sum()
}

/// The pull container's terminated state with its report, and whether it failed.
fn pull_outcome(pull: &Value) -> (Value, bool) {
    let uri = pull["args"]
        .as_array()
        .and_then(|a| {
            let i = a.iter().position(|x| x == "--model")?;
            a.get(i + 1)?.as_str()
        })
        .unwrap_or_default();
    if uri.contains("does-not-exist") {
        let report =
            json!({"error": format!("{uri}: not found (404)"), "transient": false}).to_string();
        (
            json!({"terminated": {"exitCode": 3, "reason": "Error", "message": report, "finishedAt": now()}}),
            true,
        )
    } else {
        let report =
            json!({"revision": PULLED_REVISION, "sizeBytes": PULLED_BYTES, "files": 6}).to_string();
        (
            json!({"terminated": {"exitCode": 0, "reason": "Completed", "message": report, "finishedAt": now()}}),
            false,
        )
    }
}

fn owner_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true})
}
