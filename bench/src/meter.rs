//! CPU time and memory over a timed window, from `/proc`: this process's, and the server's
//! when its PIDs are given (summed over the members of a cluster).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kv_tests::procfs::{clock_ticks_per_second, cpu_ticks, rss_kib};

use crate::error::Error;

/// Clock ticks per second, asked once (it runs `getconf`).
fn hz() -> f64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(clock_ticks_per_second) as f64
}

fn ticks(pid: u32) -> Result<u64, Error> {
    cpu_ticks(pid).map_err(Error::Process)
}

/// Readings taken when a window opened. `/proc` counts CPU time in clock ticks (10 ms), so a
/// window should last long enough for the server to spend many of them.
#[derive(Debug)]
pub struct Meter {
    servers: Vec<u32>,
    opened: Instant,
    client_ticks: u64,
    server_ticks: Option<u64>,
}

/// What a window measured.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Wall time from opening to closing.
    pub wall: Duration,
    /// CPU seconds this process spent.
    pub client_cpu: f64,
    /// CPU seconds the server processes spent together, if any were given.
    pub server_cpu: Option<f64>,
    /// Their resident memory at the close, in KiB, summed.
    pub server_rss_kib: Option<u64>,
}

impl Meter {
    /// Takes the opening readings.
    pub fn open(servers: &[u32]) -> Result<Meter, Error> {
        let server_ticks = if servers.is_empty() {
            None
        } else {
            Some(
                servers
                    .iter()
                    .map(|&p| ticks(p))
                    .sum::<Result<u64, Error>>()?,
            )
        };
        Ok(Meter {
            servers: servers.to_vec(),
            client_ticks: ticks(std::process::id())?,
            server_ticks,
            opened: Instant::now(),
        })
    }

    /// Takes the closing readings.
    pub fn close(&self) -> Result<Usage, Error> {
        let wall = self.opened.elapsed();
        let client = ticks(std::process::id())?;
        let (server_cpu, server_rss_kib) = match self.server_ticks {
            None => (None, None),
            Some(then) => {
                let now = self
                    .servers
                    .iter()
                    .map(|&p| ticks(p))
                    .sum::<Result<u64, Error>>()?;
                let rss = self
                    .servers
                    .iter()
                    .map(|&p| rss_kib(p).map_err(Error::Process))
                    .sum::<Result<u64, Error>>()?;
                (Some(now.saturating_sub(then) as f64 / hz()), Some(rss))
            }
        };
        Ok(Usage {
            wall,
            client_cpu: client.saturating_sub(self.client_ticks) as f64 / hz(),
            server_cpu,
            server_rss_kib,
        })
    }
}

/// Microseconds of `cpu_seconds` per one of `count` operations (`None` without operations).
pub fn micros_per(cpu_seconds: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| cpu_seconds * 1e6 / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_metered() {
        let me = std::process::id();
        let meter = Meter::open(&[me]).expect("open");
        // Burn a little CPU so that the window is not empty.
        let mut x = 0u64;
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let usage = meter.close().expect("close");
        assert!(usage.wall >= Duration::from_millis(50));
        assert!(usage.server_rss_kib.is_some_and(|kib| kib > 0));
        assert!(usage.server_cpu.is_some());
        assert!(x > 0);
    }

    #[test]
    fn per_operation_cost() {
        assert_eq!(micros_per(0.5, 1000), Some(500.0));
        assert_eq!(micros_per(0.5, 0), None);
    }
}
