//! Authentication and role-based access through the real binary, driven by the real etcdctl
//! (3.4) and compared line for line with etcd 3.4 doing the same.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kv_tests::{etcdctl, etcdctl_stdin, have_etcdctl, ok, start_etcd, start_kv_server, which};

/// One etcdctl run, reduced to what a user sees and what may be compared across servers: the
/// exit code, stdout, and stderr's `Error:`/`Failed`/`watch` lines (the 3.4 client also logs
/// JSON retry warnings with timestamps), with the endpoint replaced by `EP`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    code: Option<i32>,
    stdout: String,
    errors: Vec<String>,
}

fn seen(out: &Output, endpoint: &str) -> Seen {
    let clean = |s: &[u8]| String::from_utf8_lossy(s).replace(endpoint, "EP");
    Seen {
        code: out.status.code(),
        stdout: clean(&out.stdout),
        errors: clean(&out.stderr)
            .lines()
            .filter(|l| {
                l.starts_with("Error:") || l.starts_with("Failed") || l.starts_with("watch")
            })
            .map(str::to_string)
            .collect(),
    }
}

/// etcdctl with a time bound, for commands that may wait (a watch that is not refused).
fn etcdctl_bounded(endpoint: &str, args: &[&str], limit: Duration) -> Output {
    let etcdctl = which("etcdctl").expect("etcdctl");
    let mut child = Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=5s", "--command-timeout=20s"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("poll etcdctl").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("etcdctl output")
}

/// A step of the session: etcdctl arguments, and text for its stdin.
struct Step {
    args: Vec<String>,
    stdin: Option<&'static str>,
}

fn step(args: &str) -> Step {
    Step {
        args: args.split_whitespace().map(str::to_string).collect(),
        stdin: None,
    }
}

fn with_stdin(args: &str, stdin: &'static str) -> Step {
    Step {
        stdin: Some(stdin),
        ..step(args)
    }
}

/// The session a user would run to set up and use access control, with the refusals a user
/// meets on the way: etcd 3.4's and release-3.5's rules agree on every step of it.
fn session() -> Vec<Step> {
    vec![
        // Before auth is on, anyone manages users and roles.
        step("user add root:rootpw"),
        step("user add alice:alicepw"),
        step("user add bob --no-password"),
        step("user add alice:again"),
        step("role add app"),
        step("role grant-permission app readwrite /app/ --prefix"),
        step("role grant-permission app read /ro"),
        step("role grant-permission app read /from/ --from-key"),
        step("role grant-permission nobody read /x"),
        step("user grant-role alice app"),
        step("user grant-role alice app"),
        step("user grant-role alice missing"),
        step("put /ro r0"),
        step("put /other o0"),
        // etcdctl creates the root role and grants it to root, then enables.
        step("auth enable"),
        step("auth enable"),
        // No credentials, wrong password, a user without a password.
        step("put /app/x 1"),
        step("get /app/x"),
        step("--user alice:wrong get /app/x"),
        step("--user nobody:pw get /app/x"),
        step("--user bob:pw get /app/x"),
        // Allowed and refused reads and writes.
        step("--user alice:alicepw put /app/x 1"),
        step("--user alice:alicepw put /app/y 2"),
        step("--user alice:alicepw get /app/ --prefix"),
        step("--user alice:alicepw get /app/x --prefix"),
        step("--user alice:alicepw put /other 1"),
        step("--user alice:alicepw get /other"),
        step("--user alice:alicepw get /ro"),
        step("--user alice:alicepw put /ro r1"),
        step("--user alice:alicepw get /from/z"),
        step("--user alice:alicepw get /app/ /app1"),
        step("--user alice:alicepw del /app/y"),
        step("--user alice:alicepw del /app/ --prefix"),
        step("--user alice:alicepw put /app/x 1"),
        // A txn needs every compare and every op of both branches.
        with_stdin(
            "--user alice:alicepw txn",
            "value(\"/app/x\") = \"1\"\n\nput /app/t ok\n\nput /app/t no\n\n",
        ),
        with_stdin(
            "--user alice:alicepw txn",
            "value(\"/app/x\") = \"1\"\n\nput /app/t ok\n\nput /other no\n\n",
        ),
        with_stdin(
            "--user alice:alicepw txn",
            "value(\"/other\") = \"o0\"\n\nput /app/t ok\n\n\n",
        ),
        // A watch is checked when created; a refused one is canceled by the server.
        step("--user alice:alicepw watch /other"),
        // Users see themselves and their roles, not the rest.
        step("--user alice:alicepw user get alice"),
        step("--user alice:alicepw user get root"),
        step("--user alice:alicepw user list"),
        step("--user alice:alicepw role get app"),
        step("--user alice:alicepw role get root"),
        step("--user alice:alicepw role list"),
        step("--user alice:alicepw role add r2"),
        step("--user alice:alicepw user passwd alice --interactive=false"),
        step("--user alice:alicepw auth disable"),
        // Admin-only maintenance is refused with the auth package's own text.
        step("--user alice:alicepw defrag"),
        step("--user alice:alicepw endpoint hashkv"),
        // Root manages; root and its role cannot be removed while auth is on.
        step("--user root:rootpw user list"),
        step("--user root:rootpw role list"),
        step("--user root:rootpw user get alice --detail"),
        step("--user root:rootpw role get app"),
        step("--user root:rootpw get /other"),
        step("--user root:rootpw user delete root"),
        step("--user root:rootpw role delete root"),
        step("--user root:rootpw user revoke-role root root"),
        step("--user root:rootpw user delete nobody"),
        step("--user root:rootpw user revoke-role alice missing"),
        step("--user root:rootpw role revoke-permission app /nothing"),
        step("--user root:rootpw role revoke-permission app /ro"),
        step("--user root:rootpw role revoke-permission app /from/ --from-key"),
        step("--user alice:alicepw get /ro"),
        // A new password: the old one stops working.
        with_stdin(
            "--user root:rootpw user passwd alice --interactive=false",
            "newpw\n",
        ),
        step("--user alice:alicepw get /app/x"),
        step("--user alice:newpw get /app/x"),
        // A revoked role takes its permissions with it.
        step("--user root:rootpw user revoke-role alice app"),
        step("--user alice:newpw get /app/x"),
        step("--user root:rootpw user grant-role alice app"),
        step("--user root:rootpw role delete app"),
        step("--user alice:newpw get /app/x"),
        step("--user root:rootpw user delete alice"),
        step("--user alice:newpw get /app/x"),
        // Off again: everything is open, credentials or not.
        step("--user root:rootpw auth disable"),
        step("auth disable"),
        step("get /other"),
        step("user list"),
        step("--user root:rootpw get /other"),
        step("user delete root"),
        step("auth enable"),
    ]
}

