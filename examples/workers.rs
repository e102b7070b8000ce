//! Workers consuming an ordered queue: a producer enqueues numbered jobs, some of them gated
//! on a "dataset ready" key; several worker processes take jobs in queue order, each under a
//! short-lived session, and ack each job with its result written in the same transaction. A
//! worker killed mid-job holds its claim only until its session's lease runs out; then the job
//! runs again, on another worker, as attempt 2.
//!
//! Run it: start a server (`cargo run --release -p kv-server`), then in another terminal
//!
//! ```text
//! cargo run --release --example workers            # the demo, about 5 s
//! ```
//!
//! What to watch for in the demo's output:
//! - `[wN] start job <n> attempt <a> fence <rev>`: a worker took a job; the fence (the claim's
//!   revision) grows with every delivery, so it orders the starts of all workers.
//! - Ungated jobs start in queue order; gated ones (every 4th) do not start while the workers
//!   sit idle, until `dataset ready`.
//! - `killed worker <id> during job <n>`: a SIGKILL, no goodbye. About 2 s later (the session
//!   TTL) that job starts again on another worker with `attempt 2`.
//! - The summary, read back from the store: who ran each job, the redelivery, the order of
//!   first starts, and the checks (`ok: ...`, or `FAILED: ...` and exit status 1).
//!
//! Each role also runs on its own, against a queue name of your choosing:
//!
//! ```text
//! cargo run --release --example workers -- produce --queue jobs --jobs 12
//! cargo run --release --example workers -- worker --id a --queue jobs   # a few terminals
//! cargo run --release --example workers -- ready --queue jobs           # releases gated jobs
//! ```
//!
//! Every mode takes `--endpoints host:port[,host:port...]` (default 127.0.0.1:2379).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use kv_client::{
    Client, DeleteOptions, Event, EventKind, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use kv_examples::{Process, connect, exit_with_parent};
use recipes::{Condition, EnqueueOptions, Queue, Session};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Every this-many-th job waits for the dataset.
const GATED_EVERY: u32 = 4;
/// Jobs the demo enqueues unless told otherwise.
const DEMO_JOBS: u32 = 12;
/// Worker processes the demo starts.
const WORKERS: usize = 3;
/// A worker's session TTL in seconds: how long a dead worker's job stays claimed. Short, so
/// the demo's redelivery comes quickly; a real worker weighs this against pauses (a GC, a
/// slow disk) longer than a third of it, which would end its session and redeliver its job
/// while it still works on it. 2 s is the server's minimum with default Raft timing.
const SESSION_TTL: i64 = 2;
/// The demo kills the worker that makes the 5th start: by then the run is under way.
const KILL_AT_START: usize = 5;
/// How long the demo lets the idle workers show that gated jobs wait.
const GATE_PAUSE: Duration = Duration::from_secs(1);
/// How long the workers get to print their last lines before they are stopped.
const PRINT_GRACE: Duration = Duration::from_millis(300);
/// The whole demo must finish within this.
const DEMO_LIMIT: Duration = Duration::from_secs(40);
/// How long the producer and the `ready` step may take.
const STEP_LIMIT: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(about = "Workers consuming an ordered queue, with gated jobs and redelivery")]
struct Cli {
    #[command(flatten)]
    server: kv_examples::ServerArgs,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Enqueues jobs 1..=N; every 4th waits for `<queue>-dataset-ready` = "yes".
    Produce {
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = DEMO_JOBS)]
        jobs: u32,
    },
    /// Takes jobs one at a time, works on each for a while, acks it with its result.
    Worker {
        #[arg(long)]
        id: String,
        #[arg(long)]
        queue: String,
        /// Session TTL in seconds.
        #[arg(long, default_value_t = SESSION_TTL)]
        ttl: i64,
    },
    /// Sets `<queue>-dataset-ready` = "yes", which releases the gated jobs.
    Ready {
        #[arg(long)]
        queue: String,
    },
    /// Producer, 3 workers, a worker killed mid-job, the dataset made ready (the default).
    Demo {
        #[arg(long, default_value_t = DEMO_JOBS)]
        jobs: u32,
    },
}

/// A queue item.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Job {
    n: u32,
    gated: bool,
}

impl Job {
    fn new(n: u32) -> Job {
        Job {
            n,
            gated: n.is_multiple_of(GATED_EVERY),
        }
    }

    /// How long the job takes: 150-400 ms, fixed per job so runs are comparable.
    fn work(&self) -> Duration {
        Duration::from_millis(150 + u64::from(self.n) * 89 % 251)
    }
}

