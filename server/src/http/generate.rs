//! What chat and completions share: admission-checked prompt limits, submission to the
//! generation engine (one sequence per choice), and the answer as one JSON body or a stream
//! of server-sent events.
use super::{AppState, Engine, RequestStart};
use crate::admission::Permit;
use crate::api::Usage;
use crate::constrain::{Constraint, Lexicon};
use crate::engine::generation::{Event, FinishReason, GenerationJob, TokenLogprob};
use crate::error::ApiError;
use crate::validation::{GenerationParams, check_input_len, completion_budget};
use axum::Json;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use std::convert::Infallible;
use std::sync::Arc;
use tokenizers::Tokenizer;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// How one API shapes generated text: chat chunks carry deltas, completions carry text.
/// `index` is the choice's.
pub trait Format: Send + 'static {
    /// The event that opens a choice's stream, if the API has one.
    fn opening(&mut self, index: usize) -> Option<Value>;
    /// The prompt's log-probabilities, when the generation asked for them: its first
    /// token's text (which has none) and the rest's. They come before any text, and a stream
    /// opens its choices only then; only completions ask for them.
    fn prompt(&mut self, _first: String, _logprobs: Vec<Logprob>) {}
    /// None when nothing can be sent yet (text that may be a tool call is held).
    fn text(&mut self, index: usize, text: String, logprobs: Option<Vec<Logprob>>)
    -> Option<Value>;
    /// The choice's last events: what was held, then its finish reason.
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Value>;
    fn usage(&mut self, usage: Usage) -> Value;
    fn whole(&mut self, choices: Vec<Choice>, usage: Usage) -> Value;
}

/// One finished choice.
pub struct Choice {
    pub text: String,
    pub reason: FinishReason,
    pub logprobs: Option<Vec<Logprob>>,
}

