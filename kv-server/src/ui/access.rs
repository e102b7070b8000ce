//! Who may use the dashboard's data. With auth off, anyone who reaches the client port, as
//! with every other request. With auth on, only a user with the root role, by HTTP Basic
//! credentials (the browser asks for them): the dashboard reads the whole keyspace, queue
//! payloads included, which only root may read.
//!
//! A password check is an Argon2 hash (tens of milliseconds of CPU) and the page refreshes
//! every second, so credentials once verified are remembered, by their SHA-256, for a minute
//! and while the auth state is unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use base64::Engine;
use kv_core::auth::Caller;
use sha2::Digest;
use tonic::codegen::http::{HeaderMap, Response, StatusCode, header};

use crate::auth::verify_password;
use crate::node::Node;

/// How long verified credentials are trusted without hashing the password again.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(60);

/// How long refused credentials are refused without hashing again (a page left open with a
/// wrong password asks every second).
pub const REFUSED_FOR: Duration = Duration::from_secs(5);

/// Credentials remembered at most, either way (beyond this the oldest are forgotten).
const REMEMBERED_MAX: usize = 1024;

/// The dashboard's gate.
pub struct Access {
    node: Arc<Node>,
    /// SHA-256 of `user NUL password` → (auth revision, when checked, whether it passed).
    checked: Mutex<HashMap<[u8; 32], (u64, Instant, bool)>>,
    /// One password hash at a time.
    hashing: tokio::sync::Semaphore,
    /// What an unknown user's password is checked against, so refusing one takes as long.
    decoy: std::sync::OnceLock<Option<String>>,
}

impl Access {
    /// The gate of `node`'s dashboard.
    pub fn new(node: Arc<Node>) -> Self {
        Access {
            node,
            checked: Mutex::new(HashMap::new()),
            hashing: tokio::sync::Semaphore::new(1),
            decoy: std::sync::OnceLock::new(),
        }
    }

    /// Lets the request through, or answers why not (401 asking for credentials, 403).
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), Response<Body>> {
        let (enabled, revision) = self.node.store.auth(|a| (a.enabled(), a.revision()));
        if !enabled {
            return Ok(());
        }
        let Some((user, password)) = basic_credentials(headers) else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "auth is on: sign in as a root user",
            ));
        };
        let digest: [u8; 32] = sha2::Sha256::digest(format!("{user}\0{password}")).into();
        let passed = match self.remembered(&digest, revision) {
            Some(passed) => passed,
            None => {
                let passed = self.password_matches(&user, password).await;
                self.remember(digest, revision, passed);
                passed
            }
        };
        if !passed {
            return Err(refuse(StatusCode::UNAUTHORIZED, "authentication failed"));
        }
        let caller = Caller {
            user: Some(user),
            revision,
        };
        if self.node.store.auth(|a| a.check_admin(&caller)).is_err() {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "the dashboard needs the root role",
            ));
        }
        Ok(())
    }

    /// A remembered verdict on `digest` at auth `revision`, forgetting stale ones.
    fn remembered(&self, digest: &[u8; 32], revision: u64) -> Option<bool> {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        checked.retain(|_, (rev, at, passed)| {
            let keep = if *passed { REMEMBERED_FOR } else { REFUSED_FOR };
            *rev == revision && at.elapsed() < keep
        });
        checked.get(digest).map(|(_, _, passed)| *passed)
    }

    fn remember(&self, digest: [u8; 32], revision: u64, passed: bool) {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.len() >= REMEMBERED_MAX
            && let Some(oldest) = checked.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k)
        {
            checked.remove(&oldest);
        }
        checked.insert(digest, (revision, Instant::now(), passed));
    }

    /// Whether `password` is `user`'s, by one Argon2 check (against a decoy hash for an
    /// unknown user or one without a password).
    async fn password_matches(&self, user: &str, password: String) -> bool {
        let Ok(_turn) = self.hashing.acquire().await else {
            return false;
        };
        let hash = self
            .node
            .store
            .auth(|a| a.user(user).and_then(|u| u.password.clone()));
        let known = hash.is_some();
        let hash = match (hash, self.decoy.get()) {
            (Some(hash), _) => hash,
            (None, Some(Some(decoy))) => decoy.clone(),
            (None, _) => {
                // Made once, on the blocking pool like every hash.
                let made = tokio::task::spawn_blocking(|| crate::auth::hash_password("decoy").ok())
                    .await
                    .ok()
                    .flatten();
                let _ = self.decoy.set(made.clone());
                match made {
                    Some(decoy) => decoy,
                    None => return false,
                }
            }
        };
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        known && matches
    }
}

/// `(user, password)` from an `Authorization: Basic ...` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    let mut resp = crate::http::respond(status, "text/plain; charset=utf-8", format!("{why}\n"));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"kv-server dashboard\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read() {
        let mut headers = HeaderMap::new();
        // "root:pa:ss" — a colon in the password stays in the password.
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Basic cm9vdDpwYTpzcw=="),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("root".into(), "pa:ss".into()))
        );
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer x"),
        );
        assert_eq!(basic_credentials(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Basic !!"),
        );
        assert_eq!(basic_credentials(&headers), None);
    }
}
