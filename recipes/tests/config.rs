//! `ConfigWatch` against our server and etcd 3.4 with the same bodies: the first load, one
//! version per transaction with all of its changes, invalid versions reported while the last
//! good one stays current, nothing skipped under a quick series of writes, and a fresh read
//! after the history the watch needs was compacted away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kv_client::{Client, ClientOptions, DeleteOptions, PutOptions, Txn, TxnOp};
use kv_tests::on_both_servers;
use recipes::config::{ConfigError, ConfigWatch, Item, Problem, Version};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize, PartialEq)]
struct Db {
    url: String,
    pool: u32,
}

#[derive(Debug, Deserialize, PartialEq)]
struct App {
    db: Db,
    #[serde(default)]
    debug: bool,
    name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// Two numbers every writer changes together.
#[derive(Debug, Deserialize, PartialEq)]
struct Pair {
    a: u64,
    b: u64,
}

async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect")
}

async fn put(client: &Client, key: &str, value: &str) -> i64 {
    client
        .kv()
        .put(key, value, PutOptions::new())
        .await
        .expect("put")
        .revision
}

async fn txn(client: &Client, ops: impl IntoIterator<Item = TxnOp>) -> i64 {
    let resp = client
        .kv()
        .txn(Txn::new().and_then(ops))
        .await
        .expect("txn");
    assert!(resp.succeeded);
    resp.revision
}

/// A txn setting both numbers of a [`Pair`] under `app/` to `n`.
async fn bump(client: &Client, n: u64) -> i64 {
    txn(
        client,
        [
            TxnOp::put("app/a", n.to_string(), PutOptions::new()),
            TxnOp::put("app/b", n.to_string(), PutOptions::new()),
        ],
    )
    .await
}

/// The watch's next item, which must come within [`WAIT`].
async fn next<T>(watch: &mut ConfigWatch<T>) -> Item<T> {
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the config stream ended"),
        Err(_) => panic!("no config version within {WAIT:?}"),
    }
}

/// The watch's next item, which must be a good version.
async fn next_version<T: std::fmt::Debug>(watch: &mut ConfigWatch<T>) -> Arc<Version<T>> {
    next(watch).await.expect("a good version")
}

/// The watch's next item, which must be an invalid version: (revision, problem).
async fn next_invalid<T: std::fmt::Debug>(watch: &mut ConfigWatch<T>) -> (i64, Problem) {
    match next(watch).await {
        Err(ConfigError::Invalid {
            revision, problem, ..
        }) => (revision, problem),
        other => panic!("expected an invalid version, got {other:?}"),
    }
}

async fn load_and_follow_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    put(&client, "app/db/url", "postgres://db/app").await;
    put(&client, "app/db/pool", "8").await;
    put(&client, "app/name", "\"svc\"").await;
    put(&client, "app/debug", "true").await;
    // Beside the prefix, not under it.
    put(&client, "apps/debug", "not json").await;
    let before = put(&client, "app.db", "x").await;

    let mut watch = ConfigWatch::<App>::start(&client, "app/").await.unwrap();
    let first = watch.current();
    assert!(first.revision >= before, "read at {}", first.revision);
    assert_eq!(
        first.config,
        App {
            db: Db {
                url: "postgres://db/app".into(),
                pool: 8
            },
            debug: true,
            name: Some("svc".into()),
            tags: vec![],
        }
    );
    assert_eq!(first.raw.len(), 4);
    assert_eq!(first.raw[&b"db/pool"[..]], b"8");

    // A txn changing three keys is one version with all three.
    let rev = txn(
        &client,
        [
            TxnOp::put("app/db/pool", "16", PutOptions::new()),
            TxnOp::put("app/db/url", "\"postgres://db2/app\"", PutOptions::new()),
            TxnOp::put("app/tags", "[\"x\", \"y\"]", PutOptions::new()),
        ],
    )
    .await;
    let v = next_version(&mut watch).await;
    assert_eq!(v.revision, rev);
    assert_eq!(v.config.db.pool, 16);
    assert_eq!(v.config.db.url, "postgres://db2/app");
    assert_eq!(v.config.tags, ["x", "y"]);
    assert_eq!(watch.current(), v);

    // A single put.
    let rev = put(&client, "app/debug", "false").await;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, v.config.debug), (rev, false));

    // A delete: the field is gone.
    let rev = client
        .kv()
        .delete("app/name", DeleteOptions::new())
        .await
        .unwrap()
        .revision;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, v.config.name.as_deref()), (rev, None));
    assert!(!v.raw.contains_key(&b"name"[..]));

    // Writes beside the prefix make no version.
    put(&client, "apps/debug", "still not json").await;
    let rev = put(&client, "app/debug", "true").await;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, v.config.debug), (rev, true));

    // The prefix is relative to the client's namespace.
    let scoped = client.with_namespace("app/");
    let mut db = ConfigWatch::<Db>::start(&scoped, "db/").await.unwrap();
    assert_eq!(
        db.current().config,
        Db {
            url: "postgres://db2/app".into(),
            pool: 16
        }
    );
    let rev = put(&client, "app/db/pool", "4").await;
    let v = next_version(&mut db).await;
    assert_eq!((v.revision, v.config.pool), (rev, 4));
}
on_both_servers!(
    load_and_follow_scenario,
    config_loads_and_follows_on_our_server,
    config_loads_and_follows_on_etcd,
    60
);

