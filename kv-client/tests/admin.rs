//! The cluster and maintenance sub-clients against our server and etcd 3.4, and membership
//! changes and leader transfer on a three-member cluster.

use std::time::Duration;

use kv_client::{Client, ClientOptions, PutOptions};
use kv_tests::{Cluster, free_port};

async fn admin_scenario(endpoint: &str) {
    let client = Client::connect([endpoint], ClientOptions::default())
        .await
        .expect("connect");
    let members = client.cluster().members().await.unwrap();
    assert_eq!(members.len(), 1);
    assert!(!members[0].is_learner);
    // Published before the member served its first client request (etcd's ReadyNotify).
    assert!(
        !members[0].name.is_empty() && !members[0].client_urls.is_empty(),
        "{members:?}"
    );
    client.kv().put("k", "v", PutOptions::new()).await.unwrap();
    let status = client.maintenance().status().await.unwrap();
    assert_eq!(status.member_id, members[0].id);
    assert_eq!(status.leader, status.member_id);
    assert_eq!(status.revision, 2);
    assert!(status.raft_term >= 1 && status.db_size > 0, "{status:?}");
    assert!(client.maintenance().alarms().await.unwrap().is_empty());
    let (hash, compacted) = client.maintenance().hash_kv(0).await.unwrap();
    assert_eq!(
        client.maintenance().hash_kv(0).await.unwrap(),
        (hash, compacted)
    );
    client.maintenance().defragment().await.unwrap();
}

kv_tests::on_both_servers!(admin_scenario, admin_on_our_server, admin_on_etcd, 30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_leader_transfer_on_three_members() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let cluster = Cluster::start(3);
        let client = Client::connect(cluster.endpoints(), ClientOptions::default())
            .await
            .expect("connect");
        let members = client.cluster().members().await.unwrap();
        assert_eq!(members.len(), 3);
        // A learner that never starts: added, listed, removed.
        let url = format!("http://127.0.0.1:{}", free_port());
        let added = client.cluster().add(vec![url.clone()], true).await.unwrap();
        assert!(added.is_learner && added.peer_urls == [url.clone()]);
        let listed = client.cluster().members().await.unwrap();
        assert_eq!(listed.len(), 4);
        let left = client.cluster().remove(added.id).await.unwrap();
        assert_eq!(left.len(), 3);
        // Leadership moves where it is told (the request goes through the leader).
        let leader_client = {
            let mut found = None;
            for ep in cluster.endpoints() {
                let c = Client::connect([ep.as_str()], ClientOptions::default())
                    .await
                    .unwrap();
                let s = c.maintenance().status().await.unwrap();
                if s.leader == s.member_id {
                    found = Some((c, s.member_id));
                }
            }
            found.expect("a leader")
        };
        let target = members
            .iter()
            .map(|m| m.id)
            .find(|id| *id != leader_client.1)
            .unwrap();
        leader_client
            .0
            .maintenance()
            .move_leader(target)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = leader_client.0.maintenance().status().await.unwrap();
            if s.leader == target {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "leader is {:x}",
                s.leader
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("test timed out");
}
