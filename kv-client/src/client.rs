//! The connection: endpoints, failover, retries and deadlines, shared by every sub-client.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hyper_util::rt::TokioIo;
use kv_core::proto::etcdserverpb::{AuthenticateRequest, StatusRequest};
use tokio::net::TcpStream;
use tonic::Status;
use tonic::codegen::http::{self, HeaderValue, Uri};
use tonic::transport::{Channel, Endpoint};

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::coalesce::CoalescingStream;
use crate::error::{Effect, Error, Result};
use crate::kv::Kv;
use crate::lease::Lease;
use crate::maintenance::Maintenance;
use crate::watch::Watch;

/// How a [`Client`] connects and how long it tries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time to establish a connection to one endpoint.
    pub connect_timeout: Duration,
    /// Deadline of one call, retries included.
    pub request_timeout: Duration,
    /// First pause between retries; it doubles (with jitter) up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// A user and password for a cluster with authentication on: the client authenticates
    /// when it connects, sends the token with every call, and authenticates again when the
    /// server says the token expired or went stale. Against a cluster with authentication
    /// off the client carries on without a token, as etcd's client does.
    pub credentials: Option<Credentials>,
    /// A token obtained elsewhere, sent with every call as it is and never renewed (ignored
    /// when `credentials` are given).
    pub token: Option<String>,
    /// TLS settings for `https://` endpoints. When set, endpoints given as `host:port` are
    /// dialed with TLS too (as etcdctl does once given a CA or a certificate). An `https://`
    /// endpoint without these settings is verified against the system's trusted roots.
    pub tls: Option<TlsOptions>,
}

/// How to verify the members' certificates and which certificate to present to them.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM of the CA that signed the members' certificates; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of a client certificate and its key, for members that require one
    /// (`--client-cert-auth` or `--trusted-ca-file`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the members' certificates must carry, when it is not the endpoints' host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<certificate and key>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// Verify the members against the CA in `ca_pem`.
    pub fn with_ca(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: Some(ca_pem.into()),
            ..Self::default()
        }
    }

    /// These settings, presenting the certificate `cert_pem` with its key `key_pem`.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// These settings, expecting `domain` in the members' certificates.
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            credentials: None,
            token: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// These options with TLS settings (see [`ClientOptions::tls`]).
    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    /// These options with a user and password (see [`ClientOptions::credentials`]).
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }
}

/// A user's name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // The password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The token calls carry, shared by every connection of a client and replaced when renewed.
#[derive(Debug, Default)]
pub(crate) struct TokenSlot {
    current: std::sync::RwLock<Option<HeaderValue>>,
}

impl TokenSlot {
    pub(crate) fn get(&self) -> Option<HeaderValue> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, token: Option<HeaderValue>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = token;
    }
}

/// A connection to one member that adds the client's token to every call and stream.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    channel: Channel,
    token: Arc<TokenSlot>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // Authenticate goes without the old token: etcd refuses a proposal whose metadata
        // carries an expired token, Authenticate's own included.
        let authenticating = request.uri().path() == AUTHENTICATE_PATH;
        if let Some(token) = self.token.get().filter(|_| !authenticating) {
            request.headers_mut().entry(TOKEN_METADATA).or_insert(token);
        }
        tower::Service::call(&mut self.channel, request)
    }
}

/// The gRPC path of Authenticate.
const AUTHENTICATE_PATH: &str = "/etcdserverpb.Auth/Authenticate";

/// The metadata key etcd reads a token from.
const TOKEN_METADATA: &str = "token";

/// Token renewals one call may make: a second one only if a concurrent renewal raced it.
const TOKEN_RENEWALS_PER_CALL: usize = 2;

/// The generated service clients over a channel, each accepting answers of any size (tonic's
/// default limit is 4 MiB): a range over many keys is a normal answer, and etcd's own client
/// lifts the limit the same way. The one place every sub-client gets its stub from.
pub(crate) mod api {
    use kv_core::proto::etcdserverpb::{
        auth_client::AuthClient, cluster_client::ClusterClient, kv_client::KvClient,
        lease_client::LeaseClient, maintenance_client::MaintenanceClient,
        watch_client::WatchClient,
    };

