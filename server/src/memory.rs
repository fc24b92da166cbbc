//! How much memory this process may use: its cgroup's limit (v2, then v1), else the machine's;
//! and on a GPU, what is free there.
use crate::cli::Memory;
use candle_core::Device;
use std::path::Path;

/// Bytes the KV-cache pool may take under `setting`, for a model loaded on `device`.
pub fn kv_cache_bytes(setting: Memory, device: &Device) -> u64 {
    let (base, auto) = match gpu_free_bytes(device) {
        Some(free) => (free, 0.8),
        None => (limit_bytes().unwrap_or(0), 0.25),
    };
    match setting {
        Memory::Bytes(b) => b,
        Memory::Fraction(f) => (base as f64 * f) as u64,
        Memory::Auto => (base as f64 * auto) as u64,
    }
}

/// The GPU memory free now (weights loaded, nothing else yet), or None off a GPU.
#[cfg(feature = "cuda")]
fn gpu_free_bytes(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    match cuda.cuda_stream().context().mem_get_info() {
        Ok((free, _total)) => Some(free as u64),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the GPU's free memory");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_free_bytes(_device: &Device) -> Option<u64> {
    None
}

fn limit_bytes() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    // "max" (v2) or a huge number (v1) mean no limit: fall through to the machine's memory.
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&n| n < 1 << 60);
    cgroup.or_else(|| read("/proc/meminfo").and_then(|m| mem_total(&m)))
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mem_total_is_read_in_kibibytes() {
        let m = "MemFree:  10 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(super::mem_total(m), Some(24_576_000 * 1024));
        assert_eq!(super::mem_total("nothing"), None);
    }
}
