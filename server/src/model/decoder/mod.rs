//! kandle's decoder: one implementation, driven by its config, for Llama 2/3, Mistral, Qwen2
//! and Qwen3, from safetensors or GGUF. A forward pass takes the rows of every sequence in an
//! engine step at once: embeddings, norms, projections and the MLP run on the concatenated
//! rows, so each weight is read once per step however many sequences there are; only
//! attention is per sequence.
pub mod attention;
pub mod config;
mod linear;
pub mod matrix;
mod norm;
pub mod quant;
pub mod rope;
pub mod source;
mod swiglu;

use crate::cli::KernelsArg;
use crate::engine::{BLOCK_TOKENS, Chunk, LanguageModel};
use attention::{KvCache, Layout};
use candle_core::{DType, Device, Result, Tensor};
use config::DecoderConfig;
use linear::{Linear, Stacked};
use matrix::Matrix;
use rope::Rope;
use source::Source;
use std::sync::Arc;

struct Layer {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Stacked,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    mlp_norm: Tensor,
    /// gate and up.
    gate_up: Stacked,
    down: Linear,
}

pub struct Weights {
    cfg: DecoderConfig,
    embed: Arc<Matrix>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Arc<Matrix>,
    rope: Rope,
    dtype: DType,
    device: Device,
    kernels: KernelsArg,
}

