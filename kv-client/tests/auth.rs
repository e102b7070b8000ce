//! The client with authentication and TLS, against our server and against etcd 3.4 (same test
//! bodies): users and roles through the Auth API, typed refusals, and a token that expires
//! while idle being renewed by itself, for calls, a new watch and a lease kept alive.

use std::time::Duration;

use futures::StreamExt;
use kv_client::{
    Access, Client, ClientOptions, Error, GetOptions, KeyPermission, PutOptions, TlsOptions,
    WatchOptions,
};
use kv_tests::certs::{Issued, TestCa};
use kv_tests::{Proc, start_etcd_tls, start_kv_server};

/// Tokens idle this long expire (`--auth-token-ttl`).
const TOKEN_TTL_SECS: u64 = 2;
/// An idle spell that outlives a token.
const IDLE: Duration = Duration::from_secs(2 * TOKEN_TTL_SECS + 1);

/// A test CA, the servers' certificate and a client certificate for `alice`.
struct Certs {
    ca: TestCa,
    server: Issued,
    alice: Issued,
}

fn certs(dir: &std::path::Path) -> Certs {
    let ca = TestCa::new(dir, "client-test");
    Certs {
        server: ca.issue("server"),
        alice: ca.issue("alice"),
        ca,
    }
}

/// Server flags: `https://` with client certificates required, short token lifetimes.
fn flags(c: &Certs) -> Vec<String> {
    vec![
        format!("--cert-file={}", c.server.cert_file.display()),
        format!("--key-file={}", c.server.key_file.display()),
        format!("--trusted-ca-file={}", c.ca.cert_file.display()),
        format!("--auth-token-ttl={TOKEN_TTL_SECS}"),
    ]
}

fn tls(c: &Certs) -> TlsOptions {
    TlsOptions::with_ca(c.ca.cert_pem()).identity(c.alice.cert_pem(), c.alice.key_pem())
}

async fn connect(endpoint: &str, options: ClientOptions) -> kv_client::Result<Client> {
    Client::connect([endpoint], options).await
}

/// Root, and alice with read-write on `/app/`; auth on.
async fn set_up(endpoint: &str, c: &Certs) {
    let admin = connect(endpoint, ClientOptions::default().with_tls(tls(c)))
        .await
        .expect("connect without credentials while auth is off");
    let auth = admin.auth();
    auth.user_add("root", "rootpw").await.unwrap();
    auth.user_add("alice", "alicepw").await.unwrap();
    auth.role_add("app").await.unwrap();
    auth.role_grant_permission("app", &KeyPermission::prefix(Access::ReadWrite, "/app/"))
        .await
        .unwrap();
    auth.user_grant_role("alice", "app").await.unwrap();
    auth.enable_with_root().await.unwrap();
    // Now only credentials will do.
    assert_eq!(
        admin.kv().put("/app/x", "v", PutOptions::new()).await,
        Err(Error::UserEmpty)
    );
}

