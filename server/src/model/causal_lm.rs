//! Causal language models from safetensors checkpoints: Llama 2/3 (SmolLM, TinyLlama),
//! Mistral, Qwen2/2.5 and Qwen3, on kandle's own decoder.
use super::decoder::config::DecoderConfig;
use super::decoder::source::Safetensors;
use super::decoder::{Decoder, Weights};
use super::weights::{read_optional_json, safetensors_files};
use super::{
    Backend, LoadError, LoadedModel, ModelInfo, Task, device_name, dtype_name, generation_task,
    load_tokenizer,
};
use crate::chat_template::ChatTemplate;
use crate::cli::KernelsArg;
use candle_core::{DType, Device};
use std::path::Path;

pub fn load(
    dir: &Path,
    config: &serde_json::Value,
    task: Option<Task>,
    dtype: DType,
    device: &Device,
    kernels: KernelsArg,
) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    let cfg = DecoderConfig::from_hf(config).map_err(|m| LoadError::invalid(&config_path, m))?;
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let tokenizer_config =
        read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let chat_template = ChatTemplate::from_tokenizer_config(dir, &tokenizer_config)?;
    let task = generation_task(task, &chat_template, dir)?;

    let mut eos = Vec::new();
    collect_ids(config.get("eos_token_id"), &mut eos);
    if let Some(gen_cfg) = read_optional_json(&dir.join("generation_config.json"))? {
        collect_ids(gen_cfg.get("eos_token_id"), &mut eos);
    }
    if let Some(id) = ChatTemplate::special_token(&tokenizer_config, "eos_token")
        .and_then(|t| tokenizer.token_to_id(&t))
    {
        eos.push(id);
    }
    eos.sort_unstable();
    eos.dedup();

    let files = safetensors_files(dir)?;
    let mut source = Safetensors::open(&files, dtype, device)?;
    let info = ModelInfo {
        architecture: cfg.family.clone(),
        task,
        dtype: dtype_name(dtype),
        device: device_name(device),
        context_length: cfg.context_length,
        vocab_size: cfg.vocab_size,
        eos_token_ids: eos,
        labels: Default::default(),
    };
    let weights = Weights::load(cfg, &mut source, None, device, kernels)
        .map_err(|e| LoadError::invalid(dir, e.to_string()))?;
    Ok(LoadedModel {
        info,
        tokenizer,
        chat_template,
        backend: Backend::Generator(Decoder::new(weights)),
    })
}

/// `eos_token_id` is a number or a list of numbers in Hugging Face configs.
fn collect_ids(value: Option<&serde_json::Value>, out: &mut Vec<u32>) {
    match value {
        Some(serde_json::Value::Number(n)) => out.extend(n.as_u64().map(|n| n as u32)),
        Some(serde_json::Value::Array(items)) => {
            out.extend(items.iter().filter_map(|v| v.as_u64()).map(|n| n as u32))
        }
        _ => {}
    }
}
