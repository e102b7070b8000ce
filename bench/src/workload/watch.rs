//! `watch-fanout` and `watch-distinct`: events delivered per second and put-to-event latency,
//! with every event checked, so that a server that drops or repeats events cannot look fast.
//!
//! - `watch-fanout`: `--watchers` watches of one prefix; one writer puts keys under it one at
//!   a time. Every watcher must see every put, once, in order.
//! - `watch-distinct`: `--watchers` watches each of its own key; `--watch-writers` writers,
//!   writer `j` owning keys `j`, `j + writers`, ..., put them round-robin. Every watcher must
//!   see every put of its key, once, in order, and nothing else.
//!
//! All watches are on one client of their own, so on one watch stream (kv-client shares one
//! stream per client), as the raw-tonic `kv-watch-bench` these replace measured; the writers
//! use the run's connections. A few reader tasks share the watches and check each event:
//! its key, its sequence number (carried in the value with the put's send time), and that
//! revisions only grow.
//!
//! The watches start right after the revision read before creating them, so none misses a put
//! however late the server gets to create it. Each watch then must see a warm-up put (sequence
//! 0, not counted) before the window opens: the window measures live delivery, not creation.
//! After the writers stop, the readers wait for every event owed (at most `DRAIN_TIMEOUT`),
//! then listen `QUIET_CHECK` longer so that a late duplicate or a stray event is caught too.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::select_all;
use kv_client::{EventKind, GetOptions, Kv, PutOptions, WatchOptions, WatchStream, WatchUpdate};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::preload;
use crate::error::{During, Error};
use crate::load::{Counters, Measured, QUOTED_FAILURES, Stop, Window};
use crate::run::Context;
use crate::stats::Histogram;

/// Keys the fan-out writer cycles through, so the key space stays small however fast it
/// writes.
const FANOUT_KEYS: usize = 1000;
/// Tasks the watches are shared among for reading and checking.
const READERS: usize = 4;
/// How long creating the watches and seeing the warm-up put may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the watchers may take, after the last put was answered, to see every event.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the watches are still read after every watcher saw all it was owed.
const QUIET_CHECK: Duration = Duration::from_millis(200);

/// A put's value: its sequence number and send time (ns since `epoch`), padded to `size`.
fn encode(size: usize, seq: u64, epoch: Instant) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(16));
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&since_ns(epoch).to_le_bytes());
    v.resize(size.max(16), b'w');
    v
}

/// (sequence number, send time) of a value written by [`encode`].
fn decode(v: &[u8]) -> Option<(u64, u64)> {
    let seq = v.get(..8)?.try_into().ok()?;
    let sent = v.get(8..16)?.try_into().ok()?;
    Some((u64::from_le_bytes(seq), u64::from_le_bytes(sent)))
}

fn since_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Which key each put must carry, for a watcher.
#[derive(Clone)]
enum Expect {
    /// Every watcher sees every put; put `seq` wrote `keys[seq % keys.len()]`.
    Every(Arc<Vec<Vec<u8>>>),
    /// Watcher `w` sees the puts of `keys[w]` only.
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

/// What the watchers of one reader saw.
struct Tally {
    /// Global index of this reader's first watcher.
    first: usize,
    /// Per watcher, the sequence number due next (0: the warm-up put).
    next: Vec<u64>,
    /// Per watcher, the mod revision of the last event it saw.
    last_rev: Vec<i64>,
    /// Timed events seen (the warm-up puts are not counted).
    events: u64,
    /// Updates (watch responses) that carried events.
    updates: u64,
    latency: Histogram,
    last_event: Option<Instant>,
    /// Violations of the checks, and the first few described.
    violations: u64,
    quoted: Vec<String>,
}

/// What one update did to a reader's watchers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// Watchers that now have every event owed.
    completed: usize,
    /// Watchers that just saw their warm-up put.
    warmed: usize,
    /// Timed events it carried.
    events: u64,
}

impl Tally {
    fn new(first: usize, watchers: usize) -> Tally {
        Tally {
            first,
            next: vec![0; watchers],
            last_rev: vec![0; watchers],
            events: 0,
            updates: 0,
            latency: Histogram::new(),
            last_event: None,
            violations: 0,
            quoted: Vec::new(),
        }
    }

    fn violation(&mut self, why: impl FnOnce() -> String) {
        self.violations += 1;
        if self.quoted.len() < QUOTED_FAILURES {
            self.quoted.push(why());
        }
    }

