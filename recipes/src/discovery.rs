//! Service discovery: lease-backed registrations, a watched cache of instances, pickers, and a
//! tonic channel balanced over the live instances.
//!
//! # Key layout
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `<service>/<instance id>` | JSON [`InstanceInfo`]: `{"endpoint": "...", "metadata": {...}}` | the registration's own session |
//!
//! - An instance id is a non-empty string without `/`: the cache reads exactly one level
//!   under `<service>/`, so the instances of a service `a/b` (keys `a/b/<id>`) never show up
//!   as instances of `a`.
//! - Unknown JSON fields are ignored (older readers accept newer writers). A value that is not
//!   such JSON is skipped by readers and listed by [`ServiceCache::invalid`].
//! - Each [`Registration`] keeps a session of its own (TTL [`DEFAULT_REGISTRATION_TTL`]
//!   unless set): a process that dies is delisted a TTL after its last renewal.
//! - Registering takes the id over even if a previous registration still holds it (so a
//!   restarted process replaces its stale entry at once); the displaced registration stands by
//!   and takes the id back when the key goes, but never steals it back while it is held.
//!
//! # Pieces
//!
//! - [`Service::register`] → [`Registration`]: re-registers by itself after its session or key
//!   is lost, with backoff; [`Registration::deregister`] or drop removes the key.
//! - [`Service::cache`] → [`ServiceCache`]: lists, then watches from the list's revision;
//!   [`ServiceCache::instances`], [`ServiceCache::changes`], [`ServiceCache::revision`].
//! - [`RoundRobin`], [`Random`], [`Sticky`]: pick an instance from a cache, skipping those
//!   marked down by `note_error` for a while.
//! - [`DiscoverStream`] (a `tower::discover::Discover`) and [`BalancedChannel`] (a tonic
//!   `Channel` balanced over the live instances).
//!
//! Every waiting call can be bounded with `tokio::time::timeout`: dropping its future leaves
//! nothing behind (a dropped `register` withdraws the registration; a dropped `deregister`
//! still completes in the background). Background tasks retry transient failures forever,
//! with jittered exponential backoff, and say what is wrong through
//! [`Registration::status`] and [`ServiceCache::last_error`].
//!
//! The example runs against a kv-server embedded in the test process (the hidden lines start
//! it).
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use kv_client::{Client, ClientOptions};
//! use recipes::discovery::{InstanceChange, InstanceInfo, RoundRobin, Service};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let server = kv_server::server::start(&kv_server::config::Flags::local(dir.path())?).await?;
//! # let endpoint = server.client_addrs[0].to_string();
//! let client = Client::connect([endpoint.as_str()], ClientOptions::default()).await?;
//! let service = Service::new(&client, "services/search");
//!
//! // A reader: a cache that lists, then follows the service.
//! let cache = service.cache().await?;
//! let mut changes = cache.changes();
//!
//! // An instance: listed while the handle lives and the process renews its lease.
//! let info = InstanceInfo::new("http://10.0.0.7:8080").with_metadata("zone", "eu-1");
//! let registration = tokio::time::timeout(
//!     Duration::from_secs(5),
//!     service.register("node-1", info),
//! )
//! .await??;
//!
//! match changes.next().await {
//!     Some(InstanceChange::Added(instance)) => assert_eq!(instance.endpoint, "http://10.0.0.7:8080"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! let picker = RoundRobin::new(&cache);
//! assert_eq!(picker.pick().map(|i| i.id), Some("node-1".to_string()));
//!
//! registration.deregister().await?;
//! assert!(matches!(changes.next().await, Some(InstanceChange::Removed(_))));
//! assert!(cache.instances().is_empty());
//! # Ok(())
//! # }
//! ```

mod backoff;
mod balance;
mod cache;
mod picker;
mod random;
mod registration;

use std::collections::BTreeMap;

