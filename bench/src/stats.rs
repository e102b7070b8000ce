//! Latency statistics: a fixed-size log-linear histogram that every operation of a run can be
//! counted in, and the median used to summarise several runs.

use std::time::Duration;

/// Sub-buckets per power of two, as a number of bits: 64 sub-buckets keep every reading within
/// 1/64 (1.6 %) of its true value.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets needed to cover every `u64`: exact values below `SUB`, then `SUB` per power of two.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

/// Durations in nanoseconds, counted in log-linear buckets: exact below 64 ns, then 64
/// buckets per power of two. Fixed size (30 KiB) however many values it counts, so each worker
/// keeps one and they are merged at the end; the exact maximum and sum are kept beside.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        // `ns >> shift` is in [SUB, 2 SUB).
        let shift = 63 - ns.leading_zeros() - SUB_BITS;
        ((u64::from(shift) + 1) * SUB + (ns >> shift) - SUB) as usize
    }

    /// The smallest value of bucket `i` (saturating for the end of the last bucket).
    fn low(i: usize) -> u64 {
        let (b, r) = (i as u64 / SUB, i as u64 % SUB);
        if b == 0 {
            r
        } else {
            (SUB + r).saturating_mul(1 << (b - 1))
        }
    }

    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.record_ns(ns);
    }

    /// Counts one duration given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0 < q <= 1): the middle of the bucket holding the value of rank
    /// ceil(q * count), never above the largest value counted; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = (Self::low(i), Self::low(i + 1));
                let mid = lo + (hi - lo) / 2;
                return Duration::from_nanos(mid.min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    /// The largest duration counted.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The mean of the durations counted; zero when empty.
    pub fn mean(&self) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let ns = self.sum_ns / u128::from(self.total);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` when
/// empty. NaNs sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_hold_their_values() {
        for v in [
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            1000,
            123_456_789,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(v);
            assert!(
                Histogram::low(i) <= v && v < Histogram::low(i + 1),
                "{v} in bucket {i}"
            );
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS - 1 {
            assert!(Histogram::low(i) < Histogram::low(i + 1), "bucket {i}");
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for ns in 1..=10 {
            h.record_ns(ns);
        }
        assert_eq!(h.quantile(0.5), Duration::from_nanos(5));
        assert_eq!(h.quantile(0.9), Duration::from_nanos(9));
        assert_eq!(h.quantile(1.0), Duration::from_nanos(10));
        assert_eq!(h.max(), Duration::from_nanos(10));
        assert_eq!(h.mean(), Duration::from_nanos(5));
        assert_eq!(h.count(), 10);
    }

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let mut h = Histogram::new();
        // 1 µs .. 1 ms, one of each microsecond.
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, want_us) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.quantile(q).as_nanos() as f64 / 1e3;
            assert!(
                (got / want_us - 1.0).abs() < 1.0 / 64.0,
                "q{q}: {got} µs, want {want_us}"
            );
        }
        assert_eq!(h.max(), Duration::from_millis(1));
        // The top quantile never reports more than the largest value seen.
        assert!(h.quantile(1.0) <= h.max());
        assert_eq!(h.mean(), Duration::from_nanos(500_500));
    }

    #[test]
    fn one_slow_operation_in_a_hundred_shows_at_p99_not_p90() {
        let mut h = Histogram::new();
        for _ in 0..99 {
            h.record(Duration::from_millis(1));
        }
        h.record(Duration::from_millis(100));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!((ms(h.quantile(0.90)) - 1.0).abs() < 0.02);
        assert!((ms(h.quantile(0.99)) - 1.0).abs() < 0.02);
        assert!((ms(h.quantile(1.0)) - 100.0).abs() < 1.6);
        assert_eq!(h.max(), Duration::from_millis(100));
    }

    #[test]
    fn merged_histograms_count_as_one() {
        let (mut a, mut b, mut both) = (Histogram::new(), Histogram::new(), Histogram::new());
        for us in 1..=500u64 {
            a.record(Duration::from_micros(us));
            both.record(Duration::from_micros(us));
        }
        for us in 501..=1000u64 {
            b.record(Duration::from_micros(us));
            both.record(Duration::from_micros(us));
        }
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        for q in [0.5, 0.9, 0.99, 1.0] {
            assert_eq!(a.quantile(q), both.quantile(q));
        }
        assert_eq!(a.max(), both.max());
        assert_eq!(a.mean(), both.mean());
    }

    #[test]
    fn an_empty_histogram_reports_zero() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.99), Duration::ZERO);
        assert_eq!(h.max(), Duration::ZERO);
        assert_eq!(h.mean(), Duration::ZERO);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
