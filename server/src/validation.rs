//! Requests to typed work: every check a request must pass before it reaches a model,
//! each failing with a 400 that names the field and the limit.
use crate::api::{
    ChatMessage, EmbeddingInput, MessageContent, Prompt, ResponseFormat, SamplingFields,
    StringOrList,
};
use crate::engine::SamplingParams;
use crate::error::ApiError;
use serde::de::DeserializeOwned;

/// OpenAI allows at most four stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;
/// OpenAI's limit on alternatives per token.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Choices per request: each is a sequence in the engine, so a request may not take many.
pub const MAX_CHOICES: usize = 16;
/// OpenAI's limit on inputs in one embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Parses a JSON body, naming the offending field on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}")))?;
    serde_path_to_error::deserialize(&value).map_err(|err| {
        let mut path = err.path().to_string();
        let mut inner = err.into_inner().to_string();
        // serde loses the path inside `#[serde(flatten)]`: look for the field there.
        if path == "."
            && let Err(flat) = serde_path_to_error::deserialize::<_, SamplingFields>(&value)
        {
            path = flat.path().to_string();
            inner = flat.into_inner().to_string();
        }
        if path == "." {
            ApiError::invalid(format!("Invalid request: {inner}"))
        } else {
            ApiError::invalid_param(&path, format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

/// Fields the server accepts and ignores: they never change what the caller gets.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// OpenAI fields the server does not implement yet: each would change the answer, so a
/// request that uses one is refused rather than answered as if it had not asked.
pub const UNSUPPORTED_FIELDS: &[&str] = &[
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
];

/// The fields no part of the request read: harmless ones and those set to what OpenAI
/// does by default pass; an unsupported one is a 400 naming it, and any other is refused
/// in OpenAI's own words for an argument it does not know.
pub fn unread_fields(unread: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::json;
    for (name, value) in unread {
        let default = match name.as_str() {
            "modalities" => value == &json!(["text"]),
            "logit_bias" | "functions" => {
                value.as_object().is_some_and(|m| m.is_empty())
                    || value.as_array().is_some_and(|a| a.is_empty())
            }
            _ => false,
        };
        if value.is_null() || default || IGNORED_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let message = if UNSUPPORTED_FIELDS.contains(&name.as_str()) {
            format!("`{name}` is not supported by this server")
        } else {
            format!("Unrecognized request argument supplied: {name}")
        };
        return Err(ApiError::invalid_param(name, message));
    }
    Ok(())
}

/// The one model this server serves; any other id is a 404 as in OpenAI.
pub fn check_model(requested: &str, served: &str) -> Result<(), ApiError> {
    if requested == served {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(requested.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate from the one prompt.
    pub n: usize,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
}

fn in_range(param: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        )),
        v => Ok(v),
    }
}

pub fn generation_params(f: SamplingFields) -> Result<GenerationParams, ApiError> {
    let temperature = in_range("temperature", f.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = match in_range("top_p", f.top_p, 0.0, 1.0)? {
        Some(0.0) => {
            return Err(ApiError::invalid_param(
                "top_p",
                "`top_p` must be greater than 0",
            ));
        }
        Some(p) if p < 1.0 => Some(p),
        _ => None,
    };
    let top_k = match f.top_k {
        Some(k) if k < 0 => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be 0 (disabled) or positive, got {k}"),
            ));
        }
        Some(k) if k > 0 => Some(k as usize),
        _ => None,
    };
    let presence_penalty = in_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    let frequency_penalty = in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("`max_tokens` must be at least 1, got {m}"),
            ));
        }
        m => m.map(|m| m as usize),
    };
    let n = match f.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_param(
                "n",
                format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
    };
    let logprobs = logprobs(f.logprobs, f.top_logprobs)?;
    let stop = f.stop.map(StringOrList::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "Stop sequences must not be empty",
        ));
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            presence_penalty: presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: frequency_penalty.unwrap_or(0.0) as f32,
        },
        max_tokens,
        stop,
        include_usage: f.stream && f.stream_options.is_some_and(|o| o.include_usage),
        stream: f.stream,
        n,
        logprobs,
    })
}