use kv_client::{Client, GetOptions, KeyValue};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use balance::{BalancedChannel, CONNECT_TIMEOUT, DiscoverStream, default_endpoint};
pub use cache::{CHANGES_QUEUE_LIMIT, Changes, InstanceChange, ServiceCache};
pub use picker::{DEFAULT_DOWN_FOR, PickerOptions, Random, RoundRobin, Sticky};
pub use registration::{
    DEFAULT_REGISTRATION_TTL, RegisterOptions, Registered, Registration, RegistrationStatus,
};

/// What an instance publishes about itself: the JSON value of its key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Where to reach it, e.g. `http://10.0.0.7:8080` (a bare `host:port` means `http://`).
    pub endpoint: String,
    /// Free-form labels (zone, version, weight, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl InstanceInfo {
    /// An instance reachable at `endpoint`, without metadata.
    pub fn new(endpoint: impl Into<String>) -> InstanceInfo {
        InstanceInfo {
            endpoint: endpoint.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds the label `key` = `value`.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// A registered instance as readers see it: its id and info, and the key's lease and
/// revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The instance id (the last segment of its key).
    pub id: String,
    /// Where to reach it.
    pub endpoint: String,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// The lease its key is attached to (its registration's session).
    pub lease: i64,
    /// The key's create revision: when this registration (generation) of the id appeared.
    pub create_revision: i64,
    /// The key's last modification revision.
    pub mod_revision: i64,
}

impl Instance {
    /// Its [`InstanceInfo`] (endpoint and metadata).
    pub fn info(&self) -> InstanceInfo {
        InstanceInfo {
            endpoint: self.endpoint.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// A service: the instances registered under `<name>/`.
#[derive(Debug, Clone)]
pub struct Service {
    client: Client,
    name: String,
    prefix: Vec<u8>,
}

impl Service {
    /// The service `name` (its keys are `<name>/<instance id>`).
    pub fn new(client: &Client, name: impl Into<String>) -> Service {
        let name = name.into();
        let prefix = format!("{name}/").into_bytes();
        Service {
            client: client.clone(),
            name,
            prefix,
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key prefix of its instances: `<name>/`.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The client the service was made with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key of instance `id`.
    pub fn key_of(&self, id: &str) -> Vec<u8> {
        [&self.prefix[..], id.as_bytes()].concat()
    }

    /// Registers instance `id` with a [`DEFAULT_REGISTRATION_TTL`] session; see
    /// [`Service::register_with`].
    pub async fn register(
        &self,
        id: impl Into<String>,
        info: InstanceInfo,
    ) -> Result<Registration> {
        self.register_with(id, info, RegisterOptions::new()).await
    }

    /// Registers instance `id` and returns once it is listed. Transient failures are retried
    /// (bound the wait with a timeout); others (a bad TTL, a refused write) are returned.
    /// Dropping the future withdraws the registration.
    pub async fn register_with(
        &self,
        id: impl Into<String>,
        info: InstanceInfo,
        options: RegisterOptions,
    ) -> Result<Registration> {
        let id = id.into();
        check_id(&id)?;
        registration::register(self, id, &info, options).await
    }

    /// The instances listed now, sorted by id (one read; invalid values are left out).
    pub async fn instances(&self) -> Result<Vec<Instance>> {
        let got = self
            .client
            .kv()
            .get(self.prefix.clone(), GetOptions::new().prefix())
            .await?;
        Ok(got
            .kvs
            .iter()
            .filter_map(|kv| match Entry::parse(&self.prefix, kv) {
                Entry::Instance(i) => Some(i),
                Entry::Invalid { .. } | Entry::Foreign => None,
            })
            .collect())
    }

    /// A cache of the service's instances, filled by one read before this returns and kept
    /// up to date by a background watch until the last clone is dropped.
    pub async fn cache(&self) -> Result<ServiceCache> {
        ServiceCache::start(&self.client, self.prefix.clone()).await
    }
}

/// Refuses ids the key layout cannot hold.
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.contains('/') {
        return Err(Error::Invalid(format!(
            "instance id {id:?} is empty or contains '/'"
        )));
    }
    Ok(())
}

/// What a key under a service prefix holds.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    /// A readable instance.
    Instance(Instance),
    /// An instance key whose value is not an [`InstanceInfo`].
    Invalid { id: String, reason: String },
    /// Not an instance of this service: a deeper key (a nested service) or an empty id.
    Foreign,
}

impl Entry {
    fn parse(prefix: &[u8], kv: &KeyValue) -> Entry {
        let Some(rest) = kv.key.strip_prefix(prefix) else {
            return Entry::Foreign;
        };
        if rest.is_empty() || rest.contains(&b'/') {
            return Entry::Foreign;
        }
        let Ok(id) = std::str::from_utf8(rest) else {
            return Entry::Invalid {
                id: String::from_utf8_lossy(rest).into_owned(),
                reason: "the instance id is not UTF-8".into(),
            };
        };
        match serde_json::from_slice::<InstanceInfo>(&kv.value) {
            Ok(info) => Entry::Instance(Instance {
                id: id.to_string(),
                endpoint: info.endpoint,
                metadata: info.metadata,
                lease: kv.lease,
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
            }),
            Err(e) => Entry::Invalid {
                id: id.to_string(),
                reason: e.to_string(),
            },
        }
    }

    /// The id a deletion of `key` concerns, if the key is an instance key of `prefix`.
    fn id_of(prefix: &[u8], key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(prefix)?;
        if rest.is_empty() || rest.contains(&b'/') {
            return None;
        }
        Some(String::from_utf8_lossy(rest).into_owned())
    }
}

/// Errors that pass with time (an election, a restart, a lost connection).
fn transient(e: &kv_client::Error) -> bool {
    e.is_retryable()
        || matches!(
            e,
            kv_client::Error::DeadlineExceeded(_) | kv_client::Error::OutcomeUnknown(_)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            create_revision: 3,
            mod_revision: 5,
            version: 2,
            lease: 7,
        }
    }

    #[test]
    fn values_parse_into_instances_and_unknown_fields_are_ignored() {
        let entry = Entry::parse(
            b"svc/",
            &kv(
                "svc/a",
                r#"{"endpoint":"h:1","metadata":{"zone":"x"},"weight":3}"#,
            ),
        );
        let Entry::Instance(i) = entry else {
            panic!("not an instance: {entry:?}")
        };
        assert_eq!(i.id, "a");
        assert_eq!(i.endpoint, "h:1");
        assert_eq!(i.metadata.get("zone").map(String::as_str), Some("x"));
        assert_eq!((i.lease, i.create_revision, i.mod_revision), (7, 3, 5));
        // Metadata may be left out.
        assert!(matches!(
            Entry::parse(b"svc/", &kv("svc/b", r#"{"endpoint":"h:2"}"#)),
            Entry::Instance(_)
        ));
    }

    #[test]
    fn bad_values_are_invalid_and_nested_keys_foreign() {
        assert!(matches!(
            Entry::parse(b"svc/", &kv("svc/a", "not json")),
            Entry::Invalid { id, .. } if id == "a"
        ));
        assert!(matches!(
            Entry::parse(b"svc/", &kv("svc/a", r#"{"metadata":{}}"#)),
            Entry::Invalid { .. }
        ));
        assert_eq!(Entry::parse(b"svc/", &kv("svc/x/y", "{}")), Entry::Foreign);
        assert_eq!(Entry::parse(b"svc/", &kv("svc/", "{}")), Entry::Foreign);
        assert_eq!(Entry::id_of(b"svc/", b"svc/a"), Some("a".into()));
        assert_eq!(Entry::id_of(b"svc/", b"svc/a/b"), None);
    }

    #[test]
    fn ids_with_a_slash_or_empty_are_refused() {
        assert!(check_id("node-1").is_ok());
        assert!(matches!(check_id(""), Err(Error::Invalid(_))));
        assert!(matches!(check_id("a/b"), Err(Error::Invalid(_))));
    }

    #[test]
    fn info_round_trips_through_json() {
        let info = InstanceInfo::new("http://h:1").with_metadata("zone", "eu");
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(
            json,
            r#"{"endpoint":"http://h:1","metadata":{"zone":"eu"}}"#
        );
        assert_eq!(serde_json::from_str::<InstanceInfo>(&json).unwrap(), info);
    }
}
