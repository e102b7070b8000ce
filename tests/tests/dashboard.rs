//! The web dashboard (`/ui`) of a three-member cluster, loaded in headless Chromium (Debian's
//! `chromium`): the page, rendered by its own JavaScript from the live API, shows the leader,
//! every member, the lock holder, the election leader, the queue and the service; a second
//! load shows a new lock holder. A screenshot is kept in `target/test-artifacts/`.
//! Also: the dashboard's data needs a root user's credentials once auth is on.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions};
use kv_tests::scrape::{http_get, http_request_with};
use kv_tests::{Cluster, run_bounded, start_kv_server, wait_leader_among, which};
use recipes::discovery::{InstanceInfo, Service};
use recipes::{Election, Mutex, Queue, Session};

const CHROMIUM_LIMIT: Duration = Duration::from_secs(60);

/// Where test artifacts go: `target/test-artifacts` beside the test executables' profile dir.
fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    // target/<profile> → target
    dir.pop();
    let dir = dir.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom` or `--screenshot=...`), giving
/// the page's timers and fetches a few seconds of virtual time; returns its stdout.
fn chromium(url: &str, what: &str, profile: &std::path::Path) -> String {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        // Root in a container has no user namespace for the sandbox.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--window-size=1400,1300",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(what)
    .arg(url);
    let out = run_bounded(&mut cmd, CHROMIUM_LIMIT, "chromium");
    assert!(out.status.success(), "chromium: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM (its first text run).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(&rest[start..end])
}

/// Waits (at most 15 s) until the member at `endpoint` has applied `revision`.
fn wait_applied(endpoint: &str, revision: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = http_get(endpoint, "/ui/api/status", Duration::from_secs(5)).expect("status");
        let seen: serde_json::Value = serde_json::from_str(&status.body).expect("JSON");
        if seen["revision"].as_i64().unwrap_or(0) >= revision {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} did not apply {revision}: {seen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_leader_and_the_live_lock_holder_in_chromium() {
    if which("chromium").is_none() {
        eprintln!(
            "SKIP the_dashboard_shows_...: chromium is not installed (apt-get install chromium)"
        );
        return;
    }
    let cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    let all: Vec<usize> = (0..3).collect();
    let leader = wait_leader_among(&cluster, &all, Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let client = Client::connect(endpoints.clone(), ClientOptions::default())
        .await
        .expect("connect");
    let alice = Session::with_ttl(&client, 30).await.expect("session");
    let bob = Session::with_ttl(&client, 30).await.expect("session");
    let held = Mutex::new(&alice, "locks/dashboard")
        .lock()
        .await
        .expect("lock");
    let _leading = Election::new(&client, "elections/dashboard")
        .campaign(&alice, "indexer-on-host-a")
        .await
        .expect("campaign");
    let queue: Queue<serde_json::Value> = Queue::new(&client, "queues/dashboard");
    queue
        .enqueue(&serde_json::json!({"n": 1}))
        .await
        .expect("enqueue");
    queue
        .enqueue(&serde_json::json!({"n": 2}))
        .await
        .expect("enqueue");
    let _registered = Service::new(&client, "services/dashboard")
        .register("api-1", InstanceInfo::new("http://10.1.2.3:8080"))
        .await
        .expect("register");

    // Loaded from a follower: it still names the leader, and reads every member's own figures.
    // The follower serves its own applied state, so first it has to have applied the writes.
    let written = client
        .kv()
        .get("services/dashboard/api-1", Default::default())
        .await
        .expect("get")
        .revision;
    wait_applied(&endpoints[follower], written);
    let profile = tempfile::tempdir().expect("chromium profile");
    let url = format!("http://{}/ui", endpoints[follower]);
    let dom = chromium(&url, "--dump-dom", profile.path());
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page rendered its data:\n{dom}"
    );
    let leader_name = format!("m{leader}");
    assert_eq!(
        text_of(&dom, "leader-name"),
        Some(leader_name.as_str()),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "member-count"), Some("3"));
    assert_eq!(
        text_of(&dom, "served-by"),
        Some(format!("m{follower}").as_str())
    );
    assert!(
        !dom.contains("class=\"tag down\""),
        "every member answered: {dom}"
    );
    assert_eq!(
        dom.matches("class=\"tag leader\"").count(),
        1,
        "one leader marked"
    );
    for i in 0..3 {
        assert!(dom.contains(&format!(">m{i}<")), "member m{i} listed");
    }
    let holder = format!("locks/dashboard/{:x}", alice.lease());
    assert!(dom.contains(&holder), "the lock holder {holder} is shown");
    assert!(
        dom.contains(&format!(
            "{holder}</td><td class=\"num\">{}</td>",
            held.fence().revision
        )),
        "the holder's fencing token is shown beside it"
    );
    assert!(
        dom.contains("indexer-on-host-a"),
        "the election's leader is shown"
    );
    assert!(dom.contains("queues/dashboard") && dom.contains("services/dashboard"));
    assert!(dom.contains("http://10.1.2.3:8080"));

    let shot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &format!("--screenshot={}", shot.display()),
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        png.len() > 20_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());

    // The lock changes hands; the page shows the new holder.
    held.unlock().await.expect("unlock");
    let bobs = Mutex::new(&bob, "locks/dashboard")
        .lock()
        .await
        .expect("lock");
    wait_applied(&endpoints[follower], bobs.fence().revision);
    let dom = chromium(&url, "--dump-dom", profile.path());
    let new_holder = format!("locks/dashboard/{:x}", bob.lease());
    assert!(
        dom.contains(&new_holder),
        "the new holder {new_holder} is shown"
    );
    assert!(!dom.contains(&holder), "the old holder is gone");
    drop(bobs);

    // The history the charts draw grows by a sample a second.
    let history = http_get(
        &endpoints[follower],
        "/ui/api/history",
        Duration::from_secs(5),
    )
    .expect("history");
    let samples: serde_json::Value = serde_json::from_str(&history.body).expect("JSON");
    assert!(
        samples["samples"].as_array().is_some_and(|s| s.len() >= 2),
        "{samples}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_dashboard_data_needs_a_root_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_kv_server(dir.path(), &[]);
    let ep = server.endpoint.as_str();
    let state = |headers: &[(&str, &str)]| {
        http_request_with(ep, "GET", "/ui/api/state", headers, Duration::from_secs(10))
            .expect("GET /ui/api/state")
    };
    assert_eq!(
        state(&[]).status,
        200,
        "auth off: open, as every request is"
    );

    let client = Client::connect([ep], ClientOptions::default())
        .await
        .expect("connect");
    let auth = client.auth();
    auth.user_add("root", "rootpw").await.expect("root");
    auth.user_add("alice", "alicepw").await.expect("alice");
    auth.enable_with_root().await.expect("enable");

    let refused = state(&[]);
    assert_eq!(refused.status, 401, "{refused:?}");
    // base64("root:wrong"), base64("alice:alicepw"), base64("root:rootpw")
    assert_eq!(
        state(&[("Authorization", "Basic cm9vdDp3cm9uZw==")]).status,
        401
    );
    assert_eq!(
        state(&[("Authorization", "Basic YWxpY2U6YWxpY2Vwdw==")]).status,
        403
    );
    let root = [("Authorization", "Basic cm9vdDpyb290cHc=")];
    let granted = state(&root);
    assert_eq!(granted.status, 200, "{granted:?}");
    assert!(granted.body.contains("\"recipes\""));
    // Again (from the remembered verdict), still granted.
    assert_eq!(state(&root).status, 200);
    // /metrics stays open, as etcd's, but no longer names queues or services (key names).
    let metrics = http_get(ep, "/metrics", Duration::from_secs(5)).expect("metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("kv_recipe_locks_held"));
    assert!(!metrics.body.contains("kv_recipe_queue_items"));
    // The page itself and the numbers stay open, as /metrics does.
    assert_eq!(
        http_get(ep, "/ui", Duration::from_secs(5))
            .expect("page")
            .status,
        200
    );
    assert_eq!(
        http_get(ep, "/ui/api/status", Duration::from_secs(5))
            .expect("status")
            .status,
        200
    );
}
