//! Attention over a paged KV cache. Keys and values live in one pool per layer, in blocks of
//! [`BLOCK_TOKENS`] token slots; a sequence's block table says which. Each step writes the new
//! rows' keys and values into their slots and attends each row against its own sequence only,
//! so a sequence's result never depends on its neighbours: on the CPU in place (`cpu`), on
//! other devices by gathering each sequence's slots.
use crate::model::attention as cpu;

use crate::cli::KernelsArg;
use crate::engine::{BLOCK_TOKENS, Chunk};
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

/// Keys and values of every layer: [slots, kv_heads, head_dim] each.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    blocks: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        blocks: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (blocks * BLOCK_TOKENS, kv_heads, head_dim);
        let zeros = || -> Result<Tensor> {
            match (dtype, device) {
                // candle fills an f16 tensor value by value: seconds for a pool of gigabytes,
                // where zeroed pages from the allocator cost nothing until they are written.
                (DType::F16, Device::Cpu) => Tensor::from_vec(
                    bytemuck::zeroed_vec::<half::f16>(shape.0 * kv_heads * head_dim),
                    shape,
                    device,
                ),
                _ => Tensor::zeros(shape, dtype, device),
            }
        };
        let layers = (0..layers)
            .map(|_| Ok((zeros()?, zeros()?)))
            .collect::<Result<_>>()?;
        Ok(Self { layers, blocks })
    }

    pub fn dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, |(k, _)| k.dtype())
    }
}

/// Where one step's rows go and what they attend to; built once per step, used by every layer.
pub struct Layout {
    /// Slot of each new row.
    write: Vec<u32>,
    /// Slots of every sequence's keys (its cached ones, then the new ones), packed.
    slots: Vec<u32>,
    /// Both as tensors, for candle's operations; None where the CPU kernel works in place.
    tensors: Option<Tensors>,
    spans: Vec<cpu::Span>,
    seqlens_q: Vec<usize>,
    seqlens_k: Vec<usize>,
}

