//! Causal language models behind one interface: each sequence gets its own KV cache,
//! while the weights (reference-counted tensors in candle) are shared by all of them.
use crate::engine::{LanguageModel, SequenceModel};
use candle_core::{Device, Tensor};
use candle_transformers::models::{llama, quantized_llama};
use std::sync::Arc;

#[derive(Clone)]
pub struct CausalLm {
    device: Device,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// The cache here is a pristine template (rotary tables, no keys or values yet).
    Llama {
        model: Arc<llama::Llama>,
        cache: llama::Cache,
    },
    /// quantized_llama keeps its KV cache inside the layers, so each sequence clones the
    /// (Arc-backed) weights struct, which never holds state in the template.
    Quantized(quantized_llama::ModelWeights),
}

impl CausalLm {
    pub fn llama(model: llama::Llama, cache: llama::Cache, device: Device) -> Self {
        Self {
            device,
            kind: Kind::Llama {
                model: Arc::new(model),
                cache,
            },
        }
    }

    pub fn quantized(model: quantized_llama::ModelWeights, device: Device) -> Self {
        Self {
            device,
            kind: Kind::Quantized(model),
        }
    }
}

impl LanguageModel for CausalLm {
    fn new_sequence(&self) -> Box<dyn SequenceModel> {
        Box::new(self.clone())
    }
}

impl SequenceModel for CausalLm {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.kind {
            Kind::Llama { model, cache } => model.forward(&input, pos, cache)?,
            Kind::Quantized(model) => model.forward(&input, pos)?,
        };
        logits.squeeze(0)?.to_dtype(candle_core::DType::F32)
    }
}
