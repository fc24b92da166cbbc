//! The vocabulary as llguidance needs it: the bytes each token stands for. Hugging Face
//! tokenizers store tokens in one of two encodings: byte-level BPE (GPT-2, Llama 3, Qwen,
//! SmolLM) maps each byte to a printable character; SentencePiece-style vocabularies
//! (Llama 2, Mistral) write spaces as `▁` and fall back to `<0xNN>` tokens for single bytes.
//! `toktrie_hf_tokenizers` does this for tokenizers 0.21 only, and the workspace is on 0.23.
use std::collections::HashMap;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::PrependScheme;
use tokenizers::{DecoderWrapper, Tokenizer};
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    ByteLevel,
    SentencePiece,
}

/// The tokenizer's token-to-bytes map and a trie over it.
pub struct Vocabulary {
    trie: TokTrie,
    /// Encodes text without the leading space SentencePiece adds to a whole input: the
    /// grammar asks for tokens of fragments, not of sentences.
    fragments: Tokenizer,
}

impl Vocabulary {
    /// `model_vocab` is the width of the model's logits (at least the tokenizer's: padded
    /// rows become tokens no grammar allows); `eos` the tokens that end a generation.
    pub fn new(tokenizer: &Tokenizer, model_vocab: usize, eos: &[u32]) -> Result<Self, String> {
        let encoding = tokenizer.get_decoder().and_then(encoding_of).ok_or(
            "the tokenizer is neither byte-level BPE nor SentencePiece with byte fallback",
        )?;
        let size = tokenizer.get_vocab_size(true).max(model_vocab);
        let added = tokenizer.get_added_tokens_decoder();
        let byte_of_char = byte_level_chars();
        let tokens: Vec<Vec<u8>> = (0..size as u32)
            .map(|id| match (added.get(&id), tokenizer.id_to_token(id)) {
                (Some(t), _) if t.special => special(&t.content),
                (Some(t), _) => t.content.clone().into_bytes(),
                (None, Some(piece)) => bytes_of(&piece, encoding, &byte_of_char)
                    .unwrap_or_else(|| special(&format!("<[{id}]>"))),
                // Rows of the model past the tokenizer's vocabulary.
                (None, None) => special(&format!("<[{id}]>")),
            })
            .collect();
        let first_eos = *eos
            .first()
            .ok_or("the model declares no end-of-sequence token")?;
        let info = TokRxInfo::new(size as u32, first_eos);
        let trie = TokTrie::from(&info, &tokens).with_eos_tokens(eos);
        Ok(Self {
            trie,
            fragments: without_prefix_space(tokenizer.clone())?,
        })
    }
}