/// Chat's `logprobs: true` with `top_logprobs: k`, or completions' `logprobs: k`: the
/// number of alternatives per token, None when log-probabilities are not asked for.
fn logprobs(
    logprobs: Option<serde_json::Value>,
    top_logprobs: Option<i64>,
) -> Result<Option<usize>, ApiError> {
    use serde_json::Value;
    let top = |param: &str, k: i64| {
        if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
            Ok(k as usize)
        } else {
            Err(ApiError::invalid_param(
                param,
                format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    match (logprobs, top_logprobs) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), Some(k)) if k > 0 => {
            Err(ApiError::invalid_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ))
        }
        (None | Some(Value::Null) | Some(Value::Bool(false)), _) => Ok(None),
        (Some(Value::Bool(true)), k) => top("top_logprobs", k.unwrap_or(0)).map(Some),
        (Some(Value::Number(k)), _) => match k.as_i64() {
            Some(k) => top("logprobs", k).map(Some),
            None => Err(ApiError::invalid_param(
                "logprobs",
                format!("`logprobs` must be a whole number, got {k}"),
            )),
        },
        (Some(other), _) => Err(ApiError::invalid_param(
            "logprobs",
            format!("`logprobs` must be a boolean or a number, got {other}"),
        )),
    }
}

/// The JSON schema the answer must follow, if `response_format` asks for one.
pub fn response_schema(
    format: Option<ResponseFormat>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let any_object = || serde_json::json!({"type": "object"});
    match format {
        None | Some(ResponseFormat::Text) => Ok(None),
        Some(ResponseFormat::JsonObject) => Ok(Some(any_object())),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let name = &json_schema.name;
            // OpenAI's rule for the name; clients derive it from a class name.
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.name",
                    format!(
                        "`response_format.json_schema.name` must be 1 to 64 letters, digits, \
                         `_` or `-`, got {name:?}"
                    ),
                ));
            }
            Ok(Some(json_schema.schema.unwrap_or_else(any_object)))
        }
    }
}

/// A chat message as the chat template sees it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls as transformers hands them to templates: arguments as
    /// an object where they parse as one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub fn chat_messages(messages: Vec<ChatMessage>) -> Result<Vec<TemplateMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid_param(
                    &format!("{param}.role"),
                    format!("Unknown role `{}`; expected one of {}", m.role, ROLES.join(", ")),
                ));
            }
            let content = match m.content {
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid_param(
                                    &format!("{param}.content"),
                                    format!("Content parts of type `{kind}` are not supported; send text"),
                                ));
                            }
                        }
                    }
                    text
                }
                // An assistant turn that only calls tools has no text.
                None if m.role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid_param(
                        &format!("{param}.content"),
                        format!("`{param}.content` is required"),
                    ));
                }
            };
            let calls = m.tool_calls.unwrap_or_default();
            if !calls.is_empty() && m.role != "assistant" {
                return Err(ApiError::invalid_param(
                    &format!("{param}.tool_calls"),
                    "Only assistant messages carry `tool_calls`",
                ));
            }
            let tool_calls = calls
                .into_iter()
                .map(|c| {
                    let arguments = serde_json::from_str::<serde_json::Value>(&c.function.arguments)
                        .ok()
                        .filter(serde_json::Value::is_object)
                        .unwrap_or(serde_json::Value::String(c.function.arguments));
                    serde_json::json!({"id": c.id, "type": "function",
                        "function": {"name": c.function.name, "arguments": arguments}})
                })
                .collect();
            Ok(TemplateMessage {
                role: m.role,
                content,
                name: m.name,
                tool_calls,
                tool_call_id: m.tool_call_id,
            })
        })
        .collect()
}

