//! The VNNI kernels on 512-bit vectors: two groups side by side, the first group's 8 rows in
//! lanes 0..8 and the second's in lanes 8..16, so each instruction does the work of two of
//! the 256-bit kernels'. On this project's 2-core AMD Zen 5 VM (`inprocess kernels`, 3
//! interleaved runs), Q4_1 at 8 rows went from 244-291 to 325-418 GMAC/s, 32 rows 273-307
//! to 405-479, 256 rows 211-236 to 279-342. Each lane's arithmetic is the 256-bit VNNI
//! kernel's, in the same order, so an output has the same bits whichever of the two computes
//! it: a group left without a partner, and a single row, go to the 256-bit kernel, and batch
//! invariance holds.
use super::avx2::{block_rows, each_row, prefetch};
use super::{GROUP, Packing, Q8};
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) fn dots_q4_1<const R: usize>(w: [&[u8]; 2], x: &[&[Q8]; R]) -> [[[f32; GROUP]; 2]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { body::<R>(Packing::Nibbles, w, x) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) fn dots_q8_0<const R: usize>(w: [&[u8]; 2], x: &[&[Q8]; R]) -> [[[f32; GROUP]; 2]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { body::<R>(Packing::Signed, w, x) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) fn dots_q5_1<const R: usize>(w: [&[u8]; 2], x: &[&[Q8]; R]) -> [[[f32; GROUP]; 2]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { body::<R>(Packing::Unsigned, w, x) }
}

/// Safety: the CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; called only from a wrapper
/// enabling them, so the intrinsics inline.
#[inline(always)]
unsafe fn body<const R: usize>(
    packing: Packing,
    w: [&[u8]; 2],
    x: &[&[Q8]; R],
) -> [[[f32; GROUP]; 2]; R] {
    // SAFETY: as this function's.
    let mut acc = unsafe { [_mm512_setzero_ps(); R] };
    let bytes = packing.group_block_bytes();
    assert_eq!(w[0].len(), w[1].len(), "paired groups differ in width");
    let rows = block_rows(w[0], packing, x);
    let values = packing.values_at();
    for b in 0..w[0].len() / bytes {
        // SAFETY: block `b` lies in both groups (their lengths are equal and whole blocks).
        unsafe {
            let p = w.map(|w| w.as_ptr().add(b * bytes));
            for p in p {
                prefetch::<R>(p, bytes);
            }
            let d = halves(p, 0);
            let m = packing.has_min().then(|| halves(p, 16));
            // The weights' 8 vectors of 4 values of every row, as the 256-bit kernels'.
            // Loops, not arrays' `map`: a closure there was compiled out of line, without
            // this function's features.
            let mut q = [_mm512_setzero_si512(); 8];
            if packing == Packing::Nibbles {
                let low = _mm512_set1_epi8(0x0F);
                for c in 0..4 {
                    let raw = both(p, values + 32 * c);
                    q[c] = _mm512_and_si512(raw, low);
                    q[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                }
            } else {
                for (c, q) in q.iter_mut().enumerate() {
                    *q = both(p, values + 32 * c);
                }
            }
            // SAFETY: `block_rows` checked that every row has block `b`.
            each_row!(R, r => acc[r] = row(packing, acc[r], &q, d, m, &*rows[r].add(b)));
        }
    }
    let mut out = [[[0f32; GROUP]; 2]; R];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 16 floats, one after another.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr().cast(), a) };
    }
    out
}

/// The 32 bytes at `at` of both group blocks, the first's in the low half.
///
/// Safety: as [`body`]; each of `p` has 32 bytes at `at`.
#[inline(always)]
unsafe fn both(p: [*const u8; 2], at: usize) -> __m512i {
    unsafe {
        let low = _mm256_loadu_si256(p[0].add(at).cast());
        let high = _mm256_loadu_si256(p[1].add(at).cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
    }
}

/// The 8 f16 at `at` of both group blocks (their rows' scales or minimums), as f32.
///
/// Safety: as [`body`]; each of `p` has 16 bytes at `at`.
#[inline(always)]
unsafe fn halves(p: [*const u8; 2], at: usize) -> __m512 {
    unsafe {
        let low = _mm_loadu_si128(p[0].add(at).cast());
        let high = _mm_loadu_si128(p[1].add(at).cast());
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(low),
            high,
        ))
    }
}

/// One row's block added to its 16 sums, as `avx2::q4_1_row` and `avx2::bytes_row` do for 8.
///
/// Safety: as [`body`].
#[inline(always)]
unsafe fn row(
    packing: Packing,
    acc: __m512,
    q: &[__m512i; 8],
    d: __m512,
    m: Option<__m512>,
    y: &Q8,
) -> __m512 {
    unsafe {
        let mut sums = [_mm512_setzero_si512(); 2];
        for (c, q) in q.iter().enumerate() {
            let y4 = _mm512_set1_epi32(y.qs.as_ptr().add(4 * c).cast::<i32>().read_unaligned());
            sums[c % 2] = _mm512_dpbusd_epi32(sums[c % 2], *q, y4);
        }
        let mut sum = _mm512_add_epi32(sums[0], sums[1]);
        if packing == Packing::Signed {
            sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * y.sum));
        }
        let sum = _mm512_cvtepi32_ps(sum);
        let acc = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(y.d)), acc);
        match m {
            Some(m) => _mm512_fmadd_ps(m, _mm512_set1_ps(y.s), acc),
            None => acc,
        }
    }
}
