//! `POST /v1/chat/completions`.
use super::generate::{Alternative, Choice, Format, Generation, Logprob, respond};
use super::json::ApiJson;
use super::{AppState, RequestStart, unix_now};
use crate::api::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, FunctionCall, ToolCall,
    TopLogprob, Usage,
};
use crate::constrain::Constraint;
use crate::engine::generation::FinishReason;
use crate::error::ApiError;
use crate::tools::parse::{self, CallStream, Parsed, Syntax};
use crate::tools::{ToolRequest, tool_request};
use crate::validation::{chat_messages, check_model, generation_params, response_schema};
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
    let schema = response_schema(req.response_format)?;
    let tools = tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let syntax = match &tools {
        Some(_) => Some(template.tool_syntax().ok_or_else(|| {
            ApiError::invalid_param(
                "tools",
                format!(
                    "The chat template of the model `{}` does not support tools",
                    state.model_name
                ),
            )
        })?),
        None => None,
    };
    let demanded = tools.as_ref().zip(syntax).filter(|(t, _)| t.demands_call());
    let grammar = match (schema, demanded) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "A required tool call and `response_format` cannot both shape the answer",
            ));
        }
        (Some(schema), None) => Some(Grammar::Schema(schema)),
        (None, Some((t, s))) => Some(Grammar::Call(t.clone(), s)),
        (None, None) => None,
    };
    let permit = state.edge.admission.admit().await?;
    let constraint = match grammar {
        Some(grammar) => Some(compile(&state, grammar).await?),
        None => None,
    };
    let calls = tools
        .as_ref()
        .zip(syntax)
        .filter(|(t, _)| t.parses_calls())
        .map(|(t, syntax)| Calls {
            syntax,
            names: t.names().into_iter().map(String::from).collect(),
            parallel: t.parallel,
            streams: (0..params.n).map(|_| CallStream::new(syntax)).collect(),
        });
    // Templates add their own BOS, as transformers' apply_chat_template assumes.
    let prompt = state
        .prompts
        .run(move |p| {
            let tools = tools.as_ref().map(|t| t.tools.as_slice());
            p.encode_chat(&template, &messages, tools)
        })
        .await?;
    let format = ChatFormat {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: state.model_name.clone(),
        calls,
    };
    let generation = Generation {
        route: "/v1/chat/completions",
        start,
        permit,
        prompt,
        params,
        constraint,
        prompt_logprobs: false,
    };
    respond(state, generation, format).await
}

/// What decoding must follow: the caller's JSON schema, or a call to one of the tools.
enum Grammar {
    Schema(Value),
    Call(ToolRequest, Syntax),
}

/// The grammar compiled on the tokenizer pool: large schemas take a while.
async fn compile(state: &AppState, grammar: Grammar) -> Result<Constraint, ApiError> {
    let param = match grammar {
        Grammar::Schema(_) => "response_format",
        Grammar::Call(..) => "tools",
    };
    let lexicon = state.lexicon.get().await.ok_or_else(|| {
        ApiError::invalid_param(
            param,
            format!(
                "Constrained decoding is not available for the model `{}`",
                state.model_name
            ),
        )
    })?;
    state
        .prompts
        .run(move |_| match grammar {
            Grammar::Schema(schema) => lexicon.grammars.json_schema(schema).map_err(|e| {
                ApiError::invalid_param(param, format!("The JSON schema cannot be enforced: {e}"))
            }),
            Grammar::Call(tools, syntax) => {
                let grammars = &lexicon.grammars;
                let lark = tools.grammar(syntax, |name| grammars.special_token(name));
                grammars.lark(lark).map_err(|e| {
                    ApiError::invalid_param(
                        param,
                        format!("The tools' parameters cannot be enforced: {e}"),
                    )
                })
            }
        })
        .await
}

/// How answers are read for tool calls: the model's syntax, the tools' names, whether
/// more than one call is returned, and a stream per choice holding back what may be a call.
struct Calls {
    syntax: Syntax,
    names: Vec<String>,
    parallel: bool,
    streams: Vec<CallStream>,
}

impl Calls {
    fn parse(&self, text: &str) -> Parsed {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        self.syntax.parse(text, &names)
    }

