//! `BertForSequenceClassification`: the encoder, BERT's pooler (a dense layer and tanh over
//! the `[CLS]` token) and a linear head; one row of logits per input. A cross-encoder is
//! this with one logit: the relevance of the pair it reads.
use super::encoder::{Config, Encoder, linear};
use crate::cli::KernelsArg;
use crate::engine::{EmbeddingModel, EncoderInput};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

pub struct Classifier {
    encoder: Encoder,
    pooler: Linear,
    head: Linear,
}

impl Classifier {
    pub fn load(vb: VarBuilder, cfg: &Config, labels: usize, kernels: KernelsArg) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            encoder: Encoder::load(vb.clone(), cfg, kernels)?,
            pooler: linear(vb.pp("bert.pooler.dense"), h, h)?,
            head: linear(vb.pp("classifier"), h, labels)?,
        })
    }
}

impl EmbeddingModel for Classifier {
    fn embed(&self, batch: &[EncoderInput]) -> Result<Vec<Vec<f32>>> {
        let hidden = self.encoder.forward(batch)?;
        // Each input's first row, its [CLS] token, in the packed rows.
        let starts: Vec<u32> = batch
            .iter()
            .scan(0, |start, s| {
                let first = *start;
                *start += s.ids.len() as u32;
                Some(first)
            })
            .collect();
        let cls = hidden.index_select(&Tensor::new(starts, hidden.device())?, 0)?;
        let cls = cls.to_dtype(self.pooler.weight().dtype())?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        self.head.forward(&pooled)?.to_dtype(DType::F32)?.to_vec2()
    }
}
