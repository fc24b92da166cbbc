//! GGUF Q4_1, Q5_0, Q5_1 and Q8_0 matrices (and Q4_K, rewritten as Q4_1 at load: `q4_k`)
//! multiplied on the CPU by kernels of kandle's own.
//! candle 0.11 has only scalar loops for Q4_1 and the Q5 formats on x86 (Q4_1's was 79% of
//! SmolLM2's decode time), and its Q8_0 kernel
//! takes one activation row at a time, so a batch of rows costs as many passes over the
//! weights. As in llama.cpp, the activations are quantized to 8 bits per 32-value block, so
//! each block's dot product is an integer sum; AVX2 (with FMA and F16C) is chosen at run time
//! and a portable loop serves every other CPU. Each output is one row's dot product with one
//! weight row, computed the same way whatever the batch, so a sequence's logits do not depend
//! on its neighbours.
//!
//! At load the blocks of each 8 weight rows are interleaved (llama.cpp repacks the same way),
//! so one 256-bit register holds 4 consecutive values of all 8 rows: a multiply-add against 4
//! broadcast activations yields partial sums for 8 outputs at once, with no horizontal sums,
//! and the 8 scales convert in one instruction. The layout costs no bytes; it is a copy, not a
//! view of the file. A group block (one 32-value block of 8 rows) is:
//! - Q4_1 (a weight is `d * q + m`, `q` in 0..16): 8 f16 `d`, 8 f16 `m`, then 4 vectors of 32
//!   bytes where byte `4r + j` of vector `i` holds row `r`'s `q` number `4i + j` in its low
//!   nibble and number `4i + j + 16` in its high one;
//! - Q8_0 (a weight is `d * q`, `q` an i8): 8 f16 `d`, then 8 vectors of 32 bytes where byte
//!   `4r + j` of vector `c` is row `r`'s `q` number `4c + j`, stored as the unsigned `q + 128`:
//!   VNNI's `dpbusd` takes it as it is and subtracts `128 * Σy` once per block, where a signed
//!   byte cost a `sign` instruction per activation vector (AVX2 flips the bit back once per
//!   block);
//! - Q5_0 is kept as Q8_0, its `q - 16` an i8 (exact: the same weights, a byte each);
//! - Q5_1 (a weight is `d * q + m`, `q` in 0..32): 8 f16 `d`, 8 f16 `m`, then `q` as Q8_0's,
//!   a byte each.
//!
//! Where the CPU has AVX-512 (F, BW and VNNI), a tile of several rows takes two groups at once
//! on 512-bit vectors (`avx512`): the same sums, twice the work an instruction.
//!
//! Unsafe code is allowed here: SIMD intrinsics, and workers writing disjoint parts of one
//! output buffer.
#![allow(unsafe_code)]
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod q4_k;

use crate::model::disjoint::DisjointOut;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;
use std::borrow::Cow;

pub const BLOCK: usize = 32;
/// Weight rows interleaved in one group.
const GROUP: usize = 8;
/// Groups per work item: enough to share out a decode step's few hundred rows among the
/// threads while the pool's per-item cost stays noise.
const GROUPS_PER_ITEM: usize = 2;
/// Rows of activations in a panel (see `Matrix::matmul`): one 8-row tile, whose quantized
/// blocks (44 bytes for each 32 values: 17 KB for 8 rows of 1,536) stay in L1.
const PANEL_ROWS: usize = 8;

