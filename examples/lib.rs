//! What the three examples share: the demo service's protocol, connecting to the server with
//! a helpful error, and the child processes their `demo` modes start and kill, as an operator
//! would (each child is this same example run in another mode).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kv_client::{Client, ClientOptions};

/// The demo service: each instance answers `Who` with its own id.
pub mod hello {
    tonic::include_proto!("hello");
}

/// The server address the examples use unless told otherwise (the README's server command
/// listens here).
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:2379";

/// The `--endpoints` flag every example and every mode takes (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's client endpoints, comma-separated host:port.
    #[arg(long, global = true, default_value = DEFAULT_ENDPOINTS)]
    pub endpoints: String,
}

/// Connects to `endpoints` (comma-separated), or explains how to start a server.
pub async fn connect(endpoints: &str) -> Result<Client, String> {
    let list: Vec<String> = endpoints
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = Client::connect(&list, options).await.map_err(|e| {
        format!(
            "cannot reach a server at {endpoints}: {e}\n\
             start one with `cargo run --release -p kv-server` (or pass --endpoints)"
        )
    })?;
    // Connecting is lazy; one read proves the server is there.
    client
        .kv()
        .get("\0", Default::default())
        .await
        .map_err(|e| format!("no answer from a server at {endpoints}: {e}"))?;
    Ok(client)
}

/// This example run again as a child process in another mode; its output lines are printed
/// with `label` in front, so a demo's output reads as one story. Killed (SIGKILL) on drop.
pub struct Process {
    label: String,
    child: Child,
}

impl Process {
    /// Starts this executable with `args`.
    pub fn start(label: impl Into<String>, args: &[String]) -> std::io::Result<Process> {
        let label = label.into();
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        if let Some(out) = child.stdout.take() {
            let prefix = label.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("[{prefix}] {line}");
                }
            });
        }
        Ok(Process { label, child })
    }

    /// The label its output carries.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it (no goodbye: leases it held run out by themselves) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit by itself, up to `limit`; false if it did not.
    pub fn wait_for_exit(&mut self, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ends this process when its parent goes (a demo killed from outside must not leave its
/// children running): children started by [`Process::start`] call this first.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(300));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
        }
    });
}
