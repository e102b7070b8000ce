//! Pauses between attempts of the background tasks (re-registration, re-listing): doubling
//! from a minimum to a maximum, each with up to half of it taken off at random, so that many
//! instances cut off together do not come back in lockstep.

use std::time::Duration;

use super::random;

/// A doubling pause, reset after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next pause (and doubles the one after).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let full = self.next;
        self.next = (full * 2).min(self.max);
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 {
            0
        } else {
            random::next_u64() % nanos
        };
        full - Duration::from_nanos(jitter)
    }

    /// Sleeps for the next pause.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the minimum, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_with_jitter_below_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let fulls = [100, 200, 350, 350, 350].map(Duration::from_millis);
        for (p, full) in pauses.iter().zip(fulls) {
            assert!(*p <= full && *p >= full / 2, "{p:?} for {full:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
