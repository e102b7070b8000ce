//! `put-seq` and `put`: puts over `--keys` keys, one at a time or `--in-flight` at once.
//!
//! Checked afterwards: no two puts were answered the same revision, and every key holds the
//! value of its last put, at that put's revision, with a version counting its puts.

use std::sync::Arc;

use kv_client::{GetOptions, Kv, PutOptions};

use super::KEY_STRIDE;
use crate::error::{During, Error};
use crate::load::{Measured, Outcome, Window, Worker, closed_loop};
use crate::run::Context;

/// One put as answered.
struct Record {
    revision: i64,
    key: usize,
    worker: u32,
    seq: u64,
}

/// The value of put `seq` of `worker`: both numbers, then padding.
fn value(ctx: &Context<'_>, worker: u32, seq: u64) -> Vec<u8> {
    let mut head = worker.to_le_bytes().to_vec();
    head.extend_from_slice(&seq.to_le_bytes());
    ctx.value(&head, b'v')
}

struct Putter {
    kv: Kv,
    keys: Arc<Vec<Vec<u8>>>,
    /// The run's value, whose head is rewritten per put.
    value: Vec<u8>,
    worker: u32,
    next_key: usize,
    seq: u64,
    puts: Vec<Record>,
}

impl Worker for Putter {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let key = self.next_key % self.keys.len();
        self.next_key += KEY_STRIDE;
        let mut value = self.value.clone();
        value[..4].copy_from_slice(&self.worker.to_le_bytes());
        value[4..12].copy_from_slice(&self.seq.to_le_bytes());
        let put = self
            .kv
            .put(&self.keys[key], value, PutOptions::new())
            .await?;
        self.puts.push(Record {
            revision: put.revision,
            key,
            worker: self.worker,
            seq: self.seq,
        });
        self.seq += 1;
        Ok(Outcome::Done)
    }
}

pub(crate) async fn run(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let keys: Arc<Vec<Vec<u8>>> =
        Arc::new((0..s.keys).map(|i| ctx.key(&format!("{i:06}"))).collect());
    let workers: Vec<Putter> = (0..ctx.workload.in_flight(s))
        .map(|w| Putter {
            kv: ctx.client(w).kv(),
            keys: keys.clone(),
            value: ctx.value(&[0; 12], b'v'),
            worker: w as u32,
            next_key: w,
            seq: 0,
            puts: Vec::new(),
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let mut m = Measured::of_loop(tally, usage);
    let puts: Vec<Record> = workers.into_iter().flat_map(|w| w.puts).collect();
    check(ctx, &ctx.client(0).kv(), &keys, puts, &mut m).await?;
    Ok(m)
}

/// The checks of the module docs.
async fn check(
    ctx: &Context<'_>,
    kv: &Kv,
    keys: &[Vec<u8>],
    mut puts: Vec<Record>,
    m: &mut Measured,
) -> Result<(), Error> {
    puts.sort_unstable_by_key(|p| p.revision);
    if let Some(pair) = puts.windows(2).find(|w| w[0].revision == w[1].revision) {
        m.fail(format!(
            "two puts were answered revision {}",
            pair[0].revision
        ));
    }
    let mut last: Vec<Option<&Record>> = vec![None; keys.len()];
    let mut count = vec![0i64; keys.len()];
    for p in &puts {
        last[p.key] = Some(p);
        count[p.key] += 1;
    }
    let got = kv
        .get(&ctx.prefix, GetOptions::new().prefix())
        .await
        .during("read the keys back")?;
    let written = last.iter().flatten().count();
    if got.kvs.len() != written {
        m.fail(format!(
            "{written} keys were put, {} are stored",
            got.kvs.len()
        ));
    }
    for stored in &got.kvs {
        let name = String::from_utf8_lossy(&stored.key);
        let index = stored
            .key
            .strip_prefix(ctx.prefix.as_bytes())
            .and_then(|i| std::str::from_utf8(i).ok()?.parse::<usize>().ok())
            .filter(|&i| i < keys.len());
        let Some(i) = index else {
            m.fail(format!("unexpected key {name}"));
            continue;
        };
        let Some(p) = last[i] else {
            m.fail(format!("{name} is stored but was never put"));
            continue;
        };
        if stored.version != count[i]
            || stored.mod_revision != p.revision
            || stored.value != value(ctx, p.worker, p.seq)
        {
            m.fail(format!(
                "{name}: expected version {} and the value put at revision {}; stored: version {} at revision {}",
                count[i], p.revision, stored.version, stored.mod_revision
            ));
        }
    }
    Ok(())
}