impl Layout {
    pub fn new(
        chunks: &[Chunk<'_>],
        cache: &KvCache,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
        kernels: KernelsArg,
    ) -> Result<Self> {
        let slot = |blocks: &[u32], pos: usize| -> Result<u32> {
            match blocks.get(pos / BLOCK_TOKENS) {
                Some(&b) if (b as usize) < cache.blocks => {
                    Ok(b * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32)
                }
                _ => candle_core::bail!("position {pos} has no block in the KV cache"),
            }
        };
        let (mut write, mut read) = (Vec::new(), Vec::new());
        let (mut seqlens_q, mut seqlens_k, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for c in chunks {
            let end = c.start + c.tokens.len();
            spans.push(cpu::Span {
                q_start: write.len(),
                q_len: c.tokens.len(),
                k_start: read.len(),
                k_len: end,
            });
            for pos in c.start..end {
                write.push(slot(c.blocks, pos)?);
            }
            for pos in 0..end {
                read.push(slot(c.blocks, pos)?);
            }
            seqlens_q.push(c.tokens.len());
            seqlens_k.push(end);
        }
        // kandle's CPU kernel reads an f32 or f16 cache in place.
        let in_place =
            kernels.own_cpu(device, DType::F32) && matches!(cache.dtype(), DType::F32 | DType::F16);
        let tensors = if in_place {
            None
        } else {
            let rows = write.len();
            Some(Tensors {
                write: Tensor::from_vec(write.clone(), (rows, 1, 1), device)?
                    .broadcast_as((rows, kv_heads, head_dim))?
                    .contiguous()?,
                read: Tensor::from_vec(read.clone(), read.len(), device)?,
            })
        };
        Ok(Self {
            write,
            tensors,
            slots: read,
            spans,
            seqlens_q,
            seqlens_k,
        })
    }

    /// Asks for the cache lines that this step's new keys and values of `layer` go to, ahead
    /// of `attend`: written there cold, one line after another missed (0.38 ms of a batched
    /// decode step's 1.6 ms of attention). A no-op where the cache is not read in place.
    pub fn prefetch_writes(&self, cache: &KvCache, layer: usize) {
        if self.tensors.is_some() {
            return;
        }
        for pool in [&cache.layers[layer].0, &cache.layers[layer].1] {
            let (storage, layout) = pool.storage_and_layout();
            let (at, width) = (layout.start_offset(), layout.stride()[0]);
            match &*storage {
                Storage::Cpu(CpuStorage::F32(p)) => {
                    cpu::prefetch_slots(&p[at..], width, width, &self.write)
                }
                Storage::Cpu(CpuStorage::F16(p)) => {
                    cpu::prefetch_slots(&p[at..], width, width, &self.write)
                }
                _ => {}
            }
        }
    }
}

/// q: [rows, heads, head_dim]; k, v: [rows, kv_heads, head_dim]. Returns [rows, heads, head_dim].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &KvCache,
    layer: usize,
    layout: &Layout,
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let (k_pool, v_pool) = &cache.layers[layer];
    let dtype = cache.dtype();
    let out = if let Some(Tensors { write, read }) = &layout.tensors {
        k_pool.scatter_set(write, &k.to_dtype(dtype)?, 0)?;
        v_pool.scatter_set(write, &v.to_dtype(dtype)?, 0)?;
        attend_each(
            q,
            &k_pool.index_select(read, 0)?,
            &v_pool.index_select(read, 0)?,
            &layout.seqlens_q,
            &layout.seqlens_k,
            window,
            scale,
        )?
    } else {
        let write = WriteSlots(&layout.write);
        // f32 rows go into an f16 pool as they are: `WriteSlots` converts them on the way, 8
        // at a time, where candle's `to_dtype` makes a copy converted value by value.
        let rows = |t: &Tensor| match t.dtype() {
            DType::F32 => t.contiguous(),
            _ => t.to_dtype(dtype)?.contiguous(),
        };
        k_pool.inplace_op2(&rows(k)?, &write)?;
        v_pool.inplace_op2(&rows(v)?, &write)?;
        let (rows, heads, dim) = q.dims3()?;
        let kv_heads = k_pool.dim(1)?;
        let q = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (k_storage, k_layout) = k_pool.storage_and_layout();
        let (v_storage, v_layout) = v_pool.storage_and_layout();
        let (k_at, v_at) = (k_layout.start_offset(), v_layout.start_offset());
        let heads = cpu::Heads {
            heads,
            kv_heads,
            dim,
        };
        let out = match (&*k_storage, &*v_storage) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
                in_place(&q, &k[k_at..], &v[v_at..], layout, heads, window, scale)
            }
            (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
                in_place(&q, &k[k_at..], &v[v_at..], layout, heads, window, scale)
            }
            _ => candle_core::bail!("the CPU KV cache is neither f32 nor f16"),
        };
        Tensor::from_vec(out, (rows, heads.heads, dim), &Device::Cpu)?
    };
    out.to_dtype(q.dtype())
}

/// kandle's CPU kernel over the key and value pools where they lie.
fn in_place<T: cpu::Stored>(
    q: &[f32],
    k_pool: &[T],
    v_pool: &[T],
    layout: &Layout,
    heads: cpu::Heads,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    cpu::attend(&cpu::Inputs {
        q,
        q_stride: heads.heads * heads.dim,
        k_pool,
        v_pool,
        kv_stride: heads.kv_heads * heads.dim,
        slots: &layout.slots,
        spans: &layout.spans,
        heads,
        causal: true,
        window,
        scale,
    })
}

/// The index tensors candle's gather and scatter take.
struct Tensors {
    /// `Layout::write` broadcast to [rows, kv_heads, head_dim], for `scatter_set`.
    write: Tensor,
    /// `Layout::slots`, for `index_select`.
    read: Tensor,
}

