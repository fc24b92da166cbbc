//! Tool calls: the request's tools checked and handed to the model's chat template (as
//! transformers passes them), decoding constrained to a valid call when the caller demands
//! one, and the model's call syntax read back into OpenAI's `tool_calls`.
pub mod parse;

use crate::api::{Tool, ToolChoice};
use crate::constrain::json_style;
use crate::error::ApiError;
use parse::Syntax;
use serde_json::{Value, json};

/// OpenAI's limit on tools in one request.
pub const MAX_TOOLS: usize = 128;

/// What the caller allows or demands of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Tools are shown to the model; its answer is text.
    None,
    /// The model chooses between text and calls.
    Auto,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this tool.
    Named(String),
}

#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub mode: Mode,
    /// Whether an answer may hold several calls (`parallel_tool_calls`, true unless the
    /// caller says otherwise, as in OpenAI).
    pub parallel: bool,
}

impl ToolRequest {
    pub fn names(&self) -> Vec<&str> {
        self.tools
            .iter()
            .map(|t| t.function.name.as_str())
            .collect()
    }

    /// Whether the answer is read for calls.
    pub fn parses_calls(&self) -> bool {
        self.mode != Mode::None
    }

    /// The tools one of which the caller demands a call to; none when the model may answer
    /// in text.
    fn demanded(&self) -> Vec<&Tool> {
        match &self.mode {
            Mode::None | Mode::Auto => Vec::new(),
            Mode::Required => self.tools.iter().collect(),
            Mode::Named(name) => self
                .tools
                .iter()
                .filter(|t| &t.function.name == name)
                .collect(),
        }
    }

    /// Whether the caller demands a call (decoding is then constrained to one).
    pub fn demands_call(&self) -> bool {
        !self.demanded().is_empty()
    }

