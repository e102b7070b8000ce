//! The gRPC services, one module each: thin adapters from etcd's API onto the [`Node`].
//!
//! [`Node`]: crate::node::Node

pub mod cluster;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod loopback;
pub mod maintenance;
pub mod pending;
pub mod watch;
pub mod watch_wire;
