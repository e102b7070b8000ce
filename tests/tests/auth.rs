//! Authentication and role-based access through the real binary, driven by the real etcdctl
//! (3.4) and compared line for line with etcd 3.4 doing the same.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kv_tests::{etcdctl, etcdctl_stdin, have_etcdctl, ok, start_etcd, start_kv_server};

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
    let mut child = kv_tests::etcdctl_command(endpoint, "5s")
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
    ok(etcdctl(
        &ep,
        &["--user", "carol:Sekrit-Carol-2", "user", "get", "carol"],
    ));
    assert!(
        server.terminate(Duration::from_secs(10)),
        "stops on SIGTERM"
    );
    let mut stored = Vec::new();
    for entry in walk(&data) {
        stored.extend(std::fs::read(entry).unwrap());
    }
    for secret in ["Sekrit-Root-1", "Sekrit-Carol-2"] {
        assert!(
            !contains(&stored, secret.as_bytes()),
            "{secret} is in the data dir in plain text"
        );
        assert!(
            !server.log_text().contains(secret),
            "{secret} is in the log"
        );
    }
    // Argon2id hashes, one salt each: the same password hashes differently.
    let hashes: Vec<&[u8]> = stored.windows(10).filter(|w| w == b"$argon2id$").collect();
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

/// What python-etcd3 (Debian's `python3-etcd3`) sees against a server with auth on, over TLS
/// (python-etcd3 sends its token as call credentials, which gRPC sends only over a secure
/// channel): one line of JSON, `[step, outcome, detail]` per step.
const PYTHON_SESSION: &str = r#"
import json, sys, time
import etcd3, grpc

host, port, idle, ca = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
out = []

def attempt(name, f):
    try:
        out.append([name, "ok", f()])
    except grpc.RpcError as e:
        out.append([name, str(e.code()), e.details()])
    except Exception as e:
        out.append([name, type(e).__name__, str(e)])

def client(user=None, password=None):
    return etcd3.client(host=host, port=port, user=user, password=password, timeout=10,
                        ca_cert=ca)

attempt("wrong password", lambda: (client("alice", "nope"), "connected")[1])
attempt("unknown user", lambda: (client("mallory", "pw"), "connected")[1])
alice = client("alice", "alicepw")
attempt("put in prefix", lambda: (alice.put("/app/p", "v1"), "put")[1])
attempt("get in prefix", lambda: alice.get("/app/p")[0].decode())
attempt("put outside", lambda: (alice.put("/other", "v"), "put")[1])
attempt("get outside", lambda: alice.get("/other")[0])
attempt("whole prefix", lambda: sorted(v.decode() for v, _ in alice.get_prefix("/app/")))
attempt("wider prefix", lambda: [v.decode() for v, _ in alice.get_prefix("/ap")])
attempt("delete outside", lambda: alice.delete("/other"))
attempt("txn outside", lambda: alice.transaction(
    compare=[alice.transactions.value("/app/p") == "v1"],
    success=[alice.transactions.put("/other", "x")],
    failure=[])[0])
attempt("txn inside", lambda: alice.transaction(
    compare=[alice.transactions.value("/app/p") == "v1"],
    success=[alice.transactions.put("/app/q", "x")],
    failure=[])[0])
anonymous = etcd3.client(host=host, port=port, timeout=10, ca_cert=ca)
attempt("no credentials", lambda: anonymous.get("/app/p")[0])
# Used within its TTL the token lives on; idle past it, it is gone.
time.sleep(idle / 2)
attempt("token in use", lambda: alice.get("/app/p")[0].decode())
time.sleep(idle / 2)
attempt("token still in use", lambda: alice.get("/app/p")[0].decode())
time.sleep(idle * 2)
attempt("idle token", lambda: alice.get("/app/p")[0].decode())
print(json.dumps(out))
"#;

/// The Python interpreter with python-etcd3, if present.
fn python_with_etcd3() -> Result<String, String> {
    for python in ["/usr/bin/python3", "python3"] {
        let found = Command::new(python)
            .args(["-c", "import etcd3"])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Ok(python.to_string());
        }
    }
    Err("python-etcd3 is not installed (apt-get install python3-etcd3)".into())
}

