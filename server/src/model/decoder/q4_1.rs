//! GGUF Q4_1 matrices multiplied on the CPU by a kernel of kandle's own. candle 0.11 has only a
//! scalar loop for Q4_1 on x86, which was 79% of SmolLM2's decode time. As in llama.cpp, the
//! activations are quantized to 8 bits per 32-value block, so each block's dot product is an
//! integer sum; AVX2 (with FMA and F16C) is chosen at run time and a portable loop serves every
//! other CPU. Each output is one row's dot product with one weight row, computed the same way
//! whatever the batch, so a sequence's logits do not depend on its neighbours.
//!
//! A GGUF Q4_1 block is 32 weights in 20 bytes: f16 scale `d`, f16 minimum `m`, then 16 bytes
//! of 4-bit values `q` (element `j` in the low nibble of byte `j`, element `j + 16` in the high
//! one); a weight is `d * q + m`. At load the blocks of each 8 weight rows are interleaved
//! (llama.cpp repacks its Q4_0 the same way), so one 256-bit register holds 4 consecutive
//! values of all 8 rows: a multiply-add against 4 broadcast activations then yields partial
//! sums for 8 outputs at once, with no horizontal sums, and the 8 scales and minimums convert
//! in one instruction each. The layout costs no bytes; it is a copy, not a view of the file.
//!
//! Unsafe code is allowed here: SIMD intrinsics, and workers writing disjoint parts of one
//! output buffer.
#![allow(unsafe_code)]
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;

pub const BLOCK: usize = 32;
pub const BLOCK_BYTES: usize = 20;
/// Weight rows interleaved in one group.
const GROUP: usize = 8;
/// One block of a group: 8 f16 scales, 8 f16 minimums, then 4 x 32 bytes of nibbles where byte
/// `4r + j` of vector `i` holds row `r`'s element `4i + j` (low) and `4i + 16 + j` (high).
const GROUP_BLOCK_BYTES: usize = GROUP * BLOCK_BYTES;
/// x rows that share one unpacking of a weight block.
const ROW_TILE: usize = 4;
/// Groups per work item: enough to share out a decode step's few hundred rows among the
/// threads while the pool's per-item cost stays noise.
const GROUPS_PER_ITEM: usize = 2;

/// A [rows, cols] Q4_1 matrix, the right operand of `x @ w.T`.
pub struct Matrix {
    /// Groups of 8 rows (the last padded with zero rows), each `cols / 32` group blocks.
    packed: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// The matrix in GGUF's Q4_1 layout; refused unless `cols` is whole blocks and `bytes`
    /// holds exactly the blocks of `rows` rows.
    pub fn new(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("a Q4_1 row of {cols} values is not whole blocks of {BLOCK}");
        }
        let blocks = cols / BLOCK;
        if rows.checked_mul(blocks * BLOCK_BYTES) != Some(bytes.len()) {
            candle_core::bail!(
                "{} bytes are not a [{rows}, {cols}] Q4_1 matrix",
                bytes.len()
            );
        }
        let groups = rows.div_ceil(GROUP);
        let mut packed = vec![0u8; groups * blocks * GROUP_BLOCK_BYTES];
        for (r, row) in bytes.chunks_exact(blocks * BLOCK_BYTES).enumerate() {
            let (g, lane) = (r / GROUP, r % GROUP);
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let dst = &mut packed[(g * blocks + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&block[0..2]);
                dst[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&block[2..4]);
                // Byte `4i + j` of the GGUF block holds elements 4i + j and 4i + j + 16 too.
                for i in 0..4 {
                    for j in 0..4 {
                        dst[32 + 32 * i + 4 * lane + j] = block[4 + 4 * i + j];
                    }
                }
            }
        }
        Ok(Self { packed, rows, cols })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// The group blocks of rows `8g..8g + 8`.
    fn group(&self, g: usize) -> &[u8] {
        let n = self.blocks() * GROUP_BLOCK_BYTES;
        &self.packed[g * n..(g + 1) * n]
    }

