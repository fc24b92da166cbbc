//! Structured outputs: a JSON schema compiled by llguidance into a matcher that says, at
//! each step, which tokens keep the output a valid prefix of a document the schema allows.
//! Compiling happens when the request is validated, so a schema the library cannot handle
//! is the caller's 400, not a failed generation.
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

    /// A matcher for documents `schema` allows. JSON is written as Python's `json.dumps`
    /// writes it (`", "` and `": "`, no other whitespace), so a model cannot pad its answer
    /// with whitespace until it runs out of tokens; `x-guidance` in the schema overrides.
    pub fn json_schema(&self, mut schema: Value) -> Result<Constraint, String> {
        if let Some(object) = schema.as_object_mut() {
            object.entry("x-guidance").or_insert_with(|| {
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            });
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    /// One token per byte, in GPT-2's byte-level encoding, and an end-of-turn special.
    fn byte_level() -> (Tokenizer, u32) {
        let vocab: tokenizers::models::bpe::Vocab = ByteLevel::alphabet()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer
            .add_special_tokens([AddedToken::from("<|im_end|>", true)])
            .unwrap();
        let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
        (tokenizer, eos)
    }

    /// Picks uniformly among the tokens the grammar allows until it allows only the end;
    /// the text, as the tokenizer decodes it.
    fn random_walk(tokenizer: &Tokenizer, eos: u32, mut c: Constraint, seed: u64) -> String {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids = Vec::new();
        for _ in 0..4000 {
            let mut logits = vec![0f32; tokenizer.get_vocab_size(true) + 3];
            c.mask().unwrap().apply(&mut logits);
            let allowed: Vec<u32> = (0..logits.len() as u32)
                .filter(|&i| logits[i as usize] == 0.0)
                .collect();
            let token = allowed[rng.random_range(0..allowed.len())];
            if token == eos {
                return tokenizer.decode(&ids, false).unwrap();
            }
            c.accept(token).unwrap();
            ids.push(token);
        }
        panic!(
            "no end after 4000 tokens: {:?}",
            tokenizer.decode(&ids, false)
        );
    }

    /// Written as Python's json.dumps writes it: outside strings, whitespace only as one
    /// space after `,` and `:`.
    fn dumps_style(text: &str) -> bool {
        let (mut in_string, mut escaped, mut previous) = (false, false, ' ');
        for c in text.chars() {
            match (in_string, c) {
                (true, _) if escaped => escaped = false,
                (true, '\\') => escaped = true,
                (_, '"') => in_string = !in_string,
                (false, c) if c.is_whitespace() && (c != ' ' || !matches!(previous, ',' | ':')) => {
                    return false;
                }
                _ => {}
            }
            previous = c;
        }
        true
    }

    #[test]
    fn every_path_through_the_masks_is_a_document_the_schema_allows() {
        let (tokenizer, eos) = byte_level();
        let vocabulary = Vocabulary::new(&tokenizer, tokenizer.get_vocab_size(true) + 3, &[eos]);
        let grammars = Grammars::new(Arc::new(vocabulary.unwrap())).unwrap();
        // What Pydantic writes for nested models: $defs and $ref, enums, bounds.
        let schema = json!({
            "$defs": {"Tag": {"type": "object", "properties": {
                "label": {"type": "string", "maxLength": 6},
                "weight": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["label", "weight"], "additionalProperties": false}},
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                "color": {"enum": ["red", "green", "blue"]},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "maxItems": 3},
                "note": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}},
            "required": ["name", "age", "color", "tags", "note"],
            "additionalProperties": false
        });
        let validator = jsonschema::validator_for(&schema).unwrap();
        for seed in 0..40 {
            let constraint = grammars.json_schema(schema.clone()).unwrap();
            let text = random_walk(&tokenizer, eos, constraint, seed);
            let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(validator.is_valid(&doc), "{text}");
            assert!(dumps_style(&text), "{text}");
        }
    }

    #[test]
    fn schemas_the_library_cannot_enforce_are_refused_with_the_reason() {
        let (tokenizer, eos) = byte_level();
        let vocabulary = Vocabulary::new(&tokenizer, tokenizer.get_vocab_size(true), &[eos]);
        let grammars = Grammars::new(Arc::new(vocabulary.unwrap())).unwrap();
        for (schema, reason) in [
            (json!({"type": "object", "if": {"type": "object"}}), "if"),
            (
                json!({"type": "integer", "minimum": 5, "maximum": 2}),
                "minimum",
            ),
            (json!({"type": "strin"}), "strin"),
            (
                json!({"$ref": "https://example.com/schema.json"}),
                "example.com",
            ),
        ] {
            let e = grammars.json_schema(schema.clone()).unwrap_err();
            assert!(e.contains(reason), "{schema}: {e}");
        }
    }
}
