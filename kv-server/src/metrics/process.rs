//! The process' own figures (`process_*`, as every Prometheus client library exports), read
//! from `/proc` at scrape time. Off Linux they are left out.

/// CPU, memory and file descriptors of this process, where the system tells them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Virtual memory in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads this process' figures; `None` where `/proc` is not there.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field numbers per proc(5), counted from the state field (3) at index 0.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        // SAFETY: sysconf only reads configuration values.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds,
            start_time_seconds: boot.unwrap_or(0) as f64 + field(22)? as f64 / ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_cpu_and_files() {
        let Some(stats) = ProcessStats::read() else {
            eprintln!("skipped: no /proc here");
            return;
        };
        assert!(stats.resident_bytes > 1 << 20, "{stats:?}");
        assert!(stats.virtual_bytes >= stats.resident_bytes, "{stats:?}");
        assert!(stats.open_fds >= 3, "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        assert!(stats.start_time_seconds <= now + 1.0, "{stats:?}");
        assert!(stats.start_time_seconds > now - 24.0 * 3600.0, "{stats:?}");
    }
}
