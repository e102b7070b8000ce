//! Closed-loop watch benchmarks for any etcd-v3 endpoint (ours or etcd), so that the two can be
//! compared run for run: `kv-watch-bench MODE ENDPOINT [ARGS]`. Each mode prints one result
//! line, and fails if any watcher missed, repeated or reordered an event: a fast server that
//! drops events must not look good.
//!
//! - `fanout ENDPOINT WATCHERS SECONDS [PID]`: WATCHERS watchers of one prefix over ONE watch
//!   stream, one writer putting keys under the prefix one at a time. Events delivered per second
//!   (summed over watchers), puts per second, and put-to-event latency p50/p99 over every event.
//!   Every watcher must see every put, once, in order.
//! - `distinct ENDPOINT WATCHERS WRITERS SECONDS [PID]`: WATCHERS watchers each of its own key
//!   over one stream, WRITERS concurrent writers each putting its share of the keys
//!   round-robin. Events per second and put-to-event p50/p99; every watcher must see every put
//!   of its key, once, in order.
//! - `create ENDPOINT N`: N create requests pipelined on one stream; the time until the N-th
//!   `created` response, and creates per second. Then every key is put once and each watcher
//!   must see exactly its key.
//! - `memory ENDPOINT N PID`: the server's RSS (`/proc/PID/status`) before and after N watchers
//!   of distinct keys are created over a few streams, and bytes per watcher; then checked as in
//!   `create`.
//!
//! The optional PID of `fanout` and `distinct` adds the server's CPU use over the run.
//!
//! Each put's value carries a sequence number and the time it was sent (nanoseconds since the
//! start of this process's run), so latency is measured from the event itself: the time its
//! response arrives minus the time the put was sent. Watchers are created, and the streams are
//! drained, before and after the timed window; a watcher still missing events
//! `DRAIN_TIMEOUT` after the last put fails the run.

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use kv_core::proto::etcdserverpb::{
    PutRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::event::EventType;
use kv_core::proto::prefix_end;
use kv_tests::procfs::{clock_ticks_per_second, cpu_ticks, rss_kib};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Connections for the writers and the setup puts (as `kv-load`); each watch stream of a
/// mode shares one further connection.
const MAX_CONNECTIONS: usize = 8;
/// Txns in flight while putting the keys that check `create` and `memory`.
const SETUP_IN_FLIGHT: usize = 64;
/// Puts per checking txn (etcd's default `--max-txn-ops` is 128).
const PUTS_PER_TXN: usize = 100;
/// Distinct keys the fanout writer cycles through, so the keyspace stays small however fast
/// it writes.
const FANOUT_KEYS: u64 = 1000;
/// Value size: sequence number, send time, padding.
const VALUE_BYTES: usize = 32;
/// Streams the memory mode spreads its watchers over.
const MEMORY_STREAMS: usize = 4;
/// Pause before each RSS reading, so that the reading is not taken mid-burst.
const MEMORY_SETTLE: Duration = Duration::from_secs(3);
/// Create requests queued ahead of the stream.
const REQUEST_QUEUE: usize = 1024;
/// How long creating the watchers of a stream may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the watchers may take, after the last put was answered, to see every event.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the streams are still read after every watcher saw all it was owed, so that a
/// late duplicate or an event for a put never made is caught too.
const QUIET_CHECK: Duration = Duration::from_millis(200);
/// Largest response we accept (tonic's default of 4 MiB could refuse a large catch-up batch).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Errors quoted in a failure report; the rest are only counted.
const QUOTED_ERRORS: usize = 10;

fn usage() -> ! {
    eprintln!(
        "usage: kv-watch-bench MODE ENDPOINT [ARGS]\n  \
         fanout ENDPOINT WATCHERS SECONDS [PID]\n  \
         distinct ENDPOINT WATCHERS WRITERS SECONDS [PID]\n  \
         create ENDPOINT N\n  \
         memory ENDPOINT N PID"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| usage()),
    }
}

