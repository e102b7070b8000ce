//! Recipes under real failures on our server: members killed and restarted, sessions expired
//! under their holders, and holder processes SIGKILLed. Histories are checked from the
//! server's own record, not from what the clients believe.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{Client, ClientOptions, GetOptions, PutOptions, TxnOp, WatchOptions};
use kv_tests::{Cluster, start_kv_server};
use recipes::{Election, Error, Mutex, Observation, Session};

/// Env var that turns this test binary into a lock or election holder (see `holder_process`).
const CHILD_ENV: &str = "RECIPES_FAULTS_CHILD";

async fn connect(endpoints: &[String]) -> Client {
    Client::connect(endpoints, ClientOptions::default())
        .await
        .expect("connect")
}

/// One contender: lock, write "enter <fence>", pause, write "exit <fence>" (both guarded by
/// ownership), unlock; a new session whenever the old one is lost. Returns (critical sections,
/// guarded writes refused).
async fn contend(endpoints: Vec<String>, stop: Arc<AtomicBool>) -> (usize, usize) {
    let client = connect(&endpoints).await;
    let (mut sections, mut refused) = (0, 0);
    let mut session: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) {
        let s = match &session {
            Some(s) if s.try_lost().is_none() => s.clone(),
            _ => match Session::with_ttl(&client, 2).await {
                Ok(s) => {
                    session = Some(s.clone());
                    s
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let guard = match Mutex::new(&s, "mx").lock().await {
            Ok(g) => g,
            Err(Error::SessionLost(_) | Error::KeyDeleted(_)) => {
                session = None;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let fence = guard.fence().revision;
        for (step, pause) in [("enter", 30), ("exit", 0)] {
            let put = TxnOp::put("mx-log", format!("{step} {fence}"), PutOptions::new());
            match client.kv().txn(guard.txn().and_then([put])).await {
                Ok(r) if r.succeeded => {}
                Ok(_) => {
                    refused += 1;
                    break;
                }
                // An unknown outcome is not counted either way; the history decides. No
                // "exit" follows an "enter" that may not have landed: the check would take
                // the exit's lone landing for another holder's write inside the section.
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        sections += 1;
        let _ = guard.unlock().await;
    }
    (sections, refused)
}

/// The values of `key` in revision order, from its whole history.
async fn history(client: &Client, key: &str) -> Vec<String> {
    let last = client.kv().get(key, GetOptions::new()).await.unwrap();
    let mut updates = client
        .watch()
        .watch(key, WatchOptions::new().start_revision(1));
    let mut values = Vec::new();
    let mut seen_rev = 0;
    while seen_rev < last.kvs[0].mod_revision {
        let update = tokio::time::timeout(Duration::from_secs(20), updates.next())
            .await
            .expect("history watch stalled")
            .expect("history watch ended")
            .expect("history watch failed");
        for e in update.events {
            seen_rev = e.kv.mod_revision;
            values.push(String::from_utf8_lossy(&e.kv.value).into_owned());
        }
    }
    values
}

/// Checks the guarded writes in the order the cluster applied them: fences never go back, and
/// every "exit f" directly follows "enter f" (nobody else wrote inside f's critical section).
fn check_exclusion(log: &[String]) -> usize {
    let parsed: Vec<(&str, i64)> = log
        .iter()
        .map(|entry| {
            let (step, fence) = entry.split_once(' ').expect("step and fence");
            (step, fence.parse().expect("fence"))
        })
        .collect();
    let mut exits = 0;
    for (i, &(step, fence)) in parsed.iter().enumerate() {
        if i > 0 {
            assert!(
                fence >= parsed[i - 1].1,
                "fence went back at {i}: {:?}",
                &log[i.saturating_sub(3)..(i + 2).min(log.len())]
            );
        }
        if step == "exit" {
            exits += 1;
            assert_eq!(
                i.checked_sub(1).map(|p| parsed[p]),
                Some(("enter", fence)),
                "exit {fence} at {i} does not follow its enter: {:?}",
                &log[i.saturating_sub(3)..(i + 2).min(log.len())]
            );
        }
    }
    exits
}

/// Revokes the lease of the mutex's current holder (its session ends under it); true if done.
async fn revoke_current_holder(admin: &Client) -> bool {
    let oldest = GetOptions::new()
        .prefix()
        .sort(kv_client::SortTarget::Create, kv_client::SortOrder::Ascend)
        .limit(1);
    let Ok(holder) = admin.kv().get("mx/", oldest).await else {
        return false;
    };
    match holder.kvs.first() {
        Some(kv) => admin.lease().revoke(kv.lease).await.is_ok(),
        None => false,
    }
}

/// 8 contenders loop on one mutex over three members while members are killed and restarted
/// and the current holder's session is revoked under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_holds_through_member_kills_and_session_expiry() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = Cluster::start(3);
        let endpoints = cluster.endpoints();
        let admin = connect(&endpoints).await;
        let stop = Arc::new(AtomicBool::new(false));
        let contenders: Vec<_> = (0..8)
            .map(|i| {
                // Spread the contenders over the members.
                let mut mine = endpoints.clone();
                mine.rotate_left(i % 3);
                tokio::spawn(contend(mine, stop.clone()))
            })
            .collect();

        let mut revoked = 0;
        for round in 0..4 {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                revoked += usize::from(revoke_current_holder(&admin).await);
            }
            if round == 3 {
                break;
            }
            let victim = round % 3;
            cluster.kill(victim);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            cluster.start_member(victim);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        stop.store(true, Ordering::SeqCst);
        let (mut sections, mut refused) = (0, 0);
        for c in contenders {
            let (s, r) = c.await.expect("contender panicked");
            sections += s;
            refused += r;
        }
        let log = history(&admin, "mx-log").await;
        let exits = check_exclusion(&log);
        eprintln!(
            "{sections} critical sections, {exits} completed in the history, {} entries, \
             {refused} stale writes refused, {} sessions revoked",
            log.len(),
            revoked
        );
        assert!(exits >= 20, "too little progress: {exits} sections");
        assert!(revoked >= 3, "too few sessions revoked");
        assert!(refused >= 1, "no stale holder's write was refused");
    })
    .await
    .expect("test timed out");
}

/// A holder in a process of its own: this test binary re-run with [`CHILD_ENV`] set.
struct HolderProcess {
    child: Child,
    /// What the holder printed once it held: `<key> <create revision>`.
    held: String,
}

impl HolderProcess {
    /// Starts a holder of `what` ("lock <endpoint> <name> <ttl>" or "elect <endpoint> <name>
    /// <value> <ttl>") and waits until it holds.
    fn start(what: &str) -> HolderProcess {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "holder_process", "--ignored", "--nocapture"])
            .env(CHILD_ENV, what)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the holder process");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(held) = line.strip_prefix("HELD ") {
                    let _ = tx.send(held.to_string());
                }
            }
        });
        let held = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the holder process did not report holding");
        HolderProcess { child, held }
    }

    /// SIGKILLs it (no unlock, no resign, no revoke: its lease just stops being renewed).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HolderProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test of its own: the body of a holder process started by [`HolderProcess`]. It
