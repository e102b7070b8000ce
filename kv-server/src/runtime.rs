//! The server's tokio runtime: multi-threaded, with tokio's LIFO slot turned off.
//!
//! # Why the LIFO slot is off
//! tokio runs the task that the running task woke last next, ahead of everything queued (the
//! "LIFO slot"), which suits a chain of hand-offs. It does not suit a gRPC server. When an
//! apply batch or a burst of reads completes, each request task hands its response to its
//! connection's task and wakes it; from the LIFO slot that connection task then ran before the
//! next request task did, so it wrote every response with a `writev` of its own (24k `writev`/s
//! at 29k puts/s). With the slot off, woken tasks run in the order they were woken: the
//! request tasks of a batch first, then the connection task, which writes their responses
//! together (5k `writev`/s at 32k puts/s). Measured side by side (`kv-bench run`, 2 rounds):
//! server CPU per put 35 → 28 µs, per linearizable get 17 → 11 µs, per serializable get
//! 12 → 10 µs, per lease grant 33 → 26 µs.
//!
//! # What it costs
//! With the slot off, tokio notifies a parked worker every time a task is queued, not only
//! when the slot overflows. A lone request is a chain of such wake-ups (gRPC task, Raft core,
//! WAL sync thread, apply, connection), and each now unparks the other worker: one client
//! writing one key after another got about 80 µs slower per write (p50 0.40-0.45 → 0.49-0.50
//! ms, server CPU per write 249-289 → 328-331 µs), and keep-alives cost a little more CPU.
//! Whether the throughput is worth that latency is still open.
//!
//! # Why a cfg
//! tokio offers `disable_lifo_slot` only when built with `--cfg tokio_unstable`, which the
//! workspace's `.cargo/config.toml` sets. A build without it (`RUSTFLAGS` in the environment
//! replaces the config's flags) keeps tokio's default order; [`LIFO_SLOT_DISABLED`] says which
//! one a binary has, and the server logs it at startup.

/// Whether this build runs woken tasks in order (true) or with tokio's LIFO slot (false).
pub const LIFO_SLOT_DISABLED: bool = cfg!(tokio_unstable);

/// The server's runtime builder: one worker per CPU, I/O and timers on, LIFO slot off where
/// the build allows it.
pub fn builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Tasks spawned (woken) one after another by a running task run in that order. With
    /// tokio's LIFO slot the last one would run first.
    #[test]
    fn woken_tasks_run_in_the_order_they_were_woken() {
        let rt = builder().worker_threads(1).build().unwrap();
        let order = rt.block_on(async {
            // Spawned so that the spawning below happens on a worker, where the slot applies.
            tokio::spawn(async {
                let order = Arc::new(Mutex::new(Vec::new()));
                let tasks: Vec<_> = (0..3)
                    .map(|i| {
                        let order = order.clone();
                        tokio::spawn(async move { order.lock().unwrap().push(i) })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                Arc::try_unwrap(order).unwrap().into_inner().unwrap()
            })
            .await
            .unwrap()
        });
        assert_eq!(
            order,
            vec![0, 1, 2],
            "the LIFO slot is on (LIFO_SLOT_DISABLED = {LIFO_SLOT_DISABLED})"
        );
    }
}