    /// `x @ self.T` for f32 `x` of shape [.., cols].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    /// The rows `ids` as f32, for an embedding table.
    pub fn embedding(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token {id} is outside the {} rows of the table", self.rows);
            }
            let group = self.group(id / GROUP);
            for (block, out) in group
                .chunks_exact(GROUP_BLOCK_BYTES)
                .zip(dst.chunks_exact_mut(BLOCK))
            {
                let (d, m) = scale_min(block, id % GROUP);
                for (k, v) in out.iter_mut().enumerate() {
                    *v = d * value(block, id % GROUP, k) as f32 + m;
                }
            }
        }
        Ok(out)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, blocks) = (self.rows, self.blocks());
        let kernel = Kernel::detect();
        let xq = kernel.quantize(x);
        let mut out = vec![0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        let groups = n.div_ceil(GROUP);
        candle_core::utils::barrier_pool().execute_chunked(
            groups.div_ceil(GROUPS_PER_ITEM),
            |range| {
                let x_row = |r: usize| &xq[r * blocks..(r + 1) * blocks];
                // SAFETY: each (row, column) is written by exactly one work item, and `out`
                // outlives the pool's call.
                let write = |r: usize, g: usize, v: [f32; GROUP]| {
                    let cols = GROUP.min(n - g * GROUP);
                    unsafe { dst.write(r * n + g * GROUP, &v[..cols]) }
                };
                let full = m - m % ROW_TILE;
                for g in range.start * GROUPS_PER_ITEM..groups.min(range.end * GROUPS_PER_ITEM) {
                    let w = self.group(g);
                    for r0 in (0..full).step_by(ROW_TILE) {
                        let x: [&[Q8]; ROW_TILE] = std::array::from_fn(|t| x_row(r0 + t));
                        for (t, v) in kernel.dots(w, &x).into_iter().enumerate() {
                            write(r0 + t, g, v);
                        }
                    }
                    for r in full..m {
                        write(r, g, kernel.dots(w, &[x_row(r)])[0]);
                    }
                }
            },
        );
        out
    }
}

impl CustomOp1 for Matrix {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4_1-matmul takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_1-matmul takes contiguous activations");
        };
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "q4_1-matmul: activations {dims:?} against a [{}, {}] matrix",
                self.rows,
                self.cols
            );
        }
        let x = &data[start..end];
        let out = self.matmul(x, x.len() / self.cols);
        *dims.last_mut().expect("checked above") = self.rows;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

struct SharedOut(*mut f32);
// SAFETY: writers touch disjoint elements (see `Matrix::matmul`).
unsafe impl Sync for SharedOut {}
impl SharedOut {
    unsafe fn write(&self, i: usize, v: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(i), v.len()) }
    }
}

/// 32 activations as 8-bit integers: `x ≈ d * q`, with `s = d * Σq` for the minimum's term.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Q8 {
    qs: [i8; BLOCK],
    d: f32,
    s: f32,
}

impl Q8 {
    fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inv).round_ties_even() as i8;
        }
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        Self {
            qs,
            d,
            s: d * sum as f32,
        }
    }
}

/// Row `lane`'s scale and minimum in a group block.
fn scale_min(block: &[u8], lane: usize) -> (f32, f32) {
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([block[i], block[i + 1]])).to_f32();
    (half(2 * lane), half(16 + 2 * lane))
}

/// Row `lane`'s 4-bit value `k` in a group block.
fn value(block: &[u8], lane: usize, k: usize) -> u8 {
    let byte = block[32 + 32 * (k % 16 / 4) + 4 * lane + k % 4];
    if k < 16 { byte & 0x0F } else { byte >> 4 }
}

#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("KANDLE_PORTABLE_KERNELS").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        Self::Portable
    }

    fn quantize(self, x: &[f32]) -> Vec<Q8> {
        match self {
            Self::Portable => quantize(x),
            // SAFETY: chosen only when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::quantize(x) },
        }
    }

    /// The dot products of a group's 8 weight rows with each of `x` (rows of Q8 blocks).
    fn dots<const R: usize>(self, w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
        match self {
            Self::Portable => portable_dots(w, x),
            // SAFETY: chosen only when the CPU has AVX2, FMA and F16C.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::dots(w, x) },
        }
    }
}

