//! A loopback TCP proxy that can hold back what clients send, for tests that need a
//! request to reach the server late (a slow or congested network) at a known moment, or
//! never (the connection breaks while the request is on its way).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Forwards connections from its own loopback port to `upstream`, delaying each chunk the
/// client sends by the current delay (order kept; replies are not delayed).
pub struct DelayProxy {
    /// The `http://127.0.0.1:port` endpoint clients connect to.
    pub endpoint: String,
    delay_ms: Arc<AtomicU64>,
    links: Arc<Mutex<Vec<AbortOnDrop>>>,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// A proxy to `upstream` (an `http://host:port` endpoint), with no delay yet. Must be
    /// called inside a tokio runtime; it stops when dropped.
    pub async fn start(upstream: &str) -> DelayProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let links = Arc::new(Mutex::new(Vec::new()));
        let open = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let linked = AbortOnDrop(tokio::spawn(link(client, server, delay.clone())));
                open.lock().unwrap_or_else(|e| e.into_inner()).push(linked);
            }
        });
        DelayProxy {
            endpoint,
            delay_ms,
            links,
            accept,
        }
    }

    /// Sets the delay of what clients send from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Breaks every open connection now: what the delay still holds never reaches the
    /// server, and clients see their connection reset. New connections work as before.
    pub fn sever(&self) {
        let cut: Vec<AbortOnDrop> =
            std::mem::take(&mut *self.links.lock().unwrap_or_else(|e| e.into_inner()));
        drop(cut);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies one connection both ways until either side closes.
async fn link(client: TcpStream, server: TcpStream, delay_ms: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (sender, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            let at = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            if sender.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let sending = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if server_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let replying = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(reading, sending) } => {}
        () = replying => {}
    }
}
