//! The deterministic state machine: applies ordered commands to the MVCC store, answers reads,
//! and produces and installs snapshots. Raft drives it through [`Store::apply_batch`]; the
//! applied log index and Raft's opaque metadata are written in the same backend transaction as
//! the data, so after a crash the store is exactly "everything up to index N".

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost::bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::apply;
use crate::auth::{self, AuthError, AuthState, Caller, requests::LeaseKeys};
use crate::backend::{Backend, Durability, Table, WriteBatch, WriteOp};
use crate::checksum::Crc32c;
use crate::command::Outcome;
use crate::error::{EngineError, Error, KvError};
use crate::key_index::KeyRange;
use crate::lease;
use crate::mvcc::{Mvcc, Overlay, Record, Source, WriteTxn};
use crate::proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, AuthDisableResponse, AuthEnableResponse,
    AuthRoleAddResponse, AuthRoleDeleteResponse, AuthRoleGrantPermissionResponse,
    AuthRoleRevokePermissionResponse, AuthUserAddResponse, AuthUserChangePasswordResponse,
    AuthUserDeleteResponse, AuthUserGrantRoleResponse, AuthUserRevokeRoleResponse,
    AuthenticateResponse, CompactionRequest, CompactionResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, Member, RangeRequest,
    RangeResponse, ResponseHeader, TxnRequest, TxnResponse, alarm_request::AlarmAction,
};
use crate::proto::kvserverpb::{
    InternalRequest, InternalResponse, MemberAttributesApplied, internal_request::Request,
    internal_response::Response,
};
use crate::proto::mvccpb::{Event, KeyValue, event::EventType};
use crate::revision::Revision;
use crate::watch::feed::{Feed, FeedItem};
use crate::watch::{self, WatchHub};

const META_APPLIED_INDEX: &[u8] = b"applied_index";
const META_RAFT: &[u8] = b"raft_meta";
const META_CURRENT_REV: &[u8] = b"current_revision";
const META_COMPACT_REV: &[u8] = b"compact_revision";
const META_ALARM_PREFIX: &[u8] = b"alarm/";
const META_MEMBER_PREFIX: &[u8] = b"member/";
const META_LEASE_PREFIX: &[u8] = b"lease/";
/// Users, roles and the auth switch, one record each ([`AuthState::to_records`]).
const META_AUTH_PREFIX: &[u8] = b"auth/";
/// Meta keys under this prefix belong to this member, not to the replicated state: they are
/// left out of snapshots and kept across a snapshot install.
pub const META_LOCAL_PREFIX: &[u8] = b"local/";

/// How long relaxed commits may pile up before apply makes them durable. The Raft log is what
/// makes a write durable; this only bounds replay after a crash and redb's file growth.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// With at most this many watchers, apply hands its events to the hub itself when the feeder
/// thread is idle: the delivery then costs less than waking the feeder.
const INLINE_FEED_WATCHERS: usize = 64;

const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSNAP01";

/// Settings of the state machine.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This member's id.
    pub member_id: u64,
    /// Backend size past which this member proposes no more writes and raises the NOSPACE
    /// alarm; 0 = no limit. The server checks it before proposing (each member's file has a
    /// size of its own); apply refuses writes only while the alarm, replicated state, is up.
    pub quota_bytes: u64,
}

/// Everything guarded by the state lock.
#[derive(Debug, Default)]
struct State {
    mvcc: Mvcc,
    applied_index: u64,
    raft_meta: Option<Vec<u8>>,
    /// Raised alarms: (member id, alarm type).
    alarms: BTreeSet<(u64, i32)>,
    /// Published member attributes (name, URLs) by member id.
    members: BTreeMap<u64, Member>,
    /// Users, roles, permissions and whether they are checked.
    auth: AuthState,
}

/// Engine status for Maintenance.Status and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStatus {
    /// The store revision.
    pub revision: i64,
    /// The compaction revision (-1 before any).
    pub compact_revision: i64,
    /// The last applied Raft log index.
    pub applied_index: u64,
    /// Backend size in bytes.
    pub db_size: i64,
    /// Backend bytes in use.
    pub db_size_in_use: i64,
    /// Keys with history in the index (live ones and deleted ones not yet compacted away).
    pub keys: usize,
}

/// The MVCC state machine over a backend.
///
/// Locking: `state` is a std `RwLock` (never held across an await): reads take it shared for
/// the duration of one request, apply takes it exclusively for one batch, up to a commit that
/// is never a disk sync. `last_sync` is held while the backend syncs (periodically after an
/// apply, and for snapshots), outside the state lock, so reads go on during a sync.
pub struct Store {
    backend: Box<dyn Backend>,
    /// The backend's size as of the last apply batch, defragment or restore: the quota is
    /// checked before every write, and a `stat` of the file each time cost a system call.
    size_seen: AtomicU64,
    state: RwLock<State>,
    config: StoreConfig,
    last_sync: Mutex<Instant>,
    /// The last measured bytes in use and when (see [`Store::status_recent`]).
    in_use: Mutex<Option<(Instant, i64)>>,
    /// The watchers of this member; apply hands it every change after committing it.
    hub: WatchHub,
    /// The way changes reach `hub`: inline, or through a feeder thread.
    feed: Feed,
}

fn be_u64(bytes: &[u8]) -> Result<u64, EngineError> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
        EngineError::Corrupt("bad integer in metadata".into())
    })?))
}

