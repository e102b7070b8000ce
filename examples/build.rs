//! Compiles the demo service's protocol with the pure-Rust `protox` parser (no `protoc`).

use std::io;

const PROTO: &str = "proto/hello.proto";

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])
        .map_err(|e| io::Error::other(format!("protox: {e:?}")))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
}
