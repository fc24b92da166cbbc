//! A Kubernetes API server in the test process: a tower `Service` that `kube::Client`
//! talks to, serving the kinds the operator uses with the semantics its correctness
//! rests on: get/list/watch with resourceVersion resume and 410 after compaction, label
//! and field selectors, create/replace with optimistic concurrency, merge and apply
//! patches, status subresources, generations, no-op writes, finalizers, garbage
//! collection, and ModelDeployment writes checked against the CRD schema and CEL rules.
//!
//! Objects come back as a real API server returns them: defaulted, with canonical
//! quantities (`defaults`), and an apply that creates an object is authorised as `create`
//! too.
//!
//! Approximations: server-side apply merges lists of objects by key and removes what a
//! field manager stopped setting, judged from that manager's last applied configuration
//! (no managedFields in the objects, no conflicts between managers); strategic merge
//! patches merge like JSON merge patches; there is no admission (other than the CRD's
//! schema and rules), no paging
//! (lists come whole), and a watch does not send DELETED for objects that stop matching
//! its label selector.
pub mod defaults;
pub mod loopback;
pub mod patch;
pub mod rbac;
pub mod store;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use rbac::{Access, Policy};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{ApiError, Kind, Part, Store, matches_fields, matches_labels};
use tokio::sync::watch;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Kind, namespace, name, status part or not, and field manager.
type AppliedKey = (String, String, String, bool, String);

/// Requests by verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`) and resource.
pub type RequestCounts = BTreeMap<(String, String), u64>;

#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
    /// The permissions of the user this handle serves; `None` is an administrator.
    policy: Option<Arc<Policy>>,
}

struct Inner {
    store: Arc<Store>,
    /// Last configuration each field manager applied to each object part, for server-side
    /// apply: what that manager owns.
    applied: Mutex<HashMap<AppliedKey, Value>>,
    requests: Mutex<RequestCounts>,
    /// Bumped to end every open watch (the connection dropped); watches started later go on.
    watch_epoch: watch::Sender<u64>,
    /// While true, new watches wait (the API server is unreachable).
    watch_paused: watch::Sender<bool>,
    total: AtomicU64,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Arc::new(Store::default()),
                applied: Mutex::new(HashMap::new()),
                requests: Mutex::new(BTreeMap::new()),
                watch_epoch: watch::channel(0).0,
                watch_paused: watch::channel(false).0,
                total: AtomicU64::new(0),
            }),
            policy: None,
        }
    }
}