/// The GGUF block formats with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Format {
    /// Bytes of one 32-value block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// How this format's blocks are kept. The 5-bit formats are widened to a byte per value
    /// at load, exactly (a Q5_0 value is `d * (q - 16)`, an i8 times Q8_0's scale): 8.5 or
    /// 9 bits a weight instead of 5.5 or 6, for kernels that need no bit shuffling.
    fn packing(self) -> Packing {
        match self {
            Self::Q4_1 => Packing::Nibbles,
            Self::Q5_0 | Self::Q8_0 => Packing::Signed,
            Self::Q5_1 => Packing::Unsigned,
        }
    }

    /// Row `lane`'s GGUF block in its group block (see the module's docs).
    fn pack(self, block: &[u8], lane: usize, dst: &mut [u8]) {
        let packing = self.packing();
        dst[2 * lane..2 * lane + 2].copy_from_slice(&block[0..2]);
        if packing.has_min() {
            dst[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&block[2..4]);
        }
        match self {
            Self::Q4_1 => {
                // GGUF byte `4i + j` holds numbers 4i + j and 4i + j + 16, as the packed one.
                for i in 0..4 {
                    let at = 32 + 32 * i + 4 * lane;
                    dst[at..at + 4].copy_from_slice(&block[4 + 4 * i..8 + 4 * i]);
                }
            }
            Self::Q8_0 => packing.put(dst, lane, |k| block[2 + k] ^ SIGN),
            Self::Q5_0 => packing.put(dst, lane, |k| {
                five_bits(&block[2..], k).wrapping_sub(16) ^ SIGN
            }),
            Self::Q5_1 => packing.put(dst, lane, |k| five_bits(&block[4..], k)),
        }
    }
}

/// Number `k` of a 5-bit block's values: `qh` (4 bytes of high bits, bit `k` for number `k`)
/// then 16 bytes of low nibbles, as Q4's.
fn five_bits(qh_qs: &[u8], k: usize) -> u8 {
    let qh = u32::from_le_bytes([qh_qs[0], qh_qs[1], qh_qs[2], qh_qs[3]]);
    let nibbles = qh_qs[4 + k % 16];
    let low = if k < 16 { nibbles & 0x0F } else { nibbles >> 4 };
    low | (((qh >> k) & 1) as u8) << 4
}

/// A group block's layout (see the module's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Packing {
    /// Q4_1: `d * q + m`, two 4-bit `q` a byte.
    Nibbles,
    /// Q8_0 (and Q5_0): `d * q`, `q` an i8, stored as `q + 128` (see the module's docs).
    Signed,
    /// Q5_1: `d * q + m`, `q` a byte in 0..32.
    Unsigned,
}

impl Packing {
    fn has_min(self) -> bool {
        self != Self::Signed
    }

    /// Where the `q` numbers start in a group block: after 8 scales, and 8 minimums if any.
    fn values_at(self) -> usize {
        if self.has_min() { 32 } else { 16 }
    }

    fn group_block_bytes(self) -> usize {
        let values = if self == Self::Nibbles { 128 } else { 256 };
        self.values_at() + values
    }

    /// Writes row `lane`'s 32 byte-wide `q` numbers, `q(k)` for number `k`.
    fn put(self, dst: &mut [u8], lane: usize, q: impl Fn(usize) -> u8) {
        for k in 0..BLOCK {
            dst[self.values_at() + 32 * (k / 4) + 4 * lane + k % 4] = q(k);
        }
    }

    /// Row `lane`'s scale and minimum in a group block.
    fn scale_min(self, block: &[u8], lane: usize) -> (f32, f32) {
        let half = |i: usize| f16::from_bits(u16::from_le_bytes([block[i], block[i + 1]])).to_f32();
        let min = if self.has_min() {
            half(16 + 2 * lane)
        } else {
            0.0
        };
        (half(2 * lane), min)
    }

    /// Row `lane`'s integer `q` number `k` in a group block.
    fn q(self, block: &[u8], lane: usize, k: usize) -> i32 {
        let at = self.values_at() + 4 * lane + k % 4;
        match self {
            Self::Nibbles => {
                let byte = block[at + 32 * (k % 16 / 4)];
                (if k < 16 { byte & 0x0F } else { byte >> 4 }) as i32
            }
            Self::Signed => (block[at + 32 * (k / 4)] ^ SIGN) as i8 as i32,
            Self::Unsigned => block[at + 32 * (k / 4)] as i32,
        }
    }
}