async fn connect(endpoint: &str, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            Channel::from_shared(format!("http://{endpoint}"))?
                .connect()
                .await?,
        );
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A put's value: its sequence number and send time, padded to `VALUE_BYTES`.
fn encode(seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE_BYTES);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&sent_ns.to_le_bytes());
    v.resize(VALUE_BYTES, b'v');
    v
}

/// (sequence number, send time) of a value written by [`encode`].
fn decode(v: &[u8]) -> Option<(u64, u64)> {
    let seq = v.get(..8)?.try_into().ok()?;
    let sent = v.get(8..16)?.try_into().ok()?;
    Some((u64::from_le_bytes(seq), u64::from_le_bytes(sent)))
}

fn since_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// Nanosecond latencies in log-linear buckets: exact below 64 ns, then 64 buckets per power
/// of two (under 1.6 % error), so that every event of a run can be counted in 30 KiB.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn new() -> Self {
        Self {
            counts: vec![0; (64 - SUB_BITS as usize + 1) * SUB as usize],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        // `v >> shift` is in [SUB, 2 SUB).
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        ((u64::from(shift) + 1) * SUB + (v >> shift) - SUB) as usize
    }

    /// The smallest value of bucket `i`.
    fn low(i: usize) -> u64 {
        let (b, r) = (i as u64 / SUB, i as u64 % SUB);
        if b == 0 { r } else { (SUB + r) << (b - 1) }
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The middle of the bucket holding the `p` quantile.
    fn percentile(&self, p: f64) -> Duration {
        let rank = ((self.total as f64 * p).ceil() as u64).clamp(1, self.total.max(1));
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = (Self::low(i), Self::low(i + 1));
                return Duration::from_nanos(lo + (hi - lo) / 2);
            }
        }
        Duration::ZERO
    }
}

/// One watch stream whose watchers have all been created.
struct WatchStream {
    /// Kept open for as long as the stream is used: etcd ends a watch stream as soon as the
    /// client half-closes it.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    /// Watch id -> position of its create request.
    ids: HashMap<i64, usize>,
}

/// Opens a stream on `channel` and pipelines `creates` on it; returns once every one of them
/// is answered `created` (in request order, as both etcd and we answer them).
async fn open(channel: Channel, creates: Vec<WatchCreateRequest>) -> Result<WatchStream> {
    let n = creates.len();
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    // The feeder runs before the call is awaited: etcd sends the response headers only with
    // its first response.
    let feeder = {
        let tx = tx.clone();
        tokio::spawn(async move {
            for create in creates {
                let req = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(create)),
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        })
    };
    let created = async {
        let mut responses = WatchClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut ids = HashMap::with_capacity(n);
        while ids.len() < n {
            let r = responses
                .message()
                .await?
                .ok_or("watch stream ended while creating")?;
            if !r.created || r.canceled || !r.events.is_empty() {
                return Err(format!(
                    "create {} of {n}: expected `created`, got watch_id {} created {} canceled {} ({:?}) with {} events",
                    ids.len(),
                    r.watch_id,
                    r.created,
                    r.canceled,
                    r.cancel_reason,
                    r.events.len()
                )
                .into());
            }
            let at = ids.len();
            if ids.insert(r.watch_id, at).is_some() {
                return Err(format!("watch id {} created twice", r.watch_id).into());
            }
        }
        Ok::<_, Box<dyn Error + Send + Sync>>((responses, ids))
    };
    let (responses, ids) = tokio::time::timeout(CREATE_TIMEOUT, created)
        .await
        .map_err(|_| format!("{n} creates not answered within {CREATE_TIMEOUT:?}"))??;
    feeder.await?;
    Ok(WatchStream {
        _requests: tx,
        responses,
        ids,
    })
}

