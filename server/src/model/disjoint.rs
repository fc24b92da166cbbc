//! One output buffer written by several pool workers at once, each to elements no other
//! writes: how the CPU kernels share out work without a copy per worker.
#![allow(unsafe_code)]

pub struct DisjointOut(*mut f32);

// SAFETY: writers touch disjoint elements (each caller's `write` contract), and the buffer
// outlives the pool's call that uses it.
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// A buffer of `len` elements, each written by `fill` through the `DisjointOut` it gets,
    /// with no zeroing first: a kernel's output zeroed on one thread cost 5% of an encoder's
    /// time while the pool's workers waited.
    ///
    /// # Safety
    /// `fill` writes every element of `0..len` (each write under `write`'s contract).
    pub unsafe fn filled(len: usize, fill: impl FnOnce(&Self)) -> Vec<f32> {
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
    pub unsafe fn write(&self, i: usize, v: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(i), v.len()) }
    }

    /// As `write`, for a length known when compiling: a couple of moves, not a call to
    /// `memcpy` (which cost 5% of decode time when kernels wrote 8 outputs at a time).
    ///
    /// # Safety
    /// As for `write`.
    pub unsafe fn write_array<const N: usize>(&self, i: usize, v: &[f32; N]) {
        unsafe { (self.0.add(i) as *mut [f32; N]).write_unaligned(*v) }
    }
}
