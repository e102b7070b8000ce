//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Operate a kv-server (or etcd) cluster: recipes' state, cluster status, snapshots.
#[derive(Debug, Parser)]
#[command(name = "kvctl", version)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Connection and output flags.
#[derive(Debug, Args)]
pub struct Global {
    /// Client endpoints, comma-separated `host:port` (or URLs).
    #[arg(
        long,
        global = true,
        env = "ETCDCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// `name:password` to authenticate as.
    #[arg(long, global = true, env = "ETCDCTL_USER")]
    pub user: Option<String>,
    /// CA bundle to verify the members' certificates (turns on TLS).
    #[arg(long, global = true, env = "ETCDCTL_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (with --key) for members that require one.
    #[arg(long, global = true, env = "ETCDCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, global = true, env = "ETCDCTL_KEY")]
    pub key: Option<PathBuf>,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Keys read at most when looking for recipes.
    #[arg(long, global = true, default_value_t = 100_000)]
    pub max_keys: usize,
    /// How long to wait for a member to answer when connecting.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "5s")]
    pub dial_timeout: Duration,
}

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON (one document; one object per line for streams).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Members, leader, Raft progress and sizes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Locks and who holds them.
    #[command(subcommand)]
    Lock(LockCommand),
    /// Elections and who leads them.
    #[command(subcommand)]
    Election(ElectionCommand),
    /// Work queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Registered services.
    #[command(subcommand)]
    Services(ServicesCommand),
    /// Snapshots of the whole state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `kvctl cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// One row per member: leader, term, Raft index and lag, revision, db size, errors.
    Status,
}

/// `kvctl lock`.
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Every lock held, its holder (with fencing token) and its waiters.
    List {
        /// Look only under this key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

/// `kvctl election`.
#[derive(Debug, Subcommand)]
pub enum ElectionCommand {
    /// Every election with a leader, the leader's value and the other candidates.
    List {
        /// Look only under this key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Prints the election's leader, then every change, until interrupted.
    Observe {
        /// The election's name.
        name: String,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<usize>,
    },
}

/// `kvctl queue`.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Depth by state (ready, delayed, claimed, dead) of one queue, or of every queue found.
    Stats {
        /// The queue's name (every queue found when left out).
        name: Option<String>,
        /// With no name: look only under this key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// The next items in delivery order, without claiming them.
    Peek {
        /// The queue's name.
        name: String,
        /// How many items.
        #[arg(long, short = 'n', default_value_t = 10)]
        limit: usize,
    },
    /// The items given up on after too many deliveries.
    DeadLetter {
        /// The queue's name.
        name: String,
    },
}

/// `kvctl services`.
#[derive(Debug, Subcommand)]
pub enum ServicesCommand {
    /// Registered instances of one service, or of every service found.
    List {
        /// The service's name (every service found when left out).
        name: Option<String>,
        /// With no name: look only under this key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Prints a service's instances, then every change, until interrupted.
    Watch {
        /// The service's name.
        name: String,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<usize>,
    },
}

/// `kvctl snapshot`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Downloads a snapshot of a member's state to FILE (checked, then renamed into place);
    /// `kv-server --restore-from FILE` seeds a new cluster from it.
    Save {
        /// Where to write it.
        file: PathBuf,
    },
}

/// `5s`, `500ms`, `2m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?} (use e.g. 5s, 500ms, 2m)");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn flags_parse() {
        Cli::command_for_tests();
        let cli = Cli::parse_from(["kvctl", "-o", "json", "queue", "peek", "jobs", "-n", "3"]);
        assert_eq!(cli.global.output, Output::Json);
        assert!(matches!(
            cli.command,
            Command::Queue(QueueCommand::Peek { ref name, limit: 3 }) if name == "jobs"
        ));
    }

    impl Cli {
        fn command_for_tests() {
            <Cli as clap::CommandFactory>::command().debug_assert();
        }
    }
}
