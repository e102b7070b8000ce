//! What kv-client costs its caller: requests per second with many calls in flight, latency, and
//! this process's CPU time per request and per watch event, against any etcd-v3 endpoint
//! (kv-server or etcd), so that the figures can be set beside each other and beside raw tonic
//! (`kv-load`).
//!
//! ```text
//! client_bench get   ENDPOINT IN_FLIGHT SECONDS [SERVER_PID]
//! client_bench put   ENDPOINT IN_FLIGHT SECONDS [SERVER_PID]
//! client_bench watch ENDPOINT WATCHERS  SECONDS [SERVER_PID]
//! ```
//!
//! - `get`: 1000 keys are written first, one at a time; then IN_FLIGHT tasks sharing one
//!   `Client` issue linearizable gets of them for SECONDS. Every answer must hold exactly the
//!   key asked for, with the value and mod revision it was written with, at a revision no older
//!   than the writes.
//! - `put`: IN_FLIGHT tasks sharing one `Client` put 256-byte values over 1000 keys for
//!   SECONDS. Afterwards the revisions answered must all differ, and each key must hold the
//!   value of its last put, at that put's revision, with a version equal to its number of puts.
//! - `watch`: WATCHERS watches of one prefix, all on the shared watch stream of one `Client`;
//!   one writer, with a `Client` of its own on a thread of its own, puts keys under the prefix
//!   one at a time for SECONDS. Every watcher must see every put once, in order, at the
//!   revision the writer was answered (compared through a running hash), and nothing else.
//!
//! Each mode prints one line: the rate, p50/p99 latency (for `watch`: put sent to event
//! received), and the CPU time (utime + stime from `/proc`) this whole process spent per request
//! or per event over the timed window only, setup and final checks excluded; with SERVER_PID,
//! the server's too. `watch` also splits the writer thread's share out, per put. Any failed
//! call or failed check fails the run, so that wrong answers cannot look fast. Keys live under
//! a prefix unique to the run, so a server that served earlier runs is fine.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{
    Client, ClientOptions, EventKind, GetOptions, GetResponse, Kv, PutOptions, WatchOptions,
    WatchStream,
};
use kv_tests::procfs::{clock_ticks_per_second, cpu_ticks};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const USAGE: &str = "usage: client_bench get|put ENDPOINT IN_FLIGHT SECONDS [SERVER_PID]\n       \
                     client_bench watch ENDPOINT WATCHERS SECONDS [SERVER_PID]";

/// Keys read by `get`, written by `put` and cycled through by the `watch` writer (as `kv-load`).
const KEYS: usize = 1000;
/// Value size of `get` and `put` (as `kv-load`).
const VALUE_BYTES: usize = 256;
/// Value size of the `watch` writer: sequence number, send time, padding.
const EVENT_VALUE_BYTES: usize = 32;
/// Step between the keys one task uses: a prime, so that the tasks spread over the keys (as
/// `kv-load`).
const KEY_STRIDE: usize = 7919;
/// How long the watches may take to be created and see the warm-up put.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the watchers may take, after the writer's deadline, to see every event.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each watch is still read after the end marker, so that a late duplicate or an
/// event for a put never made is caught too.
const QUIET_CHECK: Duration = Duration::from_millis(200);
/// Key (under the run's prefix) of the put that proves a watch is live before the window opens.
const WARMUP_KEY: &str = "warmup";
/// Key (under the run's prefix) of the put that follows the writer's last timed put.
const END_KEY: &str = "end";
/// Folding revisions the way the writer and every watcher do (FNV-1a's constants).
const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const HASH_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Get,
    Put,
    Watch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Get => "get",
            Mode::Put => "put",
            Mode::Watch => "watch",
        }
    }
}

/// The command line.
struct Args {
    mode: Mode,
    endpoint: String,
    /// Calls in flight (`get`, `put`) or watchers (`watch`).
    n: usize,
    seconds: u64,
    server: Option<u32>,
}

