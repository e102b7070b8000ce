//! `lease-grant`, `lease-keepalive` and `lease-revoke`.
//!
//! - `lease-grant`: grants (TTL 60 s) with `--in-flight` requests at once. The ids must all
//!   differ. The leases are revoked afterwards (not timed), so that they do not expire in the
//!   middle of a later workload.
//! - `lease-keepalive`: `--leases` leases are granted first; each keep-alive is a
//!   `Lease::keep_alive` call, which returns once the server renewed the lease, and the drop
//!   of its handle. All handles of one client share that client's keep-alive stream, so the
//!   renewals are spread over `--connections` streams. Each client also keeps one lease of its
//!   own alive for the whole window: kv-client closes a client's keep-alive stream whenever
//!   its last handle drops and opens a new one for the next call, which at low `--in-flight`
//!   would happen between calls and make the workload measure stream set-up. (At 8 calls in
//!   flight per client it made no measurable difference.)
//! - `lease-revoke`: a supply of leases is granted first (for as long as the window will last,
//!   or `--ops` of them), then revoked with `--in-flight` requests at once. Afterwards none of
//!   them may still be listed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt, stream};
use kv_client::{KeepAlive, Lease};

use crate::error::{During, Error};
use crate::load::{Measured, Outcome, QUOTED_FAILURES, Window, Worker, closed_loop};
use crate::run::Context;

/// TTL of every lease the workloads grant: long enough to outlive a window, short enough that
/// the leases of an interrupted run go by themselves.
const LEASE_TTL: i64 = 60;

struct Granter {
    lease: Lease,
    granted: Vec<i64>,
    failures: Vec<String>,
}

impl Worker for Granter {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let grant = self.lease.grant(LEASE_TTL, None).await?;
        self.granted.push(grant.id);
        if grant.ttl != LEASE_TTL && self.failures.len() < QUOTED_FAILURES {
            self.failures.push(format!(
                "lease {:#x} granted with TTL {} for {LEASE_TTL} asked",
                grant.id, grant.ttl
            ));
        }
        Ok(Outcome::Done)
    }
}

fn granters(ctx: &Context<'_>) -> Vec<Granter> {
    (0..ctx.settings.in_flight)
        .map(|w| Granter {
            lease: ctx.client(w).lease(),
            granted: Vec::new(),
            failures: Vec::new(),
        })
        .collect()
}

pub(crate) async fn grant(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(granters(ctx), &window).await;
    let usage = window.close()?;
    let mut m = Measured::of_loop(tally, usage);
    let mut ids = Vec::new();
    for w in workers {
        for why in w.failures {
            m.fail(why);
        }
        ids.extend(w.granted);
    }
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    if distinct.len() != ids.len() {
        m.fail(format!(
            "{} grants answered {} distinct ids",
            ids.len(),
            distinct.len()
        ));
    }
    revoke_all(ctx, &ids).await?;
    Ok(m)
}

/// Grants `n` leases with `--in-flight` requests at once.
async fn grant_many(ctx: &Context<'_>, n: usize) -> Result<Vec<i64>, Error> {
    stream::iter(0..n)
        .map(|i| {
            let lease = ctx.client(i).lease();
            async move { lease.grant(LEASE_TTL, None).await.map(|g| g.id) }
        })
        .buffer_unordered(ctx.settings.in_flight)
        .try_collect()
        .await
        .during("grant the leases")
}

