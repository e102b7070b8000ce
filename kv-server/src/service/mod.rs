//! The gRPC services, one module each: thin adapters from etcd's API onto the [`Node`].
//!
//! [`Node`]: crate::node::Node

pub mod auth;
pub mod cluster;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod loopback;
pub mod maintenance;
pub mod watch;
pub mod watch_wire;

/// A boxed server stream, the answer type of the streaming calls.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;
