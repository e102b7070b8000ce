//! Pickers: choose one instance of a [`ServiceCache`] per call. Each keeps its own list of
//! instances marked down by `note_error`; a down instance is skipped until its period ends,
//! unless every instance is down (then all are candidates again: a guess beats no answer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::cache::ServiceCache;
use super::{Instance, random};

/// How long `note_error` keeps an instance out unless another period is set.
pub const DEFAULT_DOWN_FOR: Duration = Duration::from_secs(5);

/// How a picker treats failing instances.
#[derive(Debug, Clone)]
pub struct PickerOptions {
    /// How long an instance is skipped after `note_error`.
    pub down_for: Duration,
}

impl Default for PickerOptions {
    fn default() -> Self {
        PickerOptions {
            down_for: DEFAULT_DOWN_FOR,
        }
    }
}

/// Instances marked down, each until some instant. Read on every pick, so a std mutex.
#[derive(Debug)]
struct Downs {
    down_for: Duration,
    until: Mutex<HashMap<String, Instant>>,
}

impl Downs {
    fn new(options: &PickerOptions) -> Downs {
        Downs {
            down_for: options.down_for,
            until: Mutex::new(HashMap::new()),
        }
    }

    fn note(&self, id: &str) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.insert(id.to_string(), Instant::now() + self.down_for);
    }

    fn is_down(&self, id: &str) -> bool {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.get(id).is_some_and(|t| *t > Instant::now())
    }

    /// The instances not down (all of them if every one is down).
    fn candidates<'a>(&self, all: &'a [Instance]) -> Vec<&'a Instance> {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.is_empty() {
            return all.iter().collect();
        }
        let now = Instant::now();
        until.retain(|_, t| *t > now);
        let up: Vec<&Instance> = all.iter().filter(|i| !until.contains_key(&i.id)).collect();
        if up.is_empty() {
            all.iter().collect()
        } else {
            up
        }
    }
}

/// Takes the instances in turn (by id order).
#[derive(Debug)]
pub struct RoundRobin {
    cache: ServiceCache,
    downs: Downs,
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round-robin picker over `cache`'s instances.
    pub fn new(cache: &ServiceCache) -> RoundRobin {
        Self::with_options(cache, PickerOptions::default())
    }

    /// The same, with `options`.
    pub fn with_options(cache: &ServiceCache, options: PickerOptions) -> RoundRobin {
        RoundRobin {
            cache: cache.clone(),
            downs: Downs::new(&options),
            next: AtomicUsize::new(0),
        }
    }

    /// The next instance, or `None` if the service has none.
    pub fn pick(&self) -> Option<Instance> {
        let all = self.cache.instances();
        let candidates = self.downs.candidates(&all);
        if candidates.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(candidates[turn % candidates.len()].clone())
    }

    /// Marks instance `id` down for the picker's period.
    pub fn note_error(&self, id: &str) {
        self.downs.note(id);
    }

    /// Whether instance `id` is marked down now.
    pub fn is_down(&self, id: &str) -> bool {
        self.downs.is_down(id)
    }
}

/// Takes an instance at random.
#[derive(Debug)]
pub struct Random {
    cache: ServiceCache,
    downs: Downs,
}

impl Random {
    /// A random picker over `cache`'s instances.
    pub fn new(cache: &ServiceCache) -> Random {
        Self::with_options(cache, PickerOptions::default())
    }

    /// The same, with `options`.
    pub fn with_options(cache: &ServiceCache, options: PickerOptions) -> Random {
        Random {
            cache: cache.clone(),
            downs: Downs::new(&options),
        }
    }

    /// An instance chosen uniformly, or `None` if the service has none.
    pub fn pick(&self) -> Option<Instance> {
        let all = self.cache.instances();
        let candidates = self.downs.candidates(&all);
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[random::below(candidates.len())].clone())
    }

    /// Marks instance `id` down for the picker's period.
    pub fn note_error(&self, id: &str) {
        self.downs.note(id);
    }

    /// Whether instance `id` is marked down now.
    pub fn is_down(&self, id: &str) -> bool {
        self.downs.is_down(id)
    }
}

/// Sends each key to the same instance, by rendezvous hashing: the key goes to the instance
/// whose id scores highest with it. The choice depends only on the key and the ids, so every
/// process with the same instances agrees, and it stays put while that instance is listed
/// and up (other instances coming and going do not move it).
#[derive(Debug)]
pub struct Sticky {
    cache: ServiceCache,
    downs: Downs,
}

impl Sticky {
    /// A sticky picker over `cache`'s instances.
    pub fn new(cache: &ServiceCache) -> Sticky {
        Self::with_options(cache, PickerOptions::default())
    }

    /// The same, with `options`.
    pub fn with_options(cache: &ServiceCache, options: PickerOptions) -> Sticky {
        Sticky {
            cache: cache.clone(),
            downs: Downs::new(&options),
        }
    }

    /// The instance for `key`, or `None` if the service has none.
    pub fn pick(&self, key: impl AsRef<[u8]>) -> Option<Instance> {
        let all = self.cache.instances();
        let key = key.as_ref();
        self.downs
            .candidates(&all)
            .into_iter()
            .max_by_key(|i| (score(key, &i.id), &i.id))
            .cloned()
    }

