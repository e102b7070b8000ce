//! A registration: one instance's key, kept in place by a background task that owns the
//! registration's session.
//!
//! The task loops: get a live session, claim the key, hold it until the session ends, the key
//! is deleted or another registration takes it, then start over (after a pause if something
//! failed). Claims after the first only create the key if it is absent (or still on one of
//! this registration's own earlier leases), so a registration never steals its id back from
//! a newer one.

use std::time::Duration;

use futures::StreamExt;
use kv_client::{
    Client, Compare, CompareOp, EventKind, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnResponse, WatchOptions,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::backoff::Backoff;
use super::{Service, transient};
use crate::error::{Error, Result};
use crate::owned::read_answer;
use crate::session::Session;

/// The TTL in seconds of a registration's session unless another is asked for: a dead
/// instance stays listed for at most this long after its last renewal.
pub const DEFAULT_REGISTRATION_TTL: i64 = 10;

/// First pause after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How many earlier leases of a registration are remembered as its own (a key still on one
/// of them, after the client gave up on it, is moved to the new lease rather than waited out).
const OWN_LEASES_KEPT: usize = 4;

/// How a registration is kept.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    ttl: i64,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RegisterOptions {
    fn default() -> Self {
        RegisterOptions {
            ttl: DEFAULT_REGISTRATION_TTL,
            min_backoff: MIN_BACKOFF,
            max_backoff: MAX_BACKOFF,
        }
    }
}

impl RegisterOptions {
    /// A [`DEFAULT_REGISTRATION_TTL`] session and the default backoff.
    pub fn new() -> Self {
        Self::default()
    }

    /// The session TTL in seconds: how long a dead instance stays listed, at most.
    pub fn ttl(mut self, seconds: i64) -> Self {
        self.ttl = seconds;
        self
    }

    /// Pauses between failed attempts: from `min`, doubling up to `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }
}

/// Where a listed registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The lease the key is on (the current session's).
    pub lease: i64,
    /// The key's create revision; a re-registration after the key was lost has a higher one.
    pub create_revision: i64,
    /// The revision of the last write of the key: a cache at this revision lists it.
    pub revision: i64,
}

/// What a registration is doing, as reported by [`Registration::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// Not listed now: the first claim, or a new one after the session or the key was lost,
    /// is under way. `last_error` says why the latest attempt failed, if one did.
    Registering {
        /// The latest failure.
        last_error: Option<Error>,
    },
    /// Listed.
    Registered(Registered),
    /// Another registration of the same id (on `lease`) holds the key; this one takes over
    /// when that key goes.
    Displaced {
        /// The other registration's lease.
        lease: i64,
    },
    /// Deregistered or abandoned.
    Stopped,
    /// Gave up before the first claim, for this reason.
    Failed(Error),
}

/// An instance listed in a service while this handle lives. A background task re-registers
/// it after its session or key is lost. Dropping the handle deregisters in the background;
/// [`Registration::deregister`] does it and reports the outcome.
#[derive(Debug)]
pub struct Registration {
    id: String,
    key: Vec<u8>,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<RegistrationStatus>,
}

/// What the handle asks of its task. Dropping every sender means "deregister".
enum Command {
    Deregister(oneshot::Sender<Result<()>>),
    Abandon,
}

pub(super) async fn register(
    service: &Service,
    id: String,
    info: &super::InstanceInfo,
    options: RegisterOptions,
) -> Result<Registration> {
    if options.ttl <= 0 {
        return Err(Error::Invalid(format!(
            "registration TTL {} is not positive",
            options.ttl
        )));
    }
    let value = serde_json::to_vec(info)
        .map_err(|e| Error::Invalid(format!("instance info does not serialize: {e}")))?;
    let key = service.key_of(&id);
    let (status_tx, status) = watch::channel(RegistrationStatus::Registering { last_error: None });
    let (commands, command_rx) = mpsc::channel(1);
    let task = Task {
        client: service.client().clone(),
        key: key.clone(),
        value,
        backoff: Backoff::new(options.min_backoff, options.max_backoff),
        options,
        session: None,
        own_leases: Vec::new(),
        claimed_once: false,
        status: status_tx,
    };
    tokio::spawn(task.run(command_rx));
    // From here on, dropping this future drops the handle, which withdraws the registration.
    let registration = Registration {
        id,
        key,
        commands,
        status,
    };
    registration.registered().await?;
    Ok(registration)
}

