//! What a run is asked to do: where, how hard, for how long, and the sizes of each workload.

use std::time::Duration;

use crate::error::Error;

/// The settings every workload of a run shares. [`Settings::default`] is the reference setup
/// of the issue the tool was written for: 8 connections, 64 requests in flight, 256-byte
/// values, 3 s per workload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `host:port` of every member; each connection starts on a different one.
    pub endpoints: Vec<String>,
    /// Separate clients (each one HTTP/2 connection) the requests are spread over.
    pub connections: usize,
    /// Requests in flight in total (closed loop: each answer sends the next request).
    pub in_flight: usize,
    /// Bytes per value written.
    pub value_size: usize,
    /// Length of each workload's timed window.
    pub duration: Duration,
    /// Stop each workload after this many operations instead of after `duration` (smoke runs).
    pub ops: Option<u64>,
    /// Processes whose CPU time and RSS are measured over each window (the server's members).
    pub server_pids: Vec<u32>,
    /// Keys the put and get workloads cycle over.
    pub keys: usize,
    /// Keys the compare-and-swap workload contends on.
    pub hot_keys: usize,
    /// Watchers of the watch workloads.
    pub watchers: usize,
    /// Concurrent writers of `watch-distinct`.
    pub watch_writers: usize,
    /// Leases `lease-keepalive` renews.
    pub leases: usize,
    /// Keys under the prefix `range` reads whole.
    pub range_keys: usize,
    /// No progress lines (result lines are still printed).
    pub quiet: bool,
    /// Leave each workload's keys in place afterwards: for a deployment thrown away after the
    /// run (the memory probes), where deleting a million keys in one request only timed etcd
    /// out and lost the probe's figure.
    pub keep_keys: bool,
    /// A user and password for a server with auth on: every client authenticates and its
    /// requests are checked (the cost of permission checks is then in the figures).
    pub credentials: Option<kv_client::Credentials>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".into()],
            connections: 8,
            in_flight: 64,
            value_size: 256,
            duration: Duration::from_secs(3),
            ops: None,
            server_pids: Vec::new(),
            keys: 1000,
            hot_keys: 16,
            watchers: 1000,
            watch_writers: 16,
            leases: 1000,
            range_keys: 10_000,
            quiet: false,
            keep_keys: false,
            credentials: None,
        }
    }
}

/// Watch values carry a sequence number and a send time, 8 bytes each.
pub const MIN_VALUE_SIZE: usize = 16;

impl Settings {
    /// The options every client of the run connects with.
    pub fn client_options(&self) -> kv_client::ClientOptions {
        kv_client::ClientOptions {
            credentials: self.credentials.clone(),
            ..kv_client::ClientOptions::default()
        }
    }

    /// Refuses settings no workload can run with.
    pub fn check(&self) -> Result<(), Error> {
        let positive = [
            ("--connections", self.connections),
            ("--in-flight", self.in_flight),
            ("--keys", self.keys),
            ("--hot-keys", self.hot_keys),
            ("--watchers", self.watchers),
            ("--watch-writers", self.watch_writers),
            ("--leases", self.leases),
            ("--range-keys", self.range_keys),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Settings(format!("{flag} must be at least 1")));
        }
        if self.endpoints.is_empty() {
            return Err(Error::Settings("no endpoint given".into()));
        }
        if self.value_size < MIN_VALUE_SIZE {
            return Err(Error::Settings(format!(
                "--value-size must be at least {MIN_VALUE_SIZE} (watch values carry a sequence number and a send time)"
            )));
        }
        if self.watch_writers > self.watchers {
            return Err(Error::Settings(
                "--watch-writers must not exceed --watchers (each writer owns keys)".into(),
            ));
        }
        if self.ops == Some(0) {
            return Err(Error::Settings("--ops must be at least 1".into()));
        }
        if self.duration.is_zero() && self.ops.is_none() {
            return Err(Error::Settings("--duration must be positive".into()));
        }
        Ok(())
    }
}

/// Parses a duration as `3s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with an optional unit (ms, s, m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_reference_settings_are_valid_and_bad_ones_are_refused() {
        assert!(Settings::default().check().is_ok());
        let bad = [
            Settings {
                connections: 0,
                ..Settings::default()
            },
            Settings {
                value_size: 8,
                ..Settings::default()
            },
            Settings {
                watchers: 4,
                watch_writers: 5,
                ..Settings::default()
            },
            Settings {
                endpoints: vec![],
                ..Settings::default()
            },
        ];
        for s in bad {
            assert!(s.check().is_err(), "{s:?}");
        }
    }
}
