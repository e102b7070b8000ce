//! Compiles the etcd-compatible `.proto` files under `proto/` into Rust
//! (prost messages + tonic clients/servers) using the pure-Rust `protox`
//! parser, so no `protoc` binary is required.

use std::io;

const PROTO_ROOT: &str = "proto";

const PROTOS: &[&str] = &[
    "proto/mvccpb/kv.proto",
    "proto/authpb/auth.proto",
    "proto/etcdserverpb/rpc.proto",
    "proto/v3lockpb/v3lock.proto",
    "proto/v3electionpb/v3election.proto",
    "proto/kvserverpb/internal.proto",
    "proto/kvserverpb/peer.proto",
];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let fds = protox::compile(PROTOS, [PROTO_ROOT])
        .map_err(|e| io::Error::other(format!("protox: {e:?}")))?;

    tonic_prost_build::configure()
        // Keys and values as reference-counted `Bytes`: a watch event fanned out to a thousand
        // watchers shares one copy instead of making a thousand, and a client decodes them
        // as slices of the received buffer.
        .bytes(".mvccpb.KeyValue")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
}
