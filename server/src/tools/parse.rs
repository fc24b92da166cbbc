//! The model's tool-call syntax read back into calls. Output that does not parse as calls
//! to the request's tools is the answer's text, unchanged: a model's mistake is never an
//! error for the caller.
use serde_json::Value;

/// How a family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// Qwen2.5, Qwen3, Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    /// one block per call, possibly after some text.
    Hermes,
    /// Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (calls separated
    /// by `;`), possibly after `<|python_tag|>`.
    LlamaJson,
    /// Mistral: the whole answer is `[TOOL_CALLS]` and a JSON list of
    /// `{"name": ..., "arguments": {...}}` (the marker is a special token, gone from the text
    /// when decoded).
    Mistral,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
pub const MISTRAL_CALLS: &str = "[TOOL_CALLS]";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub name: String,
    /// A JSON object, as text: OpenAI's `function.arguments`.
    pub arguments: String,
}

/// An answer split into text and calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<Call>,
}

impl Syntax {
    /// Calls to tools named in `known`; the text itself when anything else is found.
    pub fn parse(self, text: &str, known: &[&str]) -> Parsed {
        let calls = match self {
            Self::Hermes => hermes(text, known),
            Self::LlamaJson => llama_json(text, known),
            Self::Mistral => mistral(text, known),
        };
        match calls {
            Some((content, calls)) if !calls.is_empty() => Parsed { content, calls },
            _ => Parsed {
                content: text.to_string(),
                calls: Vec::new(),
            },
        }
    }

    /// Where a call may start in `text`, the answer so far (an end that could begin a
    /// marker counts): text before it can be streamed; None when no call has begun.
    fn call_start(self, text: &str) -> Option<usize> {
        match self {
            Self::Hermes => text
                .find(HERMES_OPEN)
                .or_else(|| partial_suffix(text, HERMES_OPEN)),
            // A Llama answer is a call only when it opens with one.
            Self::LlamaJson => {
                let rest = text.trim_start();
                let opens = rest.starts_with('{')
                    || rest.starts_with(PYTHON_TAG)
                    || PYTHON_TAG.starts_with(rest);
                opens.then_some(0)
            }
            Self::Mistral => {
                let rest = text.trim_start();
                let list = rest
                    .strip_prefix('[')
                    .is_some_and(|r| r.trim_start().is_empty() || r.trim_start().starts_with('{'));
                let opens =
                    list || rest.starts_with(MISTRAL_CALLS) || MISTRAL_CALLS.starts_with(rest);
                opens.then_some(0)
            }
        }
    }

    /// An id for a call the model made: Mistral's templates accept only nine letters or
    /// digits when the call comes back; others take OpenAI's `call_` form.
    pub fn call_id(self) -> String {
        let random = uuid::Uuid::new_v4().simple().to_string();
        match self {
            Self::Mistral => random[..9].to_string(),
            Self::Hermes | Self::LlamaJson => format!("call_{random}"),
        }
    }
}

/// Where `text` ends with a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> Option<usize> {
    (1..marker.len())
        .rev()
        .map(|n| text.len().saturating_sub(n))
        .find(|&at| text.is_char_boundary(at) && marker.starts_with(&text[at..]))
}

fn hermes(text: &str, known: &[&str]) -> Option<(String, Vec<Call>)> {
    let first = text.find(HERMES_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(after) = rest.strip_prefix(HERMES_OPEN) {
        // A model that stops right after the object may leave the block unclosed.
        let (body, next) = after.split_once(HERMES_CLOSE).unwrap_or((after, ""));
        calls.push(call(body, "arguments", known)?);
        rest = next.trim_start();
    }
    rest.is_empty()
        .then(|| (text[..first].trim_end().to_string(), calls))
}

fn llama_json(text: &str, known: &[&str]) -> Option<(String, Vec<Call>)> {
    let body = text.trim();
    let mut rest = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim_start();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        calls.push(call_of(values.next()?.ok()?, "parameters", known)?);
        rest = rest[values.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some((String::new(), calls))
}

fn mistral(text: &str, known: &[&str]) -> Option<(String, Vec<Call>)> {
    let body = text.trim();
    let body = body.strip_prefix(MISTRAL_CALLS).unwrap_or(body);
    let calls = match serde_json::from_str(body.trim()).ok()? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| call_of(item, "arguments", known))
            .collect::<Option<Vec<_>>>()?,
        one => vec![call_of(one, "arguments", known)?],
    };
    Some((String::new(), calls))
}