    /// The grammar of the calls, in `syntax`, to demanded tools: one call, or one or more
    /// when calls may be parallel. A Lark grammar for llguidance, whose `%json` is a call's
    /// JSON schema. `special` finds a special token's id (Mistral's marker is one; without
    /// it the list stands alone, which the parser reads too).
    pub fn grammar(&self, syntax: Syntax, special: impl Fn(&str) -> Option<u32>) -> String {
        let demanded = self.demanded();
        let arguments_key = match syntax {
            Syntax::Hermes | Syntax::Mistral => "arguments",
            Syntax::LlamaJson => "parameters",
        };
        let calls: Vec<Value> = demanded
            .iter()
            .map(|t| {
                let parameters = t
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, arguments_key: parameters},
                    "required": ["name", arguments_key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let call = json!({"anyOf": calls});
        let styled = |mut schema: Value| {
            schema["x-guidance"] = json_style();
            schema
        };
        // More calls follow the first as the parser reads them; the model ends the list.
        let more = |separator: &str, item: &str| {
            if self.parallel {
                format!("({separator} {item})*")
            } else {
                String::new()
            }
        };
        match syntax {
            Syntax::Hermes => format!(
                "start: block {}\nblock: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {}\n",
                more("\"\\n\"", "block"),
                styled(call)
            ),
            Syntax::LlamaJson => format!(
                "start: call {}\ncall: %json {}\n",
                more("\"; \"", "call"),
                styled(call)
            ),
            Syntax::Mistral => {
                let mut list = json!({"type": "array", "items": call, "minItems": 1});
                if !self.parallel {
                    list["maxItems"] = json!(1);
                }
                let marker = special(parse::MISTRAL_CALLS)
                    .map_or(String::new(), |id| format!("<[{id}]> \" \" "));
                format!("start: {marker}calls\ncalls: %json {}\n", styled(list))
            }
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tools` and `tool_choice` checked: None when the request has no tools to offer.
pub fn tool_request(
    tools: Option<Vec<Tool>>,
    choice: Option<ToolChoice>,
    parallel: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            "tools",
            format!("At most {MAX_TOOLS} tools are allowed, got {}", tools.len()),
        ));
    }
    for (i, tool) in tools.iter().enumerate() {
        let param = |field: &str| format!("tools[{i}].{field}");
        if tool.kind != "function" {
            return Err(ApiError::invalid_param(
                &param("type"),
                format!(
                    "Tools of type `{}` are not supported; use `function`",
                    tool.kind
                ),
            ));
        }
        let name = &tool.function.name;
        if !valid_name(name) {
            return Err(ApiError::invalid_param(
                &param("function.name"),
                format!(
                    "A function name must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"
                ),
            ));
        }
        if tools[..i].iter().any(|t| &t.function.name == name) {
            return Err(ApiError::invalid_param(
                &param("function.name"),
                format!("The function `{name}` is defined twice"),
            ));
        }
        if tool
            .function
            .parameters
            .as_ref()
            .is_some_and(|p| !p.is_object())
        {
            return Err(ApiError::invalid_param(
                &param("function.parameters"),
                "`parameters` must be a JSON schema object",
            ));
        }
    }
    let mode = match choice {
        None if tools.is_empty() => Mode::None,
        None => Mode::Auto,
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => Mode::None,
            "auto" => Mode::Auto,
            "required" => Mode::Required,
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!(
                        "`tool_choice` must be `none`, `auto`, `required` or a named function, got `{other}`"
                    ),
                ));
            }
        },
        Some(ToolChoice::Named(named)) => {
            let name = named.function.name;
            if !tools.iter().any(|t| t.function.name == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names the function `{name}`, which is not in `tools`"),
                ));
            }
            Mode::Named(name)
        }
    };
    if tools.is_empty() {
        if mode != Mode::None {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "`tool_choice` is only allowed when `tools` are given",
            ));
        }
        return Ok(None);
    }
    Ok(Some(ToolRequest {
        tools,
        mode,
        parallel: parallel.unwrap_or(true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tools: Value, choice: Value) -> Result<Option<ToolRequest>, ApiError> {
        tool_request(
            serde_json::from_value(tools).unwrap(),
            serde_json::from_value(choice).unwrap(),
            None,
        )
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    }

    #[test]
    fn tool_choice_reads_every_openai_form() {
        let mode = |choice| request(weather(), choice).unwrap().unwrap().mode;
        assert_eq!(mode(Value::Null), Mode::Auto);
        assert_eq!(mode(json!("none")), Mode::None);
        assert_eq!(mode(json!("required")), Mode::Required);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(mode(named), Mode::Named("get_weather".into()));
        assert!(request(json!([]), Value::Null).unwrap().is_none());
        assert!(request(Value::Null, json!("none")).unwrap().is_none());
    }

    #[test]
    fn bad_tools_are_refused_naming_the_field() {
        let named = |name: &str| json!({"type": "function", "function": {"name": name}});
        for (tools, choice, param) in [
            (weather(), named("launch"), "tool_choice"),
            (weather(), json!("always"), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
            (
                json!([{"type": "retrieval", "function": {"name": "x"}}]),
                Value::Null,
                "tools[0].type",
            ),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                Value::Null,
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
                Value::Null,
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                Value::Null,
                "tools[1].function.name",
            ),
        ] {
            let e = request(tools, choice).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{}", e.body());
        }
    }

    #[test]
    fn demanded_calls_have_a_grammar_in_the_model_syntax() {
        let r = request(weather(), json!("required")).unwrap().unwrap();
        let none = |_: &str| None;
        let hermes = r.grammar(Syntax::Hermes, none);
        assert!(
            hermes.starts_with("start: block (\"\\n\" block)*\nblock: \"<tool_call>\\n\" call"),
            "{hermes}"
        );
        assert!(hermes.contains(r#""const":"get_weather""#) && hermes.contains("arguments"));
        let llama = r.grammar(Syntax::LlamaJson, none);
        assert!(llama.contains("parameters"), "{llama}");
        let auto = request(weather(), Value::Null).unwrap().unwrap();
        assert!(!auto.demands_call() && r.demands_call());
        let mistral = r.grammar(Syntax::Mistral, |name| {
            (name == "[TOOL_CALLS]").then_some(7)
        });
        assert!(mistral.starts_with("start: <[7]> \" \" calls"), "{mistral}");
        assert!(!mistral.contains("maxItems"), "{mistral}");

        // One call only when the caller rules parallel calls out.
        let single = ToolRequest {
            parallel: false,
            ..r.clone()
        };
        assert!(
            single
                .grammar(Syntax::Hermes, none)
                .starts_with("start: block \nblock:")
        );
        assert!(
            single
                .grammar(Syntax::LlamaJson, none)
                .starts_with("start: call \ncall:")
        );
        assert!(
            single
                .grammar(Syntax::Mistral, none)
                .contains(r#""maxItems":1"#)
        );
    }
}