/// Runs the session against `endpoint`, each step with its output.
fn run(endpoint: &str) -> Vec<(String, Seen)> {
    session()
        .into_iter()
        .map(|s| {
            let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
            let out = match (s.stdin, args.contains(&"watch")) {
                (Some(input), _) => etcdctl_stdin(endpoint, &args, input),
                (None, true) => etcdctl_bounded(endpoint, &args, Duration::from_secs(10)),
                (None, false) => etcdctl(endpoint, &args),
            };
            (s.args.join(" "), seen(&out, endpoint))
        })
        .collect()
}

#[test]
fn etcdctl_auth_session_matches_etcd() {
    if !have_etcdctl("etcdctl_auth_session_matches_etcd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = match start_etcd(&dir.path().join("etcd")) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP etcdctl_auth_session_matches_etcd: {why}");
            return;
        }
    };
    let server = start_kv_server(&dir.path().join("ours"), &[]);
    let theirs = run(&etcd.endpoint);
    let ours = run(&server.endpoint);
    let mut differences = Vec::new();
    for ((command, want), (_, got)) in theirs.iter().zip(&ours) {
        if want != got {
            differences.push(format!(
                "etcdctl {command}\n  etcd: {want:?}\n  ours: {got:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} steps differ:\n{}",
        differences.len(),
        theirs.len(),
        differences.join("\n")
    );
    // The session did what it says (not merely the same wrong thing on both).
    let find = |prefix: &str| {
        ours.iter()
            .find(|(c, _)| c.starts_with(prefix))
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no step {prefix}"))
    };
    assert_eq!(find("auth enable").stdout, "Authentication Enabled\n");
    assert_eq!(
        find("put /app/x 1").errors,
        ["Error: etcdserver: user name is empty"]
    );
    assert_eq!(
        find("--user alice:alicepw put /other").errors,
        ["Error: etcdserver: permission denied"]
    );
    assert_eq!(
        find("--user alice:alicepw get /app/ --prefix").stdout,
        "/app/x\n1\n/app/y\n2\n"
    );
    assert_eq!(
        find("--user alice:wrong").errors,
        ["Error: etcdserver: authentication failed, invalid user ID or password"]
    );
}

/// A server's log must never hold a password, and its data dir must hold only hashes.
#[test]
fn passwords_are_stored_as_salted_hashes() {
    if !have_etcdctl("passwords_are_stored_as_salted_hashes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start_kv_server(&data, &[]);
    let ep = server.endpoint.clone();
    ok(etcdctl(&ep, &["user", "add", "root:Sekrit-Root-1"]));
    ok(etcdctl(&ep, &["user", "add", "carol:Sekrit-Carol-2"]));
    ok(etcdctl(&ep, &["user", "add", "dave:Sekrit-Carol-2"]));
    ok(etcdctl(&ep, &["auth", "enable"]));
    ok(etcdctl(&ep, &["--user", "carol:Sekrit-Carol-2", "user", "get", "carol"]));
    assert!(server.terminate(Duration::from_secs(10)), "stops on SIGTERM");
    let mut stored = Vec::new();
    for entry in walk(&data) {
        stored.extend(std::fs::read(entry).unwrap());
    }
    for secret in ["Sekrit-Root-1", "Sekrit-Carol-2"] {
        assert!(
            !contains(&stored, secret.as_bytes()),
            "{secret} is in the data dir in plain text"
        );
        assert!(!server.log_text().contains(secret), "{secret} is in the log");
    }
    // Argon2id hashes, one salt each: the same password hashes differently.
    let hashes: Vec<&[u8]> = stored
        .windows(10)
        .filter(|w| w == b"$argon2id$")
        .collect();
    assert!(hashes.len() >= 3, "{} hashes found", hashes.len());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