    fn finish(&mut self, index: usize) -> Parsed {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let stream = std::mem::replace(&mut self.streams[index], CallStream::new(self.syntax));
        stream.finish(&names)
    }

    /// OpenAI's shape of the calls; `index` set for stream deltas.
    /// Without parallel calls only the first is returned (as vLLM does), since a model
    /// choosing freely may write several.
    fn tool_calls(&self, calls: Vec<parse::Call>, streamed: bool) -> Vec<ToolCall> {
        let most = if self.parallel { calls.len() } else { 1 };
        calls
            .into_iter()
            .take(most)
            .enumerate()
            .map(|(i, c)| ToolCall {
                index: streamed.then_some(i),
                id: self.syntax.call_id(),
                kind: "function",
                function: FunctionCall {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect()
    }
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    calls: Option<Calls>,
}

impl ChatFormat {
    fn chunk(&self, choice: Option<ChatChunkChoice>, usage: Option<Usage>) -> Value {
        serde_json::to_value(ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: choice.into_iter().collect(),
            usage,
        })
        .expect("chunk serializes")
    }

    fn delta(
        &self,
        index: usize,
        delta: ChatDelta,
        finish_reason: Option<&'static str>,
        logprobs: Option<Vec<Logprob>>,
    ) -> Value {
        self.chunk(
            Some(ChatChunkChoice {
                index,
                delta,
                finish_reason,
                logprobs: logprobs.map(chat_logprobs),
            }),
            None,
        )
    }
}

fn content(text: String) -> ChatDelta {
    ChatDelta {
        content: Some(text),
        ..ChatDelta::default()
    }
}

impl Format for ChatFormat {
    fn opening(&mut self, index: usize) -> Option<Value> {
        let delta = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: Vec::new(),
        };
        Some(self.delta(index, delta, None, None))
    }

    fn text(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Vec<Logprob>>,
    ) -> Option<Value> {
        let text = match &mut self.calls {
            Some(calls) => calls.streams[index].push(&text),
            None => text,
        };
        (!text.is_empty() || logprobs.is_some())
            .then(|| self.delta(index, content(text), None, logprobs))
    }

    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Value> {
        let mut chunks = Vec::new();
        let mut reason = reason.as_str();
        let finished = self.calls.as_mut().map(|c| {
            let parsed = c.finish(index);
            (parsed.content, c.tool_calls(parsed.calls, true))
        });
        if let Some((text, calls)) = finished {
            if !text.is_empty() {
                chunks.push(self.delta(index, content(text), None, None));
            }
            if !calls.is_empty() {
                let delta = ChatDelta {
                    tool_calls: calls,
                    ..ChatDelta::default()
                };
                chunks.push(self.delta(index, delta, None, None));
                reason = "tool_calls";
            }
        }
        chunks.push(self.delta(index, ChatDelta::default(), Some(reason), None));
        chunks
    }

    fn usage(&mut self, usage: Usage) -> Value {
        self.chunk(None, Some(usage))
    }

    fn whole(&mut self, choices: Vec<Choice>, usage: Usage) -> Value {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let (text, calls) = match &self.calls {
                    Some(calls) => {
                        let parsed = calls.parse(&c.text);
                        (parsed.content, calls.tool_calls(parsed.calls, false))
                    }
                    None => (c.text, Vec::new()),
                };
                let called = !calls.is_empty();
                ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: (!called || !text.is_empty()).then_some(text),
                        tool_calls: calls,
                    },
                    finish_reason: if called {
                        "tool_calls"
                    } else {
                        c.reason.as_str()
                    },
                    logprobs: c.logprobs.map(chat_logprobs),
                }
            })
            .collect();
        serde_json::to_value(ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .expect("completion serializes")
    }
}

fn chat_logprobs(logprobs: Vec<Logprob>) -> ChatLogprobs {
    let top = |a: Alternative| TopLogprob {
        token: a.token,
        logprob: a.logprob,
        bytes: a.bytes,
    };
    ChatLogprobs {
        content: logprobs
            .into_iter()
            .map(|l| ChatTokenLogprob {
                token: l.chosen.token,
                logprob: l.chosen.logprob,
                bytes: l.chosen.bytes,
                top_logprobs: l.top.into_iter().map(top).collect(),
            })
            .collect(),
        refusal: None,
    }
}
