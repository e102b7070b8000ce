//! Service discovery end to end, against our server and etcd 3.4 with the same bodies:
//! registration, caches and pickers; re-registration after an external revoke; a hot spare
//! taking its id back; a cache behind a cut connection catching up, and re-listing after a
//! compaction; instances SIGKILLed and caches converging a TTL later; a tonic channel balanced
//! over live instances never calling one the cache dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_client::{Client, ClientOptions, GetOptions, PutOptions};
use kv_tests::{on_both_servers, start_kv_server};
use recipes::Error;
use recipes::discovery::{
    BalancedChannel, Changes, InstanceChange, InstanceInfo, PickerOptions, Random, RegisterOptions,
    Registration, RegistrationStatus, RoundRobin, Service, ServiceCache, Sticky,
};

/// Env var that turns this test binary into a process holding registrations (see
/// `registrant_process`).
const CHILD_ENV: &str = "RECIPES_DISCOVERY_CHILD";

async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect")
}

/// `fut`'s output, which must come within 10 s.
async fn soon<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("did not finish within 10 s")
}

/// The next change, which must come within 10 s.
async fn next(changes: &mut Changes) -> InstanceChange {
    soon(changes.next()).await.expect("the change stream ended")
}

/// Polls `ready` every 20 ms until it holds; panics after `within`.
async fn until(within: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(cache: &ServiceCache) -> Vec<String> {
    cache.instances().iter().map(|i| i.id.clone()).collect()
}

async fn register(service: &Service, id: &str, endpoint: &str, ttl: i64) -> Registration {
    soon(service.register_with(
        id,
        InstanceInfo::new(endpoint),
        RegisterOptions::new().ttl(ttl),
    ))
    .await
    .unwrap_or_else(|e| panic!("register {id}: {e}"))
}

fn added(change: InstanceChange) -> recipes::discovery::Instance {
    match change {
        InstanceChange::Added(i) => i,
        other => panic!("expected an addition, got {other:?}"),
    }
}

fn removed(change: InstanceChange) -> recipes::discovery::Instance {
    match change {
        InstanceChange::Removed(i) => i,
        other => panic!("expected a removal, got {other:?}"),
    }
}

async fn basic_scenario(endpoint: &str) {
    const TTL: i64 = 5;
    let client = connect(endpoint).await;
    let service = Service::new(&client, "disc-basic");
    let cache = soon(service.cache()).await.unwrap();
    let mut changes = cache.changes();
    assert!(cache.instances().is_empty());

    // Register: the cache and a one-shot list see the instance, with its lease.
    let a = soon(service.register_with(
        "a",
        InstanceInfo::new("127.0.0.1:1001").with_metadata("zone", "x"),
        RegisterOptions::new().ttl(TTL),
    ))
    .await
    .unwrap();
    let ra = a.registered().await.unwrap();
    // A status receiver reports changes from now on, not the status it started with.
    let mut a_status = a.watch_status();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a_status.changed())
            .await
            .is_err(),
        "a fresh status receiver fired with no change"
    );
    let ia = added(next(&mut changes).await);
    assert_eq!(ia.id, "a");
    assert_eq!(ia.endpoint, "127.0.0.1:1001");
    assert_eq!(ia.metadata.get("zone").map(String::as_str), Some("x"));
    assert_eq!(
        (ia.lease, ia.create_revision),
        (ra.lease, ra.create_revision)
    );
    let b = register(&service, "b", "127.0.0.1:1002", TTL).await;
    let rb = b.registered().await.unwrap();
    assert_eq!(added(next(&mut changes).await).id, "b");
    soon(cache.wait_revision(rb.revision)).await;
    assert!(cache.revision() >= rb.revision);
    assert_eq!(ids(&cache), ["a", "b"]);
    assert_eq!(
        service.instances().await.unwrap(),
        cache.instances().to_vec()
    );

    // The key layout: <service>/<id> = JSON, on the registration's lease.
    let raw = client
        .kv()
        .get("disc-basic/a", GetOptions::new())
        .await
        .unwrap();
    assert_eq!(raw.kvs[0].lease, ra.lease);
    let json: serde_json::Value = serde_json::from_slice(&raw.kvs[0].value).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"endpoint": "127.0.0.1:1001", "metadata": {"zone": "x"}})
    );
    let ttl = client
        .lease()
        .time_to_live(ra.lease, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ttl.granted_ttl, TTL);
    assert_eq!(ttl.keys, [b"disc-basic/a".to_vec()]);

    // A bad value is skipped and reported; a nested service's keys are not ours.
    client
        .kv()
        .put("disc-basic/bad", "not json", PutOptions::new())
        .await
        .unwrap();
    let nested = client
        .kv()
        .put(
            "disc-basic/nested/x",
            r#"{"endpoint":"127.0.0.1:9"}"#,
            PutOptions::new(),
        )
        .await
        .unwrap();
    soon(cache.wait_revision(nested.revision)).await;
    assert_eq!(ids(&cache), ["a", "b"]);
    let invalid = cache.invalid();
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].0, "bad");
    assert!(cache.last_error().is_none());

    // Pickers.
    let rr = RoundRobin::new(&cache);
    let turns: Vec<String> = (0..4).map(|_| rr.pick().unwrap().id).collect();
    assert_eq!(turns, ["a", "b", "a", "b"]);
    rr.note_error("a");
    assert!((0..5).all(|_| rr.pick().unwrap().id == "b"));
    let random = Random::with_options(
        &cache,
        PickerOptions {
            down_for: Duration::from_millis(300),
        },
    );
    let seen: BTreeSet<String> = (0..100).map(|_| random.pick().unwrap().id).collect();
    assert_eq!(seen.len(), 2);
    random.note_error("b");
    assert!((0..20).all(|_| random.pick().unwrap().id == "a"));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(!random.is_down("b"));
    let sticky = Sticky::new(&cache);
    let first = sticky.pick("user-42").unwrap().id;
    assert!((0..10).all(|_| sticky.pick("user-42").unwrap().id == first));
    sticky.note_error(&first);
    assert_ne!(sticky.pick("user-42").unwrap().id, first);

    // The lease is revoked behind the registration's back: it re-registers on a new one.
    client.lease().revoke(ra.lease).await.unwrap();
    assert_eq!(removed(next(&mut changes).await).lease, ra.lease);
    let back = added(next(&mut changes).await);
    assert_eq!(back.id, "a");
    assert_ne!(back.lease, ra.lease);
    let ra2 = a.registered().await.unwrap();
    assert_eq!(ra2.lease, back.lease);
    assert!(ra2.create_revision > ra.create_revision);

    // A new registration of "b" takes the id over; the old one stands by, then takes it back.
    let b2 = register(&service, "b", "127.0.0.1:2002", TTL).await;
    let rb2 = b2.registered().await.unwrap();
    match next(&mut changes).await {
        InstanceChange::Updated(i) => {
            assert_eq!(
                (i.endpoint.as_str(), i.lease),
                ("127.0.0.1:2002", rb2.lease)
            )
        }
        other => panic!("expected b updated, got {other:?}"),
    }
    let mut status = b.watch_status();
    soon(status.wait_for(|s| *s == RegistrationStatus::Displaced { lease: rb2.lease }))
        .await
        .unwrap();
    soon(b2.deregister()).await.unwrap();
    assert_eq!(removed(next(&mut changes).await).lease, rb2.lease);
    let taken_back = added(next(&mut changes).await);
    assert_eq!(
        (taken_back.endpoint.as_str(), taken_back.lease),
        ("127.0.0.1:1002", rb.lease)
    );
    assert_eq!(b.registered().await.unwrap().lease, rb.lease);

    // Deregister, and drop.
    soon(a.deregister()).await.unwrap();
    assert_eq!(removed(next(&mut changes).await).id, "a");
    assert!(
        client
            .lease()
            .time_to_live(ra2.lease, false)
            .await
            .unwrap()
            .is_none(),
        "deregistering revokes the lease"
    );
    drop(b);
    assert_eq!(removed(next(&mut changes).await).id, "b");
    assert!(cache.instances().is_empty());

    // Refused arguments.
    assert!(matches!(
        service.register("x/y", InstanceInfo::new("h:1")).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        service
            .register_with("c", InstanceInfo::new("h:1"), RegisterOptions::new().ttl(0))
            .await,
        Err(Error::Invalid(_))
    ));

    // A registration whose future is dropped half-way leaves nothing behind.
    for _ in 0..5 {
        let abandoned = tokio::time::timeout(
            Duration::from_millis(2),
            service.register("c", InstanceInfo::new("h:3")),
        )
        .await;
        drop(abandoned);
    }
    let mut gone = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone = service.instances().await.unwrap().is_empty();
    }
    assert!(gone, "a dropped registration stayed listed");
}
on_both_servers!(basic_scenario, basic_on_our_server, basic_on_etcd, 90);

