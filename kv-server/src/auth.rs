//! The server's side of authentication: password hashes, the tokens Authenticate hands out,
//! and turning a request's credentials into the [`Caller`] the permission checks take.
//!
//! Tokens are etcd's "simple" tokens, `<16 random letters>.<log index>`: the proposer picks
//! the letters, every member learns the token when it applies the Authenticate entry, so any
//! member accepts it. They live in memory only, expire after `--auth-token-ttl` seconds
//! without use (each use restarts the clock), and die with a password change, the user's
//! deletion or auth being turned off. Clients re-authenticate on `invalid auth token`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand_core::{OsRng, RngCore};
use tonic::metadata::MetadataMap;

/// etcd's default `--auth-token-ttl`, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;

/// The metadata key Go, Python and Java clients send their token under.
const TOKEN_KEY: &str = "token";
/// The key grpc-gateway forwards an HTTP `Authorization` header under.
const AUTHORIZATION_KEY: &str = "authorization";

/// Letters a token's random part is drawn from (etcd's alphabet).
const TOKEN_LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Length of a token's random part: 52^16 ≈ 2^91 guesses.
const TOKEN_RANDOM_LEN: usize = 16;

/// Why a password could not be hashed (only a broken OS random source or parameters).
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct HashError(String);

/// The hasher: Argon2id with the OWASP-recommended minimum (19 MiB, 2 passes, 1 lane).
/// etcd uses bcrypt at cost 10; Argon2id is memory-hard, so a stolen data dir is far costlier
/// to brute-force on GPUs, for a similar ~20-50 ms per Authenticate.
fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default())
}

/// A salted, slow hash of `password` as a PHC string (`$argon2id$v=19$m=...`). CPU-heavy:
/// call it off the async workers.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut salt)
        .map_err(|e| HashError(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError(e.to_string()))?;
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Whether `password` matches a hash from [`hash_password`] (with the parameters stored in
/// the hash, so older hashes stay valid if the defaults change). CPU-heavy, like hashing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A token's random part, from the OS's random source.
pub fn token_random_part() -> Result<String, HashError> {
    let mut out = String::with_capacity(TOKEN_RANDOM_LEN);
    let mut bytes = [0u8; 32];
    while out.len() < TOKEN_RANDOM_LEN {
        OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| HashError(e.to_string()))?;
        // Rejection sampling keeps every letter equally likely: 208 = 4 * 52.
        for b in bytes {
            if b < 208 && out.len() < TOKEN_RANDOM_LEN {
                out.push(TOKEN_LETTERS[usize::from(b) % TOKEN_LETTERS.len()] as char);
            }
        }
    }
    Ok(out)
}

/// What a member needs to tell who sends a request: the tokens issued, the token of its own
/// client, and whether certificates name users.
#[derive(Debug)]
pub struct Callers {
    /// The tokens this member accepts.
    pub tokens: Arc<Tokens>,
    /// The token of this member's own client (the Lock and Election services' loopback),
    /// which acts with the root role: those services check their callers themselves.
    loopback_token: String,
    /// `--client-cert-auth`: a client certificate's common name is the user.
    pub client_cert_auth: bool,
}

impl Callers {
    /// Callers known by `tokens` (and, with `client_cert_auth`, by certificate), with a fresh
    /// loopback token: 32 random letters and no index, so it can be neither guessed nor
    /// mistaken for an issued token.
    pub fn new(tokens: Arc<Tokens>, client_cert_auth: bool) -> Result<Self, HashError> {
        let loopback_token = format!("{}{}", token_random_part()?, token_random_part()?);
        Ok(Self {
            tokens,
            loopback_token,
            client_cert_auth,
        })
    }

    /// The token of this member's own client.
    pub fn loopback_token(&self) -> &str {
        &self.loopback_token
    }
}

/// What a request says about who sends it: the token in its metadata, and the certificate
/// chain its TLS client presented (verified by the handshake).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The token, or `Err` for metadata that is not text.
    token: Result<Option<String>, BadToken>,
    /// The client's certificate chain, on a TLS connection with client certificates.
    certs: Option<std::sync::Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    /// The request came over the member's in-memory listener (its own client), which has no
    /// peer address: only such a request may use the loopback token.
    in_memory: bool,
}

