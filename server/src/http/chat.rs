//! `POST /v1/chat/completions`.
use super::generate::{Format, Generation, respond};
use super::json::ApiJson;
use super::{AppState, RequestStart, unix_now};
use crate::api::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, Usage,
};
use crate::engine::generation::FinishReason;
use crate::error::ApiError;
use crate::validation::{chat_messages, check_model, generation_params};
use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(start): Extension<RequestStart>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&req.model, &state.model_name)?;
    let template = state.chat_template.clone().ok_or_else(|| {
        ApiError::invalid(format!(
            "The model `{}` has no chat template; use /v1/completions",
            state.model_name
        ))
    })?;
    let messages = chat_messages(req.messages)?;
    let params = generation_params(req.sampling)?;
    let permit = state.admission.admit().await?;
    // Templates add their own BOS, as transformers' apply_chat_template assumes.
    let prompt = state
        .prompts
        .run(move |p| p.encode_chat(&template, &messages))
        .await?;
    let format = ChatFormat {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.model_name.clone(),
    };
    let generation = Generation {
        route: "/v1/chat/completions",
        start,
        permit,
        prompt,
        params,
    };
    respond(state, generation, format).await
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
}

impl ChatFormat {
    fn chunk(
        &self,
        delta: ChatDelta,
        finish_reason: Option<&'static str>,
        usage: Option<Usage>,
    ) -> Value {
        let choices = if usage.is_some() {
            Vec::new()
        } else {
            vec![ChatChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
            }]
        };
        serde_json::to_value(ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .expect("chunk serializes")
    }
}

impl Format for ChatFormat {
    fn opening(&self) -> Option<Value> {
        Some(self.chunk(
            ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            None,
            None,
        ))
    }

    fn text(&self, text: String) -> Value {
        self.chunk(
            ChatDelta {
                role: None,
                content: Some(text),
            },
            None,
            None,
        )
    }

    fn finish(&self, reason: FinishReason) -> Value {
        self.chunk(ChatDelta::default(), Some(reason.as_str()), None)
    }

    fn usage(&self, usage: Usage) -> Value {
        self.chunk(ChatDelta::default(), None, Some(usage))
    }

    fn whole(&self, text: String, reason: FinishReason, usage: Usage) -> Value {
        serde_json::to_value(ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                finish_reason: reason.as_str(),
                logprobs: None,
            }],
            usage,
        })
        .expect("completion serializes")
    }
}