/// A token as log-probabilities show it: its text (lossy where it holds part of a
/// character), its bytes, and its log-probability.
pub struct Alternative {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

pub struct Logprob {
    pub chosen: Alternative,
    pub top: Vec<Alternative>,
}

pub struct Generation {
    pub route: &'static str,
    pub start: RequestStart,
    pub permit: Permit,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub constraint: Option<Constraint>,
    /// Whether the prompt's log-probabilities are reported too (read by the first choice;
    /// the others share them).
    pub prompt_logprobs: bool,
}

pub async fn respond<F: Format>(
    state: Arc<AppState>,
    g: Generation,
    mut format: F,
) -> Result<Response, ApiError> {
    let Engine::Generation(engine) = &state.engine else {
        return Err(ApiError::invalid(format!(
            "The model `{}` serves the {} task; it does not generate text",
            state.model_name,
            state.info.task.as_str()
        )));
    };
    let prompt_tokens = g.prompt.len();
    check_input_len(prompt_tokens, state.max_input_tokens)?;
    let max_new_tokens = completion_budget(
        prompt_tokens,
        g.params.max_tokens,
        state.info.context_length,
    )?;
    state
        .edge
        .metrics
        .prompt_tokens
        .inc_by(prompt_tokens as u64);
    let n = g.params.n;
    let job = |index: usize, constraint: Option<Constraint>| {
        let mut sampling = g.params.sampling.clone();
        // Choices of one seeded request differ from each other and repeat as a whole.
        sampling.seed = sampling.seed.wrapping_add(index as u64);
        GenerationJob {
            prompt: g.prompt.clone(),
            sampling,
            max_new_tokens,
            stop: g.params.stop.clone(),
            constraint,
            logprobs: g.params.logprobs,
            prompt_logprobs: g.prompt_logprobs && index == 0,
            span: tracing::Span::current(),
        }
    };
    let forks: Vec<Option<Constraint>> = (1..n)
        .map(|_| g.constraint.as_ref().map(Constraint::fork))
        .collect();
    let mut first = engine.submit(job(0, g.constraint))?;
    // Later choices start once the first has read the prompt, so that they find its
    // KV-cache blocks and read only the prompt's last, partial block again.
    let head = if n > 1 { first.recv().await } else { None };
    let mut receivers = vec![first];
    for (i, constraint) in forks.into_iter().enumerate() {
        receivers.push(engine.submit(job(i + 1, constraint))?);
    }
    let tagged = receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e)));
    let mut events = futures::stream::iter(head.map(|e| (0, e)))
        .chain(futures::stream::select_all(tagged))
        .boxed();
    let tokens = TokenTexts {
        lexicon: match g.params.logprobs {
            Some(_) => state.lexicon.get().await,
            None => None,
        },
        tokenizer: state.tokenizer.clone(),
    };

    if !g.params.stream {
        let mut texts = vec![String::new(); n];
        let mut logprobs: Vec<Option<Vec<Logprob>>> = (0..n)
            .map(|_| g.params.logprobs.map(|_| Vec::new()))
            .collect();
        let mut reasons = vec![None; n];
        let mut completion_tokens = 0;
        while let Some((i, event)) = events.next().await {
            match event {
                Event::Text(t, l) => {
                    texts[i].push_str(&t);
                    if let Some(all) = &mut logprobs[i] {
                        all.extend(tokens.resolve(&l));
                    }
                }
                Event::Prompt(first, l) => format.prompt(tokens.text(first), tokens.resolve(&l)),
                Event::Done {
                    reason,
                    completion_tokens: c,
                } => {
                    reasons[i] = Some(reason);
                    completion_tokens += c;
                }
                Event::Failed(e) => return Err(e.into()),
            }
        }
        let choices = texts
            .into_iter()
            .zip(logprobs)
            .zip(reasons)
            .map(|((text, logprobs), reason)| {
                Some(Choice {
                    text,
                    reason: reason?,
                    logprobs,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(ApiError::Unavailable("The model worker has stopped"))?;
        let usage = Usage::new(prompt_tokens, completion_tokens);
        return Ok(Json(format.whole(choices, usage)).into_response());
    }

    let include_usage = g.params.include_usage;
    let prompt_first = g.prompt_logprobs;
    let with_logprobs = g.params.logprobs.is_some();
    let metrics = state.edge.metrics.clone();
    let (route, start, permit) = (g.route, g.start, g.permit);
    let stream = async_stream::stream! {
        // The permit lives as long as the stream: a draining server waits for it.
        let _permit = permit;
        // Choices open once what opens them is known.
        let opening = |format: &mut F| (0..n).filter_map(|i| format.opening(i)).collect::<Vec<_>>();
        if !prompt_first {
            for chunk in opening(&mut format) {
                yield data(&chunk);
            }
        }
        let (mut done, mut completion_tokens, mut failed) = (0, 0, false);
        while let Some((i, event)) = events.next().await {
            match event {
                Event::Text(t, l) => {
                    let logprobs = with_logprobs.then(|| tokens.resolve(&l));
                    if let Some(chunk) = format.text(i, t, logprobs) {
                        yield data(&chunk);
                    }
                }
                Event::Prompt(first, l) => {
                    format.prompt(tokens.text(first), tokens.resolve(&l));
                    for chunk in opening(&mut format) {
                        yield data(&chunk);
                    }
                }
                Event::Done { reason, completion_tokens: c } => {
                    for chunk in format.finish(i, reason) {
                        yield data(&chunk);
                    }
                    (done, completion_tokens) = (done + 1, completion_tokens + c);
                }
                Event::Failed(e) => {
                    yield data(&ApiError::from(e).body());
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // Its error is the stream's last event.
        } else if done < n {
            yield data(&ApiError::Unavailable("The model worker has stopped").body());
        } else if include_usage {
            yield data(&format.usage(Usage::new(prompt_tokens, completion_tokens)));
        }
        yield Ok(sse::Event::default().data("[DONE]"));
        metrics.observe_duration(route, start.0.elapsed().as_secs_f64());
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Token ids to what log-probabilities show of them: exact bytes from the lexicon, else
/// what the tokenizer decodes of the token alone.
struct TokenTexts {
    lexicon: Option<Arc<Lexicon>>,
    tokenizer: Arc<Tokenizer>,
}

impl TokenTexts {
    fn bytes(&self, token: u32) -> Vec<u8> {
        match &self.lexicon {
            Some(l) => l.vocabulary.token_bytes(token).to_vec(),
            None => self
                .tokenizer
                .decode(&[token], false)
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    fn text(&self, token: u32) -> String {
        String::from_utf8_lossy(&self.bytes(token)).into_owned()
    }

    fn resolve(&self, logprobs: &[TokenLogprob]) -> Vec<Logprob> {
        let alternative = |token: u32, logprob: f32| {
            let bytes = self.bytes(token);
            Alternative {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                // OpenAI's stand-in for an impossible token: JSON has no infinity.
                logprob: logprob.max(-9999.0),
            }
        };
        logprobs
            .iter()
            .map(|l| Logprob {
                chosen: alternative(l.token, l.logprob),
                top: l.top.iter().map(|&(t, lp)| alternative(t, lp)).collect(),
            })
            .collect()
    }
}

fn data(value: &Value) -> Result<sse::Event, Infallible> {
    Ok(sse::Event::default().data(value.to_string()))
}
