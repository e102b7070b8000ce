//! A small closed-loop load generator for any etcd-v3 endpoint (ours or etcd), used to compare
//! the two in one run: `kv-load ENDPOINT MODE [IN_FLIGHT] [SECONDS] [CONNECTIONS]`, MODE is
//! `put`, `get` (linearizable) or `sget` (serializable). Values are 256 bytes.

use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
use tonic::transport::Channel;

const VALUE_BYTES: usize = 256;
const KEYS: u64 = 10_000;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let endpoint = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:2379".into());
    let mode = args.get(2).cloned().unwrap_or_else(|| "put".into());
    let in_flight: usize = arg(&args, 3, 1);
    let seconds: u64 = arg(&args, 4, 3);
    let connections: usize = arg(&args, 5, 8).min(in_flight).max(1);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let ch = Channel::from_shared(format!("http://{endpoint}"))?
            .connect()
            .await?;
        clients.push(KvClient::new(ch));
    }
    if mode != "put" {
        // Something to read.
        let mut c = clients[0].clone();
        for k in 0..KEYS.min(1000) {
            c.put(PutRequest {
                key: format!("load/{k:08}").into_bytes(),
                value: vec![b'x'; VALUE_BYTES],
                ..Default::default()
            })
            .await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let mut client = clients[w % connections].clone();
        let mode = mode.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = w as u64;
            while Instant::now() < deadline {
                let key = format!("load/{:08}", n % KEYS.min(1000)).into_bytes();
                n += 7919;
                let t = Instant::now();
                let ok = match mode.as_str() {
                    "put" => client
                        .put(PutRequest {
                            key,
                            value: vec![b'v'; VALUE_BYTES],
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    "get" => client
                        .range(RangeRequest {
                            key,
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    _ => client
                        .range(RangeRequest {
                            key,
                            serializable: true,
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                };
                if !ok {
                    break;
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{endpoint} {mode} in_flight={in_flight} ops={} ops/s={:.0} p50={:.2}ms p99={:.2}ms",
        all.len(),
        all.len() as f64 / seconds as f64,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}