impl Credentials {
    /// The credentials of `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Self {
            token: token_of(request.metadata()).map(|t| t.map(str::to_string)),
            certs: request.peer_certs(),
            in_memory: request.remote_addr().is_none(),
        }
    }

    /// Whether the request carries `loopback_token` and came from the member itself.
    pub fn is_loopback(&self, loopback_token: &str) -> bool {
        self.in_memory
            && matches!(&self.token, Ok(Some(t)) if same_secret(t.as_bytes(), loopback_token.as_bytes()))
    }

    /// The token, if any; `Err` for one that is not text.
    pub fn token(&self) -> Result<Option<&str>, BadToken> {
        match &self.token {
            Ok(token) => Ok(token.as_deref()),
            Err(e) => Err(*e),
        }
    }

    /// The common name of the client's certificate, if it presented one.
    pub fn certificate_name(&self) -> Option<String> {
        crate::tls::common_name(self.certs.as_deref()?)
    }
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A token in metadata that is not text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the auth token is not text")]
pub struct BadToken;

/// The token a request carries, if any: the `token` metadata, else `authorization` (with or
/// without a `Bearer ` prefix, as etcd 3.5.32 accepts it). `Err` for a value that is not
/// text.
pub fn token_of(metadata: &MetadataMap) -> Result<Option<&str>, BadToken> {
    let Some(value) = metadata
        .get(TOKEN_KEY)
        .or_else(|| metadata.get(AUTHORIZATION_KEY))
    else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| BadToken)?;
    Ok(Some(text.strip_prefix("Bearer ").unwrap_or(text)))
}

/// The log index a simple token was issued at: the part after its last dot.
pub fn token_index(token: &str) -> Option<u64> {
    let (random, index) = token.rsplit_once('.')?;
    if random.is_empty() {
        return None;
    }
    index.parse().ok()
}

#[derive(Debug)]
struct Issued {
    user: String,
    last_used: Instant,
}

/// The tokens this member knows, with their users and last use.
#[derive(Debug)]
pub struct Tokens {
    ttl: Duration,
    issued: Mutex<HashMap<String, Issued>>,
}