/// A TCP forwarder that can cut every connection through it and refuse new ones for a while.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let target = target.to_string();
        let accept = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut downstream, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let target = target.clone();
                    let forwarding = tokio::spawn(async move {
                        if let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                        }
                    });
                    connections.lock().unwrap().push(forwarding.abort_handle());
                }
            }
        });
        Proxy {
            addr,
            cut,
            connections,
            accept,
        }
    }

    /// Breaks every connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

async fn reconnect_scenario(endpoint: &str) {
    const TTL: i64 = 10;
    const SHORT_TTL: i64 = 2;
    let direct = connect(endpoint).await;
    let proxy = Proxy::start(endpoint).await;
    let behind_proxy = connect(&proxy.addr.to_string()).await;
    let writer = Service::new(&direct, "disc-reconnect");
    let cut_off = Service::new(&behind_proxy, "disc-reconnect");
    let cache = soon(cut_off.cache()).await.unwrap();
    let mut changes = cache.changes();
    let a = register(&writer, "a", "h:1", TTL).await;
    let b = register(&writer, "b", "h:2", TTL).await;
    // p registers through the proxy, on a short lease.
    let p = register(&cut_off, "p", "h:9", SHORT_TTL).await;
    let rp = p.registered().await.unwrap();
    for id in ["a", "b", "p"] {
        assert_eq!(added(next(&mut changes).await).id, id);
    }

    // Cut off for longer than p's TTL. The cache misses the changes meanwhile and gets them
    // once it reconnects (its watch resumes); p's lease expires, and p registers again.
    proxy.cut();
    soon(a.deregister()).await.unwrap();
    let c = register(&writer, "c", "h:3", TTL).await;
    let mut expired = false;
    let deadline = Instant::now() + Duration::from_secs(SHORT_TTL as u64 + 5);
    while !expired && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        expired = writer
            .instances()
            .await
            .unwrap()
            .iter()
            .all(|i| i.id != "p");
    }
    assert!(expired, "p's lease did not expire while cut off");
    assert_eq!(
        ids(&cache),
        ["a", "b", "p"],
        "the cut-off cache saw changes"
    );
    proxy.restore();
    assert_eq!(removed(next(&mut changes).await).id, "a");
    assert_eq!(added(next(&mut changes).await).id, "c");
    assert_eq!(removed(next(&mut changes).await).lease, rp.lease);
    let back = added(next(&mut changes).await);
    assert_eq!(back.id, "p");
    assert_ne!(back.lease, rp.lease);
    assert_eq!(soon(p.registered()).await.unwrap().lease, back.lease);
    assert_eq!(ids(&cache), ["b", "c", "p"]);
    soon(p.deregister()).await.unwrap();
    assert_eq!(removed(next(&mut changes).await).id, "p");

    // q registers through the proxy; cut off again, and the history the cache's watch and
    // q's own watch would resume from is compacted. The cache lists again and reports the
    // difference; q reads its key again and stays as it was.
    let q = register(&cut_off, "q", "h:10", TTL).await;
    let rq = q.registered().await.unwrap();
    assert_eq!(added(next(&mut changes).await).id, "q");
    proxy.cut();
    soon(b.deregister()).await.unwrap();
    let d = register(&writer, "d", "h:4", TTL).await;
    let c2 = register(&writer, "c", "h:33", TTL).await;
    let now = direct
        .kv()
        .put("disc-reconnect-other", "x", PutOptions::new())
        .await
        .unwrap()
        .revision;
    direct.kv().compact(now, true).await.unwrap();
    proxy.restore();
    assert_eq!(removed(next(&mut changes).await).id, "b");
    match next(&mut changes).await {
        InstanceChange::Updated(i) => {
            assert_eq!((i.id.as_str(), i.endpoint.as_str()), ("c", "h:33"))
        }
        other => panic!("expected c updated, got {other:?}"),
    }
    assert_eq!(added(next(&mut changes).await).id, "d");
    assert_eq!(ids(&cache), ["c", "d", "q"]);
    assert!(cache.revision() >= now);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(q.status(), RegistrationStatus::Registered(rq));
    assert_eq!(cache.get("q").map(|i| i.mod_revision), Some(rq.revision));
    drop((c, c2, d, q));
}
on_both_servers!(
    reconnect_scenario,
    reconnect_on_our_server,
    reconnect_on_etcd,
    90
);