/// A prompt that still needs tokenizing, or one already given as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn completion_prompt(prompt: Prompt) -> Result<PromptInput, ApiError> {
    let mut inputs = prompt_inputs("prompt", prompt_to_inputs(prompt))?;
    if inputs.len() != 1 {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("One prompt per request is supported, got {}", inputs.len()),
        ));
    }
    Ok(inputs.remove(0))
}

fn prompt_to_inputs(prompt: Prompt) -> Vec<PromptInput> {
    match prompt {
        Prompt::Text(t) => vec![PromptInput::Text(t)],
        Prompt::Texts(ts) => ts.into_iter().map(PromptInput::Text).collect(),
        Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
        Prompt::TokenLists(ls) => ls.into_iter().map(PromptInput::Tokens).collect(),
    }
}

pub fn embedding_inputs(input: EmbeddingInput) -> Result<Vec<PromptInput>, ApiError> {
    let inputs = match input {
        EmbeddingInput::Text(t) => vec![PromptInput::Text(t)],
        EmbeddingInput::Texts(ts) => ts.into_iter().map(PromptInput::Text).collect(),
        EmbeddingInput::Tokens(ids) => vec![PromptInput::Tokens(ids)],
        EmbeddingInput::TokenLists(ls) => ls.into_iter().map(PromptInput::Tokens).collect(),
    };
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            format!(
                "At most {MAX_EMBEDDING_INPUTS} inputs per request, got {}",
                inputs.len()
            ),
        ));
    }
    prompt_inputs("input", inputs)
}

fn prompt_inputs(param: &str, inputs: Vec<PromptInput>) -> Result<Vec<PromptInput>, ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            format!("`{param}` must not be empty"),
        ));
    }
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            PromptInput::Text(t) => t.is_empty(),
            PromptInput::Tokens(ids) => ids.is_empty(),
        };
        if empty {
            return Err(ApiError::invalid_param(
                &format!("{param}[{i}]"),
                format!("`{param}` must not contain empty entries"),
            ));
        }
    }
    Ok(inputs)
}

/// Checks token ids given by the client against the vocabulary.
pub fn check_token_ids(param: &str, ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ApiError::invalid_param(
            param,
            format!("Token id {id} is out of range; the vocabulary has {vocab_size} tokens"),
        )),
        None => Ok(()),
    }
}

pub fn check_input_len(prompt_tokens: usize, max_input_tokens: usize) -> Result<(), ApiError> {
    if prompt_tokens > max_input_tokens {
        return Err(ApiError::invalid(format!(
            "The input has {prompt_tokens} tokens, more than this model's limit of \
             {max_input_tokens} input tokens"
        )));
    }
    Ok(())
}

