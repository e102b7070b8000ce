mod common;

use std::collections::BTreeMap;
use std::time::Duration;

/// The registration TTL the test asks the demo for, in seconds (the server's minimum).
const TTL_S: u64 = 2;

/// The services demo against a server of our own: all three instances answer, the SIGKILLed
/// one leaves rotation within TTL + 1 s, no call reaches it (or fails) between its drop and
/// its restart, and the restarted process is listed and answers again.
#[test]
fn a_killed_instance_leaves_rotation_within_its_ttl_and_a_restarted_one_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kv_tests::start_kv_server(&dir.path().join("data"), &[]);
    let ttl = TTL_S.to_string();
    let out = common::run_example(
        "services",
        &["--endpoints", &server.endpoint, "demo", "--ttl", &ttl],
        Duration::from_secs(60),
    );
    let lines: Vec<&str> = out.lines().collect();
    let find = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"))
    };

    // Before the kill: every instance answered calls through the balanced channel.
    let all = find("all 3 instances answered: ");
    let before = counts(&lines[all]["all 3 instances answered: ".len()..]);
    for id in ["a", "b", "c"] {
        assert!(
            before.get(id).is_some_and(|&n| n > 0),
            "{id} did not answer before the kill: {before:?}\n{out}"
        );
    }

    let killed = find("killed instance b");
    let dropped = find("dropped b after ");
    let restarted = find("restarted instance b");
    assert!(
        all < killed && killed < dropped && dropped < restarted,
        "steps out of order:\n{out}"
    );

    // The kill took b out of rotation within TTL + 1 s, and the live set showed it.
    let ms: u64 = lines[dropped]["dropped b after ".len()..]
        .trim_end_matches(" ms")
        .parse()
        .unwrap_or_else(|e| panic!("{:?}: {e}\n{out}", lines[dropped]));
    assert!(
        ms <= (TTL_S + 1) * 1000,
        "b left rotation {ms} ms after its kill, more than TTL + 1 s:\n{out}"
    );
    assert!(
        lines[killed..restarted].contains(&"live: [a, c]"),
        "the live set never showed b gone:\n{out}"
    );

    // Between the drop and the restart, no call reached b and none failed (a call routed to
    // the dead process would have), and calls kept being answered.
    let out_line = find("while b was out: calls=");
    assert!(dropped < out_line && out_line < restarted, "{out}");
    let during = counts(&lines[out_line]["while b was out: ".len()..]);
    assert!(during["calls"] > 0, "no calls while b was out:\n{out}");
    assert!(!during.contains_key("b"), "b answered while out:\n{out}");
    assert!(
        !during.contains_key("failed"),
        "calls failed after the drop:\n{out}"
    );
    for line in &lines[dropped..restarted] {
        if let Some(tally) = line.strip_prefix("answered: ") {
            assert!(
                !counts(tally).contains_key("b"),
                "{line:?} while b was out:\n{out}"
            );
        }
    }

    // The restarted process registered at a new port, is listed, and answers.
    let registrations: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("[b] registered b at "))
        .collect();
    assert_eq!(registrations.len(), 2, "b registered twice:\n{out}");
    assert_ne!(registrations[0], registrations[1], "{out}");
    assert!(
        lines[restarted..].contains(&"live: [a, b, c]"),
        "b never came back into the live set:\n{out}"
    );
    let again = find("b answered again ");
    assert!(restarted < again, "{out}");
    let summary = find("summary: ");
    assert!(again < summary, "{out}");
}

/// The `name=count` pairs of a tally (`a=3 c=4 failed=2 (last: ...)`).
fn counts(tally: &str) -> BTreeMap<String, u64> {
    tally
        .split_whitespace()
        .take_while(|word| !word.starts_with('('))
        .filter_map(|word| {
            let (name, n) = word.split_once('=')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .collect()
}