impl Args {
    fn parse(args: &[String]) -> Option<Args> {
        if !(4..=5).contains(&args.len()) {
            return None;
        }
        let mode = match args[0].as_str() {
            "get" => Mode::Get,
            "put" => Mode::Put,
            "watch" => Mode::Watch,
            _ => return None,
        };
        let server = match args.get(4) {
            Some(pid) => Some(pid.parse().ok()?),
            None => None,
        };
        Some(Args {
            mode,
            endpoint: args[1].clone(),
            n: args[2].parse().ok().filter(|&n| n > 0)?,
            seconds: args[3].parse().ok().filter(|&s| s > 0)?,
            server,
        })
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = Args::parse(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match args.mode {
        Mode::Get => get(&args).await,
        Mode::Put => put(&args).await,
        Mode::Watch => watch(&args).await,
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("client_bench {} FAILED: {e}", args.mode.name());
            ExitCode::FAILURE
        }
    }
}

async fn connect(endpoint: &str) -> Result<Client> {
    Ok(Client::connect([endpoint], ClientOptions::default()).await?)
}

/// A key prefix no earlier run used.
fn run_prefix(mode: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("client-bench/{mode}/{}-{nanos}/", std::process::id())
}

/// CPU time of this process, and of the server if its PID was given, from `open` to `close`.
struct CpuWindow {
    server: Option<u32>,
    opened: Instant,
    client_ticks: u64,
    server_ticks: Option<u64>,
}

/// What a window measured: its wall time and the CPU seconds spent in it.
struct CpuUse {
    wall: Duration,
    client: f64,
    server: Option<f64>,
}

impl CpuWindow {
    fn open(server: Option<u32>) -> Result<CpuWindow> {
        Ok(CpuWindow {
            server,
            client_ticks: cpu_ticks(std::process::id())?,
            server_ticks: server.map(cpu_ticks).transpose()?,
            opened: Instant::now(),
        })
    }

    fn close(self) -> Result<CpuUse> {
        let wall = self.opened.elapsed();
        let client = cpu_ticks(std::process::id())?;
        let server = self.server.map(cpu_ticks).transpose()?;
        // Asked after the readings: it runs `getconf`.
        let hz = clock_ticks_per_second() as f64;
        Ok(CpuUse {
            wall,
            client: client.saturating_sub(self.client_ticks) as f64 / hz,
            server: server
                .zip(self.server_ticks)
                .map(|(now, then)| now.saturating_sub(then) as f64 / hz),
        })
    }
}

impl CpuUse {
    /// Occurrences of something per second of the window.
    fn rate(&self, count: u64) -> f64 {
        count as f64 / self.wall.as_secs_f64()
    }

    /// `client_cpu=…s(…%) client_us/UNIT=…`, and the same for the server if it was measured.
    fn describe(&self, count: u64, unit: &str) -> String {
        let mut out = describe_cpu("client", self.client, self.wall, count, unit);
        if let Some(server) = self.server {
            out += " ";
            out += &describe_cpu("server", server, self.wall, count, unit);
        }
        out
    }
}

fn describe_cpu(who: &str, cpu: f64, wall: Duration, count: u64, unit: &str) -> String {
    format!(
        "{who}_cpu={cpu:.2}s({:.0}%) {who}_us/{unit}={:.1}",
        100.0 * cpu / wall.as_secs_f64(),
        per(cpu, count)
    )
}

/// Microseconds of `cpu` seconds per one of `count`.
fn per(cpu: f64, count: u64) -> f64 {
    cpu * 1e6 / count.max(1) as f64
}

/// `p50=…ms p99=…ms` of `latencies`.
fn percentiles(mut latencies: Vec<Duration>) -> String {
    latencies.sort_unstable();
    let at = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    format!("p50={:.2}ms p99={:.2}ms", at(0.50), at(0.99))
}

/// Waits for the start signal; returns the deadline it carries.
async fn started(mut start: watch::Receiver<Option<Instant>>) -> Result<Instant> {
    let deadline = *start.wait_for(Option::is_some).await?;
    deadline.ok_or_else(|| "no deadline".into())
}

/// Every task's results, or the first failure.
async fn join_all<T>(tasks: Vec<JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await??);
    }
    Ok(all)
}

/// The keys `get` reads, as written: key `i` holds `values[i]` since `revisions[i]`.
struct Dataset {
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
    revisions: Vec<i64>,
    /// The latest of the writes: no linearizable read may answer from before it.
    written_at: i64,
}

