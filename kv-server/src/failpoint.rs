//! Fault injection for whole-system tests, as etcd's failpoints. Every failpoint is off
//! unless the environment names it, and costs one cached lookup when off. They are compiled
//! into the release binary on purpose: the reliability harness drives the binary users run.
//!
//! - `KV_FAILPOINT_ISOLATE_FILE=/path`: while that file exists, this member's peer traffic is
//!   cut. If the file is blank, it is cut in both directions with every peer: its calls fail
//!   as unreachable and it refuses peer calls. If the file lists peer URLs (whitespace
//!   separated), only the calls to those peers fail. A partition is then made by listing
//!   each side's peers in the other side's files. This needs no root or namespaces.
//! - `KV_FAILPOINT_CRASH_FILE=/path`: while that file holds `point[:n][,point[:n]...]`, the
//!   n-th time (the first by default) this member passes `point`, it kills itself with
//!   SIGKILL. There is no unwinding and no flush, as with a power cut or `kill -9` at that
//!   instant. The points are the [`CrashPoint`] names. The file is read at every pass, so a
//!   harness arms a running member; passes count from when the file's content last changed.
//! - `KV_FAILPOINT_SYNC_DELAY_FILE=/path`: while that file exists, every Raft log sync first
//!   sleeps for the milliseconds the file holds (a slow disk).
//! - `KV_FAILPOINT_DISK_FULL_FILE=/path`: while that file exists, every Raft log write fails
//!   with ENOSPC (a full disk).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The environment variable naming the isolation switch file.
pub const ISOLATE_ENV: &str = "KV_FAILPOINT_ISOLATE_FILE";
/// The environment variable naming the file that arms crash points.
pub const CRASH_FILE_ENV: &str = "KV_FAILPOINT_CRASH_FILE";
/// The environment variable naming the slow-disk switch file.
pub const SYNC_DELAY_ENV: &str = "KV_FAILPOINT_SYNC_DELAY_FILE";
/// The environment variable naming the full-disk switch file.
pub const DISK_FULL_ENV: &str = "KV_FAILPOINT_DISK_FULL_FILE";

/// The places a member can be made to crash, named as `KV_FAILPOINT_CRASH` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Log entries written to the page cache, not yet synced.
    WalAppendBeforeSync,
    /// Log entries synced, not yet acknowledged to Raft.
    WalAppendAfterSync,
    /// A snapshot is to be built: nothing of it done yet.
    SnapshotBuildStart,
    /// The engine synced for a snapshot, its meta not yet recorded.
    SnapshotBuildAfterSync,
    /// A snapshot serialized for a follower, not yet sent.
    SnapshotBuildAfterSerialize,
    /// A received snapshot is to be installed: the engine not yet touched.
    SnapshotInstallStart,
    /// A received snapshot installed in the engine, Raft not yet told.
    SnapshotInstallAfterRestore,
    /// The log is to be purged behind a snapshot.
    LogPurgeStart,
    /// The purge record synced, old segments not yet deleted.
    LogPurgeAfterRecord,
    /// A compaction is to be applied to the engine.
    CompactionStart,
    /// A compaction applied, not yet synced.
    CompactionAfterApply,
    /// A batch of committed entries is to be applied.
    ApplyStart,
}

impl CrashPoint {
    /// Every point, for harnesses that pick one.
    pub const ALL: [CrashPoint; 12] = [
        CrashPoint::WalAppendBeforeSync,
        CrashPoint::WalAppendAfterSync,
        CrashPoint::SnapshotBuildStart,
        CrashPoint::SnapshotBuildAfterSync,
        CrashPoint::SnapshotBuildAfterSerialize,
        CrashPoint::SnapshotInstallStart,
        CrashPoint::SnapshotInstallAfterRestore,
        CrashPoint::LogPurgeStart,
        CrashPoint::LogPurgeAfterRecord,
        CrashPoint::CompactionStart,
        CrashPoint::CompactionAfterApply,
        CrashPoint::ApplyStart,
    ];