impl Registration {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The instance's key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// What the registration is doing now.
    pub fn status(&self) -> RegistrationStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every status change from now on (for `changed().await` loops): the
    /// current status counts as seen, so the first `changed()` is a real change.
    pub fn watch_status(&self) -> watch::Receiver<RegistrationStatus> {
        let mut status = self.status.clone();
        status.mark_unchanged();
        status
    }

    /// Waits until the instance is listed (at once if it is). Fails if the registration gave
    /// up before its first claim.
    pub async fn registered(&self) -> Result<Registered> {
        let mut status = self.status.clone();
        let seen = status
            .wait_for(|s| {
                matches!(
                    s,
                    RegistrationStatus::Registered(_)
                        | RegistrationStatus::Failed(_)
                        | RegistrationStatus::Stopped
                )
            })
            .await
            .map(|s| s.clone());
        match seen {
            Ok(RegistrationStatus::Registered(r)) => Ok(r),
            Ok(RegistrationStatus::Failed(e)) => Err(e),
            // The task only stops when told to, which needs this handle; or it panicked.
            _ => Err(Error::Protocol("the registration task ended".into())),
        }
    }

    /// Removes the instance: revokes the registration's lease, which deletes its key (unless
    /// another registration took the id over). If the server cannot be reached, the lease
    /// ends a TTL later anyway, since nobody renews it any more. Dropping this future does
    /// not stop the removal.
    pub async fn deregister(self) -> Result<()> {
        let (reply, outcome) = oneshot::channel();
        if self
            .commands
            .send(Command::Deregister(reply))
            .await
            .is_err()
        {
            return Ok(());
        }
        outcome.await.unwrap_or(Ok(()))
    }

    /// Stops renewing the lease without deleting the key: the instance stays listed until
    /// the lease expires, as after a crash (for tests and hand-overs).
    pub fn abandon(self) {
        let _ = self.commands.try_send(Command::Abandon);
    }
}

/// The result of one claim of the key.
enum Claim {
    /// The key is ours, as this key-value read at `revision` says.
    Ours { kv: KeyValue, revision: i64 },
    /// Another registration holds it; the read was at `revision`.
    Taken { kv: KeyValue, revision: i64 },
    /// The state moved under the claim; try again at once.
    Again,
}

/// Why holding the key ended.
enum Held {
    SessionLost,
    KeyDeleted,
    TakenBy(i64),
    /// The watch failed or was compacted: re-read to find out.
    Unknown(Option<Error>),
}

