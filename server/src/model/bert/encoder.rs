//! BERT's encoder over packed sequences: a batch's tokens sit in one [tokens, hidden] matrix
//! with no padding, so each linear layer is one matrix product over exactly the tokens there
//! are, whatever the mix of lengths. Only attention needs the sequences apart: on the CPU it
//! reads each sequence's rows in place; elsewhere it gathers them into a padded
//! [batch, heads, longest, head_dim] view and back.
use super::gelu;
use crate::cli::KernelsArg;
use crate::engine::EncoderInput;
use crate::model::attention::{self, Heads, Inputs, Span};
use crate::model::dense::Dense;
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

/// The config fields that change the maths; any other value of them is refused at load.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".into()
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `gelu` in transformers: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new` and `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor, kernels: KernelsArg) -> Result<Tensor> {
        match self {
            Self::GeluErf if kernels.own_cpu(x.device(), x.dtype()) => gelu::gelu_erf(x),
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }

    /// The same function over a slice, in place, for kernels that apply it as they write.
    fn in_place(self) -> fn(&mut [f32]) {
        match self {
            Self::GeluErf => gelu::gelu_in_place,
            Self::GeluTanh => gelu::gelu_tanh_in_place,
            Self::Relu => |xs| xs.iter_mut().for_each(|x| *x = x.max(0.0)),
        }
    }
}