impl Vocabulary {
    /// The bytes a token stands for; a special token's text.
    pub fn token_bytes(&self, token: u32) -> &[u8] {
        let bytes = self.trie.token(token);
        bytes
            .strip_prefix(&[TokTrie::SPECIAL_TOKEN_MARKER])
            .unwrap_or(bytes)
    }
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.fragments
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// A special token as the trie marks it, so no grammar text can spell it.
fn special(content: &str) -> Vec<u8> {
    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    bytes.extend_from_slice(content.as_bytes());
    bytes
}

fn encoding_of(decoder: &DecoderWrapper) -> Option<Encoding> {
    match decoder {
        DecoderWrapper::ByteLevel(_) => Some(Encoding::ByteLevel),
        DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => {
            Some(Encoding::SentencePiece)
        }
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().find_map(encoding_of),
        _ => None,
    }
}

fn bytes_of(piece: &str, encoding: Encoding, byte_of_char: &HashMap<char, u8>) -> Option<Vec<u8>> {
    match encoding {
        Encoding::ByteLevel => piece
            .chars()
            .map(|c| byte_of_char.get(&c).copied())
            .collect(),
        Encoding::SentencePiece => Some(match byte_fallback(piece) {
            Some(b) => vec![b],
            None => piece.replace('▁', " ").into_bytes(),
        }),
    }
}

/// `<0xNN>`: SentencePiece's token for one raw byte.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's map of bytes to printable characters, reversed: printable ASCII and Latin-1
/// stand for themselves, every other byte for a character from U+0100 on, in byte order.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

fn without_prefix_space(mut tokenizer: Tokenizer) -> Result<Tokenizer, String> {
    fn normalizer(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
        match n {
            NormalizerWrapper::Prepend(_) => None,
            NormalizerWrapper::Sequence(seq) => {
                let kept: Vec<_> = seq
                    .as_ref()
                    .iter()
                    .cloned()
                    .filter_map(normalizer)
                    .collect();
                (!kept.is_empty()).then(|| tokenizers::normalizers::Sequence::new(kept).into())
            }
            n => Some(n),
        }
    }
    fn pre_tokenizer(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
        match p {
            PreTokenizerWrapper::Metaspace(mut m) => {
                m.prepend_scheme = PrependScheme::Never;
                m.into()
            }
            PreTokenizerWrapper::Sequence(seq) => {
                tokenizers::pre_tokenizers::sequence::Sequence::new(
                    seq.as_ref().iter().cloned().map(pre_tokenizer).collect(),
                )
                .into()
            }
            p => p,
        }
    }
    let n = tokenizer.get_normalizer().cloned().and_then(normalizer);
    tokenizer.with_normalizer(n).map_err(|e| e.to_string())?;
    let p = tokenizer.get_pre_tokenizer().cloned().map(pre_tokenizer);
    tokenizer.with_pre_tokenizer(p);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_pieces_are_their_bytes() {
        let map = byte_level_chars();
        assert_eq!(map.len(), 256);
        // GPT-2 writes a space as `Ġ` and a newline as `Ċ`.
        let bytes = bytes_of("Ġhello", Encoding::ByteLevel, &map).unwrap();
        assert_eq!(bytes, b" hello");
        assert_eq!(bytes_of("Ċ", Encoding::ByteLevel, &map).unwrap(), b"\n");
    }

    #[test]
    fn a_sentencepiece_vocabulary_reads_as_bytes_and_pads_to_the_model() {
        // Llama 2's and Mistral's shape: `▁` for spaces, `<0xNN>` byte fallback, a
        // Metaspace pre-tokenizer that prepends a space to whole inputs.
        let json = r#"{"version": "1.0", "added_tokens": [
            {"id": 0, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true}],
          "normalizer": null,
          "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
          "post_processor": null,
          "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
          "model": {"type": "BPE", "dropout": null, "unk_token": null, "byte_fallback": true,
            "fuse_unk": false, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "vocab": {"</s>": 0, "<0x0A>": 1, "▁": 2, "a": 3, "▁a": 4},
            "merges": [["▁", "a"]]}}"#;
        let tokenizer: Tokenizer = json.parse().unwrap();
        let vocab = Vocabulary::new(&tokenizer, 7, &[0]).unwrap();
        let trie = vocab.tok_trie();
        assert_eq!(trie.vocab_size(), 7);
        assert_eq!(trie.token(1), b"\n");
        assert_eq!(trie.token(4), b" a");
        assert_eq!(vocab.token_bytes(0), b"</s>");
        // Specials and padded rows are marked, so no text spells them.
        for id in [0, 5, 6] {
            assert_eq!(trie.token(id)[0], TokTrie::SPECIAL_TOKEN_MARKER, "{id}");
        }
        // A fragment is tokenized without the space SentencePiece adds to a whole input.
        assert_eq!(vocab.tokenize_bytes(b"a"), [3]);
        assert_eq!(vocab.tokenize_bytes(b" a"), [4]);
    }

    #[test]
    fn sentencepiece_pieces_are_their_bytes() {
        let map = byte_level_chars();
        let sp = |p| bytes_of(p, Encoding::SentencePiece, &map).unwrap();
        assert_eq!(sp("▁the"), b" the");
        assert_eq!(sp("<0x0A>"), b"\n");
        assert_eq!(sp("<0x0G>"), b"<0x0G>");
    }
}