/// A process of this test binary holding registrations; SIGKILLed to crash them.
struct RegistrantProcess {
    child: Child,
}

impl RegistrantProcess {
    /// Starts a process registering `ids` in `service` with `ttl`, and waits until they are
    /// listed.
    fn start(endpoint: &str, service: &str, ttl: i64, ids: &[String]) -> RegistrantProcess {
        let what = format!("{endpoint} {service} {ttl} {}", ids.join(","));
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "registrant_process", "--ignored", "--nocapture"])
            .env(CHILD_ENV, what)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the registrant process");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "REGISTERED" {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the registrant process did not report");
        RegistrantProcess { child }
    }

    /// SIGKILL: no deregistration, no revoke; its leases just stop being renewed.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RegistrantProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test of its own: the body of a process started by [`RegistrantProcess`]. It
/// registers its instances, prints `REGISTERED`, and holds them until killed (or for two
/// minutes at most, should its parent vanish).
#[tokio::test]
#[ignore = "run by the discovery tests as a separate process"]
async fn registrant_process() {
    let what = std::env::var(CHILD_ENV).expect("started by a discovery test");
    let words: Vec<&str> = what.split(' ').collect();
    let client = connect(words[0]).await;
    let service = Service::new(&client, words[1]);
    let ttl: i64 = words[2].parse().unwrap();
    let mut held = Vec::new();
    for id in words[3].split(',') {
        held.push(register(&service, id, &format!("{id}.local:80"), ttl).await);
    }
    println!("REGISTERED");
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(held);
}

