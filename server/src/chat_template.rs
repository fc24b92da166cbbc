//! Chat prompts rendered with the model's own Jinja template, as transformers does.
use crate::api::Tool;
use crate::error::ApiError;
use crate::model::LoadError;
use crate::model::weights::read_optional_json;
use crate::tools::parse::{self, Syntax};
use crate::validation::TemplateMessage;
use minijinja::{Environment, ErrorKind, context};
use std::path::Path;

const NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the model writes calls, when the template shows it tools.
    tool_syntax: Option<Syntax>,
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // transformers renders with these settings; templates are written for them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            // No chrono dependency for one date: templates use it to print today's date.
            let days = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 86_400);
            let (y, m, d) = civil_from_days(days as i64);
            format
                .replace("%Y", &format!("{y:04}"))
                .replace("%m", &format!("{m:02}"))
                .replace("%d", &format!("{d:02}"))
        });
        // Llama 3.x writes bare JSON, Mistral a `[TOOL_CALLS]` list; Qwen, Hermes and most
        // others `<tool_call>` blocks.
        let syntax = if source.contains("<tool_call>") {
            Syntax::Hermes
        } else if source.contains(parse::MISTRAL_CALLS) {
            Syntax::Mistral
        } else {
            Syntax::LlamaJson
        };
        env.add_template_owned(NAME, source)?;
        let reads_tools = env
            .get_template(NAME)?
            .undeclared_variables(true)
            .contains("tools");
        Ok(Self {
            env,
            bos_token,
            eos_token,
            tool_syntax: reads_tools.then_some(syntax),
        })
    }

    /// The syntax the model calls tools in; None when the template does not show it tools.
    pub fn tool_syntax(&self) -> Option<Syntax> {
        self.tool_syntax
    }

    /// The template a Hugging Face folder declares: `chat_template.jinja`, or the
    /// `chat_template` of tokenizer_config.json (a string, or named templates).
    pub fn from_tokenizer_config(
        dir: &Path,
        tokenizer_config: &serde_json::Value,
    ) -> Result<Option<Self>, LoadError> {
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja).map_err(|source| LoadError::Io {
                    path: jinja.clone(),
                    source,
                })?,
            )
        } else {
            match tokenizer_config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                    .map(String::from),
                _ => None,
            }
        };
        // Older processors keep it in chat_template.json; read that only when needed.
        let source = match source {
            Some(s) => Some(s),
            None => read_optional_json(&dir.join("chat_template.json"))?
                .and_then(|v| v.get("chat_template")?.as_str().map(String::from)),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |key| Self::special_token(tokenizer_config, key).unwrap_or_default();
        Ok(Some(Self::new(
            source,
            token("bos_token"),
            token("eos_token"),
        )?))
    }

    /// A special token from tokenizer_config.json: a string or `{"content": ...}`.
    pub fn special_token(tokenizer_config: &serde_json::Value, key: &str) -> Option<String> {
        match tokenizer_config.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            obj => obj.get("content")?.as_str().map(String::from),
        }
    }

    /// Renders the conversation with the assistant's turn opened. A template that refuses
    /// the conversation (`raise_exception`) is the client's error, a 400.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&[Tool]>,
    ) -> Result<String, ApiError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => ApiError::invalid_param(
                    "messages",
                    format!(
                        "The model's chat template rejected the messages: {}",
                        e.detail().unwrap_or_default()
                    ),
                ),
                _ => ApiError::Internal(format!("chat template failed: {e}")),
            })
    }
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let t = ChatTemplate::new(CHATML.into(), "<s>".into(), "</s>".into()).unwrap();
        let out = t.render(&[msg("user", "  hi  ")], None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_a_client_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let err = t.render(&[msg("assistant", "x")], None).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