/// The number of tokens a generation may produce: what was asked, within the context.
pub fn completion_budget(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    context_length: usize,
) -> Result<usize, ApiError> {
    let room = context_length.saturating_sub(prompt_tokens);
    match max_tokens {
        Some(m) if m > room => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's context length is {context_length} tokens; the prompt has \
                 {prompt_tokens} and max_tokens asks for {m} more"
            ),
        )),
        Some(m) => Ok(m),
        None if room == 0 => Err(ApiError::invalid(format!(
            "The prompt's {prompt_tokens} tokens fill this model's context of {context_length}"
        ))),
        None => Ok(room),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};
    use proptest::prelude::*;

    fn chat(body: &str) -> Result<GenerationParams, ApiError> {
        let req: ChatCompletionRequest = parse_json(body.as_bytes())?;
        chat_messages(req.messages)?;
        generation_params(req.sampling)
    }

    /// What the request left unread, and the verdict on it.
    fn unread<T: DeserializeOwned + crate::api::RequestBody>(
        body: &str,
    ) -> Result<Vec<String>, ApiError> {
        let req: T = parse_json(body.as_bytes())?;
        unread_fields(req.unread())?;
        Ok(req.unread().keys().cloned().collect())
    }

    #[test]
    fn fields_that_would_change_the_answer_are_refused_by_name_and_harmless_ones_pass() {
        let chat = |extra: &str| {
            let body =
                format!(r#"{{"model":"m","messages":[],"temperature":0.5,"stream":false{extra}}}"#);
            unread::<ChatCompletionRequest>(&body)
        };
        // Fields the server reads are not "unread", even through the flattened sampling.
        assert_eq!(chat("").unwrap(), Vec::<String>::new());
        for harmless in [
            r#","user":"u-1","metadata":{"k":"v"},"store":false"#,
            r#","logit_bias":{},"modalities":["text"],"audio":null"#,
        ] {
            assert!(chat(harmless).is_ok(), "{harmless}");
        }
        for (extra, param, words) in [
            (
                r#","functions":[{"name":"f"}]"#,
                "functions",
                "not supported",
            ),
            (r#","audio":{"voice":"alloy"}"#, "audio", "not supported"),
            (
                r#","modalities":["text","audio"]"#,
                "modalities",
                "not supported",
            ),
            (
                r#","prediction":{"type":"content"}"#,
                "prediction",
                "not supported",
            ),
            (
                r#","logit_bias":{"50256":-100}"#,
                "logit_bias",
                "not supported",
            ),
            (
                r#","temprature":0.2"#,
                "temprature",
                "Unrecognized request argument",
            ),
        ] {
            let e = chat(extra).unwrap_err();
            let body = e.body();
            assert_eq!(e.status().as_u16(), 400);
            assert_eq!(body["error"]["param"], param);
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(param) && message.contains(words),
                "{message}"
            );
        }
        let e = unread::<EmbeddingRequest>(r#"{"model":"m","input":"x","truncate":true}"#);
        assert_eq!(e.unwrap_err().body()["error"]["param"], "truncate");
        let ok =
            unread::<CompletionRequest>(r#"{"model":"m","prompt":"x","echo":false,"user":"u"}"#);
        assert_eq!(ok.unwrap(), ["user"]);
    }

    #[test]
    fn defaults_follow_openai() {
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, None);
        assert_eq!(p.max_tokens, None);
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn rejects_bad_sampling_values_naming_the_field() {
        for (body, param) in [
            (r#""temperature":-1"#, "temperature"),
            (r#""temperature":2.5"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""top_p":1.5"#, "top_p"),
            (r#""top_k":-3"#, "top_k"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""n":0"#, "n"),
            (r#""n":17"#, "n"),
            (r#""logprobs":"yes""#, "logprobs"),
            (r#""logprobs":21"#, "logprobs"),
            (r#""logprobs":true,"top_logprobs":-1"#, "top_logprobs"),
            (r#""presence_penalty":3"#, "presence_penalty"),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
            (r#""temperature":"hot""#, "temperature"),
        ] {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{body}}}"#);
            match chat(&body) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: expected a 400 naming {param}, got {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_empty_and_malformed_messages() {
        assert!(chat(r#"{"model":"m","messages":[]}"#).is_err());
        assert!(chat(r#"{"model":"m"}"#).is_err());
        assert!(chat(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#).is_err());
        assert!(chat(r#"{"model":"m","messages":[{"role":"user"}]}"#).is_err());
        assert!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#)
                .is_err()
        );
        assert!(chat("{not json").is_err());
    }

    #[test]
    fn text_parts_are_joined() {
        let req: ChatCompletionRequest = parse_json(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(chat_messages(req.messages).unwrap()[0].content, "ab");
    }

    #[test]
    fn budget_respects_context() {
        assert_eq!(completion_budget(10, Some(5), 100).unwrap(), 5);
        assert_eq!(completion_budget(10, None, 100).unwrap(), 90);
        assert!(completion_budget(10, Some(91), 100).is_err());
        assert!(completion_budget(100, None, 100).is_err());
        assert!(
            check_input_len(513, 512)
                .unwrap_err()
                .to_string()
                .contains("512")
        );
    }

    #[test]
    fn embedding_inputs_in_every_form() {
        let parse = |b: &str| {
            let r: EmbeddingRequest = parse_json(b.as_bytes())?;
            embedding_inputs(r.input)
        };
        assert_eq!(parse(r#"{"model":"m","input":"a"}"#).unwrap().len(), 1);
        assert_eq!(
            parse(r#"{"model":"m","input":["a","b"]}"#).unwrap().len(),
            2
        );
        assert_eq!(
            parse(r#"{"model":"m","input":[1,2,3]}"#).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            parse(r#"{"model":"m","input":[[1],[2]]}"#).unwrap().len(),
            2
        );
        assert!(parse(r#"{"model":"m","input":""}"#).is_err());
        assert!(parse(r#"{"model":"m","input":[]}"#).is_err());
        assert!(parse(r#"{"model":"m","input":["a",""]}"#).is_err());
        assert!(parse(r#"{"model":"m","input":7}"#).is_err());
    }

    /// JSON of any shape, a few levels deep: what a hostile client can put in a field.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::json!("user")),
            Just(serde_json::json!("text")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("type".to_string()),
                        Just("text".to_string()),
                        Just("include_usage".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..4,
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        // Whatever bytes arrive, parsing and validation answer Ok or a 400, and never panic.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(req) = parse_json::<ChatCompletionRequest>(&body) {
                let _ = chat_messages(req.messages);
                let _ = generation_params(req.sampling);
            }
            if let Ok(req) = parse_json::<CompletionRequest>(&body) {
                let _ = completion_prompt(req.prompt);
            }
            if let Err(e) = parse_json::<EmbeddingRequest>(&body) {
                prop_assert_eq!(e.status().as_u16(), 400);
            }
        }

        // Valid JSON of any shape in every field a request has: Ok, or a 400.
        #[test]
        fn arbitrary_json_in_every_field_is_ok_or_a_400(
            fields in proptest::collection::vec((
                prop_oneof![
                    Just("model"), Just("messages"), Just("prompt"), Just("input"), Just("stop"),
                    Just("stream"), Just("stream_options"), Just("logprobs"), Just("seed"),
                    Just("max_tokens"), Just("temperature"), Just("top_p"), Just("n"),
                ],
                json_value(),
            ), 0..6)
        ) {
            let body = serde_json::Value::Object(
                fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            );
            let bytes = body.to_string().into_bytes();
            let outcomes = [
                parse_json::<ChatCompletionRequest>(&bytes).and_then(|r| {
                    chat_messages(r.messages)?;
                    generation_params(r.sampling).map(drop)
                }),
                parse_json::<CompletionRequest>(&bytes).and_then(|r| {
                    completion_prompt(r.prompt)?;
                    generation_params(r.sampling).map(drop)
                }),
                parse_json::<EmbeddingRequest>(&bytes).and_then(|r| embedding_inputs(r.input).map(drop)),
            ];
            for outcome in outcomes {
                if let Err(e) = outcome {
                    prop_assert_eq!(e.status().as_u16(), 400);
                }
            }
        }

        // Structured but hostile JSON: random values in every sampling field.
        #[test]
        fn arbitrary_sampling_values_are_validated(
            t in any::<f64>(), p in any::<f64>(), k in any::<i64>(), m in any::<i64>(), n in any::<i64>()
        ) {
            let body = serde_json::json!({
                "model": "m", "messages": [{"role": "user", "content": "x"}],
                "temperature": t, "top_p": p, "top_k": k, "max_tokens": m, "n": n,
            });
            match chat(&body.to_string()) {
                Ok(params) => {
                    prop_assert!((0.0..=2.0).contains(&params.sampling.temperature));
                    prop_assert!(params.max_tokens.is_none_or(|m| m >= 1));
                }
                Err(e) => prop_assert_eq!(e.status().as_u16(), 400),
            }
        }
    }
}
