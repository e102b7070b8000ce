//! A loopback TCP proxy that can hold back what clients send, for tests that need a
//! request to reach the server late (a slow or congested network) at a known moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
        let accept = tokio::spawn(async move {
            let mut links = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                links.push(AbortOnDrop(tokio::spawn(link(
                    client,
                    server,
                    delay.clone(),
                ))));
            }
        });
        DelayProxy {
            endpoint,
            delay_ms,
            accept,
        }
    }

    /// Sets the delay of what clients send from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // Dropping the accept task drops every link with it.
        self.accept.abort();
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
