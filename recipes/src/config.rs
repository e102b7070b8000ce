//! Typed configuration loaded from a prefix and followed one consistent version at a time.
//!
//! [`ConfigWatch::start`] reads every key under a prefix at one revision and deserializes
//! them into a `T`; from then on its stream yields one [`Version`] per revision that touched
//! the prefix, with every change of that revision applied (a transaction that writes three
//! keys is one version, never three half-applied ones), and none skipped.
//!
//! # From keys to a config
//!
//! The keys under the prefix (with the prefix taken off; usually it ends with `/`) form a
//! JSON object, which is deserialized into `T` with `serde_json`:
//!
//! - a key is a path: its rest after the prefix is split on `/`, each segment naming a field
//!   of a nested object. Every segment must be non-empty UTF-8, so a key equal to the prefix,
//!   or one with a leading, trailing or doubled `/`, makes the version invalid;
//! - a value that is valid JSON is taken as that JSON (`8`, `true`, `"text"`, `[1, 2]`,
//!   `{"a": 1}`, `null`); any other UTF-8 value is taken as a JSON string, so
//!   `postgres://db/app` and `"postgres://db/app"` mean the same. Write a string that looks
//!   like JSON (`"true"`, `"8"`) quoted. A value that is neither makes the version invalid;
//! - a key that is both a value and a parent of other keys (`db` = `x` beside `db/pool` = `8`)
//!   is a conflict and makes the version invalid, whatever the value (a JSON object value is
//!   not merged with the keys under it).
//!
//! With prefix `app/`, the keys `app/db/url` = `postgres://db/app`, `app/db/pool` = `8` and
//! `app/debug` = `true` give `{"db": {"url": "postgres://db/app", "pool": 8}, "debug": true}`.
//! No keys give `{}`, so a `T` whose fields all have defaults loads from an empty prefix, and
//! a deleted key reads as its field's default (`None` for an `Option`).
//!
//! # Versions and errors
//!
//! A version that does not make a `T` (bad layout or a failed deserialization) arrives as a
//! [`ConfigError::Invalid`] item carrying its revision and raw keys, and
//! [`ConfigWatch::current`] keeps the last good version; the next revision that touches the
//! prefix is tried afresh. [`ConfigWatch::start`] fails on an invalid first version instead,
//! so `current` always holds a good config.
//!
//! The watch rides out reconnects by itself. If the history it needs was compacted away, it
//! reads the whole prefix again at a newer revision and yields that snapshot as the next
//! version (only if the keys differ): versions between the two were gone from the cluster
//! and cannot be seen, but the new version is still one consistent revision. The stream ends
//! only after a [`ConfigError::Client`] error the client cannot recover from.
//!
//! ```
//! use futures::StreamExt;
//! use kv_client::{Client, ClientOptions, PutOptions, Txn, TxnOp};
//! use recipes::config::ConfigWatch;
//! use serde::Deserialize;
//!
//! #[derive(Debug, Deserialize)]
//! struct Db { url: String, pool: u32 }
//!
//! #[derive(Debug, Deserialize)]
//! struct App { db: Db, #[serde(default)] debug: bool }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! let kv = client.kv();
//! kv.put("app/db/url", "postgres://db/app", PutOptions::new()).await?;
//! kv.put("app/db/pool", "8", PutOptions::new()).await?;
//!
//! let mut config = ConfigWatch::<App>::start(&client, "app/").await?;
//! assert_eq!(config.current().config.db.url, "postgres://db/app");
//!
//! // One transaction, one version with both changes.
//! kv.txn(Txn::new().and_then([
//!     TxnOp::put("app/db/pool", "16", PutOptions::new()),
//!     TxnOp::put("app/debug", "true", PutOptions::new()),
//! ]))
//! .await?;
//! let version = config.next().await.expect("the watch goes on")?;
//! assert!(version.config.debug && version.config.db.pool == 16);
//! assert_eq!(config.current().revision, version.revision);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kv_client::{Client, Event, EventKind, GetOptions, WatchOptions, prefix_end};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// Keys read per request when loading a prefix; every page reads at the first page's
/// revision, so a large config is still one snapshot.
const PAGE_KEYS: i64 = 1000;

/// Versions queued for a consumer that is not reading; the background task then waits (the
/// client buffers the watch meanwhile).
const QUEUE_DEPTH: usize = 16;

