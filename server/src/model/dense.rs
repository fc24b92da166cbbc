//! f32 `act(x · Wᵀ + b)` on the CPU, for the encoders' linear layers. candle multiplies through
//! the `gemm` crate, which packs both operands on every call, then adds the bias and applies
//! the activation in passes of their own over the output (the activation on one thread).
//! Here the weights are packed once, at load, into panels of 16 output columns stored
//! k-major, so a tile of 6 rows by 16 columns is 12 AVX2 registers fed by two loads and six
//! broadcasts per step of k, starting from the bias. Work items are (48 rows, 4 panels)
//! blocks shared out by candle's barrier pool: a block's rows stay in L2 while each panel
//! streams through L1, and a batch of few rows still splits across cores by panel. An
//! activation after the layer is applied as each tile is written, on every core.
//!
//! Each output is its row's dot product summed in order of k from the bias, whatever the
//! tile or batch, so a sequence's outputs do not depend on its neighbours. AVX2 with FMA is
//! chosen at run time, as for the quantized kernels; a portable loop over the same layout
//! serves other CPUs.
#![allow(unsafe_code)]
use super::disjoint::DisjointOut;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Output columns per panel: two 256-bit registers.
const NR: usize = 16;
/// Rows per tile: 6 × 2 accumulators, 2 weight vectors and a broadcast fill 15 of 16 registers.
const MR: usize = 6;
const ROWS_PER_ITEM: usize = 8 * MR;
const PANELS_PER_ITEM: usize = 4;

pub struct Dense {
    /// Panel `p` holds, for each of `cols` steps of k, the 16 weights of output columns
    /// `16p..16p + 16` (zero past `rows`).
    packed: Vec<f32>,
    bias: Vec<f32>,
    rows: usize,
    cols: usize,
    /// Applied in place to each tile's values: a loop the compiler vectorises, not a call
    /// per value.
    activation: Option<fn(&mut [f32])>,
}

impl Dense {
    /// From a linear layer's `weight` [rows, cols] and `bias` [rows], and the activation
    /// that follows it.
    pub fn new(weight: &Tensor, bias: &Tensor, activation: Option<fn(&mut [f32])>) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut bias: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
        if bias.len() != rows {
            candle_core::bail!("a bias of {} for {rows} outputs", bias.len());
        }
        let panels = rows.div_ceil(NR);
        let mut packed = vec![0f32; panels * cols * NR];
        for (r, row) in w.chunks_exact(cols.max(1)).enumerate() {
            let panel = &mut packed[(r / NR) * cols * NR..];
            for (c, &v) in row.iter().enumerate() {
                panel[c * NR + r % NR] = v;
            }
        }
        bias.resize(panels * NR, 0.0);
        Ok(Self {
            packed,
            bias,
            rows,
            cols,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let panels = n.div_ceil(NR);
        let groups = panels.div_ceil(PANELS_PER_ITEM);
        let avx2 = super::decoder::quant::avx2();
        let fill = |dst: &DisjointOut| {
            candle_core::utils::barrier_pool().execute_chunked(
                m.div_ceil(ROWS_PER_ITEM) * groups,
                |items| {
                    for item in items {
                        let (block, group) = (item / groups, item % groups);
                        let rows = block * ROWS_PER_ITEM..m.min((block + 1) * ROWS_PER_ITEM);
                        for p in group * PANELS_PER_ITEM..panels.min((group + 1) * PANELS_PER_ITEM)
                        {
                            let panel = &self.packed[p * k * NR..(p + 1) * k * NR];
                            let bias: &[f32; NR] = self.bias[p * NR..(p + 1) * NR]
                                .try_into()
                                .expect("the bias is padded to whole panels");
                            let width = NR.min(n - p * NR);
                            let mut r = rows.start;
                            while r < rows.end {
                                let t = MR.min(rows.end - r);
                                let mut tile =
                                    tile(avx2, t, &x[r * k..(r + t) * k], k, panel, bias);
                                if let Some(f) = self.activation {
                                    f(tile[..t].as_flattened_mut());
                                }
                                for (i, row) in tile[..t].iter().enumerate() {
                                    let at = (r + i) * n + p * NR;
                                    // SAFETY: each (row, column) belongs to exactly one work
                                    // item, and the buffer outlives the pool's call.
                                    unsafe {
                                        if width == NR {
                                            dst.write_array(at, row);
                                        } else {
                                            dst.write(at, &row[..width]);
                                        }
                                    }
                                }
                                r += t;
                            }
                        }
                    }
                },
            );
        };
        // SAFETY: the work items' (rows, panels) blocks cover every output.
        unsafe { DisjointOut::filled(m * n, fill) }
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows(
            self.name(),
            storage,
            layout,
            self.cols,
            self.rows,
            |x, m| self.matmul(x, m),
        )
    }
}

/// A CPU op taking contiguous f32 rows of `cols` (any leading dimensions) to rows of `rows`,
/// as a matrix product does: checks the input and gives `f` the rows and their count.
pub fn map_rows(
    name: &str,
    storage: &CpuStorage,
    layout: &Layout,
    cols: usize,
    rows: usize,
    f: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{name} takes contiguous f32 activations");
    };
    let mut dims = layout.dims().to_vec();
    if dims.last() != Some(&cols) || cols == 0 {
        candle_core::bail!("{name}: activations {dims:?} against a [{rows}, {cols}] matrix");
    }
    let x = &data[start..end];
    let out = f(x, x.len() / cols);
    *dims.last_mut().expect("checked above") = rows;
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

type Tile = [[f32; NR]; MR];

/// `bias + x · panel` for the `t` rows of `x` (t ≤ MR); rows past `t` are zero.
fn tile(avx2: bool, t: usize, x: &[f32], k: usize, panel: &[f32], bias: &[f32; NR]) -> Tile {
    assert!(x.len() == t * k && panel.len() == k * NR && (1..=MR).contains(&t));
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA; lengths asserted above.
        return unsafe {
            match t {
                6 => avx2::tile::<6>(x, k, panel, bias),
                5 => avx2::tile::<5>(x, k, panel, bias),
                4 => avx2::tile::<4>(x, k, panel, bias),
                3 => avx2::tile::<3>(x, k, panel, bias),
                2 => avx2::tile::<2>(x, k, panel, bias),
                _ => avx2::tile::<1>(x, k, panel, bias),
            }
        };
    }
    portable(t, x, k, panel, bias)
}

