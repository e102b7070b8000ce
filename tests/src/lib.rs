//! Harness for whole-system tests: starts real `kv-server` and `etcd` processes on loopback
//! ports with temporary data dirs, and stops exactly the processes it started, by PID.
//!
//! The `kv-server` binary is the one `cargo test` builds next to the test executables
//! (`target/<profile>/kv-server`); `KV_SERVER_BIN` overrides it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a process may take to report that it serves clients.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `kv-server` binary under test.
pub fn kv_server_bin() -> PathBuf {
    workspace_bin("kv-server", "KV_SERVER_BIN")
}

/// Path of the `kvctl` binary under test (`KVCTL_BIN` overrides it).
pub fn kvctl_bin() -> PathBuf {
    workspace_bin("kvctl", "KVCTL_BIN")
}

/// A binary of the workspace built beside the test executables, or the one `env` names.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps, the binary one level up; this crate's
    // own binaries (kv-reliability) sit beside it.
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable sits in a directory");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds the binary) or set {env}",
        bin.display()
    );
    bin
}

/// Runs `cmd` to its end with its output collected, bounded by `limit`: past it the process
/// is killed (by PID) and the test fails. The pipes are read while it runs, so a chatty
/// process never blocks on a full one.
pub fn run_bounded(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} did not finish in {limit:?}");
        }
    }
}

/// A connected channel to a server's client endpoint (`host:port`); panics if it cannot
/// connect within 5 s.
pub async fn connect_channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the server")
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
///
/// Ports come from below Linux's ephemeral range (32768 and up), so the outgoing connections
/// of parallel tests, which take their local ports from that range, cannot grab one between
/// this call and the server's bind. A port is handed out at most once per test process, so a
/// test restarting a server on its port never finds it given to another test meanwhile.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // A small xorshift walk over the span, seeded by the clock and the process id.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = (nanos ^ std::process::id().rotate_left(16)) | 1;
    for _ in 0..SPAN {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = (FIRST + x % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN);
}

/// A process this harness started. Dropping it kills the process (SIGKILL, by PID).
pub struct Proc {
    child: Child,
    /// Everything the process wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// `host:port` of its client endpoint.
    pub endpoint: String,
}

