//! The HTTP edge of a tabular model: KServe's Open Inference Protocol v2 (`/v2/...`), the
//! probes and metrics every kandle pod answers, and v2's error shape, `{"error": "..."}`.
use super::Tabular;
use super::v2::{self, HEADER_LENGTH};
use crate::error::ApiError;
use crate::http::{Edge, observed};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::sync::Arc;

pub struct TabularState {
    pub model_name: String,
    pub model: Tabular,
    pub edge: Arc<Edge>,
    /// Most rows one request may carry.
    pub max_rows: usize,
}

/// An error in v2's shape; statuses and headers as for every other route.
pub struct V2Error(ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self.0 {
            tracing::error!(%cause, "request failed");
        }
        let body = json!({ "error": self.0.to_string() });
        self.0.respond(body)
    }
}

type Shared = State<Arc<TabularState>>;

pub fn router(state: Arc<TabularState>) -> Router {
    let model = Router::new()
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/versions/{version}", get(metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(state.edge.max_body_bytes));
    let router = Router::new()
        .merge(model)
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { V2Error(ApiError::NotFound) })
        .method_not_allowed_fallback(|| async { V2Error(ApiError::MethodNotAllowed) });
    observed(router, state.edge.metrics.clone()).with_state(state)
}

/// Model routes: only while serving, only with a key when keys are set, only for this
/// model (and its one version, `1`).
async fn guard(
    State(state): Shared,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
    next: Next,
) -> Result<Response, V2Error> {
    state.edge.admit_caller(req.headers())?;
    for (key, value) in &params {
        match key.as_str() {
            "name" if *value != state.model_name => {
                return Err(ApiError::ModelNotFound(value.clone()).into());
            }
            "version" if value != "1" => {
                return Err(ApiError::invalid(format!(
                    "The model `{}` has one version, `1`; there is no version `{value}`",
                    state.model_name
                ))
                .into());
            }
            _ => {}
        }
    }
    Ok(next.run(req).await)
}

async fn live() -> &'static str {
    "ok"
}

async fn ready(State(state): Shared) -> impl IntoResponse {
    if state.edge.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    } else {
        (StatusCode::OK, "ready")
    }
}

/// Reached only through `guard`, so the model is this one and serving.
async fn model_ready() -> &'static str {
    "ready"
}

async fn metrics(State(state): Shared) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.edge.metrics.encode(),
    )
}

async fn server_metadata() -> impl IntoResponse {
    axum::Json(json!({
        "name": "kandle",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// The model's inputs as one 1-D tensor per feature (names from the model or its
/// manifest; a 2-D input of rows by features in this order is accepted as well).
async fn metadata(State(state): Shared) -> impl IntoResponse {
    let schema = &state.model.schema;
    let inputs: Vec<_> = schema
        .features
        .iter()
        .zip(&state.model.categories)
        .map(|(name, categories)| {
            let datatype = if categories.is_empty() {
                "FP64"
            } else {
                "BYTES"
            };
            json!({ "name": name, "datatype": datatype, "shape": [-1] })
        })
        .collect();
    let outputs: Vec<_> = v2::Output::all(schema.kind)
        .iter()
        .map(|o| {
            let (datatype, shape) = match o {
                v2::Output::Probabilities => ("FP64", json!([-1, schema.kind.outputs()])),
                v2::Output::Predictions => ("FP64", json!([-1])),
                v2::Output::Label if state.model.labels.is_some() => ("BYTES", json!([-1])),
                v2::Output::Label => ("INT64", json!([-1])),
            };
            json!({ "name": o.name(), "datatype": datatype, "shape": shape })
        })
        .collect();
    axum::Json(json!({
        "name": state.model_name,
        "versions": ["1"],
        "platform": schema.format,
        "inputs": inputs,
        "outputs": outputs,
    }))
}

async fn infer(
    State(state): Shared,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, V2Error> {
    let body = state.edge.read_body(req).await?;
    let json_len = match headers.get(HEADER_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::invalid("Inference-Header-Content-Length is not a number")
                })?,
        ),
        None => None,
    };
    let _permit = state.edge.admission.admit().await?;
    let work = state.clone();
    // Parsing a large batch and predicting it are CPU work: off the async threads.
    let (json, binary) = tokio::task::spawn_blocking(move || {
        let inference = v2::parse(&body, json_len, &work.model, work.max_rows)?;
        let predictions = work
            .model
            .predict(&inference.rows)
            .map_err(ApiError::Internal)?;
        work.edge
            .metrics
            .rows_predicted
            .inc_by(inference.n_rows as u64);
        Ok::<_, ApiError>(v2::respond(
            &work.model_name,
            &work.model,
            inference,
            &predictions,
        ))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("prediction task: {e}")))??;
    let response = if binary.is_empty() {
        ([(header::CONTENT_TYPE, "application/json")], json).into_response()
    } else {
        let json_len = json.len();
        let mut bytes = json;
        bytes.extend(binary);
        (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (HeaderName::from_static(HEADER_LENGTH), json_len.to_string()),
            ],
            Body::from(bytes),
        )
            .into_response()
    };
    Ok(response)
}