fn portable(t: usize, x: &[f32], k: usize, panel: &[f32], bias: &[f32; NR]) -> Tile {
    let mut tile = [[0f32; NR]; MR];
    for (acc, row) in tile.iter_mut().zip(x.chunks_exact(k)).take(t) {
        *acc = *bias;
        for (&a, w) in row.iter().zip(panel.chunks_exact(NR)) {
            for (o, &w) in acc.iter_mut().zip(w) {
                *o += a * w;
            }
        }
    }
    tile
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR, Tile};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `R` rows of `k`, `panel` `k` steps of `NR`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[f32],
        bias: &[f32; NR],
    ) -> Tile {
        let (xp, wp) = (x.as_ptr(), panel.as_ptr());
        unsafe {
            let b = [
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            ];
            let mut acc = [b; R];
            for kk in 0..k {
                let w0 = _mm256_loadu_ps(wp.add(kk * NR));
                let w1 = _mm256_loadu_ps(wp.add(kk * NR + 8));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*xp.add(i * k + kk));
                    acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
                }
            }
            let mut tile = [[0f32; NR]; MR];
            for (out, acc) in tile.iter_mut().zip(acc) {
                _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
            }
            tile
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(x: &[f32], w: &[f32], b: &[f32], k: usize) -> Vec<f64> {
        x.chunks_exact(k)
            .flat_map(|row| {
                w.chunks_exact(k).zip(b).map(move |(wr, &b)| {
                    f64::from(b)
                        + row
                            .iter()
                            .zip(wr)
                            .map(|(&a, &w)| f64::from(a) * f64::from(w))
                            .sum::<f64>()
                })
            })
            .collect()
    }

    /// Shapes with ragged tiles, panels and work items, against f64 arithmetic, through every
    /// kernel this CPU runs.
    #[test]
    fn products_match_exact_arithmetic_on_ragged_shapes() {
        for (m, n, k) in [(1, 1, 1), (7, 17, 5), (53, 70, 33), (100, 384, 96)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let dense = Dense::new(&w, &b, None).unwrap();
            let expected = reference(
                &x.flatten_all().unwrap().to_vec1().unwrap(),
                &w.flatten_all().unwrap().to_vec1().unwrap(),
                &b.to_vec1().unwrap(),
                k,
            );
            let got: Vec<f32> = dense
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), m * n);
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(&g, &e)| (f64::from(g) - e).abs())
                .fold(0f64, f64::max);
            assert!(worst < 1e-4, "({m}, {n}, {k}): off by {worst}");
            // The portable loop over the same layout.
            let tile = portable(
                1,
                &x.flatten_all().unwrap().to_vec1().unwrap()[..k],
                k,
                &dense.packed[..k * NR],
                dense.bias[..NR].try_into().unwrap(),
            );
            for (j, &v) in tile[0].iter().take(n.min(NR)).enumerate() {
                assert!((f64::from(v) - expected[j]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (n, k) = (40, 64);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let dense = Dense::new(&w, &b, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (101, k), &Device::Cpu).unwrap();
        let all = dense.forward(&x).unwrap();
        for r in [0, 5, 6, 47, 48, 100] {
            let alone = dense.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
            let among = all.narrow(0, r, 1).unwrap();
            assert_eq!(crate::model::max_abs_diff(&alone, &among), 0.0, "row {r}");
        }
    }

    #[test]
    fn the_activation_applies_to_every_output() {
        let w = Tensor::randn(0f32, 1.0, (20, 8), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 20, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (9, 8), &Device::Cpu).unwrap();
        let plain = Dense::new(&w, &b, None).unwrap().forward(&x).unwrap();
        let relu = Dense::new(
            &w,
            &b,
            Some(|xs: &mut [f32]| xs.iter_mut().for_each(|v| *v = v.max(0.0))),
        )
        .unwrap()
        .forward(&x)
        .unwrap();
        assert_eq!(
            crate::model::max_abs_diff(&plain.relu().unwrap(), &relu),
            0.0
        );
        assert!(plain.min_all().unwrap().to_scalar::<f32>().unwrap() < 0.0);
    }

    #[test]
    fn activations_of_the_wrong_width_are_refused() {
        let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let dense = Dense::new(&w, &bias, None).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(
            dense
                .forward(&x)
                .unwrap_err()
                .to_string()
                .contains("[4, 3]")
        );
    }
}
