//! GGUF Q4_1 matrices multiplied on the CPU by a kernel of kandle's own. candle 0.11 has only a
//! scalar loop for Q4_1 on x86, which was 79% of SmolLM2's decode time. As in llama.cpp, the
//! activations are quantized to 8 bits per 32-value block, so each block's dot product is an
//! integer sum; AVX2 (with FMA and F16C) is chosen at run time and a portable loop serves every
//! other CPU. Each output is one row's dot product with one weight row, computed the same way
//! whatever the batch, so a sequence's logits do not depend on its neighbours.
//!
//! A Q4_1 block is 32 weights in 20 bytes: f16 scale `d`, f16 minimum `m`, then 16 bytes of
//! 4-bit values `q` (element `j` in the low nibble of byte `j`, element `j + 16` in the high
//! one); a weight is `d * q + m`.
//!
//! Unsafe code is allowed here: SIMD intrinsics, and workers writing disjoint parts of one
//! output buffer.
#![allow(unsafe_code)]
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use std::sync::Arc;

pub const BLOCK: usize = 32;
pub const BLOCK_BYTES: usize = 20;
/// x rows that share one unpacking of a weight block.
const ROW_TILE: usize = 4;
/// Weight rows per work item: small enough to share out a decode step's few hundred rows,
/// large enough that the pool's per-item cost is noise.
const COLUMNS_PER_ITEM: usize = 16;

/// Bytes that outlive the model: a memory-mapped file or an owned buffer.
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A [rows, cols] Q4_1 matrix, the right operand of `x @ w.T`.
pub struct Matrix {
    bytes: Bytes,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// The matrix whose blocks start at `offset` in `bytes`; refused unless `cols` is whole
    /// blocks and the blocks lie inside `bytes`.
    pub fn new(bytes: Bytes, offset: usize, rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("a Q4_1 row of {cols} values is not whole blocks of {BLOCK}");
        }
        let len = rows
            .checked_mul(cols / BLOCK * BLOCK_BYTES)
            .and_then(|n| n.checked_add(offset));
        match len {
            Some(end) if end <= (*bytes).as_ref().len() => Ok(Self {
                bytes,
                offset,
                rows,
                cols,
            }),
            _ => candle_core::bail!(
                "a [{rows}, {cols}] Q4_1 matrix at byte {offset} does not fit in {} bytes",
                (*bytes).as_ref().len()
            ),
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * BLOCK_BYTES
    }

    fn row(&self, i: usize) -> &[u8] {
        let n = self.row_bytes();
        let start = self.offset + i * n;
        &(*self.bytes).as_ref()[start..start + n]
    }

    /// `x @ self.T` for f32 `x` of shape [.., cols].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    /// The rows `ids` as f32, for an embedding table.
    pub fn embedding(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            if id as usize >= self.rows {
                candle_core::bail!("token {id} is outside the {} rows of the table", self.rows);
            }
            dequantize_row(self.row(id as usize), dst);
        }
        Ok(out)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, blocks) = (self.rows, self.cols / BLOCK);
        let kernel = Kernel::detect();
        let xq = kernel.quantize(x);
        let mut out = vec![0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        let items = n.div_ceil(COLUMNS_PER_ITEM);
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let cols = range.start * COLUMNS_PER_ITEM..n.min(range.end * COLUMNS_PER_ITEM);
            let x_row = |r: usize| &xq[r * blocks..(r + 1) * blocks];
            // SAFETY: each (row, column) is written by exactly one work item, and `out`
            // outlives the pool's call.
            let write = |r: usize, c: usize, v: f32| unsafe { dst.write(r * n + c, v) };
            let full = m - m % ROW_TILE;
            for r0 in (0..full).step_by(ROW_TILE) {
                let x: [&[Q8]; ROW_TILE] = std::array::from_fn(|t| x_row(r0 + t));
                for c in cols.clone() {
                    for (t, v) in kernel.dots(self.row(c), &x).into_iter().enumerate() {
                        write(r0 + t, c, v);
                    }
                }
            }
            for r in full..m {
                for c in cols.clone() {
                    write(r, c, kernel.dots(self.row(c), &[x_row(r)])[0]);
                }
            }
        });
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
    unsafe fn write(&self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
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
    // Inlined into each kernel's row loop, so it is vectorized with that kernel's features.
    #[inline(always)]
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

fn scale_min(block: &[u8]) -> (f32, f32) {
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([block[i], block[i + 1]])).to_f32();
    (half(0), half(2))
}

