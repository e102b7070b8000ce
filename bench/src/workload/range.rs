//! `range`: full reads of a prefix of `--range-keys` keys (10,000 values of 256 bytes are
//! about 3 MB per answer), one read in flight per connection. Reports reads per second and
//! megabytes of keys and values per second.
//!
//! Every answer must hold every key. kv-client accepts answers of any size (as etcd's client
//! does), so a large prefix costs memory and time, not errors.

use kv_client::{GetOptions, Kv};

use super::preload;
use crate::error::Error;
use crate::load::{Measured, Outcome, Window, Worker, closed_loop};
use crate::run::Context;

struct Reader {
    kv: Kv,
    prefix: String,
    expected: usize,
    /// Answers that did not hold every key, and one of them described.
    short: u64,
    example: Option<String>,
}

impl Worker for Reader {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let got = self
            .kv
            .get(&self.prefix, GetOptions::new().prefix())
            .await?;
        if got.kvs.len() != self.expected || got.count != self.expected as i64 {
            self.short += 1;
            self.example.get_or_insert_with(|| {
                format!(
                    "a read of the prefix answered {} key-values (count {}), expected {}",
                    got.kvs.len(),
                    got.count,
                    self.expected
                )
            });
        }
        let bytes: usize = got.kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        Ok(Outcome::Read(bytes as u64))
    }
}

pub(crate) async fn run(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let items: Vec<(Vec<u8>, Vec<u8>)> = (0..s.range_keys)
        .map(|i| {
            let key = ctx.key(&format!("{i:07}"));
            let value = ctx.value(&key, b'r');
            (key, value)
        })
        .collect();
    preload::in_txns(&ctx.client(0).kv(), &items).await?;
    drop(items);
    let workers: Vec<Reader> = (0..ctx.workload.in_flight(s))
        .map(|w| Reader {
            kv: ctx.client(w).kv(),
            prefix: ctx.prefix.clone(),
            expected: s.range_keys,
            short: 0,
            example: None,
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let bytes = tally.bytes;
    let mut m = Measured::of_loop(tally, usage);
    m.detail("keys", s.range_keys as f64);
    m.detail(
        "mb_per_sec",
        bytes as f64 / 1e6 / m.seconds.max(f64::MIN_POSITIVE),
    );
    let short: u64 = workers.iter().map(|w| w.short).sum();
    if short > 0 {
        m.fail(format!("{short} reads did not hold every key"));
    }
    for why in workers.into_iter().filter_map(|w| w.example) {
        m.fail(why);
    }
    Ok(m)
}