/// Pause before reading or watching again after an error that passes with time.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A config's keys as stored: the key with the prefix taken off, and the value's bytes.
pub type Raw = BTreeMap<Vec<u8>, Vec<u8>>;

/// One consistent version of a config: the state of the prefix at `revision`.
#[derive(Debug, Clone, PartialEq)]
pub struct Version<T> {
    /// The revision this version is the state at: the revision of the transaction that made
    /// it, or for a fresh read the store's revision at the time of the read.
    pub revision: i64,
    /// The keys, deserialized.
    pub config: T,
    /// The keys as stored, for debugging.
    pub raw: Raw,
}

/// Why a config could not be loaded or followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Reading or watching the prefix failed and will not pass by itself; a stream ends
    /// after it.
    #[error(transparent)]
    Client(#[from] kv_client::Error),
    /// The keys at `revision` do not make a config; the last good version stays current.
    #[error("config at revision {revision} is invalid: {problem}")]
    Invalid {
        /// The revision of the rejected version.
        revision: i64,
        /// What is wrong with it.
        problem: Problem,
        /// Its keys as stored.
        raw: Arc<Raw>,
    },
}

/// What makes a version's keys unusable as a config (see the module docs for the rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The key (after the prefix) is not a `/`-separated path of non-empty UTF-8 segments.
    #[error("key {0:?} is not a path of non-empty UTF-8 segments")]
    BadKey(String),
    /// The value is neither JSON nor UTF-8 text.
    #[error("the value of {0:?} is neither JSON nor UTF-8")]
    BadValue(String),
    /// `key` holds a value and is also the parent of `child`.
    #[error("{key:?} holds a value and is also the parent of {child:?}")]
    Conflict {
        /// The key holding a value.
        key: String,
        /// A key under it.
        child: String,
    },
    /// The JSON object does not deserialize into the config type.
    #[error("does not deserialize: {0}")]
    Deserialize(String),
}

/// One item of a [`ConfigWatch`]: a new good version, or why the new one is not.
pub type Item<T> = Result<Arc<Version<T>>, ConfigError>;

/// A typed config under a prefix, followed version by version: a [`Stream`] of every later
/// version, and the last good one at hand. Dropping it stops following.
pub struct ConfigWatch<T> {
    /// The last good version the stream yielded (the first one until then).
    current: Arc<Version<T>>,
    rx: mpsc::Receiver<Item<T>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: DeserializeOwned + Send + Sync + 'static> ConfigWatch<T> {
    /// Loads the config under `prefix` (relative to the client's namespace) as one snapshot
    /// and starts following it. Fails with [`ConfigError::Invalid`] if that first version
    /// does not make a `T`. Dropping the future gives up without leaving anything running.
    pub async fn start(
        client: &Client,
        prefix: impl AsRef<[u8]>,
    ) -> Result<ConfigWatch<T>, ConfigError> {
        let prefix = prefix.as_ref().to_vec();
        let (revision, raw) = loop {
            match read(client, &prefix).await {
                // Compacted between two pages: read again at a newer revision.
                Err(kv_client::Error::Compacted) => continue,
                read => break read?,
            }
        };
        let current = Arc::new(decode(revision, &raw)?);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(follow::<T>(client.clone(), prefix, revision, raw, tx));
        Ok(ConfigWatch { current, rx, task })
    }
}

impl<T> ConfigWatch<T> {
    /// The last good version the stream yielded, or the first version before any: invalid
    /// versions never replace it. It moves only as the stream is read, so it is never ahead
    /// of what the caller has seen.
    pub fn current(&self) -> Arc<Version<T>> {
        self.current.clone()
    }
}

impl<T> Stream for ConfigWatch<T> {
    type Item = Item<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item<T>>> {
        let this = self.get_mut();
        let item = ready!(this.rx.poll_recv(cx));
        if let Some(Ok(version)) = &item {
            this.current = version.clone();
        }
        Poll::Ready(item)
    }
}