/// Copies each new row's keys or values [rows, kv_heads, head_dim] into its slot of a CPU
/// pool of the same dtype, or of an f16 pool from f32 rows: what `scatter_set` does, without
/// its index tensor of one slot per value.
struct WriteSlots<'a>(&'a [u32]);

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pool_layout: &candle_core::Layout,
        rows: &CpuStorage,
        rows_layout: &candle_core::Layout,
    ) -> Result<()> {
        let (Some((p0, p1)), Some((r0, r1))) = (
            pool_layout.contiguous_offsets(),
            rows_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("the KV cache and its rows are contiguous");
        };
        let (pool, rows) = match (pool, rows) {
            (CpuStorage::F32(pool), CpuStorage::F32(rows)) => {
                return self.copy(&mut pool[p0..p1], &rows[r0..r1], <[f32]>::copy_from_slice);
            }
            (CpuStorage::F16(pool), CpuStorage::F16(rows)) => {
                return self.copy(&mut pool[p0..p1], &rows[r0..r1], <[_]>::copy_from_slice);
            }
            (CpuStorage::F16(pool), CpuStorage::F32(rows)) => (pool, rows),
            _ => {
                candle_core::bail!("rows for the CPU KV cache are f32 or of its dtype (f32 or f16)")
            }
        };
        self.copy(&mut pool[p0..p1], &rows[r0..r1], |dst, row| {
            dst.convert_from_f32_slice(row)
        })
    }
}

impl WriteSlots<'_> {
    /// `put`s each row into its slot of `pool`.
    fn copy<T, S>(&self, pool: &mut [T], rows: &[S], put: impl Fn(&mut [T], &[S])) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let width = rows.len() / self.0.len();
        if width == 0 || rows.len() != width * self.0.len() {
            candle_core::bail!("{} values for {} slots", rows.len(), self.0.len());
        }
        for (&slot, row) in self.0.iter().zip(rows.chunks_exact(width)) {
            let at = slot as usize * width;
            match pool.get_mut(at..at + width) {
                Some(dst) => put(dst, row),
                None => candle_core::bail!("slot {slot} is outside the KV cache"),
            }
        }
        Ok(())
    }
}

