//! GGUF files (quantized Llama, Mistral, Qwen2 and Qwen3) on kandle's decoder, with the
//! tokenizer rebuilt from GGUF metadata so token ids match llama.cpp's.
use super::decoder::config::{Biases, DecoderConfig, RopeScaling, RopeStyle};
use super::decoder::source::{Gguf, Source};
use super::decoder::{Decoder, Weights};
use super::{Backend, LoadError, LoadedModel, ModelInfo, Task, device_name, generation_task};
use crate::chat_template::ChatTemplate;
use crate::cli::KernelsArg;
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
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

fn meta_f64(ct: &Content, key: &str) -> Option<f64> {
    meta(ct, key).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
}

/// Architectures the decoder runs, as `general.architecture` names them (Mistral's files say
/// `llama`).
const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// The decoder's shape from GGUF metadata, following llama.cpp's reading of the same keys.
fn config(ct: &Content, file: &Path) -> Result<DecoderConfig, LoadError> {
    let arch = meta_str(ct, "general.architecture").unwrap_or_default();
    if !ARCHITECTURES.contains(&arch) {
        return Err(LoadError::invalid(
            file,
            format!(
                "GGUF architecture `{arch}` is not supported (supported: {})",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let count = |k: &str| meta_u32(ct, &key(k)).map(|n| n as usize);
    let required = |k: &str| {
        count(k)
            .ok_or_else(|| LoadError::invalid(file, format!("GGUF metadata has no `{}`", key(k))))
    };
    let refuse = |m: String| Err(LoadError::invalid(file, m));
    if count("expert_count").unwrap_or(0) > 0 {
        return refuse("mixture-of-experts GGUF models are not supported".into());
    }
    let hidden_size = required("embedding_length")?;
    let num_heads = required("attention.head_count")?;
    let head_dim = count("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
    if let Some(rotated) = count("rope.dimension_count")
        && rotated != head_dim
    {
        return refuse(format!(
            "rotary embeddings over {rotated} of {head_dim} head dimensions are not supported"
        ));
    }
    let rope_scaling = match meta_str(ct, &key("rope.scaling.type")) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear(
            meta_f64(ct, &key("rope.scaling.factor"))
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
        ),
        Some(other) => return refuse(format!("GGUF rope scaling `{other}` is not supported")),
    };
    let num_layers = required("block_count")?;
    let names = &ct.tensor_infos;
    let vocab_size = names
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| LoadError::invalid(file, "no `token_embd.weight` tensor"))?;
    DecoderConfig {
        family: arch.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads: count("attention.head_count_kv").unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: meta_f64(ct, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(ct, &key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        // llama.cpp's converter permutes Llama's q/k rows for its interleaved rotation; it
        // leaves Qwen's as they were (NEOX).
        rope_style: if arch == "llama" {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Halves
        },
        windows: vec![None; num_layers],
        // GGUF files carry the biases they have; llama.cpp loads them when present.
        biases: Biases {
            qkv: names.contains_key("blk.0.attn_q.bias"),
            output: names.contains_key("blk.0.attn_output.bias"),
            mlp: names.contains_key("blk.0.ffn_up.bias"),
        },
        qk_norm: arch == "qwen3",
        tie_word_embeddings: !names.contains_key("output.weight"),
        context_length: required("context_length")?,
    }
    .check()
    .map_err(|m| LoadError::invalid(file, m))
}

pub fn load(
    file: &Path,
    task: Option<Task>,
    device: &Device,
    kernels: KernelsArg,
) -> Result<LoadedModel, LoadError> {
    let reader = std::fs::File::open(file).map_err(|source| LoadError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    // candle reads the metadata a few bytes at a time: unbuffered, that was a system call per
    // token string, a third of SmolLM2's load time.
    let ct = Content::read(&mut std::io::BufReader::new(&reader))
        .map_err(|e| LoadError::invalid(file, e.to_string()))?;
    let cfg = config(&ct, file)?;
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
    let info = ModelInfo {
        architecture: cfg.family.clone(),
        task,
        dtype: "gguf".into(),
        device: device_name(device),
        context_length: cfg.context_length,
        vocab_size: cfg.vocab_size,
        eos_token_ids: eos,
        labels: Default::default(),
    };
    let weights = (|| {
        let mut source = Gguf::open(ct, &reader, device, kernels)?;
        // Llama 3.1 files carry their rope scaling as per-frequency divisors.
        let freq_factors = if source.has("rope_freqs.weight") {
            Some(
                source
                    .tensor("rope_freqs.weight")?
                    .dequantize(&Device::Cpu)?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Weights::load(cfg, &mut source, freq_factors, device, kernels)
    })()
    .map_err(|e| LoadError::invalid(file, e.to_string()))?;
    Ok(LoadedModel {
        info,
        tokenizer,
        chat_template,
        backend: Backend::Generator(Decoder::new(weights)),
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