impl ApiServer {
    /// A client whose every request this server answers.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// The same server, seen by a user with only `policy`'s permissions: its clients
    /// (and `loopback::serve`) get 403 Forbidden for anything else.
    pub fn as_user(&self, policy: Policy) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: Some(Arc::new(policy)),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Requests answered so far, by verb and resource.
    pub fn requests(&self) -> RequestCounts {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn total_requests(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// An outage of the watches: every open watch ends, `meanwhile` runs while none can
    /// reconnect, then the history is compacted, so that clients resuming get 410 Expired
    /// and must list again to see what changed.
    pub fn interrupt_watches(&self, meanwhile: impl FnOnce(&Store)) {
        self.inner.watch_paused.send_replace(true);
        self.inner.watch_epoch.send_modify(|e| *e += 1);
        meanwhile(&self.inner.store);
        self.inner.store.compact();
        self.inner.watch_paused.send_replace(false);
    }

    fn count(&self, verb: &str, plural: &str) {
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        *self
            .inner
            .requests
            .lock()
            .unwrap()
            .entry((verb.into(), plural.into()))
            .or_default() += 1;
    }

    pub async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        match self.route(req).await {
            Ok(response) => response,
            Err(e) => json_response(StatusCode::from_u16(e.code).unwrap(), &e.status()),
        }
    }

    async fn route(&self, req: Request<kube::client::Body>) -> Result<Response<Body>, ApiError> {
        let (parts, body) = req.into_parts();
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let path = Path::parse(parts.uri.path())?;
        let kind = path.kind;
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let parse = || -> Result<Value, ApiError> {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::new(400, "BadRequest", format!("body: {e}")))
        };
        let ns = path.namespace.clone().unwrap_or_default();
        let part = if path.subresource.as_deref() == Some("status") {
            Part::Status
        } else {
            Part::Main
        };
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        if let Some(policy) = &self.policy {
            let verb = match (&parts.method, path.name.is_some()) {
                (&Method::GET, true) => "get",
                (&Method::GET, false) if watching => "watch",
                (&Method::GET, false) => "list",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::PATCH, _) => "patch",
                (&Method::DELETE, _) => "delete",
                _ => "unknown",
            };
            let resource = match &path.subresource {
                Some(sub) => format!("{}/{sub}", kind.plural),
                None => kind.plural.to_string(),
            };
            let access = Access {
                verb,
                group: kind.api_version.rsplit_once('/').map_or("", |(g, _)| g),
                resource: &resource,
                namespace: path.namespace.as_deref(),
            };
            // As the real patch handler does: an apply that would create the object is
            // also authorised as `create` (apiserver `handlers/patch.go`).
            let creates = parts.method == Method::PATCH
                && part == Part::Main
                && content_type.starts_with("application/apply-patch")
                && path
                    .name
                    .as_deref()
                    .is_some_and(|name| self.inner.store.get(kind, &ns, name).is_none());
            let create = Access {
                verb: "create",
                ..access
            };
            for access in std::iter::once(&access).chain(creates.then_some(&create)) {
                if !policy.allows(access) {
                    self.count("forbidden", kind.plural);
                    return Err(ApiError::new(403, "Forbidden", policy.forbidden(access)));
                }
            }
        }
        let store = &self.inner.store;
        if path.subresource.as_deref() == Some("scale")
            && let Some(name) = path.name.as_deref()
        {
            let verb = if parts.method == Method::GET {
                "get"
            } else {
                "patch"
            };
            self.count(verb, "modeldeployments/scale");
            return self.scale(kind, &ns, name, &parts.method, &body);
        }
        match (&parts.method, path.name.as_deref()) {
            (&Method::GET, Some(name)) => {
                self.count("get", kind.plural);
                let obj = store.get(kind, &ns, name).ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", kind.plural),
                    )
                })?;
                Ok(json_response(StatusCode::OK, &obj))
            }
            (&Method::GET, None) if watching => {
                self.count("watch", kind.plural);
                Ok(self.watch(kind, path.namespace, &query))
            }
            (&Method::GET, None) => {
                self.count("list", kind.plural);
                let (items, rv) = store.list(kind, path.namespace.as_deref(), selector(&query));
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": kind.api_version, "kind": format!("{}List", kind.kind),
                            "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                ))
            }
            (&Method::POST, None) => {
                self.count("create", kind.plural);
                let obj = admit(kind, parse()?)?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &store.create(kind, &ns, obj)?,
                ))
            }
            (&Method::PUT, Some(name)) => {
                self.count("update", kind.plural);
                let obj = parse()?;
                let rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                let updated = update(store, kind, &ns, name, obj, part, rv.as_deref())?;
                Ok(json_response(StatusCode::OK, &updated))
            }
            (&Method::PATCH, Some(name)) => {
                self.count("patch", kind.plural);
                let patch = parse()?;
                let existing = store.get(kind, &ns, name);
                let key = (
                    kind.plural.to_string(),
                    ns.clone(),
                    name.to_string(),
                    part == Part::Status,
                    query.get("fieldManager").cloned().unwrap_or_default(),
                );
                let mut applied = self.inner.applied.lock().unwrap();
                let obj = match (content_type.as_str(), existing) {
                    ("application/apply-patch+yaml", None) => {
                        let obj = admit(kind, patch.clone())?;
                        applied.insert(key, patch);
                        return Ok(json_response(
                            StatusCode::CREATED,
                            &store.create(kind, &ns, obj)?,
                        ));
                    }
                    (_, None) => {
                        return Err(ApiError::new(
                            404,
                            "NotFound",
                            format!("{} \"{name}\" not found", kind.plural),
                        ));
                    }
                    ("application/apply-patch+yaml", Some(mut obj)) => {
                        patch::apply(&mut obj, applied.get(&key), &patch);
                        applied.insert(key, patch);
                        obj
                    }
                    (
                        "application/merge-patch+json" | "application/strategic-merge-patch+json",
                        Some(mut obj),
                    ) => {
                        patch::merge(&mut obj, &patch);
                        obj
                    }
                    (other, _) => {
                        return Err(ApiError::new(
                            415,
                            "UnsupportedMediaType",
                            format!("{other} patches are not emulated"),
                        ));
                    }
                };
                drop(applied);
                let updated = update(store, kind, &ns, name, obj, part, None)?;
                Ok(json_response(StatusCode::OK, &updated))
            }
            (&Method::DELETE, Some(name)) => {
                self.count("delete", kind.plural);
                Ok(json_response(
                    StatusCode::OK,
                    &store.delete(kind, &ns, name)?,
                ))
            }
            (method, _) => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} {}", parts.uri),
            )),
        }
    }

    /// The scale subresource of ModelDeployments (`kubectl scale`, HPA, KEDA): an
    /// `autoscaling/v1` Scale read from `spec.replicas`, `status.replicas` and
    /// `status.selector`; a patch or update of it writes `spec.replicas` (admitted like any
    /// spec write).
    fn scale(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        method: &Method,
        body: &[u8],
    ) -> Result<Response<Body>, ApiError> {
        let not_found = || {
            ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        };
        if kind.plural != "modeldeployments" {
            return Err(not_found());
        }
        let store = &self.inner.store;
        let mut obj = store.get(kind, ns, name).ok_or_else(not_found)?;
        if method != Method::GET {
            let scale: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::new(400, "BadRequest", format!("body: {e}")))?;
            let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "spec.replicas: Required value",
                ));
            };
            obj["spec"]["replicas"] = json!(replicas);
            obj = store.update(kind, ns, name, admit(kind, obj)?, Part::Main, None)?;
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": obj["metadata"]["resourceVersion"]},
                "spec": {"replicas": obj["spec"]["replicas"]},
                "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
                           "selector": obj["status"]["selector"]},
            }),
        ))
    }

    /// A watch: the history after the given resourceVersion, then live events, as JSON
    /// lines, until the timeout or `interrupt_watches`. A resourceVersion older than the last
    /// compaction gets the 410 Expired error event that sends clients back to a list.
    fn watch(
        &self,
        kind: &'static Kind,
        ns: Option<String>,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        let store = self.inner.store.clone();
        let filter = selector(query);
        let keep = move |obj: &Value| {
            ns.as_ref()
                .is_none_or(|ns| obj["metadata"]["namespace"] == ns.as_str())
                && filter(obj)
        };
        let rv: Option<u64> = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .filter(|v| *v > 0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290u64);
        let mut epoch = self.inner.watch_epoch.subscribe();
        epoch.mark_unchanged();
        let mut paused = self.inner.watch_paused.subscribe();
        let stream = async_stream(move |tx| async move {
            if paused.wait_for(|p| !p).await.is_err() {
                return;
            }
            let mut live = store.subscribe();
            let start_rv = store.resource_version();
            let backlog = match rv {
                None => Some(
                    store
                        .list(kind, None, &keep)
                        .0
                        .into_iter()
                        .map(|o| json!({"type": "ADDED", "object": o}))
                        .collect::<Vec<_>>(),
                ),
                Some(rv) => store.history_since(kind, rv).map(|events| {
                    events
                        .into_iter()
                        .filter(|e| e.rv <= start_rv && keep(&e.object))
                        .map(|e| json!({"type": e.type_, "object": e.object}))
                        .collect()
                }),
            };
            let Some(backlog) = backlog else {
                let gone = ApiError::new(410, "Expired", "too old resource version");
                let _ = tx
                    .send(json!({"type": "ERROR", "object": gone.status()}))
                    .await;
                return;
            };
            for event in backlog {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    // An interrupted watch delivers nothing more.
                    biased;
                    _ = epoch.changed() => return,
                    () = &mut deadline => return,
                    event = live.recv() => match event {
                        Ok(e) if e.plural == kind.plural && e.rv > start_rv && keep(&e.object) => {
                            if tx.send(json!({"type": e.type_, "object": e.object})).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
        });
        let body = StreamBody::new(stream.map(|event| {
            let mut line = serde_json::to_vec(&event).expect("JSON");
            line.push(b'\n');
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(line)))
        }));
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(UnsyncBoxBody::new(body))
            .expect("a response")
    }
}