async fn killed_instances_scenario(endpoint: &str) {
    const TTL: i64 = 3;
    const PROCESSES: usize = 5;
    const PER_PROCESS: usize = 4;
    const KILLED: usize = 2;
    let service = "disc-killed";
    let ids_of =
        |p: usize| -> Vec<String> { (0..PER_PROCESS).map(|i| format!("p{p}-i{i}")).collect() };
    let mut processes: Vec<RegistrantProcess> = (0..PROCESSES)
        .map(|p| RegistrantProcess::start(endpoint, service, TTL, &ids_of(p)))
        .collect();
    let everyone: Vec<String> = (0..PROCESSES).flat_map(ids_of).collect();
    let survivors: Vec<String> = (KILLED..PROCESSES).flat_map(ids_of).collect();
    // Two readers, each on a client of its own.
    let mut caches = Vec::new();
    for _ in 0..2 {
        let client = connect(endpoint).await;
        caches.push(soon(Service::new(&client, service).cache()).await.unwrap());
    }
    let mut sorted = everyone.clone();
    sorted.sort();
    for cache in &caches {
        until(Duration::from_secs(10), "all 20 listed", || {
            ids(cache) == sorted
        })
        .await;
    }

    for p in processes.iter_mut().take(KILLED) {
        p.kill();
    }
    let killed = Instant::now();
    let mut converged = Vec::new();
    let mut waiting: Vec<usize> = (0..caches.len()).collect();
    let deadline = killed + Duration::from_secs(TTL as u64 + 10);
    while !waiting.is_empty() {
        assert!(Instant::now() < deadline, "caches did not converge");
        waiting.retain(|&c| {
            if ids(&caches[c]) == survivors {
                converged.push(killed.elapsed());
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "{} of {} instances SIGKILLed; caches converged after {:?} (TTL {TTL} s)",
        KILLED * PER_PROCESS,
        everyone.len(),
        converged
    );
    let slowest = converged.iter().max().copied().unwrap_or_default();
    let first = converged.iter().min().copied().unwrap_or_default();
    // Leases are renewed every TTL/3, so none can expire much sooner than 2/3 TTL.
    assert!(
        first >= Duration::from_secs(TTL as u64) / 2,
        "delisted before the lease could expire: {first:?}"
    );
    assert!(
        slowest <= Duration::from_secs(TTL as u64) + Duration::from_millis(1500),
        "converged too late: {slowest:?}"
    );
    drop(processes);
}
on_both_servers!(
    killed_instances_scenario,
    killed_instances_on_our_server,
    killed_instances_on_etcd,
    120
);

/// An embedded kv-server used as a gRPC instance: the answering member id says which one
/// served a call.
struct InstanceServer {
    member_id: u64,
    endpoint: String,
    running: Option<kv_server::server::Running>,
    _dir: tempfile::TempDir,
}

impl InstanceServer {
    async fn start(n: usize) -> InstanceServer {
        let dir = tempfile::tempdir().unwrap();
        let mut flags = kv_server::config::Flags::local(&dir.path().join("data")).unwrap();
        // The member id derives from the token: one per instance.
        flags.initial_cluster_token = format!("disc-instance-{n}");
        let running = kv_server::server::start(&flags).await.unwrap();
        let endpoint = running.client_addrs[0].to_string();
        let member_id = connect(&endpoint)
            .await
            .maintenance()
            .status()
            .await
            .unwrap()
            .member_id;
        InstanceServer {
            member_id,
            endpoint: format!("http://{endpoint}"),
            running: Some(running),
            _dir: dir,
        }
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stopper().cancel();
            let _ = running.wait().await;
        }
    }
}

/// Calls `etcdserverpb.Maintenance/Status` through `channel` and returns the answering member
/// id. recipes has no protobuf codegen, so the request (an empty message) and the one field
/// read back (`header.member_id`) are framed by hand.
async fn member_behind(channel: &mut tonic::transport::Channel) -> Result<u64, String> {
    use tonic::codegen::{Body as _, Service, http};
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/etcdserverpb.Maintenance/Status")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // A gRPC frame: not compressed, length 0 (StatusRequest has no fields).
        .body(tonic::body::Body::new(String::from("\0\0\0\0\0")))
        .map_err(|e| e.to_string())?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| e.to_string())?;
    let response = channel.call(request).await.map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    let message = bytes.get(5..).ok_or("no gRPC message in the answer")?;
    let header = field(message, 1).ok_or("no header in the answer")?;
    match field(header, 2) {
        Some(varint) => Ok(read_varint(varint).0),
        None => Err("no member id in the header".into()),
    }
}

/// Reads a protobuf varint: (value, length).
fn read_varint(bytes: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    (value, bytes.len())
}

/// The bytes of field `number` of a protobuf message: a length-delimited field's contents, or
/// the start of a varint field.
fn field(message: &[u8], number: u64) -> Option<&[u8]> {
    let mut at = 0;
    while at < message.len() {
        let (tag, n) = read_varint(&message[at..]);
        at += n;
        let here = message.get(at..)?;
        let skip = match tag & 7 {
            0 => read_varint(here).1,
            1 => 8,
            2 => {
                let (len, n) = read_varint(here);
                if tag >> 3 == number {
                    return here.get(n..n + len as usize);
                }
                n + len as usize
            }
            5 => 4,
            _ => return None,
        };
        if tag >> 3 == number && tag & 7 == 0 {
            return Some(here);
        }
        at += skip;
    }
    None
}

/// `n` Status calls through `channel`, ten at a time: the answering member ids and how many
/// calls failed.
async fn calls(channel: &tonic::transport::Channel, n: usize) -> (BTreeMap<u64, usize>, usize) {
    let mut answered = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n / 10 {
        let batch = (0..10).map(|_| {
            let mut channel = channel.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), member_behind(&mut channel))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
            }
        });
        for outcome in futures::future::join_all(batch).await {
            match outcome {
                Ok(member) => *answered.entry(member).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
    }
    (answered, failed)
}

