//! Llama-family safetensors checkpoints (Llama 2/3, SmolLM, TinyLlama).
use super::weights::{catch_load, mmap_var_builder, read_optional_json, safetensors_files};
use super::{
    Backend, LoadError, LoadedModel, ModelInfo, Task, causal::CausalLm, device_name, dtype_name,
    generation_task, load_tokenizer,
};
use crate::chat_template::ChatTemplate;
use candle_core::{DType, Device};
use candle_transformers::models::llama;
use std::path::Path;

pub fn load(
    dir: &Path,
    config: &serde_json::Value,
    task: Option<Task>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    let cfg: llama::LlamaConfig = serde_json::from_value(config.clone())
        .map_err(|e| LoadError::invalid(&config_path, e.to_string()))?;
    let cfg = cfg.into_config(false);
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
    let vb = mmap_var_builder(&files, dtype, device)?;
    let model = catch_load(dir, || Ok(llama::Llama::load(vb, &cfg)?))?;
    let cache = llama::Cache::new(true, dtype, &cfg, device)?;
    Ok(LoadedModel {
        info: ModelInfo {
            architecture: "llama".into(),
            task,
            dtype: dtype_name(dtype),
            device: device_name(device),
            context_length: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            eos_token_ids: eos,
        },
        tokenizer,
        chat_template,
        backend: Backend::Generator(CausalLm::llama(model, cache, device.clone())),
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
