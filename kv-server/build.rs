//! Compiles `src/allocator.c`, the mimalloc tuning, against the header of the mimalloc that
//! `libmimalloc-sys` builds, so options are named by that header rather than by numbers
//! copied into Rust (mimalloc renumbers its options between major versions).

fn main() {
    println!("cargo:rerun-if-changed=src/allocator.c");
    let Ok(include) = std::env::var("DEP_MIMALLOC_INCLUDE_DIR") else {
        panic!("libmimalloc-sys did not export its include directory");
    };
    cc::Build::new()
        .file("src/allocator.c")
        .include(include)
        .compile("kv_allocator");
}