    use super::Conn as Channel;

    const MAX_ANSWER_BYTES: usize = usize::MAX;

    pub(crate) fn auth(channel: Channel) -> AuthClient<Channel> {
        AuthClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    pub(crate) fn kv(channel: Channel) -> KvClient<Channel> {
        KvClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    pub(crate) fn lease(channel: Channel) -> LeaseClient<Channel> {
        LeaseClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    pub(crate) fn watch(channel: Channel) -> WatchClient<Channel> {
        WatchClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    pub(crate) fn cluster(channel: Channel) -> ClusterClient<Channel> {
        ClusterClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    pub(crate) fn maintenance(channel: Channel) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
    }
}

/// Whether a request may be sent again after a failure that left its effect unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Reads, and writes guarded so that a second application changes nothing.
    Safe,
    /// Writes: resent only when the failure proves the first attempt was not applied.
    Unsafe,
}

struct Inner {
    /// (URL, lazily connected channel) per endpoint.
    endpoints: Vec<(String, Channel)>,
    /// The endpoint calls go to until it fails.
    current: AtomicUsize,
    options: ClientOptions,
    /// The token every call carries, if any.
    token: Arc<TokenSlot>,
    /// Held while the token is renewed: calls refused together renew it once.
    renewing: tokio::sync::Mutex<()>,
    /// State shared by every clone of the client, one value per type: the watch stream and
    /// the keep-alive stream live here.
    shared: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

/// A client of an etcd-v3 cluster (kv-server or etcd). Cheap to clone; clones share the
/// connections.
///
/// Calls go to one endpoint at a time; when it is unreachable or has no leader, the call moves
/// to the next endpoint after a short backoff. Reads are retried until the call's deadline;
/// writes are retried only when the failure proves they were not applied, and otherwise fail
/// with [`Error::OutcomeUnknown`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    namespace: Arc<[u8]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field(
                "endpoints",
                &self
                    .inner
                    .endpoints
                    .iter()
                    .map(|e| &e.0)
                    .collect::<Vec<_>>(),
            )
            .field("namespace", &String::from_utf8_lossy(&self.namespace))
            .finish()
    }
}

/// The URL of an endpoint given as `host:port`: TLS when the options ask for it, as etcdctl
/// turns TLS on for such endpoints when given a CA or a certificate.
fn normalize(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// The gRPC endpoint for `url`, with TLS set up for an `https://` one.
fn endpoint_for(url: &str, options: &ClientOptions) -> Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|_| Error::InvalidEndpoint(url.to_string()))?
        .connect_timeout(options.connect_timeout);
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = options.tls.clone().unwrap_or_default();
    endpoint
        .tls_config(tls.client_config())
        .map_err(|e| Error::InvalidTls(e.to_string()))
}

/// Adapts a connector yielding tokio byte streams to the one tonic's channel takes.
#[derive(Clone)]
struct TokioConnector<C>(C);

impl<C, IO> tower::Service<Uri> for TokioConnector<C>
where
    C: tower::Service<Uri, Response = IO> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    type Response = TokioIo<IO>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TokioIo<IO>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(TokioIo::new).map_err(Into::into) })
    }
}

