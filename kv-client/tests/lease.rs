//! The lease sub-client against our server and against etcd 3.4 (same test bodies), and
//! keep-alive through an external revoke, a dead server, a server restart and a member kill.

use std::time::{Duration, Instant};

use kv_client::{Client, ClientOptions, Error, GetOptions, LeaseLost, PutOptions};
use kv_tests::{Cluster, start_kv_server, start_kv_server_with, wait_leader_among};

/// An id nobody grants.
const UNKNOWN: i64 = 0x0bad_1ea5e;

async fn connect(endpoints: &[String]) -> Client {
    Client::connect(endpoints, ClientOptions::default())
        .await
        .expect("connect")
}

fn text(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

async fn exists(client: &Client, key: &str) -> bool {
    let got = client.kv().get(key, GetOptions::new()).await.unwrap();
    !got.kvs.is_empty()
}

/// Polls until lease `id` is gone; returns when it was first seen gone.
async fn wait_gone(client: &Client, id: i64, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if client
            .lease()
            .time_to_live(id, false)
            .await
            .unwrap()
            .is_none()
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "lease {id:#x} still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything the lease sub-client offers, against one fresh server.
async fn lease_scenario(endpoint: &str) {
    let client = connect(&[endpoint.to_string()]).await;
    let lease = client.lease();

    // Grants: the server's id or ours, the TTL raised to the minimum, typed refusals.
    let chosen = lease.grant(30, None).await.unwrap();
    assert!(chosen.id > 0, "{chosen:?}");
    assert_eq!((chosen.ttl, chosen.revision), (30, 1));
    let short = lease.grant(1, None).await.unwrap();
    assert_eq!(short.ttl, 2, "{short:?}");
    let mine = 0x7e57_0001;
    let grant = lease.grant(60, Some(mine)).await.unwrap();
    assert_eq!((grant.id, grant.ttl), (mine, 60));
    assert_eq!(lease.grant(10, Some(mine)).await, Err(Error::LeaseExists));
    assert_eq!(
        lease.grant(9_000_000_001, None).await,
        Err(Error::LeaseTtlTooLarge)
    );
    let mut want = vec![chosen.id, short.id, mine];
    want.sort_unstable();
    assert_eq!(lease.leases().await.unwrap(), want);
    lease.revoke(short.id).await.unwrap();

    // Time-to-live lists keys, without the namespace of the asking client.
    let kv = client.kv();
    kv.put("a", "1", PutOptions::new().lease(mine))
        .await
        .unwrap();
    let app = client.with_namespace("app/");
    app.kv()
        .put("k", "1", PutOptions::new().lease(mine))
        .await
        .unwrap();
    let ttl = lease.time_to_live(mine, true).await.unwrap().expect("live");
    assert_eq!(ttl.granted_ttl, 60);
    assert!(ttl.ttl > 55 && ttl.ttl <= 60, "{ttl:?}");
    assert_eq!(text(&ttl.keys), ["a", "app/k"]);
    let inside = app.lease().time_to_live(mine, true).await.unwrap().unwrap();
    assert_eq!(text(&inside.keys), ["k"]);
    let bare = lease.time_to_live(mine, false).await.unwrap().unwrap();
    assert!(bare.keys.is_empty(), "{bare:?}");
    assert_eq!(lease.time_to_live(UNKNOWN, true).await, Ok(None));

    // Keep-alive: renewed once before it returns; an unknown lease is refused.
    assert_eq!(
        lease.keep_alive(UNKNOWN).await.err(),
        Some(Error::LeaseNotFound)
    );
    let kept = lease.keep_alive(chosen.id).await.unwrap();
    assert_eq!(
        (kept.id(), kept.ttl(), kept.try_lost()),
        (chosen.id, 30, None)
    );
    assert!(kept.valid_until() > Instant::now() + Duration::from_secs(25));

    // Revoke deletes the keys in one revision; a second revoke is refused.
    let before = kv.get("a", GetOptions::new()).await.unwrap().revision;
    assert_eq!(lease.revoke(mine).await, Ok(before + 1));
    assert!(!exists(&client, "a").await);
    assert!(!exists(&app, "k").await);
    assert_eq!(lease.revoke(mine).await, Err(Error::LeaseNotFound));
    assert_eq!(lease.time_to_live(mine, false).await, Ok(None));
    assert_eq!(lease.leases().await.unwrap(), [chosen.id]);
}

kv_tests::on_both_servers!(lease_scenario, lease_on_our_server, lease_on_etcd, 30);

/// A TTL-2 lease kept alive (by two handles, from two views of the client) keeps its key for
/// 6 s; one handle dropped changes nothing; the last one dropped lets it expire.
async fn keep_alive_until_dropped(endpoint: &str) {
    let client = connect(&[endpoint.to_string()]).await;
    let lease = client.lease().grant(2, None).await.unwrap();
    client
        .kv()
        .put("held", "v", PutOptions::new().lease(lease.id))
        .await
        .unwrap();
    let first = client.lease().keep_alive(lease.id).await.unwrap();
    let second = client
        .with_namespace("other/")
        .lease()
        .keep_alive(lease.id)
        .await
        .unwrap();
    let clone = second.clone();
    drop(second);
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        exists(&client, "held").await,
        "the key expired while kept alive"
    );
    assert_eq!((clone.ttl(), clone.try_lost()), (2, None));
    let valid_until = clone.valid_until();
    assert!(valid_until > Instant::now(), "{clone:?}");
    drop(clone);
    // Renewed last no later than a renewal period before `valid_until`, so it is gone about
    // `valid_until` (plus the server's expiry pass).
    let gone = wait_gone(&client, lease.id, Duration::from_secs(6)).await;
    assert!(
        gone < valid_until + Duration::from_millis(1500),
        "gone {:?} after its deadline",
        gone - valid_until
    );
    assert!(!exists(&client, "held").await);
}

kv_tests::on_both_servers!(
    keep_alive_until_dropped,
    keep_alive_holds_a_lease_until_the_last_handle_drops,
    keep_alive_holds_a_lease_until_the_last_handle_drops_on_etcd,
    30
);

/// A revoke by another client is reported at the next renewal, to every handle; a later
/// keep-alive of the id is refused.
async fn loss_on_revoke(endpoint: &str) {
    let client = connect(&[endpoint.to_string()]).await;
    let other = connect(&[endpoint.to_string()]).await;
    let lease = client.lease().grant(3, None).await.unwrap();
    let bystander = client.lease().grant(3, None).await.unwrap();
    let kept = client.lease().keep_alive(lease.id).await.unwrap();
    let kept_too = client.lease().keep_alive(bystander.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    other.lease().revoke(lease.id).await.unwrap();
    let revoked = Instant::now();
    let why = tokio::time::timeout(Duration::from_secs(3), kept.lost())
        .await
        .expect("loss reported within a renewal period");
    assert_eq!(why, LeaseLost::NotFound);
    assert!(revoked.elapsed() <= Duration::from_millis(1500), "{kept:?}");
    assert_eq!(kept.try_lost(), Some(LeaseLost::NotFound));
    assert_eq!(kept_too.try_lost(), None, "the other lease is unaffected");
    assert_eq!(
        client.lease().keep_alive(lease.id).await.err(),
        Some(Error::LeaseNotFound)
    );
}

kv_tests::on_both_servers!(
    loss_on_revoke,
    lost_fires_after_an_external_revoke,
    lost_fires_after_an_external_revoke_on_etcd,
    30
);

/// With the server gone, the lease is reported lost at its deadline: not before, and soon
/// after.
#[tokio::test]
async fn lost_fires_at_the_deadline_when_no_renewal_gets_through() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().unwrap();
        let mut server = start_kv_server(&dir.path().join("data"), &[]);
        let client = connect(std::slice::from_ref(&server.endpoint)).await;
        let lease = client.lease().grant(2, None).await.unwrap();
        let kept = client.lease().keep_alive(lease.id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        server.kill();
        let why = kept.lost().await;
        let at = Instant::now();
        assert_eq!(why, LeaseLost::DeadlinePassed);
        let valid_until = kept.valid_until();
        assert!(at >= valid_until, "reported {:?} early", valid_until - at);
        assert!(
            at < valid_until + Duration::from_millis(300),
            "reported {:?} late",
            at - valid_until
        );
    })
    .await
    .expect("test timed out");
}

