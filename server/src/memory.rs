//! How much memory this process may use: its cgroup's limit (v2, then v1), else the machine's;
//! and on a GPU, what is free there.
use crate::cli::Memory;
use candle_core::Device;
use std::path::Path;

/// A KV-cache pool that cannot fit beside the loaded model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MemoryError {
    #[error(
        "--kv-cache-memory asks for {} but the loaded model takes {} of the {} memory limit: at most {} fit beside it (a tenth of the limit is kept for the rest)",
        mib(*.wanted), mib(*.resident), mib(*.limit), mib(*.room)
    )]
    TooBig {
        wanted: u64,
        resident: u64,
        limit: u64,
        room: u64,
    },
    #[error(
        "the loaded model takes {} of the {} memory limit, which leaves no room for a KV cache; raise the limit",
        mib(*.resident), mib(*.limit)
    )]
    NoRoom { resident: u64, limit: u64 },
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Bytes the KV-cache pool may take under `setting`, for a model loaded on `device`.
pub fn kv_cache_bytes(setting: Memory, device: &Device) -> Result<u64, MemoryError> {
    if let Some(free) = gpu_free_bytes(device) {
        return Ok(match setting {
            Memory::Bytes(b) => b,
            Memory::Fraction(f) => (free as f64 * f) as u64,
            Memory::Auto => (free as f64 * 0.8) as u64,
        });
    }
    let limit = limit_bytes().unwrap_or(0);
    match resident_bytes() {
        Some(resident) => fit_beside_weights(setting, limit, resident),
        None => Ok(asked(setting, limit)),
    }
}

/// What `setting` asks of a CPU `limit`: a quarter of it by default.
fn asked(setting: Memory, limit: u64) -> u64 {
    match setting {
        Memory::Bytes(b) => b,
        Memory::Fraction(f) => (limit as f64 * f) as u64,
        Memory::Auto => limit / 4,
    }
}

/// On the CPU the weights are already in memory when the pool is sized (a GGUF Q5 model
/// takes half again its file's size): the pool gets what `setting` asks where that fits
/// beside the `resident` bytes and a tenth of the limit for activations and buffers; `auto`
/// shrinks to what fits, and an explicit size that cannot fit is an error, not an
/// out-of-memory kill once the cache fills.
fn fit_beside_weights(setting: Memory, limit: u64, resident: u64) -> Result<u64, MemoryError> {
    let wanted = asked(setting, limit);
    let room = limit.saturating_sub(resident.saturating_add(limit / 10));
    match setting {
        _ if wanted <= room => Ok(wanted),
        Memory::Auto if room > 0 => {
            tracing::warn!(
                kv_cache_bytes = room,
                resident_bytes = resident,
                limit_bytes = limit,
                "the model leaves less than a quarter of the memory limit; the KV cache takes what is left"
            );
            Ok(room)
        }
        Memory::Auto => Err(MemoryError::NoRoom { resident, limit }),
        Memory::Bytes(_) | Memory::Fraction(_) => Err(MemoryError::TooBig {
            wanted,
            resident,
            limit,
            room,
        }),
    }
}

/// This process's resident memory (`VmRSS`), weights included once loaded.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
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
    cgroup.or_else(|| read("/proc/meminfo").and_then(|m| kib_field(&m, "MemTotal:")))
}

/// A `/proc` line's value in kB, as bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_in_kibibytes() {
        let m = "MemFree:  10 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(kib_field(m, "MemTotal:"), Some(24_576_000 * 1024));
        assert_eq!(kib_field("nothing", "MemTotal:"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_pool_fits_beside_the_weights() {
        // Small weights: what was asked.
        let fit = |s, resident| fit_beside_weights(s, 8 * GIB, resident);
        assert_eq!(fit(Memory::Auto, GIB), Ok(2 * GIB));
        assert_eq!(fit(Memory::Bytes(3 * GIB), GIB), Ok(3 * GIB));
        assert_eq!(fit(Memory::Fraction(0.5), GIB), Ok(4 * GIB));
        // Weights of 6 GiB under 8: auto takes what is left past a tenth of the limit.
        let room = 8 * GIB - 6 * GIB - 8 * GIB / 10;
        assert_eq!(fit(Memory::Auto, 6 * GIB), Ok(room));
        // An explicit size that does not fit is refused, naming the numbers.
        let err = fit(Memory::Bytes(2 * GIB), 6 * GIB).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--kv-cache-memory asks for 2048 MiB but the loaded model takes 6144 MiB of the \
             8192 MiB memory limit: at most 1228 MiB fit beside it (a tenth of the limit is \
             kept for the rest)"
        );
        assert!(matches!(
            fit(Memory::Fraction(0.3), 6 * GIB),
            Err(MemoryError::TooBig { .. })
        ));
        // Weights that fill the limit leave nothing.
        assert_eq!(
            fit(Memory::Auto, 8 * GIB),
            Err(MemoryError::NoRoom {
                resident: 8 * GIB,
                limit: 8 * GIB
            })
        );
    }
}