/// A [rows, cols] quantized matrix, the right operand of `x @ w.T`.
pub struct Matrix {
    packing: Packing,
    /// Groups of 8 rows (the last padded with zero rows), each `cols / 32` group blocks.
    packed: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// The matrix from its GGUF blocks; refused unless `cols` is whole blocks and `bytes` holds
    /// exactly the blocks of `rows` rows.
    pub fn new(format: Format, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("a {format:?} row of {cols} values is not whole blocks of {BLOCK}");
        }
        let (blocks, block_bytes) = (cols / BLOCK, format.block_bytes());
        if rows.checked_mul(blocks * block_bytes) != Some(bytes.len()) {
            candle_core::bail!(
                "{} bytes are not a [{rows}, {cols}] {format:?} matrix",
                bytes.len()
            );
        }
        let row_bytes = blocks * block_bytes;
        Ok(Self::pack(format, rows, cols, |r| {
            Cow::Borrowed(&bytes[r * row_bytes..(r + 1) * row_bytes])
        }))
    }

    /// The matrix from its GGUF Q4_K super-blocks, kept as Q4_1 (see `q4_k`).
    pub fn from_q4_k(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let row_bytes = q4_k::row_bytes(bytes, rows, cols)?;
        Ok(Self::pack(Format::Q4_1, rows, cols, |r| {
            Cow::Owned(q4_k::as_q4_1(&bytes[r * row_bytes..(r + 1) * row_bytes]))
        }))
    }

    /// The groups of rows in parallel, each row's GGUF blocks given by `row` (a load spends
    /// most of its time here, largely in the kernel's zeroing of the new pages).
    fn pack<'a>(
        format: Format,
        rows: usize,
        cols: usize,
        row: impl Fn(usize) -> Cow<'a, [u8]> + Sync,
    ) -> Self {
        let (packing, blocks, block_bytes) = (format.packing(), cols / BLOCK, format.block_bytes());
        let group_block = packing.group_block_bytes();
        let mut packed = vec![0u8; rows.div_ceil(GROUP) * blocks * group_block];
        packed
            .par_chunks_mut(blocks * group_block)
            .enumerate()
            .for_each(|(g, group)| {
                for lane in 0..GROUP.min(rows - g * GROUP) {
                    let row = row(g * GROUP + lane);
                    for (block, dst) in row
                        .chunks_exact(block_bytes)
                        .zip(group.chunks_exact_mut(group_block))
                    {
                        format.pack(block, lane, dst);
                    }
                }
            });
        Self {
            packing,
            packed,
            rows,
            cols,
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrices' rows one after another, as one matrix; None unless they share a format
    /// and a width and each has whole groups of rows (as every projection does).
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let fits = |m: &&Self| {
            m.packing == first.packing && m.cols == first.cols && m.rows.is_multiple_of(GROUP)
        };
        parts.iter().all(fits).then(|| Self {
            packing: first.packing,
            packed: parts.iter().fold(Vec::new(), |mut all, m| {
                all.extend_from_slice(&m.packed);
                all
            }),
            rows: parts.iter().map(|m| m.rows).sum(),
            cols: first.cols,
        })
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// The group blocks of rows `8g..8g + 8`.
    fn group(&self, g: usize) -> &[u8] {
        let n = self.blocks() * self.packing.group_block_bytes();
        &self.packed[g * n..(g + 1) * n]
    }

    /// `x @ self.T` for f32 `x` of shape [.., cols].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    /// The rows `ids` as f32, for an embedding table.
    pub fn embedding(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let packing = self.packing;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token {id} is outside the {} rows of the table", self.rows);
            }
            let lane = id % GROUP;
            let group = self.group(id / GROUP);
            for (block, out) in group
                .chunks_exact(packing.group_block_bytes())
                .zip(dst.chunks_exact_mut(BLOCK))
            {
                let (d, m) = packing.scale_min(block, lane);
                for (k, v) in out.iter_mut().enumerate() {
                    *v = d * packing.q(block, lane, k) as f32 + m;
                }
            }
        }
        Ok(out)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, blocks) = (self.rows, self.blocks());
        let kernel = Kernel::detect();
        let xq = kernel.quantize(x, self.cols);
        let groups = n.div_ceil(GROUP);
        let fill = |dst: &DisjointOut| {
            candle_core::utils::barrier_pool().execute_chunked(
                groups.div_ceil(GROUPS_PER_ITEM),
                |range| {
                    let x_row = |r: usize| &xq[r * blocks..(r + 1) * blocks];
                    // SAFETY: each (row, column) is written by exactly one work item, and the
                    // buffer outlives the pool's call.
                    let write = |r: usize, g: usize, v: [f32; GROUP]| {
                        let at = r * n + g * GROUP;
                        match n - g * GROUP {
                            cols if cols >= GROUP => unsafe { dst.write_array(at, &v) },
                            cols => unsafe { dst.write(at, &v[..cols]) },
                        }
                    };
                    let first = range.start * GROUPS_PER_ITEM;
                    let last = groups.min(range.end * GROUPS_PER_ITEM);
                    // Rows a panel at a time, each panel against every group here: its
                    // quantized rows stay in L1 while the groups' weights pass over them.
                    // Group by group over all rows, a prefill read every row's blocks back
                    // from L2 once per group.
                    for from in (0..m).step_by(PANEL_ROWS) {
                        let end = m.min(from + PANEL_ROWS);
                        let mut g = first;
                        while g < last {
                            let tiles = Tiles {
                                kernel,
                                packing: self.packing,
                                end,
                                x_row: &x_row,
                                write: &|r, j, v| write(r, g + j, v),
                            };
                            g += if kernel.pairs() && g + 1 < last {
                                tiles.all([self.group(g), self.group(g + 1)], from)
                            } else {
                                tiles.all([self.group(g)], from)
                            };
                        }
                    }
                },
            );
        };
        // SAFETY: the work items' groups cover every column, each written for every row.
        unsafe { DisjointOut::filled(m * n, fill) }
    }
}

