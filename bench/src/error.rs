//! Why a workload or a comparison could not run. A request that fails during the timed window
//! is not one of these: it is counted in the result's `errors` and the run goes on.

/// What stopped a workload, a run or a comparison.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request outside the timed window (connecting, preloading, cleaning up) failed.
    #[error("{during}: {source}")]
    Client {
        /// What the tool was doing.
        during: String,
        /// The client's error.
        source: kv_client::Error,
    },
    /// The server did not do something in time (watches never became live, ...).
    #[error("{0}")]
    Timeout(String),
    /// A server process could not be started, or its `/proc` entry read.
    #[error("{0}")]
    Process(String),
    /// The settings make no sense (zero connections, unknown workload, ...).
    #[error("{0}")]
    Settings(String),
    /// Writing the results failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Encoding the results failed.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Names what a failed client call was for: `kv.put(..).await.during("preload")?`.
pub(crate) trait During<T> {
    fn during(self, what: impl Into<String>) -> Result<T, Error>;
}

impl<T> During<T> for Result<T, kv_client::Error> {
    fn during(self, what: impl Into<String>) -> Result<T, Error> {
        self.map_err(|source| Error::Client {
            during: what.into(),
            source,
        })
    }
}
