//! `kv-bench`: measures an etcd-v3 server (kv-server or etcd) through kv-client, and compares
//! kv-server with etcd run for run, so that performance work has numbers to go by.
//!
//! ```text
//! # Every workload against a running server; with its PID, server CPU per op and RSS too:
//! cargo run --release -p kv-bench -- run --endpoints 127.0.0.1:2379 --server-pid 12345 --json out.json
//! # Some workloads, smaller and shorter:
//! kv-bench run --workloads put,get,cas --duration 1s --in-flight 16
//! # kv-server against etcd, both started fresh each round (build kv-server first):
//! cargo build --release -p kv-bench -p kv-server
//! target/release/kv-bench compare --rounds 3 --duration 3s [--members 3] [--etcd PATH]
//! # ...and the memory targets (RSS with 1M keys, with 100,000 watchers), each on a fresh server:
//! target/release/kv-bench compare --rounds 1 --memory
//! ```
//!
//! Workloads (`--workloads all` or a comma-separated list): put-seq, put, get,
//! get-serializable, cas, watch-fanout, watch-distinct, lease-grant, lease-keepalive,
//! lease-revoke, range. Each prints a progress line a second on stderr and one result line on
//! stdout: rate, latency p50/p90/p99/max, errors, and server CPU µs/op and RSS when the server's
//! PIDs are given. `--json` writes the results as an array of objects (see `report.rs` for the
//! fields). The exit status is 1 if a workload could not run or failed its checks.
//!
//! The machine this was written on is noisy: compare ratios from one `compare`, never absolute
//! figures across runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kv_bench::{CompareOptions, Launcher, Settings, Workload, parse_duration};

#[derive(Debug, Parser)]
#[command(
    name = "kv-bench",
    version,
    about = "Benchmarks an etcd-v3 server through kv-client; compares kv-server with etcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs workloads against a running server.
    Run(RunArgs),
    /// Starts kv-server and etcd fresh each round, runs the workloads on both, compares.
    Compare(CompareArgs),
}

/// The load and the workload sizes, shared by both commands.
#[derive(Debug, Args)]
struct Load {
    /// Workloads to run: `all`, or names separated by commas.
    #[arg(long, default_value = "all")]
    workloads: String,
    /// Clients (connections) the requests are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight in total.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Bytes per value written.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Timed window of each workload (`3s`, `500ms`, `1m`).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop each workload after N operations instead of after --duration (smoke runs).
    #[arg(long)]
    ops: Option<u64>,
    /// Keys the put and get workloads cycle over.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Keys the cas workload contends on.
    #[arg(long, default_value_t = 16)]
    hot_keys: usize,
    /// Watchers of the watch workloads.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Writers of watch-distinct.
    #[arg(long, default_value_t = 16)]
    watch_writers: usize,
    /// Leases lease-keepalive renews.
    #[arg(long, default_value_t = 1000)]
    leases: usize,
    /// Keys under the prefix range reads whole.
    #[arg(long, default_value_t = 10_000)]
    range_keys: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl Load {
    fn settings(&self, endpoints: Vec<String>, server_pids: Vec<u32>) -> Settings {
        Settings {
            endpoints,
            connections: self.connections,
            in_flight: self.in_flight,
            value_size: self.value_size,
            duration: self.duration,
            ops: self.ops,
            server_pids,
            keys: self.keys,
            hot_keys: self.hot_keys,
            watchers: self.watchers,
            watch_writers: self.watch_writers,
            leases: self.leases,
            range_keys: self.range_keys,
            quiet: self.quiet,
            keep_keys: false,
            credentials: None,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Client endpoints of the server's members, `host:port` separated by commas.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// PIDs of the server's members (commas): their CPU per operation and RSS are reported.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Write the results to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `name:password` of a user to run as, for a server with auth on.
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    load: Load,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Rounds; each starts both servers afresh, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Members per cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=7))]
    members: u8,
    /// The etcd binary (default: `etcd` on PATH; skipped with a reason when absent).
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// The kv-server binary (default: the one next to this executable).
    #[arg(long)]
    kv_server: Option<PathBuf>,
    /// Write every result (server, round and result fields) to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also measure memory each round, each probe on a fresh deployment: RSS with a million
    /// keys written once each (put, --keys 1000000 --ops 1000000) and with 100,000 one-key
    /// watchers (watch-distinct --watchers 100000). Adds several minutes per round.
    #[arg(long)]
    memory: bool,
    #[command(flatten)]
    load: Load,
}

