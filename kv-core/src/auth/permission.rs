//! Key permissions: what a user may read and write, as one set of key intervals per kind.
//!
//! A role grants READ, WRITE or READWRITE over a key, a range `[key, range_end)` or everything
//! from a key on (`range_end` = `"\0"`). A user's roles are merged into one read set and one
//! write set, as etcd does: a request for one key needs any interval holding it, and a request
//! for a range needs the union of the user's intervals to cover all of it, gaps not allowed.

use crate::proto::authpb::{Permission, permission::Type as PermType};

/// The end of a key interval: a key (exclusive) or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Unbounded,
}

impl End {
    /// The end a request's or a grant's `range_end` stands for; `None` for a single key.
    fn of(range_end: &[u8]) -> Option<End> {
        match range_end {
            [] => None,
            [0] => Some(End::Unbounded),
            end => Some(End::Key(end.to_vec())),
        }
    }

    fn is_after(&self, key: &[u8]) -> bool {
        match self {
            End::Key(end) => end.as_slice() > key,
            End::Unbounded => true,
        }
    }
}

/// The start a request's key stands for: etcd reads an empty key as `"\0"`, the first key
/// there can be (no key is empty).
fn start_of(key: &[u8]) -> &[u8] {
    if key.is_empty() { &[0] } else { key }
}

/// The interval a single key takes: `[key, key + "\0")`.
fn single(key: &[u8]) -> End {
    let mut end = key.to_vec();
    end.push(0);
    End::Key(end)
}

/// Disjoint, sorted, coalesced key intervals: touching or overlapping grants are one interval,
/// so "covered without gaps" is "inside one interval".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    intervals: Vec<(Vec<u8>, End)>,
}

impl KeySet {
    /// The set of the given `(key, range_end)` grants, in etcd's encoding.
    fn from_grants<'a>(grants: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> KeySet {
        let mut raw: Vec<(Vec<u8>, End)> = grants
            .into_iter()
            .map(|(key, range_end)| {
                let start = start_of(key);
                let end = End::of(range_end).unwrap_or_else(|| single(start));
                (start.to_vec(), end)
            })
            // An inverted grant holds no key (the server refuses to store one; this keeps a
            // set built from older data sound).
            .filter(|(start, end)| end.is_after(start))
            .collect();
        raw.sort();
        let mut intervals: Vec<(Vec<u8>, End)> = Vec::with_capacity(raw.len());
        for (start, end) in raw {
            // Sorted by start, so the interval joins the last one unless a gap separates them.
            let joins = |last_end: &End| match last_end {
                End::Key(last_end) => start.as_slice() <= last_end.as_slice(),
                End::Unbounded => true,
            };
            match intervals.last_mut() {
                Some((_, last_end)) if joins(last_end) => {
                    if end > *last_end {
                        *last_end = end;
                    }
                }
                _ => intervals.push((start, end)),
            }
        }
        KeySet { intervals }
    }

    /// The interval holding `key`, if any.
    fn holding(&self, key: &[u8]) -> Option<&End> {
        let after = self
            .intervals
            .partition_point(|(start, _)| start.as_slice() <= key);
        let (_, end) = self.intervals.get(after.checked_sub(1)?)?;
        end.is_after(key).then_some(end)
    }

    /// Whether the set allows a request for `key` (alone, with `range_end` empty) or for the
    /// range `[key, range_end)`, in etcd's encoding.
    pub fn allows(&self, key: &[u8], range_end: &[u8]) -> bool {
        let start = start_of(key);
        let Some(held) = self.holding(start) else {
            return false;
        };
        match End::of(range_end) {
            None => true,
            Some(end) => *held >= end,
        }
    }

    /// Whether the set holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }
}

/// What one user may read and what it may write: the union of its roles' permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPermissions {
    /// Keys the user may read.
    pub read: KeySet,
    /// Keys the user may write.
    pub write: KeySet,
}

impl UserPermissions {
    /// The merged permissions of `grants` (every permission of every role the user holds).
    pub fn merge<'a>(grants: impl IntoIterator<Item = &'a Permission> + Clone) -> Self {
        let of = |wanted: fn(PermType) -> bool| {
            KeySet::from_grants(
                grants
                    .clone()
                    .into_iter()
                    .filter(move |p| wanted(p.perm_type()))
                    .map(|p| (p.key.as_slice(), p.range_end.as_slice())),
            )
        };
        UserPermissions {
            read: of(|t| matches!(t, PermType::Read | PermType::Readwrite)),
            write: of(|t| matches!(t, PermType::Write | PermType::Readwrite)),
        }
    }
}

