//! glibc's allocator set up for an engine that allocates and frees the same few megabytes of
//! activations every step. By default glibc maps blocks past a threshold that it adjusts as
//! they are freed, and gives free memory at the top of a heap back to the kernel, so a step
//! could fault in fresh pages for buffers the step before had just freed: page faults were
//! 2.5% of a prefill profile, and a change of 20 bytes in a buffer's element size made a
//! 256-token prefill 40% slower. Fixed thresholds keep freed buffers for the next step.
#![allow(unsafe_code)]

/// Blocks up to this size come from a heap, not a mapping of their own (glibc's ceiling on
/// 64-bit Linux).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of a heap kept for reuse: twice the largest block kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Sets the thresholds (on glibc; other C libraries keep theirs).
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters, under its own lock; glibc
    // refuses only values out of range, which these are not.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
