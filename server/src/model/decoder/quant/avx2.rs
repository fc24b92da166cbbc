//! The AVX2 kernels (with FMA and F16C), chosen at run time, and their AVX-512 VNNI variants:
//! the same loops on 256-bit vectors, where one `vpdpbusd` multiplies 4 unsigned bytes by 4
//! signed ones and adds them to an i32 lane, the work of AVX2's `maddubs`, `madd` and `add`.
//! Each variant is a thin `target_feature` wrapper around one inlined body, so both
//! instruction sets share its code and the body's intrinsics compile inside the wrapper.
use super::{BLOCK, GROUP, Packing, Q8, SIGN};
use std::arch::x86_64::*;

/// As `super::quantize` (`cvtps` rounds half to even, like `round_ties_even`). Each block is
/// written where it ends up: built on the stack and returned by value (an iterator's `map` and
/// `collect`), it was read back by the copy into the vector before its stores had landed,
/// 3.3% of the engine thread in a batched decode profile.
#[target_feature(enable = "avx2,fma")]
pub(super) fn quantize(x: &[f32]) -> Vec<Q8> {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let blocks = x.len() / BLOCK;
    let mut out: Vec<Q8> = Vec::with_capacity(blocks);
    for (b, o) in x.chunks_exact(BLOCK).zip(out.spare_capacity_mut()) {
        // SAFETY: a block is 32 floats.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * i)) });
        let m = v.iter().fold(_mm256_setzero_ps(), |m, v| {
            _mm256_max_ps(m, _mm256_and_ps(*v, abs))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
        // Packing works within 128-bit lanes; the permute puts the 8 quads in order.
        let q16 = [
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        ];
        let q8 = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(q16[0], q16[1]),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        // The sum of the packed bytes, as the portable code sums them (bounded even where
        // a non-finite activation saturated), in SIMD: a scalar loop over the 32 bytes was
        // half of this function's time.
        let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q8);
        let s = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
        let o = o.as_mut_ptr();
        // SAFETY: `o` is room for one Q8, each of whose fields is written once here (`qs`
        // is 32 bytes).
        unsafe {
            _mm256_storeu_si256((&raw mut (*o).qs).cast(), q8);
            (&raw mut (*o).d).write(d);
            (&raw mut (*o).s).write(d * sum as f32);
            (&raw mut (*o).sum).write(sum);
        }
    }
    // SAFETY: the loop wrote every one of the `blocks` blocks.
    unsafe { out.set_len(blocks) };
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots_q4_1<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { q4_1::<R, false>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) fn dots_q4_1_vnni<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { q4_1::<R, true>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots_q8_0<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { bytes::<R, false, true>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) fn dots_q8_0_vnni<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { bytes::<R, true, true>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots_q5_1<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { bytes::<R, false, false>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) fn dots_q5_1_vnni<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    // SAFETY: this function's features are the body's.
    unsafe { bytes::<R, true, false>(w, x) }
}

/// `$body` for `$r` from 0 to `$rows - 1` (at most 8), written out rather than looped: as a
/// loop, which the compiler kept for 8 rows, the accumulators lived on the stack, loaded and
/// stored for every block and row beside a bounds check and a load of the row's address.
macro_rules! each_row {
    ($rows:ident, $r:ident => $body:expr) => {
        each_row!(@ $rows, $r, $body, 0 1 2 3 4 5 6 7)
    };
    (@ $rows:ident, $r:ident, $body:expr, $($i:literal)*) => {{
        const { assert!($rows <= 8, "tiles are at most 8 rows") };
        $(if $i < $rows {
            let $r = $i;
            $body;
        })*
    }};
}
pub(super) use each_row;

/// Each row's first block, once every row is checked to hold a block for each of `w`'s group
/// blocks, so the loops read them unchecked.
#[inline(always)]
pub(super) fn block_rows<const R: usize>(
    w: &[u8],
    packing: Packing,
    x: &[&[Q8]; R],
) -> [*const Q8; R] {
    let blocks = w.len() / packing.group_block_bytes();
    assert!(
        x.iter().all(|row| row.len() >= blocks),
        "a row is short of blocks"
    );
    x.map(|row| row.as_ptr())
}

/// Activations `y`'s 4 bytes from number `4c`, in every 32-bit lane.
///
/// Safety: the CPU has AVX2; `c < 8`.
#[inline(always)]
unsafe fn y4(y: &Q8, c: usize) -> __m256i {
    // SAFETY: `qs` is 32 bytes.
    unsafe { _mm256_set1_epi32(y.qs.as_ptr().add(4 * c).cast::<i32>().read_unaligned()) }
}

/// Safety: the CPU has AVX2, FMA and F16C, and AVX-512 VNNI and VL when `VNNI`; called only
/// from a wrapper enabling them, so the intrinsics inline.
#[inline(always)]
unsafe fn q4_1<const R: usize, const VNNI: bool>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    unsafe {
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let rows = block_rows(w, Packing::Nibbles, x);
        for (b, block) in w
            .chunks_exact(Packing::Nibbles.group_block_bytes())
            .enumerate()
        {
            let p = block.as_ptr();
            prefetch::<R>(p, Packing::Nibbles.group_block_bytes());
            // A group block is 160 bytes: 16 of scales, 16 of minimums, 128 of nibbles.
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
            let raw = [0, 1, 2, 3].map(|i| _mm256_loadu_si256(p.add(32 + 32 * i).cast()));
            // q[c]: values 4c..4c + 4 of all 8 rows.
            let q: [__m256i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm256_and_si256(raw[c], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw[c - 4]), low)
                }
            });
            // SAFETY: `block_rows` checked that every row has block `b`.
            each_row!(R, r => acc[r] = q4_1_row::<VNNI>(acc[r], &q, d, m, &*rows[r].add(b)));
        }
        store(acc)
    }
}