/// The background side of a [`Registration`].
struct Task {
    client: Client,
    key: Vec<u8>,
    value: Vec<u8>,
    options: RegisterOptions,
    backoff: Backoff,
    /// The current session; kept outside the upkeep future so that deregistering can revoke
    /// it after that future is dropped.
    session: Option<Session>,
    /// Leases of earlier sessions of this registration, newest last.
    own_leases: Vec<i64>,
    /// Whether the key was ever ours: until then a claim overwrites (takes the id over).
    claimed_once: bool,
    status: watch::Sender<RegistrationStatus>,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let command = tokio::select! {
            command = commands.recv() => command,
            failed = self.upkeep() => {
                // upkeep only returns with an error that ends the first attempt.
                self.status.send_replace(RegistrationStatus::Failed(failed));
                // Nothing to report the outcome to: the lease ends a TTL later if this fails.
                let _ = self.end_session().await;
                return;
            }
        };
        match command {
            Some(Command::Abandon) => {
                // Dropping the session stops its renewals; the lease ends a TTL later.
                self.session = None;
            }
            Some(Command::Deregister(reply)) => {
                let outcome = self.end_session().await;
                let _ = reply.send(outcome);
            }
            None => {
                let _ = self.end_session().await;
            }
        }
        self.status.send_replace(RegistrationStatus::Stopped);
    }

    /// Revokes the session's lease (deleting the key if it is on it). If the revoke fails,
    /// deletes the key if it is still on that lease; if that fails too, the lease expires a
    /// TTL from its last renewal.
    async fn end_session(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let lease = session.lease();
        let revoked = session.close().await;
        if revoked.is_ok() {
            return Ok(());
        }
        let delete = Txn::new()
            .when([Compare::lease(self.key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(self.key.clone(), Default::default())]);
        match self.client.kv().txn(delete).await {
            Ok(_) => Ok(()),
            Err(_) => revoked,
        }
    }

    /// Keeps the key in place forever; returns only a failure that ends the first attempt.
    async fn upkeep(&mut self) -> Error {
        loop {
            let session = match self.live_session().await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(fatal) = self.failed(e) {
                        return fatal;
                    }
                    self.backoff.wait().await;
                    continue;
                }
            };
            let claim = match self.claim(&session).await {
                Ok(c) => c,
                Err(Error::Client(kv_client::Error::LeaseNotFound)) => {
                    // The session ended under the claim: the next turn makes a new one.
                    self.retire_session();
                    continue;
                }
                Err(e) => {
                    if let Some(fatal) = self.failed(e) {
                        return fatal;
                    }
                    self.backoff.wait().await;
                    continue;
                }
            };
            match claim {
                Claim::Again => {
                    self.backoff.wait().await;
                    continue;
                }
                Claim::Ours { kv, revision } => {
                    self.claimed_once = true;
                    self.backoff.reset();
                    self.status
                        .send_if_modified(|s| replace(s, registered_from(&kv)));
                    // From the read's revision, not the key's: a key unchanged for long may
                    // have its own revision compacted away, and the watch would fail at once.
                    match self.hold(&session, revision).await {
                        Held::SessionLost => self.retire_session(),
                        Held::KeyDeleted => {}
                        Held::TakenBy(lease) => {
                            self.status
                                .send_replace(RegistrationStatus::Displaced { lease });
                            continue;
                        }
                        Held::Unknown(error) => {
                            if let Some(e) = error {
                                self.report(e);
                            }
                            self.backoff.wait().await;
                            continue;
                        }
                    }
                    self.status
                        .send_replace(RegistrationStatus::Registering { last_error: None });
                }
                Claim::Taken { kv, revision } => {
                    self.status
                        .send_replace(RegistrationStatus::Displaced { lease: kv.lease });
                    if !self.wait_gone(&session, revision).await {
                        self.backoff.wait().await;
                    }
                }
            }
        }
    }

    /// The current session if it lives, else a new one.
    async fn live_session(&mut self) -> Result<Session> {
        if let Some(s) = &self.session {
            if s.try_lost().is_none() {
                return Ok(s.clone());
            }
            self.retire_session();
        }
        let session = Session::with_ttl(&self.client, self.options.ttl).await?;
        self.session = Some(session.clone());
        Ok(session)
    }

    /// Forgets the current session, remembering its lease as ours.
    fn retire_session(&mut self) {
        if let Some(s) = self.session.take() {
            self.own_leases.push(s.lease());
            if self.own_leases.len() > OWN_LEASES_KEPT {
                self.own_leases.remove(0);
            }
        }
    }

    /// Reports a failed attempt; returns the error if it ends the registration (a lasting
    /// failure before the key was ever claimed: the caller of `register` gets it).
    fn failed(&mut self, e: Error) -> Option<Error> {
        let lasting = match &e {
            Error::Client(c) => !transient(c) && *c != kv_client::Error::LeaseNotFound,
            Error::SessionLost(_) => false,
            _ => true,
        };
        if lasting && !self.claimed_once {
            return Some(e);
        }
        self.report(e);
        None
    }

    fn report(&self, e: Error) {
        self.status.send_replace(RegistrationStatus::Registering {
            last_error: Some(e),
        });
    }

    /// Writes the key on the session's lease, unless another registration holds it.
    async fn claim(&self, session: &Session) -> Result<Claim> {
        let lease = session.lease();
        let put = TxnOp::put(
            self.key.clone(),
            self.value.clone(),
            PutOptions::new().lease(lease),
        );
        let read = TxnOp::get(self.key.clone(), GetOptions::new());
        if !self.claimed_once {
            // A new registration takes the id over. Sending it again after an unknown
            // outcome can only repeat that takeover.
            let txn = Txn::new().and_then([put, read]);
            let resp = self.client.kv().txn(txn).await?;
            return Ok(ours(&resp));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([put.clone(), read.clone()])
            .or_else([read.clone()]);
        let resp = self.client.kv().txn(txn).await?;
        let (answer, kv) = if resp.succeeded {
            (1, read_answer(&resp, 1)?.kvs.first().cloned())
        } else {
            (0, read_answer(&resp, 0)?.kvs.first().cloned())
        };
        let Some(kv) = kv else {
            // Deleted between the compare and the read cannot happen in one transaction; a
            // missing answer means the shape was not what we sent.
            return Err(Error::Protocol(format!(
                "claim answer {answer} has no key-value"
            )));
        };
        if kv.lease == lease {
            return Ok(Claim::Ours {
                kv,
                revision: resp.revision,
            });
        }
        if !self.own_leases.contains(&kv.lease) {
            return Ok(Claim::Taken {
                kv,
                revision: resp.revision,
            });
        }
        // Still on a lease of ours that the client gave up on: move it, unless it changes
        // meanwhile.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.key.clone(),
                CompareOp::Equal,
                kv.mod_revision,
            )])
            .and_then([put, read]);
        let resp = self.client.kv().txn(txn).await?;
        if !resp.succeeded {
            return Ok(Claim::Again);
        }
        Ok(ours(&resp))
    }

    /// Watches the key (ours as of `revision`) until the session ends or someone else deletes
    /// or overwrites it.
    async fn hold(&self, session: &Session, revision: i64) -> Held {
        let lease = session.lease();
        let mut updates = self
            .client
            .watch()
            .watch(&self.key, WatchOptions::new().start_revision(revision + 1));
        loop {
            let update = tokio::select! {
                _ = session.lost() => return Held::SessionLost,
                update = updates.next() => update,
            };
            match update {
                Some(Ok(update)) => {
                    for event in update.events {
                        match event.kind {
                            EventKind::Delete => return Held::KeyDeleted,
                            EventKind::Put if event.kv.lease != lease => {
                                return Held::TakenBy(event.kv.lease);
                            }
                            EventKind::Put => {}
                        }
                    }
                }
                Some(Err(kv_client::Error::WatchCompacted { .. })) => return Held::Unknown(None),
                Some(Err(e)) => return Held::Unknown(Some(e.into())),
                None => return Held::Unknown(None),
            }
        }
    }

    /// Waits (from `revision`) until the key held by another registration is deleted; false if
    /// the wait failed (the caller pauses before reading again).
    async fn wait_gone(&mut self, session: &Session, revision: i64) -> bool {
        let mut deletes = self.client.watch().watch(
            &self.key,
            WatchOptions::new().start_revision(revision + 1).no_put(),
        );
        let update = tokio::select! {
            _ = session.lost() => {
                self.retire_session();
                return true;
            }
            update = deletes.next() => update,
        };
        match update {
            Some(Ok(_)) => true,
            Some(Err(kv_client::Error::WatchCompacted { .. })) => true,
            Some(Err(e)) => {
                self.report(e.into());
                false
            }
            None => false,
        }
    }
}

/// The claim a successful `[put, read]` transaction made.
fn ours(resp: &TxnResponse) -> Claim {
    match read_answer(resp, 1).map(|got| got.kvs.first()) {
        Ok(Some(kv)) => Claim::Ours {
            kv: kv.clone(),
            revision: resp.revision,
        },
        // Not the shape we sent: read again.
        _ => Claim::Again,
    }
}

/// The status of a registration whose key is `kv`.
fn registered_from(kv: &KeyValue) -> RegistrationStatus {
    RegistrationStatus::Registered(Registered {
        lease: kv.lease,
        create_revision: kv.create_revision,
        revision: kv.mod_revision,
    })
}

/// Sets `slot` to `new`; true if that changed it.
fn replace(slot: &mut RegistrationStatus, new: RegistrationStatus) -> bool {
    if *slot == new {
        return false;
    }
    *slot = new;
    true
}
