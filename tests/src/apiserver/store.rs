//! The emulated API server's storage: objects as JSON, one resourceVersion counter, an
//! event history that watches resume from (until compacted), and garbage collection by
//! owner reference. Approximations are named where they are made.
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// A resource the emulator serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    pub plural: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    /// Has a status subresource: writes to the object leave status alone and the other way round.
    pub status: bool,
}

pub const KINDS: &[Kind] = &[
    Kind {
        plural: "modeldeployments",
        api_version: "kandle.dev/v1alpha1",
        kind: "ModelDeployment",
        status: true,
    },
    Kind {
        plural: "deployments",
        api_version: "apps/v1",
        kind: "Deployment",
        status: true,
    },
    Kind {
        plural: "services",
        api_version: "v1",
        kind: "Service",
        status: true,
    },
    Kind {
        plural: "pods",
        api_version: "v1",
        kind: "Pod",
        status: true,
    },
    Kind {
        plural: "persistentvolumeclaims",
        api_version: "v1",
        kind: "PersistentVolumeClaim",
        status: true,
    },
    Kind {
        plural: "poddisruptionbudgets",
        api_version: "policy/v1",
        kind: "PodDisruptionBudget",
        status: true,
    },
    Kind {
        plural: "jobs",
        api_version: "batch/v1",
        kind: "Job",
        status: true,
    },
    Kind {
        plural: "networkpolicies",
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        status: false,
    },
    Kind {
        plural: "secrets",
        api_version: "v1",
        kind: "Secret",
        status: false,
    },
    Kind {
        plural: "leases",
        api_version: "coordination.k8s.io/v1",
        kind: "Lease",
        status: false,
    },
    Kind {
        plural: "events",
        api_version: "events.k8s.io/v1",
        kind: "Event",
        status: false,
    },
    // Written by the tests, standing in for the EndpointSlice controller.
    Kind {
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        status: false,
    },
];

pub fn kind(plural: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.plural == plural)
}

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub rv: u64,
    pub plural: &'static str,
    pub type_: &'static str,
    pub object: Value,
}

type Key = (&'static str, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<WatchEvent>,
    /// Events up to this resourceVersion are gone: watches from before it get 410.
    compacted: u64,
}

pub struct Store {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            events: broadcast::channel(65536).0,
        }
    }
}

fn key(kind: &Kind, ns: &str, name: &str) -> Key {
    (kind.plural, ns.to_string(), name.to_string())
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

fn without(obj: &Value, fields: &[&str]) -> Value {
    let mut o = obj.clone();
    if let Some(map) = o.as_object_mut() {
        for f in fields {
            map.remove(*f);
        }
    }
    o
}

/// Seconds-precision timestamp, as the API server stores them.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
        .expect("now")
        .to_string()
}