async fn run(args: RunArgs) -> Result<bool, kv_bench::Error> {
    let workloads = Workload::parse_list(&args.load.workloads)?;
    let mut settings = args.load.settings(args.endpoints, args.server_pid);
    if let Some(user) = &args.user {
        let (user, password) = user
            .split_once(':')
            .ok_or_else(|| kv_bench::Error::Settings("--user takes name:password".to_string()))?;
        settings.credentials = Some(kv_client::Credentials {
            user: user.to_string(),
            password: password.to_string(),
        });
    }
    let report = kv_bench::run(&settings, &workloads).await?;
    if let Some(path) = &args.json {
        kv_bench::write_json(path, &report.results)?;
    }
    Ok(report.passed())
}

async fn compare(args: CompareArgs) -> Result<bool, kv_bench::Error> {
    let workloads = Workload::parse_list(&args.load.workloads)?;
    let settings = args.load.settings(Vec::new(), Vec::new());
    let options = CompareOptions {
        rounds: args.rounds,
        members: usize::from(args.members),
        workloads,
        settings,
        launcher: Launcher::find(args.kv_server, args.etcd)?,
        json: args.json,
        memory: args.memory,
    };
    kv_bench::compare(&options).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kv-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let work = async {
            match cli.command {
                Command::Run(args) => run(args).await,
                Command::Compare(args) => compare(args).await,
            }
        };
        // On Ctrl-C the work is dropped, which stops the servers `compare` started.
        tokio::select! {
            outcome = work => Some(outcome),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match outcome {
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => {
            eprintln!("kv-bench: some workloads failed (see FAILED / ABORTED above)");
            ExitCode::FAILURE
        }
        Some(Err(e)) => {
            eprintln!("kv-bench: {e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("kv-bench: interrupted");
            ExitCode::from(130)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_become_settings() {
        let cli = Cli::try_parse_from([
            "kv-bench",
            "run",
            "--endpoints",
            "127.0.0.1:1,127.0.0.1:2",
            "--server-pid",
            "10,11",
            "--duration",
            "500ms",
            "--ops",
            "300",
            "--workloads",
            "put,range",
        ])
        .expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("not run: {cli:?}");
        };
        let s = args.load.settings(args.endpoints, args.server_pid);
        assert_eq!(s.endpoints, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(s.server_pids, [10, 11]);
        assert_eq!(s.duration, Duration::from_millis(500));
        assert_eq!(s.ops, Some(300));
        // Everything not given is the reference setup.
        assert_eq!(
            (s.connections, s.in_flight, s.value_size),
            (
                Settings::default().connections,
                Settings::default().in_flight,
                Settings::default().value_size
            )
        );
        assert_eq!(
            Workload::parse_list(&args.load.workloads).ok(),
            Some(vec![Workload::Put, Workload::Range])
        );
    }

    #[test]
    fn compare_defaults_to_three_rounds_of_one_member() {
        let cli = Cli::try_parse_from(["kv-bench", "compare"]).expect("parses");
        let Command::Compare(args) = cli.command else {
            panic!("not compare: {cli:?}");
        };
        assert_eq!((args.rounds, args.members), (3, 1));
        assert!(!args.memory);
        let cli = Cli::try_parse_from(["kv-bench", "compare", "--memory"]).expect("parses");
        let Command::Compare(args) = cli.command else {
            panic!("not compare: {cli:?}");
        };
        assert!(args.memory);
        assert_eq!(args.load.duration, Duration::from_secs(3));
        assert!(Cli::try_parse_from(["kv-bench", "compare", "--members", "0"]).is_err());
    }
}
