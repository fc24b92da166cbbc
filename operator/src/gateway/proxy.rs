//! One request's way through the gateway: read and peek at the body, check the key, find
//! the model, hold while it has no ready pod, then forward to a pod, retrying on another
//! while nothing has been answered, and pass the answer back as it comes.
use super::Gateway;
use super::error::GatewayError;
use super::keys::{Limited, Tenant};
use super::metrics::{Deployment, ModelLabel, UpstreamError};
use super::table::Model;
use super::upstream::{Outgoing, PodBody, UpstreamError as UpstreamFailure, Upstreams};
use axum::body::{Body, Bytes};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, Method, Response, StatusCode, Uri, header};
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The fields the gateway reads; the rest of the body goes through untouched.
#[derive(Deserialize)]
struct Peek<'a> {
    model: Option<String>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

/// The client's request, to pass on.
pub(super) struct Incoming {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a request carried, for routing.
struct Routed {
    model: String,
    /// The start of the prompt, in prefix-affinity mode.
    prefix: Option<Vec<u8>>,
}

/// Headers that belong to one connection (RFC 9110 §7.6.1), never passed on.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

impl Gateway {
    /// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and the like.
    pub(super) async fn proxy(
        self: Arc<Self>,
        upstreams: &Upstreams,
        request: Incoming,
    ) -> Response<Body> {
        let started = Instant::now();
        let (label, outcome) = match self.route(&request.headers, &request.body) {
            Ok((routed, tenant)) => {
                // Labelled by served names only: a caller's made-up names are not series.
                let known = self.table.borrow().get(&routed.model).is_some();
                let label = if known {
                    routed.model.clone()
                } else {
                    "-".into()
                };
                let served = self.serve(upstreams, routed, tenant, request, started);
                (label, served.await)
            }
            Err(e) => ("-".to_string(), Err(e)),
        };
        let response = outcome.unwrap_or_else(axum::response::IntoResponse::into_response);
        let key = super::metrics::ModelCode {
            model: label,
            code: response.status().as_u16(),
        };
        self.metrics.requests.get_or_create(&key).inc();
        self.metrics
            .duration
            .get_or_create(&ModelLabel { model: key.model })
            .observe(started.elapsed().as_secs_f64());
        response
    }

    /// The caller's key's tenant: `None` when the gateway checks no keys.
    pub(super) fn tenant(&self, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, GatewayError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let found = keys.borrow().find(authorization).cloned();
        found.map(Some).ok_or(GatewayError::Unauthorized)
    }

    /// The body's model and prefix and the caller's key, checked.
    fn route(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(Routed, Option<Arc<Tenant>>), GatewayError> {
        let tenant = self.tenant(headers)?;
        let peek: Peek = serde_json::from_slice(body).map_err(|e| {
            GatewayError::InvalidRequest(format!("The request body is not valid JSON: {e}"))
        })?;
        let model = peek.model.ok_or(GatewayError::MissingModel)?;
        let prefix = self.settings.affinity.then(|| {
            let raw = peek
                .messages
                .or(peek.prompt)
                .or(peek.input)
                .map_or("", RawValue::get);
            let end = raw.len().min(self.settings.affinity_prefix_bytes);
            raw.as_bytes()[..end].to_vec()
        });
        Ok((Routed { model, prefix }, tenant))
    }

    async fn serve(
        &self,
        upstreams: &Upstreams,
        routed: Routed,
        tenant: Option<Arc<Tenant>>,
        request: Incoming,
        started: Instant,
    ) -> Result<Response<Body>, GatewayError> {
        let Incoming {
            method,
            uri,
            headers,
            body,
        } = request;
        let served = routed.model;
        let model = self
            .table
            .borrow()
            .get(&served)
            .cloned()
            .ok_or_else(|| GatewayError::ModelNotFound(served.clone()))?;
        let permit = match &tenant {
            Some(t) if !t.may_call(&model) => return Err(GatewayError::Forbidden(served)),
            Some(t) => Some(t.admit(Instant::now()).map_err(|limit| {
                let reason = match limit {
                    Limited::Rate(_) => "rate",
                    Limited::Concurrency => "concurrency",
                };
                self.metrics
                    .limited
                    .get_or_create(&super::metrics::KeyReason {
                        key: t.name.clone(),
                        reason,
                    })
                    .inc();
                match limit {
                    Limited::Rate(wait) => GatewayError::RateLimited(wait),
                    Limited::Concurrency => GatewayError::TooManyConcurrent,
                }
            })?),
            None => None,
        };
        let model = self.ready_model(model, started).await?;
        let in_flight = Tracked::inc(
            self.metrics
                .in_flight
                .get_or_create(&ModelLabel {
                    model: served.clone(),
                })
                .clone(),
        );
        let outgoing = Outgoing {
            method,
            path: uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers: forwarded_headers(headers, self.keys.is_some()),
            body,
        };
        let mut tried = Vec::new();
        let mut unavailable = None;
        for _ in 0..=self.settings.retries {
            // The pods as they are now: some may have become ready or gone since the last try.
            let current = self.table.borrow().get(&served).cloned();
            let Some(slot) = self.balancer.pick(
                &current.as_ref().unwrap_or(&model).endpoints,
                &tried,
                routed.prefix.as_deref(),
                self.settings.affinity_load_factor,
            ) else {
                break;
            };
            let sent = upstreams.send(slot.addr, slot.host(), &outgoing).await;
            let reason = match sent {
                Ok(answer) if answer.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    unavailable = Some(answer);
                    "unavailable"
                }
                Ok(answer) => {
                    let guards = (slot, permit, in_flight, self.draining.track());
                    return Ok(stream(answer, guards));
                }
                Err(e) if e.is_connect() => {
                    tracing::debug!(model = %served, pod = %slot.addr, error = %e, "pod refused; trying another");
                    "connect"
                }
                Err(e) => {
                    tracing::warn!(model = %served, pod = %slot.addr, error = %e, "upstream failed");
                    self.count_upstream_error(&served, "other");
                    return Err(GatewayError::Upstream(served));
                }
            };
            self.count_upstream_error(&served, reason);
            tried.push(slot.addr);
        }
        match unavailable {
            // Every pod was busy or draining: their own answer says so best.
            Some(answer) => Ok(stream(answer, (permit, in_flight))),
            None => Err(GatewayError::Upstream(served)),
        }
    }