/// What the watchers of one stream must see.
#[derive(Clone)]
enum Expect {
    /// Every watcher sees every put; put number `seq` wrote `keys[seq % keys.len()]`.
    Every(Arc<Vec<Vec<u8>>>),
    /// Watcher `w` sees the puts of `keys[w]` only, numbered per key from 0.
    Own(Arc<Vec<Vec<u8>>>),
}

impl Expect {
    fn key(&self, watcher: usize, seq: u64) -> &[u8] {
        match self {
            Expect::Every(keys) => &keys[(seq % keys.len() as u64) as usize],
            Expect::Own(keys) => &keys[watcher],
        }
    }
}

/// How the writers number their puts.
#[derive(Clone, Copy)]
enum Numbering {
    /// Put `c` is number `c` (one writer, watched by everyone).
    EveryPut,
    /// Put `c` is the `c / keys`-th put of its key.
    PerKey,
}

/// What one stream's watchers saw.
struct Tally {
    /// Per watcher, the sequence number it must see next.
    next: Vec<u64>,
    /// Per watcher, the mod revision of the last event it saw.
    last_rev: Vec<i64>,
    events: u64,
    /// Responses that carried events (etcd batches several revisions into one when behind).
    responses: u64,
    latency: Histogram,
    last_event: Option<Instant>,
    errors: u64,
    quoted: Vec<String>,
}

impl Tally {
    fn new(watchers: usize) -> Self {
        Self {
            next: vec![0; watchers],
            last_rev: vec![0; watchers],
            events: 0,
            responses: 0,
            latency: Histogram::new(),
            last_event: None,
            errors: 0,
            quoted: Vec::new(),
        }
    }

    fn error(&mut self, msg: impl FnOnce() -> String) {
        self.errors += 1;
        if self.quoted.len() < QUOTED_ERRORS {
            self.quoted.push(msg());
        }
    }

