//! What the rest of a cluster would do, simulated over the emulated API server's store:
//! the Deployment controller (rolling updates within maxSurge and maxUnavailable, and the
//! progress deadline), the scheduler (a cluster-wide count of free `nvidia.com/gpu`),
//! the Job controller, and the kubelet running the pull and the server. A pull of a URI
//! containing `does-not-exist` fails as a 404 from the hub would; a server image
//! containing `crash` crash-loops. The cluster is one node: a pull into a hostPath folder
//! that a pull filled before finds the model there and fetches nothing, as
//! `kandle-server pull` does (its marker; tested in `server/tests/pull.rs`).
use crate::apiserver::ApiServer;
use crate::apiserver::store::{Part, Store, kind, now};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

pub const PULLED_REVISION: &str = "0123456789abcdef0123456789abcdef01234567";
pub const PULLED_BYTES: i64 = 269_060_552;
/// `kandle-server pull`'s exit code when its credentials Secret does not exist.
const EXIT_MISSING_SECRET: i64 = kandle_contract::pull::EXIT_MISSING_SECRET as i64;

#[derive(Clone)]
pub struct Cluster {
    store: Arc<Store>,
    /// GPUs in the whole cluster; negative means unlimited.
    gpus: Arc<AtomicI64>,
    names: Arc<AtomicU64>,
    wake: Arc<Notify>,
    /// One simulated second (deadlines are in seconds): shorter in tests of deadlines.
    second: Duration,
    /// Per Deployment, the last rollout progress seen and when.
    progress: Arc<Mutex<HashMap<(String, String), Progress>>>,
    /// The node's hostPath folders that hold a pulled model.
    host_models: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Cluster {
    /// Starts simulating; it runs until the test's runtime ends.
    pub fn start(server: &ApiServer) -> Self {
        Self::start_with_second(server, Duration::from_secs(1))
    }

    /// Starts simulating with `second` as the length of a second in deadlines.
    pub fn start_with_second(server: &ApiServer, second: Duration) -> Self {
        let cluster = Self {
            store: server.store().clone(),
            gpus: Arc::new(AtomicI64::new(-1)),
            names: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(Notify::new()),
            second,
            progress: Arc::new(Mutex::new(HashMap::new())),
            host_models: Arc::default(),
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
        let name = d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let template = &d["spec"]["template"];
        let hash = hex::encode(&Sha256::digest(template.to_string().as_bytes())[..4]);
        let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let rolling = &d["spec"]["strategy"]["rollingUpdate"];
        let surge = resolve(&rolling["maxSurge"], want, true);
        let unavailable = match resolve(&rolling["maxUnavailable"], want, false) {
            // The API server refuses both at zero; the controller would never progress.
            0 if surge == 0 => 1,
            n => n,
        };
        let is_new = |p: &Value| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str();
        let delete = |p: &Value| {
            let _ = self.store.delete(
                pods_kind,
                &ns,
                p["metadata"]["name"].as_str().unwrap_or_default(),
            );
        };

        // New pods, within the surge; extra ones (a scale-down) removed.
        let pods = self.owned("pods", d);
        let new = pods.iter().filter(|p| is_new(p)).count() as i64;
        let room = want + surge - pods.len() as i64;
        for _ in 0..(want - new).min(room).max(0) {
            let pod_name = format!(
                "{name}-{hash}-{}",
                self.names.fetch_add(1, Ordering::SeqCst)
            );
            let mut labels = template["metadata"]["labels"].clone();
            labels["pod-template-hash"] = json!(hash);
            let pod = json!({
                "metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner_ref(d, "apps/v1", "Deployment")]},
                "spec": template["spec"],
                "status": {"phase": "Pending"},
            });
            let _ = self.store.create(pods_kind, &ns, pod);
        }
        for extra in pods.iter().filter(|p| is_new(p)).skip(want.max(0) as usize) {
            delete(extra);
        }

        // The kubelet and scheduler: pending pods start if their GPUs fit.
        for pod in self.owned("pods", d) {
            // Pods waiting for GPUs or for a volume to mount are tried again, and so is a pull
            // that waited for its secret once the secret exists; other failed pulls fail the
            // same way again.
            let pull = &pod["status"]["initContainerStatuses"][0];
            let waiting = pull["state"]["waiting"]["reason"].as_str();
            let secret_came = pull["lastState"]["terminated"]["exitCode"] == EXIT_MISSING_SECRET
                && self
                    .missing_secret(
                        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                        &pod["spec"]["initContainers"][0],
                    )
                    .is_none();
            let mounting = waiting == Some("PodInitializing")
                || pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "ContainerCreating";
            if pod["status"]["phase"] == "Pending" && (waiting.is_none() || mounting || secret_came)
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

        // Old pods go as far as maxUnavailable allows: unready ones first, then ready ones
        // while enough pods stay ready (Kubernetes' reconcileOldReplicaSets).
        let pods = self.owned("pods", d);
        let (new, old): (Vec<&Value>, Vec<&Value>) = pods.iter().partition(|p| is_new(p));
        let new_ready = new.iter().filter(|p| ready(p)).count() as i64;
        let min_available = want - unavailable;
        let max_down = pods.len() as i64 - min_available - (new.len() as i64 - new_ready);
        let mut removed = 0;
        if max_down > 0 {
            for p in old.iter().filter(|p| !ready(p)).take(max_down as usize) {
                delete(p);
                removed += 1;
            }
            let available = pods.iter().filter(|p| ready(p)).count() as i64;
            let down = (available - min_available).min(max_down - removed).max(0);
            for p in old.iter().filter(|p| ready(p)).take(down as usize) {
                delete(p);
            }
        }

        let pods = self.owned("pods", d);
        let updated = pods.iter().filter(|p| is_new(p)).count() as i64;
        let ready_count = pods.iter().filter(|p| ready(p)).count() as i64;
        let updated_ready = pods.iter().filter(|p| is_new(p) && ready(p)).count() as i64;
        let complete = updated_ready >= want && pods.len() as i64 == updated;
        let progressing = if complete {
            json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"})
        } else if self.deadline_passed(d, &hash, (updated, updated_ready, pods.len())) {
            json!({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                   "message": format!("ReplicaSet \"{name}-{hash}\" has timed out progressing.")})
        } else {
            json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"})
        };
        let status = json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": pods.len(),
            "updatedReplicas": updated,
            "readyReplicas": ready_count,
            "availableReplicas": ready_count,
            "conditions": [
                {"type": "Available", "status": if ready_count >= min_available { "True" } else { "False" }},
                progressing,
            ],
        });
        let _ = self.store.update(
            kind("deployments").unwrap(),
            &ns,
            &name,
            json!({"status": status}),
            Part::Status,
            None,
        );
    }

    /// Whether a rollout to `hash` has gone `progressDeadlineSeconds` (in simulated
    /// seconds) without progress: no change in its pod counts. A pending deadline wakes the
    /// simulation when it falls due.
    fn deadline_passed(&self, d: &Value, hash: &str, counts: (i64, i64, usize)) -> bool {
        let key = (
            d["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let deadline =
            self.second * d["spec"]["progressDeadlineSeconds"].as_u64().unwrap_or(600) as u32;
        let progress = format!("{hash} {counts:?}");
        let mut seen = self.progress.lock().unwrap();
        match seen.get(&key) {
            Some((p, at)) if *p == progress => at.elapsed() >= deadline,
            _ => {
                seen.insert(key, (progress, std::time::Instant::now()));
                let wake = self.wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(deadline + Duration::from_millis(10)).await;
                    wake.notify_one();
                });
                false
            }
        }
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
        // A required Secret volume that does not exist: the kubelet cannot mount it and
        // the pod waits in ContainerCreating, with nothing in its status to say why.
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let unmountable = spec["volumes"].as_array().into_iter().flatten().any(|v| {
            v["secret"]["optional"] != true
                && v["secret"]["secretName"].as_str().is_some_and(|name| {
                    self.store.get(kind("secrets").unwrap(), ns, name).is_none()
                })
        });
        if unmountable {
            // The first container the pod would start waits: its pull, else its server.
            let (list, reason, first) = match spec["initContainers"].get(0) {
                Some(c) => ("initContainerStatuses", "PodInitializing", c),
                None => (
                    "containerStatuses",
                    "ContainerCreating",
                    &spec["containers"][0],
                ),
            };
            let mut status = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]});
            status[list] = json!([{"name": first["name"], "image": first["image"], "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason}}}]);
            return status;
        }
        let pull = spec["initContainers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "pull"));
        let ip = self.names.fetch_add(1, Ordering::SeqCst);
        let mut status = json!({"phase": "Running", "podIP": format!("10.1.{}.{}", ip / 250, ip % 250 + 1),
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]});
        if let Some(pull) = pull {
            let (state, failed) = self.pull_outcome(ns, pull, spec);
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
        let image = spec["containers"][0]["image"].as_str().unwrap_or_default();
        if image.contains("crash") {
            status["conditions"][1]["status"] = json!("False");
            status["containerStatuses"] = json!([{"name": "server", "image": image, "imageID": "", "ready": false,
                "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "error: this image cannot serve the model", "finishedAt": now()}}}]);
            return status;
        }
        status["containerStatuses"] = json!([{"name": "server", "image": image, "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {"startedAt": now()}}}]);
        status
    }

    /// The pull's `--credentials-secret`, when it does not exist: its volume is mounted
    /// `optional`, so the pull runs and reports it.
    fn missing_secret(&self, ns: &str, pull: &Value) -> Option<String> {
        arg(pull, "--credentials-secret")
            .filter(|name| self.store.get(kind("secrets").unwrap(), ns, name).is_none())
            .map(str::to_string)
    }

    /// The pull container's terminated state with its report, and whether it failed.
    fn pull_outcome(&self, ns: &str, pull: &Value, spec: &Value) -> (Value, bool) {
        let uri = arg(pull, "--model").unwrap_or_default();
        let (code, report) = if let Some(secret) = self.missing_secret(ns, pull) {
            let error = format!(
                "secret \"{secret}\" not found or empty (nothing mounted after 60 s): create it in the ModelDeployment's namespace; the pull is retried"
            );
            (
                EXIT_MISSING_SECRET,
                json!({"error": error, "transient": false}),
            )
        } else if uri.contains("does-not-exist") {
            (
                3,
                json!({"error": format!("{uri}: not found (404)"), "transient": false}),
            )
        } else {
            let found = host_folder(pull, spec)
                .is_some_and(|folder| !self.host_models.lock().unwrap().insert(folder));
            let fetched = if found { 0 } else { PULLED_BYTES };
            let pulled = json!({"source": uri, "revision": PULLED_REVISION, "pulledBytes": fetched,
                                "sizeBytes": PULLED_BYTES, "files": 6});
            (0, pulled)
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        let state = json!({"terminated": {"exitCode": code, "reason": reason, "message": report.to_string(), "finishedAt": now()}});
        (state, code != 0)
    }

    fn sync_job(&self, job: &Value) {
        let pods_kind = kind("pods").unwrap();
        let ns = job["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = job["metadata"]["name"].as_str().unwrap_or_default();
        let template = &job["spec"]["template"];
        let pull = &template["spec"]["containers"][0];
        // A pod that failed for want of its secret does not count (the Job's podFailurePolicy
        // ignores exit code 5); once the secret exists, its replacement runs.
        for pod in self.owned("pods", job) {
            if pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
                == EXIT_MISSING_SECRET
                && self.missing_secret(&ns, pull).is_none()
            {
                let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
                let _ = self.store.delete(pods_kind, &ns, pod_name);
            }
        }
        if self.owned("pods", job).is_empty() {
            let mut labels = template["metadata"]["labels"].clone();
            labels["batch.kubernetes.io/job-name"] = json!(name);
            let (state, failed) = self.pull_outcome(&ns, pull, &template["spec"]);
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
        let exits: Vec<Value> = self
            .owned("pods", job)
            .iter()
            .map(|p| p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"].clone())
            .collect();
        let failed = exits.iter().any(|c| c != 0 && *c != EXIT_MISSING_SECRET);
        let succeeded = exits.iter().any(|c| c == 0);
        let conditions = match (failed, succeeded) {
            (true, _) => json!([{"type": "Failed", "status": "True"}]),
            (false, true) => json!([{"type": "Complete", "status": "True"}]),
            (false, false) => json!([]),
        };
        let status = json!({"conditions": conditions, "succeeded": i32::from(succeeded), "failed": i32::from(failed)});
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

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// A rolling update's maxSurge (rounded up) or maxUnavailable (rounded down) of `replicas`:
/// a number or a percentage, 25% when unset, as Kubernetes resolves them.
fn resolve(value: &Value, replicas: i64, round_up: bool) -> i64 {
    let percent = |p: &str| -> Option<i64> {
        let p: i64 = p.strip_suffix('%')?.parse().ok()?;
        let scaled = replicas * p;
        Some(if round_up {
            (scaled + 99) / 100
        } else {
            scaled / 100
        })
    };
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(percent))
        .unwrap_or_else(|| percent("25%").unwrap())
}

/// A rollout's pod counts and when they last changed.
type Progress = (String, std::time::Instant);

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

/// A container argument's value: `--flag VALUE`.
fn arg<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    let args = container["args"].as_array()?;
    let i = args.iter().position(|x| x == flag)?;
    args.get(i + 1)?.as_str()
}

/// The node's folder a pull writes, when its `--dest` lies on a hostPath volume of the pod
/// `spec`.
fn host_folder(pull: &Value, spec: &Value) -> Option<String> {
    let dest = arg(pull, "--dest")?;
    pull["volumeMounts"].as_array()?.iter().find_map(|m| {
        let inside = dest.strip_prefix(m["mountPath"].as_str()?)?;
        let volume = spec["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == m["name"])?;
        Some(format!("{}{inside}", volume["hostPath"]["path"].as_str()?))
    })
}

fn owner_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true})
}