impl Proc {
    /// Spawns `cmd` and waits until a stderr line contains `ready`; `addr_of` extracts the
    /// client address from that line (None: use `fallback`).
    fn spawn(cmd: Command, ready: &str, fallback: Option<String>) -> Proc {
        Self::try_spawn(cmd, ready, fallback, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Proc::spawn`], but a process that exits or does not become ready is an error
    /// (with its log), not a panic: fault injection starts members that may crash at once.
    /// Its stderr also goes to `journal`, when given, which outlives the process.
    fn try_spawn(
        mut cmd: Command,
        ready: &str,
        fallback: Option<String>,
        journal: Option<Arc<Mutex<String>>>,
    ) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn server process");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(&ready)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                for sink in std::iter::once(&sink).chain(journal.as_ref()) {
                    let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                return Err(format!(
                    "process did not become ready in {START_TIMEOUT:?} ({status:?}); its log:\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner())
                ));
            }
        };
        let endpoint = parse_address(&line)
            .or(fallback)
            .ok_or_else(|| format!("no address in ready line: {line}"))?;
        Ok(Proc {
            child,
            log,
            endpoint,
        })
    }

    /// True once the process has exited (it is then reaped).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (a `kill -s` name such as `STOP` or `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (bounded); returns true if it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

fn parse_address(line: &str) -> Option<String> {
    // `address=..` in a text log line, `"address":".."` in a JSON one (`--log-format json`).
    let at = match line.find("address=") {
        Some(at) => at + "address=".len(),
        None => line.find("\"address\":\"")? + "\"address\":\"".len(),
    };
    let addr: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    addr.parse::<SocketAddr>().ok().map(|a| a.to_string())
}

/// Starts `kv-server` on an ephemeral loopback port with `data_dir`, plus `extra` flags.
pub fn start_kv_server(data_dir: &Path, extra: &[&str]) -> Proc {
    let peer_url = format!("http://127.0.0.1:{}", free_port());
    start_kv_server_with(data_dir, &peer_url, extra)
}

/// Starts etcd from PATH on free loopback ports, or returns why it cannot.
pub fn start_etcd(data_dir: &Path) -> Result<Proc, String> {
    start_etcd_with(data_dir, &[])
}

/// Starts etcd from PATH on free loopback ports with `extra` flags, or returns why it cannot.
pub fn start_etcd_with(data_dir: &Path, extra: &[&str]) -> Result<Proc, String> {
    start_etcd_scheme(data_dir, "http", extra)
}

/// Starts etcd serving clients on an `https://` URL, with `extra` flags (which must name the
/// certificate and key), or returns why it cannot.
pub fn start_etcd_tls(data_dir: &Path, extra: &[&str]) -> Result<Proc, String> {
    start_etcd_scheme(data_dir, "https", extra)
}

fn start_etcd_scheme(data_dir: &Path, scheme: &str, extra: &[&str]) -> Result<Proc, String> {
    let etcd = which("etcd").ok_or("etcd is not installed (apt-get install etcd-server)")?;
    let client = free_port();
    let peer = free_port();
    let client_url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new(etcd);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--name", "default"])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .args(extra)
        .env("ETCD_UNSUPPORTED_ARCH", "amd64");
    Ok(Proc::spawn(
        cmd,
        "ready to serve client requests",
        Some(format!("127.0.0.1:{client}")),
    ))
}

/// An `etcdctl` (v3 API) command against `endpoint`, dialing for at most `dial_timeout`
/// (a Go duration such as `5s`); the caller adds arguments and runs it.
pub fn etcdctl_command(endpoint: &str, dial_timeout: &str) -> Command {
    let etcdctl = which("etcdctl").expect("etcdctl is not installed (apt-get install etcd-client)");
    let mut cmd = Command::new(etcdctl);
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--dial-timeout={dial_timeout}"))
        .arg("--command-timeout=20s");
    cmd
}

/// Runs `etcdctl` (v3 API) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    etcdctl_command(endpoint, "5s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl")
}

/// Like [`etcdctl`] with text on stdin (for `txn`).
pub fn etcdctl_stdin(endpoint: &str, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = etcdctl_command(endpoint, "5s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write etcdctl stdin");
    child.wait_with_output().expect("etcdctl output")
}

/// stdout as text, panicking with stderr when the command failed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when etcdctl is available; otherwise prints why the calling test skips.
pub fn have_etcdctl(test: &str) -> bool {
    if which("etcdctl").is_some() {
        return true;
    }
    eprintln!("SKIP {test}: etcdctl is not installed (apt-get install etcd-client)");
    false
}

/// One member of a test cluster: its fixed name, data dir and peer URL, and its process while
/// it runs.
pub struct Member {
    /// `--name`.
    pub name: String,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// Peer URL (fixed across restarts, as a member's identity depends on it).
    pub peer_url: String,
    /// Client URL, fixed across restarts so a client given every member's endpoint can
    /// come back to a restarted one.
    pub client_url: String,
    /// While this file exists the member is cut off from its peers (kv-server's
    /// `KV_FAILPOINT_ISOLATE_FILE` failpoint): all of them if blank, else those it lists.
    pub isolate_file: PathBuf,
    /// While this file exists, the member's log syncs first sleep the milliseconds it holds
    /// (`KV_FAILPOINT_SYNC_DELAY_FILE`).
    pub sync_delay_file: PathBuf,
    /// While this file exists, the member's log writes fail with ENOSPC
    /// (`KV_FAILPOINT_DISK_FULL_FILE`).
    pub disk_full_file: PathBuf,
    /// The crash points this file names are armed (`KV_FAILPOINT_CRASH_FILE`).
    pub crash_file: PathBuf,
    /// Flags for this member alone, after the cluster's, from its next start on.
    pub extra: Vec<String>,
    /// `--initial-cluster` it was first started with.
    initial_cluster: String,
    /// `--initial-cluster-state`.
    state: &'static str,
    /// The running process, if any.
    pub proc: Option<Proc>,
    /// Every process's stderr since [`Cluster::clear_journals`], each start marked: a fault
    /// harness explains an anomaly with the logs of processes that have since been killed.
    pub journal: Arc<Mutex<String>>,
}

/// A multi-member kv-server cluster on loopback, in a temporary directory of its own.
pub struct Cluster {
    /// The members, in the order they were created.
    pub members: Vec<Member>,
    extra: Vec<String>,
    /// `http` or `https`, for every member's peer and client URLs.
    scheme: &'static str,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members as a new cluster.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// Starts `n` members as a new cluster, each with `extra` flags.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        Self::start_scheme(n, extra, "http")
    }

    /// Starts `n` members as a new cluster on `https://` peer and client URLs, each with
    /// `extra` flags (which must name the certificates).
    pub fn start_tls(n: usize, extra: &[&str]) -> Cluster {
        Self::start_scheme(n, extra, "https")
    }

    fn start_scheme(n: usize, extra: &[&str], scheme: &'static str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = Cluster {
            members: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            scheme,
            dir,
        };
        for i in 0..n {
            let m = cluster.new_member(&format!("m{i}"), "", "new");
            cluster.members.push(m);
        }
        let initial = cluster.initial_cluster();
        for m in &mut cluster.members {
            m.initial_cluster = initial.clone();
        }
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster
    }

