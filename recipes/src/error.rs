//! What can go wrong in a recipe, on top of the client's own errors.

use kv_client::LeaseLost;

/// Why a recipe call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A call to the cluster failed (see [`kv_client::Error`] for what can be retried).
    #[error(transparent)]
    Client(#[from] kv_client::Error),
    /// The session's lease ended, so everything it held or waited for is gone.
    #[error("session lost: {0}")]
    SessionLost(LeaseLost),
    /// Our key was deleted by someone else while we waited or held it.
    #[error("our key {0} was deleted by another client")]
    KeyDeleted(String),
    /// `try_lock` found the lock held (or waited for) by another session.
    #[error("mutex: locked by another session")]
    Locked,
    /// No permit was free for `try_acquire`.
    #[error("semaphore: no permit free")]
    NoPermit,
    /// The caller is not (or no longer) the leader named by its leadership.
    #[error("election: not leader")]
    NotLeader,
    /// A double barrier already has its N participants.
    #[error("double barrier: already full")]
    BarrierFull,
    /// A double barrier's `hold` found the barrier key present.
    #[error("barrier: already held")]
    BarrierHeld,
    /// A queue with a capacity is full (`try_enqueue`).
    #[error("queue: full")]
    QueueFull,
    /// A queue claim ended (its session was lost, or it was acked or nacked already), so the
    /// item may be with another consumer now.
    #[error("queue: claim lost")]
    ClaimLost,
    /// An item or stored value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The server answered in a shape the recipe cannot use.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Results of recipe calls.
pub type Result<T> = std::result::Result<T, Error>;
