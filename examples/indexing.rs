//! Batch jobs electing an indexing leader, and what happens when the leader dies mid-build.
//!
//! A loader writes small documents under `<prefix>/docs/`. Several job processes campaign in
//! one election (`recipes::Election`), each on its own short-lived `Session`. The leader
//! builds an inverted index (`<prefix>/index/<word>/<doc>` = how often the word occurs) a few
//! documents at a time. Each step is ONE transaction, guarded by the leadership's fence, that
//! writes the step's index entries, a record of the step and the progress record together, so
//! progress can never run ahead of (or behind) the index. After each step the leader proclaims
//! its progress; the other jobs observe the election and print it.
//!
//! When the leader dies, its session's lease runs out (about the TTL later), its leader key is
//! deleted and the next candidate leads. It resumes from the recorded progress, not from the
//! start. Anything the dead leader still had in flight is refused once its key is gone: the
//! fence (its key's create revision) no longer matches, so the compare fails.
//!
//! Run it (after `cargo run --release -p kv-server` in another terminal):
//!
//! ```text
//! cargo run --release --example indexing                  # the demo below
//! cargo run --release --example indexing -- load --prefix idx --docs 40
//! cargo run --release --example indexing -- job --id a --prefix idx   # start a few of these
//! ```
//!
//! The demo loads documents, starts three jobs, SIGKILLs the leader once it has indexed some
//! documents, and shows another job taking over. What to watch for:
//! - `[job-N] leader job-N fence F resumes at doc D of T`: a job became leader; after the kill
//!   D is where the dead leader's last step ended, not 0;
//! - `[job-N] step A..B written by job-N fence F`: one fenced transaction;
//! - `killed leader job-N`, then its leader key deleted about a TTL later;
//! - `stale-fence write refused`: the demo itself sends a write guarded by the dead leader's
//!   fence after the takeover, and the server refuses it;
//! - `verified: ...` lines, where the demo checks the store: the index is complete and
//!   correct, every step was written once under the fence of the leader of the time, the new
//!   leader resumed at the dead leader's last recorded progress, and nothing written with the
//!   old fence landed after the old leader key was deleted. It exits non-zero if any fails.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use kv_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, TxnOp,
    TxnOpResponse, WatchOptions,
};
use kv_examples::{Process, connect, exit_with_parent};
use recipes::{Election, Leadership, Observation, Observer, Session};
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Documents a leader indexes per step (one transaction each). Small, so that a kill lands
/// between steps of a build still under way.
const STEP_DOCS: usize = 3;
/// Pause after each step: stands for real indexing work, and gives the demo time to kill.
const STEP_PAUSE: Duration = Duration::from_millis(250);
/// A job session's lease TTL in seconds (the server's minimum with default timing): a dead
/// leader is replaced about this long after it dies. Short TTLs fail over fast but tolerate
/// shorter pauses (a leader stalled longer than this is deposed).
const JOB_TTL: i64 = 2;
/// Documents the demo loads.
const DEMO_DOCS: usize = 36;
/// Job processes the demo starts.
const DEMO_JOBS: usize = 3;
/// The demo kills the leader once it has proclaimed at least this many documents done.
const KILL_AFTER_DOCS: usize = 12;
/// How long the demo waits for each thing it expects before giving up.
const PATIENCE: Duration = Duration::from_secs(20);

/// The words documents are made of.
const VOCABULARY: [&str; 12] = [
    "raft", "lease", "watch", "fence", "leader", "index", "revision", "compact", "snapshot",
    "quorum", "term", "log",
];

#[derive(Parser)]
#[command(about = "Batch jobs electing an indexing leader that survives being killed")]
struct Cli {
    #[command(flatten)]
    server: kv_examples::ServerArgs,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Writes DOCS small documents under <PREFIX>/docs/.
    Load {
        /// Key prefix of the run (the jobs get the same).
        #[arg(long)]
        prefix: String,
        /// How many documents to write.
        #[arg(long, default_value_t = DEMO_DOCS)]
        docs: usize,
    },
    /// Campaigns for leader; as leader, indexes <PREFIX>/docs/ in fenced steps; otherwise
    /// prints who leads and its progress.
    Job {
        /// This job's name, as it campaigns and signs its steps.
        #[arg(long)]
        id: String,
        /// Key prefix of the run (the loader's).
        #[arg(long)]
        prefix: String,
    },
    /// Loads documents, starts jobs, kills the leader mid-build and checks the result
    /// (the default).
    Demo,
}

