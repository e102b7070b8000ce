//! What the recipes cost in time, against any etcd-v3 endpoint (kv-server or etcd), so the
//! figures can be set beside each other.
//!
//! ```text
//! recipes_bench lock     ENDPOINT SECONDS
//! recipes_bench handover ENDPOINT ROUNDS
//! recipes_bench failover ENDPOINT ROUNDS
//! ```
//!
//! - `lock`: one session locks and unlocks one mutex, uncontended, for SECONDS: round trips
//!   per second and the latency of one lock + unlock.
//! - `handover`: two sessions (each with its own client) take turns on one mutex; each round,
//!   the waiter is queued, then the holder unlocks. Latency: unlock sent → waiter's `lock`
//!   returned.
//! - `failover`: a leader and a queued candidate in one election; each round the leader's
//!   session ends (its lease is revoked). Latency: revoke sent → candidate's `campaign`
//!   returned.
//!
//! Each mode prints one line with p50/p99 (and the rate for `lock`). Every round checks that
//! the lock or leadership actually moved (fences increase), so a wrong answer cannot look fast.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions};
use kv_tests::bench::{percentiles, unique};
use recipes::{Election, Mutex, Session};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const USAGE: &str = "usage: recipes_bench lock ENDPOINT SECONDS\n       \
                     recipes_bench handover|failover ENDPOINT ROUNDS";

async fn connect(endpoint: &str) -> Result<Client> {
    Ok(Client::connect([endpoint], ClientOptions::default()).await?)
}

async fn lock(endpoint: &str, seconds: u64) -> Result<String> {
    let client = connect(endpoint).await?;
    let session = Session::with_ttl(&client, 30).await?;
    let mutex = Mutex::new(&session, unique("lock"));
    let mut samples = Vec::new();
    let mut last_fence = 0;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let start = Instant::now();
        let guard = mutex.lock().await?;
        let fence = guard.fence().revision;
        if fence <= last_fence || !guard.unlock().await? {
            return Err(format!("lock {fence} after {last_fence} was not a fresh hold").into());
        }
        last_fence = fence;
        samples.push(start.elapsed());
    }
    let n = samples.len();
    let (p50, p99) = percentiles(&mut samples);
    session.close().await?;
    Ok(format!(
        "lock: {n} uncontended lock+unlock in {seconds} s = {:.0} round trips/s, p50 {p50:.0} µs, p99 {p99:.0} µs",
        n as f64 / seconds as f64
    ))
}

async fn handover(endpoint: &str, rounds: usize) -> Result<String> {
    let name = unique("handover");
    let mut sides = Vec::new();
    for _ in 0..2 {
        let client = connect(endpoint).await?;
        let session = Session::with_ttl(&client, 30).await?;
        sides.push(Mutex::new(&session, &name));
    }
    let mut samples = Vec::new();
    let mut held = sides[0].lock().await?;
    for round in 0..rounds {
        let waiter = sides[(round + 1) % 2].clone();
        let queued = tokio::spawn(async move {
            let guard = waiter.lock().await;
            (Instant::now(), guard)
        });
        // Let the waiter queue (its key written, its watch open) before the release.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let fence = held.fence().revision;
        let released = Instant::now();
        held.unlock().await?;
        let (acquired, guard) = queued.await?;
        held = guard?;
        if held.fence().revision <= fence {
            return Err("the lock did not move to the waiter".into());
        }
        samples.push(acquired - released);
    }
    held.unlock().await?;
    let (p50, p99) = percentiles(&mut samples);
    Ok(format!(
        "handover: {rounds} rounds, unlock sent -> waiter holds: p50 {p50:.0} µs, p99 {p99:.0} µs"
    ))
}

async fn failover(endpoint: &str, rounds: usize) -> Result<String> {
    let client = connect(endpoint).await?;
    let election = Election::new(&client, unique("failover"));
    let mut samples = Vec::new();
    let mut leader_session = Session::with_ttl(&client, 30).await?;
    let mut leader = election.campaign(&leader_session, "0").await?;
    for round in 1..=rounds {
        let next_session = Session::with_ttl(&client, 30).await?;
        let candidate = tokio::spawn({
            let (election, session) = (election.clone(), next_session.clone());
            async move {
                let won = election.campaign(&session, round.to_string()).await;
                (Instant::now(), won)
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let fence = leader.fence().revision;
        let ended = Instant::now();
        client.lease().revoke(leader_session.lease()).await?;
        let (elected, won) = candidate.await?;
        let won = won?;
        if won.fence().revision <= fence {
            return Err("leadership did not move to the candidate".into());
        }
        samples.push(elected - ended);
        drop(leader.detach());
        leader = won;
        leader_session = next_session;
    }
    let (p50, p99) = percentiles(&mut samples);
    leader_session.close().await?;
    Ok(format!(
        "failover: {rounds} rounds, leader's lease revoked -> candidate leads: p50 {p50:.0} µs, p99 {p99:.0} µs"
    ))
}

async fn run(args: &[String]) -> Result<String> {
    let [mode, endpoint, n] = args else {
        return Err(USAGE.into());
    };
    let n: usize = n.parse().map_err(|_| USAGE)?;
    match mode.as_str() {
        "lock" => lock(endpoint, n as u64).await,
        "handover" => handover(endpoint, n).await,
        "failover" => failover(endpoint, n).await,
        _ => Err(USAGE.into()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("recipes_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