/// takes the lock or leadership, prints `HELD <key> <revision>`, and holds until killed (or
/// for two minutes at most, should its parent vanish).
#[tokio::test]
#[ignore = "run by the fault tests as a separate process"]
async fn holder_process() {
    let what = std::env::var(CHILD_ENV).expect("started by a fault test with RECIPES_FAULTS_CHILD");
    let words: Vec<&str> = what.split(' ').collect();
    let client = connect(&[words[1].to_string()]).await;
    let ttl: i64 = words.last().unwrap().parse().unwrap();
    let session = Session::with_ttl(&client, ttl).await.unwrap();
    let (key, revision) = match words[0] {
        "lock" => {
            let guard = Mutex::new(&session, words[2]).lock().await.unwrap();
            let fence = guard.fence();
            std::mem::forget(guard);
            (fence.key, fence.revision)
        }
        "elect" => {
            let election = Election::new(&client, words[2]);
            let leadership = election.campaign(&session, words[3]).await.unwrap();
            let fence = leadership.detach();
            (fence.key, fence.revision)
        }
        other => panic!("unknown holder kind {other}"),
    };
    println!("HELD {} {revision}", String::from_utf8_lossy(&key));
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// A lock holder is SIGKILLed: the next waiter gets the lock once the holder's lease has
/// expired (a TTL after its last renewal), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holders_lock_passes_on_after_its_ttl_not_before() {
    const TTL: u64 = 3;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        let endpoint = server.endpoint.clone();
        let mut holder = HolderProcess::start(&format!("lock {endpoint} crash-lock {TTL}"));
        let client = connect(&[endpoint]).await;
        let session = Session::with_ttl(&client, 10).await.unwrap();
        let mutex = Mutex::new(&session, "crash-lock");
        let holder_rev: i64 = holder.held.split(' ').nth(1).unwrap().parse().unwrap();
        let waiting = tokio::spawn(async move {
            let guard = mutex.lock().await;
            (Instant::now(), guard)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "got the lock while it was held");
        holder.kill();
        let killed = Instant::now();
        let (acquired, guard) = waiting.await.unwrap();
        let guard = guard.expect("lock after the holder died");
        let after = acquired - killed;
        eprintln!("lock passed on {after:?} after the kill (TTL {TTL} s)");
        // The last renewal came at most TTL/3 before the kill.
        assert!(
            after >= Duration::from_secs(TTL) * 2 / 3,
            "passed on too early: {after:?}"
        );
        assert!(
            after <= Duration::from_secs(TTL) + Duration::from_secs(2),
            "passed on too late: {after:?}"
        );
        assert!(guard.fence().revision > holder_rev);
    })
    .await
    .expect("test timed out");
}

