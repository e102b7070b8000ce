//! Leases: grant, revoke, time-to-live, list, and keep-alive handles on one shared stream.

use crate::client::Client;

/// The lease API of a [`Client`].
#[derive(Debug, Clone)]
pub struct Lease {
    #[allow(dead_code)]
    client: Client,
}

impl Lease {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }
}