impl<T> Drop for ConfigWatch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The JSON object that `raw` stands for, by the rules of the module docs.
pub fn to_json(raw: &Raw) -> Result<Value, Problem> {
    /// A node of the key tree: leaves are values, branches hold keys under them.
    enum Node {
        Leaf(Value),
        Branch(BTreeMap<String, Node>),
    }

    /// Some key under `branch`, for a conflict's message.
    fn some_key(branch: &BTreeMap<String, Node>, path: &str) -> String {
        match branch.iter().next() {
            Some((name, Node::Branch(under))) => some_key(under, &format!("{path}/{name}")),
            Some((name, Node::Leaf(_))) => format!("{path}/{name}"),
            None => path.to_string(),
        }
    }

    fn into_value(node: Node) -> Value {
        match node {
            Node::Leaf(value) => value,
            Node::Branch(children) => Value::Object(
                children
                    .into_iter()
                    .map(|(name, child)| (name, into_value(child)))
                    .collect::<Map<_, _>>(),
            ),
        }
    }

    let mut root = BTreeMap::new();
    for (key, value) in raw {
        let lossy = || String::from_utf8_lossy(key).into_owned();
        let path = std::str::from_utf8(key).map_err(|_| Problem::BadKey(lossy()))?;
        let segments: Vec<&str> = path.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(Problem::BadKey(lossy()));
        }
        let value = match serde_json::from_slice(value) {
            Ok(json) => json,
            Err(_) => Value::String(
                String::from_utf8(value.clone()).map_err(|_| Problem::BadValue(lossy()))?,
            ),
        };
        let (last, parents) = segments.split_last().expect("split yields a segment");
        let mut branch = &mut root;
        for (depth, segment) in parents.iter().enumerate() {
            let node = branch
                .entry(segment.to_string())
                .or_insert_with(|| Node::Branch(BTreeMap::new()));
            branch = match node {
                Node::Branch(children) => children,
                Node::Leaf(_) => {
                    return Err(Problem::Conflict {
                        key: segments[..=depth].join("/"),
                        child: path.to_string(),
                    });
                }
            };
        }
        // Keys come in byte order, so a parent's own value comes before the keys under it;
        // a branch found here would be the mark of some other order.
        if let Some(Node::Branch(children)) = branch.get(*last) {
            return Err(Problem::Conflict {
                key: path.to_string(),
                child: some_key(children, path),
            });
        }
        branch.insert(last.to_string(), Node::Leaf(value));
    }
    Ok(into_value(Node::Branch(root)))
}

/// The version that `raw` at `revision` makes, or why it makes none.
fn decode<T: DeserializeOwned>(revision: i64, raw: &Raw) -> Result<Version<T>, ConfigError> {
    let invalid = |problem| ConfigError::Invalid {
        revision,
        problem,
        raw: Arc::new(raw.clone()),
    };
    let json = to_json(raw).map_err(invalid)?;
    let config =
        serde_json::from_value(json).map_err(|e| invalid(Problem::Deserialize(e.to_string())))?;
    Ok(Version {
        revision,
        config,
        raw: raw.clone(),
    })
}

/// Every key under `prefix` at one revision, a page at a time: (revision, keys).
async fn read(client: &Client, prefix: &[u8]) -> Result<(i64, Raw), kv_client::Error> {
    let kv = client.kv();
    let end = prefix_end(prefix);
    let first = kv
        .get(prefix, GetOptions::new().prefix().limit(PAGE_KEYS))
        .await?;
    let revision = first.revision;
    let mut raw = Raw::new();
    let mut page = first;
    loop {
        let mut last = None;
        for pair in page.kvs {
            if let Some(relative) = pair.key.strip_prefix(prefix) {
                raw.insert(relative.to_vec(), pair.value.to_vec());
            }
            last = Some(pair.key.to_vec());
        }
        let Some(mut after) = last.filter(|_| page.more) else {
            return Ok((revision, raw));
        };
        // The next page starts just past the last key read.
        after.push(0);
        let rest = GetOptions::new().revision(revision).limit(PAGE_KEYS);
        // An all-0xff (or empty) prefix has no end key: it runs to the end of the keyspace.
        let rest = if end == [0] {
            rest.from_key()
        } else {
            rest.range_end(end.clone())
        };
        page = kv.get(after, rest).await?;
    }
}

/// Errors that pass with time (an election, a restart).
fn transient(e: &kv_client::Error) -> bool {
    e.is_retryable()
        || matches!(
            e,
            kv_client::Error::DeadlineExceeded(_) | kv_client::Error::OutcomeUnknown(_)
        )
}

/// [`read`], until it succeeds or fails for good.
async fn reread(client: &Client, prefix: &[u8]) -> Result<(i64, Raw), kv_client::Error> {
    loop {
        match read(client, prefix).await {
            Err(kv_client::Error::Compacted) => {}
            Err(e) if transient(&e) => tokio::time::sleep(RETRY_PAUSE).await,
            read => return read,
        }
    }
}