/// One delivery of a job to a worker, as the worker records it: under `<q>-starts/` when it
/// starts, and under `<q>-results/` as the job's result, in the ack's transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    job: u32,
    worker: String,
    attempt: u32,
    fence: i64,
}

/// The keys beside queue `<q>`'s own (`<q>/...`). They are outside `<q>/` on purpose: the
/// queue's consumers watch that prefix, and need not wake for every result written.
struct Keys {
    queue: String,
}

impl Keys {
    fn new(queue: &str) -> Keys {
        Keys {
            queue: queue.to_string(),
        }
    }

    /// The condition key the gated jobs wait for.
    fn ready(&self) -> String {
        format!("{}-dataset-ready", self.queue)
    }

    /// Everything the jobs record: starts, results and the ready key.
    fn records(&self) -> String {
        format!("{}-", self.queue)
    }

    fn starts(&self) -> String {
        format!("{}-starts/", self.queue)
    }

    fn start(&self, run: &Run) -> String {
        format!("{}{}/{}", self.starts(), run.job, run.attempt)
    }

    fn results(&self) -> String {
        format!("{}-results/", self.queue)
    }

    fn result(&self, job: u32) -> String {
        format!("{}{job}", self.results())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let endpoints = cli.server.endpoints.as_str();
    let done = match cli.mode.unwrap_or(Mode::Demo { jobs: DEMO_JOBS }) {
        Mode::Produce { queue, jobs } => produce(endpoints, &queue, jobs).await,
        Mode::Worker { id, queue, ttl } => worker(endpoints, &id, &queue, ttl).await,
        Mode::Ready { queue } => ready(endpoints, &queue).await,
        Mode::Demo { jobs } => demo(endpoints, jobs).await,
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("workers: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn produce(endpoints: &str, queue_name: &str, jobs: u32) -> Result<(), Box<dyn Error>> {
    exit_with_parent();
    let client = connect(endpoints).await?;
    let queue: Queue<Job> = Queue::new(&client, queue_name);
    let ready = Keys::new(queue_name).ready();
    // One producer enqueues in order, so the queue's order is job order.
    for n in 1..=jobs {
        let job = Job::new(n);
        let mut options = EnqueueOptions::new();
        if job.gated {
            // Checked by consumers and proven inside each claim's transaction: a gated job
            // cannot be claimed at a revision where the key does not hold "yes".
            options = options.when(Condition::value_is(&ready, "yes"));
        }
        queue
            .enqueue_with(&job, options)
            .await
            .map_err(|e| format!("enqueue job {n}: {e}"))?;
        if job.gated {
            println!("enqueued job {n} (gated on {ready} = \"yes\")");
        } else {
            println!("enqueued job {n}");
        }
    }
    Ok(())
}

async fn worker(
    endpoints: &str,
    id: &str,
    queue_name: &str,
    ttl: i64,
) -> Result<(), Box<dyn Error>> {
    exit_with_parent();
    let client = connect(endpoints).await?;
    let queue: Queue<Job> = Queue::new(&client, queue_name);
    let keys = Keys::new(queue_name);
    // A session that ends (this process paused past its TTL, the network cut) has lost its
    // claims to other workers; the worker goes on with a new one.
    loop {
        let session = Session::with_ttl(&client, ttl)
            .await
            .map_err(|e| format!("worker {id}: start a session: {e}"))?;
        println!(
            "worker {id} ready: session {:x}, ttl {} s",
            session.lease(),
            session.ttl()
        );
        match serve(&client, &queue, &session, &keys, id).await {
            Err(recipes::Error::SessionLost(why)) => {
                println!("session lost ({why}); starting a new one");
            }
            Err(e) => return Err(format!("worker {id}: {e}").into()),
            Ok(never) => match never {},
        }
    }
}

/// Takes and runs jobs until something fails (a lost session, to begin with).
async fn serve(
    client: &Client,
    queue: &Queue<Job>,
    session: &Session,
    keys: &Keys,
    id: &str,
) -> Result<Infallible, recipes::Error> {
    let encode =
        |run: &Run| serde_json::to_vec(run).map_err(|e| recipes::Error::Codec(e.to_string()));
    loop {
        // Waits (by watching) for the first job in queue order that is unclaimed and whose
        // conditions hold, and claims it on this session's lease.
        let claimed = queue.dequeue(session).await?;
        let job = claimed.item;
        let run = Run {
            job: job.n,
            worker: id.to_string(),
            attempt: claimed.attempts(),
            fence: claimed.fence().revision,
        };
        // Printed before the start is recorded, so it is out even if this process is killed
        // the moment the demo sees the record.
        println!(
            "start job {} attempt {} fence {}",
            job.n, run.attempt, run.fence
        );
        let record = Txn::new().when([claimed.is_owner()]).and_then([TxnOp::put(
            keys.start(&run),
            encode(&run)?,
            PutOptions::new(),
        )]);
        if !client.kv().txn(record).await?.succeeded {
            println!("lost job {} before it began (its claim ended)", job.n);
            continue;
        }

        // The work. If the claim ends meanwhile, the job is someone else's now: stop.
        let lost = tokio::select! {
            () = tokio::time::sleep(job.work()) => None,
            why = claimed.lost() => Some(why),
        };
        if let Some(why) = lost {
            println!("lost job {} mid-work ({why})", job.n);
            continue;
        }

        // The result lands if and only if the ack does: whichever delivery acks first
        // records it, and only once, however often the job ran.
        let result = TxnOp::put(keys.result(job.n), encode(&run)?, PutOptions::new());
        match claimed.ack_with([result]).await {
            Ok(()) => println!("done job {}", job.n),
            Err(recipes::Error::ClaimLost) => {
                println!("lost job {} at the ack (it runs again elsewhere)", job.n);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn ready(endpoints: &str, queue_name: &str) -> Result<(), Box<dyn Error>> {
    exit_with_parent();
    let client = connect(endpoints).await?;
    let key = Keys::new(queue_name).ready();
    let put = client.kv().put(&key, "yes", PutOptions::new()).await?;
    println!("set {key} = \"yes\" at revision {}", put.revision);
    Ok(())
}

/// A record a worker wrote, as the demo sees it go by.
enum Recorded {
    Started(Run),
    Done(Run),
}

async fn demo(endpoints: &str, jobs: u32) -> Result<(), Box<dyn Error>> {
    let ungated: Vec<u32> = (1..=jobs).filter(|n| !Job::new(*n).gated).collect();
    let gated: Vec<u32> = (1..=jobs).filter(|n| Job::new(*n).gated).collect();
    if ungated.len() < KILL_AT_START {
        return Err(format!("the demo needs at least {KILL_AT_START} ungated jobs").into());
    }
    let client = connect(endpoints).await?;
    // Named after this process, so demos run one after another do not meet.
    let name = format!("workers-demo-{}", std::process::id());
    let keys = Keys::new(&name);
    println!(
        "queue {name}: {jobs} jobs, gated {gated:?} on {} = \"yes\"; {WORKERS} workers, \
         session TTL {SESSION_TTL} s",
        keys.ready()
    );
    let args = |mode: &[&str]| -> Vec<String> {
        ["--endpoints", endpoints]
            .iter()
            .chain(mode)
            .map(|s| s.to_string())
            .collect()
    };

    let jobs_arg = jobs.to_string();
    let mut producer = Process::start(
        "producer",
        &args(&["produce", "--queue", &name, "--jobs", &jobs_arg]),
    )?;
    if !producer.wait_for_exit(STEP_LIMIT) {
        return Err(format!("the producer did not finish within {STEP_LIMIT:?}").into());
    }
    let queue: Queue<Job> = Queue::new(&client, &name);
    let queued = queue.len().await?;
    if queued != i64::from(jobs) {
        return Err(format!("the producer enqueued {queued} of {jobs} jobs").into());
    }

    // The workers record what they do; the demo follows along through a watch, from before
    // the first worker starts (so it misses nothing), to pick its victim mid-job.
    let now = client
        .kv()
        .get(keys.ready(), GetOptions::new())
        .await?
        .revision;
    let mut records = client.watch().watch(
        keys.records(),
        WatchOptions::new().prefix().start_revision(now + 1),
    );
    let ttl_arg = SESSION_TTL.to_string();
    let mut workers = Vec::with_capacity(WORKERS);
    for i in 1..=WORKERS {
        let id = format!("w{i}");
        let worker = args(&["worker", "--id", &id, "--queue", &name, "--ttl", &ttl_arg]);
        workers.push(Process::start(id, &worker)?);
    }

    let deadline = Instant::now() + DEMO_LIMIT;
    let mut starts = 0;
    let mut done = BTreeSet::new();
    let mut killed: Option<(Run, Instant)> = None;
    // Until every ungated job is done, the killed worker's included (redelivered once its
    // session ran out); the gated ones wait meanwhile.
    while killed.is_none() || !ungated.iter().all(|n| done.contains(n)) {
        for record in next_records(&mut records, &keys, deadline).await? {
            match record {
                Recorded::Started(run) => {
                    starts += 1;
                    if let Some((victim, at)) = &killed
                        && run.job == victim.job
                    {
                        println!(
                            "redelivered job {} to {} (attempt {}), {:.1} s after the kill",
                            run.job,
                            run.worker,
                            run.attempt,
                            at.elapsed().as_secs_f64()
                        );
                    }
                    if killed.is_none() && starts == KILL_AT_START {
                        // Right after its start record: the job has 150+ ms of work left.
                        let victim = workers
                            .iter_mut()
                            .find(|w| w.label() == run.worker)
                            .ok_or_else(|| format!("no worker named {}", run.worker))?;
                        victim.kill();
                        println!(
                            "killed worker {} during job {} (attempt {}): the job stays \
                             claimed until its {SESSION_TTL} s session runs out",
                            run.worker, run.job, run.attempt
                        );
                        killed = Some((run, Instant::now()));
                    }
                }
                Recorded::Done(run) => {
                    done.insert(run.job);
                }
            }
        }
    }
    println!(
        "ungated jobs all done; gated jobs {gated:?} still wait for {}",
        keys.ready()
    );
    tokio::time::sleep(GATE_PAUSE).await;

    // Printed before the key is set: a gated job's start line, which can only follow the
    // write, then always comes after this line.
    println!("dataset ready (setting {} = \"yes\")", keys.ready());
    let mut setter = Process::start("ready", &args(&["ready", "--queue", &name]))?;
    if !setter.wait_for_exit(STEP_LIMIT) {
        return Err(format!("setting the ready key took over {STEP_LIMIT:?}").into());
    }
    while done.len() < jobs as usize {
        for record in next_records(&mut records, &keys, deadline).await? {
            if let Recorded::Done(run) = record {
                done.insert(run.job);
            }
        }
    }
    // The last acks landed already; their `done` lines may still be on the way out.
    tokio::time::sleep(PRINT_GRACE).await;
    println!("stopping the workers");
    drop(workers);

    let (killed, _) = killed.ok_or("no worker was killed")?;
    let failures = summarize(&client, &queue, &keys, jobs, &killed).await?;
    if !failures.is_empty() {
        for failure in &failures {
            println!("FAILED: {failure}");
        }
        return Err(format!(
            "{} check(s) failed; the keys under {name} are left for a look",
            failures.len()
        )
        .into());
    }
    for prefix in [format!("{name}/"), keys.records()] {
        client
            .kv()
            .delete(prefix, DeleteOptions::new().prefix())
            .await?;
    }
    println!("all {jobs} jobs done");
    Ok(())
}

/// The next records the workers wrote, or an error at `deadline`.
async fn next_records(
    records: &mut WatchStream,
    keys: &Keys,
    deadline: Instant,
) -> Result<Vec<Recorded>, Box<dyn Error>> {
    let update = match tokio::time::timeout_at(deadline, records.next()).await {
        Err(_) => return Err(format!("the demo did not finish within {DEMO_LIMIT:?}").into()),
        Ok(None) => return Err("the watch on the workers' records ended".into()),
        Ok(Some(update)) => update?,
    };
    let mut seen = Vec::new();
    for Event { kind, kv, .. } in update.events {
        if kind != EventKind::Put {
            continue;
        }
        let key = String::from_utf8_lossy(&kv.key);
        let is_start = key.starts_with(&keys.starts());
        if !is_start && !key.starts_with(&keys.results()) {
            continue;
        }
        let run: Run =
            serde_json::from_slice(&kv.value).map_err(|e| format!("record {key}: {e}"))?;
        seen.push(if is_start {
            Recorded::Started(run)
        } else {
            Recorded::Done(run)
        });
    }
    Ok(seen)
}

/// Prints what happened, read back from the store, and checks the queue's promises; returns
/// the checks that failed.
async fn summarize(
    client: &Client,
    queue: &Queue<Job>,
    keys: &Keys,
    jobs: u32,
    killed: &Run,
) -> Result<Vec<String>, Box<dyn Error>> {
    let mut failures = Vec::new();
    let read = |prefix: String| async move {
        client
            .kv()
            .get(prefix, GetOptions::new().prefix())
            .await
            .map(|got| got.kvs)
    };
    let decode = |value: &[u8]| serde_json::from_slice::<Run>(value);

    // Every delivery of every job, by job, in attempt order.
    let mut runs: BTreeMap<u32, Vec<Run>> = BTreeMap::new();
    for kv in read(keys.starts()).await? {
        let run = decode(&kv.value)?;
        runs.entry(run.job).or_default().push(run);
    }
    for list in runs.values_mut() {
        list.sort_by_key(|run| run.attempt);
    }
    // The results, with how often each key was written (version 1: once).
    let mut results: BTreeMap<u32, (Run, i64)> = BTreeMap::new();
    for kv in read(keys.results()).await? {
        let run = decode(&kv.value)?;
        results.insert(run.job, (run, kv.version));
    }
    let ready_revision = client
        .kv()
        .get(keys.ready(), GetOptions::new())
        .await?
        .kvs
        .first()
        .map(|kv| kv.mod_revision);

    println!("summary (read back from the store):");
    for n in 1..=jobs {
        let ran: Vec<String> = runs
            .get(&n)
            .into_iter()
            .flatten()
            .map(|run| {
                let fate = if run.fence == killed.fence {
                    ", killed"
                } else {
                    ""
                };
                format!("{} (attempt {}{fate})", run.worker, run.attempt)
            })
            .collect();
        let acked = match results.get(&n) {
            Some((run, _)) => format!("acked by {} attempt {}", run.worker, run.attempt),
            None => "no result".to_string(),
        };
        let gate = if Job::new(n).gated { " [gated]" } else { "" };
        println!("  job {n}{gate}: {} -> {acked}", ran.join(", "));
    }
    for (n, list) in &runs {
        if list.len() > 1 {
            let tries: Vec<String> = list
                .iter()
                .map(|run| format!("attempt {} on {}", run.attempt, run.worker))
                .collect();
            println!("redelivered: job {n}: {}", tries.join(", "));
        }
    }
    // First starts in fence order: the fence is the claim's revision, one clock for all
    // workers (their printed lines may interleave in any order).
    let mut first_starts: Vec<&Run> = runs.values().filter_map(|list| list.first()).collect();
    first_starts.sort_by_key(|run| run.fence);
    let order: Vec<u32> = first_starts.iter().map(|run| run.job).collect();
    println!("first starts in fence order: {order:?}");

    // Every job acked exactly once, and nothing left in the queue.
    let mut once = true;
    for n in 1..=jobs {
        match results.get(&n) {
            None => {
                once = false;
                failures.push(format!("job {n} has no result"));
            }
            Some((_, version)) if *version != 1 => {
                once = false;
                failures.push(format!("job {n}'s result was written {version} times"));
            }
            Some(_) => {}
        }
    }
    let (left, dead) = (queue.len().await?, queue.dead_letters().await?.len());
    if left != 0 || dead != 0 {
        once = false;
        failures.push(format!(
            "{left} job(s) left in the queue, {dead} dead-lettered"
        ));
    }
    if once {
        println!("ok: every job acked exactly once ({jobs} results, each written once)");
    }

    // No gated job claimed before the ready key was written.
    match ready_revision {
        None => failures.push(format!("{} was never set", keys.ready())),
        Some(ready_at) => {
            let early: Vec<String> = runs
                .values()
                .flatten()
                .filter(|run| Job::new(run.job).gated && run.fence < ready_at)
                .map(|run| format!("job {} at revision {}", run.job, run.fence))
                .collect();
            if early.is_empty() {
                println!("ok: no gated job started before dataset ready (revision {ready_at})");
            } else {
                failures.push(format!(
                    "gated jobs started before dataset ready (revision {ready_at}): {}",
                    early.join(", ")
                ));
            }
        }
    }

    // Ungated jobs first started in queue order.
    let ungated: Vec<u32> = order
        .iter()
        .copied()
        .filter(|n| !Job::new(*n).gated)
        .collect();
    if ungated.windows(2).all(|w| w[0] < w[1]) {
        println!("ok: ungated jobs first started in queue order {ungated:?}");
    } else {
        failures.push(format!(
            "ungated jobs first started out of queue order: {ungated:?}"
        ));
    }

    // The killed worker's job ran again elsewhere, and that run's result is the one stored.
    let again = runs
        .get(&killed.job)
        .into_iter()
        .flatten()
        .find(|run| run.attempt == 2 && run.worker != killed.worker);
    let result = results.get(&killed.job).map(|(run, _)| run);
    match (again, result) {
        (Some(again), Some(result)) if result.worker != killed.worker => println!(
            "ok: job {} ran again on {} with attempt 2 after {} was killed",
            killed.job, again.worker, killed.worker
        ),
        _ => failures.push(format!(
            "job {} of the killed worker {} did not run again on another worker with \
             attempt 2 (runs: {:?}, result: {:?})",
            killed.job,
            killed.worker,
            runs.get(&killed.job),
            result
        )),
    }
    Ok(failures)
}