    /// Marks instance `id` down for the picker's period: its keys go to their second choice.
    pub fn note_error(&self, id: &str) {
        self.downs.note(id);
    }

    /// Whether instance `id` is marked down now.
    pub fn is_down(&self, id: &str) -> bool {
        self.downs.is_down(id)
    }
}

/// The rendezvous score of `id` for `key`: FNV-1a over both, then a 64-bit finalizer
/// (splitmix64) so close inputs score far apart. Fixed here, not `DefaultHasher`, whose output
/// may change between Rust releases: processes built differently must agree.
fn score(key: &[u8], id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // The key's length first, so ("ab", "c") and ("a", "bc") differ.
    for b in (key.len() as u64)
        .to_le_bytes()
        .iter()
        .chain(key)
        .chain(id.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn instance(id: &str) -> Instance {
        Instance {
            id: id.into(),
            endpoint: format!("http://{id}:1"),
            metadata: BTreeMap::new(),
            lease: 0,
            create_revision: 1,
            mod_revision: 1,
        }
    }

    fn cache(ids: &[&str]) -> ServiceCache {
        ServiceCache::fixed(ids.iter().map(|id| instance(id)).collect())
    }

    fn id(i: Option<Instance>) -> String {
        i.map(|i| i.id).unwrap_or_default()
    }

    #[test]
    fn round_robin_takes_turns_and_skips_down_instances_for_a_while() {
        // No tokio test-util here (no paused clock): a short real period.
        let options = PickerOptions {
            down_for: Duration::from_millis(100),
        };
        let rr = RoundRobin::with_options(&cache(&["a", "b", "c"]), options);
        let turns: Vec<String> = (0..6).map(|_| id(rr.pick())).collect();
        assert_eq!(turns, ["a", "b", "c", "a", "b", "c"]);
        rr.note_error("b");
        assert!(rr.is_down("b"));
        assert!((0..10).all(|_| id(rr.pick()) != "b"));
        // Every instance down: all are candidates again.
        rr.note_error("a");
        rr.note_error("c");
        let all: BTreeSet<String> = (0..6).map(|_| id(rr.pick())).collect();
        assert_eq!(all.len(), 3);
        std::thread::sleep(Duration::from_millis(150));
        assert!(!rr.is_down("b"));
        assert_eq!(rr.downs.until.lock().unwrap().len(), 3);
        rr.pick();
        assert!(
            rr.downs.until.lock().unwrap().is_empty(),
            "expired marks are dropped"
        );
        assert_eq!(RoundRobin::new(&cache(&[])).pick(), None);
    }

    #[test]
    fn random_spreads_over_the_up_instances() {
        let r = Random::new(&cache(&["a", "b", "c"]));
        let seen: BTreeSet<String> = (0..200).map(|_| id(r.pick())).collect();
        assert_eq!(seen.len(), 3);
        r.note_error("a");
        assert!((0..100).all(|_| id(r.pick()) != "a"));
        assert_eq!(Random::new(&cache(&[])).pick(), None);
    }

    #[test]
    fn sticky_keeps_a_key_on_its_instance_while_others_come_and_go() {
        let ids = ["a", "b", "c", "d", "e"];
        let before = Sticky::new(&cache(&ids));
        let keys: Vec<String> = (0..200).map(|k| format!("user-{k}")).collect();
        let chosen: Vec<String> = keys.iter().map(|k| id(before.pick(k))).collect();
        // Stable, and spread.
        assert!(
            keys.iter()
                .zip(&chosen)
                .all(|(k, c)| id(before.pick(k)) == *c)
        );
        assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), 5);
        // Without "c", only c's keys move; with "f" added, keys move only to "f".
        let without_c = Sticky::new(&cache(&["a", "b", "d", "e"]));
        let with_f = Sticky::new(&cache(&["a", "b", "c", "d", "e", "f"]));
        for (k, c) in keys.iter().zip(&chosen) {
            if c != "c" {
                assert_eq!(id(without_c.pick(k)), *c);
            }
            let now = id(with_f.pick(k));
            assert!(now == *c || now == "f");
        }
        // Down: the key goes to its second choice, and back after.
        let key = &keys[0];
        before.note_error(&chosen[0]);
        let second = id(before.pick(key));
        assert_ne!(second, chosen[0]);
        assert_eq!(id(without(&ids, &chosen[0]).pick(key)), second);
    }

    fn without(ids: &[&str], gone: &str) -> Sticky {
        let rest: Vec<&str> = ids.iter().copied().filter(|i| *i != gone).collect();
        Sticky::new(&cache(&rest))
    }

    #[test]
    fn scores_are_fixed_across_builds() {
        // Pinned values: a change here re-routes every sticky key in a fleet of mixed builds.
        assert_eq!(score(b"user-1", "a"), 0xb438_0e33_667f_4052);
        assert_eq!(score(b"", ""), 0x813f_0174_a236_7c13);
        assert_ne!(score(b"ab", "c"), score(b"a", "bc"));
    }
}
