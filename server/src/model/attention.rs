//! Attention on the CPU, for the decoder (causal, reading the paged cache in place) and the
//! encoders (each token sees its whole sequence, reading q, k and v where the fused
//! projection left them): each query row walks its sequence's key slots where they lie,
//! with no gathered or transposed copy of every sequence's keys and values per layer. Work
//! is shared over candle's barrier pool, the threads that run the matmuls, so no second pool
//! competes with them for the cores (with rayon, one core spun idle in the barrier pool while
//! attention ran). AVX2 is chosen at run time as for the
//! quantized kernels; each output is computed the same way whatever the batch.
#![allow(unsafe_code)]
use crate::model::disjoint::DisjointOut;

/// The heads and their width.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// One sequence's part of a step: query rows `q_start..q_start + q_len`, the last of its
/// `k_len` key positions (for causal attention), whose slots are
/// `slots[k_start..k_start + k_len]`.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

/// Everything one step's attention reads: queries [rows, heads, dim] with rows `q_stride`
/// apart, and key and value pools [slots, kv_heads, dim] with slots `kv_stride` apart.
pub struct Inputs<'a> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub k_pool: &'a [f32],
    pub v_pool: &'a [f32],
    pub kv_stride: usize,
    pub slots: &'a [u32],
    pub spans: &'a [Span],
    pub heads: Heads,
    /// Whether a query sees only the keys up to its own position (a decoder) or its whole
    /// sequence (an encoder).
    pub causal: bool,
    /// Keys visible to a causal query: itself and the `window - 1` before it.
    pub window: Option<usize>,
    pub scale: f32,
}

/// Attention of every query row against its own sequence's keys: [rows, heads, dim].
/// A work item is one row: each cached key and value (every KV head's, side by side in a
/// slot) is loaded once for all its query heads.
pub fn attend(x: &Inputs<'_>) -> Vec<f32> {
    let Heads { heads, dim, .. } = x.heads;
    let rows: usize = x.spans.iter().map(|s| s.q_len).sum();
    let span_of: Vec<usize> = (0..x.spans.len())
        .flat_map(|i| std::iter::repeat_n(i, x.spans[i].q_len))
        .collect();
    let mut out = vec![0f32; rows * heads * dim];
    let dst = DisjointOut::new(&mut out);
    let avx2 = super::decoder::quant::avx2();
    candle_core::utils::barrier_pool().execute_chunked(rows, |items| {
        let mut scores = Vec::new();
        let mut acc = vec![0f32; heads * dim];
        for row in items {
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    one_avx2(x, &span_of, row, &mut scores, &mut acc)
                };
            } else {
                one::<false>(x, &span_of, row, &mut scores, &mut acc);
            }
            // SAFETY: the item for `row` alone writes that row.
            unsafe { dst.write(row * heads * dim, &acc) };
        }
    });
    out
}

/// The same code, compiled for AVX2 and FMA: the loops below vectorise 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn one_avx2(x: &Inputs<'_>, span_of: &[usize], row: usize, scores: &mut Vec<f32>, acc: &mut [f32]) {
    one::<true>(x, span_of, row, scores, acc)
}

/// Attention for query `row`, all heads, into `acc` ([heads, dim]); `AVX2` only where the
/// CPU has AVX2 and FMA.
#[inline(always)]
fn one<const AVX2: bool>(
    x: &Inputs<'_>,
    span_of: &[usize],
    row: usize,
    scores: &mut Vec<f32>,
    acc: &mut [f32],
) {
    let Heads {
        heads,
        kv_heads,
        dim,
    } = x.heads;
    let group = heads / kv_heads;
    let span = x.spans[span_of[row]];
    let (first, last) = if x.causal {
        // The query's own position among its sequence's keys.
        let pos = span.k_len - span.q_len + (row - span.q_start);
        (x.window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos)
    } else {
        (0, span.k_len - 1)
    };
    let q = &x.q[row * x.q_stride..][..heads * dim];
    let slots = &x.slots[span.k_start + first..span.k_start + last + 1];
    let n = slots.len();
    let width = kv_heads * dim;
    // scores[h * n + j]: query head h against key j. Plain loops: an iterator adapter's body
    // may not inline into the AVX2 copy.
    scores.clear();
    scores.resize(heads * n, 0.0);
    let key = |j: usize| &x.k_pool[slots[j] as usize * x.kv_stride..][..width];
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && dim.is_multiple_of(8) {
        // Eight keys at a time, each head's eight dot products summed across lanes together.
        while j + 8 <= n {
            let keys: [&[f32]; 8] = std::array::from_fn(|i| key(j + i));
            for h in 0..heads {
                let at = h / group * dim;
                // SAFETY: the CPU has AVX2 and FMA (AVX2 is set only then); dim is a
                // multiple of 8 and each key holds `at + dim` values.
                let dots = unsafe { avx2::dots8(&q[h * dim..][..dim], &keys, at) };
                for (i, d) in dots.into_iter().enumerate() {
                    scores[h * n + j + i] = d * x.scale;
                }
            }
            j += 8;
        }
    }
    for j in j..n {
        let k = key(j);
        for h in 0..heads {
            let k = &k[h / group * dim..][..dim];
            scores[h * n + j] = dot(&q[h * dim..][..dim], k) * x.scale;
        }
    }
    for h in 0..heads {
        let row = &mut scores[h * n..][..n];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for s in row.iter_mut() {
            *s /= sum;
        }
    }
    acc.fill(0.0);
    for (j, &s) in slots.iter().enumerate() {
        let v = &x.v_pool[s as usize * x.kv_stride..][..width];
        for h in 0..heads {
            let w = scores[h * n + j];
            let v = &v[h / group * dim..][..dim];
            for (a, v) in acc[h * dim..][..dim].iter_mut().zip(v) {
                *a += w * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `q` against `dim` values of each key from `at`: eight dot products, each summed in
    /// 8 lanes, then the lanes of all eight added pairwise together (six horizontal adds
    /// for eight sums, where one sum alone takes three shuffles and adds).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q.len()` is a multiple of 8 and every key holds
    /// `at + q.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots8(q: &[f32], keys: &[&[f32]; 8], at: usize) -> [f32; 8] {
        let dim = q.len();
        debug_assert!(dim.is_multiple_of(8) && keys.iter().all(|k| k.len() >= at + dim));
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for d in (0..dim).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(d));
                for (a, k) in acc.iter_mut().zip(keys) {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.as_ptr().add(at + d)), *a);
                }
            }
            let pairs = [
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
                _mm256_hadd_ps(acc[4], acc[5]),
                _mm256_hadd_ps(acc[6], acc[7]),
            ];
            // Per 128-bit half: keys 0-3 in the first, keys 4-7 in the second.
            let low = _mm256_hadd_ps(pairs[0], pairs[1]);
            let high = _mm256_hadd_ps(pairs[2], pairs[3]);
            let sums = _mm256_add_ps(
                _mm256_permute2f128_ps(low, high, 0x20),
                _mm256_permute2f128_ps(low, high, 0x31),
            );
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), sums);
            out
        }
    }
}

/// Dot product in 8 independent lanes, so the compiler vectorises it; the lanes are summed in
/// a fixed order, so the result does not depend on anything but the two vectors.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
