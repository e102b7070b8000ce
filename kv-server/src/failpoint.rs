//! Fault injection for whole-system tests, as etcd's failpoints: off unless the environment
//! names a file. `KV_FAILPOINT_ISOLATE_FILE=/path`: while that file exists, this member's peer
//! traffic is cut in both directions (its calls to peers fail as unreachable, and it refuses
//! peer calls), which is a network partition around this member without root or namespaces.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the isolation switch file.
pub const ISOLATE_ENV: &str = "KV_FAILPOINT_ISOLATE_FILE";

fn switch() -> Option<&'static PathBuf> {
    static SWITCH: OnceLock<Option<PathBuf>> = OnceLock::new();
    SWITCH
        .get_or_init(|| std::env::var_os(ISOLATE_ENV).map(PathBuf::from))
        .as_ref()
}

/// True while this member is to behave as cut off from its peers.
pub fn isolated() -> bool {
    switch().is_some_and(|p| p.exists())
}
