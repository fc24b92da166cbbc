//! Llama-family GGUF files (quantized), with the tokenizer rebuilt from GGUF metadata so
//! token ids match llama.cpp's.
use super::{
    Backend, LoadError, LoadedModel, ModelInfo, Task, causal::CausalLm, device_name,
    generation_task,
};
use crate::chat_template::ChatTemplate;
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_transformers::models::quantized_llama::{self, ModelWeights};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};

/// A `.gguf` file, or the single one a folder holds.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>, LoadError> {
    if path.is_file() {
        return Ok(path
            .extension()
            .is_some_and(|e| e == "gguf")
            .then(|| path.to_path_buf()));
    }
    if path.join("config.json").exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match found.len() {
        0 => Err(LoadError::invalid(
            path,
            "holds neither config.json nor a .gguf file",
        )),
        1 => Ok(found.pop()),
        n => Err(LoadError::invalid(
            path,
            format!("holds {n} .gguf files; name one"),
        )),
    }
}

fn meta<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    meta(ct, key).and_then(|v| v.to_u32().ok())
}

fn meta_str<'a>(ct: &'a Content, key: &str) -> Option<&'a str> {
    meta(ct, key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

pub fn load(file: &Path, task: Option<Task>, device: &Device) -> Result<LoadedModel, LoadError> {
    let mut reader = std::fs::File::open(file).map_err(|source| LoadError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let ct = Content::read(&mut reader).map_err(|e| LoadError::invalid(file, e.to_string()))?;
    let arch = meta_str(&ct, "general.architecture")
        .unwrap_or_default()
        .to_string();
    if arch != "llama" {
        return Err(LoadError::invalid(
            file,
            format!("GGUF architecture `{arch}` is not supported (supported: llama)"),
        ));
    }
    let tokenizer = tokenizer(&ct, file)?;
    let token = |key: &str| {
        meta_u32(&ct, key)
            .and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    let chat_template = match meta_str(&ct, "tokenizer.chat_template") {
        Some(src) => Some(ChatTemplate::new(
            src.to_string(),
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        )?),
        None => None,
    };
    let task = generation_task(task, &chat_template, file)?;
    let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| meta_u32(&ct, k))
        .collect();
    eos.dedup();
    let context_length = meta_u32(&ct, "llama.context_length")
        .map_or(quantized_llama::MAX_SEQ_LEN, |n| n as usize)
        .min(quantized_llama::MAX_SEQ_LEN);
    let vocab_size = tokenizer.get_vocab_size(true);
    let model = ModelWeights::from_gguf(ct, &mut reader, device)?;
    Ok(LoadedModel {
        info: ModelInfo {
            architecture: "llama".into(),
            task,
            dtype: "gguf".into(),
            device: device_name(device),
            context_length,
            vocab_size,
            eos_token_ids: eos,
        },
        tokenizer,
        chat_template,
        backend: Backend::Generator(CausalLm::quantized(model, device.clone())),
    })
}

/// candle builds the BPE model, merges and special tokens; kandle sets the pre-tokenizer for
/// the `tokenizer.ggml.pre` values candle does not know, following llama.cpp's definitions.
fn tokenizer(ct: &Content, file: &Path) -> Result<Tokenizer, LoadError> {
    let mut tokenizer = Tokenizer::from_gguf(ct).map_err(|e| LoadError::Tokenizer {
        path: file.to_path_buf(),
        message: e.to_string(),
    })?;
    match meta_str(ct, "tokenizer.ggml.pre") {
        // llama.cpp: each digit alone, then GPT-2's regex; no prefix space.
        Some("smollm") => {
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        // llama.cpp's default BPE pre-tokenizer is GPT-2's regex with no prefix space.
        Some("gpt2") | Some("default") | None => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        Some(_) => {}
    }
    Ok(tokenizer)
}