async fn next(observer: &mut recipes::Observer) -> Observation {
    tokio::time::timeout(Duration::from_secs(10), observer.next())
        .await
        .expect("no observation within 10 s")
        .expect("observer ended")
        .expect("observer failed")
}

/// The leader's process is SIGKILLed: an observer sees the leadership vacant, then the
/// waiting candidate elected; the new leader's resignation hands over to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_observed_vacant_then_replaced() {
    const TTL: u64 = 3;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let server = start_kv_server(&dir.path().join("data"), &[]);
        let endpoint = server.endpoint.clone();
        let mut leader = HolderProcess::start(&format!("elect {endpoint} el-crash first {TTL}"));
        let client = connect(&[endpoint]).await;
        let election = Election::new(&client, "el-crash");
        let mut observer = election.observe();
        match next(&mut observer).await {
            Observation::Elected(kv) => assert_eq!(kv.value, &b"first"[..]),
            other => panic!("expected the first leader, got {other:?}"),
        }
        let (s2, s3) = (
            Session::with_ttl(&client, 10).await.unwrap(),
            Session::with_ttl(&client, 10).await.unwrap(),
        );
        let second = tokio::spawn({
            let election = election.clone();
            async move { election.campaign(&s2, "second").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let third = tokio::spawn({
            let election = election.clone();
            async move { election.campaign(&s3, "third").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        leader.kill();
        let killed = Instant::now();
        assert_eq!(next(&mut observer).await, Observation::Vacant);
        match next(&mut observer).await {
            Observation::Elected(kv) => assert_eq!(kv.value, &b"second"[..]),
            other => panic!("expected the second leader, got {other:?}"),
        }
        eprintln!("new leader observed {:?} after the kill", killed.elapsed());
        let second = second.await.unwrap().expect("second elected");
        assert!(!third.is_finished());
        second.resign().await.unwrap();
        assert_eq!(next(&mut observer).await, Observation::Vacant);
        match next(&mut observer).await {
            Observation::Elected(kv) => assert_eq!(kv.value, &b"third"[..]),
            other => panic!("expected the third leader, got {other:?}"),
        }
        let third = third.await.unwrap().expect("third elected");
        assert_eq!(election.leader().await.unwrap().unwrap().key, third.key());
    })
    .await
    .expect("test timed out");
}
