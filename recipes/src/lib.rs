//! recipes: coordination primitives over [`kv_client`], for kv-server and etcd alike.
//!
//! Everything a recipe holds is a key on a [`Session`]'s lease, so a process that dies frees
//! what it held once its lease expires. Rivals are ordered by their keys' create revisions and
//! each waits on one predecessor, so a release wakes one waiter. Every hold carries a
//! [`Fence`] (the key's create revision, increasing from holder to holder), a compare that
//! fails once the hold is gone ([`Guard::is_owner`], [`Leadership::is_leader`]) for the
//! holder's own transactions, and a `lost()` future that says when the hold ended without
//! being released.
//!
//! | recipe | keys |
//! | --- | --- |
//! | [`Mutex`] (etcd `concurrency.Mutex` layout) | `<name>/<lease hex>` |
//! | [`RwLock`] | `<name>/read/<lease hex>`, `<name>/write/<lease hex>` |
//! | [`Semaphore`] | `<name>/<lease hex>_<random hex>` |
//! | [`Election`] (etcd `concurrency.Election` layout) | `<name>/<lease hex>` = value |
//! | [`Barrier`] | `<name>` |
//! | [`DoubleBarrier`] | `<name>/waiters/<lease hex>_<random hex>`, `<name>/ready` |

mod barrier;
mod election;
mod error;
mod mutex;
mod owned;
mod predecessor;
mod rwlock;
mod semaphore;
mod session;

pub use barrier::{Barrier, DoubleBarrier, Entered};
pub use election::{Election, Leadership, Observation, Observer};
pub use error::{Error, Result};
pub use mutex::Mutex;
pub use owned::{Fence, Guard, Loss};
pub use rwlock::RwLock;
pub use semaphore::Semaphore;
pub use session::{DEFAULT_TTL, Session};
