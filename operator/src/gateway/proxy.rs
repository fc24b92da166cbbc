//! One request's way through the gateway: read and peek at the body, check the key, find
//! the model, hold while it has no ready pod, then forward to a pod, retrying on another
//! while nothing has been answered, and pass the answer back as it comes.
use super::balance::Slot;
use super::error::GatewayError;
use super::keys::{Limited, Permit, Tenant};
use super::metrics::{Deployment, ModelLabel, ModelSeries, UpstreamError};
use super::table::Model;
use super::upstream::{Outgoing, PodBody, Upstreams};
use super::{DrainGuard, Gateway};
use axum::body::{Body, Bytes};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri, header};
use axum::response::IntoResponse;
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

impl Gateway {
    /// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and the like.
    pub(super) async fn proxy(
        &self,
        upstreams: &Upstreams,
        request: Incoming,
    ) -> Response<GatewayBody> {
        let started = Instant::now();
        let (series, outcome) = match self.route(&request.headers, &request.body) {
            Ok((routed, tenant)) => {
                let model = self.table.borrow().get(&routed.model).cloned();
                // Labelled by served names only: a caller's made-up names are not series.
                let series = self
                    .metrics
                    .model(model.as_ref().map_or("-", |m| &m.served));
                let outcome = self
                    .serve(upstreams, routed, model, tenant, request, &series)
                    .await;
                (series, outcome)
            }
            Err(e) => (self.metrics.model("-"), Err(e)),
        };
        let response = outcome.unwrap_or_else(|e| own(e.into_response()));
        self.metrics.answered(&series, response.status().as_u16());
        series.duration.observe(started.elapsed().as_secs_f64());
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

    /// Sends the request to a ready pod of `model`, the one it names.
    async fn serve(
        &self,
        upstreams: &Upstreams,
        routed: Routed,
        model: Option<Arc<Model>>,
        tenant: Option<Arc<Tenant>>,
        request: Incoming,
        series: &ModelSeries,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let Incoming {
            method,
            uri,
            headers,
            body,
        } = request;
        let served = routed.model;
        let model = model.ok_or_else(|| GatewayError::ModelNotFound(served.clone()))?;
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
        let mut model = self.ready_model(model).await?;
        let in_flight = Tracked::inc(series.in_flight.clone());
        let outgoing = Outgoing {
            method,
            path: uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers,
            key_checked: self.keys.is_some(),
            body,
        };
        let mut tried = Vec::new();
        let mut unavailable = None;
        for attempt in 0..=self.settings.retries {
            // The pods as they are now: some may have become ready or gone since the last try.
            if attempt > 0
                && let Some(current) = self.table.borrow().get(&served)
            {
                model = current.clone();
            }
            let Some(slot) = self.balancer.pick(
                &model.endpoints,
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
                    return Ok(self.pass_on(answer, Some(slot), permit, in_flight));
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
            Some(answer) => Ok(self.pass_on(answer, None, permit, in_flight)),
            None => Err(GatewayError::Upstream(served)),
        }
    }

    /// A pod's answer, passed on with what must live as long as it: its place on the pod,
    /// the key's permit, and the counts of requests in flight.
    fn pass_on(
        &self,
        answer: Response<PodBody>,
        slot: Option<Slot>,
        permit: Option<Permit>,
        in_flight: Tracked,
    ) -> Response<GatewayBody> {
        let guards = Guards {
            _slot: slot,
            _permit: permit,
            _in_flight: in_flight,
            _draining: self.draining.track(),
        };
        answer.map(|body| GatewayBody::Pod {
            body,
            _guards: guards,
        })
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
    async fn ready_model(&self, model: Arc<Model>) -> Result<Arc<Model>, GatewayError> {
        // Pods of an earlier spec may still serve a model whose current spec failed.
        if !model.endpoints.is_empty() {
            return Ok(model);
        }
        if let Some(why) = &model.failed {
            return Err(GatewayError::ModelFailed(model.served.clone(), why.clone()));
        }
        // Boxed: every request's future would otherwise carry room for this rare wait.
        Box::pin(self.hold(model)).await
    }

    /// Holds a request for `model` (bounded in number and time) until it has a ready pod.
    async fn hold(&self, model: Arc<Model>) -> Result<Arc<Model>, GatewayError> {
        let started = Instant::now();
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

/// What the gateway answers with: a pod's answer, passed on frame by frame, or its own.
pub(super) enum GatewayBody {
    /// Dropping the pod's body before its end closes its connection, which cancels the work
    /// on the pod.
    Pod {
        body: PodBody,
        _guards: Guards,
    },
    Own(Body),
}

/// The gateway's own answer (an error, a model list, metrics).
pub(super) fn own(response: axum::response::Response) -> Response<GatewayBody> {
    response.map(GatewayBody::Own)
}

/// What lives as long as a pod's answer is passed on.
pub(super) struct Guards {
    _slot: Option<Slot>,
    _permit: Option<Permit>,
    _in_flight: Tracked,
    _draining: DrainGuard,
}

impl http_body::Body for GatewayBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        match self.get_mut() {
            Self::Pod { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Own(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Pod { body, .. } => body.is_end_stream(),
            Self::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Pod { body, .. } => body.size_hint(),
            Self::Own(body) => body.size_hint(),
        }
    }
}
