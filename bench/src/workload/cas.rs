//! `cas`: compare-and-swap transactions on `--hot-keys` keys, `--in-flight` at once. Each
//! transaction puts a key if its mod revision is still the one the worker last saw, and
//! otherwise reads the key back in the same round trip (as etcd's STM does), so the next
//! attempt compares against the current revision. Commits are what counts; conflicts are
//! timed and reported beside.
//!
//! Checked afterwards: each key's version is 1 (the preload) plus the commits made on it, so
//! no commit was lost or applied twice.

use std::sync::Arc;

use kv_client::{Compare, CompareOp, GetOptions, Kv, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::preload;
use crate::error::{During, Error};
use crate::load::{Measured, Outcome, Window, Worker, closed_loop};
use crate::run::Context;

/// splitmix64: a cheap, well-spread sequence for picking keys.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Swapper {
    kv: Kv,
    keys: Arc<Vec<Vec<u8>>>,
    /// Per key, the mod revision this worker last saw.
    seen: Vec<i64>,
    value: Vec<u8>,
    rng: u64,
    /// Per key, this worker's commits.
    commits: Vec<u64>,
}

impl Worker for Swapper {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let k = (mix(&mut self.rng) % self.keys.len() as u64) as usize;
        let key = &self.keys[k];
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                self.seen[k],
            )])
            .and_then([TxnOp::put(
                key.clone(),
                self.value.clone(),
                PutOptions::new(),
            )])
            .or_else([TxnOp::get(key.clone(), GetOptions::new())]);
        let answer = self.kv.txn(txn).await?;
        if answer.succeeded {
            self.seen[k] = answer.revision;
            self.commits[k] += 1;
            return Ok(Outcome::Done);
        }
        self.seen[k] = match answer.responses.first() {
            Some(TxnOpResponse::Get(got)) => got.kvs.first().map_or(0, |kv| kv.mod_revision),
            _ => 0,
        };
        Ok(Outcome::Conflict)
    }
}

pub(crate) async fn run(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let keys: Vec<Vec<u8>> = (0..s.hot_keys)
        .map(|i| ctx.key(&format!("hot{i:03}")))
        .collect();
    let items: Vec<(Vec<u8>, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), ctx.value(b"", b'0')))
        .collect();
    let revisions = preload::one_by_one(&ctx.client(0).kv(), &items).await?;
    let keys = Arc::new(keys);
    let workers: Vec<Swapper> = (0..ctx.workload.in_flight(s))
        .map(|w| Swapper {
            kv: ctx.client(w).kv(),
            keys: keys.clone(),
            seen: revisions.clone(),
            value: ctx.value(b"", b'c'),
            rng: w as u64,
            commits: vec![0; keys.len()],
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let errors = tally.errors;
    let mut m = Measured::of_loop(tally, usage);
    let conflicts = m.latency.count() - m.ops;
    m.detail("attempts", m.latency.count() as f64);
    m.detail("conflicts", conflicts as f64);

    let mut commits = vec![0u64; keys.len()];
    for w in &workers {
        for (c, n) in commits.iter_mut().zip(&w.commits) {
            *c += n;
        }
    }
    let stored = ctx
        .client(0)
        .kv()
        .get(&ctx.prefix, GetOptions::new().prefix())
        .await
        .during("read the hot keys back")?;
    check(&keys, &commits, &stored.kvs, errors, &mut m);
    Ok(m)
}

/// Each key's version must be 1 + its commits; a failed request may have committed unseen, so
/// with `errors` failures the version may exceed that by as many.
fn check(
    keys: &[Vec<u8>],
    commits: &[u64],
    stored: &[kv_client::KeyValue],
    errors: u64,
    m: &mut Measured,
) {
    for (key, &made) in keys.iter().zip(commits) {
        let name = String::from_utf8_lossy(key);
        let Some(kv) = stored.iter().find(|kv| kv.key == *key) else {
            m.fail(format!("{name} is gone"));
            continue;
        };
        let applied = u64::try_from(kv.version - 1).unwrap_or(0);
        if applied < made || applied > made + errors {
            m.fail(format!(
                "{name}: {made} commits answered, version {} (lost or doubled updates)",
                kv.version
            ));
        }
    }
}
