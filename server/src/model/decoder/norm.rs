//! RMS norm, `x / sqrt(mean(x²) + eps) * weight` per row. On CPU f32 a kernel of kandle's own:
//! candle's sums each row's squares one value after another (a chain of 576 dependent adds
//! for SmolLM2) and hands batches of over 32 rows to rayon's threads while the barrier pool's
//! spin, which made the norms 8% of a 296-row prefill. Here the squares are summed in 8
//! lanes, a decode step's few rows run on the calling thread, and a prefill's share the
//! barrier pool. Other devices and dtypes use candle's.
#![allow(unsafe_code)]
use crate::model::dense::map_rows;
use crate::model::disjoint::each_row;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// RMS norm of `x` ([.., width]) with `weight` ([width]); kandle's kernel if `own`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32, own: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    if own {
        return x.apply_op2_no_bwd(weight, &RmsNorm { eps });
    }
    candle_nn::ops::rms_norm(&x, weight, eps)
}

/// One row, as transformers' `LlamaRMSNorm`: x times the reciprocal root, then the weight.
#[inline(always)]
fn row_portable(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Eight independent lanes, so the sum vectorises; summed in a fixed order.
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l] * c[l];
        }
    }
    let sum2 = lanes.iter().sum::<f32>() + tail;
    let inv = 1.0 / (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// The same loop, compiled for 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    row_portable(x, weight, eps, out)
}

fn row(avx2: bool, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA.
        return unsafe { row_avx2(x, weight, eps, out) };
    }
    row_portable(x, weight, eps, out)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(w), Some((a, b))) = (weight, weight_layout.contiguous_offsets())
        else {
            candle_core::bail!("rms-norm takes a contiguous f32 weight");
        };
        let weight = &w[a..b];
        let width = weight.len();
        map_rows(self.name(), x, x_layout, width, width, |x, m| {
            let avx2 = crate::model::decoder::quant::avx2();
            each_row(m, width, |r, out| {
                row(avx2, &x[r * width..][..width], weight, self.eps, out)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// kandle's kernel agrees with candle's, on the calling thread and over the pool, and a
    /// row's values do not depend on how many rows are beside it.
    #[test]
    fn matches_candles_rms_norm_whatever_the_batch() {
        let width = 77;
        let weight = Tensor::randn(0f32, 1.0, width, &Device::Cpu).unwrap();
        // 3 rows on the calling thread, 500 over the pool.
        for rows in [3, 500] {
            let x = Tensor::randn(0f32, 3.0, (rows, width), &Device::Cpu).unwrap();
            let ours = rms_norm(&x, &weight, 1e-5, true).unwrap();
            let candle = rms_norm(&x, &weight, 1e-5, false).unwrap();
            assert_eq!(ours.dims(), &[rows, width]);
            let diff = crate::model::max_abs_diff(&ours, &candle);
            assert!(diff < 1e-5, "{rows} rows: {diff}");
            let alone = rms_norm(&x.get(rows - 1).unwrap(), &weight, 1e-5, true).unwrap();
            assert_eq!(
                alone.to_vec1::<f32>().unwrap(),
                ours.get(rows - 1).unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn a_weight_of_another_width_is_refused() {
        let x = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(7, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &w, 1e-5, true).is_err());
    }
}
