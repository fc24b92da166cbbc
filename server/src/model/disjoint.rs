//! One output buffer written by several pool workers at once, each to elements no other
//! writes: how the CPU kernels share out work without a copy per worker.
#![allow(unsafe_code)]

pub struct DisjointOut<T = f32>(*mut T);

// SAFETY: writers touch disjoint elements (each caller's `write` contract), and the buffer
// outlives the pool's call that uses it.
unsafe impl<T: Send> Sync for DisjointOut<T> {}

impl<T: Copy> DisjointOut<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// A buffer of `len` elements, each written by `fill` through the `DisjointOut` it gets,
    /// with no zeroing first: a kernel's output zeroed on one thread cost 5% of an encoder's
    /// time while the pool's workers waited.
    ///
    /// # Safety
    /// `fill` writes every element of `0..len` (each write under `write`'s contract).
    pub unsafe fn filled(len: usize, fill: impl FnOnce(&Self)) -> Vec<T> {
        let mut buf = Vec::with_capacity(len);
        fill(&Self(buf.as_mut_ptr()));
        // SAFETY: `fill` initialised every element (this function's contract); had it
        // panicked, `buf` would be dropped empty.
        unsafe { buf.set_len(len) };
        buf
    }

    /// Copies `v` to elements `i..i + v.len()`.
    ///
    /// # Safety
    /// The range is inside the buffer, no other thread writes it during the pool's call, and
    /// the buffer is alive and not otherwise borrowed until that call returns.
    pub unsafe fn write(&self, i: usize, v: &[T]) {
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(i), v.len()) }
    }

    /// As `write`, for a length known when compiling: a couple of moves, not a call to
    /// `memcpy` (which cost 5% of decode time when kernels wrote 8 outputs at a time).
    ///
    /// # Safety
    /// As for `write`.
    pub unsafe fn write_array<const N: usize>(&self, i: usize, v: &[T; N]) {
        unsafe { (self.0.add(i) as *mut [T; N]).write_unaligned(*v) }
    }
}

/// Values below which a row-wise kernel works on the calling thread: waking the pool costs
/// more than a decode step's few rows take.
pub const INLINE_VALUES: usize = 1 << 15;

/// `rows` rows of `width` values, row `r` written by `f(r, row)`: on the calling thread when
/// they are few, else shared out over candle's barrier pool (the threads that run the
/// matmuls, so no second pool competes with them for the cores).
pub fn each_row(rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if rows * width < INLINE_VALUES {
        let mut out = vec![0f32; rows * width];
        for (r, row) in out.chunks_exact_mut(width.max(1)).enumerate() {
            f(r, row);
        }
        return out;
    }
    let fill = |dst: &DisjointOut| {
        candle_core::utils::barrier_pool().execute_chunked(rows, |items| {
            let mut row = vec![0f32; width];
            for r in items {
                f(r, &mut row);
                // SAFETY: row `r` is written by this item alone.
                unsafe { dst.write(r * width, &row) };
            }
        });
    };
    // SAFETY: the items cover rows 0..rows, each writing its whole row.
    unsafe { DisjointOut::filled(rows * width, fill) }
}
