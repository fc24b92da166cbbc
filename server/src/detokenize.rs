//! Token ids to text as they are generated: whole UTF-8 characters only, with the stop
//! sequences cut out and never sent, even when they span tokens.
use tokenizers::Tokenizer;

/// Prompt tokens kept as context so that decoders which strip a leading space
/// (SentencePiece) still print the first generated token's space.
const CONTEXT_TOKENS: usize = 4;

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    stop: Vec<String>,
    held: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Delta {
    /// Text safe to send (possibly empty while a character or stop sequence is incomplete).
    Text(String),
    /// A stop sequence matched: the text before it, and generation ends.
    Stopped(String),
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, prompt: &[u32], stop: Vec<String>) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer,
            tokens: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            stop,
            held: String::new(),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, tokenizers::Error> {
        self.tokenizer.decode(ids, true)
    }

    pub fn push(&mut self, token: u32) -> Result<Delta, tokenizers::Error> {
        self.tokens.push(token);
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.tokens[self.prefix_offset..])?;
        let new_text = match full.get(prefix.len()..) {
            Some(rest) if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') => {
                rest.to_string()
            }
            _ => return Ok(Delta::Text(String::new())),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(self.filter_stops(new_text))
    }

    fn filter_stops(&mut self, new_text: String) -> Delta {
        self.held.push_str(&new_text);
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            return Delta::Stopped(std::mem::take(&mut self.held));
        }
        // Hold back the longest tail that could still grow into a stop sequence.
        let keep = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let tail = self.held.split_off(self.held.len() - keep);
        Delta::Text(std::mem::replace(&mut self.held, tail))
    }

    /// Text held back for a stop sequence that never completed.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    fn tokenizer() -> Tokenizer {
        let vocab = [("a", 0), ("b", 1), ("c", 2), ("<unk>", 3)]
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        Tokenizer::new(model)
    }

    fn run(stop: &[String], ids: &[u32]) -> (String, bool) {
        let tok = tokenizer();
        let mut s = TextStream::new(&tok, &[], stop.to_vec());
        let mut out = String::new();
        for &id in ids {
            match s.push(id).unwrap() {
                Delta::Text(t) => out.push_str(&t),
                Delta::Stopped(t) => return (out + &t, true),
            }
        }
        (out + &s.finish(), false)
    }

    #[test]
    fn stop_sequence_across_tokens_is_cut() {
        // WordLevel decodes with spaces between words: "a b c a".
        let stop = vec!["b c".to_string()];
        assert_eq!(run(&stop, &[0, 1, 2, 0]), ("a ".to_string(), true));
    }

    #[test]
    fn held_text_is_released_when_no_stop_completes() {
        let stop = vec!["b x".to_string()];
        assert_eq!(run(&stop, &[0, 1, 2]), ("a b c".to_string(), false));
    }
}
