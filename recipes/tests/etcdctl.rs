//! `etcdctl lock` and `etcdctl elect` (Go's `concurrency` package) and our `Mutex` and
//! `Election` on the same names exclude and follow each other. Run against our server and
//! against etcd 3.4 with the same bodies.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use kv_client::{Client, ClientOptions};
use kv_tests::{have_etcdctl, on_both_servers, which};
use recipes::{Election, Error, Mutex, Observation, Session};

/// An etcdctl process whose stdout lines are read as they come.
struct Etcdctl {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Etcdctl {
    fn spawn(endpoint: &str, args: &[&str]) -> Etcdctl {
        let mut child = Command::new(which("etcdctl").expect("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Etcdctl { child, lines }
    }

    /// The next stdout line, which must come within 10 s.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no line from etcdctl within 10 s")
    }

    /// True if no line comes for a moment.
    fn quiet(&self) -> bool {
        self.lines.recv_timeout(Duration::from_millis(300)).is_err()
    }

    /// SIGTERM, as a user's Ctrl-C: etcdctl unlocks or resigns, then exits.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        self.child.wait().expect("etcdctl exit")
    }

    /// Waits (at most 10 s) for it to exit by itself.
    fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcdctl did not exit");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(endpoint: &str) -> (Client, Session) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let session = Session::with_ttl(&client, 10).await.unwrap();
    (client, session)
}

async fn lock_scenario(endpoint: &str) {
    if !have_etcdctl("etcdctl lock interop") {
        return;
    }
    let (_client, session) = connect(endpoint).await;
    let mutex = Mutex::new(&session, "shared");

    // Go holds: we are excluded, and queue behind it.
    let mut go = Etcdctl::spawn(endpoint, &["lock", "--ttl=5", "shared"]);
    let go_key = go.line();
    assert!(go_key.starts_with("shared/"), "{go_key}");
    assert!(matches!(mutex.try_lock().await, Err(Error::Locked)));
    let holder = mutex.holder().await.unwrap().expect("a holder");
    assert_eq!(String::from_utf8_lossy(&holder.key), go_key);
    let waiting = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert!(go.interrupt().success());
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("Rust did not get the lock after Go released it")
        .unwrap()
        .unwrap();

    // We hold: Go's command waits for us, then runs with the lock.
    let mut go = Etcdctl::spawn(
        endpoint,
        &[
            "lock",
            "shared",
            "--",
            "sh",
            "-c",
            "echo got $ETCD_LOCK_KEY",
        ],
    );
    assert!(go.quiet());
    assert!(
        go.running(),
        "etcdctl ran its command while Rust held the lock"
    );
    assert!(guard.unlock().await.unwrap());
    let line = go.line();
    assert!(line.starts_with("got shared/"), "{line}");
    assert!(go.wait().success());
}
on_both_servers!(
    lock_scenario,
    etcdctl_lock_and_our_mutex_exclude_each_other,
    etcdctl_lock_and_our_mutex_exclude_each_other_on_etcd,
    60
);

async fn observed(observer: &mut recipes::Observer) -> Observation {
    tokio::time::timeout(Duration::from_secs(10), observer.next())
        .await
        .expect("no observation within 10 s")
        .expect("observer ended")
        .expect("observer failed")
}

async fn elect_scenario(endpoint: &str) {
    if !have_etcdctl("etcdctl elect interop") {
        return;
    }
    let (client, session) = connect(endpoint).await;
    let election = Election::new(&client, "pick");
    let mut observer = election.observe();
    assert_eq!(observed(&mut observer).await, Observation::Vacant);

    // Go campaigns and wins; it prints its key and value.
    let mut go = Etcdctl::spawn(endpoint, &["elect", "pick", "go-value"]);
    let go_key = go.line();
    assert!(go_key.starts_with("pick/"), "{go_key}");
    assert_eq!(go.line(), "go-value");
    match observed(&mut observer).await {
        Observation::Elected(kv) => {
            assert_eq!(String::from_utf8_lossy(&kv.key), go_key);
            assert_eq!(kv.value, &b"go-value"[..]);
        }
        other => panic!("expected Go elected, got {other:?}"),
    }
    let listener = Etcdctl::spawn(endpoint, &["elect", "--listen", "pick"]);
    assert_eq!(listener.line(), go_key);
    assert_eq!(listener.line(), "go-value");

    // We campaign behind Go and take over when it resigns.
    let campaign = tokio::spawn({
        let election = election.clone();
        async move { election.campaign(&session, "rust-value").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!campaign.is_finished());
    assert!(go.interrupt().success());
    let leadership = tokio::time::timeout(Duration::from_secs(5), campaign)
        .await
        .expect("Rust not elected after Go resigned")
        .unwrap()
        .unwrap();
    assert_eq!(observed(&mut observer).await, Observation::Vacant);
    assert!(
        matches!(observed(&mut observer).await, Observation::Elected(kv) if kv.value == "rust-value")
    );
    let our_key = String::from_utf8_lossy(leadership.key()).into_owned();
    assert_eq!(listener.line(), our_key);
    assert_eq!(listener.line(), "rust-value");
    leadership.proclaim("rust-again").await.unwrap();
    assert_eq!(listener.line(), our_key);
    assert_eq!(listener.line(), "rust-again");
}
on_both_servers!(
    elect_scenario,
    etcdctl_elect_and_our_election_follow_each_other,
    etcdctl_elect_and_our_election_follow_each_other_on_etcd,
    60
);