    /// Checks and counts one update of local watcher `i`; `owed` (once known) is, per local
    /// watcher, the sequence number due after its last event.
    fn see(
        &mut self,
        i: usize,
        update: WatchUpdate,
        expect: &Expect,
        epoch: Instant,
        owed: Option<&[u64]>,
    ) -> Seen {
        let mut seen = Seen::default();
        if update.events.is_empty() {
            // A progress notification.
            return seen;
        }
        let now = Instant::now();
        let now_ns = u64::try_from(now.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let w = self.first + i;
        self.updates += 1;
        for event in &update.events {
            let kv = &event.kv;
            if event.kind != EventKind::Put {
                self.violation(|| format!("watcher {w}: a delete of {}", show(&kv.key)));
                continue;
            }
            let Some((seq, sent)) = decode(&kv.value) else {
                self.violation(|| format!("watcher {w}: a stray put of {}", show(&kv.key)));
                continue;
            };
            if kv.key != expect.key(w, seq) {
                self.violation(|| {
                    format!(
                        "watcher {w}: put {seq} with key {}, expected {}",
                        show(&kv.key),
                        show(expect.key(w, seq))
                    )
                });
            }
            if kv.mod_revision <= self.last_rev[i] {
                let last = self.last_rev[i];
                self.violation(|| {
                    format!(
                        "watcher {w}: revision {} after revision {last}",
                        kv.mod_revision
                    )
                });
            }
            self.last_rev[i] = kv.mod_revision;
            let next = self.next[i];
            if seq != next {
                self.violation(|| {
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
            self.next[i] = seq + 1;
            if seq == 0 {
                seen.warmed += 1;
                continue;
            }
            seen.events += 1;
            self.latency.record_ns(now_ns.saturating_sub(sent));
            if let Some(owed) = owed {
                if self.next[i] == owed[i] {
                    seen.completed += 1;
                } else if self.next[i] > owed[i] {
                    self.violation(|| format!("watcher {w}: put {seq} was never made"));
                }
            }
        }
        self.events += seen.events;
        self.last_event = Some(now);
        seen
    }
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The reader tasks and the signals between them and the workload.
struct Watching {
    readers: Vec<JoinHandle<Tally>>,
    /// One per reader: fires once each of its watchers saw the warm-up put.
    ready: Vec<oneshot::Receiver<()>>,
    /// One per reader: the owed sequence numbers of its watchers, once the writers stopped.
    owed: Vec<(oneshot::Sender<Vec<u64>>, Range<usize>)>,
}

impl Watching {
    /// Shares `streams` (watcher `w` is `streams[w]`) among the reader tasks.
    fn start(
        streams: Vec<WatchStream>,
        expect: Expect,
        epoch: Instant,
        counters: Arc<Counters>,
    ) -> Watching {
        let n = streams.len();
        let per = n.div_ceil(READERS.min(n).max(1));
        let mut streams = streams.into_iter();
        let mut watching = Watching {
            readers: Vec::new(),
            ready: Vec::new(),
            owed: Vec::new(),
        };
        let mut first = 0;
        while first < n {
            let mine: Vec<WatchStream> = streams.by_ref().take(per).collect();
            let range = first..first + mine.len();
            let (ready_tx, ready_rx) = oneshot::channel();
            let (owed_tx, owed_rx) = oneshot::channel();
            watching.readers.push(tokio::spawn(read(
                mine,
                first,
                expect.clone(),
                epoch,
                ready_tx,
                owed_rx,
                counters.clone(),
            )));
            watching.ready.push(ready_rx);
            watching.owed.push((owed_tx, range.clone()));
            first = range.end;
        }
        watching
    }

    /// Waits until every watcher saw its warm-up put.
    async fn ready(&mut self, within: Duration) -> Result<(), Error> {
        let all = futures::future::join_all(self.ready.iter_mut());
        match tokio::time::timeout(within, all).await {
            Ok(results) if results.iter().all(Result::is_ok) => Ok(()),
            Ok(_) => Err(Error::Timeout(
                "a watch reader ended before its watches were live".into(),
            )),
            Err(_) => Err(Error::Timeout(format!(
                "the watches did not all see the warm-up put within {within:?}"
            ))),
        }
    }

    /// Tells the readers what each watcher is owed (per watcher, the sequence number due after
    /// its last put) and waits for their verdicts, merged.
    async fn finish(self, owed: &[u64]) -> Tally {
        for (tx, range) in self.owed {
            // A reader that is gone has failed already; its tally says why.
            let _ = tx.send(owed[range].to_vec());
        }
        let mut all = Tally::new(0, 0);
        for reader in self.readers {
            let t = match reader.await {
                Ok(t) => t,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            all.events += t.events;
            all.updates += t.updates;
            all.latency.merge(&t.latency);
            all.last_event = all.last_event.max(t.last_event);
            all.violations += t.violations;
            for q in t.quoted {
                if all.quoted.len() < QUOTED_FAILURES {
                    all.quoted.push(q);
                }
            }
        }
        all
    }
}

/// One reader: reads its watches until each watcher has what it is owed and `QUIET_CHECK`
/// more, or `DRAIN_TIMEOUT` after the owed counts arrived.
async fn read(
    streams: Vec<WatchStream>,
    first: usize,
    expect: Expect,
    epoch: Instant,
    ready: oneshot::Sender<()>,
    mut owed_rx: oneshot::Receiver<Vec<u64>>,
    counters: Arc<Counters>,
) -> Tally {
    let n = streams.len();
    let mut tally = Tally::new(first, n);
    let mut all = select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |u| (i, u))),
    );
    let mut ready = Some(ready);
    let mut warmed = 0;
    let mut owed: Option<Vec<u64>> = None;
    let mut complete = 0;
    let mut quiet = false;
    let timeout = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(timeout);
    loop {
        if !quiet && owed.is_some() && complete == n {
            quiet = true;
            timeout
                .as_mut()
                .reset(tokio::time::Instant::now() + QUIET_CHECK);
        }
        tokio::select! {
            o = &mut owed_rx, if owed.is_none() => {
                // The workload gave up: its error says why.
                let Ok(o) = o else { break };
                complete = tally.next.iter().zip(&o).filter(|(n, o)| n == o).count();
                owed = Some(o);
                timeout.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            () = &mut timeout => break,
            item = all.next() => match item {
                Some((i, Ok(update))) => {
                    let seen = tally.see(i, update, &expect, epoch, owed.as_deref());
                    complete += seen.completed;
                    warmed += seen.warmed;
                    counters.done(seen.events);
                    if warmed == n
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(());
                    }
                }
                Some((i, Err(e))) => {
                    tally.violation(|| format!("watcher {}: {e}", first + i));
                }
                None => {
                    tally.violation(|| "every watch ended".into());
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
            tally.violation(|| {
                format!(
                    "{missing} events never arrived ({short} watchers short, waited {DRAIN_TIMEOUT:?})"
                )
            });
        }
    }
    tally
}

/// How a writer numbers its puts.
#[derive(Clone, Copy)]
enum Numbering {
    /// Put `c` (from 1) is number `c`: one writer, every watcher sees every put.
    EveryPut,
    /// Put `c` (from 0) of a writer owning `m` keys writes key `c % m` as its `c / m + 1`-th.
    PerKey,
}

/// Puts `keys` round-robin until the window stops it; returns how many puts it made.
async fn write(
    kv: Kv,
    keys: Vec<Vec<u8>>,
    numbering: Numbering,
    value: impl Fn(u64) -> Vec<u8>,
    stop: Stop,
) -> Result<u64, kv_client::Error> {
    let m = keys.len() as u64;
    let mut c = 0u64;
    while m > 0 && stop.next() {
        let (key, seq) = match numbering {
            Numbering::EveryPut => ((c + 1) % m, c + 1),
            Numbering::PerKey => (c % m, c / m + 1),
        };
        kv.put(&keys[key as usize], value(seq), PutOptions::new())
            .await?;
        c += 1;
    }
    Ok(c)
}

/// The revision after which the watches start: the current one.
async fn current_revision(ctx: &Context<'_>) -> Result<i64, Error> {
    Ok(ctx
        .client(0)
        .kv()
        .get(&ctx.prefix, GetOptions::new().prefix().count_only())
        .await
        .during("read the current revision")?
        .revision)
}

/// The measurement of a watch workload from its tally: events per second up to the last
/// event (or the writers' end if later).
fn measured(tally: Tally, window: Window, puts: u64, wrote: Duration) -> Result<Measured, Error> {
    let started = window.started;
    let usage = window.close()?;
    let until = tally
        .last_event
        .map_or(wrote, |t| t.duration_since(started))
        .max(wrote);
    let mut m = Measured {
        ops: tally.events,
        seconds: until.as_secs_f64(),
        latency: tally.latency,
        errors: 0,
        error_samples: Vec::new(),
        usage,
        failures: Vec::new(),
        details: Default::default(),
    };
    m.detail("puts", puts as f64);
    m.detail("puts_per_sec", puts as f64 / wrote.as_secs_f64().max(1e-9));
    m.detail("updates", tally.updates as f64);
    m.detail("drain_ms", (until - wrote).as_secs_f64() * 1e3);
    if tally.violations > 0 {
        m.fail(format!("{} watch check violations", tally.violations));
    }
    for q in tally.quoted {
        m.fail(q);
    }
    Ok(m)
}

pub(crate) async fn fanout(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..FANOUT_KEYS)
            .map(|i| ctx.key(&format!("{i:06}")))
            .collect(),
    );
    let from = current_revision(ctx).await? + 1;
    let watcher = ctx.dedicated_client().await?;
    let streams: Vec<WatchStream> = (0..s.watchers)
        .map(|_| {
            watcher.watch().watch(
                &ctx.prefix,
                WatchOptions::new().prefix().start_revision(from),
            )
        })
        .collect();
    let epoch = Instant::now();
    let counters = Arc::new(Counters::default());
    let mut watching = Watching::start(
        streams,
        Expect::Every(keys.clone()),
        epoch,
        counters.clone(),
    );
    let kv = ctx.client(0).kv();
    kv.put(&keys[0], encode(s.value_size, 0, epoch), PutOptions::new())
        .await
        .during("warm-up put")?;
    watching.ready(CREATE_TIMEOUT).await?;

    let window = Window::open_counting(s, ctx.workload.name(), ctx.workload.unit(), counters)?;
    let puts = write(
        kv,
        keys.to_vec(),
        Numbering::EveryPut,
        |seq| encode(s.value_size, seq, epoch),
        window.stop.clone(),
    )
    .await
    .during("watch writer")?;
    let wrote = window.started.elapsed();
    let tally = watching.finish(&vec![puts + 1; s.watchers]).await;
    let mut m = measured(tally, window, puts, wrote)?;
    m.detail("watchers", s.watchers as f64);
    Ok(m)
}

pub(crate) async fn distinct(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let (watchers, writers) = (s.watchers, s.watch_writers);
    let keys: Arc<Vec<Vec<u8>>> =
        Arc::new((0..watchers).map(|i| ctx.key(&format!("{i:06}"))).collect());
    let from = current_revision(ctx).await? + 1;
    let watcher = ctx.dedicated_client().await?;
    let streams: Vec<WatchStream> = keys
        .iter()
        .map(|k| {
            watcher
                .watch()
                .watch(k, WatchOptions::new().start_revision(from))
        })
        .collect();
    let epoch = Instant::now();
    let counters = Arc::new(Counters::default());
    let mut watching = Watching::start(streams, Expect::Own(keys.clone()), epoch, counters.clone());
    let warmup: Vec<(Vec<u8>, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), encode(s.value_size, 0, epoch)))
        .collect();
    preload::in_txns(&ctx.client(0).kv(), &warmup).await?;
    watching.ready(CREATE_TIMEOUT).await?;

    let window = Window::open_counting(s, ctx.workload.name(), ctx.workload.unit(), counters)?;
    // Writer `j` owns keys j, j + writers, ...: each key has one writer, so its puts are
    // ordered and its watcher can check that it sees them in order.
    let owned = |j: usize| -> Vec<usize> { (j..watchers).step_by(writers).collect() };
    let tasks: Vec<JoinHandle<Result<u64, kv_client::Error>>> = (0..writers)
        .map(|j| {
            let mine: Vec<Vec<u8>> = owned(j).into_iter().map(|k| keys[k].clone()).collect();
            let value_size = s.value_size;
            tokio::spawn(write(
                ctx.client(j).kv(),
                mine,
                Numbering::PerKey,
                move |seq| encode(value_size, seq, epoch),
                window.stop.clone(),
            ))
        })
        .collect();
    let mut owed = vec![1u64; watchers];
    let mut puts = 0;
    let mut failed = None;
    for (j, task) in tasks.into_iter().enumerate() {
        let c = match task.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                failed.get_or_insert(e);
                continue;
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        puts += c;
        let mine = owned(j);
        let m = mine.len() as u64;
        for (t, &w) in mine.iter().enumerate() {
            owed[w] = 1 + c / m + u64::from((t as u64) < c % m);
        }
    }
    if let Some(e) = failed {
        return Err(e).during("watch writer");
    }
    let wrote = window.started.elapsed();
    let tally = watching.finish(&owed).await;
    let mut m = measured(tally, window, puts, wrote)?;
    m.detail("watchers", watchers as f64);
    m.detail("writers", writers as f64);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_client::{Event, KeyValue};

    fn update(puts: &[(&[u8], u64, i64)]) -> WatchUpdate {
        WatchUpdate {
            revision: 0,
            events: puts
                .iter()
                .map(|(key, seq, rev)| {
                    let mut value = seq.to_le_bytes().to_vec();
                    value.extend_from_slice(&0u64.to_le_bytes());
                    Event {
                        kind: EventKind::Put,
                        kv: KeyValue {
                            key: key.to_vec().into(),
                            value: value.into(),
                            mod_revision: *rev,
                            ..Default::default()
                        },
                        prev_kv: None,
                    }
                })
                .collect(),
        }
    }

    fn own(keys: &[&[u8]]) -> Expect {
        Expect::Own(Arc::new(keys.iter().map(|k| k.to_vec()).collect()))
    }

    #[test]
    fn values_carry_sequence_and_send_time() {
        let mut v = 7u64.to_le_bytes().to_vec();
        v.extend_from_slice(&99u64.to_le_bytes());
        v.resize(256, b'w');
        assert_eq!(decode(&v), Some((7, 99)));
        assert_eq!(decode(b"short"), None);
    }

    #[test]
    fn warm_up_puts_are_not_counted_and_watchers_complete_on_what_they_are_owed() {
        let expect = own(&[b"a", b"b"]);
        let epoch = Instant::now();
        let mut t = Tally::new(0, 2);
        let seen = t.see(0, update(&[(b"a", 0, 2)]), &expect, epoch, None);
        assert_eq!(
            seen,
            Seen {
                warmed: 1,
                ..Seen::default()
            }
        );
        t.see(1, update(&[(b"b", 0, 2)]), &expect, epoch, None);
        let owed = [3, 2];
        let seen = t.see(0, update(&[(b"a", 1, 3)]), &expect, epoch, Some(&owed));
        assert_eq!((seen.events, seen.completed), (1, 0));
        let seen = t.see(0, update(&[(b"a", 2, 5)]), &expect, epoch, Some(&owed));
        assert_eq!((seen.events, seen.completed), (1, 1));
        let seen = t.see(1, update(&[(b"b", 1, 4)]), &expect, epoch, Some(&owed));
        assert_eq!(seen.completed, 1);
        assert_eq!((t.events, t.violations, t.latency.count()), (3, 0, 3));
    }

    #[test]
    fn missed_repeated_misrouted_reordered_and_unmade_events_are_violations() {
        let expect = own(&[b"a"]);
        let epoch = Instant::now();
        let run = |updates: &[&[(&[u8], u64, i64)]], owed: Option<&[u64]>| {
            let mut t = Tally::new(0, 1);
            for u in updates {
                t.see(0, update(u), &expect, epoch, owed);
            }
            t.violations
        };
        assert_eq!(run(&[&[(b"a", 0, 2), (b"a", 2, 4)]], None), 1, "gap");
        assert_eq!(run(&[&[(b"a", 0, 2)], &[(b"a", 0, 3)]], None), 1, "repeat");
        assert_eq!(run(&[&[(b"b", 0, 2)]], None), 1, "another key");
        assert_eq!(run(&[&[(b"a", 0, 5), (b"a", 1, 4)]], None), 1, "revision");
        assert_eq!(
            run(&[&[(b"a", 0, 2), (b"a", 1, 3)]], Some(&[1])),
            1,
            "never made"
        );
    }

    #[test]
    fn fanout_keys_follow_the_sequence() {
        let keys = Arc::new(vec![b"p/0".to_vec(), b"p/1".to_vec()]);
        let expect = Expect::Every(keys);
        assert_eq!(expect.key(5, 3), b"p/1");
        assert_eq!(expect.key(0, 0), b"p/0");
    }
}
