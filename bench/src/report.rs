//! Results: one [`WorkloadResult`] per workload, printed as one line and written as JSON.
//!
//! The JSON of a run is an array of result objects. Field names are stable (scripts read
//! them); a field is only ever added. Rates are per second of the timed window, latencies in
//! milliseconds, CPU in microseconds per operation; `null` means "not measured".

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::stats::Histogram;

/// Latency percentiles of one workload, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest operation.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The percentiles of `h`.
    pub fn of(h: &Histogram) -> Latency {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        Latency {
            p50: ms(h.quantile(0.50)),
            p90: ms(h.quantile(0.90)),
            p99: ms(h.quantile(0.99)),
            max: ms(h.max()),
            mean: ms(h.mean()),
        }
    }
}

/// What one workload measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    /// The workload's name (`put`, `watch-fanout`, ...).
    pub workload: String,
    /// What `ops` counts: `puts`, `gets`, `commits`, `events`, `grants`, `keep-alives`,
    /// `revokes`, `reads`.
    pub unit: String,
    /// The endpoints the run was given.
    pub endpoints: Vec<String>,
    /// Clients (connections) the requests were spread over.
    pub connections: usize,
    /// Requests in flight during the window.
    pub in_flight: usize,
    /// Bytes per value written.
    pub value_size: usize,
    /// Length of the timed window, in seconds.
    pub seconds: f64,
    /// Operations completed in the window, in `unit`s.
    pub ops: u64,
    /// `ops` per second of the window.
    pub ops_per_sec: f64,
    /// Requests that failed in the window (the run went on).
    pub errors: u64,
    /// The first few failures, as the client worded them.
    pub error_samples: Vec<String>,
    /// Latency of each operation (for watches: from the put being sent to its event arriving).
    pub latency_ms: Latency,
    /// The server's CPU time per operation, when its PIDs were given.
    pub server_cpu_us_per_op: Option<f64>,
    /// The server's resident memory at the end of the window, when its PIDs were given.
    pub server_rss_kib: Option<u64>,
    /// This tool's own CPU time per operation (kv-client included).
    pub client_cpu_us_per_op: Option<f64>,
    /// Whether every check of the answers held (see `failures`).
    pub passed: bool,
    /// Checks that did not hold: wrong values, missed, repeated or reordered events, ...
    pub failures: Vec<String>,
    /// Workload-specific figures (`attempts`, `conflicts`, `puts_per_sec`, `mb_per_sec`, ...).
    pub details: BTreeMap<String, f64>,
}

impl WorkloadResult {
    /// The result line: rate, latency, errors, CPU and RSS when measured, and why it failed.
    pub fn line(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "{:<17} {:>10.0} {}/s  p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms  errors {}",
            self.workload, self.ops_per_sec, self.unit, l.p50, l.p90, l.p99, l.max, self.errors
        );
        if let Some(cpu) = self.server_cpu_us_per_op {
            out += &format!("  server {} µs/op", cpu_us(cpu));
        }
        if let Some(kib) = self.server_rss_kib {
            out += &format!(" rss {:.1} MiB", kib as f64 / 1024.0);
        }
        if let Some(cpu) = self.client_cpu_us_per_op {
            out += &format!("  client {} µs/op", cpu_us(cpu));
        }
        let details: Vec<String> = self
            .details
            .iter()
            .map(|(k, v)| format!("{k} {}", number(*v)))
            .collect();
        if !details.is_empty() {
            out += &format!("  ({})", details.join(", "));
        }
        if !self.passed {
            out += &format!("  FAILED: {}", self.failures.join("; "));
        }
        out
    }
}

/// CPU microseconds per operation: two decimals below 10 µs, where a watch event's share
/// lies and one decimal would hide a third of the difference between two servers (the
/// tick-based CPU reading over a 3 s run is good to about half a percent), one above.
pub fn cpu_us(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A figure as a person reads it: whole numbers without decimals.
fn number(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes `results` to `path` as a pretty-printed JSON array.
pub fn write_json<T: Serialize>(path: &Path, results: &[T]) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(results)?;
    text.push('\n');
    std::fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkloadResult {
        let mut h = Histogram::new();
        for us in [500, 700, 900, 1200] {
            h.record(std::time::Duration::from_micros(us));
        }
        WorkloadResult {
            workload: "cas".into(),
            unit: "commits".into(),
            endpoints: vec!["127.0.0.1:2379".into()],
            connections: 8,
            in_flight: 64,
            value_size: 256,
            seconds: 3.0,
            ops: 2667,
            ops_per_sec: 889.0,
            errors: 0,
            error_samples: vec![],
            latency_ms: Latency::of(&h),
            server_cpu_us_per_op: Some(123.4),
            server_rss_kib: Some(20480),
            client_cpu_us_per_op: Some(45.6),
            passed: true,
            failures: vec![],
            details: BTreeMap::from([("attempts".into(), 9000.0), ("conflicts".into(), 6333.0)]),
        }
    }

    /// Scripts read these names: renaming one is a breaking change.
    #[test]
    fn json_field_names_are_stable() {
        let v = serde_json::to_value(sample()).expect("to json");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "client_cpu_us_per_op",
                "connections",
                "details",
                "endpoints",
                "error_samples",
                "errors",
                "failures",
                "in_flight",
                "latency_ms",
                "ops",
                "ops_per_sec",
                "passed",
                "seconds",
                "server_cpu_us_per_op",
                "server_rss_kib",
                "unit",
                "value_size",
                "workload",
            ]
        );
        let mut latency: Vec<&str> = v["latency_ms"]
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        latency.sort_unstable();
        assert_eq!(latency, ["max", "mean", "p50", "p90", "p99"]);
        assert_eq!(v["details"]["conflicts"], 6333.0);
        assert_eq!(v["ops_per_sec"], 889.0);
    }

    #[test]
    fn unmeasured_figures_are_null_and_results_read_back() {
        let mut r = sample();
        r.server_cpu_us_per_op = None;
        r.server_rss_kib = None;
        let text = serde_json::to_string(&[r.clone()]).expect("to json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert!(v[0]["server_cpu_us_per_op"].is_null());
        assert!(v[0]["server_rss_kib"].is_null());
        let back: Vec<WorkloadResult> = serde_json::from_str(&text).expect("read back");
        assert_eq!(back, [r]);
    }

    #[test]
    fn the_result_line_says_rate_latency_cpu_and_failures() {
        let mut r = sample();
        let line = r.line();
        assert!(line.starts_with("cas"), "{line}");
        assert!(line.contains("889 commits/s"), "{line}");
        assert!(line.contains("server 123.4 µs/op rss 20.0 MiB"), "{line}");
        assert!(line.contains("attempts 9000"), "{line}");
        assert!(!line.contains("FAILED"), "{line}");
        r.passed = false;
        r.failures = vec!["watcher 3: put 7 missed".into()];
        assert!(r.line().ends_with("FAILED: watcher 3: put 7 missed"));
    }

    #[test]
    fn cpu_below_ten_microseconds_keeps_two_decimals() {
        assert_eq!(cpu_us(1.234), "1.23");
        assert_eq!(cpu_us(0.9), "0.90");
        assert_eq!(cpu_us(56.78), "56.8");
        let mut r = sample();
        r.server_cpu_us_per_op = Some(1.044);
        r.client_cpu_us_per_op = Some(1.3);
        let line = r.line();
        assert!(line.contains("server 1.04 µs/op"), "{line}");
        assert!(line.contains("client 1.30 µs/op"), "{line}");
    }
}
