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
    let cfg = config_of(config, &dir.join("config.json"))?;
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

/// The config as candle's Llama reads it, with every field that changes the maths either
/// carried over or refused by name: candle ignores what it does not know, and a model run
/// with the wrong rotary base or without its biases generates fluent nonsense.
fn config_of(config: &serde_json::Value, path: &Path) -> Result<llama::Config, LoadError> {
    let refuse = |message: String| Err(LoadError::invalid(path, message));
    let mut config = config.clone();
    let Some(fields) = config.as_object_mut() else {
        return refuse("not a JSON object".into());
    };
    // transformers 5 writes one `rope_parameters` object where earlier versions wrote
    // `rope_theta` and `rope_scaling`.
    if let Some(params) = fields.remove("rope_parameters").filter(|p| !p.is_null()) {
        if let Some(theta) = params.get("rope_theta") {
            fields.insert("rope_theta".into(), theta.clone());
        }
        fields.insert("rope_scaling".into(), params);
    }
    if let Some(scaling) = fields.remove("rope_scaling").filter(|s| !s.is_null()) {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match kind {
            "default" => {}
            "llama3" => {
                fields.insert("rope_scaling".into(), scaling);
            }
            other => {
                return refuse(format!(
                    "rope scaling `{other}` is not supported (supported: default, llama3)"
                ));
            }
        }
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if fields.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            return refuse(format!("`{flag}: true` is not supported for llama"));
        }
    }
    if let Some(act) = fields.get("hidden_act").and_then(|v| v.as_str())
        && act != "silu"
    {
        return refuse(format!(
            "hidden_act `{act}` is not supported (supported: silu)"
        ));
    }
    let cfg: llama::LlamaConfig = serde_json::from_value(config.clone())
        .map_err(|e| LoadError::invalid(path, e.to_string()))?;
    let head_dim = cfg.hidden_size / cfg.num_attention_heads.max(1);
    if let Some(declared) = config.get("head_dim").and_then(|v| v.as_u64())
        && declared as usize != head_dim
    {
        return refuse(format!(
            "head_dim {declared} differs from hidden_size / num_attention_heads ({head_dim}), which is not supported for llama"
        ));
    }
    Ok(cfg.into_config(false))
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