/// Where everything of one run lives.
struct Keys {
    prefix: String,
}

impl Keys {
    fn docs(&self) -> String {
        format!("{}/docs/", self.prefix)
    }
    fn doc(&self, n: usize) -> String {
        format!("{}/docs/{n:05}", self.prefix)
    }
    fn index(&self) -> String {
        format!("{}/index/", self.prefix)
    }
    /// One key per (word, document): a step only adds keys, it never rewrites a shared
    /// posting list, so it needs no read-modify-write beyond the progress record.
    fn posting(&self, word: &str, doc: usize) -> String {
        format!("{}/index/{word}/{doc:05}", self.prefix)
    }
    fn steps(&self) -> String {
        format!("{}/steps/", self.prefix)
    }
    fn step(&self, from: usize) -> String {
        format!("{}/steps/{from:05}", self.prefix)
    }
    fn progress(&self) -> String {
        format!("{}/progress", self.prefix)
    }
    fn election(&self) -> String {
        format!("{}/election", self.prefix)
    }
}

/// `<prefix>/progress`: documents `0..done` are indexed; written by the leader with `fence`.
#[derive(Serialize, Deserialize)]
struct Progress {
    done: usize,
    by: String,
    fence: i64,
}

/// `<prefix>/steps/<from>`: one step's record, written in the step's transaction.
#[derive(Serialize, Deserialize)]
struct Step {
    from: usize,
    to: usize,
    by: String,
    fence: i64,
}

/// `<prefix>/index/<word>/<doc>`: how often `word` occurs in the document; `fence` of the
/// leader that wrote it, so the demo can tell whose writes are whose.
#[derive(Serialize, Deserialize)]
struct Posting {
    count: usize,
    fence: i64,
}

