//! recipes: coordination primitives over [`kv_client`], for kv-server and etcd alike.
//!
//! Everything a recipe holds is a key on a [`Session`]'s lease, so a process that dies frees
//! what it held once its lease expires. Rivals are ordered by their keys' create revisions and
//! each waits on one predecessor, so a release wakes one waiter. Every hold carries a
//! [`Fence`] (the key's create revision, increasing from holder to holder), a compare that
//! fails once the hold is gone ([`Guard::is_owner`], [`Leadership::is_leader`]) for the
//! holder's own transactions, and a `lost()` future that says when the hold ended without
//! being released.
//!
//! | recipe | keys |
//! | --- | --- |
//! | [`Mutex`] (etcd `concurrency.Mutex` layout) | `<name>/<lease hex>` |
//! | [`RwLock`] | `<name>/read/<lease hex>`, `<name>/write/<lease hex>` |
//! | [`Semaphore`] | `<name>/<lease hex>_<random hex>` |
//! | [`Election`] (etcd `concurrency.Election` layout) | `<name>/<lease hex>` = value |
//! | [`Barrier`] | `<name>` |
//! | [`DoubleBarrier`] | `<name>/waiters/<lease hex>_<random hex>`, `<name>/ready` |
//! | [`Queue`] | `<name>/items/...`, `<name>/claims/...`, `<name>/dead/...`, `<name>/slots/<n>` (see [`Queue`]'s module) |
//!
//! The example runs as a test against a kv-server embedded in the test process (the hidden
//! lines start it); `endpoint` is its `host:port`.
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use kv_client::{Client, ClientOptions, PutOptions, TxnOp};
//! use recipes::{Election, Mutex, Observation, Session};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! // One session per process: if the process dies, its holds end a TTL later.
//! let session = Session::with_ttl(&client, 10).await?;
//!
//! // A lock, with a deadline on the wait (dropping the wait leaves the queue).
//! let mutex = Mutex::new(&session, "locks/reindex");
//! let guard = tokio::time::timeout(Duration::from_secs(5), mutex.lock()).await??;
//! // Writes guarded by ownership are refused once the lock is lost.
//! let write = guard.txn().and_then([TxnOp::put("index/owner", "me", PutOptions::new())]);
//! assert!(client.kv().txn(write).await?.succeeded);
//! println!("holding with fencing token {}", guard.fence().revision);
//! guard.unlock().await?;
//!
//! // An election, and an observer that also says when nobody leads.
//! let election = Election::new(&client, "elections/indexer");
//! let mut changes = election.observe();
//! assert_eq!(changes.next().await.transpose()?, Some(Observation::Vacant));
//! let leadership = election.campaign(&session, "worker-1").await?;
//! assert!(matches!(changes.next().await.transpose()?, Some(Observation::Elected(kv)) if kv.value == "worker-1"));
//! leadership.resign().await?;
//! assert_eq!(changes.next().await.transpose()?, Some(Observation::Vacant));
//! session.close().await?;
//! # Ok(())
//! # }
//! ```

mod barrier;
mod condition;
pub mod config;
pub mod discovery;
mod election;
mod error;
pub mod inspect;
mod mutex;
mod owned;
mod predecessor;
mod queue;
mod rwlock;
mod semaphore;
mod session;

pub use barrier::{Barrier, DoubleBarrier, Entered};
pub use condition::Condition;
pub use election::{Election, Leadership, Observation, Observer};
pub use error::{Error, Result};
pub use mutex::Mutex;
pub use owned::{Fence, Guard, Loss};
pub use queue::{Claimed, EnqueueOptions, PriorityQueue, Queue, QueueOptions};
pub use rwlock::RwLock;
pub use semaphore::Semaphore;
pub use session::{DEFAULT_TTL, Session};