    fn new_member(&self, name: &str, initial_cluster: &str, state: &'static str) -> Member {
        Member {
            name: name.to_string(),
            data_dir: self.dir.path().join(name),
            peer_url: format!("{}://127.0.0.1:{}", self.scheme, free_port()),
            client_url: format!("{}://127.0.0.1:{}", self.scheme, free_port()),
            isolate_file: self.dir.path().join(format!("{name}.isolate")),
            sync_delay_file: self.dir.path().join(format!("{name}.sync-delay")),
            disk_full_file: self.dir.path().join(format!("{name}.disk-full")),
            crash_file: self.dir.path().join(format!("{name}.crash")),
            extra: Vec::new(),
            initial_cluster: initial_cluster.to_string(),
            state,
            proc: None,
            journal: Arc::default(),
        }
    }

    /// `name=peer-url,...` of every member created so far.
    pub fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Creates (does not start) a member that will join the running cluster with
    /// `--initial-cluster-state existing`; returns its index and peer URL for MemberAdd.
    pub fn prepare_joiner(&mut self, name: &str) -> (usize, String) {
        let mut m = self.new_member(name, "", "existing");
        let mut initial = self.initial_cluster();
        initial.push_str(&format!(",{}={}", m.name, m.peer_url));
        m.initial_cluster = initial;
        let url = m.peer_url.clone();
        self.members.push(m);
        (self.members.len() - 1, url)
    }

    /// (Re)starts member `i` with its data dir and peer URL.
    pub fn start_member(&mut self, i: usize) {
        if let Err(e) = self.try_start_member(i) {
            panic!("member {i}: {e}");
        }
    }

