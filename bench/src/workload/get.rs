//! `get` and `get-serializable`: gets of `--keys` preloaded keys, `--in-flight` at once.
//!
//! Every answer is checked: a linearizable get must hold exactly the key asked for, with the
//! value and mod revision it was preloaded with, at a revision no older than the preload. A
//! serializable get may come from a member that has not applied the preload yet, so a missing
//! key is counted (`stale`) rather than failed; a wrong value still fails.

use std::sync::Arc;

use kv_client::{GetOptions, GetResponse, Kv};

use super::{KEY_STRIDE, Workload, preload};
use crate::error::Error;
use crate::load::{Measured, Outcome, QUOTED_FAILURES, Window, Worker, closed_loop};
use crate::run::Context;

/// The preloaded keys: key `i` holds `values[i]` since `revisions[i]`.
struct Dataset {
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
    revisions: Vec<i64>,
    /// The last preload revision: no linearizable read may answer from before it.
    written_at: i64,
}

/// What one answer to a get of key `i` says about the server.
enum Verdict {
    Right,
    /// The key is not there yet (allowed for serializable reads only).
    Stale,
    Wrong(String),
}

impl Dataset {
    fn check(&self, i: usize, got: &GetResponse, serializable: bool) -> Verdict {
        match got.kvs.as_slice() {
            [kv] if kv.key == self.keys[i]
                && kv.value == self.values[i]
                && kv.mod_revision == self.revisions[i]
                && (serializable || got.revision >= self.written_at) =>
            {
                Verdict::Right
            }
            [] if serializable => Verdict::Stale,
            kvs => Verdict::Wrong(format!(
                "get {}: expected its value written at revision {}, answered at a revision >= {}; got {} key-values (mod revisions {:?}) at revision {}",
                String::from_utf8_lossy(&self.keys[i]),
                self.revisions[i],
                self.written_at,
                kvs.len(),
                kvs.iter().map(|kv| kv.mod_revision).collect::<Vec<_>>(),
                got.revision
            )),
        }
    }
}

struct Getter {
    kv: Kv,
    data: Arc<Dataset>,
    options: GetOptions,
    serializable: bool,
    next_key: usize,
    stale: u64,
    wrong: u64,
    failures: Vec<String>,
}

impl Worker for Getter {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let i = self.next_key % self.data.keys.len();
        self.next_key += KEY_STRIDE;
        let got = self
            .kv
            .get(&self.data.keys[i], self.options.clone())
            .await?;
        match self.data.check(i, &got, self.serializable) {
            Verdict::Right => {}
            Verdict::Stale => self.stale += 1,
            Verdict::Wrong(why) => {
                self.wrong += 1;
                if self.failures.len() < QUOTED_FAILURES {
                    self.failures.push(why);
                }
            }
        }
        Ok(Outcome::Done)
    }
}

pub(crate) async fn run(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let serializable = ctx.workload == Workload::GetSerializable;
    let keys: Vec<Vec<u8>> = (0..s.keys).map(|i| ctx.key(&format!("{i:06}"))).collect();
    let items: Vec<(Vec<u8>, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), ctx.value(k, b'x')))
        .collect();
    let revisions = preload::one_by_one(&ctx.client(0).kv(), &items).await?;
    let data = Arc::new(Dataset {
        written_at: revisions.iter().copied().max().unwrap_or(0),
        keys,
        values: items.into_iter().map(|(_, v)| v).collect(),
        revisions,
    });
    let options = if serializable {
        GetOptions::new().serializable()
    } else {
        GetOptions::new()
    };
    let workers: Vec<Getter> = (0..ctx.workload.in_flight(s))
        .map(|w| Getter {
            kv: ctx.client(w).kv(),
            data: data.clone(),
            options: options.clone(),
            serializable,
            next_key: w,
            stale: 0,
            wrong: 0,
            failures: Vec::new(),
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let mut m = Measured::of_loop(tally, usage);
    let wrong: u64 = workers.iter().map(|w| w.wrong).sum();
    if serializable {
        m.detail("stale", workers.iter().map(|w| w.stale).sum::<u64>() as f64);
    }
    if wrong > 0 {
        m.fail(format!("{wrong} gets answered wrongly"));
    }
    for why in workers.into_iter().flat_map(|w| w.failures) {
        m.fail(why);
    }
    Ok(m)
}