/// Any error a connector may give.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Client {
    /// Connects to a cluster given its members' client URLs (`http://host:port`,
    /// `https://host:port` or `host:port`), and checks that at least one answers within the
    /// connect timeout.
    pub async fn connect<I, S>(endpoints: I, options: ClientOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Vec::new();
        for e in endpoints {
            let url = normalize(e.as_ref(), options.tls.is_some());
            let channel = endpoint_for(&url, &options)?.connect_with_connector_lazy(Dialer);
            list.push((url, channel));
        }
        Self::start(list, options).await
    }

    /// [`Client::connect`], reaching every endpoint through `connector` instead of TCP: given
    /// an endpoint's URI, it returns a byte stream to that member (an in-process transport, a
    /// Unix socket, a proxy). TLS is still set up for `https://` endpoints.
    pub async fn connect_with_connector<I, S, C, IO>(
        endpoints: I,
        options: ClientOptions,
        connector: C,
    ) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
        C: tower::Service<Uri, Response = IO> + Clone + Send + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut list = Vec::new();
        for e in endpoints {
            let url = normalize(e.as_ref(), options.tls.is_some());
            let channel = endpoint_for(&url, &options)?
                .connect_with_connector_lazy(TokioConnector(connector.clone()));
            list.push((url, channel));
        }
        Self::start(list, options).await
    }

    /// A client over `list` (URL, channel), authenticated if it has credentials, once one
    /// endpoint answers.
    async fn start(list: Vec<(String, Channel)>, options: ClientOptions) -> Result<Client> {
        if list.is_empty() {
            return Err(Error::InvalidEndpoint("no endpoint given".into()));
        }
        let fixed = match (&options.credentials, &options.token) {
            (None, Some(token)) => Some(
                HeaderValue::from_str(token)
                    .map_err(|_| Error::InvalidToken("not a valid metadata value".into()))?,
            ),
            _ => None,
        };
        let client = Client {
            inner: Arc::new(Inner {
                endpoints: list,
                current: AtomicUsize::new(0),
                options,
                token: Arc::new(TokenSlot::default()),
                renewing: tokio::sync::Mutex::new(()),
                shared: Mutex::new(HashMap::new()),
            }),
            namespace: Arc::from(&b""[..]),
        };
        client.inner.token.set(fixed);
        if client.inner.options.credentials.is_some() {
            client.authenticate().await?;
        }
        let reached = client
            .call(Idempotence::Safe, |channel| async move {
                api::maintenance(channel)
                    .status(StatusRequest {})
                    .await
                    .map(|_| ())
            })
            .await;
        match reached {
            // A member that refuses a caller without credentials is reachable all the same;
            // what the caller may do is for each call to find out.
            Ok(()) | Err(Error::UserEmpty | Error::PermissionDenied) => Ok(client),
            Err(e) => Err(e),
        }
    }

    /// A view of this client whose keys all live under `prefix`: it is added to every key and
    /// range sent, and taken off every key received.
    pub fn with_namespace(&self, prefix: impl AsRef<[u8]>) -> Client {
        let mut namespace = self.namespace.to_vec();
        namespace.extend_from_slice(prefix.as_ref());
        Client {
            inner: self.inner.clone(),
            namespace: Arc::from(namespace),
        }
    }

    /// The key-value API.
    pub fn kv(&self) -> Kv {
        Kv::new(self.clone())
    }

    /// The membership API.
    pub fn cluster(&self) -> Cluster {
        Cluster::new(self.clone())
    }

    /// The maintenance API.
    pub fn maintenance(&self) -> Maintenance {
        Maintenance::new(self.clone())
    }

    /// The lease API.
    pub fn lease(&self) -> Lease {
        Lease::new(self.clone())
    }

    /// The watch API.
    pub fn watch(&self) -> Watch {
        Watch::new(self.clone())
    }

    /// The authentication API: users, roles, permissions and the switch.
    pub fn auth(&self) -> Auth {
        Auth::new(self.clone())
    }

    /// The client-wide value of type `T` (created on first use), shared by every clone and
    /// namespace view of this client.
    pub(crate) fn shared<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut map = self.inner.shared.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()));
        entry
            .clone()
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("the map is keyed by type"))
    }

    /// The endpoint to open a stream on: its index and connection.
    pub(crate) fn channel(&self) -> (usize, Conn) {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.endpoints.len();
        (i, self.conn(i))
    }

    fn conn(&self, index: usize) -> Conn {
        Conn {
            channel: self.inner.endpoints[index].1.clone(),
            token: self.inner.token.clone(),
        }
    }

    /// The token calls carry now (to tell, after a refusal, whether it was renewed since).
    pub(crate) fn token(&self) -> Option<HeaderValue> {
        self.inner.token.get()
    }

    /// Authenticates with the client's credentials and keeps the token for every later call;
    /// against a cluster with authentication off, calls go on without one.
    async fn authenticate(&self) -> Result<()> {
        let Some(c) = &self.inner.options.credentials else {
            return Ok(());
        };
        let request = AuthenticateRequest {
            name: c.user.clone(),
            password: c.password.clone(),
        };
        let token = self
            .call_once_authenticated(Idempotence::Safe, |channel| {
                let request = request.clone();
                async move {
                    match api::auth(channel).authenticate(request).await {
                        Ok(answer) => Ok(Some(answer.into_inner().token)),
                        Err(s) if s.message() == AUTH_NOT_ENABLED => Ok(None),
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
        let token = token
            .map(|t| HeaderValue::from_str(&t))
            .transpose()
            .map_err(|_| Error::InvalidToken("the server's token is not valid metadata".into()))?;
        self.inner.token.set(token);
        Ok(())
    }

    /// After a call or stream was refused for its token (`used`): renews the token, unless
    /// another call already did. Returns whether calls should be tried again.
    pub(crate) async fn renew_token(&self, used: Option<&HeaderValue>) -> Result<bool> {
        if self.inner.options.credentials.is_none() {
            return Ok(false);
        }
        // Calls refused at the same moment (a token that idled out under a busy pool) wait
        // for one renewal instead of each authenticating: a hash costs the server tens of
        // milliseconds of CPU.
        let _renewing = self.inner.renewing.lock().await;
        if self.inner.token.get().as_ref() != used {
            return Ok(true);
        }
        self.authenticate().await?;
        Ok(true)
    }

    /// Whether `error` says the call's credentials, not the call, were at fault: a token
    /// that expired or predates an auth change, or none where one is now needed.
    pub(crate) fn wants_new_token(&self, error: &Error) -> bool {
        self.inner.options.credentials.is_some()
            && matches!(
                error,
                Error::InvalidAuthToken | Error::AuthOldRevision | Error::UserEmpty
            )
    }

    /// Endpoint `index` failed: later calls and streams go to the next one.
    pub(crate) fn endpoint_failed(&self, index: usize) {
        let n = self.inner.endpoints.len();
        let _ = self.inner.current.compare_exchange(
            index,
            (index + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A backoff schedule with the client's bounds (for reconnect loops).
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        let options = &self.inner.options;
        ExponentialBuilder::default()
            .with_min_delay(options.min_backoff)
            .with_max_delay(options.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The URL calls currently go to.
    pub fn current_endpoint(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.endpoints.len();
        &self.inner.endpoints[i].0
    }

    pub(crate) fn namespace(&self) -> &[u8] {
        &self.namespace
    }

    /// Runs `attempt` against the current endpoint until it succeeds, fails for good, or the
    /// deadline passes; moves to the next endpoint after each retryable failure.
    pub(crate) async fn call<T, F, Fut>(&self, idempotence: Idempotence, attempt: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let mut renewals = 0;
        loop {
            let used = self.inner.token.get();
            match self.call_once_authenticated(idempotence, &attempt).await {
                // Refused for its credentials, so not applied: safe to send again, write or
                // not, once the token is renewed.
                Err(e) if renewals < TOKEN_RENEWALS_PER_CALL && self.wants_new_token(&e) => {
                    renewals += 1;
                    if !self.renew_token(used.as_ref()).await? {
                        return Err(e);
                    }
                }
                done => return done,
            }
        }
    }

    /// [`Client::call`] with the token as it is.
    async fn call_once_authenticated<T, F, Fut>(
        &self,
        idempotence: Idempotence,
        attempt: F,
    ) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let options = &self.inner.options;
        let deadline = tokio::time::Instant::now() + options.request_timeout;
        let mut delays = self.backoff();
        loop {
            let n = self.inner.endpoints.len();
            let index = self.inner.current.load(Ordering::Relaxed) % n;
            let channel = self.conn(index);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let status = match tokio::time::timeout(remaining, attempt(channel)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(status)) => status,
                Err(_) => {
                    let what = format!("no answer within {:?}", options.request_timeout);
                    return Err(match idempotence {
                        Idempotence::Safe => Error::DeadlineExceeded(what),
                        Idempotence::Unsafe => Error::OutcomeUnknown(what),
                    });
                }
            };
            let (error, effect) = Error::from_status(&status);
            let retry = match effect {
                Effect::None => true,
                Effect::Unknown => idempotence == Idempotence::Safe,
                Effect::Refused => false,
            };
            if !retry {
                // A write whose effect is unknown says so, whatever the status's code: a
                // caller that took a deadline for "not applied" would leave its write's
                // effects (a claim, a lock key) held and unknown to it.
                return Err(match error {
                    Error::DeadlineExceeded(m) if effect == Effect::Unknown => {
                        Error::OutcomeUnknown(m)
                    }
                    e => e,
                });
            }
            // Next time, try another member.
            self.endpoint_failed(index);
            let pause = delays.next().unwrap_or(options.max_backoff);
            let now = tokio::time::Instant::now();
            if now + pause >= deadline {
                return Err(match error {
                    Error::OutcomeUnknown(m) if idempotence == Idempotence::Safe => {
                        Error::DeadlineExceeded(m)
                    }
                    e => e,
                });
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// etcd's refusal of Authenticate while authentication is off.
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

/// Dials a member: TCP without Nagle's delay (small requests must not wait ~40 ms for an
/// ACK), writes coalesced per burst of requests ([`crate::coalesce`]).
#[derive(Debug, Clone, Copy)]
struct Dialer;

impl tower::Service<Uri> for Dialer {
    type Response = TokioIo<CoalescingStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let invalid = || {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("endpoint {uri} names no host"),
                )
            };
            // An IPv6 literal comes bracketed (`[::1]`); the resolver wants it bare.
            let host = uri.host().ok_or_else(invalid)?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = match (uri.port_u16(), uri.scheme_str()) {
                (Some(port), _) => port,
                (None, Some("https")) => 443,
                (None, _) => 80,
            };
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            // TLS goes on top of this stream, and its handshake must not be held back.
            if uri.scheme_str() == Some("https") {
                return Ok(TokioIo::new(CoalescingStream::direct(stream)));
            }
            Ok(TokioIo::new(CoalescingStream::new(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_dialer_reaches_the_member_without_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepting = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let uri: Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let io = tower::Service::call(&mut Dialer, uri).await.unwrap();
        let accepted = accepting.await.unwrap().unwrap();
        assert_eq!(
            accepted.peer_addr().unwrap(),
            io.inner().inner().local_addr().unwrap()
        );
        assert!(io.inner().inner().nodelay().unwrap());
    }

    #[tokio::test]
    async fn the_dialer_refuses_an_endpoint_without_a_host() {
        let err = tower::Service::call(&mut Dialer, Uri::from_static("/only/a/path"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    /// A client whose calls are answered by the test's closure (its endpoint never dialled).
    fn offline_client(options: ClientOptions) -> Client {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        Client {
            inner: Arc::new(Inner {
                endpoints: vec![("http://127.0.0.1:1".into(), channel)],
                current: AtomicUsize::new(0),
                options,
                token: Arc::new(TokenSlot::default()),
                renewing: tokio::sync::Mutex::new(()),
                shared: Mutex::new(HashMap::new()),
            }),
            namespace: Arc::from(&b""[..]),
        }
    }

    #[tokio::test]
    async fn a_write_answered_deadline_exceeded_has_an_unknown_outcome() {
        let options = ClientOptions {
            request_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        };
        let client = offline_client(options);
        let answer =
            || async { Err::<(), _>(Status::deadline_exceeded("context deadline exceeded")) };
        let write = client.call(Idempotence::Unsafe, |_| answer()).await;
        assert!(
            matches!(write, Err(Error::OutcomeUnknown(_))),
            "a write: {write:?}"
        );
        // A read is sent again until the call's deadline, then says the deadline passed.
        let read = client.call(Idempotence::Safe, |_| answer()).await;
        assert!(
            matches!(read, Err(Error::DeadlineExceeded(_))),
            "a read: {read:?}"
        );
    }
}
