//! exp on CPU f32 without a libm call per element: glibc's `expf` is a call the compiler cannot
//! vectorise, and the decoder's softmax and SwiGLU made 2.5% of a batched decode profile of
//! those calls alone. This one is branch-free (Cephes' range reduction and polynomial, within
//! 2 ulp of exp), so a loop over a slice vectorises, 8 lanes wide in a function compiled for
//! AVX2; plain multiplies and adds (never fused), so that loop and the scalar code give the
//! same bits.

/// e^x, within 2 ulp for x in [-87, 88]; 0 below, a huge finite value above, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so `n * LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5e-1,
    ];
    let x = x.clamp(-87.0, 88.0);
    // The nearest integer to x / ln 2: floor(v + 0.5), which vectorises (`round` does not).
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = P.iter().fold(0.0, |acc, &c| acc * r + c);
    let y = p * r * r + r + 1.0;
    // 2^n from its exponent bits: n is in [-126, 127] after the clamp. n's integer is read
    // from the low bits of n + 1.5 * 2^23 (exact for |n| < 2^22), not with `as i32`, whose
    // saturating conversion the compiler does lane by lane.
    const MAGIC: f32 = 12_582_912.0;
    let n = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(n.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        let mut worst = 0u32;
        for i in -870_000..=880_000 {
            let x = i as f32 / 10_000.0;
            let (ours, exact) = (exp(x), f64::from(x).exp() as f32);
            worst = worst.max(ours.to_bits().abs_diff(exact.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulp");
    }

    #[test]
    fn exp_saturates_and_passes_nan() {
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
