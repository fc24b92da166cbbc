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
use crate::model::exp::exp;

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

/// How keys and values are stored: f32, or f16 (half the bytes to read for each cached
/// token, which is what a batched decode step's attention waits on).
pub trait Stored: Copy + Sync {
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl Stored for f32 {
    const F16: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Stored for half::f16 {
    const F16: bool = true;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// Everything one step's attention reads: queries [rows, heads, dim] with rows `q_stride`
/// apart, and key and value pools [slots, kv_heads, dim] with slots `kv_stride` apart.
pub struct Inputs<'a, T: Stored = f32> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub k_pool: &'a [T],
    pub v_pool: &'a [T],
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
/// A work item is one row: each cached key (every KV head's, side by side in a slot) is
/// loaded once for all its query heads; values are summed head by head.
pub fn attend<T: Stored>(x: &Inputs<'_, T>) -> Vec<f32> {
    attend_on(x, super::decoder::quant::avx2())
}

/// `attend` on the AVX2 loop (`avx2`: the CPU has AVX2, FMA and F16C) or the portable one.
fn attend_on<T: Stored>(x: &Inputs<'_, T>, avx2: bool) -> Vec<f32> {
    let Heads { heads, dim, .. } = x.heads;
    let rows: usize = x.spans.iter().map(|s| s.q_len).sum();
    let span_of: Vec<usize> = (0..x.spans.len())
        .flat_map(|i| std::iter::repeat_n(i, x.spans[i].q_len))
        .collect();
    let mut out = vec![0f32; rows * heads * dim];
    let dst = DisjointOut::new(&mut out);
    candle_core::utils::barrier_pool().execute_chunked(rows, |items| {
        let mut scores = Vec::new();
        let mut acc = vec![0f32; heads * dim];
        for row in items {
            if avx2 {
                // SAFETY: the CPU has AVX2, FMA and F16C (the caller's `avx2`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    one_avx2(x, &span_of, row, &mut scores, &mut acc)
                };
            } else {
                one::<T, false>(x, &span_of, row, &mut scores, &mut acc);
            }
            // SAFETY: the item for `row` alone writes that row.
            unsafe { dst.write(row * heads * dim, &acc) };
        }
    });
    out
}

/// The same code, compiled for AVX2, FMA and F16C (f16 caches): the loops below vectorise
/// 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn one_avx2<T: Stored>(
    x: &Inputs<'_, T>,
    span_of: &[usize],
    row: usize,
    scores: &mut Vec<f32>,
    acc: &mut [f32],
) {
    one::<T, true>(x, span_of, row, scores, acc)
}

/// Attention for query `row`, all heads, into `acc` ([heads, dim]); `AVX2` only where the
/// CPU has AVX2 and FMA.
#[inline(always)]
fn one<T: Stored, const AVX2: bool>(
    x: &Inputs<'_, T>,
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
    // Ask for the pool's lines a little ahead of the loop: keys `AHEAD` slots before they
    // are read, values as their keys are (the weighted sum reads them after the softmax).
    // Read unasked, the lines came one miss at a time; asked all at the row's start, the
    // requests queued behind each other and the row waited on the last of them.
    const AHEAD: usize = 16;
    let ask = |from: usize, to: usize| {
        let keys = &slots[(from + AHEAD).min(n)..(to + AHEAD).min(n)];
        prefetch_slots(x.k_pool, x.kv_stride, width, keys);
        prefetch_slots(x.v_pool, x.kv_stride, width, &slots[from..to]);
    };
    prefetch_slots(x.k_pool, x.kv_stride, width, &slots[..AHEAD.min(n)]);
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && dim.is_multiple_of(8) {
        // Eight keys at a time, each head's eight dot products summed across lanes together;
        // a last group of fewer repeats its last key (a scalar loop over the few left took
        // a quarter of the kernel's time at 70 cached tokens).
        while j < n {
            let valid = (n - j).min(8);
            ask(j, j + valid);
            let keys: [&[T]; 8] = std::array::from_fn(|i| key(j + i.min(valid - 1)));
            for h in 0..heads {
                let at = h / group * dim;
                // SAFETY: the CPU has AVX2 and FMA (AVX2 is set only then); dim is a
                // multiple of 8 and each key holds `at + dim` values.
                let dots = unsafe { avx2::dots8(&q[h * dim..][..dim], &keys, at) };
                for (i, d) in dots.into_iter().take(valid).enumerate() {
                    scores[h * n + j + i] = d * x.scale;
                }
            }
            j += valid;
        }
    }
    for j in j..n {
        ask(j, j + 1);
        let k = key(j);
        for h in 0..heads {
            let k = &k[h / group * dim..][..dim];
            scores[h * n + j] = dot(&q[h * dim..][..dim], k) * x.scale;
        }
    }
    for h in 0..heads {
        let row = &mut scores[h * n..][..n];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Separate loops, so each vectorises: kandle's exp has no libm call.
        for s in row.iter_mut() {
            *s = exp(*s - max);
        }
        let sum = sum(row);
        for s in row.iter_mut() {
            *s /= sum;
        }
    }
    // Head by head, so one head's values (a few KB) stay in L1 for the heads of its group.
    for h in 0..heads {
        let at = h / group * dim;
        let value = |j: usize| &x.v_pool[slots[j] as usize * x.kv_stride + at..][..dim];
        let (acc, weights) = (&mut acc[h * dim..][..dim], &scores[h * n..][..n]);
        #[cfg(target_arch = "x86_64")]
        if AVX2 && dim.is_multiple_of(8) {
            // SAFETY: the CPU has AVX2 and FMA (AVX2 is set only then); dim is a multiple
            // of 8 and each value row holds `dim` values.
            unsafe { avx2::weighted_sum(acc, weights, value) };
            continue;
        }
        acc.fill(0.0);
        for (j, &w) in weights.iter().enumerate() {
            for (a, v) in acc.iter_mut().zip(value(j)) {
                *a += w * v.to_f32();
            }
        }
    }
}

/// Asks for the first `width` values of each of `slots` (`stride` values apart in `pool`)
/// into L2, where the CPU allows.
pub fn prefetch_slots<T>(pool: &[T], stride: usize, width: usize, slots: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    for &slot in slots {
        if let Some(values) = pool
            .get(slot as usize * stride..)
            .and_then(|p| p.get(..width))
        {
            avx2::prefetch(values);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (pool, stride, width, slots);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Stored;
    use std::arch::x86_64::*;

    /// 8 stored values from `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` points at 8 values.
    #[inline(always)]
    unsafe fn load8<T: Stored>(p: *const T) -> __m256 {
        unsafe {
            if T::F16 {
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    }

    /// Asks for `values`' cache lines into L2 (a row's whole sequence is more than L1 holds).
    pub fn prefetch<T>(values: &[T]) {
        let p = values.as_ptr().cast::<u8>();
        for line in (0..std::mem::size_of_val(values)).step_by(64) {
            // SAFETY: SSE is part of x86-64; a prefetch never faults, and the address lies
            // inside `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(line).cast()) };
        }
    }

    /// `acc = Σ_j weights[j] * rows(j)`, 64 values at a time held in registers across every
    /// j (a loop over j inside one over the values would load and store them for each j).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `acc.len()` is a multiple of 8 and every row holds
    /// `acc.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum<'a, T: Stored + 'a>(
        acc: &mut [f32],
        weights: &[f32],
        rows: impl Fn(usize) -> &'a [T],
    ) {
        let dim = acc.len();
        debug_assert!(dim.is_multiple_of(8));
        let mut start = 0;
        while start < dim {
            // SAFETY: as this function's; each part lies inside `acc` and the rows.
            start += unsafe {
                if dim - start >= 64 {
                    part::<T, 8>(acc, weights, &rows, start)
                } else {
                    part::<T, 1>(acc, weights, &rows, start)
                }
            };
        }
    }

    /// `weighted_sum` for the `8 * R` values from `start`; returns how many.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn part<'a, T: Stored + 'a, const R: usize>(
        acc: &mut [f32],
        weights: &[f32],
        rows: &impl Fn(usize) -> &'a [T],
        start: usize,
    ) -> usize {
        let mut sums = [_mm256_setzero_ps(); R];
        for (j, &w) in weights.iter().enumerate() {
            let (w, row) = (_mm256_set1_ps(w), &rows(j)[start..start + 8 * R]);
            for (r, s) in sums.iter_mut().enumerate() {
                // SAFETY: `row` holds `8 * R` values.
                let v = unsafe { load8(row.as_ptr().add(8 * r)) };
                *s = _mm256_fmadd_ps(w, v, *s);
            }
        }
        let out = &mut acc[start..start + 8 * R];
        for (r, s) in sums.iter().enumerate() {
            // SAFETY: `out` holds `8 * R` values.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *s) };
        }
        8 * R
    }

    /// `q` against `dim` values of each key from `at`: eight dot products, each summed in
    /// 8 lanes, then the lanes of all eight added pairwise together (six horizontal adds
    /// for eight sums, where one sum alone takes three shuffles and adds).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q.len()` is a multiple of 8 and every key holds
    /// `at + q.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots8<T: Stored>(q: &[f32], keys: &[&[T]; 8], at: usize) -> [f32; 8] {
        let dim = q.len();
        debug_assert!(dim.is_multiple_of(8) && keys.iter().all(|k| k.len() >= at + dim));
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for d in (0..dim).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(d));
                for (a, k) in acc.iter_mut().zip(keys) {
                    *a = _mm256_fmadd_ps(qv, load8(k.as_ptr().add(at + d)), *a);
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

/// The sum in 8 independent lanes, as `dot` sums.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for l in 0..8 {
            lanes[l] += x[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Dot product in 8 independent lanes, so the compiler vectorises it; the lanes are summed in
/// a fixed order, so the result does not depend on anything but the two vectors.
#[inline(always)]
fn dot<T: Stored>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l].to_f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: Heads = Heads {
        heads: 6,
        kv_heads: 2,
        dim: 72,
    };

    /// The largest difference between the portable loop's output and the AVX2 one's.
    fn loops_differ_by<T: Stored>(q: &[f32], k: &[T], v: &[T], window: Option<usize>) -> f32 {
        let slots: Vec<u32> = (0..40).rev().collect();
        let spans = [
            Span {
                q_start: 0,
                q_len: 4,
                k_start: 0,
                k_len: 20,
            },
            Span {
                q_start: 4,
                q_len: 3,
                k_start: 20,
                k_len: 20,
            },
        ];
        let x = Inputs {
            q,
            q_stride: HEADS.heads * HEADS.dim,
            k_pool: k,
            v_pool: v,
            kv_stride: HEADS.kv_heads * HEADS.dim,
            slots: &slots,
            spans: &spans,
            heads: HEADS,
            causal: true,
            window,
            scale: 0.2,
        };
        let (portable, avx2) = (attend_on(&x, false), attend_on(&x, true));
        portable
            .iter()
            .zip(&avx2)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// The portable loop and the AVX2 one agree on f32 and f16 pools, with grouped heads,
    /// prefill and decode rows, slots out of order, a window, and a head width past 64 (the
    /// value sum's narrow tail).
    #[test]
    fn the_portable_loop_and_the_avx2_one_agree() {
        if !crate::model::decoder::quant::avx2() {
            return;
        }
        let mut seed = 7u32;
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
                })
                .collect()
        };
        let pool = 40 * HEADS.kv_heads * HEADS.dim;
        let (q, k, v) = (
            values(7 * HEADS.heads * HEADS.dim),
            values(pool),
            values(pool),
        );
        let f16s =
            |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&v| half::f16::from_f32(v)).collect() };
        let (k16, v16) = (f16s(&k), f16s(&v));
        for window in [None, Some(5)] {
            let diff = loops_differ_by(&q, &k, &v, window);
            assert!(diff < 1e-5, "f32 {window:?}: {diff}");
            let diff = loops_differ_by(&q, &k16, &v16, window);
            assert!(diff < 1e-5, "f16 {window:?}: {diff}");
        }
    }
}