/// One row's block added to its 8 sums.
///
/// Safety: as [`q4_1`].
#[inline(always)]
unsafe fn q4_1_row<const VNNI: bool>(
    acc: __m256,
    q: &[__m256i; 8],
    d: __m256,
    m: __m256,
    y: &Q8,
) -> __m256 {
    unsafe {
        let sum = if VNNI {
            // Two chains: one of 8 dependent `dpbusd`s waited on their latency.
            let mut sums = [_mm256_setzero_si256(); 2];
            for (c, q) in q.iter().enumerate() {
                sums[c % 2] = _mm256_dpbusd_epi32(sums[c % 2], *q, y4(y, c));
            }
            _mm256_add_epi32(sums[0], sums[1])
        } else {
            // u4 x i8 pairs: at most 2 * 15 * 127 each, so 8 of them fit in i16.
            let sum16 = q
                .iter()
                .enumerate()
                .fold(_mm256_setzero_si256(), |s, (c, q)| {
                    _mm256_add_epi16(s, _mm256_maddubs_epi16(*q, y4(y, c)))
                });
            _mm256_madd_epi16(sum16, _mm256_set1_epi16(1))
        };
        scaled(acc, sum, d, Some(m), y)
    }
}

/// `acc` plus a block's integer sums for 8 weight rows scaled by the rows' `d` and the
/// activations', plus the rows' minimums `m` (formats that have them) times the activations' `s`.
///
/// Safety: the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn scaled(acc: __m256, sum: __m256i, d: __m256, m: Option<__m256>, y: &Q8) -> __m256 {
    // SAFETY: as this function's.
    unsafe {
        let sum = _mm256_cvtepi32_ps(sum);
        let acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(y.d)), acc);
        match m {
            Some(m) => _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), acc),
            None => acc,
        }
    }
}