/// Whether `(key, range_end)` is a range a role may be granted: etcd refuses an empty key and
/// an end at or before the key (other than `"\0"`, every key from `key` on).
pub fn is_valid_grant(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(grants: &[(&str, &str)]) -> KeySet {
        KeySet::from_grants(grants.iter().map(|(k, e)| (k.as_bytes(), e.as_bytes())))
    }

    #[test]
    fn a_single_key_grant_allows_that_key_only() {
        let s = set(&[("/a", "")]);
        assert!(s.allows(b"/a", b""));
        assert!(!s.allows(b"/a0", b""));
        assert!(!s.allows(b"/", b""));
        // The range holding only "/a" is covered; one key more is not.
        assert!(s.allows(b"/a", b"/a\0"));
        assert!(!s.allows(b"/a", b"/a\0\0"));
    }

    #[test]
    fn ranges_must_be_covered_without_gaps() {
        let s = set(&[("/a", "/c"), ("/c", "/e"), ("/f", "/g")]);
        assert!(
            s.allows(b"/a", b"/e"),
            "touching grants cover across the seam"
        );
        assert!(s.allows(b"/b", b"/d"));
        assert!(!s.allows(b"/a", b"/f\0"), "the gap [/e, /f) is not granted");
        assert!(s.allows(b"/f", b""));
        assert!(!s.allows(b"/e", b""));
    }

    #[test]
    fn an_open_end_covers_every_later_key() {
        let s = set(&[("/m", "\0")]);
        assert!(s.allows(b"/m", b"\0"));
        assert!(s.allows(b"/zzzz", b""));
        assert!(s.allows(b"/n", b"/p"));
        assert!(!s.allows(b"/l", b"\0"));
        // Everything: etcdctl's `grant-permission r readwrite "" --prefix`.
        let all = set(&[("\0", "\0")]);
        assert!(
            all.allows(b"", b"\0"),
            "an empty request key stands for \\0"
        );
        assert!(all.allows(b"\0", b""));
    }

    #[test]
    fn read_and_write_are_merged_separately() {
        let perm = |t: PermType, key: &str, end: &str| Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        };
        let grants = [
            perm(PermType::Read, "/r", "/s"),
            perm(PermType::Write, "/w", "/x"),
            perm(PermType::Readwrite, "/s", "/t"),
        ];
        let p = UserPermissions::merge(&grants);
        assert!(p.read.allows(b"/r", b"/t"));
        assert!(!p.write.allows(b"/r", b""));
        assert!(p.write.allows(b"/s5", b""));
        assert!(p.write.allows(b"/w", b"/x"));
        assert!(!p.read.allows(b"/w", b""));
    }

    #[test]
    fn grants_are_checked_as_etcd_checks_them() {
        assert!(is_valid_grant(b"/a", b""));
        assert!(is_valid_grant(b"/a", b"/b"));
        assert!(is_valid_grant(b"/a", b"\0"));
        assert!(!is_valid_grant(b"", b""));
        assert!(!is_valid_grant(b"/b", b"/a"));
        assert!(!is_valid_grant(b"/a", b"/a"));
    }

    /// The model's alphabet: two letters, so that random grants often touch or overlap.
    const ALPHABET: [u8; 2] = [0, b'a'];

    /// Keys up to three long: small enough to enumerate, long enough for prefixes, touching
    /// ranges and `"\0"` ends.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), 1..=3)
    }

    fn every_key() -> Vec<Vec<u8>> {
        let alphabet = ALPHABET;
        let mut keys = vec![];
        for len in 1..=4 {
            let mut word = vec![0usize; len];
            loop {
                keys.push(word.iter().map(|&i| alphabet[i]).collect());
                let Some(pos) = word.iter().rposition(|&i| i + 1 < alphabet.len()) else {
                    break;
                };
                word[pos] += 1;
                word[pos + 1..].iter_mut().for_each(|i| *i = 0);
            }
        }
        keys
    }

    /// Whether a grant in etcd's encoding holds `k`, by definition.
    fn grant_holds(key: &[u8], range_end: &[u8], k: &[u8]) -> bool {
        match range_end {
            [] => k == key,
            [0] => k >= key,
            end => k >= key && k < end,
        }
    }

    proptest! {
        /// Against the definition, key by key: a single key is allowed when some grant holds
        /// it, a range when its first key and every key in it are held. Enumerating keys up to
        /// four long is exact here: where the grants leave a gap inside the range, the gap
        /// begins at the request's key or at a grant's end, a key at most four long.
        #[test]
        fn allows_matches_a_key_by_key_model(
            grants in prop::collection::vec((key(), prop::option::of(key())), 0..6),
            req in key(),
            req_end in prop::option::of(key()),
        ) {
            let grants: Vec<(Vec<u8>, Vec<u8>)> = grants
                .into_iter()
                .map(|(k, e)| (k, e.unwrap_or_default()))
                .filter(|(k, e)| is_valid_grant(k, e))
                .collect();
            let s = KeySet::from_grants(grants.iter().map(|(k, e)| (k.as_slice(), e.as_slice())));
            let held = |k: &[u8]| grants.iter().any(|(g, e)| grant_holds(g, e, k));
            let universe = every_key();
            let req_end = req_end.unwrap_or_default();
            let expected = held(&req)
                && universe
                    .iter()
                    .filter(|k| !req_end.is_empty() && grant_holds(&req, &req_end, k))
                    .all(|k| held(k));
            prop_assert_eq!(s.allows(&req, &req_end), expected);
        }
    }
}
