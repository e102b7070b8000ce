//! Random numbers for picking instances and jittering retries. Not for secrets: the standard
//! library's randomly keyed hasher over a counter is enough to spread load, and spares the
//! crate a dependency.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A uniformly distributed `u64`.
pub(crate) fn next_u64() -> u64 {
    static KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    KEYS.hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A number in `0..n` (`n` > 0), without modulo bias worth noticing for `n` far below 2^64.
pub(crate) fn below(n: usize) -> usize {
    // Multiply-shift maps the 64-bit value onto 0..n.
    ((u128::from(next_u64()) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_hits_every_value() {
        let mut seen = [0usize; 5];
        for _ in 0..1000 {
            seen[below(5)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }
}