    /// (Re)starts member `i`, or returns why it did not become ready (a fault harness may
    /// have armed it to crash).
    pub fn try_start_member(&mut self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        let mut args: Vec<&str> = vec![
            "--name",
            &m.name,
            "--initial-cluster",
            &m.initial_cluster,
            "--initial-cluster-state",
            m.state,
            "--listen-client-urls",
            &m.client_url,
            "--advertise-client-urls",
            &m.client_url,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        args.extend(m.extra.iter().map(String::as_str));
        let envs = [
            ("KV_FAILPOINT_ISOLATE_FILE", m.isolate_file.as_os_str()),
            (
                "KV_FAILPOINT_SYNC_DELAY_FILE",
                m.sync_delay_file.as_os_str(),
            ),
            ("KV_FAILPOINT_DISK_FULL_FILE", m.disk_full_file.as_os_str()),
            ("KV_FAILPOINT_CRASH_FILE", m.crash_file.as_os_str()),
        ];
        m.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(&format!("==== {} starts\n", m.name));
        let proc = Proc::try_spawn(
            kv_server_command(&m.data_dir, &m.peer_url, &args, &envs),
            "ready to serve client requests",
            None,
            Some(m.journal.clone()),
        )?;
        self.members[i].proc = Some(proc);
        Ok(())
    }

    /// Empties every member's journal (a harness does so as each round begins).
    pub fn clear_journals(&self) {
        for m in &self.members {
            m.journal.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Cuts member `i` off from its peers (both directions) until [`Cluster::heal`].
    pub fn isolate(&self, i: usize) {
        std::fs::write(&self.members[i].isolate_file, b"").expect("write isolate switch");
    }

    /// Splits the members into `side` and the rest: no peer traffic crosses between the two
    /// groups until [`Cluster::heal_all`]; each group still talks within itself.
    pub fn partition(&self, side: &[usize]) {
        let urls = |inside: bool| -> String {
            (0..self.members.len())
                .filter(|j| side.contains(j) == inside)
                .map(|j| self.members[j].peer_url.clone())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (ours, theirs) = (urls(true), urls(false));
        for (j, m) in self.members.iter().enumerate() {
            let cut = if side.contains(&j) { &theirs } else { &ours };
            std::fs::write(&m.isolate_file, cut).expect("write partition switch");
        }
    }

    /// Removes every member's partition or isolation.
    pub fn heal_all(&self) {
        for i in 0..self.members.len() {
            self.heal(i);
        }
    }

    /// Reconnects member `i`.
    pub fn heal(&self, i: usize) {
        let _ = std::fs::remove_file(&self.members[i].isolate_file);
    }

    /// Client endpoint of member `i` (it must be running).
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i]
            .proc
            .as_ref()
            .expect("member is running")
            .endpoint
            .clone()
    }

    /// Client endpoints of the running members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(|p| p.endpoint.clone()))
            .collect()
    }
}

/// Starts `kv-server` with a given peer URL (listen and advertise), plus `extra` flags.
pub fn start_kv_server_with(data_dir: &Path, peer_url: &str, extra: &[&str]) -> Proc {
    spawn_kv_server(data_dir, peer_url, extra, &[])
}

fn spawn_kv_server(
    data_dir: &Path,
    peer_url: &str,
    extra: &[&str],
    envs: &[(&str, &std::ffi::OsStr)],
) -> Proc {
    Proc::spawn(
        kv_server_command(data_dir, peer_url, extra, envs),
        "ready to serve client requests",
        None,
    )
}

/// The `--log-level` of every kv-server the tests start: `info`, or `KV_TEST_LOG` when set
/// (a filter such as `info,openraft::replication=debug`, to see what a failing run did).
fn member_log_level() -> String {
    std::env::var("KV_TEST_LOG").unwrap_or_else(|_| "info".to_string())
}

fn kv_server_command(
    data_dir: &Path,
    peer_url: &str,
    extra: &[&str],
    envs: &[(&str, &std::ffi::OsStr)],
) -> Command {
    let mut cmd = Command::new(kv_server_bin());
    cmd.arg("--data-dir").arg(data_dir);
    // A port of the kernel's choosing unless the caller fixed one (to restart on it).
    if !extra.contains(&"--listen-client-urls") {
        cmd.args(["--listen-client-urls", "http://127.0.0.1:0"]);
    }
    cmd.args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .args(["--log-level", &member_log_level()])
        .args(extra);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// A multi-member etcd cluster on loopback, to run a cluster test's body against the
/// reference; its members live in a temporary directory of its own.
pub struct EtcdCluster {
    /// The members' processes, in creation order (`None` once killed).
    pub members: Vec<Option<Proc>>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` etcd members from PATH as a new cluster, or returns why it cannot.
    pub fn start(n: usize) -> Result<EtcdCluster, String> {
        let etcd = which("etcd").ok_or("etcd is not installed (apt-get install etcd-server)")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
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
        // A member reports ready only once the cluster has a quorum, so every member is
        // spawned before any is waited for.
        let starting: Vec<_> = urls
            .into_iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let mut cmd = Command::new(&etcd);
                cmd.arg("--data-dir")
                    .arg(dir.path().join(format!("m{i}")))
                    .args(["--name", &format!("m{i}")])
                    .args(["--listen-client-urls", &client])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .env("ETCD_UNSUPPORTED_ARCH", "amd64");
                let fallback = client.trim_start_matches("http://").to_string();
                std::thread::spawn(move || {
                    Proc::spawn(cmd, "ready to serve client requests", Some(fallback))
                })
            })
            .collect();
        let mut members = Vec::new();
        let mut failed = None;
        for handle in starting {
            match handle.join() {
                Ok(p) => members.push(Some(p)),
                Err(panic) => failed = Some(panic),
            }
        }
        if let Some(panic) = failed {
            // The members that did start are killed as `members` drops.
            drop(members);
            std::panic::resume_unwind(panic);
        }
        Ok(EtcdCluster { members, _dir: dir })
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].take() {
            p.kill();
        }
    }
}

/// A running cluster as a test sees it, kv-server's or etcd's, so one test body can run
/// against both.
pub trait Members {
    /// Client endpoint of member `i`, if it runs.
    fn endpoint_of(&self, i: usize) -> Option<String>;
    /// SIGKILLs member `i`.
    fn kill_member(&mut self, i: usize);
}

impl Members for Cluster {
    fn endpoint_of(&self, i: usize) -> Option<String> {
        self.members[i].proc.as_ref().map(|p| p.endpoint.clone())
    }
    fn kill_member(&mut self, i: usize) {
        self.kill(i);
    }
}

impl Members for EtcdCluster {
    fn endpoint_of(&self, i: usize) -> Option<String> {
        self.members[i].as_ref().map(|p| p.endpoint.clone())
    }
    fn kill_member(&mut self, i: usize) {
        self.kill(i);
    }
}

/// Index of the running member among `candidates` that reports itself leader
/// (Maintenance.Status), asked every 50 ms; panics after `within`.
pub async fn wait_leader_among(
    members: &impl Members,
    candidates: &[usize],
    within: Duration,
) -> usize {
    use kv_core::proto::etcdserverpb::{StatusRequest, maintenance_client::MaintenanceClient};
    let deadline = Instant::now() + within;
    loop {
        for &i in candidates {
            let Some(ep) = members.endpoint_of(i) else {
                continue;
            };
            let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{ep}")) else {
                continue;
            };
            let channel = channel
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect_lazy();
            if let Ok(s) = MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
            {
                let s = s.into_inner();
                if s.leader != 0 && s.header.as_ref().is_some_and(|h| h.member_id == s.leader) {
                    return i;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader among {candidates:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process's CPU time and memory from `/proc`, for the benchmarks and the memory checks.
pub mod procfs {
    /// utime + stime of `pid`, in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count from after it.
        let rest = stat
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .ok_or("unexpected /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
        let field = |i: usize| -> Result<u64, String> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| format!("/proc/{pid}/stat: no field {}", i + 3))
        };
        Ok(field(11)? + field(12)?)
    }

    /// VmRSS of `pid`, in KiB.
    pub fn rss_kib(pid: u32) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/status: no VmRSS"))
    }

    /// Clock ticks per second (`getconf CLK_TCK`, 100 if unknown).
    pub fn clock_ticks_per_second() -> u64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    }
}

/// Re-exported for [`on_both_servers!`].
pub use tempfile;

pub mod certs;
pub mod proxy;

pub mod faults;
pub mod fuzz;
pub mod history;
pub mod linearizability;
pub mod recipe_checks;
pub mod reliability;
pub mod rng;
pub mod scrape;

/// Declares two tests running the async fn `$scenario(endpoint: &str)`: `$ours` against a
/// fresh kv-server, `$etcd` against a fresh etcd 3.4 (skipped, with the reason printed, when
/// etcd is not installed). Each is bounded by `$secs` seconds.
#[macro_export]
macro_rules! on_both_servers {
    ($scenario:ident, $ours:ident, $etcd:ident, $secs:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $ours() {
            let dir = $crate::tempfile::tempdir().unwrap();
            let server = $crate::start_kv_server(&dir.path().join("data"), &[]);
            let limit = std::time::Duration::from_secs($secs);
            tokio::time::timeout(limit, $scenario(&server.endpoint))
                .await
                .expect("test timed out");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $etcd() {
            let dir = $crate::tempfile::tempdir().unwrap();
            let etcd = match $crate::start_etcd(&dir.path().join("etcd")) {
                Ok(p) => p,
                Err(why) => return eprintln!("SKIP {}: {why}", stringify!($etcd)),
            };
            let limit = std::time::Duration::from_secs($secs);
            tokio::time::timeout(limit, $scenario(&etcd.endpoint))
                .await
                .expect("test timed out");
        }
    };
}

/// SIGTERMs `server` from a blocking task and asserts that it stops by itself within
/// `within` (a test of clean shutdown); panics with its log otherwise.
pub async fn assert_stops_on_sigterm(mut server: Proc, within: Duration) {
    let stopping = tokio::task::spawn_blocking(move || {
        let stopped = server.terminate(within);
        (server, stopped)
    });
    let (server, stopped) = tokio::time::timeout(within * 2, stopping)
        .await
        .expect("test timed out")
        .expect("terminate task");
    assert!(
        stopped,
        "kv-server did not stop by itself:\n{}",
        server.log_text()
    );
}

/// Helpers shared by the benchmark programs.
pub mod bench {
    use std::time::Duration;

    /// A key prefix unique to the run (`bench/<what>/<ns hex>`), so one server can serve
    /// several runs.
    pub fn unique(what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("bench/{what}/{nanos:x}")
    }

    /// p50 and p99 of `samples` (sorted in place), in microseconds.
    pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i].as_secs_f64() * 1e6
        };
        (at(0.5), at(0.99))
    }
}
