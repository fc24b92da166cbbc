//! `POST /v1/completions`.
use super::generate::{Choice, Format, Generation, Logprob, respond};
use super::json::ApiJson;
use super::{AppState, RequestStart, unix_now};
use crate::api::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage};
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
    let echo = req.echo.unwrap_or(false);
    // OpenAI's legacy completions stop at 16 tokens unless told otherwise; clients rely on it.
    params.max_tokens.get_or_insert(DEFAULT_MAX_TOKENS);
    let permit = state.edge.admission.admit().await?;
    let (prompt, prompt_text) = match prompt {
        PromptInput::Tokens(ids) => {
            check_token_ids("prompt", &ids, state.info.vocab_size)?;
            let text = echo.then(|| state.tokenizer.decode(&ids, false).unwrap_or_default());
            (ids, text)
        }
        PromptInput::Text(text) => {
            let ids = state
                .prompts
                .run(move |p| Ok((p.encode("prompt", &text, true)?, text)))
                .await?;
            (ids.0, echo.then_some(ids.1))
        }
    };
    let format = CompletionFormat {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.model_name.clone(),
        offsets: vec![prompt_text.as_deref().map_or(0, |t| t.chars().count()); params.n],
        echo: prompt_text,
        prompt_logprobs: None,
    };
    // The echoed prompt's log-probabilities, as lm-evaluation-harness asks for them to score
    // a text.
    let prompt_logprobs = echo && params.logprobs.is_some();
    let generation = Generation {
        route: "/v1/completions",
        start,
        permit,
        prompt,
        params,
        constraint: None,
        prompt_logprobs,
    };
    respond(state, generation, format).await
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    /// The prompt, when `echo` asks for it before each choice's text.
    echo: Option<String>,
    /// Characters of each choice's text so far: where its next token starts.
    offsets: Vec<usize>,
    /// The echoed prompt's log-probabilities, once read.
    prompt_logprobs: Option<CompletionLogprobs>,
}

impl CompletionFormat {
    fn body(&self, choice: Option<CompletionChoice>, usage: Option<Usage>) -> Value {
        serde_json::to_value(Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: choice.into_iter().collect(),
            usage,
        })
        .expect("completion serializes")
    }

    fn logprobs(&mut self, index: usize, logprobs: Vec<Logprob>) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        extend(&mut out, &mut self.offsets[index], logprobs);
        out
    }
}

/// Appends tokens to OpenAI's parallel lists, `offset` counting characters from the start
/// of the choice's text.
fn extend(out: &mut CompletionLogprobs, offset: &mut usize, logprobs: Vec<Logprob>) {
    for l in logprobs {
        out.text_offset.push(*offset);
        *offset += l.chosen.token.chars().count();
        out.top_logprobs.push(Some(
            l.top
                .into_iter()
                .map(|a| (a.token, a.logprob.into()))
                .collect(),
        ));
        out.tokens.push(l.chosen.token);
        out.token_logprobs.push(Some(l.chosen.logprob));
    }
}

impl Format for CompletionFormat {
    fn prompt(&mut self, first: String, logprobs: Vec<Logprob>) {
        let mut offset = first.chars().count();
        let mut out = CompletionLogprobs {
            tokens: vec![first],
            token_logprobs: vec![None],
            top_logprobs: vec![None],
            text_offset: vec![0],
        };
        extend(&mut out, &mut offset, logprobs);
        self.prompt_logprobs = Some(out);
    }

    fn opening(&mut self, index: usize) -> Option<Value> {
        let choice = CompletionChoice {
            index,
            text: self.echo.clone()?,
            finish_reason: None,
            logprobs: self.prompt_logprobs.clone(),
        };
        Some(self.body(Some(choice), None))
    }

    fn text(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Vec<Logprob>>,
    ) -> Option<Value> {
        let logprobs = logprobs.map(|l| self.logprobs(index, l));
        let choice = CompletionChoice {
            index,
            text,
            finish_reason: None,
            logprobs,
        };
        Some(self.body(Some(choice), None))
    }

    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Value> {
        let choice = CompletionChoice {
            index,
            text: String::new(),
            finish_reason: Some(reason.as_str()),
            logprobs: None,
        };
        vec![self.body(Some(choice), None)]
    }

    fn usage(&mut self, usage: Usage) -> Value {
        self.body(None, Some(usage))
    }

    fn whole(&mut self, choices: Vec<Choice>, usage: Usage) -> Value {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| CompletionChoice {
                index,
                text: self.echo.clone().unwrap_or_default() + &c.text,
                finish_reason: Some(c.reason.as_str()),
                logprobs: c.logprobs.map(|l| {
                    let mut all = self.prompt_logprobs.clone().unwrap_or_default();
                    extend(&mut all, &mut self.offsets[index], l);
                    all
                }),
            })
            .collect();
        serde_json::to_value(Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: Some(usage),
        })
        .expect("completion serializes")
    }
}
