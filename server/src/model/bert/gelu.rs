//! The exact (erf) GELU on CPU f32 without a libm call per element: candle computes it with
//! scalar `erff`, which took half of MiniLM's single-threaded time between matrix products.
//! erf is the rational approximation Eigen and XLA use (within 5e-7 of erf in f32 arithmetic),
//! written branch-free so the compiler vectorises the loop over a slice, with AVX2 where the
//! CPU has it (the same operations in the same order: the same results). Other devices and
//! dtypes use candle's.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// On CPU f32 tensors.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluErf)
}

/// erf(x) to within 5e-7: odd polynomial over even polynomial in x², clamped to [-4, 4],
/// beyond which erf is ±1 in f32.
fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0, |acc, &c| acc * x2 + c);
    let q = BETA.iter().fold(0.0, |acc, &c| acc * x2 + c);
    x * p / q
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The exact GELU of every value of `xs`, in place.
pub(super) fn gelu_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::model::decoder::quant::avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        #[allow(unsafe_code)]
        return unsafe { gelu_avx2(xs) };
    }
    xs.iter_mut().for_each(|x| *x = gelu(*x));
}

/// The same loop, compiled for 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn gelu_avx2(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = gelu(*x));
}

/// The tanh approximation (`gelu_new`), as candle's `gelu` computes it, in place.
pub(super) fn gelu_tanh_in_place(xs: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for x in xs {
        *x = 0.5 * *x * (1.0 + (SQRT_2_OVER_PI * *x * (1.0 + 0.044_715 * *x * *x)).tanh());
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu-erf takes contiguous f32");
        };
        let mut out = data[start..end].to_vec();
        gelu_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn erf_is_within_5e_7_everywhere() {
        let mut worst = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 / 10_000.0;
            let exact = candle_core::cpu::erf::erf_f64(x.into());
            worst = worst.max((f64::from(erf(x)) - exact).abs());
        }
        assert!(worst < 5e-7, "max error {worst}");
        assert!((erf(f32::INFINITY) - 1.0).abs() < 5e-7);
        assert!((erf(f32::NEG_INFINITY) + 1.0).abs() < 5e-7);
    }

    /// Whichever loop runs, each value is what the scalar function gives, bit for bit.
    #[test]
    fn the_slice_loop_is_the_scalar_function() {
        let xs: Vec<f32> = (-9_000..9_000).map(|i| i as f32 / 997.0).collect();
        let mut ys = xs.clone();
        gelu_in_place(&mut ys);
        for (x, y) in xs.into_iter().zip(ys) {
            assert_eq!(y.to_bits(), gelu(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn the_op_matches_candles_gelu_erf() {
        let x = Tensor::randn(0f32, 3.0, (7, 129), &Device::Cpu).unwrap();
        let ours = gelu_erf(&x.t().unwrap()).unwrap();
        let candle = x.t().unwrap().gelu_erf().unwrap();
        let diff = crate::model::max_abs_diff(&ours, &candle);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn the_tanh_approximation_matches_candles() {
        let x = Tensor::randn(0f32, 3.0, 1000, &Device::Cpu).unwrap();
        let mut ours: Vec<f32> = x.to_vec1::<f32>().unwrap();
        gelu_tanh_in_place(&mut ours);
        let candle = x.gelu().unwrap();
        let ours = Tensor::new(ours, &Device::Cpu).unwrap();
        let diff = crate::model::max_abs_diff(&ours, &candle);
        assert!(diff < 1e-5, "{diff}");
    }
}