/// Root, and alice with read-write on `/app/`; auth on. Over TLS, trusting `ca`.
fn set_up_alice(ep: &str, ca: &std::path::Path) {
    let ca = format!("--cacert={}", ca.display());
    for args in [
        "user add root:rootpw",
        "user add alice:alicepw",
        "role add app",
        "role grant-permission app readwrite /app/ --prefix",
        "user grant-role alice app",
        "auth enable",
    ] {
        let mut argv = vec![ca.as_str()];
        argv.extend(args.split_whitespace());
        ok(etcdctl(ep, &argv));
    }
}

fn python_session(
    python: &str,
    endpoint: &str,
    idle: Duration,
    ca: &std::path::Path,
) -> serde_json::Value {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let out = Command::new(python)
        .args(["-c", PYTHON_SESSION, host, port])
        .arg(idle.as_secs_f64().to_string())
        .arg(ca)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python's JSON")
}

#[test]
fn python_client_with_auth_matches_etcd() {
    let python = match python_with_etcd3() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP python_client_with_auth_matches_etcd: {why}");
            return;
        }
    };
    if !have_etcdctl("python_client_with_auth_matches_etcd") {
        return;
    }
    // Tokens idle for 2 s expire; the session idles past that once.
    let idle = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let ca = kv_tests::certs::TestCa::new(dir.path(), "test");
    let server_cert = ca.issue("server");
    let cert = format!("--cert-file={}", server_cert.cert_file.display());
    let key = format!("--key-file={}", server_cert.key_file.display());
    let flags = ["--auth-token-ttl", "2", &cert, &key];
    let etcd = match kv_tests::start_etcd_tls(&dir.path().join("etcd"), &flags) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP python_client_with_auth_matches_etcd: {why}");
            return;
        }
    };
    let mut ours_flags = vec!["--listen-client-urls", "https://127.0.0.1:0"];
    ours_flags.extend(flags);
    let server = start_kv_server(&dir.path().join("ours"), &ours_flags);
    set_up_alice(&etcd.endpoint, &ca.cert_file);
    set_up_alice(&server.endpoint, &ca.cert_file);
    let theirs = python_session(&python, &etcd.endpoint, idle, &ca.cert_file);
    let ours = python_session(&python, &server.endpoint, idle, &ca.cert_file);
    assert_eq!(ours, theirs, "python-etcd3 saw different answers");
    let by_step = |name: &str| -> Vec<String> {
        ours.as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name)
            .unwrap_or_else(|| panic!("no step {name}"))
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|v| v.to_string())
            .collect()
    };
    assert_eq!(by_step("get in prefix"), ["\"ok\"", "\"v1\""]);
    assert_eq!(
        by_step("put outside"),
        [
            "\"StatusCode.PERMISSION_DENIED\"",
            "\"etcdserver: permission denied\""
        ]
    );
    assert_eq!(
        by_step("wrong password"),
        [
            "\"StatusCode.INVALID_ARGUMENT\"",
            "\"etcdserver: authentication failed, invalid user ID or password\""
        ]
    );
    assert_eq!(by_step("token still in use"), ["\"ok\"", "\"v1\""]);
    assert_eq!(
        by_step("idle token"),
        [
            "\"StatusCode.UNAUTHENTICATED\"",
            "\"etcdserver: invalid auth token\""
        ]
    );
}

/// Root, alice with read-write on `/app/`, and auth on, through the client's Auth API.
async fn set_up_with_client(endpoints: &[String]) {
    let admin = kv_client::Client::connect(endpoints, kv_client::ClientOptions::default())
        .await
        .expect("connect");
    let auth = admin.auth();
    auth.user_add("root", "rootpw").await.unwrap();
    auth.user_add("alice", "alicepw").await.unwrap();
    auth.role_add("app").await.unwrap();
    let app = kv_client::KeyPermission::prefix(kv_client::Access::ReadWrite, "/app/");
    auth.role_grant_permission("app", &app).await.unwrap();
    auth.user_grant_role("alice", "app").await.unwrap();
    auth.enable_with_root().await.unwrap();
}

async fn user(endpoints: &[String], name: &str, password: &str) -> kv_client::Client {
    let options = kv_client::ClientOptions::default().with_user(name, password);
    kv_client::Client::connect(endpoints, options)
        .await
        .unwrap_or_else(|e| panic!("connect as {name}: {e}"))
}

