//! What a queue costs in time, against any etcd-v3 endpoint (kv-server or etcd).
//!
//! ```text
//! queue_bench ENDPOINT ITEMS WORKERS
//! ```
//!
//! Enqueues ITEMS numbered items one at a time, then ITEMS more in batches (`enqueue_all`),
//! then drains the queue with WORKERS consumers (each its own client and session, in this
//! process) that claim and ack. Prints enqueue rates, end-to-end items/s while draining, and
//! the claim latency (`dequeue` call) p50/p99. Every item must be acked exactly once and
//! first deliveries must come in order, or the run fails.

use std::error::Error;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kv_client::{Client, ClientOptions};
use kv_tests::bench::{percentiles, unique};
use recipes::{Queue, Session};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

async fn run(endpoint: &str, items: u32, workers: usize) -> Result<()> {
    let client = Client::connect([endpoint], ClientOptions::default()).await?;
    let name = unique("queue");
    let queue: Queue<u32> = Queue::new(&client, &name);
    let start = Instant::now();
    for i in 0..items {
        queue.enqueue(&i).await?;
    }
    let single = start.elapsed();
    let batch: Vec<u32> = (items..2 * items).collect();
    let start = Instant::now();
    queue.enqueue_all(&batch).await?;
    let batched = start.elapsed();
    println!(
        "enqueue: {:.0} items/s one at a time, {:.0} items/s in batches of 64",
        items as f64 / single.as_secs_f64(),
        items as f64 / batched.as_secs_f64()
    );

    let total = 2 * items as usize;
    let seen = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let client = Client::connect([endpoint], ClientOptions::default()).await?;
        let queue: Queue<u32> = Queue::new(&client, &name);
        let (seen, latencies) = (seen.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let session = Session::with_ttl(&client, 30).await?;
            loop {
                let asked = Instant::now();
                let Some(claimed) = queue.try_dequeue(&session).await? else {
                    return Ok::<_, Box<dyn Error + Send + Sync>>(());
                };
                let waited = asked.elapsed();
                let (item, attempts, fence) = (claimed.item, claimed.attempts(), claimed.fence());
                claimed.ack().await?;
                latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(waited);
                seen.lock().unwrap_or_else(|e| e.into_inner()).push((
                    fence.revision,
                    item,
                    attempts,
                ));
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let drained = start.elapsed();
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    seen.sort_unstable();
    let order: Vec<u32> = seen.iter().map(|s| s.1).collect();
    if order != (0..2 * items).collect::<Vec<_>>() || seen.iter().any(|s| s.2 != 1) {
        return Err("items were lost, repeated or delivered out of order".into());
    }
    let mut lat = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (p50, p99) = percentiles(&mut lat);
    println!(
        "drain with {workers} workers: {:.0} items/s end to end; claim p50 {p50:.0} µs, p99 {p99:.0} µs",
        total as f64 / drained.as_secs_f64(),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [endpoint, items, workers] => items
            .parse()
            .ok()
            .zip(workers.parse().ok())
            .map(|(i, w)| (endpoint.clone(), i, w)),
        _ => None,
    };
    let Some((endpoint, items, workers)) = parsed else {
        eprintln!("usage: queue_bench ENDPOINT ITEMS WORKERS");
        return ExitCode::FAILURE;
    };
    match run(&endpoint, items, workers).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("queue_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