fn call(body: &str, arguments_key: &str, known: &[&str]) -> Option<Call> {
    call_of(
        serde_json::from_str(body.trim()).ok()?,
        arguments_key,
        known,
    )
}

/// `{"name": N, KEY: {...}}` (either key name accepted) for a known tool N.
fn call_of(value: Value, arguments_key: &str, known: &[&str]) -> Option<Call> {
    let name = value.get("name")?.as_str()?;
    if !known.contains(&name) {
        return None;
    }
    let arguments = value
        .get(arguments_key)
        .or_else(|| value.get("arguments"))
        .or_else(|| value.get("parameters"))
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Some models write the arguments as a JSON string; OpenAI's field is that string.
    let arguments = match arguments {
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok_and(|v| v.is_object()) => s,
        Value::Object(_) => arguments.to_string(),
        _ => return None,
    };
    Some(Call {
        name: name.to_string(),
        arguments,
    })
}

/// Streams an answer's text while no call has begun, then holds the rest to parse whole.
pub struct CallStream {
    syntax: Syntax,
    text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
}

impl CallStream {
    pub fn new(syntax: Syntax) -> Self {
        Self {
            syntax,
            text: String::new(),
            sent: 0,
        }
    }

    /// The text that can be streamed now.
    pub fn push(&mut self, text: &str) -> String {
        self.text.push_str(text);
        let until = self
            .syntax
            .call_start(&self.text)
            .unwrap_or(self.text.len())
            .max(self.sent);
        let out = self.text[self.sent..until].to_string();
        self.sent = until;
        out
    }

