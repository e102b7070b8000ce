//! Crash safety of the real binary: SIGKILL during a burst of acknowledged writes, restart on
//! the same data dir, and every acknowledged write is there, at the revision it was given.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_core::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
use kv_tests::start_kv_server;
use tonic::transport::Channel;

/// One acknowledged put: key, value, the revision the server answered with.
type Ack = (Vec<u8>, Vec<u8>, i64);

async fn connect(endpoint: &str) -> KvClient<Channel> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint URL")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to kv-server");
    KvClient::new(channel)
}

/// Checks that every acknowledged write is present with its value and revision, and returns
/// the store's current revision.
async fn verify(client: &mut KvClient<Channel>, acked: &[Ack]) -> i64 {
    let mut current = 0;
    for (key, value, rev) in acked {
        let resp = client
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner();
        current = resp.header.as_ref().map_or(0, |h| h.revision);
        assert_eq!(
            resp.kvs.len(),
            1,
            "acknowledged key {:?} is missing",
            String::from_utf8_lossy(key)
        );
        assert_eq!(&resp.kvs[0].value, value);
        assert_eq!(
            resp.kvs[0].mod_revision, *rev,
            "acknowledged revision changed"
        );
    }
    current
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_write_burst_loses_no_acknowledged_write() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
        for round in 0..4u32 {
            let mut server = start_kv_server(&data, &[]);
            let mut client = connect(&server.endpoint).await;
            let before: Vec<Ack> = acked.lock().unwrap().clone();
            let current = verify(&mut client, &before).await;
            let max_acked = before.iter().map(|a| a.2).max().unwrap_or(0);
            assert!(
                current >= max_acked,
                "revision went back: {current} < {max_acked}"
            );

            let mut writers = Vec::new();
            for task in 0..16u32 {
                let mut client = client.clone();
                let acked = acked.clone();
                writers.push(tokio::spawn(async move {
                    for i in 0u32.. {
                        let key = format!("r{round}/t{task:02}/{i:06}").into_bytes();
                        let value = format!("value-{round}-{task}-{i}").into_bytes();
                        let put = client.put(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        });
                        match tokio::time::timeout(Duration::from_secs(5), put).await {
                            Ok(Ok(resp)) => {
                                let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                                acked.lock().unwrap().push((key, value, rev));
                            }
                            _ => return,
                        }
                    }
                }));
            }
            // Let the burst run, then kill the server mid-flight.
            tokio::time::sleep(Duration::from_millis(400 + 150 * round as u64)).await;
            server.kill();
            for w in writers {
                let _ = w.await;
            }
            let n = acked.lock().unwrap().len();
            assert!(
                n > before.len(),
                "round {round} acknowledged nothing:\n{}",
                server.log_text()
            );
        }
        let server = start_kv_server(&data, &[]);
        let mut client = connect(&server.endpoint).await;
        let all = acked.lock().unwrap().clone();
        let mut revs: Vec<i64> = all.iter().map(|a| a.2).collect();
        revs.sort_unstable();
        revs.dedup();
        assert_eq!(
            revs.len(),
            all.len(),
            "two acknowledged puts share a revision"
        );
        let current = verify(&mut client, &all).await;
        let next = client
            .put(PutRequest {
                key: b"after-crashes".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let next_rev = next.header.unwrap().revision;
        assert_eq!(next_rev, current + 1, "revisions continue after restarts");
        assert!(next_rev > *revs.last().unwrap());
        eprintln!("{} acknowledged writes survived 4 SIGKILLs", all.len());
    })
    .await
    .expect("test timed out");
}
