//! BERT-family embedding models, pooled and normalised as their sentence-transformers
//! configs declare (`modules.json`, `1_Pooling/config.json`).
use super::weights::{catch_load, mmap_var_builder, read_optional_json, safetensors_files};
use super::{
    Backend, LoadError, LoadedModel, ModelInfo, Task, device_name, dtype_name, load_tokenizer,
};
use crate::engine::EmbeddingModel;
use candle_core::{D, DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Cls,
    Mean,
    Max,
    LastToken,
}

pub struct Embedder {
    model: BertModel,
    pooling: Pooling,
    normalize: bool,
    device: Device,
}

pub fn load(
    dir: &Path,
    config: &serde_json::Value,
    task: Option<Task>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    if task.is_some_and(|t| t != Task::Embedding) {
        return Err(LoadError::invalid(
            dir,
            "a BERT model serves only the embedding task",
        ));
    }
    let config_path = dir.join("config.json");
    let cfg: Config = serde_json::from_value(config.clone())
        .map_err(|e| LoadError::invalid(&config_path, e.to_string()))?;
    let (pooling, normalize) = sentence_transformers_config(dir)?;
    // sentence-transformers truncates at max_seq_length; kandle refuses longer inputs instead.
    let context_length = read_optional_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
        .map_or(cfg.max_position_embeddings, |n| n as usize)
        .min(cfg.max_position_embeddings);
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let vb = mmap_var_builder(&safetensors_files(dir)?, dtype, device)?;
    // Checkpoints saved from BertModel have bare names; those from task heads prefix `bert.`.
    let model = catch_load(dir, || {
        BertModel::load(vb.clone(), &cfg)
            .or_else(|_| BertModel::load(vb.pp("bert"), &cfg))
            .map_err(LoadError::from)
    })?;
    Ok(LoadedModel {
        info: ModelInfo {
            architecture: "bert".into(),
            task: Task::Embedding,
            dtype: dtype_name(dtype),
            device: device_name(device),
            context_length,
            vocab_size: cfg.vocab_size,
            eos_token_ids: Vec::new(),
        },
        tokenizer,
        chat_template: None,
        backend: Backend::Embedder(Box::new(Embedder {
            model,
            pooling,
            normalize,
            device: device.clone(),
        })),
    })
}

/// Pooling and normalisation from the sentence-transformers files; mean pooling without
/// normalisation when they are absent.
fn sentence_transformers_config(dir: &Path) -> Result<(Pooling, bool), LoadError> {
    let modules = read_optional_json(&dir.join("modules.json"))?;
    let module_types: Vec<String> = modules
        .as_ref()
        .and_then(|m| m.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("type").and_then(|t| t.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let normalize = module_types.iter().any(|t| t.ends_with("Normalize"));
    let pooling_path = dir.join("1_Pooling").join("config.json");
    let pooling = match read_optional_json(&pooling_path)? {
        None => Pooling::Mean,
        Some(cfg) => {
            let on = |key: &str| cfg.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
            if on("pooling_mode_cls_token") {
                Pooling::Cls
            } else if on("pooling_mode_mean_tokens") {
                Pooling::Mean
            } else if on("pooling_mode_max_tokens") {
                Pooling::Max
            } else if on("pooling_mode_lasttoken") {
                Pooling::LastToken
            } else {
                return Err(LoadError::invalid(
                    &pooling_path,
                    "no supported pooling mode is enabled",
                ));
            }
        }
    };
    Ok((pooling, normalize))
}

impl EmbeddingModel for Embedder {
    fn embed(&self, batch: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let max_len = batch.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * max_len);
        let mut mask = Vec::with_capacity(batch.len() * max_len);
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(0u32, max_len - seq.len()));
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            mask.extend(std::iter::repeat_n(0u32, max_len - seq.len()));
        }
        let shape = (batch.len(), max_len);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let hidden = hidden.to_dtype(DType::F32)?;
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let sum = hidden.broadcast_mul(&mask_f)?.sum(1)?;
                let count = mask_f.sum(1)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Max => {
                // Padding must never win the max: push it far below any activation.
                let penalty = ((mask_f.ones_like()? - &mask_f)? * -1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
            Pooling::LastToken => {
                let rows = batch
                    .iter()
                    .enumerate()
                    .map(|(i, seq)| hidden.get(i)?.get(seq.len() - 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            pooled.broadcast_div(&norm.maximum(1e-12)?)?
        } else {
            pooled
        };
        pooled.to_vec2()
    }
}
