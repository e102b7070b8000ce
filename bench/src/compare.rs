//! The comparison: kv-server and etcd, each started fresh for every round, take turns (the
//! one that went first goes second in the next round, so that drift of a noisy machine
//! falls on both), and a table gives per workload the median rate of each, their ratio, and
//! the median latency and server CPU per operation of each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::Error;
use crate::report::{WorkloadResult, cpu_us, write_json};
use crate::run::run;
use crate::server::{Deployment, Launcher, ServerKind};
use crate::settings::Settings;
use crate::stats::median;
use crate::workload::Workload;

/// What to compare, and how.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Rounds; each starts both servers afresh.
    pub rounds: usize,
    /// Members per cluster (1 or 3).
    pub members: usize,
    /// The workloads of every round.
    pub workloads: Vec<Workload>,
    /// The run settings; endpoints and server PIDs are those of each fresh deployment.
    pub settings: Settings,
    /// Where the binaries are.
    pub launcher: Launcher,
    /// Where to write every result as JSON.
    pub json: Option<PathBuf>,
    /// Also measure memory each round ([`memory_probes`]), each probe on a fresh deployment.
    pub memory: bool,
}

/// The memory targets' workloads: a million keys written once each, and a hundred thousand
/// watchers of one key each. Their figure is the servers' RSS at the end of the window. Each
/// runs on a deployment of its own that is stopped afterwards, so its keys are left in place.
fn memory_probes(base: &Settings) -> Vec<(&'static str, Workload, Settings)> {
    vec![
        (
            "1M keys (put)",
            Workload::Put,
            Settings {
                keys: 1_000_000,
                ops: Some(1_000_000),
                keep_keys: true,
                ..base.clone()
            },
        ),
        (
            "100k watchers",
            Workload::WatchDistinct,
            Settings {
                watchers: 100_000,
                keep_keys: true,
                ..base.clone()
            },
        ),
    ]
}

/// One result of a comparison, in its JSON.
#[derive(Debug, Clone, Serialize)]
struct Entry {
    server: &'static str,
    round: usize,
    members: usize,
    #[serde(flatten)]
    result: WorkloadResult,
}

/// Every result of one server for one workload, over the rounds.
#[derive(Default)]
struct Runs {
    /// The runs that passed their checks.
    results: Vec<WorkloadResult>,
    /// Rounds in which the workload could not run, or failed its checks.
    failed: usize,
}

impl Runs {
    fn median(&self, figure: impl Fn(&WorkloadResult) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.results.iter().filter_map(figure).collect();
        median(&values)
    }
}