/// alice may write under `/app/` and nowhere else; returns the revision of her write.
async fn alice_is_checked(alice: &kv_client::Client, key: &str) -> i64 {
    use kv_client::{Error, PutOptions};
    let done = alice
        .kv()
        .put(key, "v", PutOptions::new())
        .await
        .unwrap_or_else(|e| panic!("alice's put of {key}: {e}"));
    assert_eq!(
        alice.kv().put("/other", "v", PutOptions::new()).await,
        Err(Error::PermissionDenied)
    );
    done.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_survives_a_leader_kill_and_a_restart_of_every_member() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = kv_tests::Cluster::start(3);
        let leader =
            kv_tests::wait_leader_among(&cluster, &[0, 1, 2], Duration::from_secs(10)).await;
        let endpoints = cluster.endpoints();
        set_up_with_client(&endpoints).await;
        let alice = user(&endpoints, "alice", "alicepw").await;
        alice_is_checked(&alice, "/app/1").await;

        // The leader goes: the others hold the same users, roles and tokens.
        cluster.kill(leader);
        alice_is_checked(&alice, "/app/2").await;
        let root = user(&cluster.endpoints(), "root", "rootpw").await;
        root.auth().user_add("bob", "bobpw").await.unwrap();
        // It comes back and catches up, auth changes included.
        cluster.start_member(leader);
        let back = [cluster.endpoint(leader)];
        let root_there = user(&back, "root", "rootpw").await;
        let mut users = Vec::new();
        for _ in 0..50 {
            users = root_there.auth().user_list().await.unwrap();
            if users.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(users, ["alice", "bob", "root"]);
        alice_is_checked(&user(&back, "alice", "alicepw").await, "/app/3").await;

        // Every member restarts: auth is still on, from the stored state; tokens (kept in
        // memory only) are gone, and the client renews its own.
        for i in 0..3 {
            cluster.kill(i);
        }
        for i in 0..3 {
            cluster.start_member(i);
        }
        let all = cluster.endpoints();
        let anonymous = kv_client::Client::connect(&all, kv_client::ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(
            anonymous
                .kv()
                .get("/app/1", kv_client::GetOptions::new())
                .await
                .err(),
            Some(kv_client::Error::UserEmpty)
        );
        let restarted = kv_client::Client::connect(
            &all,
            kv_client::ClientOptions::default().with_user("alice", "alicepw"),
        )
        .await
        .unwrap();
        alice_is_checked(&restarted, "/app/4").await;
        // The client from before the restart holds a token no member knows any more.
        alice_is_checked(&alice, "/app/5").await;
        let got = restarted
            .kv()
            .get("/app/", kv_client::GetOptions::new().prefix())
            .await
            .unwrap();
        assert_eq!(got.kvs.len(), 5);
        let root = user(&all, "root", "rootpw").await;
        assert!(root.auth().status().await.unwrap().enabled);
        assert_eq!(
            root.auth().user_list().await.unwrap(),
            ["alice", "bob", "root"]
        );
        // bob has no role: a token but no permission.
        let bob = user(&all, "bob", "bobpw").await;
        assert_eq!(
            bob.kv()
                .get("/app/1", kv_client::GetOptions::new())
                .await
                .err(),
            Some(kv_client::Error::PermissionDenied)
        );
    })
    .await
    .expect("test timed out");
}

/// `message` with the `token` metadata etcd's clients send, if any.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("token", t.parse().expect("token as metadata"));
    }
    request
}