async fn invalid_versions_scenario(endpoint: &str) {
    let client = connect(endpoint).await;
    // A first version that does not deserialize fails the start.
    let rev = put(&client, "app/db/pool", "many").await;
    match ConfigWatch::<App>::start(&client, "app/").await {
        Err(ConfigError::Invalid {
            revision,
            problem: Problem::Deserialize(_),
            raw,
        }) => {
            assert!(revision >= rev);
            assert_eq!(raw[&b"db/pool"[..]], b"many");
        }
        other => panic!("expected an invalid first version, got {:?}", other.err()),
    }
    let rev = txn(
        &client,
        [
            TxnOp::put("app/db/pool", "8", PutOptions::new()),
            TxnOp::put("app/db/url", "u1", PutOptions::new()),
        ],
    )
    .await;
    let mut watch = ConfigWatch::<App>::start(&client, "app/").await.unwrap();
    let good = watch.current();
    assert!(good.revision >= rev);

    // A bad value: an error item, and the last good version stays current.
    let bad = put(&client, "app/db/pool", "many").await;
    assert_eq!(
        next_invalid(&mut watch).await.0,
        bad,
        "the invalid version's revision"
    );
    assert_eq!(watch.current(), good);
    // Still bad after another change; then fixed.
    let bad = put(&client, "app/db/url", "u2").await;
    assert_eq!(next_invalid(&mut watch).await.0, bad);
    assert_eq!(watch.current(), good);
    let fixed = put(&client, "app/db/pool", "9").await;
    let v = next_version(&mut watch).await;
    assert_eq!(
        (v.revision, v.config.db.url.as_str(), v.config.db.pool),
        (fixed, "u2", 9)
    );
    assert_eq!(watch.current(), v);

    // A key that is both a value and a parent.
    put(&client, "app/debug", "true").await;
    assert!(next_version(&mut watch).await.config.debug);
    let rev = put(&client, "app/debug/verbose", "1").await;
    assert_eq!(
        next_invalid(&mut watch).await,
        (
            rev,
            Problem::Conflict {
                key: "debug".into(),
                child: "debug/verbose".into()
            }
        )
    );
    client
        .kv()
        .delete("app/debug/verbose", DeleteOptions::new())
        .await
        .unwrap();
    assert!(next_version(&mut watch).await.config.debug);

    // A key with an empty segment.
    let rev = put(&client, "app/db//x", "1").await;
    assert_eq!(
        next_invalid(&mut watch).await,
        (rev, Problem::BadKey("db//x".into()))
    );
    let rev = client
        .kv()
        .delete("app/db//x", DeleteOptions::new())
        .await
        .unwrap()
        .revision;
    assert_eq!(next_version(&mut watch).await.revision, rev);
}
on_both_servers!(
    invalid_versions_scenario,
    config_reports_invalid_versions_on_our_server,
    config_reports_invalid_versions_on_etcd,
    60
);

async fn many_txns_scenario(endpoint: &str) {
    const TXNS: u64 = 100;
    let client = connect(endpoint).await;
    bump(&client, 0).await;
    let mut watch = ConfigWatch::<Pair>::start(&client, "app/").await.unwrap();
    let mut last = watch.current().revision;
    // Written before anything is read: the versions queue up, then arrive in bulk.
    let mut revisions = Vec::new();
    for n in 1..=TXNS {
        revisions.push(bump(&client, n).await);
    }
    for (n, rev) in (1..=TXNS).zip(revisions) {
        let v = next_version(&mut watch).await;
        assert_eq!(v.config, Pair { a: n, b: n }, "version at {}", v.revision);
        assert!(v.revision > last, "{} after {last}", v.revision);
        assert_eq!(v.revision, rev);
        last = v.revision;
    }
    // And while being read: a writer in the background.
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for n in TXNS + 1..=2 * TXNS {
                bump(&client, n).await;
            }
        })
    };
    for n in TXNS + 1..=2 * TXNS {
        let v = next_version(&mut watch).await;
        assert_eq!(v.config, Pair { a: n, b: n });
        assert!(v.revision > last);
        last = v.revision;
    }
    writer.await.unwrap();
}
on_both_servers!(
    many_txns_scenario,
    config_skips_no_version_on_our_server,
    config_skips_no_version_on_etcd,
    120
);

