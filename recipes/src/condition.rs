//! Conditions over other keys that gate queue items: a flag has a value, a prerequisite key
//! exists (or is gone), enough keys sit under a prefix. A condition is checked by a read, then
//! proven inside the claim transaction by compares, so a claim never commits at a revision
//! where the condition does not hold; waiting for one is done by watching its keys.

use kv_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnResponse};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::owned::read_answer;

/// One condition; a list of them holds when all of them hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Condition {
    /// `key` exists with exactly `value` (a notification flag).
    ValueIs {
        /// The key.
        key: String,
        /// The value it must hold.
        value: String,
    },
    /// `key` exists (a prerequisite is present or done).
    Exists {
        /// The key.
        key: String,
    },
    /// `key` does not exist (a blocker is gone).
    Absent {
        /// The key.
        key: String,
    },
    /// At least `count` keys exist under `prefix` (N of M parts are done). Proving it costs one
    /// compare per counted key in the claim transaction, so keep `count` well under the
    /// server's operations-per-transaction limit (128 by default).
    CountAtLeast {
        /// The prefix.
        prefix: String,
        /// How many keys it needs.
        count: u32,
    },
}

impl Condition {
    /// `key` holds `value`.
    pub fn value_is(key: impl Into<String>, value: impl Into<String>) -> Condition {
        Condition::ValueIs {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `key` exists.
    pub fn exists(key: impl Into<String>) -> Condition {
        Condition::Exists { key: key.into() }
    }

    /// `key` does not exist.
    pub fn absent(key: impl Into<String>) -> Condition {
        Condition::Absent { key: key.into() }
    }

    /// At least `count` keys under `prefix`.
    pub fn count_at_least(prefix: impl Into<String>, count: u32) -> Condition {
        Condition::CountAtLeast {
            prefix: prefix.into(),
            count,
        }
    }

    /// The read that tells whether the condition holds.
    fn read(&self) -> TxnOp {
        match self {
            Condition::ValueIs { key, .. }
            | Condition::Exists { key }
            | Condition::Absent { key } => TxnOp::get(key.as_bytes(), GetOptions::new()),
            Condition::CountAtLeast { prefix, count } => TxnOp::get(
                prefix.as_bytes(),
                GetOptions::new()
                    .prefix()
                    .keys_only()
                    .limit(i64::from(*count)),
            ),
        }
    }

    /// From the read's answer: None if the condition does not hold, else the compares that
    /// keep it proven at a later revision.
    fn proof(&self, seen: &kv_client::GetResponse) -> Option<Vec<Compare>> {
        match self {
            Condition::ValueIs { key, value } => {
                let holds = seen
                    .kvs
                    .first()
                    .is_some_and(|kv| kv.value == value.as_bytes());
                holds.then(|| {
                    vec![Compare::value(
                        key.as_bytes(),
                        CompareOp::Equal,
                        value.as_bytes(),
                    )]
                })
            }
            Condition::Exists { key } => (!seen.kvs.is_empty()).then(|| {
                vec![Compare::create_revision(
                    key.as_bytes(),
                    CompareOp::Greater,
                    0,
                )]
            }),
            Condition::Absent { key } => seen.kvs.is_empty().then(|| {
                vec![Compare::create_revision(
                    key.as_bytes(),
                    CompareOp::Equal,
                    0,
                )]
            }),
            // The counted keys must all still be there (same incarnation): then at least
            // `count` exist whatever else changed.
            Condition::CountAtLeast { count, .. } => {
                (seen.kvs.len() >= *count as usize).then(|| {
                    seen.kvs
                        .iter()
                        .map(|kv| {
                            Compare::create_revision(
                                kv.key.clone(),
                                CompareOp::Equal,
                                kv.create_revision,
                            )
                        })
                        .collect()
                })
            }
        }
    }

    /// The key or prefix to watch for a change that may make it hold, and whether it is a
    /// prefix.
    pub(crate) fn watched(&self) -> (&str, bool) {
        match self {
            Condition::ValueIs { key, .. }
            | Condition::Exists { key }
            | Condition::Absent { key } => (key, false),
            Condition::CountAtLeast { prefix, .. } => (prefix, true),
        }
    }
}

/// Whether `conditions` all hold now: Some(compares proving it, for a claim transaction) or
/// None, with the revision they were read at.
pub(crate) async fn evaluate(
    client: &Client,
    conditions: &[Condition],
) -> Result<(Option<Vec<Compare>>, i64)> {
    if conditions.is_empty() {
        return Ok((Some(Vec::new()), 0));
    }
    let reads = Txn::new().and_then(conditions.iter().map(Condition::read));
    let seen: TxnResponse = client.kv().txn(reads).await?;
    let mut proof = Vec::new();
    for (i, condition) in conditions.iter().enumerate() {
        match condition.proof(read_answer(&seen, i)?) {
            Some(compares) => proof.extend(compares),
            None => return Ok((None, seen.revision)),
        }
    }
    Ok((Some(proof), seen.revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_client::{GetResponse, KeyValue};

    fn answer(keys: &[(&str, &str, i64)]) -> GetResponse {
        GetResponse {
            revision: 9,
            kvs: keys
                .iter()
                .map(|(k, v, rev)| KeyValue {
                    key: k.as_bytes().to_vec().into(),
                    value: v.as_bytes().to_vec().into(),
                    create_revision: *rev,
                    mod_revision: *rev,
                    version: 1,
                    lease: 0,
                })
                .collect(),
            more: false,
            count: keys.len() as i64,
        }
    }

    #[test]
    fn each_condition_holds_exactly_when_its_read_says_so() {
        let flag = Condition::value_is("flag", "go");
        assert!(flag.proof(&answer(&[("flag", "go", 3)])).is_some());
        assert!(flag.proof(&answer(&[("flag", "wait", 3)])).is_none());
        assert!(flag.proof(&answer(&[])).is_none());
        assert!(
            Condition::exists("k")
                .proof(&answer(&[("k", "", 2)]))
                .is_some()
        );
        assert!(Condition::exists("k").proof(&answer(&[])).is_none());
        assert!(Condition::absent("k").proof(&answer(&[])).is_some());
        assert!(
            Condition::absent("k")
                .proof(&answer(&[("k", "", 2)]))
                .is_none()
        );
        let parts = Condition::count_at_least("parts/", 2);
        assert!(parts.proof(&answer(&[("parts/a", "", 2)])).is_none());
        let proof = parts
            .proof(&answer(&[("parts/a", "", 2), ("parts/b", "", 5)]))
            .unwrap();
        assert_eq!(proof.len(), 2, "one compare per counted key");
    }

    #[test]
    fn conditions_survive_a_json_round_trip() {
        let all = vec![
            Condition::value_is("a", "1"),
            Condition::exists("b"),
            Condition::absent("c"),
            Condition::count_at_least("d/", 3),
        ];
        let text = serde_json::to_string(&all).unwrap();
        let back: Vec<Condition> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, all);
    }
}