    /// The name `KV_FAILPOINT_CRASH` uses.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::WalAppendBeforeSync => "wal-append-before-sync",
            CrashPoint::WalAppendAfterSync => "wal-append-after-sync",
            CrashPoint::SnapshotBuildStart => "snapshot-build-start",
            CrashPoint::SnapshotBuildAfterSync => "snapshot-build-after-sync",
            CrashPoint::SnapshotBuildAfterSerialize => "snapshot-build-after-serialize",
            CrashPoint::SnapshotInstallStart => "snapshot-install-start",
            CrashPoint::SnapshotInstallAfterRestore => "snapshot-install-after-restore",
            CrashPoint::LogPurgeStart => "log-purge-start",
            CrashPoint::LogPurgeAfterRecord => "log-purge-after-record",
            CrashPoint::CompactionStart => "compaction-start",
            CrashPoint::CompactionAfterApply => "compaction-after-apply",
            CrashPoint::ApplyStart => "apply-start",
        }
    }
}

fn file_of(
    var: &'static str,
    cell: &'static OnceLock<Option<PathBuf>>,
) -> Option<&'static PathBuf> {
    cell.get_or_init(|| std::env::var_os(var).map(PathBuf::from))
        .as_ref()
}

fn isolate_file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    file_of(ISOLATE_ENV, &FILE)
}

/// The isolation switch's content while it exists: `Some(peers)`, empty meaning every peer.
fn isolation() -> Option<String> {
    std::fs::read_to_string(isolate_file()?).ok()
}

/// True while this member is to behave as cut off from every peer (and refuse peer calls).
pub fn isolated() -> bool {
    isolation().is_some_and(|peers| peers.trim().is_empty())
}

/// True while this member's calls to the peer at `addr` (its peer URL) are to fail.
pub fn cut_off(addr: &str) -> bool {
    isolation().is_some_and(|peers| {
        let peers = peers.trim();
        peers.is_empty() || peers.split_whitespace().any(|p| p == addr)
    })
}

/// The crash switch's content when last read, and the passes of each point since.
#[derive(Default)]
struct Passes {
    spec: String,
    counts: Vec<(String, u64)>,
}

fn crash_file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    file_of(CRASH_FILE_ENV, &FILE)
}

/// True when this member runs under a harness that may arm crash points: callers skip work
/// done only to find their point.
pub fn crash_armed() -> bool {
    crash_file().is_some()
}

/// Kills this process with SIGKILL if the crash switch arms `point` for this pass.
pub fn crash(point: CrashPoint) {
    static PASSES: Mutex<Passes> = Mutex::new(Passes {
        spec: String::new(),
        counts: Vec::new(),
    });
    let Some(path) = crash_file() else {
        return;
    };
    let spec = std::fs::read_to_string(path).unwrap_or_default();
    let name = point.name();
    let mut passes = PASSES.lock().unwrap_or_else(|e| e.into_inner());
    if passes.spec != spec {
        *passes = Passes {
            spec: spec.clone(),
            counts: Vec::new(),
        };
    }
    let nth = spec.split(',').find_map(|item| {
        let item = item.trim();
        match item.split_once(':') {
            Some((p, n)) if p == name => Some(n.trim().parse::<u64>().unwrap_or(1).max(1)),
            None if item == name => Some(1),
            _ => None,
        }
    });
    let Some(nth) = nth else {
        return;
    };
    let pass = match passes.counts.iter_mut().find(|(p, _)| p == name) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            passes.counts.push((name.to_string(), 1));
            1
        }
    };
    if pass == nth {
        // stderr is unbuffered: the harness reads this line to count the crash as one at
        // this point, not a death of another cause.
        eprintln!("failpoint: crash at {name} (pass {pass})");
        // SAFETY: getpid and kill have no preconditions; SIGKILL ends the process here.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Sleeps as long as the slow-disk switch says, if it exists. Blocking: call it on the
/// thread that syncs.
pub fn sync_delay() {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(path) = file_of(SYNC_DELAY_ENV, &FILE) else {
        return;
    };
    let ms = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(ms) = ms {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// ENOSPC while the full-disk switch exists, as a write to a full disk fails.
pub fn disk_full() -> std::io::Result<()> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    match file_of(DISK_FULL_ENV, &FILE) {
        Some(path) if path.exists() => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crash_point_has_a_distinct_name() {
        let mut names: Vec<_> = CrashPoint::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CrashPoint::ALL.len());
    }
}
