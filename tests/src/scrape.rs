//! Plain HTTP against a member's client port (`/health`, `/version`, `/metrics`, `/ui`), as
//! curl or Prometheus would ask, and reading values out of a metrics text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// An HTTP answer: status code and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// `GET path` over HTTP/1.1 to `endpoint` (`host:port`), bounded by `timeout`.
pub fn http_get(endpoint: &str, path: &str, timeout: Duration) -> Result<HttpAnswer, String> {
    http_request(endpoint, "GET", path, timeout)
}

/// `method path` over HTTP/1.1 with no body.
pub fn http_request(
    endpoint: &str,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<HttpAnswer, String> {
    http_request_with(endpoint, method, path, &[], timeout)
}

/// `method path` over HTTP/1.1 with extra `headers` (name, value) and no body.
pub fn http_request_with(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpAnswer, String> {
    let addr = endpoint.parse().map_err(|e| format!("{endpoint}: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{endpoint}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n{extra}\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{endpoint}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(HttpAnswer { status, body })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the series `series` (a name, with its labels as exposed, e.g.
/// `etcd_server_id{server_id="8e9e05c52164694d"}`) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Every series of the family `name` (`name` itself or `name{...}`) with its value.
pub fn series<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name).then_some((series, value.parse().ok()?))
        })
        .collect()
}

/// The type a metrics text declares for `name` (`# TYPE name counter`).
pub fn metric_type<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("# TYPE ")?;
        let (n, kind) = rest.split_once(' ')?;
        (n == name).then_some(kind.trim())
    })
}
