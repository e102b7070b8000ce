//! The member's client of itself: the Lock and Election services run the `recipes` over it,
//! as etcd runs its `concurrency` package over an in-process client. The recipes then see this
//! server exactly as any remote client does, so the services and the library share one
//! algorithm.
//!
//! The client reaches the member in memory (a duplex pipe per connection, served by the
//! member's own gRPC services), not through its client listeners: those may require TLS and
//! client certificates the member has no business holding, and a wildcard or remote listen
//! address is not the member's to dial.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::http::Uri;

use kv_client::{Client, ClientOptions};
use recipes::Session;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::auth::Credentials;
use crate::errors::stopped_status;
use crate::node::Node;
use kv_core::auth::Access;

/// Bytes a loopback pipe buffers each way.
const PIPE_BYTES: usize = 256 * 1024;

/// The loopback's connector: each connection is a fresh pipe whose other end goes to the
/// member's in-memory listener.
#[derive(Clone)]
struct InMemory {
    accept: mpsc::UnboundedSender<DuplexStream>,
}

impl tower::Service<Uri> for InMemory {
    type Response = DuplexStream;
    type Error = std::io::Error;
    type Future = std::future::Ready<std::io::Result<DuplexStream>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        std::future::ready(match self.accept.send(theirs) {
            Ok(()) => Ok(ours),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the member stopped serving its loopback",
            )),
        })
    }
}

/// The connections the loopback opens, for the member to serve (its in-memory listener).
pub type LoopbackIncoming = UnboundedReceiverStream<DuplexStream>;

/// A [`Client`] of this member, in memory, connected on first use. Cheap to clone; clones
/// share the one client.
#[derive(Clone)]
pub struct Loopback {
    connector: InMemory,
    /// The member's own token: the client acts with the root role.
    token: Arc<str>,
    client: Arc<OnceCell<Client>>,
    /// Cancelled when the member stops.
    stop: CancellationToken,
}

impl Loopback {
    /// A loopback acting with `token`, for a member that stops when `stop` is cancelled, and
    /// the connections it opens, which the member must serve.
    pub fn new(token: &str, stop: CancellationToken) -> (Loopback, LoopbackIncoming) {
        let (accept, incoming) = mpsc::unbounded_channel();
        let loopback = Loopback {
            connector: InMemory { accept },
            token: Arc::from(token),
            client: Arc::new(OnceCell::new()),
            stop,
        };
        (loopback, UnboundedReceiverStream::new(incoming))
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
                Client::connect_with_connector(
                    ["http://loopback.invalid"],
                    options,
                    self.connector.clone(),
                )
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
    credentials: &Credentials,
    name: &[u8],
    lease: i64,
    writes: bool,
) -> Result<(), Status> {
    let caller = node.caller(credentials).await.map_err(as_unknown)?;
    let prefix = [name, b"/"].concat();
    let end = kv_core::proto::prefix_end(&prefix);
    node.store
        .auth_with_leases(|a, keys| {
            a.check(&caller, Access::Read, &prefix, &end)?;
            if writes {
                a.check(&caller, Access::Write, &prefix, &end)?;
                if lease != 0 {
                    a.check_lease_keys(&caller, Access::Write, keys, lease)?;
                }
            }
            Ok(())
        })
        .map_err(|e: kv_core::auth::AuthError| Status::unknown(e.to_string()))
}

/// Whether the caller may write `key` (Unlock, Proclaim and Resign name the key they touch).
pub async fn authorize_key(
    node: &Node,
    credentials: &Credentials,
    key: &[u8],
) -> Result<(), Status> {
    let caller = node.caller(credentials).await.map_err(as_unknown)?;
    node.check(|a| a.check(&caller, Access::Write, key, &[]))
        .map_err(as_unknown)
}

/// A status as these services send every failure: code Unknown, the same text.
fn as_unknown(status: Status) -> Status {
    Status::unknown(status.message())
}