/// Applies one event to `raw`.
fn apply(raw: &mut Raw, prefix: &[u8], event: Event) {
    let Some(relative) = event.kv.key.strip_prefix(prefix) else {
        return;
    };
    match event.kind {
        EventKind::Put => raw.insert(relative.to_vec(), event.kv.value.to_vec()),
        EventKind::Delete => raw.remove(relative),
    };
}

/// Follows the prefix from the state `raw` at `revision`, sending a version per revision to
/// `tx`, until `tx` is dropped or a fatal error was sent.
async fn follow<T: DeserializeOwned>(
    client: Client,
    prefix: Vec<u8>,
    mut revision: i64,
    mut raw: Raw,
    tx: mpsc::Sender<Item<T>>,
) {
    loop {
        let mut updates = client.watch().watch(
            &prefix,
            WatchOptions::new().prefix().start_revision(revision + 1),
        );
        loop {
            let update = match updates.next().await {
                Some(Ok(update)) => update,
                Some(Err(kv_client::Error::WatchCompacted { .. })) => {
                    let (at, fresh) = match reread(&client, &prefix).await {
                        Ok(read) => read,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    let changed = fresh != raw;
                    (revision, raw) = (at, fresh);
                    if changed && tx.send(decode(at, &raw).map(Arc::new)).await.is_err() {
                        return;
                    }
                    break;
                }
                Some(Err(e)) if transient(&e) => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                None => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
            };
            // An update holds whole revisions, in order: a version per revision, made once
            // all of that revision's events are applied.
            let mut events = update.events.into_iter().peekable();
            while let Some(event) = events.next() {
                let at = event.kv.mod_revision;
                apply(&mut raw, &prefix, event);
                if events.peek().is_some_and(|e| e.kv.mod_revision == at) {
                    continue;
                }
                revision = at;
                if tx.send(decode(at, &raw).map(Arc::new)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(pairs: &[(&str, &str)]) -> Raw {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn keys_nest_and_values_are_json_or_text() {
        let keys = raw(&[
            ("db/url", "postgres://db/app"),
            ("db/name", "\"app\""),
            ("db/pool", "8"),
            ("debug", "true"),
            ("tags", "[\"a\", \"b\"]"),
            ("empty", ""),
            ("quoted", "\"true\""),
        ]);
        assert_eq!(
            to_json(&keys),
            Ok(json!({
                "db": {"url": "postgres://db/app", "name": "app", "pool": 8},
                "debug": true,
                "tags": ["a", "b"],
                "empty": "",
                "quoted": "true",
            }))
        );
        assert_eq!(to_json(&Raw::new()), Ok(json!({})));
    }

    #[test]
    fn a_key_with_a_value_and_children_is_a_conflict() {
        for keys in [
            raw(&[("db", "x"), ("db/pool", "8")]),
            // A JSON object value is not merged with the keys under it.
            raw(&[("db", "{\"url\": \"u\"}"), ("db/pool", "8")]),
            // Keys sorting between the parent and its child do not hide the conflict.
            raw(&[("db", "x"), ("db-x", "1"), ("db/a/b", "8")]),
        ] {
            assert!(
                matches!(to_json(&keys), Err(Problem::Conflict { ref key, .. }) if key == "db"),
                "{keys:?}"
            );
        }
    }

    #[test]
    fn empty_segments_and_bad_bytes_are_rejected() {
        for key in ["", "/a", "a/", "a//b"] {
            assert_eq!(
                to_json(&raw(&[(key, "1")])),
                Err(Problem::BadKey(key.to_string()))
            );
        }
        let bad_key: Raw = [(vec![0xff], b"1".to_vec())].into();
        assert!(matches!(to_json(&bad_key), Err(Problem::BadKey(_))));
        let bad_value: Raw = [(b"a".to_vec(), vec![0xff])].into();
        assert_eq!(to_json(&bad_value), Err(Problem::BadValue("a".into())));
    }

    #[test]
    fn a_version_that_does_not_deserialize_is_invalid() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Config {
            pool: u32,
        }
        let keys = raw(&[("pool", "many")]);
        match decode::<Config>(7, &keys) {
            Err(ConfigError::Invalid {
                revision: 7,
                problem: Problem::Deserialize(_),
                raw,
            }) => assert_eq!(*raw, keys),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let good = decode::<Config>(8, &raw(&[("pool", "3")])).unwrap();
        assert_eq!((good.revision, good.config.pool), (8, 3));
    }
}
