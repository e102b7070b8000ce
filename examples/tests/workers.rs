mod common;

use std::collections::BTreeMap;
use std::time::Duration;

/// A worker's `start job <n> attempt <a> fence <rev>` line.
#[derive(Debug, Clone, PartialEq)]
struct Start {
    worker: String,
    job: u32,
    attempt: u32,
    fence: i64,
    /// Its line number in the demo's output.
    line: usize,
}

/// A child's line `[label] rest`, split.
fn child_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('[')?;
    let (label, text) = rest.split_once("] ")?;
    Some((label, text))
}

/// The numbers after each of `words` in `text`, in order (`None` if a word is missing or not
/// followed by a number).
fn numbers_after(text: &str, words: &[&str]) -> Option<Vec<i64>> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .map(|word| {
            let at = tokens.iter().position(|t| t == word)?;
            tokens.get(at + 1)?.parse().ok()
        })
        .collect()
}

#[test]
fn a_killed_workers_job_runs_again_elsewhere_and_gated_jobs_wait_for_the_dataset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kv_tests::start_kv_server(&dir.path().join("data"), &[]);
    let out = common::run_example(
        "workers",
        &["--endpoints", &server.endpoint, "demo"],
        Duration::from_secs(60),
    );
    let lines: Vec<&str> = out.lines().collect();
    let context = format!("the demo's output:\n{out}");

    // What the producer enqueued, and which jobs it gated.
    let mut gated = BTreeMap::new();
    for (_, text) in lines
        .iter()
        .filter_map(|l| child_line(l))
        .filter(|(label, _)| *label == "producer")
    {
        if let Some(rest) = text.strip_prefix("enqueued job ") {
            let n: u32 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad producer line {text:?}; {context}"));
            gated.insert(n, rest.contains("(gated on"));
        }
    }
    let jobs = gated.len() as u32;
    assert!(jobs >= 8, "too few jobs enqueued; {context}");
    assert_eq!(
        gated.keys().copied().collect::<Vec<_>>(),
        (1..=jobs).collect::<Vec<_>>(),
        "jobs 1..=N enqueued in order; {context}"
    );
    assert!(gated.values().any(|g| *g), "some jobs gated; {context}");

    // The workers' starts and acks.
    let mut starts = Vec::new();
    let mut done: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (line, (worker, text)) in lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((i, child_line(l)?)))
    {
        if text.starts_with("start job ") {
            let Some(found) = numbers_after(text, &["job", "attempt", "fence"]) else {
                panic!("bad start line {text:?}; {context}");
            };
            starts.push(Start {
                worker: worker.to_string(),
                job: found[0] as u32,
                attempt: found[1] as u32,
                fence: found[2],
                line,
            });
        } else if let Some(n) = text.strip_prefix("done job ") {
            let n: u32 = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad done line {text:?}; {context}"));
            done.entry(n).or_default().push(worker.to_string());
        }
    }

    // The kill: one worker, mid-job (it had started the job and never finished it).
    let kills: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("killed worker "))
        .map(|(i, l)| (i, *l))
        .collect();
    assert_eq!(kills.len(), 1, "exactly one worker killed; {context}");
    let (kill_line, kill) = kills[0];
    let words: Vec<&str> = kill.split_whitespace().collect();
    let victim = words[2].to_string();
    assert_eq!(words.get(3..5), Some(&["during", "job"][..]), "{context}");
    let victim_job: u32 = words[5]
        .parse()
        .unwrap_or_else(|_| panic!("bad kill line {kill:?}; {context}"));
    assert!(
        starts
            .iter()
            .any(|s| s.worker == victim && s.job == victim_job && s.attempt == 1),
        "the killed worker {victim} had started job {victim_job}; {context}"
    );
    assert!(
        !done
            .get(&victim_job)
            .into_iter()
            .flatten()
            .any(|w| *w == victim),
        "the killed worker never finished job {victim_job}; {context}"
    );

    // The recovery: that job, and no other delivery of it, ran again on another worker as
    // attempt 2, after the kill, and that worker acked it.
    let again: Vec<&Start> = starts
        .iter()
        .filter(|s| s.job == victim_job && s.attempt > 1)
        .collect();
    assert_eq!(
        again.len(),
        1,
        "job {victim_job} redelivered once; {context}"
    );
    let again = again[0];
    assert_eq!(again.attempt, 2, "{context}");
    assert_ne!(
        again.worker, victim,
        "redelivered to another worker; {context}"
    );
    assert!(
        again.line > kill_line,
        "redelivered after the kill; {context}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "  job {victim_job}: {victim} (attempt 1, killed), {w} (attempt 2) -> acked by {w} \
             attempt 2",
            w = again.worker
        ))),
        "job {victim_job} acked by the worker it was redelivered to; {context}"
    );
    // Not before the dead worker's session ran out (2 s TTL, renewed every third of it).
    let redelivered = format!(
        "redelivered job {victim_job} to {} (attempt 2), ",
        again.worker
    );
    let after: f64 = lines
        .iter()
        .find_map(|l| l.strip_prefix(&redelivered))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{redelivered}...` line; {context}"));
    assert!(
        after >= 1.0,
        "job {victim_job} stayed claimed until the killed worker's session ended, \
         not {after} s; {context}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "redelivered: job {victim_job}: attempt 1 on {victim}, attempt 2 on {}",
            again.worker
        ))),
        "the summary names the redelivery; {context}"
    );

    // No gated job started before the dataset was ready, and each did start after.
    let ready_line = lines
        .iter()
        .position(|l| l.starts_with("dataset ready"))
        .unwrap_or_else(|| panic!("no `dataset ready` line; {context}"));
    for start in &starts {
        if gated[&start.job] {
            assert!(
                start.line > ready_line,
                "gated job {} started before dataset ready; {context}",
                start.job
            );
        }
    }
    for (n, _) in gated.iter().filter(|(_, g)| **g) {
        assert!(
            starts.iter().any(|s| s.job == *n),
            "gated job {n} ran after dataset ready; {context}"
        );
    }

    // Ungated jobs first started in queue order (the fence orders starts across workers,
    // whose lines may interleave).
    let mut first: Vec<&Start> = starts.iter().filter(|s| s.attempt == 1).collect();
    first.sort_by_key(|s| s.fence);
    let fences: Vec<i64> = first.iter().map(|s| s.fence).collect();
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences unique; {context}"
    );
    let ungated_order: Vec<u32> = first.iter().map(|s| s.job).filter(|n| !gated[n]).collect();
    let expected: Vec<u32> = (1..=jobs).filter(|n| !gated[n]).collect();
    assert_eq!(
        ungated_order, expected,
        "ungated jobs first started in queue order; {context}"
    );

    // Every job acked exactly once: one result each in the store (the demo's summary), and
    // no job reported done twice by the workers (their last lines may be cut off when the
    // demo stops them, so a missing `done` line is not a failure).
    let acked: BTreeMap<u32, String> = lines
        .iter()
        .filter_map(|l| {
            let (job, rest) = l.strip_prefix("  job ")?.split_once(": ")?;
            let n = job.split_whitespace().next()?.parse().ok()?;
            let (_, by) = rest.split_once(" -> acked by ")?;
            Some((n, by.split_whitespace().next()?.to_string()))
        })
        .collect();
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=jobs).collect::<Vec<_>>(),
        "every job acked; {context}"
    );
    for (n, workers) in &done {
        assert_eq!(
            workers,
            &vec![acked[n].clone()],
            "job {n} done once, by the worker whose result is stored; {context}"
        );
    }
    for check in [
        "ok: every job acked exactly once",
        "ok: no gated job started before dataset ready",
        "ok: ungated jobs first started in queue order",
        &format!("ok: job {victim_job} ran again on {}", again.worker),
        &format!("all {jobs} jobs done"),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(check)),
            "missing `{check}`; {context}"
        );
    }
    assert!(!out.contains("FAILED"), "{context}");
}