async fn auth_scenario(endpoint: String, c: Certs) {
    set_up(&endpoint, &c).await;
    let root = connect(
        &endpoint,
        ClientOptions::default()
            .with_tls(tls(&c))
            .with_user("root", "rootpw"),
    )
    .await
    .unwrap();
    let mut users = root.auth().user_list().await.unwrap();
    users.sort();
    assert_eq!(users, ["alice", "root"]);
    assert_eq!(
        root.auth().role_get("app").await.unwrap(),
        [KeyPermission::prefix(Access::ReadWrite, "/app/")]
    );
    // Wrong password: refused when connecting.
    let wrong = connect(
        &endpoint,
        ClientOptions::default()
            .with_tls(tls(&c))
            .with_user("alice", "nope"),
    )
    .await;
    assert_eq!(wrong.err(), Some(Error::AuthFailed));

    let alice = connect(
        &endpoint,
        ClientOptions::default()
            .with_tls(tls(&c))
            .with_user("alice", "alicepw"),
    )
    .await
    .unwrap();
    let kv = alice.kv();
    kv.put("/app/a", "1", PutOptions::new()).await.unwrap();
    assert_eq!(
        kv.put("/other", "1", PutOptions::new()).await,
        Err(Error::PermissionDenied)
    );
    assert_eq!(
        kv.get("/app", GetOptions::new().prefix()).await.err(),
        Some(Error::PermissionDenied),
        "a prefix wider than the grant"
    );
    assert_eq!(alice.auth().user_list().await, Err(Error::PermissionDenied));

    // Idle past the token's life: the next call renews it by itself.
    tokio::time::sleep(IDLE).await;
    let got = kv.get("/app/a", GetOptions::new()).await.unwrap();
    assert_eq!(got.kvs[0].value, b"1"[..]);

    // Idle again, then many calls at once: all are refused for the token, and they renew it
    // once between them (each Authenticate is a log entry, on etcd as here).
    tokio::time::sleep(IDLE).await;
    let before = root.maintenance().status().await.unwrap().raft_index;
    let gets = (0..32).map(|_| kv.get("/app/a", GetOptions::new()));
    for got in futures::future::join_all(gets).await {
        got.expect("a get after the token expired");
    }
    let after = root.maintenance().status().await.unwrap().raft_index;
    assert!(
        after - before <= 2,
        "{} log entries for one token renewal",
        after - before
    );

    // Idle again, then a watch: its create is refused for the token, and the client renews
    // it and creates the watch again.
    tokio::time::sleep(IDLE).await;
    let mut watch = alice.watch().watch("/app/", WatchOptions::new().prefix());
    // A watch "from now" sees writes made once it is established, which takes the refusal
    // and a renewal: root writes until alice's watch sees one.
    let writer = {
        let root = root.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let value = format!("seen {i}");
                root.kv()
                    .put("/app/w", value, PutOptions::new())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let update = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let update = watch.next().await.expect("watch open").expect("watch ok");
            if !update.events.is_empty() {
                return update;
            }
        }
    })
    .await
    .expect("no event on the watch created with an expired token");
    writer.abort();
    assert_eq!(update.events[0].kv.key, b"/app/w"[..]);
    // A watch it may not have is refused, typed.
    let mut denied = alice.watch().watch("/other", WatchOptions::new());
    let refusal = tokio::time::timeout(Duration::from_secs(10), denied.next())
        .await
        .expect("no answer to a refused watch");
    assert_eq!(
        refusal.map(|r| r.err()),
        Some(Some(Error::PermissionDenied))
    );

    // A lease kept alive across token expiries (renewals every third of 6 s; the token idles
    // out between them unless something else used it).
    let lease = alice.lease().grant(6, None).await.unwrap();
    kv.put("/app/leased", "v", PutOptions::new().lease(lease.id))
        .await
        .unwrap();
    tokio::time::sleep(IDLE).await;
    let kept = alice.lease().keep_alive(lease.id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(kept.try_lost(), None, "the kept lease was lost");
    let ttl = root
        .lease()
        .time_to_live(lease.id, false)
        .await
        .unwrap()
        .expect("lease alive");
    assert!(ttl.ttl > 0, "{ttl:?}");
    drop(kept);
}

async fn run(server: Proc, c: Certs) {
    tokio::time::timeout(
        Duration::from_secs(90),
        auth_scenario(server.endpoint.clone(), c),
    )
    .await
    .expect("test timed out");
    drop(server);
}

/// Our server on an `https://` client URL with [`flags`].
fn our_server(dir: &std::path::Path, c: &Certs) -> Proc {
    let mut args = vec![
        "--listen-client-urls".to_string(),
        "https://127.0.0.1:0".to_string(),
    ];
    args.extend(flags(c));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    start_kv_server(&dir.join("data"), &refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tls_on_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let server = our_server(dir.path(), &c);
    run(server, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tls_on_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let args = flags(&c);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let etcd = match start_etcd_tls(&dir.path().join("etcd"), &refs) {
        Ok(p) => p,
        Err(why) => return eprintln!("SKIP auth_and_tls_on_etcd: {why}"),
    };
    run(etcd, c).await;
}

/// Without the client certificate a server requiring one refuses the connection, and a
/// client trusting another CA refuses the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let server = our_server(dir.path(), &c);
    let quick = || ClientOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    connect(&server.endpoint, quick().with_tls(tls(&c)))
        .await
        .expect("with the client certificate");
    let no_identity = connect(
        &server.endpoint,
        quick().with_tls(TlsOptions::with_ca(c.ca.cert_pem())),
    )
    .await;
    assert!(
        no_identity.is_err(),
        "connected without a client certificate"
    );
    let other = TestCa::new(dir.path(), "other");
    let wrong_ca = connect(
        &server.endpoint,
        quick().with_tls(
            TlsOptions::with_ca(other.cert_pem()).identity(c.alice.cert_pem(), c.alice.key_pem()),
        ),
    )
    .await;
    assert!(wrong_ca.is_err(), "trusted a server of another CA");
}
