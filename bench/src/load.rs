//! The timed window of a workload and the closed loop that drives most of them: a fixed number
//! of workers, each sending its next request as soon as its last one is answered.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::error::Error;
use crate::meter::{Meter, Usage};
use crate::settings::Settings;
use crate::stats::Histogram;

/// Distinct request failures quoted in a result; the rest are only counted.
pub(crate) const QUOTED_ERRORS: usize = 5;
/// Check failures quoted in a result.
pub(crate) const QUOTED_FAILURES: usize = 10;
/// How often a running workload prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// When the window's operations stop: at a deadline, or after a budget of operations.
#[derive(Clone)]
pub(crate) struct Stop {
    deadline: Option<Instant>,
    /// Operations claimed so far, and how many may be.
    budget: Option<(Arc<AtomicU64>, u64)>,
}

impl Stop {
    /// `--ops N` stops after N operations; otherwise the window lasts `--duration`.
    fn new(settings: &Settings) -> Stop {
        match settings.ops {
            Some(n) => Stop {
                deadline: None,
                budget: Some((Arc::new(AtomicU64::new(0)), n)),
            },
            None => Stop {
                deadline: Some(Instant::now() + settings.duration),
                budget: None,
            },
        }
    }

    /// Returns an operation claimed but not made (its worker had nothing left to do), so that
    /// another worker can make it.
    fn unclaim(&self) {
        if let Some((claimed, _)) = &self.budget {
            claimed.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Claims one more operation; false once the window is over.
    pub(crate) fn next(&self) -> bool {
        if let Some(deadline) = self.deadline
            && Instant::now() >= deadline
        {
            return false;
        }
        match &self.budget {
            Some((claimed, max)) => claimed.fetch_add(1, Ordering::Relaxed) < *max,
            None => true,
        }
    }
}

/// Counters the progress line is printed from, bumped by every worker.
#[derive(Default)]
pub(crate) struct Counters {
    done: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    /// `n` more operations completed.
    pub(crate) fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// One more request failed.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The timed part of a workload: opened after its setup, closed when its last operation was
/// answered. While open, a task prints a progress line every second.
pub(crate) struct Window {
    /// When the window opened.
    pub(crate) started: Instant,
    /// When the operations stop.
    pub(crate) stop: Stop,
    /// What the progress line reports.
    pub(crate) counters: Arc<Counters>,
    meter: Meter,
    ticker: Option<JoinHandle<()>>,
}

impl Window {
    /// Opens the window of workload `name`, whose operations are counted in `unit`s.
    pub(crate) fn open(
        settings: &Settings,
        name: &'static str,
        unit: &'static str,
    ) -> Result<Window, Error> {
        Self::open_counting(settings, name, unit, Arc::default())
    }

    /// Opens a window whose progress line reads `counters`, which tasks started before the
    /// window (the watch readers) already hold.
    pub(crate) fn open_counting(
        settings: &Settings,
        name: &'static str,
        unit: &'static str,
        counters: Arc<Counters>,
    ) -> Result<Window, Error> {
        let meter = Meter::open(&settings.server_pids)?;
        let started = Instant::now();
        let ticker =
            (!settings.quiet).then(|| tokio::spawn(tick(name, unit, started, counters.clone())));
        Ok(Window {
            started,
            stop: Stop::new(settings),
            counters,
            meter,
            ticker,
        })
    }

    /// Closes the window: stops the progress line and takes the closing readings.
    pub(crate) fn close(mut self) -> Result<Usage, Error> {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        self.meter.close()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

/// Prints `name: 2 s  17234 puts/s (34468 puts, 0 errors)` on stderr every second.
async fn tick(name: &'static str, unit: &'static str, started: Instant, counters: Arc<Counters>) {
    let mut last = 0;
    let mut at = tokio::time::Instant::from_std(started);
    loop {
        at += PROGRESS_EVERY;
        tokio::time::sleep_until(at).await;
        let done = counters.done.load(Ordering::Relaxed);
        let errors = counters.errors.load(Ordering::Relaxed);
        eprintln!(
            "  {name}: {:>3.0} s {:>10.0} {unit}/s ({done} {unit}, {errors} errors)",
            started.elapsed().as_secs_f64(),
            (done - last) as f64 / PROGRESS_EVERY.as_secs_f64(),
        );
        last = done;
    }
}

/// What one operation of a closed loop came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It did what it was for.
    Done,
    /// It read this many bytes of keys and values.
    Read(u64),
    /// A compare-and-swap whose compare failed: another write came first. Timed, not counted.
    Conflict,
    /// The worker has nothing left to do (a fixed supply of leases ran out). Not timed.
    Exhausted,
}

/// One of the closed loop's workers: owns what it needs between requests (its client, its
/// keys, what it saw, for checking afterwards).
pub(crate) trait Worker: Send + 'static {
    /// Sends one request and waits for its answer.
    fn op(&mut self) -> impl Future<Output = Result<Outcome, kv_client::Error>> + Send;
}

/// What the workers of a closed loop did, summed.
#[derive(Default)]
pub(crate) struct Tally {
    /// Latency of every answered request (conflicts included).
    pub(crate) latency: Histogram,
    /// Operations that did what they were for.
    pub(crate) done: u64,
    /// Compare-and-swaps that lost.
    pub(crate) conflicts: u64,
    /// Bytes read.
    pub(crate) bytes: u64,
    /// Failed requests.
    pub(crate) errors: u64,
    /// The first distinct failures.
    pub(crate) error_samples: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latency.merge(&other.latency);
        self.done += other.done;
        self.conflicts += other.conflicts;
        self.bytes += other.bytes;
        self.errors += other.errors;
        for e in other.error_samples {
            note_error(&mut self.error_samples, e);
        }
    }
}

/// Keeps `e` among the quoted errors if there is room and it is new.
pub(crate) fn note_error(samples: &mut Vec<String>, e: String) {
    if samples.len() < QUOTED_ERRORS && !samples.contains(&e) {
        samples.push(e);
    }
}

/// Runs `workers` concurrently, one task each, until the window's stop says so; returns what
/// they did and the workers themselves (for the workload's checks).
pub(crate) async fn closed_loop<W: Worker>(workers: Vec<W>, window: &Window) -> (Tally, Vec<W>) {
    let tasks: Vec<JoinHandle<(Tally, W)>> = workers
        .into_iter()
        .map(|mut worker| {
            let stop = window.stop.clone();
            let counters = window.counters.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while stop.next() {
                    let sent = Instant::now();
                    match worker.op().await {
                        Ok(Outcome::Exhausted) => {
                            stop.unclaim();
                            break;
                        }
                        Ok(outcome) => {
                            tally.latency.record(sent.elapsed());
                            match outcome {
                                Outcome::Done => tally.done += 1,
                                Outcome::Read(bytes) => {
                                    tally.done += 1;
                                    tally.bytes += bytes;
                                }
                                Outcome::Conflict => tally.conflicts += 1,
                                Outcome::Exhausted => {}
                            }
                            if outcome != Outcome::Conflict {
                                counters.done(1);
                            }
                        }
                        Err(e) => {
                            tally.errors += 1;
                            counters.error();
                            note_error(&mut tally.error_samples, e.to_string());
                        }
                    }
                }
                (tally, worker)
            })
        })
        .collect();
    let mut all = Tally::default();
    let mut workers = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok((tally, worker)) => {
                all.merge(tally);
                workers.push(worker);
            }
            // A worker panicked: a bug in this tool, not a server failure.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    (all, workers)
}

