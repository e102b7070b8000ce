//! TLS on client and peer URLs through the real binary: etcdctl with and without client
//! certificates, a wrong CA refused, the certificate's common name as the user, compared with
//! etcd 3.4 given the same certificates; and a 3-member cluster over TLS peer links.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use kv_tests::certs::{Issued, TestCa};
use kv_tests::{Cluster, etcdctl_command, have_etcdctl, ok, start_etcd_tls, start_kv_server};

/// The certificates of a test: a good CA with a server certificate and client certificates
/// for root, alice and nobody (no such user); another CA with a client certificate and a
/// server certificate of its own.
struct Certs {
    ca: TestCa,
    other: TestCa,
    server: Issued,
    root: Issued,
    alice: Issued,
    nobody: Issued,
    mallory: Issued,
    other_server: Issued,
}

fn certs(dir: &Path) -> Certs {
    let ca = TestCa::new(dir, "good");
    let other = TestCa::new(dir, "other");
    Certs {
        server: ca.issue("server"),
        root: ca.issue("root"),
        alice: ca.issue("alice"),
        nobody: ca.issue("nobody"),
        mallory: other.issue("alice"),
        other_server: other.issue("server"),
        ca,
        other,
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// etcdctl against `endpoint` with TLS arguments, bounded by a short dial timeout (a refused
/// handshake otherwise waits the whole default).
fn etcdctl_tls(endpoint: &str, tls: &[String], args: &[&str]) -> Output {
    etcdctl_command(endpoint, "3s")
        .args(tls)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl")
}

/// The TLS arguments presenting `client` (if any) and trusting `ca`.
fn tls_args(ca: &Path, client: Option<&Issued>) -> Vec<String> {
    let mut args = vec![format!("--cacert={}", path(ca))];
    if let Some(c) = client {
        args.push(format!("--cert={}", path(&c.cert_file)));
        args.push(format!("--key={}", path(&c.key_file)));
    }
    args
}

/// What a step showed: exit code, stdout and the `Error:` lines (without the client's JSON
/// warnings).
fn shown(out: &Output) -> (Option<i32>, String, Vec<String>) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .map(str::to_string)
            .collect(),
    )
}

/// How a step's outcome is compared with etcd's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Same exit code, stdout and error text.
    Same,
    /// Both refuse (a handshake failure, whose wording is each TLS library's own).
    BothFail,
}

/// Server flags for `https://` client URLs with `certs`' server certificate; `mutual` adds
/// the CA (client certificates required) and `--client-cert-auth`.
fn server_flags(c: &Certs, mutual: bool) -> Vec<String> {
    let mut flags = vec![
        format!("--cert-file={}", path(&c.server.cert_file)),
        format!("--key-file={}", path(&c.server.key_file)),
    ];
    if mutual {
        flags.push(format!("--trusted-ca-file={}", path(&c.ca.cert_file)));
        flags.push("--client-cert-auth".to_string());
    }
    flags
}

/// kv-server on an `https://` client URL with `flags`, its data in `dir/ours-<label>`.
fn start_ours(dir: &Path, label: &str, flags: &[String]) -> kv_tests::Proc {
    let mut args = vec!["--listen-client-urls", "https://127.0.0.1:0"];
    args.extend(flags.iter().map(String::as_str));
    start_kv_server(&dir.join(format!("ours-{label}")), &args)
}

