//! Feeding a service's live instances to a load balancer: [`DiscoverStream`] is a
//! `tower::discover::Discover` of tonic endpoints keyed by instance id, and
//! [`BalancedChannel`] hands it to a tonic `Channel` that balances (power of two choices)
//! over them.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tower::discover::Change;

use super::Instance;
use super::cache::{Changes, InstanceChange, ServiceCache};

/// Connect timeout of the endpoints [`default_endpoint`] makes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How many endpoint changes may wait for the balancer before forwarding pauses.
const BALANCE_QUEUE: usize = 1024;

/// Turns an instance into the endpoint to dial, or `None` if it cannot be dialled.
type MakeEndpoint = Arc<dyn Fn(&Instance) -> Option<Endpoint> + Send + Sync>;

/// The endpoint of `instance`: its URL (`http://` added to a bare `host:port`), with a
/// [`CONNECT_TIMEOUT`] and `TCP_NODELAY`; `None` if the URL does not parse.
pub fn default_endpoint(instance: &Instance) -> Option<Endpoint> {
    let url = if instance.endpoint.contains("://") {
        instance.endpoint.clone()
    } else {
        format!("http://{}", instance.endpoint)
    };
    Endpoint::from_shared(url)
        .ok()
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// A service's instances as a `tower::discover::Discover` (tower implements it for this
/// `TryStream`): an `Insert(id, endpoint)` for each instance, again when its endpoint changes,
/// and a `Remove(id)` when it goes. Instances whose endpoint does not parse are left out. It
/// never fails and never ends.
pub struct DiscoverStream {
    changes: Changes,
    make: MakeEndpoint,
    /// The endpoint URI given for each id inserted and not yet removed.
    inserted: BTreeMap<String, String>,
}

impl DiscoverStream {
    /// The instances of `cache`, dialled with [`default_endpoint`].
    pub fn new(cache: &ServiceCache) -> DiscoverStream {
        Self::with_endpoint(cache, default_endpoint)
    }

    /// The instances of `cache`, dialled with the endpoint `make` gives (timeouts, TLS,
    /// choosing among addresses in the metadata); `None` leaves an instance out.
    pub fn with_endpoint(
        cache: &ServiceCache,
        make: impl Fn(&Instance) -> Option<Endpoint> + Send + Sync + 'static,
    ) -> DiscoverStream {
        DiscoverStream {
            changes: cache.changes(),
            make: Arc::new(make),
            inserted: BTreeMap::new(),
        }
    }

    /// The change to hand the balancer for one instance change, if any.
    fn translate(&mut self, change: InstanceChange) -> Option<Change<String, Endpoint>> {
        let (id, endpoint) = match change {
            InstanceChange::Added(i) | InstanceChange::Updated(i) => {
                let endpoint = (self.make)(&i);
                (i.id, endpoint)
            }
            InstanceChange::Removed(i) => (i.id, None),
        };
        match endpoint {
            Some(endpoint) => {
                let uri = endpoint.uri().to_string();
                // A metadata-only update keeps the connection.
                if self.inserted.get(&id) == Some(&uri) {
                    return None;
                }
                self.inserted.insert(id.clone(), uri);
                Some(Change::Insert(id, endpoint))
            }
            None => self.inserted.remove(&id).map(|_| Change::Remove(id)),
        }
    }
}

impl Stream for DiscoverStream {
    type Item = Result<Change<String, Endpoint>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.changes.poll_next_unpin(cx) {
                Poll::Ready(Some(change)) => {
                    if let Some(out) = this.translate(change) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A tonic [`Channel`] balanced over a service's live instances. Instances join and leave as
/// the cache sees them; a call made after [`BalancedChannel::routed`] stopped listing an
/// instance never goes to it. With no instance, calls wait (bound them with a timeout).
#[derive(Debug, Clone)]
pub struct BalancedChannel {
    channel: Channel,
    routed: watch::Receiver<BTreeSet<String>>,
}

impl BalancedChannel {
    /// A channel over the instances of `cache`, dialled with [`default_endpoint`]. Needs a
    /// tokio runtime (it spawns the balancer and the task that feeds it).
    pub fn new(cache: &ServiceCache) -> BalancedChannel {
        Self::from_discover(DiscoverStream::new(cache))
    }

    /// A channel over the endpoints `discover` yields.
    pub fn from_discover(discover: DiscoverStream) -> BalancedChannel {
        let (channel, changes) = Channel::balance_channel::<String>(BALANCE_QUEUE);
        let (routed_tx, routed) = watch::channel(BTreeSet::new());
        tokio::spawn(forward(discover, changes, routed_tx));
        BalancedChannel { channel, routed }
    }

    /// The channel, to build gRPC clients on (clones share the balancer).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The instance ids the balancer has been given.
    pub fn routed(&self) -> BTreeSet<String> {
        self.routed.borrow().clone()
    }

    /// Waits until the set of routed instance ids satisfies `ready`.
    pub async fn wait_routed(&self, mut ready: impl FnMut(&BTreeSet<String>) -> bool) {
        let mut routed = self.routed.clone();
        // Err only once the feeding task ended, after the balancer went: nothing to wait for.
        let _ = routed.wait_for(|ids| ready(ids)).await;
    }
}

/// Hands the changes of `discover` to the balancer until every handle of its channel is gone.
async fn forward(
    mut discover: DiscoverStream,
    balancer: tokio::sync::mpsc::Sender<tonic::transport::channel::Change<String, Endpoint>>,
    routed: watch::Sender<BTreeSet<String>>,
) {
    use tonic::transport::channel::Change as Balance;
    loop {
        let change = tokio::select! {
            () = balancer.closed() => return,
            change = discover.next() => change,
        };
        let (change, id, inserted) = match change {
            Some(Ok(Change::Insert(id, endpoint))) => {
                (Balance::Insert(id.clone(), endpoint), id, true)
            }
            Some(Ok(Change::Remove(id))) => (Balance::Remove(id.clone()), id, false),
            Some(Err(never)) => match never {},
            None => return,
        };
        if balancer.send(change).await.is_err() {
            return;
        }
        // Only now, with the change queued, does `routed` say so: the balancer takes every
        // queued change before it picks an endpoint for the next call.
        routed.send_modify(|ids| {
            if inserted {
                ids.insert(id);
            } else {
                ids.remove(&id);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kv_client::{Event, EventKind, KeyValue, WatchUpdate};

    use super::*;

    fn assert_discover<D: tower::discover::Discover<Key = String, Service = Endpoint>>(_: &D) {}

    fn put(id: &str, endpoint: &str, metadata: &str, rev: i64) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: format!("svc/{id}").into_bytes().into(),
                value: format!(r#"{{"endpoint":"{endpoint}","metadata":{{"m":"{metadata}"}}}}"#)
                    .into_bytes()
                    .into(),
                create_revision: 1,
                mod_revision: rev,
                version: 1,
                lease: 0,
            },
            prev_kv: None,
        }
    }

    fn describe(change: Change<String, Endpoint>) -> String {
        match change {
            Change::Insert(id, e) => format!("+{id} {}", e.uri()),
            Change::Remove(id) => format!("-{id}"),
        }
    }

    #[tokio::test]
    async fn instances_become_endpoint_changes() {
        let start = Instance {
            id: "a".into(),
            endpoint: "127.0.0.1:1".into(),
            metadata: BTreeMap::new(),
            lease: 0,
            create_revision: 1,
            mod_revision: 1,
        };
        let cache = ServiceCache::fixed(vec![start]);
        let mut discover = DiscoverStream::new(&cache);
        assert_discover(&discover);
        let mut next = async || describe(discover.next().await.unwrap().unwrap());
        assert_eq!(next().await, "+a http://127.0.0.1:1/");
        let events = vec![
            // Metadata only: nothing for the balancer.
            put("a", "127.0.0.1:1", "x", 2),
            put("b", "http://127.0.0.1:2", "", 3),
            // A new endpoint replaces the old.
            put("a", "127.0.0.1:3", "x", 4),
            // An endpoint that does not parse takes the instance out.
            put("b", "bad host:-1", "", 5),
            Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: b"svc/a".to_vec().into(),
                    mod_revision: 6,
                    ..KeyValue::default()
                },
                prev_kv: None,
            },
        ];
        cache.inject(&WatchUpdate {
            revision: 6,
            events,
        });
        assert_eq!(next().await, "+b http://127.0.0.1:2/");
        assert_eq!(next().await, "+a http://127.0.0.1:3/");
        assert_eq!(next().await, "-b");
        assert_eq!(next().await, "-a");
    }
}