/// What a workload measured, before it becomes a [`crate::WorkloadResult`].
pub(crate) struct Measured {
    /// Operations completed, in the workload's unit.
    pub(crate) ops: u64,
    /// The seconds `ops` are counted over.
    pub(crate) seconds: f64,
    pub(crate) latency: Histogram,
    pub(crate) errors: u64,
    pub(crate) error_samples: Vec<String>,
    pub(crate) usage: Usage,
    /// Checks that did not hold.
    pub(crate) failures: Vec<String>,
    pub(crate) details: BTreeMap<String, f64>,
}

impl Measured {
    /// The measurement of a closed loop whose window closed with `usage`.
    pub(crate) fn of_loop(tally: Tally, usage: Usage) -> Measured {
        Measured {
            ops: tally.done,
            seconds: usage.wall.as_secs_f64(),
            latency: tally.latency,
            errors: tally.errors,
            error_samples: tally.error_samples,
            usage,
            failures: Vec::new(),
            details: BTreeMap::new(),
        }
    }

    /// Adds a workload-specific figure.
    pub(crate) fn detail(&mut self, name: &str, value: f64) {
        self.details.insert(name.to_string(), value);
    }

    /// Records a check that did not hold.
    pub(crate) fn fail(&mut self, why: String) {
        if self.failures.len() < QUOTED_FAILURES {
            self.failures.push(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its calls; conflicts on every third, runs out after `supply`.
    struct Counting {
        calls: u64,
        supply: u64,
    }

    impl Worker for Counting {
        async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
            self.calls += 1;
            if self.calls > self.supply {
                return Ok(Outcome::Exhausted);
            }
            if self.calls.is_multiple_of(5) {
                return Err(kv_client::Error::NoLeader);
            }
            Ok(if self.calls.is_multiple_of(3) {
                Outcome::Conflict
            } else {
                Outcome::Read(10)
            })
        }
    }

    fn settings(ops: Option<u64>) -> Settings {
        Settings {
            ops,
            duration: Duration::from_millis(50),
            quiet: true,
            ..Settings::default()
        }
    }

    #[tokio::test]
    async fn a_budget_stops_the_loop_after_that_many_operations() {
        let window = Window::open(&settings(Some(30)), "test", "ops").expect("open");
        let workers = (0..4)
            .map(|_| Counting {
                calls: 0,
                supply: u64::MAX,
            })
            .collect();
        let (tally, workers) = closed_loop(workers, &window).await;
        window.close().expect("close");
        let calls: u64 = workers.iter().map(|w| w.calls).sum();
        assert_eq!(calls, 30);
        assert_eq!(tally.done + tally.conflicts + tally.errors, 30);
        assert_eq!(tally.latency.count(), tally.done + tally.conflicts);
        assert_eq!(tally.bytes, 10 * tally.done);
        assert!(tally.errors > 0 && tally.conflicts > 0);
        // The same error from every worker is quoted once.
        assert_eq!(tally.error_samples, ["etcdserver: no leader"]);
    }

    #[tokio::test]
    async fn a_worker_that_runs_out_leaves_its_share_of_the_budget_to_the_others() {
        let window = Window::open(&settings(Some(12)), "test", "ops").expect("open");
        let workers = vec![
            Counting {
                calls: 0,
                supply: 1,
            },
            Counting {
                calls: 0,
                supply: u64::MAX,
            },
        ];
        let (tally, _) = closed_loop(workers, &window).await;
        window.close().expect("close");
        assert_eq!(tally.done + tally.conflicts + tally.errors, 12);
    }

    #[tokio::test]
    async fn an_exhausted_worker_stops_alone_and_a_deadline_stops_the_rest() {
        let window = Window::open(&settings(None), "test", "ops").expect("open");
        let workers = vec![
            Counting {
                calls: 0,
                supply: 2,
            },
            Counting {
                calls: 0,
                supply: u64::MAX,
            },
        ];
        let (_, workers) = closed_loop(workers, &window).await;
        let usage = window.close().expect("close");
        assert_eq!(workers[0].calls, 3);
        assert!(workers[1].calls > 3);
        assert!(usage.wall >= Duration::from_millis(50));
    }
}
