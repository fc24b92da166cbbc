//! Prompt text to token ids, within bounds. Text longer than the token limit could need is
//! refused before tokenizing (a tokenizer holds about a hundred bytes per input byte while
//! it works); at most one tokenization per core runs at once, so many huge prompts cannot
//! add up; and special tokens typed into a chat message read as plain text, so a user
//! cannot forge a system turn, unless the deployment allows them.
use crate::api::Tool;
use crate::chat_template::ChatTemplate;
use crate::engine::EncoderInput;
use crate::error::ApiError;
use crate::validation::TemplateMessage;
use aho_corasick::AhoCorasick;
use std::sync::Arc;
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

/// Real text averages 3 to 5 bytes per token, and long runs of one character rarely
/// exceed this; a prompt of more bytes per allowed token is refused unread.
pub const MAX_BYTES_PER_TOKEN: usize = 16;

pub struct PromptTokenizer {
    /// Special tokens in the text act as such: for templates and raw prompts.
    full: Arc<Tokenizer>,
    /// Special tokens read as plain text: for what users typed into messages.
    plain: Tokenizer,
    /// The special tokens' texts; `None` when messages may contain them.
    specials: Option<AhoCorasick>,
    max_bytes: usize,
    running: Semaphore,
}

impl PromptTokenizer {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        max_input_tokens: usize,
        special_tokens_in_content: bool,
    ) -> Self {
        let mut plain = (*tokenizer).clone();
        plain.set_encode_special_tokens(true);
        let texts: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        let specials = (!special_tokens_in_content && !texts.is_empty())
            .then(|| AhoCorasick::new(&texts).expect("literal patterns build"));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            full: tokenizer,
            plain,
            specials,
            max_bytes: max_input_tokens.saturating_mul(MAX_BYTES_PER_TOKEN),
            running: Semaphore::new(cores),
        }
    }

    /// Runs tokenizer (or template) work on the blocking pool, one task per core at most.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _slot = self.running.acquire().await.expect("never closed");
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
    }

    /// The ids of a prompt the caller wrote whole (a completion's prompt, an embedding's
    /// input): special tokens in it act, as in OpenAI's and vLLM's completions.
    pub fn encode(
        &self,
        param: &str,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ApiError> {
        self.check_len(param, text)?;
        ids(&self.full, text, add_special_tokens)
    }

    /// The ids of a query and a document as a cross-encoder reads them: one input of two
    /// texts, the second's tokens of type 1, with the tokenizer's pair template.
    pub fn encode_pair(
        &self,
        param: &str,
        first: &str,
        second: &str,
    ) -> Result<EncoderInput, ApiError> {
        self.check_len(param, first)?;
        self.check_len(param, second)?;
        let encoding = self
            .full
            .encode((first, second), true)
            .map_err(|e| ApiError::invalid(format!("Could not tokenize the input: {e}")))?;
        let ids = encoding.get_ids().to_vec();
        let second = encoding
            .get_type_ids()
            .iter()
            .position(|&t| t == 1)
            .unwrap_or(ids.len());
        Ok(EncoderInput { ids, second })
    }

    /// The ids of a conversation as `template` renders it. Where a message holds a
    /// special token's text, the template's own text is tokenized as usual and each
    /// message's content as plain text.
    pub fn encode_chat(
        &self,
        template: &ChatTemplate,
        messages: &[TemplateMessage],
        tools: Option<&[Tool]>,
    ) -> Result<Vec<u32>, ApiError> {
        let rendered = template.render(messages, tools)?;
        self.check_len("messages", &rendered)?;
        // Calls and tools are rendered as the template likes, with no place to mark: a
        // special token's text in them is refused rather than let act.
        if let Some(specials) = &self.specials {
            let calls = messages.iter().enumerate().flat_map(|(i, m)| {
                let param = format!("messages[{i}].tool_calls");
                m.tool_calls
                    .iter()
                    .map(move |c| (param.clone(), c.to_string()))
            });
            let tools = tools.into_iter().flatten().enumerate().map(|(i, t)| {
                (
                    format!("tools[{i}]"),
                    serde_json::to_string(t).unwrap_or_default(),
                )
            });
            if let Some((param, _)) = calls.chain(tools).find(|(_, text)| specials.is_match(text)) {
                return Err(ApiError::invalid_param(
                    &param,
                    format!("`{param}` holds a special token's text"),
                ));
            }
        }
        let forged = self
            .specials
            .as_ref()
            .and_then(|s| messages.iter().position(|m| s.is_match(&m.content)));
        let Some(first_forged) = forged else {
            return ids(&self.full, &rendered, false);
        };
        // Where the template puts each content: rendered around markers instead, the
        // pieces between them are the template's own text. A template that changes or
        // reorders content (trims it, branches on it) gives no such split.
        let marked: Vec<TemplateMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| TemplateMessage {
                content: marker(i),
                ..m.clone()
            })
            .collect();
        let marked = template.render(&marked, tools)?;
        let mut pieces = Vec::with_capacity(messages.len() + 1);
        let mut rest = marked.as_str();
        for i in 0..messages.len() {
            let Some((before, after)) = rest.split_once(&marker(i)) else {
                return Err(unsplittable(first_forged));
            };
            pieces.push(before);
            rest = after;
        }
        pieces.push(rest);
        let rebuilt: String = pieces
            .iter()
            .zip(messages.iter().map(|m| m.content.as_str()).chain([""]))
            .flat_map(|(piece, content)| [*piece, content])
            .collect();
        if rebuilt != rendered {
            return Err(unsplittable(first_forged));
        }
        let mut out = Vec::new();
        for (piece, message) in pieces.iter().zip(messages) {
            out.extend(ids(&self.full, piece, false)?);
            out.extend(ids(&self.plain, &message.content, false)?);
        }
        out.extend(ids(&self.full, pieces[messages.len()], false)?);
        Ok(out)
    }

    fn check_len(&self, param: &str, text: &str) -> Result<(), ApiError> {
        if text.len() > self.max_bytes {
            return Err(ApiError::invalid_param(
                param,
                format!(
                    "The input is {} bytes, more than the {} bytes ({MAX_BYTES_PER_TOKEN} per \
                     input token allowed) that this server tokenizes",
                    text.len(),
                    self.max_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn ids(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    tokenizer
        .encode_fast(text, add_special_tokens)
        .map(|enc| enc.get_ids().to_vec())
        .map_err(|e| ApiError::invalid(format!("Could not tokenize the input: {e}")))
}

/// Stands in for message `i`'s content: no template changes it, and no text has it.
fn marker(i: usize) -> String {
    format!("\u{1}kandle-content-{i}\u{1}")
}

fn unsplittable(message: usize) -> ApiError {
    ApiError::invalid_param(
        &format!("messages[{message}].content"),
        "The content holds a special token's text, and this model's chat template changes \
         content, so the text cannot be kept from acting as a control token",
    )
}
