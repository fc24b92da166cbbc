//! Constrained decoding: a JSON schema (structured outputs) or a Lark grammar (a demanded
//! tool call) compiled by llguidance into a matcher that says, at each step, which tokens
//! keep the output a valid prefix of what the grammar allows. Compiling happens before the
//! request is queued, so a grammar the library cannot handle is the caller's 400, not a
//! failed generation.
pub mod vocab;

pub use vocab::Vocabulary;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use std::sync::Arc;
use tokenizers::Tokenizer;
use toktrie::SimpleVob;

/// A model's vocabulary as bytes, and the grammars over it.
pub struct Lexicon {
    pub vocabulary: Arc<Vocabulary>,
    pub grammars: Grammars,
}

impl Lexicon {
    /// None, with the reason logged, for a tokenizer whose tokens' bytes cannot be read:
    /// that turns structured outputs off (requests that ask get a 400), not the server.
    fn build(tokenizer: &Tokenizer, model_vocab: usize, eos: &[u32]) -> Option<Arc<Self>> {
        let started = std::time::Instant::now();
        let built = Vocabulary::new(tokenizer, model_vocab, eos)
            .map(Arc::new)
            .and_then(|v| {
                let grammars = Grammars::new(v.clone())?;
                Ok(Self {
                    vocabulary: v,
                    grammars,
                })
            });
        match built {
            Ok(lexicon) => {
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(seconds, "vocabulary ready for structured outputs");
                Some(Arc::new(lexicon))
            }
            Err(reason) => {
                tracing::warn!(%reason, "structured outputs are off for this model");
                None
            }
        }
    }
}

/// The lexicon, built once when first asked for: the server asks right after it is ready,
/// so cold start does not wait for it (half a second for a 150k vocabulary), and the first
/// request that needs it waits for that one build.
pub struct LazyLexicon {
    cell: tokio::sync::OnceCell<Option<Arc<Lexicon>>>,
    /// The tokenizer, the model's vocabulary width and its end tokens; None for models
    /// that do not generate.
    source: Option<(Arc<Tokenizer>, usize, Vec<u32>)>,
}

impl LazyLexicon {
    pub fn new(source: Option<(Arc<Tokenizer>, usize, Vec<u32>)>) -> Self {
        Self {
            cell: tokio::sync::OnceCell::new(),
            source,
        }
    }

    pub async fn get(&self) -> Option<Arc<Lexicon>> {
        self.cell
            .get_or_init(|| async {
                let (tokenizer, width, eos) = self.source.clone()?;
                tokio::task::spawn_blocking(move || Lexicon::build(&tokenizer, width, &eos))
                    .await
                    .ok()?
            })
            .await
            .clone()
    }
}

/// llguidance's options for JSON as Python's `json.dumps` writes it (`", "` and `": "`, no
/// other whitespace), so that a model cannot pad a document with whitespace until it runs
/// out of tokens.
pub fn json_style() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// Compiles grammars for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(vocabulary: Arc<Vocabulary>) -> Result<Self, String> {
        let env: toktrie::TokEnv = vocabulary;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Its diagnostics go to stderr; the server logs JSON, and errors come back as values.
        factory.quiet();
        Ok(Self { factory })
    }

    /// A matcher for documents `schema` allows, in `json_style` unless the schema's own
    /// `x-guidance` says otherwise.
    pub fn json_schema(&self, mut schema: Value) -> Result<Constraint, String> {
        if let Some(object) = schema.as_object_mut() {
            object.entry("x-guidance").or_insert_with(json_style);
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
    }

    /// The id of the special token whose text is `name`.
    pub fn special_token(&self, name: &str) -> Option<u32> {
        self.factory.tok_env().tok_trie().get_special_token(name)
    }

    /// A matcher for a Lark grammar (llguidance's dialect, `%json` included).
    pub fn lark(&self, grammar: String) -> Result<Constraint, String> {
        self.compile(TopLevelGrammar::from_lark(grammar))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next: only end-of-sequence tokens once the document is complete.
    pub fn mask(&mut self) -> Result<Mask, String> {
        self.matcher
            .compute_mask_or_eos()
            .map(Mask)
            .map_err(|e| e.to_string())
    }

    /// An independent copy in the same state: one per choice of a request.
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }

    /// Moves past `token`, which the last mask allowed.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

/// Tokens a grammar allows at one step.
pub struct Mask(SimpleVob);

impl Mask {
    /// Rules out every other token, logits past the vocabulary included.
    pub fn apply(&self, logits: &mut [f32]) {
        let known = self.0.len().min(logits.len());
        self.0.iter_unset_entries(|i| {
            if i < known {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        logits[known..].fill(f32::NEG_INFINITY);
    }
}
