//! How many CPUs this process may keep busy. candle and rayon size their thread pools from the
//! CPUs the process may be scheduled on, not from a cgroup CPU quota, so a pod limited to 2
//! CPUs on a 64-core node would start 64 threads that the quota then throttles. Where there is
//! a quota, it becomes their default.
use std::path::Path;

/// The cgroup's CPU quota in whole CPUs (rounded up), v2 then v1; None when unlimited.
pub fn quota() -> Option<usize> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    read("/sys/fs/cgroup/cpu.max")
        .and_then(|s| parse_v2(&s))
        .or_else(|| {
            let quota = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")?;
            let period = read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")?;
            cpus(quota.trim().parse().ok()?, period.trim().parse().ok()?)
        })
}

/// Sets candle's and rayon's thread counts to the quota, unless the environment already says.
/// Call before any other thread starts: it writes the environment.
#[allow(unsafe_code)]
pub fn size_thread_pools() {
    let Some(n) = quota() else {
        return;
    };
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: no other thread exists yet to read the environment concurrently.
            unsafe { std::env::set_var(var, n.to_string()) };
        }
    }
}

/// `cpu.max`: "QUOTA PERIOD", or "max PERIOD" for none.
fn parse_v2(s: &str) -> Option<usize> {
    let mut parts = s.split_whitespace();
    let quota = parts.next()?.parse().ok()?;
    cpus(quota, parts.next()?.parse().ok()?)
}

/// v1 writes -1 for no quota, which does not parse as unsigned.
fn cpus(quota: u64, period: u64) -> Option<usize> {
    if quota == 0 || period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_round_up_to_whole_cpus_and_max_means_none() {
        assert_eq!(parse_v2("200000 100000\n"), Some(2));
        assert_eq!(parse_v2("50000 100000"), Some(1));
        assert_eq!(parse_v2("150000 100000"), Some(2));
        assert_eq!(parse_v2("max 100000"), None);
        assert_eq!(parse_v2("0 100000"), None);
        assert_eq!(parse_v2(""), None);
    }
}