fn dequantize_row(row: &[u8], dst: &mut [f32]) {
    for (block, out) in row
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK))
    {
        let (d, m) = scale_min(block);
        for (j, &b) in block[4..].iter().enumerate() {
            out[j] = d * (b & 0x0F) as f32 + m;
            out[j + 16] = d * (b >> 4) as f32 + m;
        }
    }
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

    /// One weight row's dot product with each of `x` (rows of Q8 blocks).
    fn dots<const R: usize>(self, w: &[u8], x: &[&[Q8]; R]) -> [f32; R] {
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

fn portable_dots<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for (b, block) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = scale_min(block);
        for (acc, row) in out.iter_mut().zip(x) {
            let y = &row[b];
            let mut sum = 0i32;
            for (j, &q) in block[4..].iter().enumerate() {
                sum += (q & 0x0F) as i32 * y.qs[j] as i32 + (q >> 4) as i32 * y.qs[j + 16] as i32;
            }
            *acc += d * y.d * sum as f32 + m * y.s;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK_BYTES, Q8};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn quantize(x: &[f32]) -> Vec<Q8> {
        super::quantize(x)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots<const R: usize>(w: &[u8], x: &[&[Q8]; R]) -> [f32; R] {
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for (b, block) in w.chunks_exact(BLOCK_BYTES).enumerate() {
            // SAFETY: a block is 20 bytes: 4 of f16 scale and minimum, 16 of nibbles.
            let (dm, raw) = unsafe {
                (
                    _mm_cvtph_ps(_mm_cvtsi32_si128(
                        block.as_ptr().cast::<i32>().read_unaligned(),
                    )),
                    _mm_loadu_si128(block.as_ptr().add(4).cast()),
                )
            };
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            let q = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16::<4>(raw), low),
                _mm_and_si128(raw, low),
            );
            for r in 0..R {
                let y = &x[r][b];
                // SAFETY: `qs` is 32 bytes.
                let yq = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
                // u4 * i8 pairs fit i16 (2 * 15 * 127), then pairs of those in i32.
                let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(q, yq), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sum), acc[r]);
                mins[r] += m * y.s;
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + mins[r])
    }

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A random [rows, cols] Q4_1 matrix and its exact f32 values.
    fn random(rows: usize, cols: usize, seed: u64) -> (Matrix, Vec<f32>) {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            bytes.extend(d.to_bits().to_le_bytes());
            bytes.extend(m.to_bits().to_le_bytes());
            bytes.extend((0..16).map(|_| next() as u8));
        }
        let mut dense = vec![0f32; rows * cols];
        for (r, dst) in dense.chunks_exact_mut(cols).enumerate() {
            dequantize_row(
                &bytes[r * cols / BLOCK * BLOCK_BYTES..][..cols / BLOCK * BLOCK_BYTES],
                dst,
            );
        }
        let m = Matrix::new(Arc::new(bytes), 0, rows, cols).unwrap();
        (m, dense)
    }

    fn activations(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect()
    }

    /// Every kernel this CPU can run, one row or a tile of rows at a time, and the whole
    /// threaded op, agree with f64 arithmetic on the dequantized weights and the 8-bit
    /// activations the kernel sees: the integer sums are exact, so only float rounding is left.
    #[test]
    fn matmul_matches_exact_arithmetic() {
        let (rows, cols, m) = (37, 96, 8);
        let (w, dense) = random(rows, cols, 1);
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
            for c in 0..rows {
                for r0 in (0..m).step_by(ROW_TILE) {
                    let x: [&[Q8]; ROW_TILE] = std::array::from_fn(|t| x_row(r0 + t));
                    let tile = kernel.dots(w.row(c), &x);
                    for (t, got) in tile.into_iter().enumerate() {
                        check(got, r0 + t, c, "tile");
                        check(kernel.dots(w.row(c), &[x_row(r0 + t)])[0], r0 + t, c, "row");
                    }
                }
            }
        }
        let out = w
            .forward(&Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in out.iter().enumerate() {
            for (c, got) in row.iter().enumerate() {
                check(*got, r, c, "matmul");
            }
        }
    }

    /// The whole op (threads, tiles, a batch whose row count is not a multiple of the tile)
    /// gives each row what that row gives alone.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (rows, cols, m) = (53, 64, 7);
        let (w, _) = random(rows, cols, 2);
        let x = activations(m, cols);
        let batch = w
            .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(batch.dims(), &[m, rows]);
        let batch: Vec<Vec<f32>> = batch.to_vec2().unwrap();
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let alone = w
                .forward(&Tensor::from_vec(row.to_vec(), (1, cols), &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(alone.to_vec2::<f32>().unwrap()[0], batch[r], "row {r}");
        }
    }

    #[test]
    fn a_matrix_outside_its_bytes_is_refused() {
        let bytes: Bytes = Arc::new(vec![0u8; 2 * BLOCK_BYTES]);
        assert!(Matrix::new(bytes.clone(), 0, 2, BLOCK).is_ok());
        assert!(Matrix::new(bytes.clone(), 1, 2, BLOCK).is_err());
        assert!(Matrix::new(bytes.clone(), 0, 3, BLOCK).is_err());
        assert!(Matrix::new(bytes.clone(), 0, 1, BLOCK + 1).is_err());
        assert!(Matrix::new(bytes, 0, usize::MAX, BLOCK).is_err());
    }
}
