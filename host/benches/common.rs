//! What the benchmarks share: reading a process's peak memory.

/// Peak resident memory (VmHWM) of a process, or of this one, in MiB.
pub fn peak_memory_mib(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| {
                    v.split_whitespace()
                        .next()
                        .and_then(|n| n.parse::<f64>().ok())
                })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}