impl Dataset {
    async fn write(kv: &Kv, prefix: &str) -> Result<Dataset> {
        let keys: Vec<Vec<u8>> = (0..KEYS)
            .map(|i| format!("{prefix}{i:04}").into_bytes())
            .collect();
        let values: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| {
                let mut v = k.clone();
                v.resize(VALUE_BYTES, b'x');
                v
            })
            .collect();
        // One at a time, as `kv-load` does: etcd's later gets cost it measurably more server
        // CPU (about a quarter, 3.4.23) when the keys were written 64 at a time instead.
        let mut revisions = Vec::with_capacity(KEYS);
        for (key, value) in keys.iter().zip(&values) {
            revisions.push(
                kv.put(key, value.clone(), PutOptions::new())
                    .await?
                    .revision,
            );
        }
        let written_at = revisions.iter().copied().max().unwrap_or(0);
        Ok(Dataset {
            keys,
            values,
            revisions,
            written_at,
        })
    }

    fn check(&self, i: usize, got: &GetResponse) -> Result<()> {
        match got.kvs.as_slice() {
            [kv] if kv.key == self.keys[i]
                && kv.value == self.values[i]
                && kv.mod_revision == self.revisions[i]
                && got.revision >= self.written_at =>
            {
                Ok(())
            }
            kvs => Err(format!(
                "get {}: expected its value written at revision {}, answered at a revision >= {}; \
                 got {} key-values (mod revisions {:?}) at revision {}",
                String::from_utf8_lossy(&self.keys[i]),
                self.revisions[i],
                self.written_at,
                kvs.len(),
                kvs.iter().map(|kv| kv.mod_revision).collect::<Vec<_>>(),
                got.revision
            )
            .into()),
        }
    }
}

async fn get(args: &Args) -> Result<String> {
    let client = connect(&args.endpoint).await?;
    let kv = client.kv();
    let data = Arc::new(Dataset::write(&kv, &run_prefix("get")).await?);
    let (start, start_rx) = watch::channel(None);
    let tasks: Vec<JoinHandle<Result<Vec<Duration>>>> = (0..args.n)
        .map(|task| {
            let (kv, data, start_rx) = (kv.clone(), data.clone(), start_rx.clone());
            tokio::spawn(async move {
                let deadline = started(start_rx).await?;
                let mut latencies = Vec::new();
                let mut n = task;
                while Instant::now() < deadline {
                    let i = n % KEYS;
                    n += KEY_STRIDE;
                    let sent = Instant::now();
                    let got = kv.get(&data.keys[i], GetOptions::new()).await?;
                    latencies.push(sent.elapsed());
                    data.check(i, &got)?;
                }
                Ok(latencies)
            })
        })
        .collect();
    let window = CpuWindow::open(args.server)?;
    start.send(Some(Instant::now() + args.window()))?;
    let latencies: Vec<Duration> = join_all(tasks).await?.into_iter().flatten().collect();
    let cpu = window.close()?;
    let requests = latencies.len() as u64;
    Ok(format!(
        "get {} in_flight={} window={:.2}s requests={requests} requests/s={:.0} {} {}",
        args.endpoint,
        args.n,
        cpu.wall.as_secs_f64(),
        cpu.rate(requests),
        percentiles(latencies),
        cpu.describe(requests, "request")
    ))
}

/// One put as answered: which task put which value to which key, at which revision.
struct PutRecord {
    revision: i64,
    key: usize,
    task: u32,
    seq: u64,
}

/// The value of the `seq`-th put of `task`.
fn put_value(task: u32, seq: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_BYTES);
    value.extend_from_slice(&task.to_le_bytes());
    value.extend_from_slice(&seq.to_le_bytes());
    value.resize(VALUE_BYTES, b'v');
    value
}

