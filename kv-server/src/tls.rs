//! TLS on client and peer URLs, set up from etcd's flags with etcd's rules: an `https://`
//! URL needs a certificate and key; a trusted CA makes the listener require client
//! certificates signed by it; with `--client-cert-auth` the common name of a verified client
//! certificate is the user of a request that carries no token.

use std::path::{Path, PathBuf};

use tonic::transport::CertificateDer;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{FlagError, Flags};

/// The TLS settings of a member.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// For `https://` client listeners.
    pub client: Option<ServerTlsConfig>,
    /// Whether a verified client certificate's common name is the user (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// For `https://` peer listeners.
    pub peer_server: Option<ServerTlsConfig>,
    /// For dialing `https://` peer URLs.
    pub peer_client: ClientTlsConfig,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, FlagError> {
    std::fs::read(path).map_err(|e| FlagError {
        flag,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

fn missing(flag: &'static str, reason: String) -> FlagError {
    FlagError { flag, reason }
}

/// The server side of one kind of listener (client or peer), when one of its URLs is
/// `https://`.
struct ServerFiles<'a> {
    cert: (&'static str, &'a Option<PathBuf>),
    key: (&'static str, &'a Option<PathBuf>),
    ca: (&'static str, &'a Option<PathBuf>),
    cert_auth: (&'static str, bool),
    /// The first `https://` URL, if any.
    https_url: Option<String>,
}

impl ServerFiles<'_> {
    fn config(&self) -> Result<Option<ServerTlsConfig>, FlagError> {
        if self.cert_auth.1 && self.ca.1.is_none() {
            return Err(missing(
                self.cert_auth.0,
                format!("needs --{} to verify certificates with", self.ca.0),
            ));
        }
        let Some(url) = &self.https_url else {
            return Ok(None);
        };
        let (Some(cert), Some(key)) = (self.cert.1, self.key.1) else {
            // etcd's words.
            return Err(missing(
                self.cert.0,
                format!(
                    "TLS key/cert (--{}, --{}) must be provided for {url} with HTTPS scheme",
                    self.cert.0, self.key.0
                ),
            ));
        };
        let identity = Identity::from_pem(read(self.cert.0, cert)?, read(self.key.0, key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = self.ca.1 {
            // A trusted CA means client certificates are required (etcd's
            // `RequireAndVerifyClientCert`), with or without --client-cert-auth.
            config = config.client_ca_root(Certificate::from_pem(read(self.ca.0, ca)?));
        }
        Ok(Some(config))
    }
}

impl TlsSettings {
    /// The settings the flags ask for; certificates and keys are read now, so a missing file
    /// fails the start.
    pub fn from_flags(flags: &Flags) -> Result<Self, FlagError> {
        let first_https = |urls: Vec<crate::config::ListenUrl>, raw: &str| {
            urls.iter().any(|u| u.tls).then(|| {
                crate::config::url_list(raw)
                    .into_iter()
                    .find(|u| u.starts_with("https://"))
                    .unwrap_or_default()
            })
        };
        let client = ServerFiles {
            cert: ("cert-file", &flags.cert_file),
            key: ("key-file", &flags.key_file),
            ca: ("trusted-ca-file", &flags.trusted_ca_file),
            cert_auth: ("client-cert-auth", flags.client_cert_auth),
            https_url: first_https(flags.client_addrs()?, &flags.listen_client_urls)
                .map(|u| format!("client url {u}")),
        };
        let peer = ServerFiles {
            cert: ("peer-cert-file", &flags.peer_cert_file),
            key: ("peer-key-file", &flags.peer_key_file),
            ca: ("peer-trusted-ca-file", &flags.peer_trusted_ca_file),
            cert_auth: ("peer-client-cert-auth", flags.peer_client_cert_auth),
            https_url: first_https(flags.peer_addrs()?, &flags.listen_peer_urls)
                .map(|u| format!("peer url {u}")),
        };
        // Dialing other members: their certificates are checked against the peer CA (or the
        // system's roots), and this member shows its peer certificate if it has one.
        let mut peer_client = ClientTlsConfig::new();
        peer_client = match &flags.peer_trusted_ca_file {
            Some(ca) => {
                peer_client.ca_certificate(Certificate::from_pem(read("peer-trusted-ca-file", ca)?))
            }
            None => peer_client.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&flags.peer_cert_file, &flags.peer_key_file) {
            peer_client = peer_client.identity(Identity::from_pem(
                read("peer-cert-file", cert)?,
                read("peer-key-file", key)?,
            ));
        }
        Ok(TlsSettings {
            client: client.config()?,
            client_cert_auth: flags.client_cert_auth,
            peer_server: peer.config()?,
            peer_client,
        })
    }
}

/// The common name of a verified client's certificate (the first of its chain), if it has
/// one.
pub fn common_name(chain: &[CertificateDer<'static>]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["kv-server"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    fn refused(args: &[&str]) -> String {
        match TlsSettings::from_flags(&flags(args)) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn https_urls_need_their_certificate_and_key_as_etcd_says() {
        let client = ["--listen-client-urls", "https://127.0.0.1:2379"];
        assert!(
            refused(&client).contains(
                "TLS key/cert (--cert-file, --key-file) must be provided for client url \
                 https://127.0.0.1:2379 with HTTPS scheme"
            ),
            "{}",
            refused(&client)
        );
        let peer = ["--listen-peer-urls", "https://127.0.0.1:2380"];
        assert!(refused(&peer).contains("--peer-cert-file, --peer-key-file"));
        let missing = [
            "--listen-client-urls",
            "https://127.0.0.1:2379",
            "--cert-file",
            "/nonexistent/server.pem",
            "--key-file",
            "/nonexistent/server-key.pem",
        ];
        assert!(refused(&missing).contains("cannot read /nonexistent/server.pem"));
        assert!(refused(&["--client-cert-auth"]).contains("--trusted-ca-file"));
        assert!(refused(&["--peer-client-cert-auth"]).contains("--peer-trusted-ca-file"));
    }

    #[test]
    fn plain_urls_need_nothing() {
        let settings = TlsSettings::from_flags(&flags(&[])).unwrap();
        assert!(settings.client.is_none() && settings.peer_server.is_none());
        assert!(!settings.client_cert_auth);
    }
}