impl Tokens {
    /// No tokens yet; each will live `ttl` past its last use.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            issued: Mutex::new(HashMap::new()),
        }
    }

    fn issued(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a token issued to `user` (at apply, on every member).
    pub fn assign(&self, token: String, user: String) {
        self.assign_at(token, user, Instant::now());
    }

    fn assign_at(&self, token: String, user: String, last_used: Instant) {
        self.issued().insert(token, Issued { user, last_used });
    }

    /// The user of a live token, restarting its clock; an expired token is forgotten.
    pub fn user_of(&self, token: &str) -> Option<String> {
        self.user_of_at(token, Instant::now())
    }

    fn user_of_at(&self, token: &str, now: Instant) -> Option<String> {
        let mut issued = self.issued();
        let entry = issued.get_mut(token)?;
        if now.duration_since(entry.last_used) >= self.ttl {
            issued.remove(token);
            return None;
        }
        entry.last_used = now;
        Some(entry.user.clone())
    }

    /// Forgets every token of `user` (its password changed, or it was deleted).
    pub fn invalidate_user(&self, user: &str) {
        self.issued().retain(|_, t| t.user != user);
    }

    /// Forgets one token.
    pub fn forget(&self, token: &str) {
        self.issued().remove(token);
    }

    /// Forgets every token (auth was turned off).
    pub fn clear(&self) {
        self.issued().clear();
    }

    /// Forgets expired tokens, so that tokens nobody uses again do not pile up.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let ttl = self.ttl;
        self.issued()
            .retain(|_, t| now.duration_since(t.last_used) < ttl);
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.issued().len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sweeps expired tokens until `stop`.
pub async fn sweep_tokens(tokens: Arc<Tokens>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => tokens.sweep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only_and_is_salted() {
        let a = hash_password("s3cret").unwrap();
        let b = hash_password("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(!a.contains("s3cret"));
        assert!(verify_password("s3cret", &a));
        assert!(verify_password("s3cret", &b));
        assert!(!verify_password("s3cret!", &a));
        assert!(!verify_password("", &a));
        assert!(!verify_password("s3cret", "not a hash"));
        let empty = hash_password("").unwrap();
        assert!(verify_password("", &empty));
    }

    #[test]
    fn tokens_look_like_etcds_and_name_their_index() {
        let random = token_random_part().unwrap();
        assert_eq!(random.len(), TOKEN_RANDOM_LEN);
        assert!(random.bytes().all(|b| b.is_ascii_alphabetic()));
        assert_ne!(random, token_random_part().unwrap());
        assert_eq!(token_index(&format!("{random}.136")), Some(136));
        assert_eq!(token_index("nodot"), None);
        assert_eq!(token_index(".5"), None);
        assert_eq!(token_index("abc.x"), None);
    }

    #[test]
    fn a_token_lives_while_used_and_dies_with_its_user() {
        let ttl = Duration::from_secs(300);
        let tokens = Tokens::new(ttl);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        tokens.assign_at("a.1".into(), "alice".into(), start);
        tokens.assign_at("b.2".into(), "bob".into(), start);
        // Used every 100 s, alice's token outlives its first 300 s.
        for step in 1..=4 {
            let user = tokens.user_of_at("a.1", at(100 * step));
            assert_eq!(user.as_deref(), Some("alice"));
        }
        // bob's token was idle for 400 s.
        assert_eq!(tokens.user_of_at("b.2", at(400)), None);
        assert_eq!(tokens.user_of_at("a.1", at(699)).as_deref(), Some("alice"));
        assert_eq!(tokens.user_of_at("a.1", at(999)), None);
        tokens.assign("a.3".into(), "alice".into());
        tokens.assign("a.4".into(), "alice".into());
        tokens.assign("b.5".into(), "bob".into());
        tokens.invalidate_user("alice");
        assert_eq!(tokens.user_of("a.3"), None);
        assert_eq!(tokens.user_of("a.4"), None);
        assert_eq!(tokens.user_of("b.5").as_deref(), Some("bob"));
        tokens.clear();
        assert!(tokens.is_empty());
        tokens.assign_at("c.6".into(), "carol".into(), start);
        tokens.assign_at("d.7".into(), "dave".into(), at(200));
        tokens.sweep_at(at(301));
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens.user_of_at("d.7", at(301)).as_deref(), Some("dave"));
    }

    #[test]
    fn the_token_comes_from_token_or_authorization_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(token_of(&md), Ok(None));
        md.insert("authorization", "Bearer abc.7".parse().unwrap());
        assert_eq!(token_of(&md), Ok(Some("abc.7")));
        md.insert("token", "xyz.9".parse().unwrap());
        assert_eq!(token_of(&md), Ok(Some("xyz.9")));
    }

    /// The loopback token acts as root: it counts only on the member's in-memory listener,
    /// never from a network peer that learned it.
    #[test]
    fn the_loopback_token_counts_only_from_the_member_itself() {
        let with_token = |token: &str| {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert("token", token.parse().unwrap());
            request
        };
        let secret = "SecretLoopbackTokenOfThirtyTwoLe";
        assert!(Credentials::of(&with_token(secret)).is_loopback(secret));
        assert!(
            !Credentials::of(&with_token("SecretLoopbackTokenOfThirtyTwoLf")).is_loopback(secret)
        );
        assert!(!Credentials::of(&with_token("short")).is_loopback(secret));
        let mut remote = with_token(secret);
        remote
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: Some("127.0.0.1:2379".parse().unwrap()),
                remote_addr: Some("127.0.0.1:40000".parse().unwrap()),
            });
        assert!(!Credentials::of(&remote).is_loopback(secret));
    }
}