/// A single server killed and restarted on its data dir and address: the keep-alive
/// reconnects by itself and the lease and its key survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_recovers_after_the_server_restarts() {
    const TTL: i64 = 5;
    tokio::time::timeout(Duration::from_secs(40), async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let peer = format!("http://127.0.0.1:{}", kv_tests::free_port());
        let listen = format!("http://127.0.0.1:{}", kv_tests::free_port());
        let flags = [
            "--listen-client-urls",
            listen.as_str(),
            "--advertise-client-urls",
            listen.as_str(),
        ];
        let mut server = start_kv_server_with(&data, &peer, &flags);
        let client = connect(std::slice::from_ref(&server.endpoint)).await;
        let lease = client.lease().grant(TTL, None).await.unwrap();
        client
            .kv()
            .put("held", "v", PutOptions::new().lease(lease.id))
            .await
            .unwrap();
        let kept = client.lease().keep_alive(lease.id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.kill();
        let killed = Instant::now();
        let server = start_kv_server_with(&data, &peer, &flags);
        eprintln!("restarted in {:?}", killed.elapsed());
        // Renewed on the new server process, then held for two TTLs.
        let renewed_by = killed + Duration::from_secs(TTL as u64);
        while kept.valid_until() < renewed_by {
            assert_eq!(kept.try_lost(), None, "lost across the restart");
            assert!(
                killed.elapsed() < Duration::from_secs(TTL as u64),
                "not renewed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("renewed {:?} after the kill", killed.elapsed());
        tokio::time::sleep(Duration::from_secs(2 * TTL as u64)).await;
        assert_eq!(kept.try_lost(), None);
        let ttl = client.lease().time_to_live(lease.id, true).await.unwrap();
        assert_eq!(ttl.map(|t| text(&t.keys)), Some(vec!["held".to_string()]));
        drop(server);
    })
    .await
    .expect("test timed out");
}

/// Three members; the client uses the leader, which is killed: the keep-alive moves to
/// another member and the lease never expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_the_kill_of_the_member_in_use() {
    const TTL: i64 = 5;
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut cluster = Cluster::start(3);
        let leader = wait_leader_among(&cluster, &[0, 1, 2], Duration::from_secs(10)).await;
        // The leader first, so it is the member in use.
        let mut endpoints = vec![cluster.endpoint(leader)];
        endpoints.extend((0..3).filter(|i| *i != leader).map(|i| cluster.endpoint(i)));
        let client = connect(&endpoints).await;
        let lease = client.lease().grant(TTL, None).await.unwrap();
        client
            .kv()
            .put("held", "v", PutOptions::new().lease(lease.id))
            .await
            .unwrap();
        let kept = client.lease().keep_alive(lease.id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(client.current_endpoint().ends_with(&endpoints[0]));
        cluster.kill(leader);
        let killed = Instant::now();
        let renewed_by = killed + Duration::from_secs(TTL as u64);
        while kept.valid_until() < renewed_by {
            assert_eq!(kept.try_lost(), None, "lost across the kill");
            assert!(
                killed.elapsed() < Duration::from_secs(TTL as u64),
                "not renewed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("renewed {:?} after the kill", killed.elapsed());
        tokio::time::sleep(Duration::from_secs(2 * TTL as u64)).await;
        assert_eq!(kept.try_lost(), None);
        assert!(exists(&client, "held").await, "the kept lease expired");
        assert!(!client.current_endpoint().ends_with(&endpoints[0]));
    })
    .await
    .expect("test timed out");
}

/// Thousands of leases kept alive on one client are all renewed in time. Every keep-alive
/// answer used to trigger a pass over every kept lease (n^2 work per renewal round): 5,000
/// leases took half a core in a release build, and with 20,000 most were lost.
async fn many_kept_leases(endpoint: &str) {
    use futures::{StreamExt, TryStreamExt, stream};
    const LEASES: usize = 8_000;
    let client = connect(&[endpoint.to_string()]).await;
    let lease = client.lease();
    let kept: Vec<_> = stream::iter(0..LEASES)
        .map(|_| {
            let lease = lease.clone();
            async move {
                let grant = lease.grant(2, None).await?;
                lease.keep_alive(grant.id).await
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await
        .expect("grant and keep alive");
    // Three TTLs: every lease must have been renewed several times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lost = kept.iter().filter(|k| k.try_lost().is_some()).count();
    assert_eq!(lost, 0, "{lost} of {LEASES} kept leases were lost");
}
kv_tests::on_both_servers!(
    many_kept_leases,
    many_kept_leases_on_our_server,
    many_kept_leases_on_etcd,
    60
);

/// One kept lease with a short TTL, and nothing else going on in the client, stays alive: its
/// renewals must follow the TTL the first answer tells, not the wait used before it was known.
async fn one_short_lease_alone(endpoint: &str) {
    let client = connect(&[endpoint.to_string()]).await;
    let lease = client.lease();
    let grant = lease.grant(2, None).await.expect("grant");
    let kept = lease.keep_alive(grant.id).await.expect("keep alive");
    // Checked on the server, every half second for 6 s: the client reports a loss only when
    // it looks, and a client that stopped renewing would not look either.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ttl = lease
            .time_to_live(grant.id, false)
            .await
            .expect("time to live");
        assert!(
            ttl.is_some(),
            "a 2 s lease kept alone expired on the server"
        );
    }
    assert_eq!(
        kept.try_lost(),
        None,
        "a 2 s lease kept alone was reported lost"
    );
}
kv_tests::on_both_servers!(
    one_short_lease_alone,
    one_short_lease_alone_on_our_server,
    one_short_lease_alone_on_etcd,
    30
);