/// Attention one sequence at a time with plain tensor operations: the path for devices
/// without the fused CPU kernel, and the reference the kernel is tested against.
fn attend_each(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    seqlens_q: &[usize],
    seqlens_k: &[usize],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let groups = q.dim(1)? / keys.dim(1)?;
    let (mut q_at, mut k_at) = (0, 0);
    let mut outs = Vec::with_capacity(seqlens_q.len());
    for (&lq, &lk) in seqlens_q.iter().zip(seqlens_k) {
        let qs = q
            .narrow(0, q_at, lq)?
            .transpose(0, 1)?
            .to_dtype(DType::F32)?;
        let expand = |t: &Tensor| -> Result<Tensor> {
            let t = t
                .narrow(0, k_at, lk)?
                .transpose(0, 1)?
                .to_dtype(DType::F32)?;
            let (h, l, d) = t.dims3()?;
            t.unsqueeze(1)?
                .broadcast_as((h, groups, l, d))?
                .reshape((h * groups, l, d))
        };
        let (ks, vs) = (expand(keys)?, expand(values)?);
        let offset = lk - lq;
        let mut scores = (qs.contiguous()?.matmul(&ks.t()?.contiguous()?)? * scale as f64)?;
        // A decoding row sees every key unless a window cuts some: no mask to build and send.
        if lq > 1 || window.is_some_and(|w| lk > w) {
            let mask: Vec<f32> = (0..lq)
                .flat_map(|i| {
                    (0..lk).map(move |j| {
                        let visible = j <= i + offset && window.is_none_or(|w| i + offset - j < w);
                        if visible { 0.0 } else { f32::NEG_INFINITY }
                    })
                })
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (lq, lk), q.device())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&vs.contiguous()?)?.transpose(0, 1)?);
        q_at += lq;
        k_at += lk;
    }
    Tensor::cat(&outs, 0)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU kernel and the plain path agree, with GQA, a window, prefill rows and a decode
    /// row after cached ones, on an f32 and an f16 cache; and a row's result does not change
    /// with its neighbours.
    #[test]
    fn the_cpu_kernel_matches_plain_attention_and_ignores_neighbours() {
        for dtype in [DType::F32, DType::F16] {
            kernel_matches_plain_attention(dtype);
        }
    }

    fn kernel_matches_plain_attention(dtype: DType) {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (9, 3, 64);
        let cache = KvCache::new(1, 8, kv_heads, d, dtype, &dev).unwrap();
        let tokens = [1u32; 40];
        let blocks_a = [3u32, 0, 5];
        let blocks_b = [1u32, 7];
        let blocks_c = [2u32];
        let chunks = [
            Chunk {
                tokens: &tokens[..20],
                start: 0,
                blocks: &blocks_a,
                every_row: false,
            },
            Chunk {
                tokens: &tokens[..3],
                start: 0,
                blocks: &blocks_b,
                every_row: false,
            },
            // Position 5, after five keys an earlier step left in block 2.
            Chunk {
                tokens: &tokens[..1],
                start: 5,
                blocks: &blocks_c,
                every_row: false,
            },
        ];
        let rows = 24;
        let rand = |h| Tensor::randn(0f32, 1.0, (rows, h, d), &dev).unwrap();
        let (q, k, v) = (rand(heads), rand(kv_heads), rand(kv_heads));
        let earlier = Tensor::randn(0f32, 1.0, (5, kv_heads, d), &dev).unwrap();
        let slots = Tensor::new(&[32u32, 33, 34, 35, 36], &dev).unwrap();
        let slots = slots.reshape((5, 1, 1)).unwrap();
        let slots = slots
            .broadcast_as((5, kv_heads, d))
            .unwrap()
            .contiguous()
            .unwrap();
        for pool in [&cache.layers[0].0, &cache.layers[0].1] {
            pool.scatter_set(&slots, &earlier.to_dtype(dtype).unwrap(), 0)
                .unwrap();
        }
        let layout = |chunks: &[Chunk<'_>], kernels| {
            Layout::new(chunks, &cache, kv_heads, d, &dev, kernels).unwrap()
        };
        let (own, portable) = (
            layout(&chunks, KernelsArg::Auto),
            layout(&chunks, KernelsArg::Portable),
        );
        assert!(own.tensors.is_none() && portable.tensors.is_some());
        for window in [None, Some(5)] {
            let fused = attend(&q, &k, &v, &cache, 0, &own, window, 0.3).unwrap();
            let plain = attend(&q, &k, &v, &cache, 0, &portable, window, 0.3).unwrap();
            let diff = crate::model::max_abs_diff(&fused, &plain);
            assert!(diff < 1e-5, "{dtype:?} {window:?}: {diff}");
        }
        // Sequence b alone, decoding one more token after its three: the same rows as
        // among a's, on either path.
        let alone = [Chunk {
            tokens: &tokens[..3],
            start: 0,
            blocks: &blocks_b,
            every_row: false,
        }];
        let (qb, kb, vb) = (
            q.narrow(0, 20, 3).unwrap(),
            k.narrow(0, 20, 3).unwrap(),
            v.narrow(0, 20, 3).unwrap(),
        );
        for (kernels, among) in [(KernelsArg::Auto, &own), (KernelsArg::Portable, &portable)] {
            let together = attend(&q, &k, &v, &cache, 0, among, None, 0.3)
                .unwrap()
                .narrow(0, 20, 3)
                .unwrap();
            let single = layout(&alone, kernels);
            let single = attend(&qb, &kb, &vb, &cache, 0, &single, None, 0.3).unwrap();
            assert_eq!(
                together.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                single.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dtype:?} {kernels:?}"
            );
        }
    }
}