/// Three embedded kv-servers are the instances of a service; a tonic channel balanced by the
/// discovery adapter spreads calls over them. One is deregistered while it still serves, one
/// crashes (server stopped, registration abandoned): once the cache drops either, no call
/// reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_channel_never_calls_an_instance_the_cache_dropped() {
    const TTL: i64 = 2;
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let registry = start_kv_server(&dir.path().join("data"), &[]);
        let client = connect(&registry.endpoint).await;
        let service = Service::new(&client, "disc-grpc");
        let mut instances = Vec::new();
        for n in 0..3 {
            instances.push(InstanceServer::start(n).await);
        }
        let members: BTreeSet<u64> = instances.iter().map(|i| i.member_id).collect();
        assert_eq!(members.len(), 3, "instances need distinct member ids");
        let mut registrations = Vec::new();
        for (n, instance) in instances.iter().enumerate() {
            registrations.push(register(&service, &format!("i{n}"), &instance.endpoint, TTL).await);
        }
        let cache = soon(service.cache()).await.unwrap();
        let balanced = BalancedChannel::new(&cache);
        soon(balanced.wait_routed(|ids| ids.len() == 3)).await;
        let channel = balanced.channel();

        let (answered, failed) = calls(&channel, 60).await;
        assert_eq!(failed, 0);
        assert_eq!(
            answered.keys().copied().collect::<BTreeSet<_>>(),
            members,
            "every instance serves: {answered:?}"
        );

        // i0 leaves discovery but keeps serving: a call reaching it would succeed, so any
        // that did would show.
        let mut registrations = registrations.into_iter();
        let (r0, r1, r2) = (
            registrations.next().unwrap(),
            registrations.next().unwrap(),
            registrations.next().unwrap(),
        );
        soon(r0.deregister()).await.unwrap();
        until(Duration::from_secs(5), "cache drops i0", || {
            cache.get("i0").is_none()
        })
        .await;
        soon(balanced.wait_routed(|ids| !ids.contains("i0"))).await;
        let (answered, failed) = calls(&channel, 200).await;
        eprintln!("after i0 was deregistered: {answered:?}, {failed} failed");
        assert_eq!(failed, 0);
        assert!(!answered.contains_key(&instances[0].member_id));
        assert_eq!(answered.len(), 2);

        // i1 crashes: its server stops and its lease is left to expire.
        instances[1].stop().await;
        r1.abandon();
        let crashed = Instant::now();
        until(
            Duration::from_secs(TTL as u64 + 5),
            "cache drops i1",
            || cache.get("i1").is_none(),
        )
        .await;
        eprintln!(
            "crashed instance delisted after {:?} (TTL {TTL} s)",
            crashed.elapsed()
        );
        soon(balanced.wait_routed(|ids| ids.iter().eq(["i2"]))).await;
        let (answered, failed) = calls(&channel, 200).await;
        assert_eq!(failed, 0);
        assert_eq!(
            answered.into_iter().collect::<Vec<_>>(),
            [(instances[2].member_id, 200)]
        );
        drop(r2);
        for instance in &mut instances {
            instance.stop().await;
        }
    })
    .await
    .expect("test timed out");
}