impl Config {
    /// Refuses what this encoder would compute differently from transformers.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} does not split into {} attention heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size == 0 {
            return Err("type_vocab_size is 0: there is no token type embedding".into());
        }
        self.activation().map(|_| ())
    }

    fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_act `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }
}

struct Layer {
    /// Query, key and value in one product.
    qkv: Projection,
    attention_out: Projection,
    attention_norm: LayerNorm,
    up: Projection,
    down: Projection,
    output_norm: LayerNorm,
}

/// A linear layer and the activation after it, if any: kandle's packed kernel on the CPU in
/// f32 (where candle's product ran at under half the FMA peak, and the activation was a
/// single-threaded pass of its own), candle's ops on other devices and dtypes.
enum Projection {
    Dense(Dense),
    Candle(Linear, Option<Activation>, KernelsArg),
}

impl Projection {
    fn new(linear: Linear, activation: Option<Activation>, kernels: KernelsArg) -> Result<Self> {
        let w = linear.weight();
        Ok(match linear.bias() {
            Some(bias) if kernels.own_cpu(w.device(), w.dtype()) => {
                Self::Dense(Dense::new(w, bias, activation.map(Activation::in_place))?)
            }
            _ => Self::Candle(linear, activation, kernels),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(d) => d.forward(x),
            Self::Candle(l, None, _) => l.forward(x),
            Self::Candle(l, Some(a), kernels) => a.apply(&l.forward(x)?, *kernels),
        }
    }
}

pub struct Encoder {
    word: Tensor,
    position: Tensor,
    /// Token type 0's row, added to every token of a single text.
    token_type: Tensor,
    /// Every type's row: a pair's second text is of type 1.
    token_types: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    device: Device,
    kernels: KernelsArg,
}

pub(super) fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((outputs, inputs), "weight")?,
        Some(vb.get(outputs, "bias")?),
    ))
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

impl Encoder {
    /// `vb` at the model's root: checkpoints saved from `BertModel` have bare names, those
    /// from task heads prefix `bert.`.
    pub fn load(vb: VarBuilder, cfg: &Config, kernels: KernelsArg) -> Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let activation = cfg.activation().map_err(candle_core::Error::msg)?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let emb = vb.pp("embeddings");
        let token_types = emb.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let part = |name: &str| linear(attention.pp("self").pp(name), h, h);
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let cat = |f: fn(&Linear) -> Tensor| Tensor::cat(&[f(&q), f(&k), f(&v)], 0);
                Ok(Layer {
                    qkv: Projection::new(
                        Linear::new(
                            cat(|l| l.weight().clone())?,
                            Some(cat(|l| l.bias().expect("loaded with a bias").clone())?),
                        ),
                        None,
                        kernels,
                    )?,
                    attention_out: Projection::new(
                        linear(attention.pp("output.dense"), h, h)?,
                        None,
                        kernels,
                    )?,
                    attention_norm: layer_norm(attention.pp("output.LayerNorm"), h, eps)?,
                    up: Projection::new(
                        linear(vb.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                        Some(activation),
                        kernels,
                    )?,
                    down: Projection::new(
                        linear(vb.pp("output.dense"), cfg.intermediate_size, h)?,
                        None,
                        kernels,
                    )?,
                    output_norm: layer_norm(vb.pp("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            word: emb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: token_types.get(0)?,
            token_types,
            embedding_norm: layer_norm(emb.pp("LayerNorm"), h, eps)?,
            layers,
            heads: cfg.num_attention_heads,
            device: vb.device().clone(),
            kernels,
        })
    }

    /// The last hidden state of every token of `batch`, packed: sequence after sequence, as
    /// f32 [tokens, hidden]. Sequences must not be empty nor longer than the position table.
    pub fn forward(&self, batch: &[EncoderInput]) -> Result<Tensor> {
        let lens: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        let packing = Packing::new(&lens, &self.device)?;
        let ids: Vec<u32> = batch.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let ids = Tensor::new(ids, &self.device)?;
        let x = (self.word.index_select(&ids, 0)?
            + self.position.index_select(&packing.positions, 0)?)?;
        let x = if batch.iter().all(|s| s.second >= s.ids.len()) {
            x.broadcast_add(&self.token_type)?
        } else {
            let types: Vec<u32> = batch
                .iter()
                .flat_map(|s| (0..s.ids.len()).map(|p| u32::from(p >= s.second)))
                .collect();
            let types = Tensor::new(types, &self.device)?;
            (x + self.token_types.index_select(&types, 0)?)?
        };
        let mut x = self.embedding_norm.forward(&x)?;
        for layer in &self.layers {
            let attended = self.attention(&layer.qkv.forward(&x)?, &packing)?;
            x = layer
                .attention_norm
                .forward(&(layer.attention_out.forward(&attended)? + x)?)?;
            let up = layer.up.forward(&x)?;
            x = layer
                .output_norm
                .forward(&(layer.down.forward(&up)? + x)?)?;
        }
        x.to_dtype(DType::F32)
    }

    /// Scaled dot-product attention of packed [tokens, 3 * hidden] queries, keys and values,
    /// each sequence attending to itself only; packed [tokens, hidden] out.
    fn attention(&self, qkv: &Tensor, packing: &Packing) -> Result<Tensor> {
        if self.kernels.own_cpu(qkv.device(), qkv.dtype()) {
            return self.attention_in_place(qkv, packing);
        }
        let (b, l) = (packing.lens.len(), packing.longest);
        let hidden = qkv.dim(1)? / 3;
        let head_dim = hidden / self.heads;
        let padded = match &packing.gather {
            Some(gather) => qkv.index_select(gather, 0)?,
            None => qkv.clone(),
        };
        let padded = padded.reshape((b, l, 3, self.heads, head_dim))?;
        let part = |i: usize| padded.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let q = (part(0)? * (head_dim as f64).powf(-0.5))?.contiguous()?;
        let (k, v) = (part(1)?.contiguous()?, part(2)?.contiguous()?);
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = &packing.mask {
            scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * l, hidden))?;
        match &packing.scatter {
            Some(scatter) => out.index_select(scatter, 0),
            None => Ok(out),
        }
    }
}

impl Encoder {
    /// As `attention`, on the CPU in f32: each query reads its sequence's keys and values
    /// where the fused projection wrote them, with no padded, transposed or masked copies.
    fn attention_in_place(&self, qkv: &Tensor, packing: &Packing) -> Result<Tensor> {
        let (tokens, width) = qkv.dims2()?;
        let hidden = width / 3;
        let dim = hidden / self.heads;
        let (storage, layout) = qkv.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("attention takes contiguous f32 q, k and v");
        };
        let data = &data[start..end];
        let mut spans = Vec::with_capacity(packing.lens.len());
        let mut at = 0;
        for &n in &packing.lens {
            spans.push(Span {
                q_start: at,
                q_len: n,
                k_start: at,
                k_len: n,
            });
            at += n;
        }
        let slots: Vec<u32> = (0..tokens as u32).collect();
        let out = attention::attend(&Inputs {
            q: data,
            q_stride: width,
            k_pool: &data[hidden..],
            v_pool: &data[2 * hidden..],
            kv_stride: width,
            slots: &slots,
            spans: &spans,
            heads: Heads {
                heads: self.heads,
                kv_heads: self.heads,
                dim,
            },
            causal: false,
            window: None,
            scale: (dim as f32).powf(-0.5),
        });
        Tensor::from_vec(out, (tokens, hidden), &self.device)
    }
}

/// Where each sequence's tokens sit in the packed matrix and in attention's padded view.
struct Packing {
    lens: Vec<usize>,
    longest: usize,
    /// Each token's position in its sequence.
    positions: Tensor,
    /// Packed row for each padded slot (padding slots repeat a real row: masked as keys,
    /// dropped as queries); None when no sequence is padded.
    gather: Option<Tensor>,
    /// Padded slot for each packed row.
    scatter: Option<Tensor>,
    /// [batch, 1, 1, longest]: 0 for a token, -inf for padding.
    mask: Option<Tensor>,
}

impl Packing {
    fn new(lens: &[usize], device: &Device) -> Result<Self> {
        let lens = lens.to_vec();
        let longest = lens.iter().copied().max().unwrap_or(0);
        if lens.contains(&0) {
            candle_core::bail!("an empty sequence cannot be encoded");
        }
        let positions: Vec<u32> = lens.iter().flat_map(|&n| 0..n as u32).collect();
        let positions = Tensor::new(positions, device)?;
        if lens.iter().all(|&n| n == longest) {
            return Ok(Self {
                lens,
                longest,
                positions,
                gather: None,
                scatter: None,
                mask: None,
            });
        }
        let (mut gather, mut scatter, mut mask) = (vec![], vec![], vec![]);
        let mut start = 0;
        for (i, &n) in lens.iter().enumerate() {
            for p in 0..longest {
                gather.push((start + p.min(n - 1)) as u32);
                mask.push(if p < n { 0f32 } else { f32::NEG_INFINITY });
            }
            scatter.extend((0..n).map(|p| (i * longest + p) as u32));
            start += n;
        }
        let b = lens.len();
        Ok(Self {
            gather: Some(Tensor::new(gather, device)?),
            scatter: Some(Tensor::new(scatter, device)?),
            mask: Some(Tensor::from_vec(mask, (b, 1, 1, longest), device)?),
            lens,
            longest,
            positions,
        })
    }
}

/// The rows of sequence `i` in a packed [tokens, hidden] matrix.
pub fn rows(lens: &[usize], i: usize) -> std::ops::Range<usize> {
    let start: usize = lens[..i].iter().sum();
    start..start + lens[i]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config() -> Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
            "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12
        }))
        .unwrap()
    }

    /// Random weights under the names a `BertForMaskedLM` checkpoint uses.
    fn weights(cfg: &Config) -> HashMap<String, Tensor> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![cfg.vocab_size, h],
            ),
            ("embeddings.position_embeddings.weight".into(), vec![32, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                shapes.push((format!("{p}.{name}.weight"), vec![out, inp]));
                shapes.push((format!("{p}.{name}.bias"), vec![out]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("{p}.{norm}.weight"), vec![h]));
                shapes.push((format!("{p}.{norm}.bias"), vec![h]));
            }
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
                (format!("bert.{name}"), t)
            })
            .collect()
    }

    fn load(weights: HashMap<String, Tensor>, cfg: &Config, kernels: KernelsArg) -> Encoder {
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Encoder::load(vb, cfg, kernels).unwrap()
    }

    fn encoder(cfg: &Config) -> Encoder {
        load(weights(cfg), cfg, KernelsArg::Auto)
    }

    /// candle's operations, the path a GPU takes, compute what kandle's CPU kernels compute.
    #[test]
    fn portable_operations_match_the_cpu_kernels() {
        let cfg = config();
        let w = weights(&cfg);
        let own = load(w.clone(), &cfg, KernelsArg::Auto);
        let portable = load(w, &cfg, KernelsArg::Portable);
        let batch: Vec<EncoderInput> = [vec![3, 4, 5], vec![7, 8, 9, 10, 11, 12, 13], vec![1]]
            .into_iter()
            .map(EncoderInput::single)
            .collect();
        let (a, b) = (
            own.forward(&batch).unwrap(),
            portable.forward(&batch).unwrap(),
        );
        let diff = crate::model::max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn a_sequence_encodes_the_same_alone_and_among_longer_and_shorter_ones() {
        let cfg = config();
        let enc = encoder(&cfg);
        let batch: Vec<EncoderInput> = [
            vec![3, 4, 5],
            vec![7, 8, 9, 10, 11, 12],
            vec![1],
            vec![3, 4, 5],
        ]
        .into_iter()
        .map(EncoderInput::single)
        .chain([EncoderInput {
            ids: vec![3, 4, 5, 6],
            second: 2,
        }])
        .collect();
        let packed = enc.forward(&batch).unwrap();
        let lens: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        assert_eq!(packed.dims(), &[17, 16]);
        for (i, seq) in batch.iter().enumerate() {
            let alone = enc.forward(std::slice::from_ref(seq)).unwrap();
            let r = rows(&lens, i);
            let among = packed.narrow(0, r.start, r.len()).unwrap();
            let diff = crate::model::max_abs_diff(&alone, &among);
            assert!(diff < 1e-5, "sequence {i} differs by {diff}");
        }
        // Attention mixes tokens within a sequence: the same token differs by context.
        let first = packed.narrow(0, 0, 1).unwrap();
        let other = enc
            .forward(&[EncoderInput::single(vec![3, 9, 9])])
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        let moved = crate::model::max_abs_diff(&first, &other);
        assert!(moved > 1e-3, "context changed nothing: {moved}");
        // A pair's second text is of another type: the same ids encode differently.
        let pair = enc.forward(&batch[4..]).unwrap();
        let single = enc
            .forward(&[EncoderInput::single(vec![3, 4, 5, 6])])
            .unwrap();
        let typed = crate::model::max_abs_diff(&pair, &single);
        assert!(typed > 1e-3, "token types changed nothing: {typed}");
    }

    #[test]
    fn config_values_that_change_the_maths_are_read_or_refused() {
        let mut cfg = config();
        assert!(cfg.check().is_ok());
        cfg.hidden_act = "silu".into();
        assert!(cfg.check().unwrap_err().contains("hidden_act `silu`"));
        let mut cfg = config();
        cfg.position_embedding_type = "relative_key".into();
        assert!(cfg.check().unwrap_err().contains("relative_key"));
        let mut cfg = config();
        cfg.num_attention_heads = 3;
        assert!(cfg.check().unwrap_err().contains("3 attention heads"));
    }
}
