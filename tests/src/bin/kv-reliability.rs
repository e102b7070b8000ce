//! `kv-reliability`: runs the reliability scenarios (faults against a loopback cluster, every
//! history checked, and the fuzz run) and prints, or writes, the `docs/reliability.md` table.
//!
//! ```text
//! bash .ci/reliability                         # the long run, table into docs/reliability.md
//! target/release/kv-reliability [--long] [--only NAME] [--seed N] [--fuzz N] [--write FILE]
//! ```
//! Exits 1 when any anomaly was found; each is printed with the seed that repeats its row.

use std::process::ExitCode;

use kv_tests::reliability::{self, Report};
use kv_tests::rng::Rng;

fn usage() -> ExitCode {
    eprintln!(
        "usage: kv-reliability [--long] [--only NAME] [--seed N] [--fuzz REQUESTS] [--write FILE]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut long = false;
    let (mut only, mut seed, mut fuzz, mut write) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--long" => long = true,
            "--only" => only = args.next(),
            "--seed" => seed = args.next().and_then(|s| s.parse::<u64>().ok()),
            "--fuzz" => fuzz = args.next().and_then(|s| s.parse::<u64>().ok()),
            "--write" => write = args.next(),
            _ => return usage(),
        }
    }
    // The members are the kv-server binary beside this one (or KV_SERVER_BIN's).
    let beside = std::env::current_exe().map(|e| e.with_file_name("kv-server"));
    if std::env::var_os("KV_SERVER_BIN").is_none() && !beside.as_ref().is_ok_and(|b| b.exists()) {
        eprintln!(
            "kv-reliability: no kv-server beside this binary ({beside:?}); build it first: \
             cargo build --release -p kv-server"
        );
        return ExitCode::FAILURE;
    }
    let fuzz = fuzz.unwrap_or(if long { 1_000_000 } else { 20_000 });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv-reliability: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reports: Vec<Report> = Vec::new();
    runtime.block_on(async {
        for scenario in reliability::scenarios(long) {
            if only.as_deref().is_some_and(|o| !scenario.name.contains(o)) {
                continue;
            }
            let seed = seed.unwrap_or_else(Rng::fresh_seed);
            eprintln!("== {} (seed {seed})", scenario.name);
            let r = reliability::run_scenario(&scenario, seed).await;
            print_report(&r);
            reports.push(r);
        }
        if only.as_deref().is_none_or(|o| "fuzz".contains(o)) {
            let seed = seed.unwrap_or_else(Rng::fresh_seed);
            eprintln!("== fuzz (seed {seed})");
            let r = reliability::run_fuzz(fuzz, seed).await;
            print_report(&r);
            reports.push(r);
        }
    });
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let when = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let table = reliability::markdown(&reports, &command, &when);
    println!("{table}");
    if let Some(path) = write {
        let text = format!("{}{table}", reliability::DOC_HEAD);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("kv-reliability: cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if reports.iter().any(|r| !r.anomalies.is_empty()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_report(r: &Report) {
    eprintln!(
        "   {:.0?}: faults {:?}, {} operations ({} unknown), {} histories, {} watch logs ({} events), {} HashKV checks, {} fuzzed, {} anomalies",
        r.elapsed,
        r.faults,
        r.operations,
        r.unknown,
        r.histories,
        r.watch_logs,
        r.watch_events,
        r.hash_checks,
        r.fuzzed,
        r.anomalies.len()
    );
    for a in &r.anomalies {
        eprintln!("   ANOMALY (seed {}): {a}", r.seed);
    }
    for d in &r.details {
        eprintln!("   detail: {d}");
    }
}
