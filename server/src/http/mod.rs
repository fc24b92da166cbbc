//! The HTTP edge: router, shared state and middleware (request ids, tracing, metrics,
//! readiness, API keys). Handlers live in one module per API.
mod chat;
mod classify;
mod completions;
mod edge;
mod embeddings;
mod generate;
mod json;
mod ops;
mod rerank;

use crate::chat_template::ChatTemplate;
use crate::constrain::LazyLexicon;
use crate::engine::embedding::EmbeddingEngine;
use crate::engine::generation::GenerationEngine;
use crate::engine::{EncoderInput, Health};
use crate::error::ApiError;
use crate::metrics::{Metrics, RouteCode};
use crate::model::{ModelInfo, Task};
use crate::tokenize::PromptTokenizer;
use crate::validation::check_input_len;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub use edge::Edge;

pub enum Engine {
    Generation(GenerationEngine),
    Embedding(EmbeddingEngine),
}

impl Engine {
    pub fn health(&self) -> &Health {
        match self {
            Self::Generation(e) => e.health(),
            Self::Embedding(e) => e.health(),
        }
    }
}

pub struct AppState {
    pub model_name: String,
    /// Unix time the model was loaded: `created` in `/v1/models`.
    pub created: u64,
    pub info: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    /// Prompts to token ids, within bounds.
    pub prompts: Arc<PromptTokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Each token's bytes, and grammars over them for structured outputs.
    pub lexicon: LazyLexicon,
    pub engine: Engine,
    pub edge: Arc<Edge>,
    pub max_input_tokens: usize,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.engine.health().is_alive() && !self.edge.is_draining()
    }

    /// The encoder, when the model serves `task`; else a 400 naming what it serves.
    pub fn encoder(&self, task: Task, route: &str) -> Result<&EmbeddingEngine, ApiError> {
        match &self.engine {
            Engine::Embedding(e) if self.info.task == task => Ok(e),
            _ => Err(ApiError::invalid(format!(
                "The model `{}` serves the {} task; it does not serve {route}",
                self.model_name,
                self.info.task.as_str()
            ))),
        }
    }

    /// Every input of one request through the encoder at once (the batcher groups them),
    /// each length checked and the tokens counted: the outputs in order, and the token total.
    pub async fn encode(
        &self,
        engine: &EmbeddingEngine,
        inputs: Vec<EncoderInput>,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        for input in &inputs {
            check_input_len(input.ids.len(), self.max_input_tokens)?;
        }
        let tokens = inputs.iter().map(|i| i.ids.len()).sum();
        self.edge.metrics.prompt_tokens.inc_by(tokens as u64);
        let outputs =
            futures::future::try_join_all(inputs.into_iter().map(|i| engine.embed(i))).await?;
        Ok((outputs, tokens))
    }
}

/// When the request arrived, for durations that end with a stream's last event.
#[derive(Clone, Copy)]
pub struct RequestStart(pub Instant);

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(ops::models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/v1/classify", post(classify::classify))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(state.edge.max_body_bytes));
    let router = Router::new()
        .merge(api)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    observed(router, state.edge.metrics.clone()).with_state(state)
}

/// Request ids, a tracing span, and counts and durations in `metrics` for every request:
/// what each of the server's routers shares.
pub(crate) fn observed<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    metrics: Arc<Metrics>,
) -> Router<S> {
    router
        .layer(middleware::from_fn_with_state(metrics, track))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                // Every response is logged above with its status; a 503 from `/readyz` while
                // loading or draining is an answer, not an error, and real failures are
                // logged with their cause where they are mapped (`ApiError::body`).
                .on_failure(()))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
}

/// Counts every response by route and code, and times those that are not streams
/// (streams record their duration when they end).
async fn track(State(metrics): State<Arc<Metrics>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    req.extensions_mut().insert(RequestStart(start));
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(req).await;
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        metrics.observe_duration(&route, start.elapsed().as_secs_f64());
    }
    metrics
        .requests
        .get_or_create(&RouteCode {
            route,
            code: response.status().as_u16(),
        })
        .inc();
    response
}

/// The API is served only while ready, and only to holders of a key when keys are set.
async fn guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    state.edge.admit_caller(req.headers())?;
    if !state.engine.health().is_alive() {
        return Err(ApiError::Unavailable("The model worker has stopped"));
    }
    Ok(next.run(req).await)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