fn be_i64(bytes: &[u8]) -> Result<i64, EngineError> {
    Ok(i64::from_be_bytes(bytes.try_into().map_err(|_| {
        EngineError::Corrupt("bad integer in metadata".into())
    })?))
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

impl Store {
    /// Opens the store over `backend`, rebuilding the key index from the stored history.
    pub fn open(backend: Box<dyn Backend>, config: StoreConfig) -> Result<Self, EngineError> {
        let state = Self::load(backend.as_ref())?;
        let hub = WatchHub::new(state.mvcc.current);
        Ok(Self {
            size_seen: AtomicU64::new(backend.size()),
            backend,
            state: RwLock::new(state),
            config,
            last_sync: Mutex::new(Instant::now()),
            in_use: Mutex::new(None),
            hub,
            feed: Feed::default(),
        })
    }

    fn load(backend: &dyn Backend) -> Result<State, EngineError> {
        let read = backend.read()?;
        let mut state = State::default();
        // Leases first: replaying the history then attaches each live key to its lease.
        let mut failure = None;
        read.scan(Table::Meta, META_LEASE_PREFIX, None, &mut |k, v| {
            let Some(rest) = k.strip_prefix(META_LEASE_PREFIX) else {
                return false;
            };
            match (<[u8; 8]>::try_from(rest), lease::decode_ttl(v)) {
                (Ok(id), Some(ttl)) => {
                    state.mvcc.leases.restore(i64::from_be_bytes(id), ttl);
                    true
                }
                _ => {
                    failure = Some(EngineError::Corrupt("bad lease record".into()));
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut failure = None;
        read.scan(Table::Kv, &[], None, &mut |k, v| {
            let parsed = Revision::from_bytes(k)
                .ok_or_else(|| EngineError::Corrupt("bad revision key in history".into()))
                .and_then(|rev| Ok((rev, Record::decode(Bytes::copy_from_slice(v))?)));
            match parsed {
                Ok((rev, rec)) => {
                    if rec.tombstone {
                        state.mvcc.index.tombstone(&rec.kv.key, rev);
                        state
                            .mvcc
                            .leases
                            .set_key_lease(&rec.kv.key, lease::NO_LEASE);
                    } else {
                        state.mvcc.leases.set_key_lease(&rec.kv.key, rec.kv.lease);
                        state.mvcc.index.restore(
                            &rec.kv.key,
                            rec.kv.create_revision,
                            rev,
                            rec.kv.version,
                        );
                    }
                    state.mvcc.current = state.mvcc.current.max(rev.main);
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(v) = read.get(Table::Meta, META_CURRENT_REV)? {
            state.mvcc.current = state.mvcc.current.max(be_i64(&v)?);
        }
        if let Some(v) = read.get(Table::Meta, META_COMPACT_REV)? {
            state.mvcc.compacted = be_i64(&v)?;
        }
        if let Some(v) = read.get(Table::Meta, META_APPLIED_INDEX)? {
            state.applied_index = be_u64(&v)?;
        }
        state.raft_meta = read.get(Table::Meta, META_RAFT)?;
        read.scan(Table::Meta, META_ALARM_PREFIX, None, &mut |k, _| {
            let Some(rest) = k.strip_prefix(META_ALARM_PREFIX) else {
                return false;
            };
            if rest.len() == 12 {
                let member = u64::from_be_bytes(rest[..8].try_into().unwrap_or_default());
                let alarm = i32::from_be_bytes(rest[8..].try_into().unwrap_or_default());
                state.alarms.insert((member, alarm));
            }
            true
        })?;
        let mut failure = None;
        read.scan(Table::Meta, META_MEMBER_PREFIX, None, &mut |k, v| {
            if !k.starts_with(META_MEMBER_PREFIX) {
                return false;
            }
            match Member::decode(v) {
                Ok(m) => {
                    state.members.insert(m.id, m);
                    true
                }
                Err(e) => {
                    failure = Some(EngineError::Corrupt(format!("member attributes: {e}")));
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut records = Vec::new();
        read.scan(Table::Meta, META_AUTH_PREFIX, None, &mut |k, v| {
            let Some(name) = k.strip_prefix(META_AUTH_PREFIX) else {
                return false;
            };
            records.push((name.to_vec(), v.to_vec()));
            true
        })?;
        state.auth =
            AuthState::from_records(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
                .map_err(|e| EngineError::Corrupt(format!("auth records: {e}")))?;
        Ok(state)
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the store and hands back its backend (tests reopen a store over it).
    pub fn into_backend(self) -> Box<dyn Backend> {
        self.backend
    }

    /// The config the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Revision, compaction, applied index and sizes, the bytes in use measured now.
    pub fn status(&self) -> StoreStatus {
        self.status_with(self.measure_in_use())
    }

    /// Measures the bytes in use, and remembers the figure for [`Store::status_recent`].
    fn measure_in_use(&self) -> i64 {
        let bytes = self.backend.size_in_use() as i64;
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), bytes));
        bytes
    }

    fn status_with(&self, in_use: i64) -> StoreStatus {
        let s = self.read_state();
        StoreStatus {
            revision: s.mvcc.current,
            compact_revision: s.mvcc.compacted,
            applied_index: s.applied_index,
            db_size: self.backend.size() as i64,
            db_size_in_use: in_use,
            keys: s.mvcc.index.len(),
        }
    }

    /// [`Store::status`] with the bytes in use measured at most `max_age` ago. Measuring
    /// takes a backend write transaction and a walk of its allocation state (150 ms with a
    /// 140 MB database here), so the monitoring that asks every second or scrape reuses it.
    pub fn status_recent(&self, max_age: std::time::Duration) -> StoreStatus {
        let cached = *self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        let in_use = match cached {
            Some((at, bytes)) if at.elapsed() <= max_age => bytes,
            _ => self.measure_in_use(),
        };
        self.status_with(in_use)
    }

    /// The backend's size in bytes (cheap, unlike the bytes in use).
    pub fn db_size(&self) -> i64 {
        self.backend.size() as i64
    }

    /// The backend's size as of the last apply batch, defragment or restore (cheaper than
    /// [`Store::db_size`], which asks the file system).
    pub fn db_size_seen(&self) -> u64 {
        self.size_seen.load(Ordering::Relaxed)
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.read_state().mvcc.current
    }

    /// The last applied log index.
    pub fn applied_index(&self) -> u64 {
        self.read_state().applied_index
    }

    /// Raft's opaque metadata stored with the last applied batch.
    pub fn raft_meta(&self) -> Option<Vec<u8>> {
        self.read_state().raft_meta.clone()
    }

    /// Raised alarms as (member id, alarm type).
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.read_state()
            .alarms
            .iter()
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    /// Member attributes published through the log, by member id.
    pub fn members(&self) -> BTreeMap<u64, Member> {
        self.read_state().members.clone()
    }

    /// The granted TTL of lease `id`, if it exists.
    pub fn lease_ttl(&self, id: i64) -> Option<i64> {
        self.read_state().mvcc.leases.get(id).map(|l| l.ttl)
    }

    /// Lease `id` as (granted TTL, attached keys in key order), if it exists.
    pub fn lease(&self, id: i64) -> Option<(i64, Vec<Vec<u8>>)> {
        let state = self.read_state();
        let l = state.mvcc.leases.get(id)?;
        Some((l.ttl, l.keys.iter().map(|k| k.to_vec()).collect()))
    }

    /// Every lease as (id, granted TTL), in id order.
    pub fn leases(&self) -> Vec<(i64, i64)> {
        self.read_state().mvcc.leases.iter().collect()
    }

    /// Number of leases and of keys attached to them.
    pub fn lease_counts(&self) -> (usize, usize) {
        let state = self.read_state();
        (state.mvcc.leases.len(), state.mvcc.leases.attached_keys())
    }

    /// Lists live keys without reading their records: the first `limit` keys in key order
    /// at the current revision, keeping those `keep` accepts (given the key and its lease,
    /// 0 for none). Returns the revision, the kept keys with their leases, and whether keys
    /// remain past `limit`. Costs a walk of `limit` index entries under the read lock, never
    /// the values (tools that look for recipes in a keyspace of application data).
    pub fn list_keys(
        &self,
        limit: usize,
        keep: impl Fn(&[u8], i64) -> bool,
    ) -> (i64, Vec<(Vec<u8>, i64)>, bool) {
        let state = self.read_state();
        let at = state.mvcc.current;
        let (mut seen, mut more, mut kept) = (0, false, Vec::new());
        state
            .mvcc
            .index
            .range(KeyRange::Span(&[0], None), at, |key, _| {
                if seen == limit {
                    more = true;
                    return false;
                }
                seen += 1;
                let lease = state.mvcc.leases.lease_of(key);
                if keep(key, lease) {
                    kept.push((key.to_vec(), lease));
                }
                true
            });
        (at, kept, more)
    }

    /// Up to `limit` of the keys attached to a lease, with their leases, at the current
    /// revision (the revision is returned too), whatever their place in the keyspace: locks,
    /// elections and registrations live on leases, and are found here even when a large
    /// keyspace puts them past a [`Store::list_keys`] limit.
    pub fn leased_keys(&self, limit: usize) -> (i64, Vec<(Vec<u8>, i64)>) {
        let state = self.read_state();
        let keys = state
            .mvcc
            .leases
            .attached()
            .take(limit)
            .map(|(key, lease)| (key.to_vec(), lease))
            .collect();
        (state.mvcc.current, keys)
    }

    /// Runs `f` over the auth state as applied so far (for checks made before serving a read,
    /// and for the Auth service's reads).
    pub fn auth<T>(&self, f: impl FnOnce(&AuthState) -> T) -> T {
        f(&self.read_state().auth)
    }

    /// Runs `f` over the auth state and a lookup of leases' attached keys, as apply's checks
    /// see them (for checks of puts with a lease, revokes and keep-alives).
    pub fn auth_with_leases<T>(&self, f: impl FnOnce(&AuthState, LeaseKeys<'_>) -> T) -> T {
        let state = self.read_state();
        let keys = |id: i64| attached_keys(&state, id);
        f(&state.auth, &keys)
    }

    /// Serves a Range at the current state (serializable; the caller provides linearizability).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        let state = self.read_state();
        let read = self.backend.read()?;
        let src = Source {
            backend: read.as_ref(),
            overlay: None,
        };
        apply::range(&state.mvcc, &src, req)
    }

    /// Serves a txn with no writes without going through the log.
    pub fn read_txn(&self, req: &TxnRequest) -> Result<TxnResponse, Error> {
        debug_assert!(apply::txn_is_read_only(req));
        // The txn machinery wants the index mutably; a read-only txn never changes it, but the
        // exclusive lock keeps that reasoning local instead of cloning the index.
        let mut state = self.write_state();
        let read = self.backend.read()?;
        let mut overlay = Overlay::default();
        let mut txn = WriteTxn::begin(&mut state.mvcc, &mut overlay, read.as_ref());
        let mut resp = apply::apply_txn(&mut txn, req)?;
        resp.header = header(txn.end());
        Ok(resp)
    }

    /// Serves a txn whose compares, at the current state, choose branches that write
    /// nothing, without going through the log; None if the chosen branches write.
    pub fn txn_as_read(&self, req: &TxnRequest) -> Result<Option<TxnResponse>, Error> {
        let mut state = self.write_state();
        let read = self.backend.read()?;
        let mut overlay = Overlay::default();
        let mut txn = WriteTxn::begin(&mut state.mvcc, &mut overlay, read.as_ref());
        let Some(mut resp) = apply::txn_as_read(&mut txn, req)? else {
            return Ok(None);
        };
        resp.header = header(txn.end());
        Ok(Some(resp))
    }

    /// Whether the branches a txn's compares choose at the current state would write, from
    /// the compares alone; None while an apply holds the state (the caller, on an async
    /// thread, must not wait for it).
    pub fn txn_would_write(&self, req: &TxnRequest) -> Option<bool> {
        let state = match self.state.try_read() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let read = self.backend.read().ok()?;
        let src = Source {
            backend: read.as_ref(),
            overlay: None,
        };
        apply::txn_would_write(&state.mvcc, &src, req).ok()
    }

    /// Reads a member-local metadata value (see [`META_LOCAL_PREFIX`]).
    pub fn local_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let mut k = META_LOCAL_PREFIX.to_vec();
        k.extend_from_slice(key);
        Ok(self.backend.read()?.get(Table::Meta, &k)?)
    }

    /// Durably writes a member-local metadata value.
    pub fn set_local_meta(&self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        let mut k = META_LOCAL_PREFIX.to_vec();
        k.extend_from_slice(key);
        let mut batch = WriteBatch::default();
        batch.put(Table::Meta, k, value.to_vec());
        let _guard = self.write_state();
        Ok(self.backend.commit(batch, Durability::Immediate)?)
    }

    /// Applies committed log entries in order, in one backend transaction, and stores `meta`
    /// with them. Entries at or below the applied index are skipped (already in the state).
    /// A `None` command is a log entry with no data (Raft's blank or membership entries).
    pub fn apply_batch(
        &self,
        entries: &[(u64, Option<InternalRequest>)],
        meta: &[u8],
    ) -> Result<Vec<Outcome>, EngineError> {
        let mut state = self.write_state();
        let read = self.backend.read()?;
        let mut overlay = Overlay::default();
        self.size_seen.store(self.backend.size(), Ordering::Relaxed);
        let start_compacted = state.mvcc.compacted;
        let start_alarms = state.alarms.clone();
        let start_members = state.members.clone();
        let start_auth = (state.auth.enabled(), state.auth.revision());
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut last = state.applied_index;
        for (index, cmd) in entries {
            if *index <= last {
                outcomes.push(Ok(InternalResponse::default()));
                continue;
            }
            last = *index;
            let outcome = match cmd {
                Some(cmd) => {
                    let applied =
                        self.apply_one(&mut state, read.as_ref(), &mut overlay, *index, cmd);
                    match applied {
                        Ok(resp) => Ok(resp),
                        Err(Error::Request(e)) => Err(e),
                        Err(Error::Engine(e)) => return Err(e),
                    }
                }
                None => Ok(InternalResponse::default()),
            };
            outcomes.push(outcome);
        }
        state.applied_index = last;
        state.raft_meta = Some(meta.to_vec());
        let events = std::mem::take(&mut overlay.events);
        let mut batch = overlay.into_batch();
        batch.put(Table::Meta, META_APPLIED_INDEX, last.to_be_bytes().to_vec());
        batch.put(Table::Meta, META_RAFT, meta.to_vec());
        batch.put(
            Table::Meta,
            META_CURRENT_REV,
            state.mvcc.current.to_be_bytes().to_vec(),
        );
        if state.mvcc.compacted != start_compacted {
            batch.put(
                Table::Meta,
                META_COMPACT_REV,
                state.mvcc.compacted.to_be_bytes().to_vec(),
            );
        }
        for id in state.mvcc.leases.take_dirty() {
            match state.mvcc.leases.get(id) {
                Some(l) => batch.put(Table::Meta, lease_key(id), lease::encode_ttl(l.ttl)),
                None => batch.delete(Table::Meta, lease_key(id)),
            }
        }
        if state.alarms != start_alarms {
            for (m, a) in start_alarms.difference(&state.alarms) {
                batch.delete(Table::Meta, alarm_key(*m, *a));
            }
            for (m, a) in state.alarms.difference(&start_alarms) {
                batch.put(Table::Meta, alarm_key(*m, *a), Vec::new());
            }
        }
        if state.members != start_members {
            for id in start_members
                .keys()
                .filter(|id| !state.members.contains_key(id))
            {
                batch.delete(Table::Meta, member_key(*id));
            }
            for (id, m) in &state.members {
                if start_members.get(id) != Some(m) {
                    batch.put(Table::Meta, member_key(*id), m.encode_to_vec());
                }
            }
        }
        if (state.auth.enabled(), state.auth.revision()) != start_auth {
            // Auth changes are rare and small: the records are rewritten whole, and the ones
            // of deleted users and roles removed.
            let records = state.auth.to_records();
            let mut stale = Vec::new();
            read.scan(Table::Meta, META_AUTH_PREFIX, None, &mut |k, _| match k
                .strip_prefix(META_AUTH_PREFIX)
            {
                Some(name) => {
                    if !records.contains_key(name) {
                        stale.push(k.to_vec());
                    }
                    true
                }
                None => false,
            })?;
            for key in stale {
                batch.delete(Table::Meta, key);
            }
            for (name, value) in records {
                let mut key = META_AUTH_PREFIX.to_vec();
                key.extend_from_slice(&name);
                batch.put(Table::Meta, key, value);
            }
        }
        drop(read);
        if let Err(e) = self.backend.commit(batch, Durability::Relaxed) {
            // The in-memory state ran ahead of storage: rebuild it from what is stored so
            // that the next attempt starts from the truth.
            *state = Self::load(self.backend.as_ref())?;
            return Err(e.into());
        }
        // Apply runs on one thread, so handing over after the lock is released keeps
        // revisions in order, and a full feed never blocks readers.
        drop(state);
        if !events.is_empty() {
            let cheap = || self.hub.watcher_count() <= INLINE_FEED_WATCHERS;
            if let Some(FeedItem::Events(events)) = self.feed.offer(FeedItem::Events(events), cheap)
            {
                self.notify_inline(&self.read_state(), &events)?;
            }
        }
        // The periodic sync runs with the state unlocked: it used to be this batch's commit,
        // and every read waited for the disk with it.
        let mut last_sync = self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
        if last_sync.elapsed() >= SYNC_INTERVAL {
            self.backend.sync()?;
            *last_sync = Instant::now();
        }
        Ok(outcomes)
    }

    /// Hands committed events to the watch hub from apply itself, under the state lock.
    fn notify_inline(&self, state: &State, events: &[Event]) -> Result<(), EngineError> {
        let read = self.backend.read()?;
        self.notify_hub(events, |key, at| value_at(state, read.as_ref(), key, at));
        Ok(())
    }

    /// Hands events to the hub one revision at a time (a txn's events are never split).
    /// `prev` finds a key's value before a revision, for `prev_kv` watchers.
    fn notify_hub(&self, events: &[Event], mut prev: impl FnMut(&[u8], i64) -> Option<KeyValue>) {
        let mut start = 0;
        while start < events.len() {
            let rev = event_revision(&events[start]);
            let end = events[start..]
                .iter()
                .position(|e| event_revision(e) != rev)
                .map_or(events.len(), |n| start + n);
            self.hub.notify(rev, &events[start..end], &mut prev);
            start = end;
        }
    }

    /// Runs the watch feeder on the calling thread until [`Store::stop_watch_feed`]: from now
    /// on apply only queues its events and this thread hands them to the hub. Returns at once
    /// if a feeder already runs.
    pub fn run_watch_feed(&self) {
        if !self.feed.start() {
            return;
        }
        while let Some(item) = self.feed.next() {
            match item {
                FeedItem::Events(events) => self.notify_hub(&events, |key, at| {
                    // Lock order: hub (held by notify), then state, then backend. A value
                    // compacted away meanwhile is simply absent, as in etcd.
                    let state = self.read_state();
                    let read = self.backend.read().ok()?;
                    value_at(&state, read.as_ref(), key, at)
                }),
                FeedItem::Resync(revision) => self.hub.resync_all(revision),
            }
        }
    }

    /// Whether [`Store::apply_batch`] will return without touching the disk or waiting for
    /// the watch feeder, so that a caller may run it on an async worker: no periodic sync is
    /// due and the feeder's queue has room.
    pub fn apply_is_quick(&self) -> bool {
        // Held while apply decides on and runs a periodic sync: if taken, one may be under way.
        let Ok(last_sync) = self.last_sync.try_lock() else {
            return false;
        };
        last_sync.elapsed() < SYNC_INTERVAL && self.feed.has_room()
    }

    /// Whether a watch feeder thread runs.
    pub fn feed_is_threaded(&self) -> bool {
        self.feed.is_threaded()
    }

    /// Stops the watch feeder once it has delivered what is queued.
    pub fn stop_watch_feed(&self) {
        self.feed.close();
    }

    /// The watchers of this member.
    pub fn watch_hub(&self) -> &WatchHub {
        &self.hub
    }

    /// One catch-up round for unsynced watchers: reads a bounded slice of history (from
    /// storage, without holding up apply) and hands it to them. Returns true while watchers
    /// are still behind or victims wait.
    pub fn sync_watchers(&self) -> Result<bool, EngineError> {
        let Some(plan) = self.hub.plan_sync() else {
            return Ok(self.hub.has_backlog());
        };
        let (mut events, upto, compacted) = {
            let read = self.backend.read()?;
            let compacted = match read.get(Table::Meta, META_COMPACT_REV)? {
                Some(v) => be_i64(&v)?,
                None => -1,
            };
            let from = plan.from.max(compacted).max(1);
            let limit = plan
                .to
                .min(from.saturating_add(watch::SYNC_MAX_REVISIONS - 1));
            let (events, upto) = read_history(read.as_ref(), from, limit)?;
            (events, upto, compacted)
        };
        if plan.watchers.iter().any(|w| w.3) {
            // Previous values come from the index, under the state lock and a fresh view
            // (lock order: state, then backend). Compacted ones are simply absent, as in etcd.
            let state = self.read_state();
            let read = self.backend.read()?;
            for ev in &mut events {
                if let (false, Some(kv)) = (watch::is_create(ev), &ev.kv) {
                    ev.prev_kv = value_at(&state, read.as_ref(), &kv.key, kv.mod_revision - 1);
                }
            }
        }
        self.hub.finish_sync(&plan, &events, upto, compacted);
        Ok(self.hub.has_backlog())
    }

    fn apply_one(
        &self,
        state: &mut State,
        read: &dyn crate::backend::BackendRead,
        overlay: &mut Overlay,
        index: u64,
        cmd: &InternalRequest,
    ) -> Result<InternalResponse, Error> {
        let Some(request) = &cmd.request else {
            return Ok(InternalResponse::default());
        };
        // Every client write carries a header; with auth off there is nothing to check.
        if let Some(h) = cmd.header.as_ref().filter(|_| state.auth.enabled()) {
            let caller = Caller {
                user: (!h.username.is_empty()).then(|| h.username.clone()),
                revision: h.auth_revision,
            };
            authorize(state, &caller, request).map_err(KvError::from)?;
        }
        // etcd's capped apply: while a NOSPACE alarm is up, no member applies a write. The
        // alarm is replicated state, so every member refuses the same writes.
        let nospace = AlarmType::Nospace as i32;
        if crate::command::uses_space(request) && state.alarms.iter().any(|&(_, a)| a == nospace) {
            return Err(KvError::NoSpace.into());
        }
        let response = match request {
            Request::Range(r) => {
                let src = Source {
                    backend: read,
                    overlay: Some(overlay),
                };
                Response::Range(apply::range(&state.mvcc, &src, r)?)
            }
            Request::Put(p) => {
                let mut txn = WriteTxn::begin(&mut state.mvcc, overlay, read);
                let resp = apply::apply_put(&mut txn, p);
                txn.end();
                Response::Put(resp?)
            }
            Request::DeleteRange(d) => {
                let mut txn = WriteTxn::begin(&mut state.mvcc, overlay, read);
                let resp = apply::apply_delete(&mut txn, d);
                txn.end();
                Response::DeleteRange(resp?)
            }
            Request::Txn(t) => {
                let mut txn = WriteTxn::begin(&mut state.mvcc, overlay, read);
                let resp = apply::apply_txn(&mut txn, t);
                let rev = txn.end();
                let mut resp = resp?;
                resp.header = header(rev);
                Response::Txn(resp)
            }
            Request::Compaction(c) => Response::Compaction(self.compact(state, read, overlay, c)?),
            Request::Alarm(a) => Response::Alarm(alarm(state, a)),
            Request::MemberAttributes(m) => {
                let member = m.member.clone().unwrap_or_default();
                if m.removed {
                    state.members.remove(&member.id);
                } else {
                    state.members.insert(member.id, member);
                }
                Response::MemberAttributes(MemberAttributesApplied {
                    header: header(state.mvcc.current),
                })
            }
            Request::LeaseGrant(g) => Response::LeaseGrant(lease_grant(state, g)?),
            Request::LeaseRevoke(r) => {
                Response::LeaseRevoke(lease_revoke(state, read, overlay, r)?)
            }
            Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::Authenticate(_)
            | Request::UserAdd(_)
            | Request::UserDelete(_)
            | Request::UserChangePassword(_)
            | Request::UserGrantRole(_)
            | Request::UserRevokeRole(_)
            | Request::RoleAdd(_)
            | Request::RoleDelete(_)
            | Request::RoleGrantPermission(_)
            | Request::RoleRevokePermission(_) => {
                let response = apply_auth(&mut state.auth, index, request)
                    .map_err(KvError::from)?
                    .ok_or_else(|| EngineError::Corrupt("an auth request not applied".into()))?;
                with_header(response, state.mvcc.current)
            }
        };
        Ok(InternalResponse {
            response: Some(response),
        })
    }

    fn compact(
        &self,
        state: &mut State,
        read: &dyn crate::backend::BackendRead,
        overlay: &mut Overlay,
        req: &CompactionRequest,
    ) -> Result<CompactionResponse, Error> {
        // Compaction scans stored history; records written earlier in this batch are still
        // in the overlay, and `compact` marks the doomed ones there directly.
        let src = Source {
            backend: read,
            overlay: None,
        };
        state.mvcc.compact(req.revision, &src, overlay)?;
        Ok(CompactionResponse {
            header: header(state.mvcc.current),
        })
    }

    /// Makes everything applied so far durable. Reads go on meanwhile: the sync only
    /// flushes commits that are already visible.
    pub fn sync(&self) -> Result<(), EngineError> {
        let mut last_sync = self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
        self.backend.sync()?;
        *last_sync = Instant::now();
        Ok(())
    }

    /// Gives back free backend space (Maintenance.Defragment).
    pub fn defragment(&self) -> Result<(), EngineError> {
        let _state = self.write_state();
        let done = self.backend.defragment();
        self.size_seen.store(self.backend.size(), Ordering::Relaxed);
        Ok(done?)
    }

    /// CRC-32C over the whole replicated state (Maintenance.Hash).
    pub fn hash(&self) -> Result<u32, EngineError> {
        let _state = self.read_state();
        let read = self.backend.read()?;
        let mut crc = Crc32c::new();
        for table in Table::ALL {
            read.scan(table, &[], None, &mut |k, v| {
                if !(table == Table::Meta && k.starts_with(META_LOCAL_PREFIX)) {
                    crc.update(k);
                    crc.update(v);
                }
                true
            })?;
        }
        Ok(crc.finish())
    }

    /// CRC-32C over the history up to `revision` (0: current), with the compaction revision
    /// and the revision hashed (Maintenance.HashKV). As etcd's `HashByRev`, an explicit
    /// revision at or below the compaction is refused (a Range at it is allowed).
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), Error> {
        let state = self.read_state();
        if revision > 0 && revision <= state.mvcc.compacted {
            return Err(KvError::Compacted {
                compact_revision: state.mvcc.compacted,
            }
            .into());
        }
        let rev = if revision <= 0 {
            state.mvcc.current
        } else {
            revision
        };
        if rev > state.mvcc.current {
            return Err(KvError::FutureRevision.into());
        }
        let read = self.backend.read()?;
        let mut crc = Crc32c::new();
        let end = Revision::new(rev + 1, 0).to_bytes();
        read.scan(Table::Kv, &[], Some(&end), &mut |k, v| {
            crc.update(k);
            crc.update(v);
            true
        })?;
        Ok((crc.finish(), state.mvcc.compacted, rev))
    }

    /// A consistent copy of the replicated state: both tables except member-local metadata,
    /// framed and checksummed. Made durable first, so the log may be purged behind it.
    pub fn snapshot(&self) -> Result<Vec<u8>, EngineError> {
        self.snapshot_then(|| {})
    }

    /// [`Store::snapshot`], calling `consistent` once the copied state is fixed (a backend
    /// read view: later commits do not change it), before the long part, the serialization.
    /// Neither applies nor reads wait for that part.
    pub fn snapshot_then(&self, consistent: impl FnOnce()) -> Result<Vec<u8>, EngineError> {
        self.backend.sync()?;
        let read = self.backend.read()?;
        consistent();
        let mut out = SNAPSHOT_MAGIC.to_vec();
        for (tag, table) in [(0u8, Table::Kv), (1u8, Table::Meta)] {
            read.scan(table, &[], None, &mut |k, v| {
                if table == Table::Meta && k.starts_with(META_LOCAL_PREFIX) {
                    return true;
                }
                out.push(tag);
                out.extend_from_slice(&(k.len() as u32).to_be_bytes());
                out.extend_from_slice(k);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
                true
            })?;
        }
        let mut crc = Crc32c::new();
        crc.update(&out);
        out.extend_from_slice(&crc.finish().to_be_bytes());
        Ok(out)
    }

    /// Replaces the replicated state with a snapshot from [`Store::snapshot`], durably.
    /// Member-local metadata stays.
    pub fn restore(&self, data: &[u8]) -> Result<(), EngineError> {
        self.restore_keeping(data, |_, _| true).map(|_| ())
    }

    /// [`Store::restore`], storing only the snapshot's records `keep` accepts, in one commit;
    /// returns the restored revision.
    fn restore_keeping(
        &self,
        data: &[u8],
        keep: impl Fn(Table, &[u8]) -> bool,
    ) -> Result<i64, EngineError> {
        let bad = |what: &str| EngineError::Corrupt(format!("snapshot: {what}"));
        if data.len() < SNAPSHOT_MAGIC.len() + 4 || &data[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a snapshot of this store"));
        }
        let (body, trailer) = data.split_at(data.len() - 4);
        let mut crc = Crc32c::new();
        crc.update(body);
        if crc.finish().to_be_bytes() != trailer {
            return Err(bad("checksum mismatch"));
        }
        let mut batch = WriteBatch::default();
        batch.ops.push(WriteOp::Clear(Table::Kv));
        let mut state = self.write_state();
        {
            let read = self.backend.read()?;
            read.scan(Table::Meta, &[], None, &mut |k, _| {
                if !k.starts_with(META_LOCAL_PREFIX) {
                    batch.delete(Table::Meta, k.to_vec());
                }
                true
            })?;
        }
        let mut rest = &body[8..];
        let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>, EngineError> {
            if rest.len() < n {
                return Err(bad("truncated"));
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Ok(head.to_vec())
        };
        while !rest.is_empty() {
            let tag = take(&mut rest, 1)?[0];
            let klen = u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| bad("len"))?);
            let key = take(&mut rest, klen as usize)?;
            let vlen = u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| bad("len"))?);
            let value = take(&mut rest, vlen as usize)?;
            let table = match tag {
                0 => Table::Kv,
                1 => Table::Meta,
                _ => return Err(bad("unknown table")),
            };
            if keep(table, &key) {
                batch.put(table, key, value);
            }
        }
        self.backend.commit(batch, Durability::Immediate)?;
        *state = Self::load(self.backend.as_ref())?;
        self.size_seen.store(self.backend.size(), Ordering::Relaxed);
        let revision = state.mvcc.current;
        drop(state);
        if self
            .feed
            .offer(FeedItem::Resync(revision), || false)
            .is_some()
        {
            self.hub.resync_all(revision);
        }
        Ok(revision)
    }
}

impl Store {
    /// Seeds an empty store for a new cluster from a snapshot of another one (etcd's
    /// `snapshot restore`): the keyspace with its history and revisions, leases, users and
    /// roles stay; what belonged to the old cluster goes: its members, alarms, the applied
    /// Raft index and Raft's metadata. Returns the restored revision.
    /// One commit: a crash leaves either the empty store or the seeded one, never the old
    /// cluster's members or Raft position.
    pub fn restore_as_new_cluster(&self, data: &[u8]) -> Result<i64, EngineError> {
        self.restore_keeping(data, |table, key| {
            table == Table::Kv
                || !(key.starts_with(META_MEMBER_PREFIX)
                    || key.starts_with(META_ALARM_PREFIX)
                    || key == META_APPLIED_INDEX
                    || key == META_RAFT)
        })
    }
}

/// `key`'s value as of revision `at` (a watcher's `prev_kv`): `None` if it did not exist
/// then, or that version was compacted away (as in etcd).
fn value_at(
    state: &State,
    read: &dyn crate::backend::BackendRead,
    key: &[u8],
    at: i64,
) -> Option<KeyValue> {
    let found = state.mvcc.index.get(key, at)?;
    let src = Source {
        backend: read,
        overlay: None,
    };
    src.record(found.modified).ok().map(|r| r.kv)
}

fn event_revision(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The events of revisions `from..=to` in revision order, stopping early (at a revision
/// boundary) after [`watch::SYNC_MAX_RECORDS`] records. Returns them and the last revision
/// they cover completely.
fn read_history(
    read: &dyn crate::backend::BackendRead,
    from: i64,
    to: i64,
) -> Result<(Vec<Event>, i64), EngineError> {
    if from > to {
        return Ok((Vec::new(), to));
    }
    let start = Revision::new(from, 0).to_bytes();
    let end = Revision::new(to.saturating_add(1), 0).to_bytes();
    let mut events = Vec::new();
    let mut upto = to;
    let mut failure = None;
    read.scan(Table::Kv, &start, Some(&end), &mut |k, v| {
        let Some(rev) = Revision::from_bytes(k) else {
            failure = Some(EngineError::Corrupt("bad revision key in history".into()));
            return false;
        };
        if events.len() >= watch::SYNC_MAX_RECORDS
            && events.last().map(event_revision) != Some(rev.main)
        {
            upto = rev.main - 1;
            return false;
        }
        match Record::decode(Bytes::copy_from_slice(v)) {
            Ok(rec) => {
                let kind = if rec.tombstone {
                    EventType::Delete
                } else {
                    EventType::Put
                };
                events.push(Event {
                    r#type: kind as i32,
                    kv: Some(rec.kv),
                    prev_kv: None,
                });
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok((events, upto)),
    }
}

fn lease_key(id: i64) -> Vec<u8> {
    let mut k = META_LEASE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Applies a grant. The proposer chose the id and raised the TTL to the cluster's minimum, so
/// apply is the same on every member whatever its flags.
fn lease_grant(state: &mut State, req: &LeaseGrantRequest) -> Result<LeaseGrantResponse, Error> {
    state.mvcc.leases.grant(req.id, req.ttl)?;
    Ok(LeaseGrantResponse {
        header: header(state.mvcc.current),
        id: req.id,
        ttl: req.ttl,
        error: String::new(),
    })
}

/// Applies a revoke: every attached key is deleted in one write transaction (one revision,
/// keys in key order), and the lease record goes in the same batch.
fn lease_revoke(
    state: &mut State,
    read: &dyn crate::backend::BackendRead,
    overlay: &mut Overlay,
    req: &LeaseRevokeRequest,
) -> Result<LeaseRevokeResponse, Error> {
    let keys = state
        .mvcc
        .leases
        .revoke(req.id)
        .ok_or(KvError::LeaseNotFound)?;
    let mut txn = WriteTxn::begin(&mut state.mvcc, overlay, read);
    for key in &keys {
        txn.delete_range(KeyRange::Single(key));
    }
    let rev = txn.end();
    Ok(LeaseRevokeResponse {
        header: header(rev),
    })
}

/// Whether the client `caller` may make `request`, by the auth state as applied so far: the
/// check at apply is the one that counts, since permissions may change between a request's
/// arrival and its turn in the log (the services check reads themselves).
fn authorize(state: &State, caller: &Caller, request: &Request) -> Result<(), AuthError> {
    let auth = &state.auth;
    if !auth.enabled() {
        return Ok(());
    }
    let lease_keys = |id: i64| attached_keys(state, id);
    match request {
        Request::Range(r) => auth.check_range(caller, r),
        Request::Put(r) => auth.check_put(caller, r, &lease_keys),
        Request::DeleteRange(r) => auth.check_delete(caller, r),
        Request::Txn(r) => auth.check_txn(caller, r, &lease_keys),
        Request::LeaseGrant(_) => auth.check_authenticated(caller),
        Request::LeaseRevoke(r) => {
            auth.check_authenticated(caller)?;
            auth.check_lease_keys(caller, auth::Access::Write, &lease_keys, r.id)
        }
        Request::Alarm(a) if a.action == AlarmAction::Get as i32 => {
            auth.check_authenticated(caller)
        }
        // The password was checked by the proposer; apply only issues the token.
        Request::Authenticate(_) => Ok(()),
        Request::Compaction(_)
        | Request::Alarm(_)
        | Request::MemberAttributes(_)
        | Request::AuthEnable(_)
        | Request::AuthDisable(_)
        | Request::UserAdd(_)
        | Request::UserDelete(_)
        | Request::UserChangePassword(_)
        | Request::UserGrantRole(_)
        | Request::UserRevokeRole(_)
        | Request::RoleAdd(_)
        | Request::RoleDelete(_)
        | Request::RoleGrantPermission(_)
        | Request::RoleRevokePermission(_) => auth.check_admin(caller),
    }
}

/// The keys attached to lease `id` (none for an unknown lease).
fn attached_keys(state: &State, id: i64) -> Vec<Vec<u8>> {
    state
        .mvcc
        .leases
        .get(id)
        .map(|l| l.keys.iter().map(|k| k.to_vec()).collect())
        .unwrap_or_default()
}

/// Applies an auth-management request (`None` for any other request). Passwords arrive
/// hashed by the proposer.
fn apply_auth(
    auth: &mut AuthState,
    index: u64,
    request: &Request,
) -> Result<Option<Response>, AuthError> {
    let hash = |h: &str| Some(h.to_string());
    Ok(Some(match request {
        Request::AuthEnable(_) => {
            auth.enable()?;
            Response::AuthEnable(AuthEnableResponse::default())
        }
        Request::AuthDisable(_) => {
            auth.disable();
            Response::AuthDisable(AuthDisableResponse::default())
        }
        Request::Authenticate(r) => {
            if !auth.enabled() {
                return Err(AuthError::AuthNotEnabled);
            }
            // The user may have gone, or lost its password, since the proposer checked it.
            match auth.user(&r.name) {
                Some(u) if u.password.is_some() => {}
                _ => return Err(AuthError::AuthFailed),
            }
            Response::Authenticate(AuthenticateResponse {
                header: None,
                token: format!("{}.{index}", r.simple_token),
            })
        }
        Request::UserAdd(r) => {
            let no_password = r.options.is_some_and(|o| o.no_password);
            auth.user_add(
                &r.name,
                if no_password {
                    None
                } else {
                    hash(&r.hashed_password)
                },
            )?;
            Response::UserAdd(AuthUserAddResponse::default())
        }
        Request::UserDelete(r) => {
            auth.user_delete(&r.name)?;
            Response::UserDelete(AuthUserDeleteResponse::default())
        }
        Request::UserChangePassword(r) => {
            auth.user_change_password(&r.name, r.hashed_password.clone())?;
            Response::UserChangePassword(AuthUserChangePasswordResponse::default())
        }
        Request::UserGrantRole(r) => {
            auth.user_grant_role(&r.user, &r.role)?;
            Response::UserGrantRole(AuthUserGrantRoleResponse::default())
        }
        Request::UserRevokeRole(r) => {
            auth.user_revoke_role(&r.name, &r.role)?;
            Response::UserRevokeRole(AuthUserRevokeRoleResponse::default())
        }
        Request::RoleAdd(r) => {
            auth.role_add(&r.name)?;
            Response::RoleAdd(AuthRoleAddResponse::default())
        }
        Request::RoleDelete(r) => {
            auth.role_delete(&r.role)?;
            Response::RoleDelete(AuthRoleDeleteResponse::default())
        }
        Request::RoleGrantPermission(r) => {
            auth.role_grant_permission(&r.name, r.perm.clone())?;
            Response::RoleGrantPermission(AuthRoleGrantPermissionResponse::default())
        }
        Request::RoleRevokePermission(r) => {
            auth.role_revoke_permission(&r.role, &r.key, &r.range_end)?;
            Response::RoleRevokePermission(AuthRoleRevokePermissionResponse::default())
        }
        _ => return Ok(None),
    }))
}

/// An auth response with its header at store revision `revision`.
fn with_header(mut response: Response, revision: i64) -> Response {
    let slot = match &mut response {
        Response::AuthEnable(r) => &mut r.header,
        Response::AuthDisable(r) => &mut r.header,
        Response::Authenticate(r) => &mut r.header,
        Response::UserAdd(r) => &mut r.header,
        Response::UserDelete(r) => &mut r.header,
        Response::UserChangePassword(r) => &mut r.header,
        Response::UserGrantRole(r) => &mut r.header,
        Response::UserRevokeRole(r) => &mut r.header,
        Response::RoleAdd(r) => &mut r.header,
        Response::RoleDelete(r) => &mut r.header,
        Response::RoleGrantPermission(r) => &mut r.header,
        Response::RoleRevokePermission(r) => &mut r.header,
        _ => return response,
    };
    *slot = header(revision);
    response
}

fn member_key(id: u64) -> Vec<u8> {
    let mut k = META_MEMBER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = META_ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

fn alarm(state: &mut State, req: &AlarmRequest) -> AlarmResponse {
    let member = |(m, a): &(u64, i32)| AlarmMember {
        member_id: *m,
        alarm: *a,
    };
    let alarms = match AlarmAction::try_from(req.action) {
        Ok(AlarmAction::Activate) if req.alarm != AlarmType::None as i32 => {
            let entry = (req.member_id, req.alarm);
            state.alarms.insert(entry);
            vec![member(&entry)]
        }
        Ok(AlarmAction::Deactivate) => {
            let entry = (req.member_id, req.alarm);
            if state.alarms.remove(&entry) {
                vec![member(&entry)]
            } else {
                Vec::new()
            }
        }
        Ok(AlarmAction::Get) => state.alarms.iter().map(member).collect(),
        _ => Vec::new(),
    };
    AlarmResponse {
        header: header(state.mvcc.current),
        alarms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::etcdserverpb::PutRequest;

    fn store() -> Store {
        Store::open(
            Box::new(MemoryBackend::new()),
            StoreConfig {
                member_id: 1,
                quota_bytes: 0,
            },
        )
        .unwrap()
    }

    fn apply(store: &Store, index: u64, request: Request) -> Outcome {
        let cmd = InternalRequest {
            header: None,
            id: index,
            request: Some(request),
        };
        store
            .apply_batch(&[(index, Some(cmd))], b"meta")
            .unwrap()
            .pop()
            .unwrap()
    }

    /// Whether a write applies depends on replicated state only, never on the member's own
    /// file size: a store far past its quota applies writes until the NOSPACE alarm (raised
    /// through the log by a member past its quota) is up, then refuses writes, not reads.
    #[test]
    fn writes_are_refused_by_the_replicated_alarm_not_the_local_size() {
        use crate::proto::etcdserverpb::{AlarmRequest, AlarmType, alarm_request::AlarmAction};
        let tiny = Store::open(
            Box::new(MemoryBackend::new()),
            StoreConfig {
                member_id: 1,
                quota_bytes: 1,
            },
        )
        .unwrap();
        let put = |value: &[u8]| {
            Request::Put(PutRequest {
                key: b"k".to_vec(),
                value: value.to_vec(),
                ..Default::default()
            })
        };
        assert!(apply(&tiny, 1, put(b"a")).is_ok());
        assert!(apply(&tiny, 2, put(b"b")).is_ok());
        let raise = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 9,
            alarm: AlarmType::Nospace as i32,
        };
        apply(&tiny, 3, Request::Alarm(raise)).unwrap();
        assert_eq!(apply(&tiny, 4, put(b"c")).err(), Some(KvError::NoSpace));
        let range = crate::proto::etcdserverpb::RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        assert!(apply(&tiny, 5, Request::Range(range)).is_ok());
        let disarm = AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            member_id: 9,
            alarm: AlarmType::Nospace as i32,
        };
        apply(&tiny, 6, Request::Alarm(disarm)).unwrap();
        assert!(apply(&tiny, 7, put(b"d")).is_ok());
        assert_eq!(tiny.revision(), 4);
    }

    /// etcd's `HashByRev` refuses an explicit revision equal to the compaction revision
    /// (`rev <= compactRev`), unlike a Range, which may read at it.
    #[test]
    fn hash_kv_at_the_compacted_revision_is_refused() {
        let s = store();
        for i in 1..=3u64 {
            let put = PutRequest {
                key: b"k".to_vec(),
                value: vec![i as u8],
                ..Default::default()
            };
            apply(&s, i, Request::Put(put)).unwrap();
        }
        let compact = CompactionRequest {
            revision: 3,
            physical: false,
        };
        apply(&s, 4, Request::Compaction(compact)).unwrap();
        let compacted = KvError::Compacted {
            compact_revision: 3,
        };
        assert!(matches!(s.hash_kv(3), Err(Error::Request(e)) if e == compacted));
        assert!(matches!(s.hash_kv(2), Err(Error::Request(e)) if e == compacted));
        assert_eq!(s.hash_kv(4).unwrap().1, 3);
        assert_eq!(s.hash_kv(0).unwrap().2, 4);
        assert!(matches!(
            s.hash_kv(5),
            Err(Error::Request(KvError::FutureRevision))
        ));
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::etcdserverpb::{AlarmRequest, Member, PutRequest};
    use crate::proto::kvserverpb::MemberAttributes;

    fn store() -> Store {
        let config = StoreConfig {
            member_id: 7,
            quota_bytes: 0,
        };
        Store::open(Box::new(MemoryBackend::new()), config).unwrap()
    }

    fn apply(store: &Store, index: u64, request: Request) {
        let cmd = InternalRequest {
            header: None,
            id: index,
            request: Some(request),
        };
        let outcome = store
            .apply_batch(&[(index, Some(cmd))], b"raft meta")
            .unwrap();
        assert!(outcome[0].is_ok(), "{outcome:?}");
    }

    /// A new cluster seeded from a snapshot has the old keyspace, history and leases, and
    /// none of the old cluster's members, alarms or Raft position.
    #[test]
    fn a_new_cluster_keeps_the_data_and_forgets_the_old_cluster() {
        let old = store();
        apply(
            &old,
            1,
            Request::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 9 }),
        );
        for (i, key) in ["a", "b", "a"].iter().enumerate() {
            let put = PutRequest {
                key: key.as_bytes().to_vec(),
                value: vec![i as u8],
                lease: if *key == "b" { 9 } else { 0 },
                ..Default::default()
            };
            apply(&old, 2 + i as u64, Request::Put(put));
        }
        let member = Member {
            id: 7,
            name: "m7".into(),
            ..Default::default()
        };
        apply(
            &old,
            5,
            Request::MemberAttributes(MemberAttributes {
                member: Some(member),
                removed: false,
            }),
        );
        let alarm = AlarmRequest {
            action: 1,
            member_id: 7,
            alarm: 1,
        };
        apply(&old, 6, Request::Alarm(alarm));
        assert_eq!(old.alarms().len(), 1);
        assert_eq!(old.members().len(), 1);

        let new = store();
        let revision = new
            .restore_as_new_cluster(&old.snapshot().unwrap())
            .unwrap();
        assert_eq!(revision, old.revision());
        assert_eq!(new.hash_kv(0).unwrap(), old.hash_kv(0).unwrap());
        assert_eq!(new.lease(9), Some((60, vec![b"b".to_vec()])));
        assert!(new.alarms().is_empty());
        assert!(new.members().is_empty());
        assert_eq!(new.applied_index(), 0);
        assert_eq!(new.raft_meta(), None);
        assert!(new.restore_as_new_cluster(b"not a snapshot").is_err());
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    fn config() -> StoreConfig {
        StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        }
    }

    fn run(store: &Store, index: u64, request: Request) -> Outcome {
        let cmd = InternalRequest {
            header: None,
            id: index,
            request: Some(request),
        };
        store
            .apply_batch(&[(index, Some(cmd))], b"m")
            .unwrap()
            .pop()
            .unwrap()
    }

    fn put(key: &str, lease: i64) -> Request {
        Request::Put(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        })
    }

    fn grant(id: i64, ttl: i64) -> Request {
        Request::LeaseGrant(LeaseGrantRequest { ttl, id })
    }

    fn keys_of(store: &Store, id: i64) -> Vec<Vec<u8>> {
        store.lease(id).map(|(_, k)| k).unwrap_or_default()
    }

    /// Every live key-value, read now.
    fn everything(store: &Store) -> RangeResponse {
        store
            .range(&RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            })
            .unwrap()
    }

    fn live_keys(store: &Store) -> Vec<Vec<u8>> {
        everything(store)
            .kvs
            .iter()
            .map(|kv| kv.key.to_vec())
            .collect()
    }

    #[test]
    fn keys_are_listed_with_their_leases_up_to_a_limit() {
        let s = Store::open(Box::new(MemoryBackend::new()), config()).unwrap();
        run(&s, 1, grant(7, 60)).unwrap();
        run(&s, 2, put("a", 0)).unwrap();
        run(&s, 3, put("b", 7)).unwrap();
        run(&s, 4, put("c", 0)).unwrap();
        run(&s, 5, put("d", 7)).unwrap();
        run(
            &s,
            6,
            Request::DeleteRange(DeleteRangeRequest {
                key: b"c".to_vec(),
                ..Default::default()
            }),
        )
        .unwrap();
        let (rev, all, more) = s.list_keys(10, |_, _| true);
        assert_eq!(rev, s.revision());
        let listed: Vec<(&[u8], i64)> = all.iter().map(|(k, l)| (&k[..], *l)).collect();
        assert_eq!(
            listed,
            [(&b"a"[..], 0), (b"b", 7), (b"d", 7)],
            "live keys only"
        );
        assert!(!more);
        let (_, leased, _) = s.list_keys(10, |_, lease| lease != 0);
        assert_eq!(leased.len(), 2);
        let (at, mut attached) = s.leased_keys(10);
        attached.sort();
        assert_eq!(
            (at, attached),
            (rev, vec![(b"b".to_vec(), 7), (b"d".to_vec(), 7)])
        );
        assert_eq!(s.leased_keys(1).1.len(), 1);
        let (_, first, more) = s.list_keys(2, |_, _| true);
        assert_eq!(first.len(), 2);
        assert!(more, "a key remains past the limit");
        let (_, _, more) = s.list_keys(3, |_, _| true);
        assert!(!more, "exactly the limit: nothing remains");
    }

    #[test]
    fn put_attaches_delete_detaches_revoke_deletes_in_one_revision() {
        let s = Store::open(Box::new(MemoryBackend::new()), config()).unwrap();
        assert_eq!(run(&s, 1, put("a", 5)), Err(KvError::LeaseNotFound));
        run(&s, 2, grant(5, 10)).unwrap();
        run(&s, 3, grant(6, 10)).unwrap();
        assert_eq!(run(&s, 4, grant(5, 10)), Err(KvError::LeaseExists));
        for (i, k) in ["c", "a", "b", "d"].iter().enumerate() {
            run(&s, 5 + i as u64, put(k, 5)).unwrap();
        }
        // A put without a lease detaches; a put with another lease moves the key.
        run(&s, 9, put("c", 0)).unwrap();
        run(&s, 10, put("d", 6)).unwrap();
        let delete = Request::DeleteRange(DeleteRangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        });
        run(&s, 11, delete).unwrap();
        assert_eq!(keys_of(&s, 5), vec![b"a".to_vec()]);
        assert_eq!(keys_of(&s, 6), vec![b"d".to_vec()]);
        run(&s, 12, put("e", 5)).unwrap();
        let before = s.revision();
        let revoke = Request::LeaseRevoke(LeaseRevokeRequest { id: 5 });
        let out = run(&s, 13, revoke.clone()).unwrap();
        assert_eq!(s.revision(), before + 1);
        let Some(Response::LeaseRevoke(r)) = out.response else {
            panic!("not a revoke response");
        };
        assert_eq!(r.header.unwrap().revision, before + 1);
        let all = everything(&s);
        assert_eq!(live_keys(&s), vec![b"c".to_vec(), b"d".to_vec()]);
        assert!(all.kvs.iter().all(|kv| kv.mod_revision != before + 1));
        assert_eq!(run(&s, 14, revoke), Err(KvError::LeaseNotFound));
        // A revoke of a lease with no keys changes no revision.
        run(&s, 15, grant(9, 10)).unwrap();
        let rev = s.revision();
        run(&s, 16, Request::LeaseRevoke(LeaseRevokeRequest { id: 9 })).unwrap();
        assert_eq!(s.revision(), rev);
        assert_eq!(s.lease_counts(), (1, 1));
    }

    #[test]
    fn leases_and_attachments_survive_reopen() {
        let s = Store::open(Box::new(MemoryBackend::new()), config()).unwrap();
        run(&s, 1, grant(7, 30)).unwrap();
        run(&s, 2, grant(8, 40)).unwrap();
        run(&s, 3, put("x", 7)).unwrap();
        run(&s, 4, put("y", 8)).unwrap();
        run(&s, 5, put("y", 7)).unwrap();
        run(&s, 6, Request::LeaseRevoke(LeaseRevokeRequest { id: 8 })).unwrap();
        let hash = s.hash().unwrap();
        let s = Store::open(s.into_backend(), config()).unwrap();
        assert_eq!(s.leases(), vec![(7, 30)]);
        assert_eq!(keys_of(&s, 7), vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(s.hash().unwrap(), hash);
        // And through a snapshot onto another store.
        let other = Store::open(Box::new(MemoryBackend::new()), config()).unwrap();
        other.restore(&s.snapshot().unwrap()).unwrap();
        assert_eq!(other.leases(), vec![(7, 30)]);
        assert_eq!(keys_of(&other, 7), vec![b"x".to_vec(), b"y".to_vec()]);
    }

    use crate::backend::BackendError;

    /// A memory backend whose `sync` waits until the test lets it finish.
    struct SlowSync {
        inner: MemoryBackend,
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Backend for SlowSync {
        fn read(&self) -> Result<Box<dyn crate::backend::BackendRead + '_>, BackendError> {
            self.inner.read()
        }
        fn commit(&self, batch: WriteBatch, d: Durability) -> Result<(), BackendError> {
            self.inner.commit(batch, d)
        }
        fn sync(&self) -> Result<(), BackendError> {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
            self.inner.sync()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn size_in_use(&self) -> u64 {
            self.inner.size_in_use()
        }
        fn defragment(&self) -> Result<(), BackendError> {
            self.inner.defragment()
        }
    }

    #[test]
    fn reads_go_on_while_the_backend_syncs() {
        // A sync used to hold the state's write lock, so every read waited for the disk.
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release, release_rx) = std::sync::mpsc::channel();
        let backend = SlowSync {
            inner: MemoryBackend::new(),
            entered: entered_tx,
            release: Mutex::new(release_rx),
        };
        let s = Store::open(Box::new(backend), config()).unwrap();
        run(&s, 1, put("k", 0)).unwrap();
        let s = &s;
        std::thread::scope(|scope| {
            let syncing = scope.spawn(move || s.sync());
            let limit = std::time::Duration::from_secs(10);
            entered.recv_timeout(limit).expect("the sync started");
            let (done, read) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let got = s.range(&RangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                });
                let _ = done.send(got.map(|r| r.kvs.len()));
            });
            let got = read.recv_timeout(limit);
            // Let the sync finish either way, so a failure ends instead of hanging.
            release.send(()).unwrap();
            syncing.join().unwrap().unwrap();
            assert_eq!(got.ok().and_then(|r| r.ok()), Some(1), "the read waited");
        });
    }

    #[test]
    fn writes_and_reads_go_on_while_a_snapshot_serializes() {
        // A snapshot used to hold the state's write lock for the whole serialization (about a
        // second at a million keys): every apply and every read waited. Now only the view is
        // fixed under it; this write and read, made while the copy is still being taken,
        // would have deadlocked then.
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::backend::RedbBackend::open(&dir.path().join("kv.redb")).unwrap();
        let s = Store::open(Box::new(backend), config()).unwrap();
        run(&s, 1, put("before", 0)).unwrap();
        let mut during = None;
        let data = s
            .snapshot_then(|| {
                during = Some(run(&s, 2, put("during", 0)));
                assert_eq!(s.revision(), 3);
            })
            .unwrap();
        assert!(matches!(during, Some(Ok(_))));
        // The copy is of the state when its view was fixed: the write made during it is not in.
        let other = Store::open(Box::new(MemoryBackend::new()), config()).unwrap();
        other.restore(&data).unwrap();
        assert_eq!(other.revision(), 2);
        assert_eq!(live_keys(&other), vec![b"before".to_vec()]);
        assert_eq!(live_keys(&s), vec![b"before".to_vec(), b"during".to_vec()]);
    }
}

#[cfg(test)]
mod member_tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::kvserverpb::MemberAttributes;

    fn attrs(id: u64, name: &str, removed: bool) -> InternalRequest {
        InternalRequest {
            header: None,
            id: 0,
            request: Some(Request::MemberAttributes(MemberAttributes {
                member: Some(Member {
                    id,
                    name: name.into(),
                    peer_ur_ls: vec![format!("http://127.0.0.1:{id}")],
                    client_ur_ls: vec![],
                    is_learner: false,
                }),
                removed,
            })),
        }
    }

    #[test]
    fn member_attributes_are_replicated_state_and_survive_reopen() {
        let config = StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        };
        let store = Store::open(Box::new(MemoryBackend::new()), config.clone()).unwrap();
        store
            .apply_batch(
                &[
                    (1, Some(attrs(7, "a", false))),
                    (2, Some(attrs(8, "b", false))),
                ],
                b"m",
            )
            .unwrap();
        store
            .apply_batch(&[(3, Some(attrs(7, "", true)))], b"m")
            .unwrap();
        let revision = store.revision();
        let store = Store::open(store.into_backend(), config).unwrap();
        let members = store.members();
        assert_eq!(members.keys().copied().collect::<Vec<_>>(), vec![8]);
        assert_eq!(members[&8].name, "b");
        // Membership bookkeeping is not a key-value write.
        assert_eq!(store.revision(), revision);
        assert_eq!(revision, 1);
    }
}

#[cfg(test)]
mod range_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    /// A range over many records fetches them by one scan of the history (dense revisions)
    /// or one by one; either way each key gets its own value, at the current revision and at
    /// an older one, with deletions and overwrites in between.
    #[test]
    fn large_ranges_read_the_right_records() {
        let config = StoreConfig {
            member_id: 1,
            quota_bytes: 0,
        };
        let s = Store::open(Box::new(MemoryBackend::new()), config).unwrap();
        let mut index = 0;
        let mut apply = |request: Request| {
            index += 1;
            let cmd = InternalRequest {
                header: None,
                id: index,
                request: Some(request),
            };
            s.apply_batch(&[(index, Some(cmd))], b"m")
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
        };
        let put = |key: &str, value: String| {
            Request::Put(PutRequest {
                key: key.into(),
                value: value.into_bytes(),
                ..Default::default()
            })
        };
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        for i in 0..300 {
            let key = format!("k{i:03}");
            model.insert(key.clone(), format!("first {i}"));
            apply(put(&key, format!("first {i}")));
        }
        let old = (s.revision(), model.clone());
        for i in (0..300).step_by(3) {
            let key = format!("k{i:03}");
            model.insert(key.clone(), format!("second {i}"));
            apply(put(&key, format!("second {i}")));
        }
        for i in (0..300).step_by(7) {
            let key = format!("k{i:03}");
            model.remove(&key);
            apply(Request::DeleteRange(DeleteRangeRequest {
                key: key.into_bytes(),
                ..Default::default()
            }));
        }
        for (revision, expected) in [(0, &model), (old.0, &old.1)] {
            let got = s
                .range(&RangeRequest {
                    key: b"k".to_vec(),
                    range_end: b"l".to_vec(),
                    revision,
                    ..Default::default()
                })
                .unwrap();
            let got: BTreeMap<String, String> = got
                .kvs
                .iter()
                .map(|kv| {
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    (key, String::from_utf8_lossy(&kv.value).into_owned())
                })
                .collect();
            assert_eq!(&got, expected, "at revision {revision}");
        }
    }

    mod auth_apply {
        use super::*;
        use crate::backend::MemoryBackend;
        use crate::proto::authpb::{Permission, UserAddOptions, permission::Type as PermType};
        use crate::proto::etcdserverpb::{
            AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest,
            AuthUserAddRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest, PutRequest,
        };
        use crate::proto::kvserverpb::{InternalAuthenticateRequest, RequestHeader};

        fn config() -> StoreConfig {
            StoreConfig {
                member_id: 1,
                quota_bytes: 0,
            }
        }

        fn store() -> Store {
            Store::open(Box::new(MemoryBackend::new()), config()).unwrap()
        }

        /// Applies `request` at `index` as `user` (empty: no credentials) at the store's
        /// current auth revision; `None` applies it as the server's own request.
        fn as_user(s: &Store, index: u64, user: Option<&str>, request: Request) -> Outcome {
            let header = user.map(|u| RequestHeader {
                username: u.to_string(),
                auth_revision: s.auth(|a| a.revision()),
            });
            let cmd = InternalRequest {
                header,
                id: index,
                request: Some(request),
            };
            s.apply_batch(&[(index, Some(cmd))], b"meta")
                .unwrap()
                .pop()
                .unwrap()
        }

        fn put(key: &str) -> Request {
            Request::Put(PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })
        }

        fn denied(outcome: Outcome) -> AuthError {
            match outcome {
                Err(KvError::Auth(e)) => e,
                other => panic!("expected an auth error, got {other:?}"),
            }
        }

        /// Root and alice (read-write on `/app/`), auth on; returns the next index.
        fn set_up(s: &Store) -> u64 {
            let user = |name: &str| {
                Request::UserAdd(AuthUserAddRequest {
                    name: name.into(),
                    hashed_password: format!("hash-of-{name}"),
                    ..Default::default()
                })
            };
            let grant = |user: &str, role: &str| {
                Request::UserGrantRole(AuthUserGrantRoleRequest {
                    user: user.into(),
                    role: role.into(),
                })
            };
            let steps = [
                user("root"),
                grant("root", "root"),
                user("alice"),
                Request::RoleAdd(AuthRoleAddRequest { name: "app".into() }),
                Request::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                    name: "app".into(),
                    perm: Some(Permission {
                        perm_type: PermType::Readwrite as i32,
                        key: b"/app/".to_vec(),
                        range_end: b"/app0".to_vec(),
                    }),
                }),
                grant("alice", "app"),
                Request::AuthEnable(AuthEnableRequest {}),
            ];
            let mut index = 1;
            for step in steps {
                as_user(s, index, Some(""), step).unwrap();
                index += 1;
            }
            index
        }

        #[test]
        fn auth_changes_are_checked_applied_and_survive_reopen_and_snapshots() {
            let s = store();
            let mut i = set_up(&s);
            let mut next = || {
                i += 1;
                i
            };
            assert!(s.auth(|a| a.enabled()));
            as_user(&s, next(), Some("alice"), put("/app/x")).unwrap();
            assert_eq!(
                denied(as_user(&s, next(), Some("alice"), put("/other"))),
                AuthError::PermissionDenied
            );
            assert_eq!(
                denied(as_user(&s, next(), Some(""), put("/app/x"))),
                AuthError::UserEmpty
            );
            // The server's own requests are not checked.
            as_user(&s, next(), None, put("/other")).unwrap();
            // Managing auth needs the root role.
            let add_bob = Request::UserAdd(AuthUserAddRequest {
                name: "bob".into(),
                options: Some(UserAddOptions { no_password: true }),
                ..Default::default()
            });
            assert_eq!(
                denied(as_user(&s, next(), Some("alice"), add_bob.clone())),
                AuthError::PermissionDenied
            );
            as_user(&s, next(), Some("root"), add_bob).unwrap();
            // A token is issued at the entry's index, for a user with a password only.
            let authenticate = |name: &str| {
                Request::Authenticate(InternalAuthenticateRequest {
                    name: name.into(),
                    simple_token: "abcdefghijklmnop".into(),
                })
            };
            let index = next();
            let resp = as_user(&s, index, None, authenticate("alice")).unwrap();
            match resp.response {
                Some(Response::Authenticate(r)) => {
                    assert_eq!(r.token, format!("abcdefghijklmnop.{index}"));
                    assert!(r.header.is_some());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                denied(as_user(&s, next(), None, authenticate("bob"))),
                AuthError::AuthFailed
            );
            // Stale credentials are refused.
            let stale = RequestHeader {
                username: "alice".into(),
                auth_revision: s.auth(|a| a.revision()) - 1,
            };
            let index = next();
            let cmd = InternalRequest {
                header: Some(stale),
                id: index,
                request: Some(put("/app/y")),
            };
            let out = s.apply_batch(&[(index, Some(cmd))], b"meta").unwrap();
            assert_eq!(out, vec![Err(KvError::Auth(AuthError::AuthOldRevision))]);
            // Reopen and snapshot keep all of it; a deleted user's record goes.
            as_user(
                &s,
                next(),
                Some("root"),
                Request::UserDelete(AuthUserDeleteRequest { name: "bob".into() }),
            )
            .unwrap();
            let records = s.auth(|a| a.to_records());
            let s = Store::open(s.into_backend(), config()).unwrap();
            assert_eq!(s.auth(|a| a.to_records()), records);
            assert!(s.auth(|a| a.user("bob").is_none()));
            let other = store();
            other.restore(&s.snapshot().unwrap()).unwrap();
            assert_eq!(other.auth(|a| a.to_records()), records);
            assert_eq!(
                denied(as_user(&other, i + 1, Some("alice"), put("/other"))),
                AuthError::PermissionDenied
            );
        }
    }
}
