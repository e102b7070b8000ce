//! kv-server: the etcd v3 gRPC services over the kv-core engine, Raft in front of it, and the
//! `kv-server` binary's start-up and flags.

pub mod allocator;
pub mod auth;
pub mod compaction;
pub mod config;
pub mod errors;
pub mod failpoint;
pub mod http;
pub mod identity;
pub mod lessor;
pub mod metrics;
pub mod node;
pub mod oversize;
pub mod raft;
pub mod recipe_state;
pub mod runtime;
pub mod server;
pub mod service;
pub mod tls;
pub mod ui;
