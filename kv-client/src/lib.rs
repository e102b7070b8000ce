//! kv-client: an async client for etcd-v3 servers (kv-server or etcd itself) that fails over
//! between members and retries what is safe to retry, so applications write no reconnect code.
//!
//! The examples below run as tests against a kv-server embedded in the test process (the
//! hidden lines start it on a loopback port; `endpoint` is its `host:port`).
//!
//! # Connect, put, get and compare-and-swap
//!
//! ```
//! use kv_client::{Client, ClientOptions, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! // List every member: calls move to another one when the one in use fails.
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! let kv = client.kv();
//! kv.put("greeting", "hello", PutOptions::new()).await?;
//! let got = kv.get("greeting", GetOptions::new()).await?;
//! assert_eq!(got.kvs[0].value, &b"hello"[..]);
//!
//! // Replace the value only if nobody changed it since it was read.
//! let read_at = got.kvs[0].mod_revision;
//! let swapped = kv
//!     .txn(
//!         Txn::new()
//!             .when([Compare::mod_revision("greeting", CompareOp::Equal, read_at)])
//!             .and_then([TxnOp::put("greeting", "bonjour", PutOptions::new())]),
//!     )
//!     .await?;
//! assert!(swapped.succeeded);
//!
//! // A namespace view prefixes every key it sends and strips it from every key it gets.
//! let app = client.with_namespace("app/");
//! app.kv().put("config", "on", PutOptions::new()).await?;
//! assert_eq!(kv.get("app/config", GetOptions::new()).await?.kvs.len(), 1);
//! assert_eq!(app.kv().get("", GetOptions::new().prefix()).await?.kvs[0].key, &b"config"[..]);
//! # Ok(())
//! # }
//! ```
//!
//! # Watch
//!
//! Watches share one stream per client and resume by themselves after a member fails or the
//! connection drops, from the last revision they delivered, so no event is lost or repeated.
//! Dropping the stream cancels the watch.
//!
//! ```
//! use futures::StreamExt;
//! use kv_client::{Client, ClientOptions, EventKind, PutOptions, WatchOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! let put = client.kv().put("service/a", "10.0.0.1:80", PutOptions::new()).await?;
//!
//! // From the revision of that put on: history first, then live changes.
//! let mut updates = client
//!     .watch()
//!     .watch("service/", WatchOptions::new().prefix().start_revision(put.revision));
//! client.kv().delete("service/a", Default::default()).await?;
//!
//! let mut seen = Vec::new();
//! while seen.len() < 2 {
//!     let update = updates.next().await.expect("the stream stays open")?;
//!     seen.extend(update.events.into_iter().map(|e| (e.kind, e.kv.key)));
//! }
//! assert_eq!(
//!     seen,
//!     [(EventKind::Put, "service/a".into()), (EventKind::Delete, "service/a".into())]
//! );
//! # Ok(())
//! # }
//! ```
//!
//! # Leases and keep-alive
//!
//! A key attached to a lease is deleted when the lease ends. A [`KeepAlive`] handle renews the
//! lease in the background (at a third of its TTL, through failovers) until it is dropped, and
//! says when the lease was lost anyway.
//!
//! ```
//! use kv_client::{Client, ClientOptions, GetOptions, PutOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! let lease = client.lease().grant(10, None).await?;
//! client
//!     .kv()
//!     .put("workers/w1", "busy", PutOptions::new().lease(lease.id))
//!     .await?;
//! let alive = client.lease().keep_alive(lease.id).await?;
//! assert!(alive.valid_until() > std::time::Instant::now());
//!
//! // Elsewhere, e.g. in a `tokio::select!` beside the work: `alive.lost().await` returns
//! // once the lease is gone (revoked, expired, or not renewed in time).
//! client.lease().revoke(lease.id).await?;
//! let why = alive.lost().await;
//! println!("lease lost: {why}");
//! assert!(client.kv().get("workers/w1", GetOptions::new()).await?.kvs.is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! # Errors
//!
//! Errors ([`Error`]) say what the caller can do: [`Error::is_retryable`] failures were not
//! applied; [`Error::OutcomeUnknown`] means a write may or may not have happened (the client
//! never resends such a write by itself); the rest are the server's refusals, with etcd's
//! kinds (compacted, lease not found, ...) as variants.

mod auth;
mod client;
mod cluster;
pub mod coalesce;
mod error;
mod kv;
mod lease;
mod maintenance;
mod txn;
mod watch;

pub use auth::{Access, Auth, AuthStatus, KeyPermission, ROOT};
pub use client::{Client, ClientOptions, Credentials, TlsOptions};
pub use cluster::{Cluster, Member};
pub use error::{Error, Result};
pub use kv::{
    DeleteOptions, DeleteResponse, GetOptions, GetResponse, Kv, PutOptions, PutResponse, prefix_end,
};
pub use kv_core::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
pub use kv_core::proto::mvccpb::KeyValue;
pub use lease::{KeepAlive, Lease, LeaseGrant, LeaseLost, TimeToLive};
pub use maintenance::{Alarm, Maintenance, SnapshotDownload, Status};
pub use txn::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse, TxnResponse};
pub use watch::{Event, EventKind, Watch, WatchOptions, WatchStream, WatchUpdate};
