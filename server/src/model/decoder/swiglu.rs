//! The MLP's activation, silu(gate) * up, from the gate and up projections' stacked output
//! [rows, 2 * width]. On CPU f32 it is one pass with kandle's exp (over the barrier pool for
//! a prefill's rows): candle's `silu` and multiply ran on the engine thread, a libm call per
//! value, and took 9% of that thread in a batched decode profile while the pool's other
//! threads waited. Other devices and dtypes use candle's operations.
#![allow(unsafe_code)]
use crate::model::dense::map_rows;
use crate::model::disjoint::each_row;
use crate::model::exp::exp;
use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor};

/// silu(gate) * up for `gate_up` = [rows, 2 * width], gate first; kandle's kernel if `own`.
pub fn swiglu(gate_up: &Tensor, own: bool) -> Result<Tensor> {
    if own {
        return gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu);
    }
    let width = gate_up.dim(D::Minus1)? / 2;
    candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, width)?)?
        * gate_up.narrow(D::Minus1, width, width)?
}

#[inline(always)]
fn silu_times(gate: f32, up: f32) -> f32 {
    gate / (1.0 + exp(-gate)) * up
}

/// One row: `out[j] = silu(gate[j]) * up[j]`, on the CPU's widest loop.
fn row(avx2: bool, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA.
        return unsafe { row_avx2(gate, up, out) };
    }
    row_portable(gate, up, out)
}

/// A loop the compiler vectorises.
#[inline(always)]
fn row_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_times(g, u);
    }
}

/// The same loop, compiled for 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    row_portable(gate, up, out)
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = layout.dims().last().copied().unwrap_or(0);
        if cols % 2 != 0 {
            candle_core::bail!("swiglu takes an even number of columns, not {cols}");
        }
        let width = cols / 2;
        map_rows(self.name(), storage, layout, cols, width, |x, m| {
            let avx2 = crate::model::decoder::quant::avx2();
            each_row(m, width, |r, out| {
                let (gate, up) = x[r * cols..(r + 1) * cols].split_at(width);
                row(avx2, gate, up, out)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_silu_times_up() {
        let x = Tensor::randn(0f32, 4.0, (9, 2 * 37), &Device::Cpu).unwrap();
        let ours = swiglu(&x, true).unwrap();
        let candle = swiglu(&x, false).unwrap();
        assert_eq!(ours.dims(), &[9, 37]);
        let diff = crate::model::max_abs_diff(&ours, &candle);
        assert!(diff < 1e-5, "{diff}");
    }

    /// A row's values do not depend on the rows beside it or on which loop ran, on the
    /// calling thread (5 rows) or over the pool (40).
    #[test]
    fn each_value_is_the_scalar_function() {
        for rows in [5, 40] {
            let x = Tensor::randn(0f32, 30.0, (rows, 2 * 1000), &Device::Cpu).unwrap();
            let ours = swiglu(&x, true).unwrap().to_vec2::<f32>().unwrap();
            let x = x.to_vec2::<f32>().unwrap();
            for (x, ours) in x.iter().zip(&ours) {
                let (gate, up) = x.split_at(1000);
                for ((&g, &u), &o) in gate.iter().zip(up).zip(ours) {
                    assert_eq!(o.to_bits(), silu_times(g, u).to_bits(), "silu({g}) * {u}");
                }
            }
        }
    }

    #[test]
    fn an_odd_width_is_refused() {
        let x = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&x, true).is_err());
    }
}