/// Groups' dot products with rows of x, in tiles of rows that share each unpacked weight
/// block.
struct Tiles<'a, X, W> {
    kernel: Kernel,
    packing: Packing,
    /// The row after the last.
    end: usize,
    x_row: &'a X,
    /// Row, group (counted from the first of the tile's), and that group's 8 outputs.
    write: &'a W,
}

impl<'x, X: Fn(usize) -> &'x [Q8], W: Fn(usize, usize, [f32; GROUP])> Tiles<'_, X, W> {
    /// Rows `from..end` against the groups `w`, in the largest tiles the kernel has; returns
    /// the number of groups.
    fn all<const G: usize>(&self, w: [&[u8]; G], from: usize) -> usize {
        let mut r = from;
        if self.kernel.registers() >= 32 {
            r = self.run::<8, G>(w, r);
        }
        r = self.run::<4, G>(w, r);
        self.run::<1, G>(w, r);
        G
    }

    /// Rows `from..` in whole tiles of `R`; returns the first row left.
    fn run<const R: usize, const G: usize>(&self, w: [&[u8]; G], from: usize) -> usize {
        let mut r0 = from;
        while r0 + R <= self.end {
            let x: [&[Q8]; R] = std::array::from_fn(|t| (self.x_row)(r0 + t));
            let dots = self.kernel.dots(self.packing, w, &x);
            for (t, groups) in dots.into_iter().enumerate() {
                for (j, v) in groups.into_iter().enumerate() {
                    (self.write)(r0 + t, j, v);
                }
            }
            r0 += R;
        }
        r0
    }
}

impl CustomOp1 for Matrix {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::model::dense::map_rows(
            self.name(),
            storage,
            layout,
            self.cols,
            self.rows,
            |x, m| self.matmul(x, m),
        )
    }
}

/// The bit that turns a stored signed weight `q + 128` back into `q`, and back.
const SIGN: u8 = 0x80;

/// 32 activations as 8-bit integers: `x ≈ d * q`, with `s = d * Σq` for the minimum's term
/// and `sum = Σq` for the signed weights' offset.
#[derive(Clone, Copy)]
#[repr(C)]
struct Q8 {
    qs: [i8; BLOCK],
    d: f32,
    s: f32,
    sum: i32,
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
            sum,
        }
    }
}

/// The CPU kernels, chosen once per process.
static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();

/// The kernels' names, plainest first; a CPU runs the first few.
const KERNEL_NAMES: [&str; 4] = ["portable", "avx2", "vnni", "avx512"];

