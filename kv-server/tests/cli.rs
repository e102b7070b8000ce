//! The binary's command line. (Having an integration test here also makes `cargo test`
//! build the `kv-server` binary that the whole-system tests in `tests/` start.)

use std::process::Command;

#[test]
fn help_lists_etcd_flag_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_kv-server"))
        .arg("--help")
        .output()
        .expect("run kv-server --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--name",
        "--data-dir",
        "--listen-client-urls",
        "--advertise-client-urls",
        "--listen-peer-urls",
        "--initial-advertise-peer-urls",
        "--initial-cluster",
        "--initial-cluster-state",
        "--initial-cluster-token",
        "--quota-backend-bytes",
        "--max-request-bytes",
        "--max-txn-ops",
        "--auto-compaction-mode",
        "--auto-compaction-retention",
        "--log-level",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(
        help.contains("ETCD_DATA_DIR"),
        "flags should name their environment variables"
    );
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_kv-server"))
        .args([
            "--auto-compaction-retention",
            "soon",
            "--data-dir",
            "/nonexistent/never-created",
        ])
        .output()
        .expect("run kv-server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto-compaction-retention"), "{err}");
    assert!(!std::path::Path::new("/nonexistent/never-created").exists());
}
