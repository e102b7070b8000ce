//! kv-core: the etcd v3 protocol types and the storage engine.
//!
//! The protocol (`proto`) is always built; the engine (MVCC store, backends, apply) sits behind
//! the default `engine` feature so that a client can depend on this crate for the protocol only.
//! The engine knows no sockets, no clocks and no Raft: it applies ordered commands.

pub mod proto;

#[cfg(feature = "engine")]
mod apply;
#[cfg(feature = "engine")]
pub mod auth;
#[cfg(feature = "engine")]
pub mod backend;
#[cfg(feature = "engine")]
pub mod checksum;
#[cfg(feature = "engine")]
pub mod command;
#[cfg(feature = "engine")]
pub mod error;
#[cfg(feature = "engine")]
pub mod key_index;
#[cfg(feature = "engine")]
pub mod lease;
#[cfg(feature = "engine")]
pub mod mvcc;
#[cfg(feature = "engine")]
pub mod revision;
#[cfg(feature = "engine")]
pub mod store;
#[cfg(feature = "engine")]
pub mod validation;
#[cfg(feature = "engine")]
pub mod watch;

#[cfg(feature = "engine")]
pub use apply::{txn_is_read_only, txn_reads_single_keys};
#[cfg(feature = "engine")]
pub use error::{EngineError, Error, KvError};
#[cfg(feature = "engine")]
pub use store::{Store, StoreConfig, StoreStatus};
