mod common;

use std::collections::BTreeSet;
use std::time::Duration;

/// A step as a job printed it: `[label] step A..B written by ID fence F at revision R`.
#[derive(Debug)]
struct Step {
    label: String,
    from: usize,
    to: usize,
    by: String,
    fence: i64,
    revision: i64,
}

fn steps(out: &str) -> Vec<Step> {
    out.lines()
        .filter_map(|line| {
            let (label, rest) = line.strip_prefix('[')?.split_once("] step ")?;
            let w: Vec<&str> = rest.split_whitespace().collect();
            let (from, to) = w.first()?.split_once("..")?;
            // A..B written by ID fence F at revision R
            Some(Step {
                label: label.to_string(),
                from: from.parse().ok()?,
                to: to.parse().ok()?,
                by: w.get(3)?.to_string(),
                fence: w.get(5)?.parse().ok()?,
                revision: w.get(8)?.parse().ok()?,
            })
        })
        .collect()
}

/// The words of the first line that contains `marker`, from the marker on.
fn words_of<'a>(out: &'a str, marker: &str) -> Vec<&'a str> {
    let line = out
        .lines()
        .find_map(|l| l.find(marker).map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no line with {marker:?} in:\n{out}"));
    line.split_whitespace().collect()
}

fn number<T: std::str::FromStr>(word: &str, out: &str) -> T {
    word.trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|_| panic!("{word:?} is not a number in:\n{out}"))
}

#[test]
fn a_killed_indexing_leader_is_replaced_from_its_last_recorded_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kv_tests::start_kv_server(&dir.path().join("data"), &[]);
    let out = common::run_example(
        "indexing",
        &["--endpoints", &server.endpoint, "demo"],
        Duration::from_secs(60),
    );

    // Who was killed, and when its fence ended (its leader key's deletion).
    let killed = words_of(&out, "killed leader ");
    let victim = killed[2];
    let gone = words_of(
        &out,
        &format!("leader key of {victim} deleted at revision "),
    );
    let superseded_at: i64 = number(gone[7], &out);

    // Who took over, and where it says it started.
    let takeover = words_of(&out, "takeover: ");
    let successor = takeover[1];
    assert_ne!(successor, victim, "{out}");
    let resume = words_of(&out, &format!("[{successor}] leader {successor} fence "));
    let successor_fence: i64 = number(resume[4], &out);
    let resumed_at: usize = number(resume[8], &out);

    // The steps each job printed: the victim built from 0, the successor from where the
    // victim's recorded progress ended, no step twice, and together they cover every doc.
    let steps = steps(&out);
    let victim_steps: Vec<&Step> = steps.iter().filter(|s| s.by == victim).collect();
    let successor_steps: Vec<&Step> = steps.iter().filter(|s| s.by == successor).collect();
    assert!(
        !victim_steps.is_empty(),
        "the victim printed no step:\n{out}"
    );
    assert_eq!(victim_steps[0].from, 0, "{out}");
    let victim_fence = victim_steps[0].fence;
    assert!(
        victim_steps
            .iter()
            .all(|s| s.fence == victim_fence && s.label == victim),
        "{out}"
    );
    assert!(resumed_at > 0, "the successor restarted from 0:\n{out}");
    // The victim may have recorded one step it did not live to print; it never printed one
    // beyond the resume point.
    let victim_printed = victim_steps.iter().map(|s| s.to).max().unwrap_or(0);
    assert!(
        victim_printed <= resumed_at && resumed_at - victim_printed <= 3,
        "resumed at {resumed_at}, the victim printed progress up to {victim_printed}:\n{out}"
    );
    assert_eq!(
        successor_steps.first().map(|s| s.from),
        Some(resumed_at),
        "{out}"
    );
    assert_eq!(successor_steps.last().map(|s| s.to), Some(36), "{out}");
    let froms: Vec<usize> = steps.iter().map(|s| s.from).collect();
    let distinct: BTreeSet<usize> = froms.iter().copied().collect();
    assert_eq!(froms.len(), distinct.len(), "a step was redone:\n{out}");
    assert!(
        successor_steps
            .iter()
            .all(|s| s.fence == successor_fence && s.fence != victim_fence),
        "{out}"
    );

    // Fencing, from the jobs' own reports: every step of the victim landed before its key
    // was deleted, every step of the successor after.
    assert!(
        victim_steps.iter().all(|s| s.revision < superseded_at),
        "a step of {victim} landed after revision {superseded_at}:\n{out}"
    );
    assert!(
        successor_steps.iter().all(|s| s.revision > superseded_at),
        "{out}"
    );

    // The demo's checks of the store agree with what the jobs printed.
    let recorded = words_of(&out, &format!("verified: {successor} resumed at doc "));
    assert_eq!(number::<usize>(recorded[5], &out), resumed_at, "{out}");
    assert_eq!(recorded[7], format!("{victim}'s"), "{out}");
    assert_eq!(number::<usize>(recorded[11], &out), resumed_at, "{out}");
    let stale = words_of(&out, "stale-fence write refused: ");
    assert_eq!(
        stale.join(" "),
        format!(
            "stale-fence write refused: a progress reset guarded by {victim}'s fence \
             {victim_fence} (superseded by {successor}'s fence {successor_fence})"
        ),
        "{out}"
    );
    assert!(
        out.contains("verified: index complete and correct: 36 docs"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "fence {victim_fence} all landed before revision {superseded_at}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "summary: killed leader {victim} (last recorded progress doc {resumed_at}); \
             {successor} resumed at doc {resumed_at}; stale-fence write refused; index complete (36 docs)"
        )),
        "{out}"
    );
}
