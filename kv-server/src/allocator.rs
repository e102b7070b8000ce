//! The memory allocator: mimalloc, declared as the global allocator in `main.rs` and tuned
//! by `allocator.c` before the first allocation.

// Links mimalloc's C library into every build of this crate, tests included, for the two
// functions `allocator.c` calls.
use libmimalloc_sys as _;

unsafe extern "C" {
    fn kv_allocator_arena_eager_commit() -> std::ffi::c_long;
}

/// mimalloc's arena eager-commit option as the process runs with it (0 once `allocator.c`
/// has run). The server logs it at startup, which also keeps the tuning in the link.
pub fn arena_eager_commit() -> std::ffi::c_long {
    // SAFETY: a C function without arguments that only reads mimalloc's option table.
    unsafe { kv_allocator_arena_eager_commit() }
}

#[cfg(test)]
mod tests {
    /// The constructor in `allocator.c` ran before this test: arenas are committed lazily.
    #[test]
    fn arenas_are_not_committed_eagerly() {
        assert_eq!(super::arena_eager_commit(), 0);
    }
}