/// Runs `steps` against etcd and against kv-server, both started with `flags`, and compares.
fn compare(dir: &Path, label: &str, flags: &[String], steps: &[(Expect, Vec<String>, &[&str])]) {
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let etcd = match start_etcd_tls(&dir.join(format!("etcd-{label}")), &flag_refs) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP the etcd comparison of {label}: {why}");
            return;
        }
    };
    let ours = start_ours(dir, label, flags);
    let mut differences = Vec::new();
    for (i, (expect, tls, args)) in steps.iter().enumerate() {
        let theirs = shown(&etcdctl_tls(&etcd.endpoint, tls, args));
        let got = shown(&etcdctl_tls(&ours.endpoint, tls, args));
        let agree = match expect {
            Expect::Same => theirs == got,
            Expect::BothFail => theirs.0 != Some(0) && got.0 != Some(0),
        };
        if !agree {
            differences.push(format!(
                "step {i} {args:?} with {tls:?}\n  etcd: {theirs:?}\n  ours: {got:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{label}: {} steps differ:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

#[test]
fn etcdctl_over_tls_with_and_without_client_certificates_matches_etcd() {
    if !have_etcdctl("etcdctl_over_tls_with_and_without_client_certificates_matches_etcd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let good = |client: Option<&Issued>| tls_args(&c.ca.cert_file, client);
    let wrong_ca = tls_args(&c.other.cert_file, None);
    use Expect::*;
    // The server shows its certificate; clients need none.
    compare(
        dir.path(),
        "server-only",
        &server_flags(&c, false),
        &[
            (Same, good(None), &["put", "k", "v"]),
            (Same, good(None), &["get", "k"]),
            // A client certificate is accepted when offered, not needed.
            (Same, good(Some(&c.alice)), &["get", "k"]),
            // A client trusting another CA refuses the server.
            (BothFail, wrong_ca.clone(), &["get", "k"]),
        ],
    );
    // Client certificates required and signed by the CA.
    compare(
        dir.path(),
        "mutual",
        &server_flags(&c, true),
        &[
            (Same, good(Some(&c.alice)), &["put", "k", "v"]),
            (Same, good(Some(&c.alice)), &["get", "k"]),
            (BothFail, good(None), &["get", "k"]),
            (BothFail, good(Some(&c.mallory)), &["get", "k"]),
            (BothFail, wrong_ca, &["get", "k"]),
        ],
    );
    // With auth on, a verified certificate's common name is the user; a token wins over it.
    let mut steps: Vec<(Expect, Vec<String>, &[&str])> = SET_UP
        .iter()
        .map(|args| (Same, good(Some(&c.root)), *args))
        .collect();
    let alice = || good(Some(&c.alice));
    steps.extend([
        (Same, alice(), &["put", "/app/x", "1"][..]),
        (Same, alice(), &["get", "/app/x"][..]),
        (Same, alice(), &["put", "/other", "1"][..]),
        (Same, alice(), &["user", "list"][..]),
        (
            Same,
            alice(),
            &["--user", "root:rootpw", "put", "/other", "by-token"][..],
        ),
        (Same, good(Some(&c.root)), &["get", "/other"][..]),
        (Same, good(Some(&c.root)), &["user", "list"][..]),
        (Same, good(Some(&c.nobody)), &["get", "/app/x"][..]),
        (Same, good(Some(&c.nobody)), &["user", "list"][..]),
    ]);
    compare(dir.path(), "common-name", &server_flags(&c, true), &steps);
    // And what it did, on ours alone.
    let ours = start_ours(dir.path(), "check", &server_flags(&c, true));
    for args in SET_UP {
        ok(etcdctl_tls(&ours.endpoint, &good(Some(&c.root)), args));
    }
    let alice = good(Some(&c.alice));
    assert_eq!(
        ok(etcdctl_tls(&ours.endpoint, &alice, &["put", "/app/x", "1"])),
        "OK\n"
    );
    let denied = shown(&etcdctl_tls(
        &ours.endpoint,
        &alice,
        &["put", "/other", "1"],
    ));
    assert_eq!(denied.2, ["Error: etcdserver: permission denied"]);
    let plain = shown(&etcdctl_tls(
        &ours.endpoint,
        &good(None),
        &["get", "/app/x"],
    ));
    assert_ne!(plain.0, Some(0), "no client certificate, no connection");
}

/// Root, alice with read-write on `/app/`, bob without a password; auth on.
const SET_UP: &[&[&str]] = &[
    &["user", "add", "root:rootpw"],
    &["user", "add", "alice:alicepw"],
    &["user", "add", "bob", "--no-password"],
    &["role", "add", "app"],
    &[
        "role",
        "grant-permission",
        "app",
        "readwrite",
        "/app/",
        "--prefix",
    ],
    &["user", "grant-role", "alice", "app"],
    &["auth", "enable"],
];

/// Flags for a member of a cluster over TLS: client and peer certificates of `c`, both
/// required of whoever dials.
fn member_flags(c: &Certs) -> Vec<String> {
    let mut flags = server_flags(c, true);
    flags.extend([
        format!("--peer-cert-file={}", path(&c.server.cert_file)),
        format!("--peer-key-file={}", path(&c.server.key_file)),
        format!("--peer-trusted-ca-file={}", path(&c.ca.cert_file)),
        "--peer-client-cert-auth".to_string(),
    ]);
    flags
}

#[test]
fn a_three_member_cluster_over_tls_peer_links_replicates_and_survives_a_leader_kill() {
    if !have_etcdctl("a_three_member_cluster_over_tls_peer_links") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let flags = member_flags(&c);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start_tls(3, &refs);
    let tls = tls_args(&c.ca.cert_file, Some(&c.alice));
    let all = cluster.endpoints().join(",");
    assert_eq!(ok(etcdctl_tls(&all, &tls, &["put", "k", "v1"])), "OK\n");
    // Every member has it, read from itself (a serializable read on a follower may trail the
    // commit for a moment).
    for ep in cluster.endpoints() {
        assert!(
            serves(&ep, &tls, "v1\n", 40),
            "member {ep} never served the write"
        );
    }
    let members = ok(etcdctl_tls(&all, &tls, &["member", "list"]));
    assert_eq!(
        members.matches("https://127.0.0.1:").count(),
        6,
        "{members}"
    );
    // The leader goes; the other two elect one over TLS and go on.
    let status = ok(etcdctl_tls(
        &all,
        &tls,
        &["endpoint", "status", "-w", "json"],
    ));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let leader = status[0]["Status"]["leader"].as_u64().unwrap();
    let leader_index = status
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))
        .unwrap();
    cluster.kill(leader_index);
    let rest = cluster.endpoints().join(",");
    let mut wrote = false;
    for _ in 0..30 {
        if etcdctl_tls(&rest, &tls, &["put", "k", "v2"])
            .status
            .success()
        {
            wrote = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(wrote, "no write after the leader was killed");
    cluster.start_member(leader_index);
    let back = cluster.endpoint(leader_index);
    assert!(
        serves(&back, &tls, "v2\n", 40),
        "the restarted member did not catch up over TLS"
    );
}

/// Whether member `ep` serves `want` for `k` from its own state within `tries` quarter
/// seconds.
fn serves(ep: &str, tls: &[String], want: &str, tries: usize) -> bool {
    (0..tries).any(|_| {
        let got = etcdctl_tls(
            ep,
            tls,
            &["get", "k", "--consistency=s", "--print-value-only"],
        );
        let served = got.status.success() && String::from_utf8_lossy(&got.stdout) == want;
        if !served {
            std::thread::sleep(Duration::from_millis(250));
        }
        served
    })
}

#[test]
fn a_peer_with_a_certificate_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let flags = member_flags(&c);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = Cluster::start_tls(1, &refs);
    let peer_url = cluster.members[0].peer_url.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use kv_core::proto::etcdserverpb::{StatusRequest, maintenance_client::MaintenanceClient};
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let call = |identity: &Issued, ca: Vec<u8>| {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(identity.cert_pem(), identity.key_pem()));
            let endpoint = Endpoint::from_shared(peer_url.clone())
                .unwrap()
                .connect_timeout(Duration::from_secs(3))
                .tls_config(config)
                .unwrap();
            // Under TLS 1.3 a client finishes its handshake before the server has checked
            // the client's certificate: only a call shows whether the link holds. The peer
            // port serves no Maintenance, so a link that holds answers Unimplemented.
            async move {
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                let answer = MaintenanceClient::new(channel)
                    .status(StatusRequest {})
                    .await
                    .expect_err("the peer port serves no Maintenance");
                match answer.code() {
                    tonic::Code::Unimplemented => Ok(()),
                    _ => Err(answer.to_string()),
                }
            }
        };
        // The member's own kind of certificate gets through; another CA's does not, and a
        // dialer trusting only the other CA refuses the member.
        call(&c.server, c.ca.cert_pem())
            .await
            .expect("a peer with a good certificate");
        let refused = call(&c.mallory, c.ca.cert_pem()).await;
        assert!(
            refused.is_err(),
            "a peer certificate from another CA got through"
        );
        let ours_trusting_other = call(&c.other_server, c.other.cert_pem()).await;
        assert!(
            ours_trusting_other.is_err(),
            "the member's certificate passed another CA"
        );
    });
}