fn quantize(x: &[f32]) -> Vec<Q8> {
    x.chunks_exact(BLOCK).map(Q8::quantize).collect()
}

fn portable_dots<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    let mut out = [[0f32; GROUP]; R];
    for (b, block) in w.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
        for lane in 0..GROUP {
            let (d, m) = scale_min(block, lane);
            for (acc, row) in out.iter_mut().zip(x) {
                let y = &row[b];
                let sum: i32 = (0..BLOCK)
                    .map(|k| value(block, lane, k) as i32 * y.qs[k] as i32)
                    .sum();
                acc[lane] += d * y.d * sum as f32 + m * y.s;
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, GROUP, GROUP_BLOCK_BYTES, Q8};
    use std::arch::x86_64::*;

    /// As `super::quantize` (`cvtps` rounds half to even, like `round_ties_even`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn quantize(x: &[f32]) -> Vec<Q8> {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        x.chunks_exact(BLOCK)
            .map(|b| {
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
                let mut qs = [0i8; BLOCK];
                // SAFETY: `qs` is 32 bytes.
                unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), q8) };
                let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                Q8 {
                    qs,
                    d,
                    s: d * sum as f32,
                }
            })
            .collect()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, block) in w.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
            let p = block.as_ptr();
            // SAFETY: a group block is 160 bytes: 16 of scales, 16 of minimums, 128 of nibbles.
            let (d, m, raw) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
                    [0, 1, 2, 3].map(|i| _mm256_loadu_si256(p.add(32 + 32 * i).cast())),
                )
            };
            // q[c]: values 4c..4c + 4 of all 8 rows.
            let q: [__m256i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm256_and_si256(raw[c], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw[c - 4]), low)
                }
            });
            for r in 0..R {
                let y = &x[r][b];
                let mut sum16 = _mm256_setzero_si256();
                for (c, q) in q.iter().enumerate() {
                    // SAFETY: `qs` is 32 bytes.
                    let y4 = unsafe { y.qs.as_ptr().add(4 * c).cast::<i32>().read_unaligned() };
                    // u4 x i8 pairs: at most 2 * 15 * 127 each, so 8 of them fit in i16.
                    sum16 =
                        _mm256_add_epi16(sum16, _mm256_maddubs_epi16(*q, _mm256_set1_epi32(y4)));
                }
                let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones));
                acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(y.d)), acc[r]);
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), acc[r]);
            }
        }
        let mut out = [[0f32; GROUP]; R];
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o` is 8 floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Random GGUF Q4_1 bytes for a [rows, cols] matrix, and their exact f32 values.
    fn random(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let (mut bytes, mut dense) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            let qs: Vec<u8> = (0..16).map(|_| next() as u8).collect();
            bytes.extend(d.to_bits().to_le_bytes());
            bytes.extend(m.to_bits().to_le_bytes());
            bytes.extend(&qs);
            let value = |q: u8| d.to_f32() * q as f32 + m.to_f32();
            dense.extend(qs.iter().map(|q| value(q & 0x0F)));
            dense.extend(qs.iter().map(|q| value(q >> 4)));
        }
        (bytes, dense)
    }

    fn activations(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect()
    }

    /// Every kernel this CPU can run, one row or a tile of rows at a time, and the whole
    /// threaded op, agree with f64 arithmetic on the dequantized weights and the 8-bit
    /// activations the kernel sees: the integer sums are exact, so only float rounding is left.
    /// 37 rows leave the last group of 8 padded.
    #[test]
    fn matmul_matches_exact_arithmetic() {
        let (rows, cols, m) = (37, 96, 8);
        let (bytes, dense) = random(rows, cols, 1);
        let w = Matrix::new(&bytes, rows, cols).unwrap();
        let x = activations(m, cols);
        let xq = quantize(&x);
        let blocks = cols / BLOCK;
        let x_row = |r: usize| &xq[r * blocks..(r + 1) * blocks];
        // (value, the sum of |terms| that bounds its rounding error)
        let want = |r: usize, c: usize| {
            let (mut sum, mut size) = (0f64, 0f64);
            for (i, w) in dense[c * cols..(c + 1) * cols].iter().enumerate() {
                let y = &x_row(r)[i / BLOCK];
                let term = *w as f64 * y.d as f64 * y.qs[i % BLOCK] as f64;
                sum += term;
                size += term.abs();
            }
            (sum, size)
        };
        let check = |got: f32, r: usize, c: usize, what: &str| {
            let (want, size) = want(r, c);
            assert!(
                (got as f64 - want).abs() <= 1e-5 * size + 1e-6,
                "{what}: row {r} column {c}: {got} against {want}"
            );
        };
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if let k @ Kernel::Avx2 = Kernel::detect() {
            kernels.push(k);
        }
        for kernel in kernels {
            for g in 0..rows.div_ceil(GROUP) {
                let columns = g * GROUP..rows.min((g + 1) * GROUP);
                for r0 in (0..m).step_by(ROW_TILE) {
                    let x: [&[Q8]; ROW_TILE] = std::array::from_fn(|t| x_row(r0 + t));
                    let tile = kernel.dots(w.group(g), &x);
                    for (t, lanes) in tile.iter().enumerate() {
                        let alone = kernel.dots(w.group(g), &[x_row(r0 + t)])[0];
                        for c in columns.clone() {
                            check(lanes[c % GROUP], r0 + t, c, "tile");
                            check(alone[c % GROUP], r0 + t, c, "row");
                        }
                    }
                }
            }
        }
        let out = w
            .forward(&Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!((out.len(), out[0].len()), (m, rows));
        for (r, row) in out.iter().enumerate() {
            for (c, got) in row.iter().enumerate() {
                check(*got, r, c, "matmul");
            }
        }
    }

    /// The whole op (threads, tiles, a batch whose row count is not a multiple of the tile)
    /// gives each row exactly what that row gives alone.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (rows, cols, m) = (53, 64, 7);
        let w = Matrix::new(&random(rows, cols, 2).0, rows, cols).unwrap();
        let x = activations(m, cols);
        let batch: Vec<Vec<f32>> = w
            .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let alone = w
                .forward(&Tensor::from_vec(row.to_vec(), (1, cols), &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(alone.to_vec2::<f32>().unwrap()[0], batch[r], "row {r}");
        }
    }

    #[test]
    fn every_kernel_quantizes_activations_alike() {
        let mut x = activations(4, 64);
        x[32..64].fill(0.0);
        let want = quantize(&x);
        #[cfg(target_arch = "x86_64")]
        if let k @ Kernel::Avx2 = Kernel::detect() {
            for (a, b) in k.quantize(&x).iter().zip(&want) {
                assert_eq!((a.qs, a.d, a.s), (b.qs, b.d, b.s));
            }
        }
        assert!(want[1].qs.iter().all(|&q| q == 0) && want[1].d == 0.0 && want[1].s == 0.0);
    }

    #[test]
    fn embedding_rows_are_the_dequantized_rows() {
        let (rows, cols) = (11, 64);
        let (bytes, dense) = random(rows, cols, 3);
        let w = Matrix::new(&bytes, rows, cols).unwrap();
        let got = w.embedding(&[10, 0, 3]).unwrap();
        for (i, id) in [10, 0, 3].into_iter().enumerate() {
            assert_eq!(
                got[i * cols..][..cols],
                dense[id * cols..][..cols],
                "row {id}"
            );
        }
        assert!(w.embedding(&[11]).is_err());
    }

    #[test]
    fn bytes_that_are_not_the_matrix_are_refused() {
        let bytes = vec![0u8; 2 * BLOCK_BYTES];
        assert!(Matrix::new(&bytes, 2, BLOCK).is_ok());
        assert!(Matrix::new(&bytes[1..], 2, BLOCK).is_err());
        assert!(Matrix::new(&bytes, 3, BLOCK).is_err());
        assert!(Matrix::new(&bytes, 1, BLOCK + 1).is_err());
        assert!(Matrix::new(&bytes, usize::MAX, BLOCK).is_err());
    }
}