/// A channel-backed stream fed by a task, so the watch logic reads as straight-line code.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Value> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn selector(
    query: &HashMap<String, String>,
) -> impl Fn(&Value) -> bool + Send + Sync + Clone + 'static {
    let labels = query.get("labelSelector").cloned().unwrap_or_default();
    let fields = query.get("fieldSelector").cloned().unwrap_or_default();
    move |obj: &Value| matches_labels(obj, &labels) && matches_fields(obj, &fields)
}

/// What admission does for ModelDeployments: the CRD's structural schema, CEL rules and
/// defaults, so the emulator refuses what a real API server would.
/// An update (PUT or the result of a PATCH): the main part is admitted first, as the
/// API server validates and defaults it; status is written as sent.
fn update(
    store: &Store,
    kind: &'static Kind,
    ns: &str,
    name: &str,
    obj: Value,
    part: Part,
    resource_version: Option<&str>,
) -> Result<Value, ApiError> {
    let obj = match part {
        Part::Main => admit(kind, obj)?,
        Part::Status => obj,
    };
    store.update(kind, ns, name, obj, part, resource_version)
}

fn admit(kind: &Kind, obj: Value) -> Result<Value, ApiError> {
    if kind.plural != "modeldeployments" {
        return Ok(obj);
    }
    let typed = kandle_operator::validate::model_deployment(&obj).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!(
                "ModelDeployment.kandle.dev \"{}\" is invalid: {e}",
                obj["metadata"]["name"].as_str().unwrap_or_default()
            ),
        )
    })?;
    let mut defaulted = obj;
    defaulted["spec"] = serde_json::to_value(&typed.spec).expect("JSON");
    Ok(defaulted)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON"));
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(UnsyncBoxBody::new(http_body_util::Full::new(bytes)))
        .expect("a response")
}

/// `/api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]]` or `/apis/GROUP/VERSION/...`.
struct Path {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Path {
    fn parse(path: &str) -> Result<Self, ApiError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let rest = match segments.as_slice() {
            ["api", "v1", rest @ ..] => rest,
            ["apis", _, _, rest @ ..] => rest,
            _ => return Err(ApiError::new(404, "NotFound", format!("no route {path}"))),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (plural, name, sub) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some(name.to_string()), None),
            [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
            _ => return Err(ApiError::new(404, "NotFound", format!("no route {path}"))),
        };
        let kind = store::kind(plural).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({plural})"),
            )
        })?;
        Ok(Self {
            kind,
            namespace,
            name,
            subresource: sub,
        })
    }
}
