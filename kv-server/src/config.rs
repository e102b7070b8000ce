//! Command-line flags, named and defaulted as etcd's so etcd users need nothing new; each can
//! also come from the environment variable etcd uses (`ETCD_NAME`, `ETCD_DATA_DIR`, ...).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd's default `--quota-backend-bytes` (2 GiB).
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// gRPC framing head-room above `--max-request-bytes`, as etcd allows (512 KiB).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The flags of `kv-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kv-server",
    version,
    about = "An etcd-v3-compatible replicated key-value store"
)]
pub struct Flags {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ./<name>.kv).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic (comma-separated).
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client_urls: String,
    /// Client URLs this member advertises to the rest of the cluster and to clients.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub advertise_client_urls: String,
    /// URLs to listen on for peer traffic (comma-separated).
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    pub listen_peer_urls: String,
    /// Peer URLs this member advertises to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping: name=peer-url,...
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state: `new` or `existing`.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: ClusterState,
    /// Seeds a new member's data dir from a snapshot (`kvctl snapshot save`, or a Snapshot
    /// RPC's download) before it starts, as etcd's `snapshot restore` does: the keyspace with
    /// its revisions, leases, users and roles come from the snapshot; members, alarms and the
    /// Raft log start afresh. Every member of the new cluster is started with the same file;
    /// the data dir must not exist yet.
    #[arg(long, env = "KV_RESTORE_FROM")]
    pub restore_from: Option<PathBuf>,
    /// Initial cluster token, which makes cluster and member ids unique per cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Raise the NOSPACE alarm and refuse writes once the backend exceeds this many bytes
    /// (0 means the default, 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,
    /// Maximum client request size in bytes.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Maximum number of operations permitted in one transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = kv_core::validation::DEFAULT_MAX_TXN_OPS)]
    pub max_txn_ops: usize,
    /// Auto-compaction mode: `periodic` or `revision`.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: CompactionMode,
    /// Auto-compaction retention: a duration (`1h`, `30m`, or a bare number of hours) for
    /// `periodic`, a revision count for `revision`; 0 disables auto-compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Applied log entries between two snapshots (the log is purged behind a snapshot).
    /// etcd's default: a snapshot serializes the whole store, which at a million keys took
    /// over a second every 10,000 writes.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to time out.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// How often a watcher that asked for `progress_notify` hears the current revision when
    /// nothing else was sent to it (a duration such as `10m` or `5s`).
    #[arg(
        long = "experimental-watch-progress-notify-interval",
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m"
    )]
    pub watch_progress_notify_interval: String,
    /// Path to the client server TLS certificate (PEM), served on `https://` client URLs.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Path to the client server TLS key (PEM).
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Path to the CA (PEM) that client certificates must be signed by; setting it makes
    /// `https://` client URLs require a client certificate, as in etcd.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require client certificates on `https://` client URLs, and take a certificate's common
    /// name as the user of a request without a token (when auth is on).
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value_t = false)]
    pub client_cert_auth: bool,
    /// Path to the peer TLS certificate (PEM): served on `https://` peer URLs and presented to
    /// other members.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Path to the peer TLS key (PEM).
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// Path to the CA (PEM) that signs the members' peer certificates: used to verify the
    /// members this one dials and, when set, required of the members dialing it.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Require members dialing this one to present a peer certificate signed by
    /// `--peer-trusted-ca-file`.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value_t = false)]
    pub peer_client_cert_auth: bool,
    /// Auth token kind; only etcd's default, `simple`, is supported (anything else is
    /// refused at start rather than silently ignored).
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Seconds an auth token stays valid after its last use.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = crate::auth::DEFAULT_TOKEN_TTL_SECS)]
    pub auth_token_ttl: u64,
    /// Log level: debug, info, warn, error.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: `text` (one readable line per event) or `json` (one JSON object per line,
    /// with `level`, `ts`, `msg` and the event's fields, for log shippers).
    #[arg(long, env = "KV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterState {
    /// Bootstrap a new cluster.
    New,
    /// Join an existing cluster.
    Existing,
}

/// `--auto-compaction-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompactionMode {
    /// Keep a time window of history.
    Periodic,
    /// Keep a number of revisions of history.
    Revision,
}

/// What auto-compaction should keep, parsed from the mode and retention flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Auto-compaction off.
    Off,
    /// Keep this much wall-clock history.
    Period(Duration),
    /// Keep this many revisions.
    Revisions(i64),
}

/// A flag value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct FlagError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn flag_error(flag: &'static str, reason: impl Into<String>) -> FlagError {
    FlagError {
        flag,
        reason: reason.into(),
    }
}

/// A URL to listen on: the address, and whether it serves TLS (`https://`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenUrl {
    /// The address.
    pub addr: SocketAddr,
    /// True for `https://`.
    pub tls: bool,
}

/// Parses an `http://host:port` URL into a socket address. Host names other than `localhost`
/// are not resolved: listen URLs name addresses, as etcd requires.
pub fn parse_url(flag: &'static str, url: &str) -> Result<SocketAddr, FlagError> {
    parse_listen_url(flag, url).map(|u| u.addr)
}

