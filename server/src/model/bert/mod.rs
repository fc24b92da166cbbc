//! BERT-family models on kandle's own encoder: embedding models, pooled and normalised as
//! their sentence-transformers configs declare (`modules.json`, `1_Pooling/config.json`),
//! and sequence classifiers (`BertForSequenceClassification`): cross-encoders for rerank
//! when they have one logit, classifiers when they have more.
mod classifier;
mod encoder;
mod gelu;
mod pooling;

use super::weights::{catch_load, mmap_var_builder, read_optional_json, safetensors_files};
use super::{
    Backend, Labels, LoadError, LoadedModel, ModelInfo, Task, device_name, dtype_name,
    load_tokenizer,
};
use crate::cli::KernelsArg;
use crate::engine::{EmbeddingModel, EncoderInput};
use candle_core::{DType, Device};
use classifier::Classifier;
use encoder::{Config, Encoder};
use pooling::Pooling;
use std::path::Path;

pub struct Embedder {
    encoder: Encoder,
    hidden_size: usize,
    pooling: Pooling,
    normalize: bool,
}

pub fn load(
    dir: &Path,
    config: &serde_json::Value,
    task: Option<Task>,
    dtype: DType,
    device: &Device,
    kernels: KernelsArg,
) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    let cfg: Config = serde_json::from_value(config.clone())
        .map_err(|e| LoadError::invalid(&config_path, e.to_string()))?;
    cfg.check()
        .map_err(|m| LoadError::invalid(&config_path, m))?;
    let labels = classifier_labels(config);
    let found = match &labels {
        None => Task::Embedding,
        Some(l) if l.names.len() == 1 => Task::Rerank,
        Some(_) => Task::Classify,
    };
    let task = match (task, found) {
        (None, found) => found,
        (Some(t), found) if t == found => t,
        // One logit is a score: served as a one-label classifier too.
        (Some(Task::Classify), Task::Rerank) => Task::Classify,
        (Some(t), found) => {
            return Err(LoadError::invalid(
                &config_path,
                format!(
                    "this BERT model serves the {} task, not {}",
                    found.as_str(),
                    t.as_str()
                ),
            ));
        }
    };
    // sentence-transformers truncates at max_seq_length; kandle refuses longer inputs instead.
    let context_length = read_optional_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
        .map_or(cfg.max_position_embeddings, |n| n as usize)
        .min(cfg.max_position_embeddings);
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let vb = mmap_var_builder(&safetensors_files(dir)?, dtype, device)?;
    let backend = match &labels {
        Some(l) => {
            let classifier = catch_load(dir, || {
                Classifier::load(vb, &cfg, l.names.len(), kernels).map_err(LoadError::from)
            })?;
            Backend::Embedder(Box::new(classifier))
        }
        None => {
            let (pooling, normalize) = sentence_transformers_config(dir)?;
            let encoder = catch_load(dir, || {
                Encoder::load(vb, &cfg, kernels).map_err(LoadError::from)
            })?;
            Backend::Embedder(Box::new(Embedder {
                encoder,
                hidden_size: cfg.hidden_size,
                pooling,
                normalize,
            }))
        }
    };
    Ok(LoadedModel {
        info: ModelInfo {
            architecture: "bert".into(),
            task,
            dtype: dtype_name(dtype),
            device: device_name(device),
            context_length,
            vocab_size: cfg.vocab_size,
            eos_token_ids: Vec::new(),
            labels: labels.unwrap_or_default(),
        },
        tokenizer,
        chat_template: None,
        backend,
    })
}

/// A `BertForSequenceClassification`'s labels, in logit order (`id2label`, as transformers
/// reads it); None for other BERT models.
fn classifier_labels(config: &serde_json::Value) -> Option<Labels> {
    let architectures = config.get("architectures")?.as_array()?;
    if !architectures
        .iter()
        .any(|a| a == "BertForSequenceClassification")
    {
        return None;
    }
    let by_id = config.get("id2label").and_then(|m| m.as_object());
    let count = config
        .get("num_labels")
        .and_then(|n| n.as_u64())
        .map(|n| n as usize)
        .or(by_id.map(|m| m.len()))
        .unwrap_or(2);
    let names = (0..count)
        .map(|i| {
            by_id
                .and_then(|m| m.get(&i.to_string())?.as_str())
                .map_or_else(|| format!("LABEL_{i}"), String::from)
        })
        .collect();
    let multi_label =
        config.get("problem_type").and_then(|p| p.as_str()) == Some("multi_label_classification");
    Some(Labels { names, multi_label })
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
    fn embed(&self, batch: &[EncoderInput]) -> candle_core::Result<Vec<Vec<f32>>> {
        let hidden = self
            .encoder
            .forward(batch)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let lens: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        Ok(self
            .pooling
            .pool(&hidden, self.hidden_size, &lens, self.normalize))
    }
}