/// The value a candidate campaigns with and the leader proclaims.
#[derive(Serialize, Deserialize)]
struct Proclaimed {
    id: String,
    #[serde(default)]
    done: Option<usize>,
    #[serde(default)]
    total: Option<usize>,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn decode<'a, T: Deserialize<'a>>(kv: &'a KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| format!("{} holds no record: {e}", String::from_utf8_lossy(&kv.key)).into())
}

/// Document `n`: three to five words, some repeated, so counts differ between documents.
fn document(n: usize) -> String {
    let len = 3 + n % 3;
    (0..len)
        .map(|k| VOCABULARY[(n * 7 + k * k * 5) % VOCABULARY.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The index entries of one document: word -> occurrences.
fn word_counts(text: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

/// The document number a `.../<n>` key ends with.
fn key_number(key: &[u8]) -> Result<usize> {
    let key = String::from_utf8_lossy(key);
    key.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("key {key} does not end with a number").into())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode.unwrap_or(Mode::Demo) {
        Mode::Load { prefix, docs } => load(&cli.server.endpoints, &prefix, docs).await,
        Mode::Job { id, prefix } => job(&cli.server.endpoints, &id, &prefix).await,
        Mode::Demo => demo(&cli.server.endpoints).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn load(endpoints: &str, prefix: &str, docs: usize) -> Result<()> {
    exit_with_parent();
    let client = connect(endpoints).await?;
    let keys = Keys {
        prefix: prefix.to_string(),
    };
    for n in 0..docs {
        client
            .kv()
            .put(keys.doc(n), document(n), PutOptions::new())
            .await
            .map_err(|e| format!("writing document {n}: {e}"))?;
    }
    println!("loaded {docs} docs under {}", keys.docs());
    Ok(())
}

/// How a leader's turn ended.
enum Turn {
    /// The index covers every document.
    Complete,
    /// Its fence no longer holds: another job leads now.
    Deposed,
}

async fn job(endpoints: &str, id: &str, prefix: &str) -> Result<()> {
    exit_with_parent();
    let client = connect(endpoints).await?;
    let keys = Keys {
        prefix: prefix.to_string(),
    };
    let election = Election::new(&client, keys.election());
    loop {
        // A session per candidacy: a deposed job's session may be the reason it was deposed.
        let session = Session::with_ttl(&client, JOB_TTL).await?;
        let leadership = campaign_observing(&election, &session, id).await?;
        match lead(&client, &keys, id, &leadership).await? {
            Turn::Complete => {
                // Resigning lets the next candidate see at once that there is nothing to do.
                leadership.resign().await?;
                session.close().await?;
                return Ok(());
            }
            Turn::Deposed => println!("{id} deposed: campaigning again"),
        }
    }
}

/// Campaigns, printing what the election shows meanwhile; returns once elected.
async fn campaign_observing(
    election: &Election,
    session: &Session,
    id: &str,
) -> Result<Leadership> {
    let value = encode(&Proclaimed {
        id: id.to_string(),
        done: None,
        total: None,
    })?;
    let mut observer = election.observe();
    let campaign = election.campaign(session, value);
    tokio::pin!(campaign);
    loop {
        tokio::select! {
            won = &mut campaign => return Ok(won?),
            seen = observer.next() => match seen {
                Some(Ok(observation)) => print_observation(id, &observation)?,
                Some(Err(e)) => return Err(format!("observing the election: {e}").into()),
                None => return Err("the election observer ended".into()),
            },
        }
    }
}

fn print_observation(me: &str, observation: &Observation) -> Result<()> {
    match observation {
        Observation::Elected(kv) => {
            let leader: Proclaimed = decode(kv)?;
            if leader.id != me {
                let progress = leader
                    .done
                    .map(|done| format!(" progress {done}"))
                    .unwrap_or_default();
                println!(
                    "observed leader {} fence {}{progress}",
                    leader.id, kv.create_revision
                );
            }
        }
        Observation::Proclaimed(kv) => {
            let leader: Proclaimed = decode(kv)?;
            if let Some(done) = leader.done {
                println!("observed leader {} progress {done}", leader.id);
            }
        }
        Observation::Vacant => println!("observed no leader"),
    }
    Ok(())
}

/// The progress record and its mod revision (0 when there is none yet: nothing indexed).
async fn read_progress(client: &Client, keys: &Keys) -> Result<(usize, i64)> {
    let got = client.kv().get(keys.progress(), GetOptions::new()).await?;
    progress_of(got.kvs.first())
}

fn progress_of(kv: Option<&KeyValue>) -> Result<(usize, i64)> {
    match kv {
        Some(kv) => Ok((decode::<Progress>(kv)?.done, kv.mod_revision)),
        None => Ok((0, 0)),
    }
}

/// Indexes from the recorded progress on, one fenced transaction per step, while leader.
async fn lead(client: &Client, keys: &Keys, id: &str, leadership: &Leadership) -> Result<Turn> {
    let fence = leadership.fence().revision;
    let total = client
        .kv()
        .get(keys.docs(), GetOptions::new().prefix().count_only())
        .await?
        .count as usize;
    // Read after being elected: whatever the previous leader recorded is final now (its
    // later writes would fail their fence compare).
    let (mut done, mut seen) = read_progress(client, keys).await?;
    println!("leader {id} fence {fence} resumes at doc {done} of {total}");
    while done < total {
        let to = (done + STEP_DOCS).min(total);
        let docs = client
            .kv()
            .get(keys.doc(done), GetOptions::new().range_end(keys.doc(to)))
            .await?;
        if docs.kvs.len() != to - done {
            return Err(format!("docs {done}..{to}: only {} found", docs.kvs.len()).into());
        }
        let mut writes = Vec::new();
        for kv in &docs.kvs {
            let doc = key_number(&kv.key)?;
            for (word, count) in word_counts(&String::from_utf8_lossy(&kv.value)) {
                let posting = encode(&Posting { count, fence })?;
                writes.push(TxnOp::put(
                    keys.posting(&word, doc),
                    posting,
                    PutOptions::new(),
                ));
            }
        }
        let step = Step {
            from: done,
            to,
            by: id.to_string(),
            fence,
        };
        let progress = Progress {
            done: to,
            by: id.to_string(),
            fence,
        };
        writes.push(TxnOp::put(
            keys.step(done),
            encode(&step)?,
            PutOptions::new(),
        ));
        writes.push(TxnOp::put(
            keys.progress(),
            encode(&progress)?,
            PutOptions::new(),
        ));
        // Two compares: the fence (are we still the leader?) and the progress we started the
        // step from (did this step land already?). The second makes it safe to send a step
        // again after an unknown outcome: a copy that landed turns the resend into a no-op.
        let txn = leadership
            .txn()
            .when([Compare::mod_revision(
                keys.progress(),
                CompareOp::Equal,
                seen,
            )])
            .and_then(writes)
            .or_else([
                TxnOp::get(leadership.key(), GetOptions::new()),
                TxnOp::get(keys.progress(), GetOptions::new()),
            ]);
        match client.kv().txn(txn).await {
            Ok(resp) if resp.succeeded => {
                println!(
                    "step {done}..{to} written by {id} fence {fence} at revision {}",
                    resp.revision
                );
                done = to;
                seen = resp.revision;
                let news = encode(&Proclaimed {
                    id: id.to_string(),
                    done: Some(done),
                    total: Some(total),
                })?;
                match leadership.proclaim(news).await {
                    Ok(()) => {}
                    Err(recipes::Error::NotLeader) => return Ok(deposed(id, fence)),
                    // Proclaiming is news for observers; the progress is recorded already.
                    Err(e) => eprintln!("{id}: proclaiming progress {done}: {e}"),
                }
                tokio::time::sleep(STEP_PAUSE).await;
            }
            Ok(resp) => {
                let leader_key = answer(&resp.responses, 0)?.first();
                if leader_key.map(|kv| kv.create_revision) != Some(fence) {
                    return Ok(deposed(id, fence));
                }
                // Still leader, so the progress moved by our own hand: an earlier send whose
                // outcome was unknown did land. Go on from there.
                (done, seen) = progress_of(answer(&resp.responses, 1)?.first())?;
            }
            Err(kv_client::Error::OutcomeUnknown(why)) => {
                eprintln!("{id}: step {done}..{to} may or may not have landed ({why}); re-reading");
                (done, seen) = read_progress(client, keys).await?;
            }
            Err(e) => return Err(format!("step {done}..{to}: {e}").into()),
        }
    }
    println!("index complete: {done} of {total} docs, leader {id}");
    Ok(Turn::Complete)
}

fn deposed(id: &str, fence: i64) -> Turn {
    println!("{id} refused: fence {fence} no longer holds");
    Turn::Deposed
}

/// The key-values of the `n`th answer of a transaction branch made of reads.
fn answer(responses: &[TxnOpResponse], n: usize) -> Result<&[KeyValue]> {
    match responses.get(n) {
        Some(TxnOpResponse::Get(got)) => Ok(&got.kvs),
        _ => Err(format!("transaction answer {n} is not a read").into()),
    }
}

/// A leader as the demo saw it elected.
#[derive(Clone)]
struct Leader {
    id: String,
    fence: i64,
    key: Vec<u8>,
}

impl Leader {
    fn from_kv(kv: &KeyValue) -> Result<Leader> {
        Ok(Leader {
            id: decode::<Proclaimed>(kv)?.id,
            fence: kv.create_revision,
            key: kv.key.to_vec(),
        })
    }
}

async fn demo(endpoints: &str) -> Result<()> {
    let client = connect(endpoints).await?;
    // Run-unique, so demos against one server never see each other's keys.
    let keys = Keys {
        prefix: format!("examples/indexing/{}", std::process::id()),
    };
    let outcome = run_demo(&client, &keys, endpoints).await;
    // The jobs are gone (killed when their handles dropped); so can their keys be.
    let cleanup = client
        .kv()
        .delete(format!("{}/", keys.prefix), DeleteOptions::new().prefix())
        .await;
    let summary = outcome?;
    cleanup.map_err(|e| format!("cleaning up {}: {e}", keys.prefix))?;
    println!("{summary}");
    Ok(())
}

/// The demo proper; returns the summary line.
async fn run_demo(client: &Client, keys: &Keys, endpoints: &str) -> Result<String> {
    println!(
        "demo: {DEMO_DOCS} docs under {}, {DEMO_JOBS} jobs, steps of {STEP_DOCS} docs, \
         job session TTL {JOB_TTL} s",
        keys.prefix
    );
    let mut loader = Process::start(
        "loader",
        &args(
            endpoints,
            &[
                "load",
                "--prefix",
                &keys.prefix,
                "--docs",
                &DEMO_DOCS.to_string(),
            ],
        ),
    )?;
    if !tokio::task::block_in_place(|| loader.wait_for_exit(PATIENCE)) {
        return Err("the loader did not finish".into());
    }
    let loaded = client
        .kv()
        .get(keys.docs(), GetOptions::new().prefix().count_only())
        .await?
        .count;
    if loaded != DEMO_DOCS as i64 {
        return Err(format!("the loader wrote {loaded} docs, not {DEMO_DOCS}").into());
    }

    let election = Election::new(client, keys.election());
    let mut observer = election.observe();
    let mut jobs = (1..=DEMO_JOBS)
        .map(|n| {
            let id = format!("job-{n}");
            Process::start(
                id.clone(),
                &args(endpoints, &["job", "--id", &id, "--prefix", &keys.prefix]),
            )
        })
        .collect::<std::io::Result<Vec<_>>>()?;

    // Wait until a leader has indexed some documents, then kill it mid-build.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut leader = None;
    let (victim, proclaimed) = loop {
        match next_observation(&mut observer, deadline, "a leader indexing").await? {
            Observation::Elected(kv) => {
                let elected = Leader::from_kv(&kv)?;
                println!("demo sees leader {} fence {}", elected.id, elected.fence);
                leader = Some(elected);
            }
            Observation::Proclaimed(kv) => {
                let done = decode::<Proclaimed>(&kv)?.done.unwrap_or(0);
                if done >= DEMO_DOCS {
                    return Err("the index was complete before the demo could kill".into());
                }
                if done >= KILL_AFTER_DOCS
                    && let Some(leader) = leader.take()
                {
                    break (leader, done);
                }
            }
            Observation::Vacant => leader = None,
        }
    };
    let job = jobs
        .iter_mut()
        .find(|job| job.label() == victim.id)
        .ok_or_else(|| format!("no job process is called {}", victim.id))?;
    let pid = job.pid();
    job.kill();
    let killed_at = Instant::now();
    println!(
        "killed leader {} (pid {pid}) after it proclaimed {proclaimed} of {DEMO_DOCS} docs",
        victim.id
    );

    // Its leader key goes when its lease runs out: that revision is where its fence ends.
    let superseded_at = tokio::time::timeout(PATIENCE, deleted_at(client, &victim))
        .await
        .map_err(|_| format!("the leader key of {} was never deleted", victim.id))??;
    println!(
        "leader key of {} deleted at revision {superseded_at}, {:.1} s after the kill \
         (its session's lease ran out)",
        victim.id,
        killed_at.elapsed().as_secs_f64()
    );

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let successor = loop {
        if let Observation::Elected(kv) =
            next_observation(&mut observer, deadline, "a new leader").await?
        {
            let elected = Leader::from_kv(&kv)?;
            if elected.fence != victim.fence {
                break elected;
            }
        }
    };
    println!(
        "takeover: {} leads with fence {}",
        successor.id, successor.fence
    );
    refuse_stale_write(client, keys, &victim, &successor).await?;

    // The successor finishes; then each remaining job leads in turn, finds the index
    // complete, resigns and exits.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (done, _) = read_progress(client, keys).await?;
        if done == DEMO_DOCS {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the index stopped at {done} of {DEMO_DOCS} docs").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("index complete: progress {DEMO_DOCS} of {DEMO_DOCS} recorded");
    for job in jobs.iter_mut().filter(|job| job.label() != victim.id) {
        if !tokio::task::block_in_place(|| job.wait_for_exit(PATIENCE)) {
            return Err(format!("{} did not finish by itself", job.label()).into());
        }
    }
    println!("the other jobs finished by themselves");

    let resumed_at = verify(client, keys, &victim, &successor, superseded_at).await?;
    Ok(format!(
        "summary: killed leader {} (last recorded progress doc {resumed_at}); {} resumed at doc \
         {resumed_at}; stale-fence write refused; index complete ({DEMO_DOCS} docs)",
        victim.id, successor.id
    ))
}

/// Arguments for a child: this example in another mode, against the same endpoints.
fn args(endpoints: &str, mode: &[&str]) -> Vec<String> {
    ["--endpoints", endpoints]
        .iter()
        .chain(mode)
        .map(|a| a.to_string())
        .collect()
}

async fn next_observation(
    observer: &mut Observer,
    deadline: tokio::time::Instant,
    waiting_for: &str,
) -> Result<Observation> {
    match tokio::time::timeout_at(deadline, observer.next()).await {
        Err(_) => Err(format!("no {waiting_for} within {PATIENCE:?}").into()),
        Ok(None) => Err("the election observer ended".into()),
        Ok(Some(seen)) => Ok(seen?),
    }
}

/// The revision at which `leader`'s key was deleted (watched from its creation on, so a
/// deletion before the watch started is seen too).
async fn deleted_at(client: &Client, leader: &Leader) -> Result<i64> {
    let mut deletes = client.watch().watch(
        &leader.key,
        WatchOptions::new()
            .start_revision(leader.fence + 1)
            .no_put(),
    );
    while let Some(update) = deletes.next().await {
        if let Some(event) = update?.events.first() {
            return Ok(event.kv.mod_revision);
        }
    }
    Err("the watch on the leader key ended".into())
}

/// Sends what the deposed leader would send if it were still running: a write guarded by its
/// fence. It must be refused.
async fn refuse_stale_write(
    client: &Client,
    keys: &Keys,
    victim: &Leader,
    successor: &Leader,
) -> Result<()> {
    let rewind = Progress {
        done: 0,
        by: victim.id.clone(),
        fence: victim.fence,
    };
    // The very compare `Leadership::is_leader` makes for its holder (see `Leadership::txn`).
    let fenced = Compare::create_revision(victim.key.clone(), CompareOp::Equal, victim.fence);
    let stale = kv_client::Txn::new().when([fenced]).and_then([TxnOp::put(
        keys.progress(),
        encode(&rewind)?,
        PutOptions::new(),
    )]);
    if client.kv().txn(stale).await?.succeeded {
        return Err(format!(
            "a write guarded by {}'s old fence {} landed after {} took over",
            victim.id, victim.fence, successor.id
        )
        .into());
    }
    println!(
        "stale-fence write refused: a progress reset guarded by {}'s fence {} (superseded by \
         {}'s fence {})",
        victim.id, victim.fence, successor.id, successor.fence
    );
    Ok(())
}

/// Checks the finished index from the store; returns the doc the successor resumed at.
async fn verify(
    client: &Client,
    keys: &Keys,
    victim: &Leader,
    successor: &Leader,
    superseded_at: i64,
) -> Result<usize> {
    let kv = client.kv();
    // Everything read at one revision, so the reads agree with each other.
    let docs = kv.get(keys.docs(), GetOptions::new().prefix()).await?;
    let at = docs.revision;
    let index = kv
        .get(keys.index(), GetOptions::new().prefix().revision(at))
        .await?;
    let steps = kv
        .get(keys.steps(), GetOptions::new().prefix().revision(at))
        .await?;

    // 1. The index is what the documents say, computed here from scratch.
    let mut expected = BTreeMap::new();
    for doc in &docs.kvs {
        let n = key_number(&doc.key)?;
        for (word, count) in word_counts(&String::from_utf8_lossy(&doc.value)) {
            expected.insert(keys.posting(&word, n), count);
        }
    }
    let mut found = BTreeMap::new();
    for kv in &index.kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        found.insert(key, decode::<Posting>(kv)?.count);
    }
    if found != expected {
        let missing = expected.keys().filter(|k| !found.contains_key(*k)).count();
        let wrong = found
            .iter()
            .filter(|(k, v)| expected.get(*k) != Some(v))
            .count();
        return Err(format!(
            "the index does not match the docs: {missing} entries missing, {wrong} wrong or extra"
        )
        .into());
    }
    let words = found
        .keys()
        .filter_map(|k| k.rsplit('/').nth(1))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    println!(
        "verified: index complete and correct: {} docs, {words} words, {} entries",
        docs.kvs.len(),
        found.len()
    );

    // 2. The steps cover every doc once, each written once, by the leader of its time.
    let mut records = Vec::new();
    for kv in &steps.kvs {
        records.push((decode::<Step>(kv)?, kv));
    }
    records.sort_by_key(|(step, _)| step.from);
    let mut next = 0;
    for (step, kv) in &records {
        if step.from != next {
            return Err(format!("step records jump from doc {next} to {}", step.from).into());
        }
        next = step.to;
        if kv.version != 1 {
            return Err(format!(
                "step {}..{} was written {} times (redone)",
                step.from, step.to, kv.version
            )
            .into());
        }
        let leader = [victim, successor]
            .into_iter()
            .find(|l| l.fence == step.fence)
            .ok_or_else(|| {
                format!(
                    "step {}..{} has unknown fence {}",
                    step.from, step.to, step.fence
                )
            })?;
        if leader.id != step.by {
            return Err(format!(
                "step {}..{} by {} carries {}'s fence",
                step.from, step.to, step.by, leader.id
            )
            .into());
        }
        // The victim's fence held until its key was deleted; the successor's from then on.
        let in_tenure = if leader.fence == victim.fence {
            kv.mod_revision < superseded_at
        } else {
            kv.mod_revision > superseded_at
        };
        if !in_tenure {
            return Err(format!(
                "step {}..{} with {}'s fence landed at revision {}, outside its leadership \
                 (superseded at {superseded_at})",
                step.from, step.to, leader.id, kv.mod_revision
            )
            .into());
        }
    }
    if next != DEMO_DOCS {
        return Err(format!("step records end at doc {next}, not {DEMO_DOCS}").into());
    }
    let span = |leader: &Leader| {
        let mine: Vec<_> = records
            .iter()
            .filter(|(s, _)| s.fence == leader.fence)
            .collect();
        match (mine.first(), mine.last()) {
            (Some((first, _)), Some((last, _))) => {
                format!(
                    "{} fence {} docs {}..{}",
                    leader.id, leader.fence, first.from, last.to
                )
            }
            _ => format!("{} fence {} no steps", leader.id, leader.fence),
        }
    };
    println!(
        "verified: {} steps, each written once, under the fence of the leader of its time: {}, {}",
        records.len(),
        span(victim),
        span(successor)
    );

    // 3. The successor started where the victim's last recorded step ended.
    let last_recorded = records
        .iter()
        .filter(|(s, _)| s.fence == victim.fence)
        .map(|(s, _)| s.to)
        .max()
        .unwrap_or(0);
    let resumed_at = records
        .iter()
        .find(|(s, _)| s.fence == successor.fence)
        .map(|(s, _)| s.from)
        .ok_or_else(|| format!("{} wrote no step", successor.id))?;
    if resumed_at != last_recorded || resumed_at == 0 {
        return Err(format!(
            "{} resumed at doc {resumed_at}, but {}'s last recorded progress was {last_recorded}",
            successor.id, victim.id
        )
        .into());
    }
    println!(
        "verified: {} resumed at doc {resumed_at} = {}'s last recorded progress {last_recorded} \
         (no step redone)",
        successor.id, victim.id
    );

    // 4. Nothing written with the victim's fence landed after that fence was superseded.
    let mut old = Vec::new();
    for kv in &index.kvs {
        if decode::<Posting>(kv)?.fence == victim.fence {
            old.push(kv.mod_revision);
        }
    }
    old.extend(
        records
            .iter()
            .filter(|(s, _)| s.fence == victim.fence)
            .map(|(_, kv)| kv.mod_revision),
    );
    let latest = old.iter().copied().max().unwrap_or(0);
    if latest >= superseded_at {
        return Err(format!(
            "{} wrote at revision {latest} with fence {}, after it was superseded at \
             revision {superseded_at}",
            victim.id, victim.fence
        )
        .into());
    }
    println!(
        "verified: {}'s {} writes with fence {} all landed before revision {superseded_at} \
         (the latest at {latest}); none after its fence was superseded",
        victim.id,
        old.len(),
        victim.fence
    );
    Ok(resumed_at)
}