/// `cap_kernels` came after the kernels were chosen otherwise (by an earlier model's load).
#[derive(Debug, thiserror::Error)]
#[error("the CPU kernels are {chosen} already in this process; they cannot be limited to {wanted}")]
pub struct KernelsChosen {
    chosen: &'static str,
    wanted: String,
}

/// Keeps the CPU kernels, for the rest of the process, to the instruction set `name` (one of
/// `portable`, `avx2`, `vnni`), or to the best below it this CPU has.
pub(crate) fn cap_kernels(name: &str) -> std::result::Result<(), KernelsChosen> {
    let supported = Kernel::supported();
    let at = KERNEL_NAMES
        .iter()
        .position(|n| *n == name)
        .expect("one of the kernels' names");
    let capped = supported[at.min(supported.len() - 1)];
    let chosen = *KERNEL.get_or_init(|| capped);
    if chosen.name() == capped.name() {
        Ok(())
    } else {
        Err(KernelsChosen {
            chosen: chosen.name(),
            wanted: name.to_owned(),
        })
    }
}

/// The CPU kernels' name (`portable`, `avx2`, `vnni` or `avx512`).
pub(crate) fn kernels_name() -> &'static str {
    Kernel::detect().name()
}

/// Whether the CPU kernels run their AVX2 code (chosen once per process, as for these).
pub fn avx2() -> bool {
    !matches!(Kernel::detect(), Kernel::Portable)
}

#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-512 VNNI's integer dot products (on 256-bit vectors).
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// VNNI on 512-bit vectors, two groups at once.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The kernel chosen for this process: the best this CPU runs, unless `cap_kernels` chose
    /// a plainer one first.
    fn detect() -> Self {
        *KERNEL.get_or_init(|| *Self::supported().last().expect("portable"))
    }

    fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => "vnni",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => "avx512",
        }
    }

    /// Every kernel this CPU runs, plainest first: the first few of `KERNEL_NAMES`.
    fn supported() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            kernels.push(Self::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                kernels.push(Self::Vnni);
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    kernels.push(Self::Avx512);
                }
            }
        }
        kernels
    }

    /// Vector registers the kernel's code has: AVX-512VL gives 256-bit code 32, room for the 8
    /// accumulators of an 8-row tile beside the 8 unpacked weight vectors; AVX2's 16 fit 4
    /// rows.
    fn registers(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni | Self::Avx512 => 32,
            _ => 16,
        }
    }

    /// `x`'s rows of `cols` values as Q8 blocks; a prefill's rows over the barrier pool (on
    /// the engine thread alone they were 3% of a prefill profile while the pool spun).
    fn quantize(self, x: &[f32], cols: usize) -> Vec<Q8> {
        if x.len() < crate::model::disjoint::INLINE_VALUES {
            return self.quantize_rows(x);
        }
        let (rows, blocks) = (x.len() / cols, cols / BLOCK);
        let fill = |dst: &DisjointOut<Q8>| {
            candle_core::utils::barrier_pool().execute_chunked(rows, |items| {
                let q = self.quantize_rows(&x[items.start * cols..items.end * cols]);
                // SAFETY: these rows' blocks are written by this item alone.
                unsafe { dst.write(items.start * blocks, &q) };
            });
        };
        // SAFETY: the items cover rows 0..rows, each writing all its blocks.
        unsafe { DisjointOut::filled(rows * blocks, fill) }
    }

    fn quantize_rows(self, x: &[f32]) -> Vec<Q8> {
        match self {
            Self::Portable => quantize(x),
            // SAFETY: chosen only when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni | Self::Avx512 => unsafe { avx2::quantize(x) },
        }
    }

    /// Whether `dots` takes two groups at once faster than one group at a time.
    fn pairs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Self::Avx512 = self {
            return true;
        }
        false
    }

    /// The dot products of each of `w`'s groups' 8 weight rows with each of `x` (rows of Q8
    /// blocks). Whatever `G`, an output has the same bits (see `avx512`). A single row reads
    /// one group at a time: bound by memory, it ran slower over two groups' streams at once
    /// (`inprocess kernels`, Q4_1 at 1 row: 54-62 GMAC/s paired against 85-106 alone).
    fn dots<const R: usize, const G: usize>(
        self,
        packing: Packing,
        w: [&[u8]; G],
        x: &[&[Q8]; R],
    ) -> [[[f32; GROUP]; G]; R] {
        #[cfg(target_arch = "x86_64")]
        if let (Self::Avx512, Ok(pair), 2..) = (self, <[&[u8]; 2]>::try_from(w.as_slice()), R) {
            // SAFETY: chosen only when the CPU has the features these enable.
            let out = unsafe {
                match packing {
                    Packing::Nibbles => avx512::dots_q4_1(pair, x),
                    Packing::Signed => avx512::dots_q8_0(pair, x),
                    Packing::Unsigned => avx512::dots_q5_1(pair, x),
                }
            };
            return std::array::from_fn(|r| std::array::from_fn(|g| out[r][g]));
        }
        let each = w.map(|w| self.group_dots(packing, w, x));
        std::array::from_fn(|r| std::array::from_fn(|g| each[g][r]))
    }

    /// The dot products of one group's 8 weight rows with each of `x`.
    fn group_dots<const R: usize>(
        self,
        packing: Packing,
        w: &[u8],
        x: &[&[Q8]; R],
    ) -> [[f32; GROUP]; R] {
        match (self, packing) {
            (Self::Portable, _) => portable_dots(packing, w, x),
            // SAFETY: each chosen only when the CPU has the features it enables.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Packing::Nibbles) => unsafe { avx2::dots_q4_1(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Packing::Signed) => unsafe { avx2::dots_q8_0(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Packing::Unsigned) => unsafe { avx2::dots_q5_1(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni | Self::Avx512, Packing::Nibbles) => unsafe { avx2::dots_q4_1_vnni(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni | Self::Avx512, Packing::Signed) => unsafe { avx2::dots_q8_0_vnni(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni | Self::Avx512, Packing::Unsigned) => unsafe { avx2::dots_q5_1_vnni(w, x) },
        }
    }
}

