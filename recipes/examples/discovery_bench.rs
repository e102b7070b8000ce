//! What service discovery costs in time, against any etcd-v3 endpoint (kv-server or etcd).
//!
//! ```text
//! discovery_bench ENDPOINT N
//! ```
//!
//! - `register`: N instances register at once (each its own session, spread over a few
//!   clients, at most `IN_FLIGHT` registrations in flight): the time until every `register`
//!   returned, and until a cache (on a client of its own) listed all N.
//! - `change`: a writer rewrites one instance key `CHANGES` times; latency from the put being
//!   sent to the cache's change stream yielding it (checked by its mod revision), p50/p99,
//!   beside the put's own round trip (sent → acknowledged) for reference.
//! - `deregister`: every registration is removed; time until the cache is empty.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{Client, ClientOptions, PutOptions};
use kv_tests::bench::{percentiles, unique};
use recipes::discovery::{InstanceChange, InstanceInfo, RegisterOptions, Service, ServiceCache};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const USAGE: &str = "usage: discovery_bench ENDPOINT N";
/// Clients the registrations are spread over.
const CLIENTS: usize = 8;
/// Registrations in flight at once.
const IN_FLIGHT: usize = 256;
/// Rewrites timed for the change latency.
const CHANGES: usize = 200;
/// Bound of every wait, so a broken server fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(120);

async fn connect(endpoint: &str) -> Result<Client> {
    Ok(Client::connect([endpoint], ClientOptions::default()).await?)
}

/// Waits until `cache` lists `n` instances.
async fn until_listed(cache: &ServiceCache, n: usize) -> Result<()> {
    let mut changes = cache.changes();
    tokio::time::timeout(WAIT, async {
        while cache.instances().len() != n {
            changes.next().await;
        }
    })
    .await
    .map_err(|_| format!("the cache did not reach {n} instances within {WAIT:?}"))?;
    Ok(())
}

async fn run(endpoint: &str, n: usize) -> Result<()> {
    let name = unique("discovery");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(endpoint).await?);
    }
    let reader = connect(endpoint).await?;
    let cache = Service::new(&reader, &name).cache().await?;

    let start = Instant::now();
    let registering = futures::stream::iter(0..n).map(|i| {
        let service = Service::new(&clients[i % CLIENTS], &name);
        async move {
            let info = InstanceInfo::new(format!("10.0.{}.{}:8080", i / 256, i % 256))
                .with_metadata("n", i.to_string());
            tokio::time::timeout(
                WAIT,
                service.register_with(format!("i{i:05}"), info, RegisterOptions::new()),
            )
            .await
            .map_err(|_| format!("register i{i:05}: no answer within {WAIT:?}"))?
            .map_err(|e| format!("register i{i:05}: {e}"))
        }
    });
    let registrations: Vec<_> = registering
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()?;
    let registered = start.elapsed();
    until_listed(&cache, n).await?;
    let listed = start.elapsed();
    println!(
        "register: {n} instances registered in {:.2} s ({:.0}/s, {IN_FLIGHT} in flight over {CLIENTS} clients); the cache listed all {n} after {:.2} s",
        registered.as_secs_f64(),
        n as f64 / registered.as_secs_f64(),
        listed.as_secs_f64()
    );

    // Change latency: a plain writer rewrites one instance key; the cache's stream reports it.
    let writer = connect(endpoint).await?;
    let probe = format!("{name}/probe");
    let mut changes = cache.changes();
    // The snapshot first.
    for _ in 0..n {
        changes.next().await;
    }
    let mut samples = Vec::with_capacity(CHANGES);
    let mut acks = Vec::with_capacity(CHANGES);
    for round in 0..CHANGES {
        let value = serde_json::to_vec(&InstanceInfo::new(format!("10.9.9.9:{round}")))?;
        let sent = Instant::now();
        let put = writer
            .kv()
            .put(probe.as_bytes(), value, PutOptions::new())
            .await?;
        acks.push(sent.elapsed());
        let seen = tokio::time::timeout(WAIT, async {
            while let Some(change) = changes.next().await {
                if let InstanceChange::Added(i) | InstanceChange::Updated(i) = &change
                    && i.mod_revision == put.revision
                {
                    return Ok(sent.elapsed());
                }
            }
            Err("the change stream ended")
        })
        .await
        .map_err(|_| format!("change {round} not seen within {WAIT:?}"))??;
        samples.push(seen);
    }
    let (p50, p99) = percentiles(&mut samples);
    let (ack50, ack99) = percentiles(&mut acks);
    println!(
        "change: put sent -> cache change event, {CHANGES} changes: p50 {p50:.0} µs, p99 {p99:.0} µs (the put's own round trip: p50 {ack50:.0} µs, p99 {ack99:.0} µs)"
    );
    writer
        .kv()
        .delete(probe.as_bytes(), Default::default())
        .await?;

    let start = Instant::now();
    let removals = futures::stream::iter(registrations)
        .map(|r| r.deregister())
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let failed = removals.iter().filter(|r| r.is_err()).count();
    until_listed(&cache, 0).await?;
    println!(
        "deregister: {n} instances removed and the cache empty after {:.2} s ({failed} deregister calls failed)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoint, n) = match args.as_slice() {
        [endpoint, n] => match n.parse::<usize>() {
            Ok(n) if n > 0 => (endpoint.clone(), n),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(&endpoint, n).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("discovery_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