/// Parses an `http://host:port` or `https://host:port` URL.
pub fn parse_listen_url(flag: &'static str, url: &str) -> Result<ListenUrl, FlagError> {
    let url = url.trim();
    let (rest, tls) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, true)
    } else {
        return Err(flag_error(
            flag,
            format!("{url}: expected http://host:port or https://host:port"),
        ));
    };
    let rest = rest.trim_end_matches('/');
    let rest = match rest.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => rest.to_string(),
    };
    let addr = rest
        .parse()
        .map_err(|e| flag_error(flag, format!("{url}: {e}")))?;
    Ok(ListenUrl { addr, tls })
}

/// Splits a comma-separated URL list.
pub fn url_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Flags {
    /// Flags for a single member kept in `data_dir` that listens on loopback ports the OS
    /// picks (read them from [`crate::server::Running::client_addrs`]): a server embedded in a
    /// test, a doctest or an application, with every other flag at its default.
    pub fn local(data_dir: &std::path::Path) -> Result<Flags, FlagError> {
        let any_port = "http://127.0.0.1:0";
        let args = [
            "kv-server".as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
            "--listen-client-urls".as_ref(),
            any_port.as_ref(),
            "--advertise-client-urls".as_ref(),
            any_port.as_ref(),
            "--listen-peer-urls".as_ref(),
            any_port.as_ref(),
            "--initial-advertise-peer-urls".as_ref(),
            any_port.as_ref(),
        ];
        Flags::try_parse_from::<_, &std::ffi::OsStr>(args)
            .map_err(|e| flag_error("local", e.to_string()))
    }

    /// The data dir, defaulting to `./<name>.kv` as etcd defaults to `./<name>.etcd`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.kv", self.name)))
    }

    /// The effective backend quota.
    pub fn quota_bytes(&self) -> u64 {
        if self.quota_backend_bytes == 0 {
            DEFAULT_QUOTA_BACKEND_BYTES
        } else {
            self.quota_backend_bytes
        }
    }

    /// Client listen URLs.
    pub fn client_addrs(&self) -> Result<Vec<ListenUrl>, FlagError> {
        let urls = url_list(&self.listen_client_urls);
        if urls.is_empty() {
            return Err(flag_error("listen-client-urls", "no URL given"));
        }
        urls.iter()
            .map(|u| parse_listen_url("listen-client-urls", u))
            .collect()
    }

    /// Peer listen URLs.
    pub fn peer_addrs(&self) -> Result<Vec<ListenUrl>, FlagError> {
        let urls = url_list(&self.listen_peer_urls);
        if urls.is_empty() {
            return Err(flag_error("listen-peer-urls", "no URL given"));
        }
        urls.iter()
            .map(|u| parse_listen_url("listen-peer-urls", u))
            .collect()
    }

    /// The initial cluster as (name, peer URL) pairs, defaulting to this member alone.
    pub fn initial_cluster(&self) -> Result<Vec<(String, String)>, FlagError> {
        let Some(spec) = &self.initial_cluster else {
            let url = url_list(&self.initial_advertise_peer_urls)
                .into_iter()
                .next()
                .ok_or_else(|| flag_error("initial-advertise-peer-urls", "no URL given"))?;
            return Ok(vec![(self.name.clone(), url)]);
        };
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part.split_once('=').ok_or_else(|| {
                flag_error("initial-cluster", format!("{part}: expected name=url"))
            })?;
            parse_url("initial-cluster", url)?;
            out.push((name.to_string(), url.to_string()));
        }
        if !out.iter().any(|(n, _)| n == &self.name) {
            return Err(flag_error(
                "initial-cluster",
                format!("it has no member named {:?} (--name)", self.name),
            ));
        }
        Ok(out)
    }

    /// How long an auth token lives after its last use (`--auth-token`, `--auth-token-ttl`).
    pub fn token_ttl(&self) -> Result<Duration, FlagError> {
        if self.auth_token != "simple" {
            return Err(flag_error(
                "auth-token",
                format!(
                    "unsupported token kind {:?}: only \"simple\" is available",
                    self.auth_token
                ),
            ));
        }
        if self.auth_token_ttl == 0 {
            return Err(flag_error("auth-token-ttl", "must be at least 1 second"));
        }
        Ok(Duration::from_secs(self.auth_token_ttl))
    }

    /// Raft timing and snapshot settings.
    pub fn raft_timing(&self) -> Result<crate::raft::RaftTiming, FlagError> {
        if self.heartbeat_interval == 0 {
            return Err(flag_error("heartbeat-interval", "must be positive"));
        }
        // etcd's rule: the election timeout must be at least five heartbeats.
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(flag_error(
                "election-timeout",
                format!(
                    "{} ms is less than 5 * --heartbeat-interval ({} ms)",
                    self.election_timeout, self.heartbeat_interval
                ),
            ));
        }
        if self.snapshot_count == 0 {
            return Err(flag_error("snapshot-count", "must be positive"));
        }
        Ok(crate::raft::RaftTiming {
            heartbeat_ms: self.heartbeat_interval,
            election_timeout_ms: self.election_timeout,
            snapshot_count: self.snapshot_count,
        })
    }

    /// `--experimental-watch-progress-notify-interval` as a duration.
    pub fn watch_progress_interval(&self) -> Result<Duration, FlagError> {
        let v = self.watch_progress_notify_interval.trim();
        match parse_duration(v) {
            Some(d) if !d.is_zero() && v.parse::<f64>().is_err() => Ok(d),
            _ => Err(flag_error(
                "experimental-watch-progress-notify-interval",
                format!("{v}: expected a positive duration like 10m or 5s"),
            )),
        }
    }

    /// What auto-compaction keeps.
    pub fn retention(&self) -> Result<Retention, FlagError> {
        let v = self.auto_compaction_retention.trim();
        let flag = "auto-compaction-retention";
        match self.auto_compaction_mode {
            CompactionMode::Revision => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| flag_error(flag, format!("{v}: expected a revision count")))?;
                Ok(if n <= 0 {
                    Retention::Off
                } else {
                    Retention::Revisions(n)
                })
            }
            CompactionMode::Periodic => {
                let d = parse_duration(v).ok_or_else(|| {
                    flag_error(flag, format!("{v}: expected hours or a duration like 30m"))
                })?;
                Ok(if d.is_zero() {
                    Retention::Off
                } else {
                    Retention::Period(d)
                })
            }
        }
    }
}

