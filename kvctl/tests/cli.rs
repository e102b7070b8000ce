//! The `kvctl` binary's own behaviour without a cluster: its commands, and how it fails.
//! (Against real clusters it is tested in `tests/tests/kvctl.rs`; this test also makes
//! `cargo test --workspace` build the binary those tests run.)

use std::process::{Command, Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs kvctl with `args`, bounded by [`LIMIT`] (killed by PID past it).
fn kvctl(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvctl");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => out.expect("kvctl output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("kvctl {args:?} did not finish in {LIMIT:?}");
        }
    }
}

#[test]
fn help_lists_every_command() {
    let out = kvctl(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "cluster", "lock", "election", "queue", "services", "snapshot",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    let out = kvctl(&["queue", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["stats", "peek", "dead-letter"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn failures_say_why_and_exit_1() {
    // Nothing listens on port 1 of loopback.
    let out = kvctl(&[
        "--endpoints",
        "127.0.0.1:1",
        "--dial-timeout",
        "1s",
        "lock",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("Error: "), "{err}");
    assert!(out.stdout.is_empty());

    let out = kvctl(&["--user", "no-colon", "lock", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "Error: --user must be name:password"
    );

    let out = kvctl(&["--dial-timeout", "5 hours", "lock", "list"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses bad flags with 2");
}
