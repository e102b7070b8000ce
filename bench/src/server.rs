//! Servers the comparison starts: a fresh kv-server or etcd cluster (one member or more) on
//! free loopback ports, in a temporary directory, stopped by PID and removed when dropped,
//! on success, error or panic alike. Members are started as `kv_tests::Cluster` and
//! `kv_tests::EtcdCluster` start them, with errors returned instead of panics.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions};
use kv_tests::free_port;

use crate::error::Error;

/// How long a member may take to say it serves clients.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new cluster may take to elect a leader that every member knows.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a member's log kept to explain a failed start.
const LOG_TAIL: usize = 20;
/// What both servers log once they serve clients.
const READY: &str = "ready to serve client requests";

/// Which server a deployment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// This workspace's kv-server.
    KvServer,
    /// etcd.
    Etcd,
}

impl ServerKind {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::KvServer => "kv-server",
            ServerKind::Etcd => "etcd",
        }
    }
}

/// Where the two servers' binaries are.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The kv-server binary.
    pub kv_server: PathBuf,
    /// The etcd binary, or why there is none.
    pub etcd: Result<PathBuf, String>,
}

impl Launcher {
    /// kv-server: `kv_server`, or the binary next to this executable
    /// (`target/<profile>/kv-server`). etcd: `etcd`, or `etcd` on PATH.
    pub fn find(kv_server: Option<PathBuf>, etcd: Option<PathBuf>) -> Result<Launcher, Error> {
        let kv_server = match kv_server {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .map(|dir| dir.join("kv-server"))
                .ok_or_else(|| Error::Process("cannot tell this executable's directory".into()))?,
        };
        if !kv_server.is_file() {
            return Err(Error::Process(format!(
                "{} is missing: build it (cargo build --release -p kv-server) or give --kv-server PATH",
                kv_server.display()
            )));
        }
        let etcd = match etcd {
            Some(p) if p.is_file() => Ok(p),
            Some(p) => Err(format!("{} does not exist", p.display())),
            None => kv_tests::which("etcd").ok_or_else(|| {
                "etcd is not on PATH (apt-get install etcd-server, or give --etcd PATH)".into()
            }),
        };
        Ok(Launcher { kv_server, etcd })
    }

    /// The binary of `kind`, or why there is none.
    pub fn binary(&self, kind: ServerKind) -> Result<&Path, String> {
        match kind {
            ServerKind::KvServer => Ok(&self.kv_server),
            ServerKind::Etcd => self.etcd.as_deref().map_err(Clone::clone),
        }
    }
}

/// One running member. Dropping it kills the process (SIGKILL, by PID) and reaps it.
struct Member {
    name: String,
    child: Child,
    /// The last lines of its stderr.
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Receives the line saying it serves clients.
    ready: mpsc::Receiver<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Member {
    fn log_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A fresh cluster of one kind. Dropping it stops every member (SIGKILL, by PID) and then
/// removes its data directory.
pub struct Deployment {
    /// Which server it runs.
    pub kind: ServerKind,
    /// `host:port` of each member's client endpoint.
    pub endpoints: Vec<String>,
    // Declared before `dir`: fields drop in order, so the processes are gone before their
    // data directory is removed.
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Deployment {
    /// Starts `n` members of `kind` from `binary` as a new cluster and waits until each says
    /// it serves clients. Blocking: call it from `spawn_blocking`.
    pub fn start(kind: ServerKind, binary: &Path, n: usize) -> Result<Deployment, Error> {
        let dir = tempfile::Builder::new()
            .prefix("kv-bench-")
            .tempdir()
            .map_err(|e| Error::Process(format!("temp dir: {e}")))?;
        let urls: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    format!("http://127.0.0.1:{}", free_port()),
                    format!("http://127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let initial = urls
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}={peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut deployment = Deployment {
            kind,
            endpoints: urls
                .iter()
                .map(|(client, _)| client.trim_start_matches("http://").to_string())
                .collect(),
            members: Vec::new(),
            dir,
        };
        // A member of a new etcd cluster says it is ready only once there is a quorum, so
        // every member is spawned before any is waited for.
        for (i, (client, peer)) in urls.iter().enumerate() {
            let name = format!("m{i}");
            let mut cmd = Command::new(binary);
            cmd.arg("--data-dir")
                .arg(deployment.dir.path().join(&name))
                .args(["--name", &name])
                .args(["--listen-client-urls", client])
                .args(["--advertise-client-urls", client])
                .args(["--listen-peer-urls", peer])
                .args(["--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"]);
            if kind == ServerKind::Etcd {
                cmd.env("ETCD_UNSUPPORTED_ARCH", "amd64");
            }
            let member = spawn(name, cmd, binary)?;
            deployment.members.push(member);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for m in &deployment.members {
            let left = deadline.saturating_duration_since(Instant::now());
            if m.ready.recv_timeout(left).is_err() {
                return Err(Error::Process(format!(
                    "{} member {} did not become ready within {START_TIMEOUT:?}; its last lines:\n{}",
                    kind.name(),
                    m.name,
                    m.log_tail()
                )));
            }
        }
        Ok(deployment)
    }

    /// The members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.child.id()).collect()
    }

    /// Waits until every member names the same leader.
    pub async fn wait_for_leader(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + LEADER_TIMEOUT;
        let mut clients = Vec::new();
        for ep in &self.endpoints {
            let client = Client::connect([ep], ClientOptions::default())
                .await
                .map_err(|e| Error::Process(format!("{} at {ep}: {e}", self.kind.name())))?;
            clients.push(client);
        }
        loop {
            let mut leaders = Vec::new();
            for c in &clients {
                leaders.push(
                    c.maintenance()
                        .status()
                        .await
                        .map(|s| s.leader)
                        .unwrap_or(0),
                );
            }
            if leaders[0] != 0 && leaders.iter().all(|&l| l == leaders[0]) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Process(format!(
                    "{} elected no leader within {LEADER_TIMEOUT:?} (members name {leaders:?})",
                    self.kind.name()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Spawns one member, its stderr read by a thread that keeps the last lines and signals the
/// ready line.
fn spawn(name: String, mut cmd: Command, binary: &Path) -> Result<Member, Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Process(format!("spawn {}: {e}", binary.display())))?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Process("no stderr pipe".into()));
    };
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
    let (tx, ready) = mpsc::channel();
    let sink = tail.clone();
    // The pipe is read to its end however long the member runs: a member writing into a full
    // pipe would block.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(READY)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
            let mut tail = sink.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == LOG_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
    Ok(Member {
        name,
        child,
        tail,
        ready,
    })
}