impl Weights {
    pub fn load(
        cfg: DecoderConfig,
        src: &mut dyn Source,
        rope_freq_factors: Option<Vec<f32>>,
        device: &Device,
        kernels: KernelsArg,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_rows, kv_rows) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let b = cfg.biases;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let name = |n: &str| format!("{p}.{n}");
                let (q, k, v) = (
                    name("self_attn.q_proj"),
                    name("self_attn.k_proj"),
                    name("self_attn.v_proj"),
                );
                let qkv =
                    Stacked::load(src, &[(&q, q_rows), (&k, kv_rows), (&v, kv_rows)], h, b.qkv)?;
                let o = Linear::load(src, &name("self_attn.o_proj"), h, q_rows, b.output)?;
                let (gate, up) = (name("mlp.gate_proj"), name("mlp.up_proj"));
                let i = cfg.intermediate_size;
                let gate_up = Stacked::load(src, &[(&gate, i), (&up, i)], h, b.mlp)?;
                let down = Linear::load(src, &name("mlp.down_proj"), h, i, b.mlp)?;
                let (q_norm, k_norm) = if cfg.qk_norm {
                    (
                        Some(src.vector(&format!("{p}.self_attn.q_norm.weight"), d)?),
                        Some(src.vector(&format!("{p}.self_attn.k_norm.weight"), d)?),
                    )
                } else {
                    (None, None)
                };
                Ok(Layer {
                    attn_norm: src.vector(&format!("{p}.input_layernorm.weight"), h)?,
                    mlp_norm: src.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                    qkv,
                    o,
                    q_norm,
                    k_norm,
                    gate_up,
                    down,
                })
            })
            .collect::<Result<_>>()?;
        let embed = Arc::new(src.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?);
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            Arc::new(src.matrix("lm_head.weight", cfg.vocab_size, h)?)
        };
        Ok(Self {
            rope: Rope::new(&cfg, rope_freq_factors, device)?,
            norm: src.vector("model.norm.weight", h)?,
            dtype: src.dtype(),
            device: device.clone(),
            kernels,
            embed,
            layers,
            lm_head,
            cfg,
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The cache's dtype. kandle's CPU attention reads f32 or f16: f16 for quantized weights,
    /// as llama.cpp keeps its cache (half the bytes a decode step reads per cached token, and
    /// twice the tokens in the same memory), f32 for float weights (whose logits must match
    /// transformers'). Other devices keep the cache in the model's dtype.
    fn kv_dtype(&self) -> DType {
        if !self.kernels.own_cpu(&self.device, DType::F32) {
            self.dtype
        } else if self.layers.iter().any(|l| l.down.quantized()) {
            DType::F16
        } else {
            DType::F32
        }
    }

    fn forward(&self, chunks: &[Chunk<'_>], cache: &KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (heads, kv_heads, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| (c.start..c.start + c.tokens.len()).map(|p| p as u32))
            .collect();
        let rows = ids.len();
        let layout = Layout::new(chunks, cache, kv_heads, d, &self.device, self.kernels)?;
        let (cos, sin) = self
            .rope
            .angles(&Tensor::new(positions, &self.device)?, self.dtype)?;
        let scale = 1.0 / (d as f32).sqrt();
        let own = self.kernels.own_cpu(&self.device, self.dtype);
        let eps = cfg.rms_norm_eps as f32;
        let norm = |x: &Tensor, w: &Tensor| norm::rms_norm(x, w, eps, own);

        let mut x = self
            .embed
            .embedding(&Tensor::new(ids, &self.device)?)?
            .to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            layout.prefetch_writes(cache, i);
            let h = norm(&x, &layer.attn_norm)?;
            let [q, k, v] = layer.qkv.forward(&h)?;
            let mut q = q.reshape((rows, heads, d))?;
            let mut k = k.reshape((rows, kv_heads, d))?;
            let v = v.reshape((rows, kv_heads, d))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = norm(&q, qn)?;
                k = norm(&k, kn)?;
            }
            let q = self.rope.apply(&q, &cos, &sin, own)?;
            let k = self.rope.apply(&k, &cos, &sin, own)?;
            let attn = attention::attend(&q, &k, &v, cache, i, &layout, cfg.windows[i], scale)?;
            x = (x + layer.o.forward(&attn.reshape((rows, heads * d))?)?)?;
            let h = norm(&x, &layer.mlp_norm)?;
            let gate_up = layer.gate_up.forward_joined(&h)?;
            let gated = swiglu::swiglu(&gate_up, own)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        // The rows whose next token is asked for: each chunk's last, or all of its rows.
        let mut wanted = Vec::with_capacity(chunks.len());
        let mut end = 0u32;
        for c in chunks {
            end += c.tokens.len() as u32;
            wanted.extend(end - c.logit_rows() as u32..end);
        }
        let x = x.index_select(&Tensor::new(wanted, &self.device)?, 0)?;
        self.lm_head
            .forward(&norm(&x, &self.norm)?)?
            .to_dtype(DType::F32)
    }
}

/// The weights (shared) and a KV cache (owned).
pub struct Decoder {
    weights: Arc<Weights>,
    cache: Option<KvCache>,
}

impl Decoder {
    pub fn new(weights: Weights) -> Self {
        Self {
            weights: Arc::new(weights),
            cache: None,
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        self.weights.config()
    }

    pub fn device(&self) -> &Device {
        &self.weights.device
    }

    /// One sequence of up to `capacity` tokens with a cache of its own, sharing these
    /// weights: for tests and tools that drive the model step by step.
    pub fn sequence(&self, capacity: usize) -> Result<Sequence> {
        let blocks = capacity.div_ceil(BLOCK_TOKENS).max(1);
        let mut decoder = Self {
            weights: self.weights.clone(),
            cache: None,
        };
        decoder.allocate_kv(blocks)?;
        Ok(Sequence {
            decoder,
            blocks: (0..blocks as u32).collect(),
        })
    }
}

impl LanguageModel for Decoder {
    fn kv_bytes_per_block(&self) -> usize {
        let w = &self.weights;
        w.cfg.kv_bytes_per_token(w.kv_dtype().size_in_bytes()) * BLOCK_TOKENS
    }

    fn allocate_kv(&mut self, blocks: usize) -> Result<()> {
        let w = &self.weights;
        let c = &w.cfg;
        // Drop the old pool first: both at once could exceed the memory the new one fits.
        self.cache = None;
        self.cache = Some(KvCache::new(
            c.num_layers,
            blocks,
            c.num_kv_heads,
            c.head_dim,
            w.kv_dtype(),
            &w.device,
        )?);
        Ok(())
    }

    fn forward(&mut self, chunks: &[Chunk<'_>]) -> Result<Tensor> {
        match &self.cache {
            Some(cache) => self.weights.forward(chunks, cache),
            None => candle_core::bail!("the KV cache has not been allocated"),
        }
    }
}

/// A single sequence driven by hand.
pub struct Sequence {
    decoder: Decoder,
    blocks: Vec<u32>,
}

impl Sequence {
    /// Runs `tokens` at positions `start..` and returns the logits for the next token.
    pub fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Tensor> {
        let chunk = Chunk {
            tokens,
            start,
            blocks: &self.blocks,
            every_row: false,
        };
        self.decoder.forward(&[chunk])?.squeeze(0)
    }
}