/// Parses `1h`, `30m`, `45s`, `1h30m`, or a bare number of hours (etcd's convention).
fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(hours) = v.parse::<f64>() {
        return (hours >= 0.0 && hours.is_finite())
            .then(|| Duration::from_secs_f64(hours * 3600.0));
    }
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => return None,
            }
        };
        let n: f64 = num.parse().ok()?;
        num.clear();
        total += Duration::from_secs_f64(n * unit);
    }
    num.is_empty().then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["kv-server"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    #[test]
    fn local_flags_use_the_dir_and_os_chosen_loopback_ports() {
        let f = Flags::local(std::path::Path::new("/tmp/some dir")).unwrap();
        assert_eq!(f.data_dir(), PathBuf::from("/tmp/some dir"));
        let any = ListenUrl {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: false,
        };
        assert_eq!(f.client_addrs().unwrap(), vec![any]);
        assert_eq!(f.peer_addrs().unwrap(), vec![any]);
        assert_eq!(f.initial_cluster().unwrap().len(), 1);
    }

    #[test]
    fn defaults_match_etcd() {
        let f = flags(&[]);
        assert_eq!(f.name, "default");
        assert_eq!(f.data_dir(), PathBuf::from("default.kv"));
        assert_eq!(
            f.client_addrs().unwrap(),
            vec![ListenUrl {
                addr: "127.0.0.1:2379".parse().unwrap(),
                tls: false
            }]
        );
        assert_eq!(f.max_request_bytes, 1572864);
        assert_eq!(f.max_txn_ops, 128);
        assert_eq!(f.quota_bytes(), 2 << 30);
        assert_eq!(f.retention().unwrap(), Retention::Off);
        assert_eq!(
            f.initial_cluster().unwrap(),
            vec![("default".into(), "http://127.0.0.1:2380".into())]
        );
    }

    #[test]
    fn watch_progress_interval_is_a_go_duration() {
        assert_eq!(
            flags(&[]).watch_progress_interval().unwrap(),
            Duration::from_secs(600)
        );
        let f = flags(&["--experimental-watch-progress-notify-interval", "250ms"]);
        assert_eq!(
            f.watch_progress_interval().unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["0s", "5", "soon"] {
            let f = flags(&["--experimental-watch-progress-notify-interval", bad]);
            assert!(f.watch_progress_interval().is_err(), "{bad}");
        }
    }

    #[test]
    fn retention_and_urls() {
        let f = flags(&["--auto-compaction-retention", "1h30m"]);
        assert_eq!(
            f.retention().unwrap(),
            Retention::Period(Duration::from_secs(5400))
        );
        let f = flags(&["--auto-compaction-retention", "2"]);
        assert_eq!(
            f.retention().unwrap(),
            Retention::Period(Duration::from_secs(7200))
        );
        let f = flags(&[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "100",
        ]);
        assert_eq!(f.retention().unwrap(), Retention::Revisions(100));
        assert!(
            flags(&["--auto-compaction-retention", "soon"])
                .retention()
                .is_err()
        );
        assert!(parse_listen_url("x", "https://127.0.0.1:1").unwrap().tls);
        assert!(!parse_listen_url("x", "http://127.0.0.1:1").unwrap().tls);
        assert!(parse_url("x", "unixs://127.0.0.1:1").is_err());
        assert!(parse_url("x", "127.0.0.1:1").is_err());
        assert_eq!(
            parse_url("x", "http://localhost:23").unwrap(),
            "127.0.0.1:23".parse().unwrap()
        );
        let f = flags(&["--name", "a", "--initial-cluster", "b=http://127.0.0.1:1"]);
        assert!(f.initial_cluster().is_err());
    }
}
