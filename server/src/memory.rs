//! How much memory this process may use: its cgroup's limit (v2, then v1), else the machine's.
use std::path::Path;

pub fn limit_bytes() -> Option<u64> {
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