/// Runs the comparison, printing each result line and then the table on stdout (progress on
/// stderr). True when every workload ran and passed its checks on every server.
pub async fn compare(options: &CompareOptions) -> Result<bool, Error> {
    if options.rounds == 0 || options.members == 0 {
        return Err(Error::Settings(
            "--rounds and --members must be at least 1".into(),
        ));
    }
    let mut kinds = vec![ServerKind::KvServer];
    match options.launcher.binary(ServerKind::Etcd) {
        Ok(_) => kinds.push(ServerKind::Etcd),
        Err(why) => println!("etcd skipped: {why}"),
    }
    let mut runs: BTreeMap<(usize, Workload), Runs> = BTreeMap::new();
    // RSS in KiB per (server, probe), over the rounds; `None` where a probe failed.
    let mut memory: BTreeMap<(usize, &'static str), Vec<Option<u64>>> = BTreeMap::new();
    let mut entries = Vec::new();
    for round in 1..=options.rounds {
        let mut order = kinds.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for kind in order {
            let binary = options
                .launcher
                .binary(kind)
                .map_err(Error::Process)?
                .to_path_buf();
            let members = options.members;
            println!(
                "== round {round}/{}: {} ({members} member{}) ==",
                options.rounds,
                kind.name(),
                if members == 1 { "" } else { "s" }
            );
            let report = run_fresh(
                kind,
                &binary,
                members,
                &options.settings,
                &options.workloads,
            )
            .await?;
            let k = kinds.iter().position(|&x| x == kind).unwrap_or(0);
            if options.memory {
                for (label, workload, settings) in memory_probes(&options.settings) {
                    println!("-- memory: {label}");
                    let probe = run_fresh(kind, &binary, members, &settings, &[workload]).await?;
                    let rss = probe
                        .results
                        .iter()
                        .find(|r| r.passed)
                        .and_then(|r| r.server_rss_kib);
                    memory.entry((k, label)).or_default().push(rss);
                    entries.extend(probe.results.into_iter().map(|result| Entry {
                        server: kind.name(),
                        round,
                        members,
                        result,
                    }));
                }
            }
            for r in report.results {
                let workload: Workload = r.workload.parse()?;
                let slot = runs.entry((k, workload)).or_default();
                entries.push(Entry {
                    server: kind.name(),
                    round,
                    members,
                    result: r.clone(),
                });
                // A run whose answers were wrong does not count towards the medians.
                if r.passed {
                    slot.results.push(r);
                } else {
                    slot.failed += 1;
                }
            }
            for (workload, _) in report.aborted {
                runs.entry((k, workload)).or_default().failed += 1;
            }
        }
    }
    println!();
    print!("{}", table(options, &kinds, &runs));
    if options.memory {
        print!("{}", memory_table(&kinds, &memory));
    }
    if let Some(path) = &options.json {
        write_json(path, &entries)?;
    }
    Ok(runs.values().all(|r| r.failed == 0) && memory.values().flatten().all(|rss| rss.is_some()))
}

/// Starts `kind` fresh, runs `workloads` with `settings` against it, and stops it (removing
/// its data) before returning.
async fn run_fresh(
    kind: ServerKind,
    binary: &std::path::Path,
    members: usize,
    settings: &Settings,
    workloads: &[Workload],
) -> Result<crate::run::RunReport, Error> {
    let binary = binary.to_path_buf();
    let deployment = tokio::task::spawn_blocking(move || Deployment::start(kind, &binary, members))
        .await
        .map_err(|e| Error::Process(format!("starting {}: {e}", kind.name())))??;
    deployment.wait_for_leader().await?;
    let settings = Settings {
        endpoints: deployment.endpoints.clone(),
        server_pids: deployment.pids(),
        ..settings.clone()
    };
    let report = run(&settings, workloads).await;
    // Stops the members and removes their data before the next server starts.
    drop(deployment);
    report
}

/// Median RSS per memory probe and server (MiB, summed over members), and ours/etcd.
fn memory_table(
    kinds: &[ServerKind],
    memory: &BTreeMap<(usize, &'static str), Vec<Option<u64>>>,
) -> String {
    let mut out = format!(
        "\nmemory: server RSS at the end of the window, MiB (median)\n{:<17} {:>11} {:>11} {:>9}\n",
        "probe", "kv-server", "etcd", "ours/etcd"
    );
    let mib = |k: usize, label: &'static str| {
        let values: Vec<f64> = memory
            .get(&(k, label))
            .into_iter()
            .flatten()
            .flatten()
            .map(|&kib| kib as f64 / 1024.0)
            .collect();
        median(&values)
    };
    let mut labels: Vec<&'static str> = memory.keys().map(|(_, l)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        let ours = mib(0, label);
        let etcd = (kinds.len() > 1).then(|| mib(1, label)).flatten();
        let line = format!(
            "{:<17} {:>11} {:>11} {:>9}",
            label,
            figure(ours, 0),
            figure(etcd, 0),
            ratio(ours, etcd)
        );
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// `1.23x` for ours/etcd, `-` when either is missing.
fn ratio(ours: Option<f64>, etcd: Option<f64>) -> String {
    match (ours, etcd) {
        (Some(o), Some(e)) if e > 0.0 => format!("{:.2}x", o / e),
        _ => "-".into(),
    }
}

/// `12345` for a rate, `-` when not measured.
fn figure(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn table(
    options: &CompareOptions,
    kinds: &[ServerKind],
    runs: &BTreeMap<(usize, Workload), Runs>,
) -> String {
    let s = &options.settings;
    let window = match s.ops {
        Some(n) => format!("{n} ops"),
        None => format!("{:?}", s.duration),
    };
    let mut out = format!(
        "median of {} round{}, {} member{}, {window} per workload, {} connections, {} in flight, {}-byte values\n",
        options.rounds,
        if options.rounds == 1 { "" } else { "s" },
        options.members,
        if options.members == 1 { "" } else { "s" },
        s.connections,
        s.in_flight,
        s.value_size,
    );
    out += &format!(
        "{:<17} {:<14} {:>11} {:>11} {:>9} {:>10} {:>10} {:>11} {:>11}\n",
        "workload",
        "unit",
        "kv-server",
        "etcd",
        "ours/etcd",
        "p99ms ours",
        "p99ms etcd",
        "cpu µs ours",
        "cpu µs etcd"
    );
    let empty = Runs::default();
    for &workload in &options.workloads {
        let ours = runs.get(&(0, workload)).unwrap_or(&empty);
        let etcd = (kinds.len() > 1).then(|| runs.get(&(1, workload)).unwrap_or(&empty));
        let rate = |r: &Runs| r.median(|x| Some(x.ops_per_sec));
        let p99 = |r: &Runs| r.median(|x| Some(x.latency_ms.p99));
        let cpu = |r: &Runs| {
            r.median(|x| x.server_cpu_us_per_op)
                .map_or_else(|| "-".into(), cpu_us)
        };
        let (ours_rate, etcd_rate) = (rate(ours), etcd.and_then(rate));
        let mut line = format!(
            "{:<17} {:<14} {:>11} {:>11} {:>9} {:>10} {:>10} {:>11} {:>11}",
            workload.name(),
            format!("{}/s", workload.unit()),
            figure(ours_rate, 0),
            figure(etcd_rate, 0),
            ratio(ours_rate, etcd_rate),
            figure(p99(ours), 2),
            figure(etcd.and_then(p99), 2),
            cpu(ours),
            etcd.map_or_else(|| "-".into(), cpu),
        );
        let failed: Vec<String> = [(ServerKind::KvServer, Some(ours)), (ServerKind::Etcd, etcd)]
            .into_iter()
            .filter_map(|(k, r)| {
                r.filter(|r| r.failed > 0)
                    .map(|r| format!("{} {}x", k.name(), r.failed))
            })
            .collect();
        if !failed.is_empty() {
            line += &format!("  FAILED: {}", failed.join(", "));
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_table_gives_median_mib_and_the_ratio() {
        let mut memory: BTreeMap<(usize, &'static str), Vec<Option<u64>>> = BTreeMap::new();
        memory.insert(
            (0, "1M keys (put)"),
            vec![Some(500 << 10), Some(600 << 10), None],
        );
        memory.insert((1, "1M keys (put)"), vec![Some(640 << 10), Some(620 << 10)]);
        memory.insert((0, "100k watchers"), vec![Some(175 << 10)]);
        let table = memory_table(&[ServerKind::KvServer, ServerKind::Etcd], &memory);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("memory:"), "{table}");
        // A failed probe (None) is left out of the median; no etcd figure gives no ratio.
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["100k", "watchers", "175", "-", "-"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["1M", "keys", "(put)", "550", "630", "0.87x"]
        );
    }

    #[test]
    fn memory_probes_are_a_million_keys_and_a_hundred_thousand_watchers() {
        let base = Settings::default();
        let probes = memory_probes(&base);
        assert_eq!(probes[0].1, Workload::Put);
        assert_eq!(
            (probes[0].2.keys, probes[0].2.ops),
            (1_000_000, Some(1_000_000))
        );
        assert_eq!(probes[1].1, Workload::WatchDistinct);
        assert_eq!(probes[1].2.watchers, 100_000);
        assert!(
            probes.iter().all(|p| p.2.keep_keys),
            "a probe's deployment is thrown away: deleting its keys only risks a timeout"
        );
        assert!(!Settings::default().keep_keys);
    }
}