impl Store {
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    pub fn get(&self, kind: &Kind, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&key(kind, ns, name))
            .cloned()
    }

    /// Objects of a kind, in one namespace or all, and the resourceVersion of the list.
    pub fn list(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        filter: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let state = self.state.lock().unwrap();
        // Keys sort by kind, then namespace: a range, not a scan of everything.
        let (from, to) = match ns {
            Some(ns) => (
                (kind.plural, ns.to_string(), String::new()),
                (kind.plural, format!("{ns}\0"), String::new()),
            ),
            None => (
                (kind.plural, String::new(), String::new()),
                (kind.plural, "\u{10ffff}".to_string(), String::new()),
            ),
        };
        let items = state
            .objects
            .range(from..to)
            .filter(|(_, o)| filter(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, state.rv)
    }

    /// Events after `rv` for a kind, or None when they were compacted away.
    pub fn history_since(&self, kind: &Kind, rv: u64) -> Option<Vec<WatchEvent>> {
        let state = self.state.lock().unwrap();
        if rv < state.compacted {
            return None;
        }
        Some(
            state
                .history
                .iter()
                .filter(|e| e.rv > rv && e.plural == kind.plural)
                .cloned()
                .collect(),
        )
    }

    /// Forgets the event history, as etcd compaction does.
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.compacted = state.rv;
        state.history.clear();
    }

    fn record(&self, state: &mut State, kind: &Kind, type_: &'static str, object: Value) {
        let event = WatchEvent {
            rv: state.rv,
            plural: kind.plural,
            type_,
            object,
        };
        state.history.push(event.clone());
        let _ = self.events.send(event);
    }

    pub fn create(&self, kind: &'static Kind, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value",
            ));
        }
        let k = key(kind, ns, &name);
        if state.objects.contains_key(&k) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.plural),
            ));
        }
        state.rv += 1;
        state.uids += 1;
        obj["apiVersion"] = json!(kind.api_version);
        obj["kind"] = json!(kind.kind);
        let meta = &mut obj["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(format!("uid-{:08}", state.uids));
        meta["resourceVersion"] = json!(state.rv.to_string());
        meta["creationTimestamp"] = json!(now());
        if kind.status {
            meta["generation"] = json!(1);
        }
        super::defaults::apply(kind, &mut obj);
        state.objects.insert(k, obj.clone());
        self.record(&mut state, kind, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Replaces the part of an object a write may change. `expected_rv` gives optimistic
    /// concurrency (409 when stale). A write that changes nothing is no write: no new
    /// resourceVersion, no event, as on a real API server.
    pub fn update(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        new: Value,
        part: Part,
        expected_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let k = key(kind, ns, name);
        let Some(old) = state.objects.get(&k).cloned() else {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            ));
        };
        if let Some(rv) = expected_rv.filter(|rv| !rv.is_empty())
            && rv != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    kind.plural
                ),
            ));
        }
        let mut obj = match (part, kind.status) {
            (Part::Status, _) => {
                let mut o = old.clone();
                o["status"] = new.get("status").cloned().unwrap_or(Value::Null);
                o
            }
            (Part::Main, true) => {
                let mut o = new.clone();
                o["status"] = old.get("status").cloned().unwrap_or(Value::Null);
                o
            }
            (Part::Main, false) => new.clone(),
        };
        if obj.get("status") == Some(&Value::Null) {
            obj.as_object_mut().unwrap().remove("status");
        }
        // What the server owns stays as it was.
        obj["apiVersion"] = json!(kind.api_version);
        obj["kind"] = json!(kind.kind);
        for field in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "deletionTimestamp",
        ] {
            match old["metadata"].get(field) {
                Some(v) => obj["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if part == Part::Main {
            super::defaults::apply(kind, &mut obj);
        }
        if kind.status
            && without(&obj, &["metadata", "status"]) != without(&old, &["metadata", "status"])
        {
            obj["metadata"]["generation"] =
                json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        if obj == old {
            return Ok(old);
        }
        let finalized = !old["metadata"]["deletionTimestamp"].is_null()
            && obj["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        if finalized {
            drop(state);
            return self.remove(kind, ns, name);
        }
        state.objects.insert(k, obj.clone());
        self.record(&mut state, kind, "MODIFIED", obj.clone());
        Ok(obj)
    }

    /// Deletes an object (or marks it, if it has finalizers) and then, as the garbage
    /// collector does in the background, everything it owns.
    pub fn delete(&self, kind: &'static Kind, ns: &str, name: &str) -> Result<Value, ApiError> {
        let obj = self.get(kind, ns, name).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        })?;
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            let mut marked = obj.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now());
            let mut state = self.state.lock().unwrap();
            state.rv += 1;
            marked["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            state.objects.insert(key(kind, ns, name), marked.clone());
            self.record(&mut state, kind, "MODIFIED", marked.clone());
            return Ok(marked);
        }
        self.remove(kind, ns, name)
    }

    fn remove(&self, kind: &'static Kind, ns: &str, name: &str) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let Some(mut obj) = state.objects.remove(&key(kind, ns, name)) else {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            ));
        };
        state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        self.record(&mut state, kind, "DELETED", obj.clone());
        let uid = meta_str(&obj, "uid").to_string();
        let dependants: Vec<(&'static Kind, String, String)> = state
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|((p, n, m), _)| (kind_of(p), n.clone(), m.clone()))
            .collect();
        drop(state);
        for (k, n, m) in dependants {
            let _ = self.delete(k, &n, &m);
        }
        Ok(obj)
    }
}

fn kind_of(plural: &str) -> &'static Kind {
    kind(plural).expect("stored kinds are known")
}

/// Whether an object's labels satisfy a selector of `k=v`, `k==v`, `k!=v`, `k` and `!k` terms.
pub fn matches_labels(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                labels[k.trim()].as_str() == Some(v.trim_start_matches('=').trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels.get(k).is_none()
            } else {
                labels.get(term).is_some()
            }
        })
}

/// Whether an object satisfies a field selector (`metadata.name=` and `metadata.namespace=`).
pub fn matches_fields(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => meta_str(obj, "name") == v,
            Some(("metadata.namespace", v)) => meta_str(obj, "namespace") == v,
            _ => true,
        })
}
