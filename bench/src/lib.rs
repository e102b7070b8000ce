//! kv-bench: benchmarks any etcd-v3 endpoint (kv-server or etcd) through kv-client, and
//! compares kv-server with etcd run for run.
//!
//! A run connects `--connections` clients and runs each chosen [`Workload`] in turn under a
//! key prefix of its own: setup writes first (not timed), then a timed window of closed-loop
//! requests (`--in-flight` in total, spread over the clients), then checks of what the server
//! answered and cleanup (not timed). Each workload yields a [`WorkloadResult`]: rate,
//! latency percentiles, errors, and with the server's PIDs its CPU time per operation and its
//! RSS. A workload whose checks fail (a wrong value, a missed or repeated watch event) is
//! marked failed, so a server that answers wrongly cannot look fast.
//!
//! ```no_run
//! # async fn example() -> Result<(), kv_bench::Error> {
//! use kv_bench::{Settings, Workload};
//!
//! let settings = Settings {
//!     endpoints: vec!["127.0.0.1:2379".into()],
//!     ops: Some(500),
//!     ..Settings::default()
//! };
//! let report = kv_bench::run(&settings, &[Workload::Put, Workload::Cas]).await?;
//! for r in &report.results {
//!     println!("{}: {:.0} {}/s, p99 {:.2} ms", r.workload, r.ops_per_sec, r.unit, r.latency_ms.p99);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`compare`] starts kv-server and etcd fresh for each round, alternating which goes first,
//! and prints per workload the median rate of each, their ratio and their CPU per operation.
//! This machine's speed varies from minute to minute: compare ratios within one comparison,
//! not absolute figures across runs.

mod compare;
mod error;
mod load;
mod meter;
mod report;
mod run;
mod server;
mod settings;
mod stats;
mod workload;

pub use compare::{CompareOptions, compare};
pub use error::Error;
pub use report::{Latency, WorkloadResult, write_json};
pub use run::{RunReport, run};
pub use server::{Launcher, ServerKind};
pub use settings::{MIN_VALUE_SIZE, Settings, parse_duration};
pub use workload::Workload;