async fn put(args: &Args) -> Result<String> {
    let client = connect(&args.endpoint).await?;
    let kv = client.kv();
    let prefix = run_prefix("put");
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..KEYS)
            .map(|i| format!("{prefix}{i:04}").into_bytes())
            .collect(),
    );
    let (start, start_rx) = watch::channel(None);
    type Done = (Vec<Duration>, Vec<PutRecord>);
    let tasks: Vec<JoinHandle<Result<Done>>> = (0..args.n)
        .map(|task| {
            let (kv, keys, start_rx) = (kv.clone(), keys.clone(), start_rx.clone());
            tokio::spawn(async move {
                let deadline = started(start_rx).await?;
                let (mut latencies, mut puts) = (Vec::new(), Vec::new());
                let mut n = task;
                let task = task as u32;
                let mut seq = 0;
                while Instant::now() < deadline {
                    let key = n % KEYS;
                    n += KEY_STRIDE;
                    let sent = Instant::now();
                    let put = kv
                        .put(&keys[key], put_value(task, seq), PutOptions::new())
                        .await?;
                    latencies.push(sent.elapsed());
                    puts.push(PutRecord {
                        revision: put.revision,
                        key,
                        task,
                        seq,
                    });
                    seq += 1;
                }
                Ok((latencies, puts))
            })
        })
        .collect();
    let window = CpuWindow::open(args.server)?;
    start.send(Some(Instant::now() + args.window()))?;
    let (latencies, puts): (Vec<_>, Vec<_>) = join_all(tasks).await?.into_iter().unzip();
    let cpu = window.close()?;
    let puts: Vec<PutRecord> = puts.into_iter().flatten().collect();
    check_puts(&kv, &prefix, puts.as_slice()).await?;
    let requests = puts.len() as u64;
    Ok(format!(
        "put {} in_flight={} window={:.2}s requests={requests} requests/s={:.0} {} {}",
        args.endpoint,
        args.n,
        cpu.wall.as_secs_f64(),
        cpu.rate(requests),
        percentiles(latencies.into_iter().flatten().collect()),
        cpu.describe(requests, "request")
    ))
}

/// Checks the store against the puts answered: one revision each, and every key holding its
/// last put's value at that put's revision, with a version counting its puts.
async fn check_puts(kv: &Kv, prefix: &str, puts: &[PutRecord]) -> Result<()> {
    let mut by_revision: Vec<&PutRecord> = puts.iter().collect();
    by_revision.sort_unstable_by_key(|p| p.revision);
    if let Some(pair) = by_revision
        .windows(2)
        .find(|w| w[0].revision == w[1].revision)
    {
        return Err(format!("two puts were answered revision {}", pair[0].revision).into());
    }
    let mut last: Vec<Option<&PutRecord>> = vec![None; KEYS];
    let mut count = vec![0i64; KEYS];
    for p in by_revision {
        last[p.key] = Some(p);
        count[p.key] += 1;
    }
    let written = last.iter().flatten().count();
    let got = kv.get(prefix, GetOptions::new().prefix()).await?;
    if got.kvs.len() != written {
        return Err(format!("{written} keys were put, {} are stored", got.kvs.len()).into());
    }
    for stored in &got.kvs {
        let name = String::from_utf8_lossy(&stored.key);
        let i: usize = name
            .strip_prefix(prefix)
            .and_then(|i| i.parse().ok())
            .filter(|&i| i < KEYS)
            .ok_or_else(|| format!("unexpected key {name}"))?;
        let Some(p) = last[i] else {
            return Err(format!("{name} is stored but was never put").into());
        };
        if stored.version != count[i]
            || stored.mod_revision != p.revision
            || stored.value != put_value(p.task, p.seq)
        {
            return Err(format!(
                "{name}: expected version {} and the value put at revision {}; \
                 stored: version {} at revision {}",
                count[i], p.revision, stored.version, stored.mod_revision
            )
            .into());
        }
    }
    Ok(())
}

/// What a watcher or the writer tells the main task while the watch benchmark runs.
enum Report {
    /// A watcher saw the warm-up put: its watch is live.
    Ready,
    /// A watcher saw the end marker.
    Done,
    /// A watcher or the writer failed.
    Failed(String),
}

/// What one watcher saw of the timed puts.
struct Seen {
    events: u64,
    /// The revisions of the events, folded in order.
    hash: u64,
    /// Put sent to event received, per event.
    latencies: Vec<Duration>,
}

/// What the writer did over the window.
struct Written {
    puts: u64,
    /// The revisions of its puts, folded in order.
    hash: u64,
    /// Its thread's CPU time, in clock ticks.
    ticks: u64,
}

fn fold(hash: u64, revision: i64) -> u64 {
    (hash ^ revision as u64).wrapping_mul(HASH_PRIME)
}

