//! `POST /v1/completions`.
use super::generate::{Format, Generation, respond};
use super::json::ApiJson;
use super::{AppState, RequestStart, unix_now};
use crate::api::{Completion, CompletionChoice, CompletionRequest, Usage};
use crate::engine::generation::FinishReason;
use crate::error::ApiError;
use crate::validation::{
    PromptInput, check_model, check_token_ids, completion_prompt, generation_params,
};
use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;

const DEFAULT_MAX_TOKENS: usize = 16;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(start): Extension<RequestStart>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&req.model, &state.model_name)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "`suffix` is not supported",
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid_param("best_of", "`best_of` must be 1"));
    }
    let prompt = completion_prompt(req.prompt)?;
    let mut params = generation_params(req.sampling)?;
    // OpenAI's legacy completions stop at 16 tokens unless told otherwise; clients rely on it.
    params.max_tokens.get_or_insert(DEFAULT_MAX_TOKENS);
    let permit = state.admission.admit().await?;
    let prompt = match prompt {
        PromptInput::Tokens(ids) => {
            check_token_ids("prompt", &ids, state.info.vocab_size)?;
            ids
        }
        PromptInput::Text(text) => {
            state
                .prompts
                .run(move |p| p.encode("prompt", &text, true))
                .await?
        }
    };
    let format = CompletionFormat {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.model_name.clone(),
    };
    let generation = Generation {
        route: "/v1/completions",
        start,
        permit,
        prompt,
        params,
    };
    respond(state, generation, format).await
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
}

impl CompletionFormat {
    fn body(
        &self,
        text: String,
        finish_reason: Option<&'static str>,
        usage: Option<Usage>,
        with_choice: bool,
    ) -> Value {
        let choices = if with_choice {
            vec![CompletionChoice {
                index: 0,
                text,
                finish_reason,
                logprobs: None,
            }]
        } else {
            Vec::new()
        };
        serde_json::to_value(Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .expect("completion serializes")
    }
}

impl Format for CompletionFormat {
    fn opening(&self) -> Option<Value> {
        None
    }

    fn text(&self, text: String) -> Value {
        self.body(text, None, None, true)
    }

    fn finish(&self, reason: FinishReason) -> Value {
        self.body(String::new(), Some(reason.as_str()), None, true)
    }

    fn usage(&self, usage: Usage) -> Value {
        self.body(String::new(), None, Some(usage), false)
    }

    fn whole(&self, text: String, reason: FinishReason, usage: Usage) -> Value {
        self.body(text, Some(reason.as_str()), Some(usage), true)
    }
}