/// Revokes `ids` with `--in-flight` requests at once (not timed); a lease already gone is
/// fine.
async fn revoke_all(ctx: &Context<'_>, ids: &[i64]) -> Result<(), Error> {
    stream::iter(ids.iter().enumerate())
        .map(|(i, &id)| {
            let lease = ctx.client(i).lease();
            async move {
                match lease.revoke(id).await {
                    Ok(_) | Err(kv_client::Error::LeaseNotFound) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(ctx.settings.in_flight)
        .try_collect::<()>()
        .await
        .during("revoke the leases")
}

struct Renewer {
    lease: Lease,
    ids: Vec<i64>,
    next: usize,
}

impl Worker for Renewer {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let id = self.ids[self.next % self.ids.len()];
        self.next += 1;
        // Returns once the server renewed it; dropping the handle stops renewing.
        let kept = self.lease.keep_alive(id).await?;
        drop(kept);
        Ok(Outcome::Done)
    }
}

pub(crate) async fn keepalive(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    let ids = grant_many(ctx, s.leases).await?;
    let anchor_ids = grant_many(ctx, ctx.clients.len()).await?;
    let mut anchors: Vec<KeepAlive> = Vec::with_capacity(anchor_ids.len());
    for (i, &id) in anchor_ids.iter().enumerate() {
        anchors.push(
            ctx.client(i)
                .lease()
                .keep_alive(id)
                .await
                .during("keep the stream's own lease alive")?,
        );
    }
    // Each worker renews leases of its own: two calls for one lease on one client would share
    // one renewal, and the second would return without asking the server.
    let workers_n = s.in_flight.min(ids.len());
    let workers: Vec<Renewer> = (0..workers_n)
        .map(|w| Renewer {
            lease: ctx.client(w).lease(),
            ids: ids.iter().copied().skip(w).step_by(workers_n).collect(),
            next: 0,
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, _) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let mut m = Measured::of_loop(tally, usage);
    m.detail("leases", ids.len() as f64);
    m.detail("streams", ctx.clients.len() as f64);
    let lost: Vec<i64> = anchors
        .iter()
        .filter(|a| a.try_lost().is_some())
        .map(KeepAlive::id)
        .collect();
    if !lost.is_empty() {
        m.fail(format!(
            "leases kept alive through the window were lost: {lost:x?}"
        ));
    }
    drop(anchors);
    revoke_all(ctx, &ids).await?;
    revoke_all(ctx, &anchor_ids).await?;
    Ok(m)
}

struct Revoker {
    lease: Lease,
    /// The leases not revoked yet, shared by every worker (taken under a std mutex, held for
    /// a `pop` only).
    supply: Arc<Mutex<Vec<i64>>>,
    revoked: Vec<i64>,
}

impl Worker for Revoker {
    async fn op(&mut self) -> Result<Outcome, kv_client::Error> {
        let next = self.supply.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let Some(id) = next else {
            return Ok(Outcome::Exhausted);
        };
        self.lease.revoke(id).await?;
        self.revoked.push(id);
        Ok(Outcome::Done)
    }
}

pub(crate) async fn revoke(ctx: &Context<'_>) -> Result<Measured, Error> {
    let s = ctx.settings;
    // The supply: `--ops` leases, or as many as can be granted in one window's time.
    let supply = match s.ops {
        Some(n) => grant_many(ctx, usize::try_from(n).unwrap_or(usize::MAX)).await?,
        None => {
            let window = Window::open(s, "lease-revoke (granting its supply)", "grants")?;
            let (tally, workers) = closed_loop(granters(ctx), &window).await;
            window.close()?;
            if tally.errors > 0 {
                return Err(Error::Settings(format!(
                    "granting the leases to revoke failed: {}",
                    tally.error_samples.join("; ")
                )));
            }
            workers.into_iter().flat_map(|w| w.granted).collect()
        }
    };
    let granted = supply.len();
    let supply = Arc::new(Mutex::new(supply));
    let workers: Vec<Revoker> = (0..s.in_flight)
        .map(|w| Revoker {
            lease: ctx.client(w).lease(),
            supply: supply.clone(),
            revoked: Vec::new(),
        })
        .collect();
    let window = Window::open(s, ctx.workload.name(), ctx.workload.unit())?;
    let (tally, workers) = closed_loop(workers, &window).await;
    let usage = window.close()?;
    let mut m = Measured::of_loop(tally, usage);
    m.detail("supply", granted as f64);
    let revoked: HashSet<i64> = workers
        .iter()
        .flat_map(|w| w.revoked.iter().copied())
        .collect();
    let live = ctx
        .client(0)
        .lease()
        .leases()
        .await
        .during("list the leases")?;
    let still: Vec<i64> = live.into_iter().filter(|id| revoked.contains(id)).collect();
    if !still.is_empty() {
        m.fail(format!(
            "{} revoked leases are still listed, e.g. {:#x}",
            still.len(),
            still[0]
        ));
    }
    let left = std::mem::take(&mut *supply.lock().unwrap_or_else(|e| e.into_inner()));
    revoke_all(ctx, &left).await?;
    Ok(m)
}
