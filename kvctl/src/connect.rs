//! Connecting to the cluster from the global flags.

use kv_client::{Client, ClientOptions, TlsOptions};

use crate::cli::Global;
use crate::error::CtlError;

/// Client options from the flags: credentials, TLS and the dial timeout.
pub fn options(global: &Global) -> Result<ClientOptions, CtlError> {
    let mut options = ClientOptions {
        connect_timeout: global.dial_timeout,
        ..ClientOptions::default()
    };
    if let Some(user) = &global.user {
        let (name, password) = user
            .split_once(':')
            .ok_or_else(|| CtlError::Usage("--user must be name:password".into()))?;
        options = options.with_user(name, password);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| CtlError::File {
            path: path.display().to_string(),
            source,
        })
    };
    let tls_asked = global.cacert.is_some() || global.cert.is_some();
    if tls_asked {
        let mut tls = TlsOptions::default();
        if let Some(ca) = &global.cacert {
            tls.ca_pem = Some(read(ca)?);
        }
        match (&global.cert, &global.key) {
            (Some(cert), Some(key)) => tls.identity = Some((read(cert)?, read(key)?)),
            (None, None) => {}
            _ => return Err(CtlError::Usage("--cert and --key go together".into())),
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// A client of the cluster at `--endpoints`.
pub async fn client(global: &Global) -> Result<Client, CtlError> {
    Ok(Client::connect(
        global.endpoints.iter().map(String::as_str),
        options(global)?,
    )
    .await?)
}

/// A client of one member only (its client URL), for per-member questions.
pub async fn member(global: &Global, url: &str) -> Result<Client, CtlError> {
    Ok(Client::connect([url], options(global)?).await?)
}