/// A loopback TCP proxy in front of a server that a test can cut (every connection dropped,
/// new ones refused) and heal, to keep one client away from the server for a while.
struct Proxy {
    endpoint: String,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

struct ProxyState {
    open: bool,
    conns: Vec<JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(ProxyState {
            open: true,
            conns: Vec::new(),
        }));
        let shared = state.clone();
        let upstream = upstream.to_string();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                if !state.open {
                    // Dropping the connection refuses it.
                    continue;
                }
                let upstream = upstream.clone();
                state.conns.retain(|c| !c.is_finished());
                state.conns.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy {
            endpoint,
            state,
            accept,
        }
    }

    fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.open = false;
        for conn in state.conns.drain(..) {
            conn.abort();
        }
    }

    fn heal(&self) {
        self.state.lock().unwrap().open = true;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn compaction_scenario(endpoint: &str) {
    let writer = connect(endpoint).await;
    let proxy = Proxy::start(endpoint).await;
    // The watching client comes back quickly once the proxy lets it.
    let options = ClientOptions {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    let reader = Client::connect([proxy.endpoint.as_str()], options)
        .await
        .expect("connect through the proxy");
    bump(&writer, 1).await;
    let mut watch = ConfigWatch::<Pair>::start(&reader, "app/").await.unwrap();
    let rev = bump(&writer, 2).await;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, &v.config), (rev, &Pair { a: 2, b: 2 }));

    // While the reader is cut off, versions 3..=5 are written and their history compacted:
    // the watch cannot resume, so the next version is a fresh read showing 5.
    proxy.cut();
    for n in 3..=5 {
        bump(&writer, n).await;
    }
    let compacted = bump(&writer, 6).await;
    writer.kv().compact(compacted, true).await.unwrap();
    proxy.heal();
    let v = next_version(&mut watch).await;
    assert_eq!(v.config, Pair { a: 6, b: 6 }, "at {}", v.revision);
    assert!(v.revision >= compacted);
    assert_eq!(watch.current(), v);

    // A compaction past changes that left the keys as they were yields no version: the next
    // one is the next change, and the watch follows on from the fresh read.
    proxy.cut();
    bump(&writer, 7).await;
    let compacted = bump(&writer, 6).await;
    writer.kv().compact(compacted, true).await.unwrap();
    proxy.heal();
    // Time to reconnect (backoff at most 100 ms) and read the unchanged keys again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rev = bump(&writer, 8).await;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, &v.config), (rev, &Pair { a: 8, b: 8 }));
    let rev = bump(&writer, 9).await;
    let v = next_version(&mut watch).await;
    assert_eq!((v.revision, &v.config), (rev, &Pair { a: 9, b: 9 }));
}
on_both_servers!(
    compaction_scenario,
    config_reads_again_after_compaction_on_our_server,
    config_reads_again_after_compaction_on_etcd,
    60
);

/// Deserializations of [`Counted`] so far: the background task decodes every version, so
/// the count shows whether it still runs.
static DECODED: AtomicUsize = AtomicUsize::new(0);

/// A [`Pair`] that counts its deserializations.
#[derive(Debug)]
struct Counted(#[allow(dead_code)] Pair);

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DECODED.fetch_add(1, Ordering::SeqCst);
        Pair::deserialize(d).map(Counted)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_watch_stops_following() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = kv_tests::start_kv_server(&dir.path().join("data"), &[]);
        let client = connect(&server.endpoint).await;
        bump(&client, 1).await;
        let mut watch = ConfigWatch::<Counted>::start(&client, "app/")
            .await
            .unwrap();
        let rev = bump(&client, 2).await;
        next_version(&mut watch).await;
        let version = watch.current();
        drop(watch);
        let decoded = DECODED.load(Ordering::SeqCst);
        for n in 3..=5 {
            bump(&client, n).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(DECODED.load(Ordering::SeqCst), decoded, "still following");
        // The version handed out outlives the watch.
        assert_eq!(version.revision, rev);
    })
    .await
    .expect("test timed out");
}
