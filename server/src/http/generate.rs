//! What chat and completions share: admission-checked prompt limits, submission to the
//! generation engine, and the answer as one JSON body or a stream of server-sent events.
use super::{AppState, Engine, RequestStart};
use crate::admission::Permit;
use crate::api::Usage;
use crate::engine::generation::{Event, FinishReason, GenerationJob};
use crate::error::ApiError;
use crate::validation::{GenerationParams, check_input_len, completion_budget};
use axum::Json;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::convert::Infallible;
use std::sync::Arc;

/// How one API shapes generated text: chat chunks carry deltas, completions carry text.
pub trait Format: Send + 'static {
    /// The event that opens a stream, if the API has one.
    fn opening(&self) -> Option<Value>;
    fn text(&self, text: String) -> Value;
    fn finish(&self, reason: FinishReason) -> Value;
    fn usage(&self, usage: Usage) -> Value;
    fn whole(&self, text: String, reason: FinishReason, usage: Usage) -> Value;
}

pub struct Generation {
    pub route: &'static str,
    pub start: RequestStart,
    pub permit: Permit,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

pub async fn respond(
    state: Arc<AppState>,
    g: Generation,
    format: impl Format,
) -> Result<Response, ApiError> {
    let Engine::Generation(engine) = &state.engine else {
        return Err(ApiError::invalid(format!(
            "The model `{}` serves embeddings only",
            state.model_name
        )));
    };
    let prompt_tokens = g.prompt.len();
    check_input_len(prompt_tokens, state.max_input_tokens)?;
    let max_new_tokens = completion_budget(
        prompt_tokens,
        g.params.max_tokens,
        state.info.context_length,
    )?;
    state.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let mut events = engine.submit(GenerationJob {
        prompt: g.prompt,
        sampling: g.params.sampling,
        max_new_tokens,
        stop: g.params.stop,
        span: tracing::Span::current(),
    })?;

    if !g.params.stream {
        let mut text = String::new();
        loop {
            match events.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done {
                    reason,
                    completion_tokens,
                }) => {
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    return Ok(Json(format.whole(text, reason, usage)).into_response());
                }
                Some(Event::Failed(e)) => return Err(e.into()),
                None => return Err(ApiError::Unavailable("The model worker has stopped")),
            }
        }
    }

    let include_usage = g.params.include_usage;
    let metrics = state.metrics.clone();
    let (route, start, permit) = (g.route, g.start, g.permit);
    let stream = async_stream::stream! {
        // The permit lives as long as the stream: a draining server waits for it.
        let _permit = permit;
        if let Some(opening) = format.opening() {
            yield data(&opening);
        }
        loop {
            match events.recv().await {
                Some(Event::Text(t)) => yield data(&format.text(t)),
                Some(Event::Done { reason, completion_tokens }) => {
                    yield data(&format.finish(reason));
                    if include_usage {
                        yield data(&format.usage(Usage::new(prompt_tokens, completion_tokens)));
                    }
                    break;
                }
                Some(Event::Failed(e)) => {
                    yield data(&ApiError::from(e).body());
                    break;
                }
                None => {
                    yield data(&ApiError::Unavailable("The model worker has stopped").body());
                    break;
                }
            }
        }
        yield Ok(sse::Event::default().data("[DONE]"));
        metrics.observe_duration(route, start.0.elapsed().as_secs_f64());
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn data(value: &Value) -> Result<sse::Event, Infallible> {
    Ok(sse::Event::default().data(value.to_string()))
}