    fn count_upstream_error(&self, model: &str, reason: &'static str) {
        self.metrics
            .upstream_errors
            .get_or_create(&UpstreamError {
                model: model.to_string(),
                reason,
            })
            .inc();
    }

    /// The model once it has a ready pod: at once, or after holding the request (bounded in
    /// number and time) while the autoscaler, which reads the held count, starts one.
    async fn ready_model(
        &self,
        model: Arc<Model>,
        started: Instant,
    ) -> Result<Arc<Model>, GatewayError> {
        // Pods of an earlier spec may still serve a model whose current spec failed.
        if !model.endpoints.is_empty() {
            return Ok(model);
        }
        if let Some(why) = &model.failed {
            return Err(GatewayError::ModelFailed(model.served.clone(), why.clone()));
        }
        let served = model.served.clone();
        let gauge = self
            .metrics
            .held
            .get_or_create(&Deployment {
                namespace: model.namespace.clone(),
                name: model.name.clone(),
            })
            .clone();
        let held = Tracked::inc(gauge);
        if held.previous >= self.settings.hold_queue as i64 {
            return Err(GatewayError::HoldQueueFull(served));
        }
        tracing::info!(model = %served, held = held.previous + 1, "holding a request until the model has a ready pod");
        let mut table = self.table.clone();
        let waited = tokio::time::timeout(self.settings.hold_timeout, async {
            loop {
                let current = table.borrow_and_update().get(&served).cloned();
                match current {
                    None => return Err(GatewayError::ModelNotFound(served.clone())),
                    Some(m) if !m.endpoints.is_empty() => return Ok(m),
                    Some(m) if m.failed.is_some() => {
                        let why = m.failed.clone().unwrap_or_default();
                        return Err(GatewayError::ModelFailed(served.clone(), why));
                    }
                    Some(_) => {}
                }
                if table.changed().await.is_err() {
                    return Err(GatewayError::Draining);
                }
            }
        })
        .await;
        self.metrics
            .hold_wait
            .get_or_create(&ModelLabel {
                model: served.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        waited.unwrap_or(Err(GatewayError::NotReady(
            served,
            self.settings.hold_retry_after,
        )))
    }
}

/// A gauge raised for as long as this lives.
struct Tracked {
    gauge: Gauge,
    previous: i64,
}

impl Tracked {
    fn inc(gauge: Gauge) -> Self {
        let previous = gauge.inc();
        Self { gauge, previous }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The client's headers minus hop-by-hop ones and the framing the gateway writes again,
/// minus its API key when the gateway checked it (the key is the gateway's, not the pod's),
/// and minus `Expect`: the gateway has read the whole body already, and a pod's `100
/// Continue` would be for the gateway.
fn forwarded_headers(mut forwarded: HeaderMap, keys_checked: bool) -> HeaderMap {
    // Most requests carry none: one look at each of their few headers costs less than a
    // removal (a hash and a probe) per name.
    if forwarded.keys().any(is_hop_by_hop) {
        for name in &HOP_BY_HOP {
            forwarded.remove(name);
        }
    }
    forwarded.remove(header::HOST);
    forwarded.remove(header::CONTENT_LENGTH);
    forwarded.remove(header::EXPECT);
    if keys_checked {
        forwarded.remove(header::AUTHORIZATION);
    }
    forwarded
}

/// Whether a header belongs to one connection.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The pod's answer passed on frame by frame. `guards` (the pod's slot, the key's permit,
/// gauges) live until the body ends or the client goes, and dropping the pod's body then
/// closes its connection, which cancels the work on the pod.
fn stream<G: Send + Unpin + 'static>(answer: Response<PodBody>, guards: G) -> Response<Body> {
    answer.map(|body| {
        Body::new(Guarded {
            body,
            _guards: guards,
        })
    })
}

/// A pod's answer body, holding what must live as long as it does.
struct Guarded<G> {
    body: PodBody,
    _guards: G,
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = UpstreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamFailure>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