/// The value of the writer's `seq`-th put, sent `sent` after the run's epoch.
fn event_value(seq: u64, sent: Duration) -> Vec<u8> {
    let mut value = Vec::with_capacity(EVENT_VALUE_BYTES);
    value.extend_from_slice(&seq.to_le_bytes());
    value.extend_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    value.resize(EVENT_VALUE_BYTES, b'e');
    value
}

/// (sequence number, send time) of a writer's value.
fn parse_event_value(value: &[u8]) -> Option<(u64, Duration)> {
    let seq = u64::from_le_bytes(value.get(0..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
    Some((seq, Duration::from_nanos(sent)))
}

async fn watch(args: &Args) -> Result<String> {
    let prefix: Arc<str> = Arc::from(run_prefix("watch"));
    let client = connect(&args.endpoint).await?;
    // The watches start right after this revision, so none misses a put however late the
    // server gets to create it.
    let from = client
        .kv()
        .get(&*prefix, GetOptions::new().prefix().count_only())
        .await?
        .revision
        + 1;
    let epoch = Instant::now();
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let watchers: Vec<JoinHandle<Result<Seen>>> = (0..args.n)
        .map(|_| {
            let stream = client
                .watch()
                .watch(&*prefix, WatchOptions::new().prefix().start_revision(from));
            let (prefix, reports) = (prefix.clone(), reports_tx.clone());
            tokio::spawn(async move {
                let seen = observe(stream, &prefix, epoch, &reports).await;
                if let Err(e) = &seen {
                    let _ = reports.send(Report::Failed(format!("watcher: {e}")));
                }
                seen
            })
        })
        .collect();
    let (start, start_rx) = std::sync::mpsc::channel();
    let writer = {
        let (endpoint, prefix, reports) = (args.endpoint.clone(), prefix.clone(), reports_tx);
        std::thread::spawn(move || {
            let written = write(&endpoint, &prefix, epoch, start_rx);
            if let Err(e) = &written {
                let _ = reports.send(Report::Failed(format!("writer: {e}")));
            }
            written
        })
    };

    // Every watch is created and live once it saw the writer's warm-up put.
    let create_deadline = tokio::time::Instant::now() + CREATE_TIMEOUT;
    for _ in 0..args.n {
        match tokio::time::timeout_at(create_deadline, reports.recv()).await {
            Ok(Some(Report::Ready)) => {}
            Ok(Some(Report::Failed(e))) => return Err(e.into()),
            Ok(Some(Report::Done) | None) => return Err("a watcher ended early".into()),
            Err(_) => return Err(format!("watches not live within {CREATE_TIMEOUT:?}").into()),
        }
    }

    let window = CpuWindow::open(args.server)?;
    start.send(Instant::now() + args.window())?;
    let drain_deadline = tokio::time::Instant::now() + args.window() + DRAIN_TIMEOUT;
    for done in 0..args.n {
        match tokio::time::timeout_at(drain_deadline, reports.recv()).await {
            Ok(Some(Report::Done)) => {}
            Ok(Some(Report::Failed(e))) => return Err(e.into()),
            Ok(Some(Report::Ready) | None) => return Err("a watcher ended early".into()),
            Err(_) => {
                return Err(format!(
                    "{} of {} watchers still missed events {DRAIN_TIMEOUT:?} after the deadline",
                    args.n - done,
                    args.n
                )
                .into());
            }
        }
    }
    let cpu = window.close()?;

    let written = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| "the writer panicked")??;
    let seen = join_all(watchers).await?;
    for (i, s) in seen.iter().enumerate() {
        if s.events != written.puts || s.hash != written.hash {
            return Err(format!(
                "watcher {i} saw {} events for {} puts, or other revisions than the puts'",
                s.events, written.puts
            )
            .into());
        }
    }
    let events = seen.iter().map(|s| s.events).sum::<u64>();
    let latencies = seen.into_iter().flat_map(|s| s.latencies).collect();
    let writer_cpu = written.ticks as f64 / clock_ticks_per_second() as f64;
    Ok(format!(
        "watch {} watchers={} window={:.2}s puts={} puts/s={:.0} events={events} events/s={:.0} \
         {} {} writer_us/put={:.1} watch_side_us/event={:.1}",
        args.endpoint,
        args.n,
        cpu.wall.as_secs_f64(),
        written.puts,
        cpu.rate(written.puts),
        cpu.rate(events),
        percentiles(latencies),
        cpu.describe(events, "event"),
        per(writer_cpu, written.puts),
        per(cpu.client - writer_cpu, events)
    ))
}

/// Reads one watch: the warm-up put, then every timed put in order, then the end marker, then
/// nothing for `QUIET_CHECK`.
async fn observe(
    mut stream: WatchStream,
    prefix: &str,
    epoch: Instant,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<Seen> {
    let warmup = format!("{prefix}{WARMUP_KEY}").into_bytes();
    let end = format!("{prefix}{END_KEY}").into_bytes();
    let data = format!("{prefix}k/").into_bytes();
    let mut seen = Seen {
        events: 0,
        hash: HASH_SEED,
        latencies: Vec::new(),
    };
    let mut live = false;
    loop {
        let update = stream.next().await.ok_or("the watch ended")??;
        let received = epoch.elapsed();
        for (i, event) in update.events.iter().enumerate() {
            let key = &event.kv.key;
            if event.kind != EventKind::Put {
                return Err(format!("a delete of {}", String::from_utf8_lossy(key)).into());
            }
            if !live {
                if *key != warmup {
                    return Err("the first event is not the warm-up put".into());
                }
                live = true;
                let _ = reports.send(Report::Ready);
            } else if *key == end {
                if i + 1 != update.events.len() {
                    return Err("events after the end marker".into());
                }
                let _ = reports.send(Report::Done);
                return quiet(stream, seen).await;
            } else {
                let (seq, sent) = parse_event_value(&event.kv.value)
                    .filter(|_| key.starts_with(&data))
                    .ok_or_else(|| format!("a stray put of {}", String::from_utf8_lossy(key)))?;
                if seq != seen.events {
                    return Err(format!("put #{seq} arrived where #{} was due", seen.events).into());
                }
                seen.events += 1;
                seen.hash = fold(seen.hash, event.kv.mod_revision);
                seen.latencies.push(received.saturating_sub(sent));
            }
        }
    }
}

/// The rest of a watch after its end marker: nothing may come within `QUIET_CHECK`.
async fn quiet(mut stream: WatchStream, seen: Seen) -> Result<Seen> {
    match tokio::time::timeout(QUIET_CHECK, stream.next()).await {
        Err(_) => Ok(seen),
        Ok(Some(Ok(update))) if update.events.is_empty() => Ok(seen),
        Ok(Some(Ok(_))) => Err("events after the end marker".into()),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(None) => Err("the watch ended".into()),
    }
}

/// The writer: its own `Client` on a runtime of its own on this thread, so that its CPU time
/// (its connection's included) can be told apart from the watchers'. Puts the warm-up key,
/// waits for the start, puts one key at a time until the deadline, then the end marker.
fn write(
    endpoint: &str,
    prefix: &str,
    epoch: Instant,
    start: std::sync::mpsc::Receiver<Instant>,
) -> Result<Written> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kv = runtime.block_on(connect(endpoint))?.kv();
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("{prefix}k/{i:04}").into_bytes())
        .collect();
    runtime.block_on(kv.put(format!("{prefix}{WARMUP_KEY}"), "", PutOptions::new()))?;
    let deadline = start.recv()?;
    let ticks = thread_ticks()?;
    let (puts, hash) = runtime.block_on(async {
        let (mut seq, mut hash) = (0u64, HASH_SEED);
        while Instant::now() < deadline {
            let key = &keys[seq as usize % KEYS];
            let put = kv
                .put(key, event_value(seq, epoch.elapsed()), PutOptions::new())
                .await?;
            hash = fold(hash, put.revision);
            seq += 1;
        }
        kv.put(format!("{prefix}{END_KEY}"), "", PutOptions::new())
            .await?;
        Ok::<_, kv_client::Error>((seq, hash))
    })?;
    Ok(Written {
        puts,
        hash,
        ticks: thread_ticks()?.saturating_sub(ticks),
    })
}

/// utime + stime of the calling thread alone, in clock ticks. `procfs::cpu_ticks` reads
/// `/proc/PID/stat`, which sums every thread of the process (so does `/proc/TID/stat`); only
/// `/proc/thread-self/stat` (`/proc/PID/task/TID/stat`) holds one thread's time.
fn thread_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // `fields` starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/thread-self/stat: no field {}", i + 3).into())
    };
    Ok(field(11)? + field(12)?)
}
