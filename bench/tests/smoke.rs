//! The real `kv-bench` binary, run with tiny sizes: every workload against a fresh kv-server,
//! and a one-round comparison. Only the shape and sanity of the results are checked, never
//! their speed.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on one kv-bench invocation.
const LIMIT: Duration = Duration::from_secs(60);

/// Flags that make every workload small: a few hundred operations, a handful of watchers.
const TINY: &[&str] = &[
    "--ops",
    "200",
    "--connections",
    "4",
    "--in-flight",
    "16",
    "--keys",
    "50",
    "--hot-keys",
    "4",
    "--watchers",
    "10",
    "--watch-writers",
    "3",
    "--leases",
    "20",
    "--range-keys",
    "300",
    "--quiet",
];

/// Runs kv-bench with `args` (and `TMPDIR=tmp` if given), killing it past `LIMIT`.
fn kv_bench(args: &[&str], tmp: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv-bench"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(tmp) = tmp {
        cmd.env("TMPDIR", tmp);
    }
    let mut child = cmd.spawn().expect("spawn kv-bench");
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().expect("poll kv-bench").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap kv-bench");
            panic!(
                "kv-bench ran over {LIMIT:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("kv-bench output");
    assert!(
        out.status.success(),
        "kv-bench {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn number(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

/// The checks every result must pass: work done, no errors, checks held, sane figures.
fn assert_sane(r: &Value) {
    let name = r["workload"].as_str().expect("workload name");
    assert!(number(r, "ops") > 0.0, "{name}: no operations: {r}");
    assert!(number(r, "ops_per_sec") > 0.0, "{name}: {r}");
    assert!(number(r, "seconds") > 0.0, "{name}: {r}");
    assert_eq!(r["errors"], 0, "{name}: {r}");
    assert_eq!(r["passed"], true, "{name}: {r}");
    assert_eq!(r["failures"], Value::Array(vec![]), "{name}: {r}");
    let l = &r["latency_ms"];
    let (p50, p90, p99, max) = (
        number(l, "p50"),
        number(l, "p90"),
        number(l, "p99"),
        number(l, "max"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{name}: percentiles out of order: {l}"
    );
    assert!(r["client_cpu_us_per_op"].is_number(), "{name}: {r}");
}

#[test]
fn every_workload_runs_against_a_fresh_server_and_reports_sane_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kv_tests::start_kv_server(&dir.path().join("data"), &[]);
    let json = dir.path().join("results.json");
    let pid = server.pid().to_string();
    let mut args = vec![
        "run",
        "--endpoints",
        &server.endpoint,
        "--server-pid",
        &pid,
        "--json",
        json.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(TINY);
    let out = kv_bench(&args, None);
    let stdout = String::from_utf8_lossy(&out.stdout);

    let results: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("results written")).expect("json");
    let results = results.as_array().expect("an array of results");
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["workload"].as_str().expect("workload name"))
        .collect();
    assert_eq!(
        names,
        [
            "put-seq",
            "put",
            "get",
            "get-serializable",
            "cas",
            "watch-fanout",
            "watch-distinct",
            "lease-grant",
            "lease-keepalive",
            "lease-revoke",
            "range"
        ]
    );
    for r in results {
        assert_sane(r);
        let name = r["workload"].as_str().unwrap_or_default();
        // The server's PID was given: its CPU and memory are measured.
        assert!(r["server_cpu_us_per_op"].is_number(), "{name}: {r}");
        assert!(number(r, "server_rss_kib") > 0.0, "{name}: {r}");
        assert!(
            stdout.lines().any(|l| l.starts_with(name)),
            "no result line for {name}:\n{stdout}"
        );
    }
    let by_name = |n: &str| {
        results
            .iter()
            .find(|r| r["workload"] == n)
            .expect("result present")
    };
    // --ops bounds the closed loops exactly.
    for n in [
        "put-seq",
        "put",
        "get",
        "get-serializable",
        "lease-grant",
        "lease-keepalive",
        "lease-revoke",
    ] {
        assert_eq!(by_name(n)["ops"], 200, "{n}");
    }
    assert_eq!(by_name("put-seq")["in_flight"], 1);
    // Every watcher saw every put once: events = puts x watchers (fan-out), = puts (distinct).
    let fanout = by_name("watch-fanout");
    assert_eq!(number(&fanout["details"], "puts"), 200.0);
    assert_eq!(number(fanout, "ops"), 200.0 * 10.0);
    let distinct = by_name("watch-distinct");
    assert_eq!(
        number(distinct, "ops"),
        number(&distinct["details"], "puts")
    );
    let cas = by_name("cas");
    assert_eq!(
        number(cas, "ops") + number(&cas["details"], "conflicts"),
        number(&cas["details"], "attempts")
    );
    let range = by_name("range");
    assert!(number(&range["details"], "mb_per_sec") > 0.0);
}

#[test]
fn a_one_round_comparison_prints_a_table_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("tmp dir");
    let json = dir.path().join("compare.json");
    let kv_server = kv_tests::kv_server_bin();
    let mut args = vec![
        "compare",
        "--rounds",
        "1",
        "--workloads",
        "put,cas,watch-fanout",
        "--kv-server",
        kv_server.to_str().expect("utf-8 path"),
        "--json",
        json.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(TINY);
    let out = kv_bench(&args, Some(&tmp));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let etcd = kv_tests::which("etcd").is_some();
    if !etcd {
        assert!(stdout.contains("etcd skipped: "), "{stdout}");
    }

    let header = stdout
        .lines()
        .position(|l| l.starts_with("workload "))
        .unwrap_or_else(|| panic!("no table:\n{stdout}"));
    let rows: Vec<&str> = stdout.lines().skip(header + 1).collect();
    for (row, name) in rows.iter().zip(["put", "cas", "watch-fanout"]) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], name, "{stdout}");
        assert!(cells[2].parse::<f64>().is_ok_and(|v| v > 0.0), "{row}");
        if etcd {
            assert!(cells[3].parse::<f64>().is_ok_and(|v| v > 0.0), "{row}");
            assert!(cells[4].ends_with('x'), "{row}");
        }
        assert!(!row.contains("FAILED"), "{row}");
    }

    let entries: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("results written")).expect("json");
    let entries = entries.as_array().expect("an array");
    assert_eq!(entries.len(), if etcd { 6 } else { 3 });
    for e in entries {
        assert_sane(e);
        assert_eq!(e["round"], 1);
        assert!(e["server"] == "kv-server" || e["server"] == "etcd", "{e}");
        assert!(e["server_cpu_us_per_op"].is_number(), "{e}");
    }
    // The servers' data directories were removed.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read tmp")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}