/// The Lock and Election services run with the caller's rights, as etcd's in-process client
/// does: alice may lock and campaign under `/app/`, not elsewhere, and nobody may without
/// credentials. Refusals are code Unknown with etcd's text, as every failure of these services.
async fn recipes_services_scenario(endpoint: &str) {
    use kv_core::proto::etcdserverpb::{
        AuthenticateRequest, LeaseGrantRequest, auth_client::AuthClient, lease_client::LeaseClient,
    };
    use kv_core::proto::v3electionpb::{
        CampaignRequest, LeaderRequest, ResignRequest, election_client::ElectionClient,
    };
    use kv_core::proto::v3lockpb::{LockRequest, UnlockRequest, lock_client::LockClient};
    set_up_with_client(&[endpoint.to_string()]).await;
    let channel = kv_tests::connect_channel(endpoint).await;
    let token = AuthClient::new(channel.clone())
        .authenticate(AuthenticateRequest {
            name: "alice".into(),
            password: "alicepw".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let token = Some(token.as_str());
    let lease = LeaseClient::new(channel.clone())
        .lease_grant(with_token(LeaseGrantRequest { ttl: 60, id: 0 }, token))
        .await
        .unwrap()
        .into_inner()
        .id;
    let refused = |status: tonic::Status| (status.code(), status.message().to_string());
    let denied = (
        tonic::Code::Unknown,
        "etcdserver: permission denied".to_string(),
    );
    let nobody = (
        tonic::Code::Unknown,
        "etcdserver: user name is empty".to_string(),
    );

    let mut lock = LockClient::new(channel.clone());
    let lock_on = |name: &str| LockRequest {
        name: name.into(),
        lease,
    };
    let held = lock
        .lock(with_token(lock_on("/app/lock"), token))
        .await
        .unwrap()
        .into_inner()
        .key;
    assert!(held.starts_with(b"/app/lock/"), "{held:?}");
    let other = lock.lock(with_token(lock_on("/other/lock"), token)).await;
    assert_eq!(other.map_err(refused).err(), Some(denied.clone()));
    let anonymous = lock.lock(with_token(lock_on("/app/lock2"), None)).await;
    assert_eq!(anonymous.map_err(refused).err(), Some(nobody.clone()));
    let unlock = |key: &[u8]| UnlockRequest { key: key.to_vec() };
    let not_hers = lock.unlock(with_token(unlock(b"/other/x"), token)).await;
    assert_eq!(not_hers.map_err(refused).err(), Some(denied.clone()));
    lock.unlock(with_token(unlock(&held), token)).await.unwrap();

    let mut election = ElectionClient::new(channel);
    let campaign = |name: &str| CampaignRequest {
        name: name.into(),
        lease,
        value: b"alice".to_vec(),
    };
    let leader = election
        .campaign(with_token(campaign("/app/election"), token))
        .await
        .unwrap()
        .into_inner()
        .leader;
    let seen = election
        .leader(with_token(
            LeaderRequest {
                name: b"/app/election".to_vec(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.kv.unwrap().value, b"alice"[..]);
    let other = election
        .campaign(with_token(campaign("/other/election"), token))
        .await;
    assert_eq!(other.map_err(refused).err(), Some(denied.clone()));
    let peek = election
        .leader(with_token(
            LeaderRequest {
                name: b"/other/election".to_vec(),
            },
            token,
        ))
        .await;
    assert_eq!(peek.map_err(refused).err(), Some(denied));
    election
        .resign(with_token(ResignRequest { leader }, token))
        .await
        .unwrap();
}

kv_tests::on_both_servers!(
    recipes_services_scenario,
    lock_and_election_check_their_callers,
    lock_and_election_check_their_callers_on_etcd,
    60
);

/// The recipes over a client with credentials: a user's locks and queues work inside the
/// keys granted to it, and anywhere else fail with a typed refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_run_with_the_users_rights() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        let endpoints = [server.endpoint.clone()];
        set_up_with_client(&endpoints).await;
        let alice = user(&endpoints, "alice", "alicepw").await;
        let session = recipes::Session::with_ttl(&alice, 10).await.unwrap();
        let guard = recipes::Mutex::new(&session, "/app/lock")
            .lock()
            .await
            .expect("a lock under /app/");
        drop(guard);
        let refused = recipes::Mutex::new(&session, "/other/lock").lock().await;
        assert!(
            matches!(
                refused,
                Err(recipes::Error::Client(kv_client::Error::PermissionDenied))
            ),
            "{:?}",
            refused.map(|_| ())
        );
        let queue: recipes::Queue<String> = recipes::Queue::new(&alice, "/app/jobs");
        queue.enqueue(&"index".to_string()).await.unwrap();
        let job = queue.dequeue(&session).await.unwrap();
        assert_eq!(job.item, "index");
        job.ack().await.unwrap();
        let elsewhere: recipes::Queue<String> = recipes::Queue::new(&alice, "/other/jobs");
        assert!(matches!(
            elsewhere.enqueue(&"x".to_string()).await,
            Err(recipes::Error::Client(kv_client::Error::PermissionDenied))
        ));
    })
    .await
    .expect("test timed out");
}
