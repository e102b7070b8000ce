//! kv-client: an async client for etcd-v3 servers (kv-server or etcd itself) that fails over
//! between members and retries what is safe to retry, so applications write no reconnect code.
//!
//! ```no_run
//! use kv_client::{Client, ClientOptions, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
//!
//! # async fn demo() -> kv_client::Result<()> {
//! let client = Client::connect(["127.0.0.1:2379"], ClientOptions::default()).await?;
//! let kv = client.kv();
//! kv.put("greeting", "hello", PutOptions::new()).await?;
//! let got = kv.get("greeting", GetOptions::new()).await?;
//! assert_eq!(got.kvs[0].value, b"hello");
//!
//! // Compare-and-swap: replace the value only if nobody changed it since.
//! let rev = got.kvs[0].mod_revision;
//! let swapped = kv
//!     .txn(
//!         Txn::new()
//!             .when([Compare::mod_revision("greeting", CompareOp::Equal, rev)])
//!             .and_then([TxnOp::put("greeting", "bonjour", PutOptions::new())]),
//!     )
//!     .await?;
//! assert!(swapped.succeeded);
//! # Ok(())
//! # }
//! ```
//!
//! Watches share one stream per client and resume by themselves after a member fails or the
//! connection drops, from the last revision they delivered, so no event is lost or repeated:
//!
//! ```no_run
//! use futures::StreamExt;
//! use kv_client::{Client, ClientOptions, WatchOptions};
//!
//! # async fn demo() -> kv_client::Result<()> {
//! let client = Client::connect(["127.0.0.1:2379"], ClientOptions::default()).await?;
//! let mut updates = client.watch().watch("service/", WatchOptions::new().prefix());
//! while let Some(update) = updates.next().await {
//!     for event in update?.events {
//!         println!("{:?} {}", event.kind, String::from_utf8_lossy(&event.kv.key));
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors ([`Error`]) say what the caller can do: [`Error::is_retryable`] failures were not
//! applied; [`Error::OutcomeUnknown`] means a write may or may not have happened (the client
//! never resends such a write by itself); the rest are the server's refusals, with etcd's
//! kinds (compacted, lease not found, ...) as variants.

mod client;
mod cluster;
mod error;
mod kv;
mod lease;
mod maintenance;
mod txn;
mod watch;

pub use client::{Client, ClientOptions};
pub use cluster::{Cluster, Member};
pub use error::{Error, Result};
pub use kv::{
    DeleteOptions, DeleteResponse, GetOptions, GetResponse, Kv, PutOptions, PutResponse, prefix_end,
};
pub use kv_core::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
pub use kv_core::proto::mvccpb::KeyValue;
pub use lease::{KeepAlive, Lease, LeaseGrant, LeaseLost, TimeToLive};
pub use maintenance::{Alarm, Maintenance, Status};
pub use txn::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse, TxnResponse};
pub use watch::{Event, EventKind, Watch, WatchOptions, WatchStream, WatchUpdate};