/// A byte per weight: Q8_0's (and Q5_0's) signed `q` (stored as `q + 128`) with a scale, or
/// Q5_1's unsigned one with a scale and a minimum. `maddubs` and `dpbusd` take one unsigned
/// operand. `dpbusd` takes the stored `q + 128` and the block's sum is corrected by
/// `128 * Σy` after; `maddubs` would saturate on that (its pairs reach 2 * 255 * 127), so AVX2
/// flips the stored bit back, gives the instruction |q| and the activations q's signs. AVX2's
/// pair sums then reach 2 * 128 * 127, so each 4-value chunk widens to i32 at once.
///
/// Safety: as [`q4_1`].
#[inline(always)]
unsafe fn bytes<const R: usize, const VNNI: bool, const SIGNED: bool>(
    w: &[u8],
    x: &[&[Q8]; R],
) -> [[f32; GROUP]; R] {
    unsafe {
        let packing = if SIGNED {
            Packing::Signed
        } else {
            Packing::Unsigned
        };
        let values = packing.values_at();
        let mut acc = [_mm256_setzero_ps(); R];
        let rows = block_rows(w, packing, x);
        for (b, block) in w.chunks_exact(packing.group_block_bytes()).enumerate() {
            // Scales, then minimums (unsigned only), then 8 vectors of 32 values.
            let p = block.as_ptr();
            prefetch::<R>(p, packing.group_block_bytes());
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
            let stored =
                [0, 1, 2, 3, 4, 5, 6, 7].map(|c| _mm256_loadu_si256(p.add(values + 32 * c).cast()));
            // AVX2's signed weights: `q` back from `q + 128`, then |q| for `maddubs`.
            let q = if SIGNED && !VNNI {
                stored.map(|v| _mm256_xor_si256(v, _mm256_set1_epi8(SIGN as i8)))
            } else {
                stored
            };
            let unsigned = if SIGNED && !VNNI {
                q.map(|q| _mm256_sign_epi8(q, q))
            } else {
                q
            };
            // SAFETY: `block_rows` checked that every row has block `b`.
            each_row!(R, r => acc[r] = bytes_row::<VNNI, SIGNED>(
                acc[r], &q, &unsigned, d, m, &*rows[r].add(b)
            ));
        }
        store(acc)
    }
}

/// One row's block added to its 8 sums (`q` the weights, `unsigned` what `maddubs` takes).
///
/// Safety: as [`q4_1`].
#[inline(always)]
unsafe fn bytes_row<const VNNI: bool, const SIGNED: bool>(
    acc: __m256,
    q: &[__m256i; 8],
    unsigned: &[__m256i; 8],
    d: __m256,
    m: __m256,
    y: &Q8,
) -> __m256 {
    unsafe {
        // Two chains, as in `q4_1`.
        let mut sums = [_mm256_setzero_si256(); 2];
        for c in 0..8 {
            let y4 = if SIGNED && !VNNI {
                _mm256_sign_epi8(y4(y, c), q[c])
            } else {
                y4(y, c)
            };
            let sum = &mut sums[c % 2];
            *sum = if VNNI {
                _mm256_dpbusd_epi32(*sum, unsigned[c], y4)
            } else {
                let pairs = _mm256_maddubs_epi16(unsigned[c], y4);
                _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            };
        }
        let mut sum = _mm256_add_epi32(sums[0], sums[1]);
        if SIGNED && VNNI {
            // Σ (q + 128) y - 128 Σy: exact, as every sum here.
            sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(128 * y.sum));
        }
        scaled(acc, sum, d, (!SIGNED).then_some(m), y)
    }
}

/// Asks for the weights 1 KB past the group block at `p` (`bytes` long). Several rows'
/// arithmetic per weight leaves the hardware prefetcher behind: Q4_1 at 8 rows went from
/// 120-156 to 153-170 GMAC/s (`inprocess kernels`, medians of three sets of interleaved
/// runs). One row is bound by the bus and the hardware prefetcher alone keeps up with it,
/// so it asks for nothing.
///
/// Safety: the CPU has SSE (every x86-64 does); a prefetch never faults, whatever the address.
#[inline(always)]
pub(super) unsafe fn prefetch<const R: usize>(p: *const u8, bytes: usize) {
    const AHEAD: usize = 1024;
    if R > 1 {
        for line in (0..bytes).step_by(64) {
            // SAFETY: as this function's; `wrapping_add` forms the address without assuming
            // it lies in the same allocation.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + line).cast()) };
        }
    }
}

#[target_feature(enable = "avx")]
fn store<const R: usize>(acc: [__m256; R]) -> [[f32; GROUP]; R] {
    let mut out = [[0f32; GROUP]; R];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}
