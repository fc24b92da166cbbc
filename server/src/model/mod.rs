//! Model loading: find what a folder holds, load it with candle, and describe it.
//!
//! Families: decoders (Llama, Mistral, Qwen2, Qwen3) from safetensors (`causal_lm`) or GGUF
//! (`gguf`), on kandle's own `decoder`; BERT embeddings (`bert`).
pub(crate) mod attention;
pub mod bert;
pub mod causal_lm;
pub mod decoder;
pub mod dense;
mod disjoint;
pub(crate) mod exp;
pub mod gguf;
pub mod kernels;
pub mod weights;

use crate::chat_template::ChatTemplate;
use crate::cli::{DeviceArg, DtypeArg, KernelsArg, TaskArg};
use crate::engine::EmbeddingModel;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading weights: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    #[error("this build has no CUDA support; rebuild with `--features cuda`")]
    NoCuda,
    #[error(transparent)]
    Kernels(#[from] decoder::quant::KernelsChosen),
}

impl LoadError {
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Chat,
    Completion,
    Embedding,
    Rerank,
    Classify,
    /// Gradient-boosted trees over the Open Inference Protocol (`crate::tabular`).
    Tabular,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
            Self::Embedding => "embedding",
            Self::Rerank => "rerank",
            Self::Classify => "classify",
            Self::Tabular => "tabular",
        }
    }

    /// Whether an encoder serves it.
    pub fn encodes(self) -> bool {
        matches!(self, Self::Embedding | Self::Rerank | Self::Classify)
    }
}

impl From<TaskArg> for Task {
    fn from(t: TaskArg) -> Self {
        match t {
            TaskArg::Chat => Self::Chat,
            TaskArg::Completion => Self::Completion,
            TaskArg::Embedding => Self::Embedding,
            TaskArg::Rerank => Self::Rerank,
            TaskArg::Classify => Self::Classify,
            TaskArg::Tabular => Self::Tabular,
        }
    }
}

/// What the HTTP layer needs to know of the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: String,
    pub task: Task,
    pub dtype: String,
    pub device: String,
    /// Most tokens a sequence may hold (prompt plus completion).
    pub context_length: usize,
    pub vocab_size: usize,
    /// Tokens that end a generation.
    pub eos_token_ids: Vec<u32>,
    /// A classifier's labels; empty for other models.
    pub labels: Labels,
}

/// A classifier's labels, in the order of its logits, and how its scores are read.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub names: Vec<String>,
    /// Each label scored on its own (sigmoid) rather than one among all (softmax).
    pub multi_label: bool,
}

pub enum Backend {
    Generator(decoder::Decoder),
    /// An encoder: embeddings, or a classifier's logits. Boxed: it moves between threads
    /// once, and its kinds differ.
    Embedder(Box<dyn EmbeddingModel>),
}

pub struct LoadedModel {
    pub info: ModelInfo,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub backend: Backend,
}

pub struct LoadOptions {
    pub path: PathBuf,
    pub task: Option<TaskArg>,
    pub dtype: DtypeArg,
    pub device: DeviceArg,
    pub kernels: KernelsArg,
}

pub fn device(arg: DeviceArg) -> Result<Device, LoadError> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if !candle_core::utils::cuda_is_available() => Err(LoadError::NoCuda),
        DeviceArg::Cuda => Ok(Device::new_cuda(0)?),
        DeviceArg::Auto if !candle_core::utils::cuda_is_available() => Ok(Device::Cpu),
        // A CUDA build on a node without a GPU still serves, on the CPU.
        DeviceArg::Auto => Ok(Device::new_cuda(0).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no usable GPU; running on the CPU");
            Device::Cpu
        })),
    }
}

/// `auto` keeps full precision on CPU, where candle's f32 kernels are the fast ones.
pub fn dtype(arg: DtypeArg, device: &Device) -> DType {
    match arg {
        DtypeArg::Auto if device.is_cpu() => DType::F32,
        DtypeArg::Auto => DType::BF16,
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
        DtypeArg::Bf16 => DType::BF16,
    }
}

/// Loads whatever the path holds: a GGUF file, a folder with one, or a safetensors folder.
pub fn load(opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let path = &opts.path;
    if !path.exists() {
        return Err(LoadError::Missing(path.clone()));
    }
    let device = device(opts.device)?;
    opts.kernels.limit_instruction_set()?;
    let task = opts.task.map(Task::from);
    if let Some(file) = gguf::find_gguf(path)? {
        return gguf::load(&file, task, &device, opts.kernels);
    }
    let config = weights::read_json(&path.join("config.json"))?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let dtype = dtype(opts.dtype, &device);
    match model_type {
        "bert" => bert::load(path, &config, task, dtype, &device, opts.kernels),
        // The decoder's config names what it does not support.
        _ => causal_lm::load(path, &config, task, dtype, &device, opts.kernels),
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // Lengths are checked and batches padded by the server, never silently by the tokenizer.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| LoadError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(tokenizer)
}

/// A generation task: chat when the model ships a chat template, else plain completion.
fn generation_task(
    asked: Option<Task>,
    template: &Option<ChatTemplate>,
    path: &Path,
) -> Result<Task, LoadError> {
    match (asked, template) {
        (Some(t), _) if t.encodes() || t == Task::Tabular => Err(LoadError::invalid(
            path,
            format!("a generative model cannot serve the {} task", t.as_str()),
        )),
        (Some(Task::Chat), None) => Err(LoadError::invalid(
            path,
            "the chat task needs a chat template, and this model has none",
        )),
        (Some(t), _) => Ok(t),
        (None, Some(_)) => Ok(Task::Chat),
        (None, None) => Ok(Task::Completion),
    }
}

fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

fn device_name(device: &Device) -> String {
    if device.is_cuda() { "cuda" } else { "cpu" }.to_string()
}

/// The largest difference between two f32 tensors of one shape, for tests.
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("two f32 tensors of one shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_runs_where_the_build_can_and_cuda_insists() {
        let cuda_build = candle_core::utils::cuda_is_available();
        if !cuda_build {
            assert!(device(DeviceArg::Auto).unwrap().is_cpu());
            assert!(matches!(device(DeviceArg::Cuda), Err(LoadError::NoCuda)));
        }
        assert!(device(DeviceArg::Cpu).unwrap().is_cpu());
    }
}
