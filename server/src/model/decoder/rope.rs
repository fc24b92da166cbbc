//! Rotary position embeddings, computed for each step's positions rather than tabled for the
//! whole context: a 128k-token table would cost more memory than a small model's weights.
use super::config::{DecoderConfig, RopeScaling, RopeStyle};
use candle_core::{DType, Device, Result, Tensor};

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

    /// Rotates x, [rows, heads, head_dim], each row at its own position.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
