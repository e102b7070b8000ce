//! The member's client of itself: the Lock and Election services run the `recipes` over it,
//! as etcd runs its `concurrency` package over an in-process client. The recipes then see this
//! server exactly as any remote client does, so the services and the library share one
//! algorithm.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use kv_client::{Client, ClientOptions};
use recipes::Session;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::errors::stopped_status;
use crate::node::Node;
use kv_core::auth::Access;

/// A [`Client`] of this member's own client listeners, connected on first use. Cheap to
/// clone; clones share the one client.
#[derive(Clone)]
pub struct Loopback {
    /// `http://host:port` of every client listener, as dialable addresses.
    endpoints: Arc<[String]>,
    /// The member's own token: the client acts with the root role.
    token: Arc<str>,
    client: Arc<OnceCell<Client>>,
    /// Cancelled when the member stops.
    stop: CancellationToken,
}

impl Loopback {
    /// A loopback over the member's bound client addresses (ports already resolved), for a
    /// member that stops when `stop` is cancelled.
    pub fn new(bound: &[SocketAddr], token: &str, stop: CancellationToken) -> Loopback {
        Loopback {
            token: Arc::from(token),
            endpoints: bound
                .iter()
                .map(|a| format!("http://{}", dialable(*a)))
                .collect(),
            client: Arc::new(OnceCell::new()),
            stop,
        }
    }

    /// Runs `call` (a request that may wait indefinitely) unless the member stops first, in
    /// which case the caller is told so. A graceful stop waits for every open request and
    /// stream, and a waiting Lock or Campaign keeps the member's own watch and keep-alive
    /// streams open too, so those must end for the member to stop.
    pub async fn unless_stopped<T>(
        &self,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        tokio::select! {
            done = call => done,
            () = self.stop.cancelled() => Err(stopped_status()),
        }
    }

    /// A token cancelled when the member stops (to end streams with).
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The client. Connecting lazily means the listeners serve before it is made, and a
    /// member nobody asks for locks or elections never opens it. A failed connect is retried
    /// by the next call.
    pub async fn client(&self) -> kv_client::Result<&Client> {
        self.client
            .get_or_try_init(|| {
                let options = ClientOptions {
                    token: Some(self.token.to_string()),
                    ..ClientOptions::default()
                };
                Client::connect(self.endpoints.iter(), options)
            })
            .await
    }

    /// A session on `lease` as etcd's services make one (`NewSession(WithLease(lease))`):
    /// lease 0 grants a new lease of etcd's default TTL; any other lease must exist. The
    /// session renews the lease while the caller keeps it; the services drop it as soon as the
    /// request is answered, which leaves the lease to its owner, as etcd's `Orphan()` does.
    pub async fn session(&self, lease: i64) -> recipes::Result<Session> {
        let client = self.client().await?;
        if lease == 0 {
            Session::with_ttl(client, recipes::DEFAULT_TTL).await
        } else {
            Session::resume(client, lease).await
        }
    }
}

/// What a Lock or Election call needs of its caller, checked here because the loopback acts
/// with the root role: READ on the recipe's keys (`<name>/...`), WRITE too unless it only
/// looks, and WRITE on the keys already on the lease it puts a key on (as a put with that
/// lease would need). Refusals are code Unknown with etcd's text, as the services' other
/// errors.
pub async fn authorize(
    node: &Node,
    metadata: &tonic::metadata::MetadataMap,
    name: &[u8],
    lease: i64,
    writes: bool,
) -> Result<(), Status> {
    let caller = node.caller(metadata).await.map_err(as_unknown)?;
    let prefix = [name, b"/"].concat();
    let end = kv_core::proto::prefix_end(&prefix);
    node.store
        .auth_with_leases(|a, keys| {
            a.check(&caller, Access::Read, &prefix, &end)?;
            if writes {
                a.check(&caller, Access::Write, &prefix, &end)?;
                if lease != 0 {
                    a.check_keys(&caller, Access::Write, &keys(lease))?;
                }
            }
            Ok(())
        })
        .map_err(|e: kv_core::auth::AuthError| Status::unknown(e.to_string()))
}

/// Whether the caller may write `key` (Unlock, Proclaim and Resign name the key they touch).
pub async fn authorize_key(
    node: &Node,
    metadata: &tonic::metadata::MetadataMap,
    key: &[u8],
) -> Result<(), Status> {
    let caller = node.caller(metadata).await.map_err(as_unknown)?;
    node.check(|a| a.check(&caller, Access::Write, key, &[]))
        .map_err(as_unknown)
}

/// A status as these services send every failure: code Unknown, the same text.
fn as_unknown(status: Status) -> Status {
    Status::unknown(status.message())
}

/// The address to dial for a listener: a wildcard bind is reached over loopback.
fn dialable(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_dialed_over_loopback() {
        let cases = [
            ("0.0.0.0:2379", "127.0.0.1:2379"),
            ("[::]:2379", "[::1]:2379"),
            ("10.1.2.3:2379", "10.1.2.3:2379"),
        ];
        for (bound, dialed) in cases {
            let bound: SocketAddr = bound.parse().unwrap();
            assert_eq!(dialable(bound).to_string(), dialed);
        }
        let loopback = Loopback::new(
            &["0.0.0.0:7".parse().unwrap()],
            "token",
            CancellationToken::new(),
        );
        assert_eq!(&loopback.endpoints[..], ["http://127.0.0.1:7".to_string()]);
    }
}
