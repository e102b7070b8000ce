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
//!
//! # Why it stays off
//! The slot off meets more of the benchmark targets than the slot on: linearizable gets,
//! concurrent puts and CAS against etcd 3.5.1 need it, while a lone writer's p99 stays near
//! etcd's either way (2026-11-27, `kv-bench compare` against etcd 3.4: 1.37 vs 1.60 ms with
//! the slot off). A scheduler trace of a lone writer (`perf record -e sched:*`) shows where
//! its time goes: each hop between the two workers and the WAL sync thread is a wake-up that
//! costs 25-40 µs of context switching on this kind of VM, and with the slot off tokio wakes
//! the idle worker at more of them.
//!
//! Getting both by keeping the slot and making each connection wait before its first write
//! until its worker had run the other ready tasks (a yield through tokio's deferred wake-ups)
//! did batch the writes (7k instead of 30k `writev` in 3 s of puts) but not the CPU: 64-76 µs
//! per put against 52-58 with the slot off, so the slot's cost under load is more than the
//! unbatched writes, and the experiment was dropped. (What did leave reads and watch
//! responses one `write` each, with the slot on or off, was `h2` writing out every DATA frame
//! of 256 bytes or more before buffering the next; [`kv_client::coalesce`] deals with that.)
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
