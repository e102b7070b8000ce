//! Running an example's demo against a server the test starts.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The built example `name` (`cargo test` builds examples next to the test binaries).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable sits in target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds the examples",
        bin.display()
    );
    bin
}

/// Runs example `name` with `args` until it exits (at most `limit`, else it is killed and
/// the test fails); returns its stdout, after asserting it exited with success.
pub fn run_example(name: &str, args: &[&str], limit: Duration) -> String {
    let child = Command::new(example_bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the example");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = done.send(());
        out
    });
    let end = Instant::now() + limit;
    while finished.try_recv().is_err() {
        if Instant::now() > end {
            // Only the process this test started, by its PID; its own children die with it
            // or run out their leases.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let out = waiter.join().expect("waiter").expect("example output");
            panic!(
                "example {name} ran past {limit:?}; its output:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = waiter.join().expect("waiter").expect("example output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed ({}); its output:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