    /// Checks and counts one response; returns how many watchers it completed (saw all `owed`).
    fn see(
        &mut self,
        r: WatchResponse,
        ids: &HashMap<i64, usize>,
        expect: &Expect,
        epoch: Instant,
        owed: Option<&[u64]>,
    ) -> usize {
        let now = Instant::now();
        let now_ns = now.duration_since(epoch).as_nanos() as u64;
        if r.canceled || r.created {
            self.error(|| {
                format!(
                    "watch {} created {} canceled {} ({:?}) mid-run",
                    r.watch_id, r.created, r.canceled, r.cancel_reason
                )
            });
            return 0;
        }
        if r.events.is_empty() {
            // A progress notification.
            return 0;
        }
        let Some(&w) = ids.get(&r.watch_id) else {
            self.error(|| format!("events for unknown watch id {}", r.watch_id));
            return 0;
        };
        self.responses += 1;
        let mut completed = 0;
        for ev in &r.events {
            let Some(kv) = ev.kv.as_ref() else {
                self.error(|| format!("watcher {w}: event without kv"));
                continue;
            };
            if ev.r#type != EventType::Put as i32 {
                self.error(|| format!("watcher {w}: unexpected event type {}", ev.r#type));
                continue;
            }
            let Some((seq, sent)) = decode(&kv.value) else {
                self.error(|| format!("watcher {w}: undecodable value {:?}", kv.value));
                continue;
            };
            if kv.key != expect.key(w, seq) {
                self.error(|| {
                    format!(
                        "watcher {w}: put {seq} with key {:?}, expected {:?}",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(expect.key(w, seq))
                    )
                });
            }
            if kv.mod_revision <= self.last_rev[w] {
                let last = self.last_rev[w];
                self.error(|| {
                    format!(
                        "watcher {w}: revision {} after revision {last}",
                        kv.mod_revision
                    )
                });
            }
            self.last_rev[w] = kv.mod_revision;
            let next = self.next[w];
            if seq != next {
                self.error(|| {
                    if seq < next {
                        format!("watcher {w}: put {seq} again, after put {}", next - 1)
                    } else {
                        format!("watcher {w}: puts {next}..{seq} missed")
                    }
                });
            }
            if seq < next {
                continue;
            }
            self.next[w] = seq + 1;
            self.events += 1;
            self.latency.record(now_ns.saturating_sub(sent));
            if let Some(owed) = owed {
                if self.next[w] == owed[w] {
                    completed += 1;
                } else if self.next[w] > owed[w] {
                    self.error(|| format!("watcher {w}: put {seq} was never made"));
                }
            }
        }
        self.last_event = Some(now);
        completed
    }
}

/// Reads `stream` until every watcher has seen what it is owed (sent on `owed` once the
/// writers are done: per watcher, how many puts it must see) and then `QUIET_CHECK` more, or
/// until `drain` after the owed counts arrived.
async fn receive(
    mut stream: WatchStream,
    expect: Expect,
    epoch: Instant,
    mut owed_rx: oneshot::Receiver<Vec<u64>>,
    drain: Duration,
) -> Tally {
    let mut tally = Tally::new(stream.ids.len());
    let mut owed: Option<Vec<u64>> = None;
    let mut complete = 0;
    let mut quiet_check = false;
    let timeout = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(timeout);
    loop {
        if !quiet_check && owed.as_ref().is_some_and(|o| complete == o.len()) {
            quiet_check = true;
            timeout
                .as_mut()
                .reset(tokio::time::Instant::now() + QUIET_CHECK);
        }
        tokio::select! {
            r = &mut owed_rx, if owed.is_none() => {
                // The writers failed: their error is reported by the caller.
                let Ok(o) = r else { break };
                if o.len() != tally.next.len() {
                    tally.error(|| "owed counts do not match the watchers".into());
                    break;
                }
                complete = tally.next.iter().zip(&o).filter(|(n, o)| n == o).count();
                owed = Some(o);
                timeout.as_mut().reset(tokio::time::Instant::now() + drain);
            }
            _ = &mut timeout => break,
            r = stream.responses.next() => match r {
                Some(Ok(r)) => {
                    complete += tally.see(r, &stream.ids, &expect, epoch, owed.as_deref());
                }
                Some(Err(e)) => {
                    tally.error(|| format!("watch stream failed: {e}"));
                    break;
                }
                None => {
                    tally.error(|| "watch stream ended".into());
                    break;
                }
            },
        }
    }
    if let Some(o) = &owed {
        let missing: u64 = tally
            .next
            .iter()
            .zip(o)
            .map(|(n, o)| o.saturating_sub(*n))
            .sum();
        if missing > 0 {
            let short = tally.next.iter().zip(o).filter(|(n, o)| n < o).count();
            tally.error(|| {
                format!("{missing} events never arrived ({short} watchers short, waited {drain:?})")
            });
        }
    }
    tally
}

/// Sums tallies and fails with the first errors if any watcher saw something wrong.
fn merge(tallies: Vec<Tally>) -> Result<Tally> {
    let mut all = Tally::new(0);
    for t in tallies {
        all.events += t.events;
        all.responses += t.responses;
        all.latency.merge(&t.latency);
        all.last_event = all.last_event.max(t.last_event);
        all.errors += t.errors;
        all.quoted.extend(t.quoted);
    }
    if all.errors > 0 {
        for e in all.quoted.iter().take(QUOTED_ERRORS) {
            eprintln!("  {e}");
        }
        return Err(format!("{} watch errors (first ones above)", all.errors).into());
    }
    Ok(all)
}

/// Puts `keys` round-robin, one at a time, until `deadline`; returns how many puts it made.
/// Put `c` writes `keys[c % keys.len()]`, numbered as `numbering` says, with its send time.
async fn write(
    mut kv: KvClient<Channel>,
    keys: Vec<Vec<u8>>,
    numbering: Numbering,
    epoch: Instant,
    deadline: Instant,
) -> Result<u64> {
    let m = keys.len() as u64;
    let mut c = 0u64;
    while m > 0 && Instant::now() < deadline {
        let seq = match numbering {
            Numbering::EveryPut => c,
            Numbering::PerKey => c / m,
        };
        kv.put(PutRequest {
            key: keys[(c % m) as usize].clone(),
            value: encode(seq, since_ns(epoch)),
            ..Default::default()
        })
        .await?;
        c += 1;
    }
    Ok(c)
}

/// Puts every key once (sequence number 0), in txns of `PUTS_PER_TXN`.
async fn put_each(channels: &[Channel], keys: &[Vec<u8>], epoch: Instant) -> Result<()> {
    let txns: Vec<TxnRequest> = keys
        .chunks(PUTS_PER_TXN)
        .map(|chunk| TxnRequest {
            success: chunk
                .iter()
                .map(|key| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: encode(0, since_ns(epoch)),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    stream::iter(txns.into_iter().enumerate())
        .map(|(i, txn)| {
            let mut kv = KvClient::new(channels[i % channels.len()].clone());
            async move { kv.txn(txn).await }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

/// Puts each key of `streams` (one key list per stream, in create order) once and checks that
/// each watcher sees its own key's put and nothing else.
async fn check_each_key(
    channels: &[Channel],
    streams: Vec<WatchStream>,
    keys: Vec<Arc<Vec<Vec<u8>>>>,
) -> Result<u64> {
    let epoch = Instant::now();
    let mut readers = Vec::new();
    let mut owed = Vec::new();
    for (s, keys) in streams.into_iter().zip(&keys) {
        let (tx, rx) = oneshot::channel();
        owed.push((tx, keys.len()));
        readers.push(tokio::spawn(receive(
            s,
            Expect::Own(keys.clone()),
            epoch,
            rx,
            DRAIN_TIMEOUT,
        )));
    }
    let all: Vec<Vec<u8>> = keys.iter().flat_map(|k| k.iter().cloned()).collect();
    put_each(channels, &all, epoch).await?;
    for (tx, n) in owed {
        // A reader that is gone has already failed; it says why below.
        let _ = tx.send(vec![1; n]);
    }
    let mut tallies = Vec::new();
    for r in readers {
        tallies.push(r.await?);
    }
    Ok(merge(tallies)?.events)
}

/// CPU use of this process and, if given, of the server, from `start()` to `report()`.
struct CpuMeter {
    server: Option<u32>,
    at: Instant,
    ticks: (u64, Option<u64>),
}

impl CpuMeter {
    fn start(server: Option<u32>) -> Result<Self> {
        Ok(Self {
            server,
            at: Instant::now(),
            ticks: Self::read(server)?,
        })
    }

    fn read(server: Option<u32>) -> Result<(u64, Option<u64>)> {
        Ok((
            cpu_ticks(std::process::id())?,
            server.map(cpu_ticks).transpose()?,
        ))
    }

    fn report(&self) -> Result<String> {
        let (me, server) = Self::read(self.server)?;
        let pct = |ticks: u64| {
            100.0 * ticks as f64 / clock_ticks_per_second() as f64 / self.at.elapsed().as_secs_f64()
        };
        let mut out = format!("client cpu {:.0} %", pct(me - self.ticks.0));
        if let (Some(now), Some(then)) = (server, self.ticks.1) {
            out += &format!(", server cpu {:.0} %", pct(now - then));
        }
        Ok(out)
    }
}

async fn fanout(endpoint: &str, watchers: usize, seconds: u64, pid: Option<u32>) -> Result<()> {
    let channels = connect(endpoint, 2).await?;
    let prefix = b"watch-bench/fanout/".to_vec();
    let create = WatchCreateRequest {
        key: prefix.clone(),
        range_end: prefix_end(&prefix),
        ..Default::default()
    };
    let stream = open(channels[0].clone(), vec![create; watchers]).await?;
    let keys: Vec<Vec<u8>> = (0..FANOUT_KEYS)
        .map(|i| format!("watch-bench/fanout/{i:06}").into_bytes())
        .collect();
    let epoch = Instant::now();
    let (owed_tx, owed_rx) = oneshot::channel();
    let reader = tokio::spawn(receive(
        stream,
        Expect::Every(Arc::new(keys.clone())),
        epoch,
        owed_rx,
        DRAIN_TIMEOUT,
    ));
    let cpu = CpuMeter::start(pid)?;
    let start = Instant::now();
    let kv = KvClient::new(channels[1].clone());
    let deadline = start + Duration::from_secs(seconds);
    let puts = write(kv, keys, Numbering::EveryPut, epoch, deadline).await?;
    let wrote = start.elapsed();
    let _ = owed_tx.send(vec![puts; watchers]);
    let tally = merge(vec![reader.await?])?;
    let cpu = cpu.report()?;
    let until = tally.last_event.map_or(wrote, |t| t - start).max(wrote);
    println!(
        "fanout: {watchers} watchers, 1 stream: {:.0} events/s {:.0} puts/s put-to-event p50 {:.2} ms p99 {:.2} ms ({puts} puts x {watchers} watchers = {} events in {} responses, each seen once and in order, in {:.1} s, last {:.2} s after the last put; {cpu})",
        tally.events as f64 / until.as_secs_f64(),
        puts as f64 / wrote.as_secs_f64(),
        ms(tally.latency.percentile(0.50)),
        ms(tally.latency.percentile(0.99)),
        tally.events,
        tally.responses,
        until.as_secs_f64(),
        (until - wrote).as_secs_f64(),
    );
    Ok(())
}

async fn distinct(
    endpoint: &str,
    watchers: usize,
    writers: usize,
    seconds: u64,
    pid: Option<u32>,
) -> Result<()> {
    if writers > watchers {
        return Err("distinct needs at least as many watchers (keys) as writers".into());
    }
    let channels = connect(endpoint, MAX_CONNECTIONS.min(writers) + 1).await?;
    let keys: Vec<Vec<u8>> = (0..watchers)
        .map(|i| format!("watch-bench/distinct/{i:06}").into_bytes())
        .collect();
    let creates = keys
        .iter()
        .map(|k| WatchCreateRequest {
            key: k.clone(),
            ..Default::default()
        })
        .collect();
    let stream = open(channels[0].clone(), creates).await?;
    let epoch = Instant::now();
    let (owed_tx, owed_rx) = oneshot::channel();
    let reader = tokio::spawn(receive(
        stream,
        Expect::Own(Arc::new(keys.clone())),
        epoch,
        owed_rx,
        DRAIN_TIMEOUT,
    ));
    let cpu = CpuMeter::start(pid)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    // Writer `j` owns keys j, j + writers, ...: each key has one writer, so its puts are
    // ordered and a watcher can check that it sees them in order.
    let mut tasks = Vec::new();
    for j in 0..writers {
        let mine: Vec<Vec<u8>> = keys.iter().skip(j).step_by(writers).cloned().collect();
        let kv = KvClient::new(channels[1 + j % (channels.len() - 1)].clone());
        tasks.push(tokio::spawn(write(
            kv,
            mine,
            Numbering::PerKey,
            epoch,
            deadline,
        )));
    }
    let mut owed = vec![0u64; watchers];
    let mut puts = 0;
    for (j, t) in tasks.into_iter().enumerate() {
        let c = t.await??;
        puts += c;
        let m = (watchers - j).div_ceil(writers) as u64;
        for (t, w) in (j..watchers).step_by(writers).enumerate() {
            owed[w] = c / m + u64::from((t as u64) < c % m);
        }
    }
    let wrote = start.elapsed();
    let _ = owed_tx.send(owed);
    let tally = merge(vec![reader.await?])?;
    let cpu = cpu.report()?;
    let until = tally.last_event.map_or(wrote, |t| t - start).max(wrote);
    println!(
        "distinct: {watchers} watchers, 1 stream, {writers} writers: {:.0} events/s {:.0} puts/s put-to-event p50 {:.2} ms p99 {:.2} ms ({puts} puts, {} events in {} responses, each seen once and in order by its key's watcher, in {:.1} s, last {:.2} s after the last put; {cpu})",
        tally.events as f64 / until.as_secs_f64(),
        puts as f64 / wrote.as_secs_f64(),
        ms(tally.latency.percentile(0.50)),
        ms(tally.latency.percentile(0.99)),
        tally.events,
        tally.responses,
        until.as_secs_f64(),
        (until - wrote).as_secs_f64(),
    );
    Ok(())
}

fn key_creates(keys: &[Vec<u8>]) -> Vec<WatchCreateRequest> {
    keys.iter()
        .map(|k| WatchCreateRequest {
            key: k.clone(),
            ..Default::default()
        })
        .collect()
}

async fn create(endpoint: &str, n: usize) -> Result<()> {
    let channels = connect(endpoint, MAX_CONNECTIONS + 1).await?;
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("watch-bench/create/{i:07}").into_bytes())
        .collect();
    let creates = key_creates(&keys);
    let t = Instant::now();
    let stream = open(channels[0].clone(), creates).await?;
    let took = t.elapsed();
    let seen = check_each_key(&channels[1..], vec![stream], vec![Arc::new(keys)]).await?;
    println!(
        "create: {n} watches on one stream: {:.1} ms, {:.0} creates/s (then {seen} keys put, each seen once by its own watcher only)",
        ms(took),
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}

async fn memory(endpoint: &str, n: usize, pid: u32) -> Result<()> {
    // Fail before the long setup if the PID is wrong.
    rss_kib(pid)?;
    let channels = connect(endpoint, MAX_CONNECTIONS + 1).await?;
    let keys: Vec<Arc<Vec<Vec<u8>>>> = (0..MEMORY_STREAMS)
        .map(|s| {
            Arc::new(
                (s..n)
                    .step_by(MEMORY_STREAMS)
                    .map(|i| format!("watch-bench/memory/{i:07}").into_bytes())
                    .collect(),
            )
        })
        .collect();
    tokio::time::sleep(MEMORY_SETTLE).await;
    let before = rss_kib(pid)?;
    let t = Instant::now();
    let opened: Vec<_> = keys
        .iter()
        .map(|k| tokio::spawn(open(channels[0].clone(), key_creates(k))))
        .collect();
    let mut streams = Vec::new();
    for o in opened {
        streams.push(o.await??);
    }
    let took = t.elapsed();
    tokio::time::sleep(MEMORY_SETTLE).await;
    let after = rss_kib(pid)?;
    let seen = check_each_key(&channels[1..], streams, keys).await?;
    let grew = after.saturating_sub(before) * 1024;
    println!(
        "memory: {n} watches on {MEMORY_STREAMS} streams: rss {:.1} MiB before, {:.1} MiB after, {:.0} bytes/watcher (created in {:.2} s; then {seen} keys put, each seen once by its own watcher only)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        grew as f64 / n.max(1) as f64,
        took.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(endpoint)) = (args.get(1), args.get(2)) else {
        usage()
    };
    let pid = |i: usize| args.get(i).map(|s| s.parse().unwrap_or_else(|_| usage()));
    match mode.as_str() {
        "fanout" => fanout(endpoint, arg(&args, 3, 1000), arg(&args, 4, 10), pid(5)).await,
        "distinct" => {
            let (watchers, writers) = (arg(&args, 3, 1000), arg(&args, 4, 16usize).max(1));
            distinct(endpoint, watchers, writers, arg(&args, 5, 10), pid(6)).await
        }
        "create" => create(endpoint, arg(&args, 3, 10_000)).await,
        "memory" => {
            let Some(pid) = pid(4) else { usage() };
            memory(endpoint, arg(&args, 3, 100_000), pid).await
        }
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::proto::mvccpb::{Event, KeyValue};

    fn response(watch_id: i64, puts: &[(&[u8], u64, i64)]) -> WatchResponse {
        WatchResponse {
            watch_id,
            events: puts
                .iter()
                .map(|(key, seq, rev)| Event {
                    r#type: EventType::Put as i32,
                    kv: Some(KeyValue {
                        key: key.to_vec().into(),
                        value: encode(*seq, 0).into(),
                        mod_revision: *rev,
                        ..Default::default()
                    }),
                    prev_kv: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn own(keys: &[&[u8]]) -> Expect {
        Expect::Own(Arc::new(keys.iter().map(|k| k.to_vec()).collect()))
    }

    #[test]
    fn histogram_buckets_are_contiguous_and_percentiles_close() {
        for v in [0, 1, 63, 64, 65, 127, 128, 1000, 123_456_789, u64::MAX / 2] {
            let i = Histogram::index(v);
            assert!(Histogram::low(i) <= v && v < Histogram::low(i + 1), "{v}");
        }
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(us * 1000);
        }
        let p50 = h.percentile(0.50).as_nanos() as f64;
        let p99 = h.percentile(0.99).as_nanos() as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.02, "{p99}");
    }

    #[test]
    fn a_watcher_completes_when_it_has_seen_every_put_in_order() {
        let ids = HashMap::from([(7, 0), (9, 1)]);
        let expect = own(&[b"a", b"b"]);
        let mut t = Tally::new(2);
        let owed = [2, 1];
        let epoch = Instant::now();
        let done = t.see(
            response(7, &[(b"a", 0, 2)]),
            &ids,
            &expect,
            epoch,
            Some(&owed),
        );
        assert_eq!(done, 0);
        let done = t.see(
            response(7, &[(b"a", 1, 3)]),
            &ids,
            &expect,
            epoch,
            Some(&owed),
        );
        assert_eq!(done, 1);
        let done = t.see(
            response(9, &[(b"b", 0, 4)]),
            &ids,
            &expect,
            epoch,
            Some(&owed),
        );
        assert_eq!((done, t.events, t.errors), (1, 3, 0));
    }

    #[test]
    fn missed_repeated_misrouted_and_reordered_events_are_errors() {
        let ids = HashMap::from([(0, 0)]);
        let expect = own(&[b"a"]);
        let epoch = Instant::now();
        let see = |t: &mut Tally, puts: &[(&[u8], u64, i64)]| {
            t.see(response(0, puts), &ids, &expect, epoch, None);
            t.errors
        };
        let mut t = Tally::new(1);
        assert_eq!(see(&mut t, &[(b"a", 0, 2), (b"a", 2, 4)]), 1, "gap");
        let mut t = Tally::new(1);
        assert_eq!(see(&mut t, &[(b"a", 0, 2), (b"a", 0, 3)]), 1, "repeat");
        assert_eq!(t.events, 1);
        let mut t = Tally::new(1);
        assert_eq!(see(&mut t, &[(b"b", 0, 2)]), 1, "another key");
        let mut t = Tally::new(1);
        assert_eq!(see(&mut t, &[(b"a", 0, 5), (b"a", 1, 4)]), 1, "revision");
        let mut t = Tally::new(1);
        t.see(response(3, &[(b"a", 0, 2)]), &ids, &expect, epoch, None);
        assert_eq!(t.errors, 1, "unknown watch id");
    }

    #[test]
    fn fanout_keys_follow_the_sequence() {
        let keys = Arc::new(vec![b"p/0".to_vec(), b"p/1".to_vec()]);
        let expect = Expect::Every(keys);
        assert_eq!(expect.key(5, 3), b"p/1");
    }
}