    /// What is left of the text, and the calls, once the answer is complete.
    pub fn finish(self, known: &[&str]) -> Parsed {
        let held = &self.text[self.sent..];
        let parsed = self.syntax.parse(&self.text, known);
        if parsed.calls.is_empty() {
            return Parsed {
                content: held.to_string(),
                calls: Vec::new(),
            };
        }
        // Text before the calls that was not streamed yet (Hermes may write some).
        let content = parsed.content.get(self.sent..).unwrap_or("").to_string();
        Parsed {
            content,
            calls: parsed.calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["get_weather", "search"];

    fn calls(parsed: &Parsed) -> Vec<(&str, Value)> {
        parsed
            .calls
            .iter()
            .map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).unwrap()))
            .collect()
    }

    #[test]
    fn hermes_blocks_become_calls_and_the_text_before_them_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"x\"}}\n</tool_call>";
        let parsed = Syntax::Hermes.parse(text, KNOWN);
        assert_eq!(parsed.content, "Let me check.");
        assert_eq!(
            calls(&parsed),
            [
                ("get_weather", serde_json::json!({"city": "Paris"})),
                ("search", serde_json::json!({"q": "x"}))
            ]
        );
        // Stopped before the closing tag.
        let unclosed = "<tool_call>\n{\"name\": \"search\", \"arguments\": {}}";
        let parsed = Syntax::Hermes.parse(unclosed, KNOWN);
        assert_eq!(calls(&parsed), [("search", serde_json::json!({}))]);
        assert_eq!(parsed.content, "");
    }

    #[test]
    fn llama_json_calls_parse_with_parameters_or_arguments() {
        for text in [
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            "<|python_tag|>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
            "  {\"name\": \"get_weather\", \"parameters\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}",
        ] {
            let parsed = Syntax::LlamaJson.parse(text, KNOWN);
            assert_eq!(
                calls(&parsed),
                [("get_weather", serde_json::json!({"city": "Oslo"}))],
                "{text}"
            );
        }
        let two = "{\"name\": \"search\", \"parameters\": {\"q\": \"a\"}}; {\"name\": \"search\", \"parameters\": {\"q\": \"b\"}}";
        assert_eq!(Syntax::LlamaJson.parse(two, KNOWN).calls.len(), 2);
    }

    #[test]
    fn mistral_lists_parse_with_or_without_the_marker() {
        for text in [
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
            " [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
        ] {
            let parsed = Syntax::Mistral.parse(text, KNOWN);
            assert_eq!(
                calls(&parsed),
                [("get_weather", serde_json::json!({"city": "Rome"}))],
                "{text}"
            );
        }
        let mut stream = CallStream::new(Syntax::Mistral);
        assert_eq!(stream.push("["), "");
        assert_eq!(
            stream.push("{\"name\": \"search\", \"arguments\": {}}]"),
            ""
        );
        assert_eq!(stream.finish(KNOWN).calls.len(), 1);
        let mut stream = CallStream::new(Syntax::Mistral);
        assert_eq!(stream.push("[1] is a footnote"), "[1] is a footnote");
        assert!(
            Syntax::Mistral
                .call_id()
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
        assert_eq!(Syntax::Mistral.call_id().len(), 9);
    }

    #[test]
    fn malformed_or_unknown_calls_are_returned_as_text() {
        for (syntax, text) in [
            (
                Syntax::Hermes,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
            ),
            (
                Syntax::Hermes,
                "<tool_call>{\"name\": \"launch_missiles\", \"arguments\": {}}</tool_call>",
            ),
            (
                Syntax::Hermes,
                "<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call> and then text",
            ),
            (
                Syntax::Hermes,
                "<tool_call>{\"name\": \"search\", \"arguments\": [1]}</tool_call>",
            ),
            (
                Syntax::LlamaJson,
                "{\"name\": \"search\", \"parameters\": {\"q\": 1}} trailing words",
            ),
            (Syntax::LlamaJson, "The weather is {\"nice\": true}"),
            (Syntax::LlamaJson, "{\"name\": \"search\""),
            (Syntax::LlamaJson, ""),
            (
                Syntax::Mistral,
                "[{\"name\": \"launch_missiles\", \"arguments\": {}}]",
            ),
            (
                Syntax::Mistral,
                "[TOOL_CALLS] [{\"name\": \"search\", \"arguments\": 3}]",
            ),
        ] {
            let parsed = syntax.parse(text, KNOWN);
            assert_eq!(parsed.content, text, "{syntax:?}");
            assert!(parsed.calls.is_empty(), "{text}");
        }
    }

    /// Text streams until a call may begin; the call comes out whole at the end, and
    /// what was held is returned as text when it is not a call after all.
    #[test]
    fn streams_hold_back_only_what_may_be_a_call() {
        let pieces = [
            "Sure",
            ". <tool",
            "_call>\n{\"name\": \"search\", ",
            "\"arguments\": {\"q\": \"k\"}}\n</tool_call>",
        ];
        let mut stream = CallStream::new(Syntax::Hermes);
        let streamed: Vec<String> = pieces.iter().map(|p| stream.push(p)).collect();
        assert_eq!(streamed, ["Sure", ". ", "", ""]);
        let done = stream.finish(KNOWN);
        assert_eq!(calls(&done), [("search", serde_json::json!({"q": "k"}))]);
        assert_eq!(done.content, "");

        let mut stream = CallStream::new(Syntax::Hermes);
        let streamed: String = ["a <tool", "box> b"]
            .iter()
            .map(|p| stream.push(p))
            .collect();
        assert_eq!(streamed, "a <toolbox> b");
        assert_eq!(stream.finish(KNOWN).content, "");

        let mut stream = CallStream::new(Syntax::LlamaJson);
        assert_eq!(stream.push(" "), "");
        assert_eq!(stream.push("{\"oops\": 1}"), "");
        let done = stream.finish(KNOWN);
        assert_eq!(
            (done.content.as_str(), done.calls.len()),
            (" {\"oops\": 1}", 0)
        );

        let mut stream = CallStream::new(Syntax::LlamaJson);
        assert_eq!(stream.push("It is sunny"), "It is sunny");
        assert_eq!(
            stream.push(" {\"name\": \"search\"}"),
            " {\"name\": \"search\"}"
        );
        assert_eq!(
            stream.finish(KNOWN),
            Parsed {
                content: String::new(),
                calls: vec![]
            }
        );
    }
}
