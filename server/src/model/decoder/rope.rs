//! Rotary position embeddings, computed for each step's positions rather than tabled for the
//! whole context: a 128k-token table would cost more memory than a small model's weights.
#![allow(unsafe_code)]
use super::config::{DecoderConfig, RopeScaling, RopeStyle};
use crate::model::disjoint::each_row;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

pub struct Rope {
    /// [1, head_dim / 2] f32: the angle per position of each pair of dimensions.
    inv_freq: Tensor,
    style: RopeStyle,
}

impl Rope {
    /// `freq_factors`: llama.cpp's `rope_freqs` tensor, which divides each frequency (how
    /// Llama 3.1 GGUF files carry their scaling).
    pub fn new(
        cfg: &DecoderConfig,
        freq_factors: Option<Vec<f32>>,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear(factor) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                // transformers' `_compute_llama3_parameters`: long wavelengths are slowed by
                // `factor`, short ones kept, those between interpolated.
                let low_wavelen = original / low_freq_factor;
                let high_wavelen = original / high_freq_factor;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        if let Some(factors) = freq_factors {
            if factors.len() != inv_freq.len() {
                candle_core::bail!(
                    "rope_freqs holds {} factors for {} frequencies",
                    factors.len(),
                    inv_freq.len()
                );
            }
            inv_freq
                .iter_mut()
                .zip(factors)
                .for_each(|(f, k)| *f /= k as f64);
        }
        let inv_freq: Vec<f32> = inv_freq.into_iter().map(|f| f as f32).collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, d / 2), device)?,
            style: cfg.rope_style,
        })
    }

    /// cos and sin, [rows, head_dim / 2] in `dtype`, for each row's position.
    pub fn angles(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let rows = positions.dim(0)?;
        let angles = positions
            .to_dtype(DType::F32)?
            .reshape((rows, 1))?
            .broadcast_mul(&self.inv_freq)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// Rotates x, [rows, heads, head_dim], each row at its own position; with kandle's CPU
    /// kernel if `own`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, own: bool) -> Result<Tensor> {
        if own {
            return x
                .contiguous()?
                .apply_op3_no_bwd(cos, sin, &Rotate(self.style));
        }
        match self.style {
            RopeStyle::Halves => {
                candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?
                    .squeeze(0)
            }
            // candle's interleaved kernel wants [batch, heads, rows, head_dim].
            RopeStyle::Interleaved => {
                let x = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
                candle_nn::rotary_emb::rope_i(&x, cos, sin)?
                    .squeeze(0)?
                    .transpose(0, 1)?
                    .contiguous()
            }
        }
    }
}

/// Rotation on CPU f32 rows [rows, heads, head_dim]: candle's rope wants the rows transposed
/// behind the heads (Llama GGUF's style), so each call copied q and k twice and handed the
/// rotation to rayon's threads while the barrier pool's spun: 9% of a batched decode step,
/// for a few thousand multiplies. A decode step's rows rotate on the calling thread, a
/// prefill's over the barrier pool (a scalar loop on one thread was 4% of a 296-row prefill).
struct Rotate(RopeStyle);

/// Rotates each head of one row in place, on the CPU's widest loop.
fn rotate_row(avx2: bool, style: RopeStyle, row: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA.
        return unsafe { rotate_row_avx2(style, row, dim, cos, sin) };
    }
    rotate_row_portable(style, row, dim, cos, sin)
}

/// Loops the compiler vectorises: a pair is (i, i + dim / 2) or (2i, 2i + 1).
#[inline(always)]
fn rotate_row_portable(style: RopeStyle, row: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    let turn = |x0: f32, x1: f32, c: f32, s: f32| (x0 * c - x1 * s, x0 * s + x1 * c);
    for head in row.chunks_exact_mut(dim) {
        match style {
            RopeStyle::Halves => {
                let (a, b) = head.split_at_mut(dim / 2);
                for (((a, b), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
                    (*a, *b) = turn(*a, *b, c, s);
                }
            }
            RopeStyle::Interleaved => {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    (pair[0], pair[1]) = turn(pair[0], pair[1], c, s);
                }
            }
        }
    }
}

/// The same loops, compiled for 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rotate_row_avx2(style: RopeStyle, row: &mut [f32], dim: usize, cos: &[f32], sin: &[f32]) {
    rotate_row_portable(style, row, dim, cos, sin)
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
            let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
                return None;
            };
            Some(&v[a..b])
        }
        let (Some(x), Some(cos), Some(sin)) = (
            f32s(x, x_layout),
            f32s(cos, cos_layout),
            f32s(sin, sin_layout),
        ) else {
            candle_core::bail!("rope takes contiguous f32 tensors");
        };
        // The angles are read where they lie; only the rotated copy of x is new.
        let (rows, heads, dim) = x_layout.shape().dims3()?;
        let half = dim / 2;
        if dim % 2 != 0 || cos.len() != rows * half || sin.len() != rows * half {
            candle_core::bail!("rope: angles for {rows} rows of {dim} values expected");
        }
        let (style, avx2) = (self.0, crate::model::decoder::quant::avx2());
        let rotate = |r: usize, out: &mut [f32]| {
            out.copy_from_slice(&x[r * heads * dim..][..heads * dim]);
            let (cos, sin) = (&cos[r * half..][..half], &sin[r * half..][..half]);
            rotate_row(avx2, style, out, dim, cos, sin);
        };
        let out = each_row(rows, heads * dim, rotate);
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the calling thread (5 rows) and over the pool (700 rows), both styles.
    #[test]
    fn the_cpu_kernel_rotates_as_candles_rope_does() {
        let (heads, dim) = (3, 16);
        let few = Tensor::new(&[0u32, 1, 7, 300, 4095], &Device::Cpu).unwrap();
        let many = Tensor::arange(0u32, 700, &Device::Cpu).unwrap();
        assert!(700 * heads * dim >= 1 << 15, "enough for the pool");
        for positions in [few, many] {
            let rows = positions.dim(0).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, heads, dim), &Device::Cpu).unwrap();
            for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
                let mut cfg = DecoderConfig::from_hf(&serde_json::json!({"model_type": "llama",
                    "vocab_size": 8, "hidden_size": heads * dim, "intermediate_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": heads,
                    "max_position_embeddings": 4096}))
                .unwrap();
                cfg.rope_style = style;
                let rope = Rope::new(&cfg, None, &Device::Cpu).unwrap();
                let (cos, sin) = rope.angles(&positions, DType::F32).unwrap();
                let ours = rope.apply(&x, &cos, &sin, true).unwrap();
                let candle = rope.apply(&x, &cos, &sin, false).unwrap();
                let diff = crate::model::max_abs_diff(&ours, &candle);
                assert!(diff < 1e-6, "{rows} rows, {style:?}: {diff}");
                // Position 0 is the identity; others move.
                let first = crate::model::max_abs_diff(&ours.get(0).unwrap(), &x.get(0).unwrap());
                assert!(first < 1e-7, "{first}");
                assert!(crate::model::max_abs_diff(&ours, &x) > 0.1);
            }
        }
    }
}