fn quantize(x: &[f32]) -> Vec<Q8> {
    x.chunks_exact(BLOCK).map(Q8::quantize).collect()
}

fn portable_dots<const R: usize>(packing: Packing, w: &[u8], x: &[&[Q8]; R]) -> [[f32; GROUP]; R] {
    let mut out = [[0f32; GROUP]; R];
    for (b, block) in w.chunks_exact(packing.group_block_bytes()).enumerate() {
        for lane in 0..GROUP {
            let (d, m) = packing.scale_min(block, lane);
            for (acc, row) in out.iter_mut().zip(x) {
                let y = &row[b];
                let sum: i32 = (0..BLOCK)
                    .map(|k| packing.q(block, lane, k) * y.qs[k] as i32)
                    .sum();
                acc[lane] += d * y.d * sum as f32 + m * y.s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const FORMATS: [Format; 4] = [Format::Q4_1, Format::Q5_0, Format::Q5_1, Format::Q8_0];

    /// Random GGUF bytes for a [rows, cols] matrix, and their exact f32 values.
    fn random(format: Format, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
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
            bytes.extend(d.to_bits().to_le_bytes());
            let d = d.to_f32();
            match format {
                Format::Q4_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
                    let qs: Vec<u8> = (0..16).map(|_| next() as u8).collect();
                    bytes.extend(m.to_bits().to_le_bytes());
                    bytes.extend(&qs);
                    let value = |q: u8| d * q as f32 + m.to_f32();
                    dense.extend(qs.iter().map(|q| value(q & 0x0F)));
                    dense.extend(qs.iter().map(|q| value(q >> 4)));
                }
                Format::Q5_0 | Format::Q5_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
                    if format == Format::Q5_1 {
                        bytes.extend(m.to_bits().to_le_bytes());
                    }
                    let qh = next() ^ (next() << 16);
                    let qs: Vec<u8> = (0..16).map(|_| next() as u8).collect();
                    bytes.extend(qh.to_le_bytes());
                    bytes.extend(&qs);
                    // As ggml's dequantize_row_q5_*: bit j of `qh` tops number j.
                    let value = |q: u32| match format {
                        Format::Q5_0 => d * (q as f32 - 16.0),
                        _ => d * q as f32 + m.to_f32(),
                    };
                    let low: Vec<u32> = qs.iter().map(|&q| (q & 0x0F) as u32).collect();
                    let high: Vec<u32> = qs.iter().map(|&q| (q >> 4) as u32).collect();
                    for (j, q) in low.iter().chain(&high).enumerate() {
                        dense.push(value(q | ((qh >> j) & 1) << 4));
                    }
                }
                Format::Q8_0 => {
                    // Every i8, -128 included, which only a hostile file holds.
                    let qs: Vec<u8> = (0..32).map(|_| next() as u8).collect();
                    bytes.extend(&qs);
                    dense.extend(qs.iter().map(|&q| d * q as i8 as f32));
                }
            }
        }
        (bytes, dense)
    }

    fn activations(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect()
    }

    /// A stacked matrix computes exactly its parts' outputs side by side; parts of another
    /// format, width or a ragged row count do not stack.
    #[test]
    fn stacked_matrices_give_their_parts_outputs_side_by_side() {
        let cols = 64;
        let part = |format, rows, seed| {
            let (bytes, _) = random(format, rows, cols, seed);
            Matrix::new(format, &bytes, rows, cols).unwrap()
        };
        let (q, k, v) = (
            part(Format::Q4_1, 24, 1),
            part(Format::Q4_1, 8, 2),
            part(Format::Q4_1, 16, 3),
        );
        let stacked = Matrix::stack(&[&q, &k, &v]).unwrap();
        let x = activations(5, cols);
        let (m, n) = (5, 48);
        let whole = stacked.matmul(&x, m);
        for (r, row) in whole.chunks_exact(n).enumerate() {
            let mut at = 0;
            for p in [&q, &k, &v] {
                let alone = p.matmul(&x[r * cols..(r + 1) * cols], 1);
                assert_eq!(&row[at..at + p.rows], &alone[..], "row {r}");
                at += p.rows;
            }
        }
        let q8 = part(Format::Q8_0, 8, 4);
        assert!(Matrix::stack(&[&q, &q8]).is_none(), "formats differ");
        assert!(
            Matrix::stack(&[&q, &part(Format::Q4_1, 12, 5)]).is_none(),
            "12 rows"
        );
        let (bytes, _) = random(Format::Q4_1, 8, 32, 6);
        let narrow = Matrix::new(Format::Q4_1, &bytes, 8, 32).unwrap();
        assert!(Matrix::stack(&[&q, &narrow]).is_none(), "widths differ");
    }

    /// Every kernel this CPU can run, one row or a tile of rows at a time, and the whole
    /// threaded op, agree with f64 arithmetic on the dequantized weights and the 8-bit
    /// activations the kernel sees: the integer sums are exact, so only float rounding is left.
    /// 37 rows leave the last group of 8 padded.
    #[test]
    fn matmul_matches_exact_arithmetic() {
        for format in FORMATS {
            matmul_matches_exact_arithmetic_in(format);
        }
    }

    /// `kernel`'s tile of `size` rows (the first of `x`'s) against `groups`.
    fn tile<const G: usize>(
        kernel: Kernel,
        size: usize,
        groups: [&[u8]; G],
        packing: Packing,
        x: &[&[Q8]; 8],
    ) -> Vec<[[f32; GROUP]; G]> {
        if size == 8 {
            kernel.dots::<8, G>(packing, groups, x).to_vec()
        } else {
            let x: [&[Q8]; 4] = std::array::from_fn(|t| x[t]);
            kernel.dots::<4, G>(packing, groups, &x).to_vec()
        }
    }

    fn matmul_matches_exact_arithmetic_in(format: Format) {
        let (rows, cols, m) = (37, 96, 8);
        let (bytes, dense) = random(format, rows, cols, 1);
        let w = Matrix::new(format, &bytes, rows, cols).unwrap();
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
                "{format:?} {what}: row {r} column {c}: {got} against {want}"
            );
        };
        let groups = rows.div_ceil(GROUP);
        for kernel in Kernel::supported() {
            // Each tile size the matmul uses, on every kernel, one group at a time and two.
            for (size, r0) in [4, 8]
                .into_iter()
                .flat_map(|s| (0..m).step_by(s).map(move |r| (s, r)))
            {
                // Rows past `m` repeat the last; a 4-row tile reads only its first 4.
                let x: [&[Q8]; 8] = std::array::from_fn(|t| x_row((r0 + t).min(m - 1)));
                let singles: Vec<_> = (0..groups)
                    .map(|g| tile(kernel, size, [w.group(g)], w.packing, &x))
                    .collect();
                for (g, single) in singles.iter().enumerate() {
                    for (t, lanes) in single.iter().enumerate() {
                        let alone = kernel.dots(w.packing, [w.group(g)], &[x[t]])[0][0];
                        for c in g * GROUP..rows.min((g + 1) * GROUP) {
                            check(lanes[0][c % GROUP], r0 + t, c, "tile");
                            check(alone[c % GROUP], r0 + t, c, "row");
                        }
                    }
                }
                for g in 0..groups - 1 {
                    let pair = tile(kernel, size, [w.group(g), w.group(g + 1)], w.packing, &x);
                    for (t, both) in pair.iter().enumerate() {
                        let each = [singles[g][t][0], singles[g + 1][t][0]];
                        assert_eq!(
                            *both,
                            each,
                            "{format:?} groups {g} and {}, row {}",
                            g + 1,
                            r0 + t
                        );
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

    /// The whole op (threads, tiles, a batch whose row count is not a multiple of the tile:
    /// an 8-row tile where the kernel has one, a 4-row tile and single rows) gives each row
    /// exactly what that row gives alone.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        for format in FORMATS {
            let (rows, cols, m) = (53, 64, 15);
            let w = Matrix::new(format, &random(format, rows, cols, 2).0, rows, cols).unwrap();
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
    }

    /// On the calling thread (4 rows) and over the pool (600 rows).
    #[test]
    fn every_kernel_quantizes_activations_alike() {
        for rows in [4, 600] {
            let mut x = activations(rows, 64);
            x[32..64].fill(0.0);
            let want = quantize(&x);
            for k in Kernel::supported() {
                let got = k.quantize(&x, 64);
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!((a.qs, a.d, a.s, a.sum), (b.qs, b.d, b.s, b.sum));
                }
            }
            let zero = &want[1];
            assert!(zero.qs.iter().all(|&q| q == 0) && zero.d == 0.0 && zero.s == 0.0);
            assert_eq!(zero.sum, 0);
        }
    }

    #[test]
    fn embedding_rows_are_the_dequantized_rows() {
        for format in FORMATS {
            let (rows, cols) = (11, 64);
            let (bytes, dense) = random(format, rows, cols, 3);
            let w = Matrix::new(format, &bytes, rows, cols).unwrap();
            let got = w.embedding(&[10, 0, 3]).unwrap();
            for (i, id) in [10, 0, 3].into_iter().enumerate() {
                let (got, want) = (&got[i * cols..][..cols], &dense[id * cols..][..cols]);
                assert_eq!(got, want, "{format:?} row {id}");
            }
            assert!(w.embedding(&[11]).is_err());
        }
    }

    #[test]
    fn bytes_that_are_not_the_matrix_are_refused() {
        for format in FORMATS {
            let bytes = vec![0u8; 2 * format.block_bytes()];
            assert!(Matrix::new(format, &bytes, 2, BLOCK).is_ok());
            assert!(Matrix::new(format, &bytes[1..], 2, BLOCK).is_err());
            assert!(Matrix::new(format, &bytes, 3, BLOCK).is_err());
            assert!(Matrix::new(format, &bytes, 1, BLOCK + 1).is_err());
            assert!(Matrix::new(format, &[], 2, 0).is_err());
            assert!(Matrix::new(format, &bytes, usize::MAX, BLOCK).is_err());
        }
    }
}
