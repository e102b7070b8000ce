//! Connections that write what finishes in one burst together: the server's client
//! connections and this client's connections to members both use it.
//!
//! # Why
//! HTTP/2 (the `h2` crate under tonic) writes to the socket every time a connection's task has
//! sent what it had, and sooner when a message carries a DATA frame of 256 bytes or more
//! (such a frame is written straight from its own buffer, so the next frame must wait for
//! that write). A get of a 256-byte value, a put of one, or a watch response therefore cost a
//! `writev` of its own: 87k `writev` for 85k serializable gets on the server. On a VM each of
//! those is several microseconds of kernel time.
//!
//! [`CoalescingStream`] sits between `h2` and the socket and keeps what `h2` writes until the
//! worker thread running the connection has run the other tasks that are ready: tasks
//! finishing in the same burst then add their messages, and one `write` sends them all.
//! It asks the worker for that turn with tokio's `yield_now`, whose wake-up tokio defers until
//! the worker has no queued task left (or at its periodic driver poll, every 61 tasks), so a
//! message never waits on a timer: a lone request pays one extra poll of its connection, a
//! few microseconds.
//!
//! # How it keeps `h2` going
//! A write is taken into the buffer at once. A flush with bytes buffered reports success and
//! asks for a turn; `h2` flushes at the end of every pass over its connection, so when the
//! turn wakes the connection task its next flush writes the buffer out. A write that would
//! take the buffer past [`SOFT_LIMIT`] goes to the socket at once, behind the buffered bytes
//! in the same system call and without being copied, so a large range reply or a watch
//! stream under load streams as before. Shutdown writes everything first.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes a connection holds back at most; past this a write goes to the socket at once.
pub const SOFT_LIMIT: usize = 64 * 1024;

/// Bytes of buffer an idle connection keeps, as `h2` keeps its own.
const RETAINED: usize = 16 * 1024;

/// A byte stream whose writes wait for the end of the worker's current burst of tasks, so
/// that messages completed together leave in one system call.
pub struct CoalescingStream<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has taken.
    sent: usize,
    state: TurnState,
    turn: Arc<Turn>,
    /// Writes go to the socket at once (see [`CoalescingStream::direct`]).
    direct: bool,
}

/// Where a connection with bytes held is in asking for its turn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TurnState {
    /// No turn asked for.
    Idle,
    /// A turn is asked for and has not come yet.
    Waiting,
}

/// The deferred wake-up a connection asked its worker for.
#[derive(Default)]
struct Turn {
    come: AtomicBool,
    connection: AtomicWaker,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.come.store(true, Ordering::Release);
        self.connection.wake();
    }
}

impl<S> CoalescingStream<S> {
    /// The wrapped stream, e.g. to read its socket options.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CoalescingStream {
            inner,
            held: Vec::new(),
            sent: 0,
            state: TurnState::Idle,
            turn: Arc::default(),
            direct: false,
        }
    }

    /// Wraps `inner` without holding writes back: for a connection that carries TLS. A TLS
    /// handshake writes its hello, flushes once and waits for the answer, so a hello held
    /// until the next flush would never leave.
    pub fn direct(inner: S) -> Self {
        CoalescingStream {
            direct: true,
            ..Self::new(inner)
        }
    }

    /// Whether the worker has run its other ready tasks since the held bytes were taken;
    /// asks for that turn when none is pending.
    fn turn_has_come(&mut self, cx: &mut Context<'_>) -> bool {
        self.turn.connection.register(cx.waker());
        if self.state == TurnState::Idle {
            // The last turn has come (or none was asked for), so no wake-up is on its way
            // and the flag can be reset.
            self.turn.come.store(false, Ordering::Release);
            // `yield_now` hands the waker it is polled with to the worker's deferred list;
            // the worker wakes that list once it has nothing queued. Polled outside a
            // runtime, it wakes at once, which only means no coalescing.
            let waker = Waker::from(self.turn.clone());
            let yielding = std::pin::pin!(tokio::task::yield_now());
            if yielding.poll(&mut Context::from_waker(&waker)).is_ready() {
                return true;
            }
            self.state = TurnState::Waiting;
        }
        if self.turn.come.load(Ordering::Acquire) {
            self.state = TurnState::Idle;
            return true;
        }
        false
    }
}

impl<S: AsyncWrite + Unpin> CoalescingStream<S> {
    /// Writes every held byte to the socket, at the end of a burst.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        if self.held.capacity() > RETAINED {
            // A burst's buffer is not kept by a connection that may now sit idle.
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
        // A turn still asked for stays asked for: its wake-up is on its way.
        Poll::Ready(Ok(()))
    }

    /// Writes the held bytes and then `bufs` in one system call, `bufs` without copying
    /// them; returns how many bytes of `bufs` the socket took (none if it took only held
    /// ones).
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let held = &self.held[self.sent..];
        let mut slices = Vec::with_capacity(bufs.len() + 1);
        slices.push(io::IoSlice::new(held));
        slices.extend(bufs.iter().map(|b| io::IoSlice::new(b)));
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let from_held = n.min(held.len());
        self.sent += from_held;
        if self.sent == self.held.len() {
            // Mid-burst: the buffer's capacity is kept for the rest of it.
            self.sent = 0;
            self.held.clear();
        }
        Poll::Ready(Ok(n - from_held))
    }

    /// Takes `bufs` (`len` bytes) into the buffer, or, when that would pass the soft limit,
    /// writes the held bytes and them to the socket at once.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        while !self.held.is_empty() && self.held.len() + len > SOFT_LIMIT {
            let taken = ready!(self.poll_write_through(cx, bufs))?;
            if taken > 0 {
                return Poll::Ready(Ok(taken));
            }
        }
        if self.held.capacity() < self.held.len() + len {
            // Straight to the soft limit rather than doubling up to it: a streaming
            // connection would otherwise copy its buffer over and over as it grows.
            self.held.reserve(SOFT_LIMIT.max(len));
        }
        for b in bufs {
            self.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.direct {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.poll_take(cx, &[io::IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.direct {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        this.poll_take(cx, bufs, len)
    }

    /// Vectored: `h2` then hands over large DATA payloads without copying them into its own
    /// buffer first; they are copied at most once, here.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            if !this.turn_has_come(cx) {
                // Reported flushed so that `h2` goes on with its pass; the turn's wake-up
                // brings the connection back here to write.
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for CoalescingStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    /// A socket stand-in that records every write it is given: at most `cap` bytes of each
    /// when set, and vectored writes as one when `vectored`.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        vectored: bool,
        cap: Option<usize>,
    }

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }

        fn bytes(&self) -> Vec<u8> {
            self.writes().concat()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let bufs = if self.vectored {
                bufs
            } else {
                &bufs[..bufs.len().min(1)]
            };
            let mut taken: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            taken.truncate(self.cap.unwrap_or(usize::MAX));
            let n = taken.len();
            self.writes.lock().unwrap().push(taken);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Runs a connection the way `h2` does: every pass takes what was queued, writes it, and
    /// ends with a flush; the connection ends when the queue is closed.
    async fn connection(
        mut stream: CoalescingStream<Recorder>,
        mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            loop {
                match queue.poll_recv(cx) {
                    Poll::Ready(Some(frame)) => {
                        let n = ready!(Pin::new(&mut stream).poll_write(cx, &frame))?;
                        assert_eq!(n, frame.len());
                    }
                    Poll::Ready(None) => return Pin::new(&mut stream).poll_shutdown(cx),
                    Poll::Pending => break,
                }
            }
            ready!(Pin::new(&mut stream).poll_flush(cx))?;
            Poll::Pending
        })
        .await
    }

    /// Waits (bounded) until `recorder` has been given `len` bytes.
    async fn until_written(recorder: &Recorder, len: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while recorder.bytes().len() < len {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the held bytes were never written");
    }

    #[tokio::test]
    async fn responses_finished_in_one_burst_leave_in_one_write() {
        let recorder = Recorder::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = tokio::spawn(connection(CoalescingStream::new(recorder.clone()), rx));
        // Five request tasks finish in one burst, each handing its response to the
        // connection and waking the next one; the connection task is woken, and makes a pass
        // ending in a flush, between each two of them.
        fn request(i: u8, tx: mpsc::UnboundedSender<Vec<u8>>) {
            tokio::spawn(async move {
                tx.send(vec![i; 100]).unwrap();
                if i < 4 {
                    request(i + 1, tx);
                }
            });
        }
        request(0, tx.clone());
        until_written(&recorder, 500).await;
        assert_eq!(recorder.writes().len(), 1, "one write for the burst");
        let mut expected = Vec::new();
        for i in 0..5u8 {
            expected.extend(std::iter::repeat_n(i, 100));
        }
        assert_eq!(recorder.bytes(), expected);
        drop(tx);
        conn.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_response_is_written_without_further_traffic() {
        let recorder = Recorder::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = tokio::spawn(connection(CoalescingStream::new(recorder.clone()), rx));
        for round in 1..=3usize {
            tx.send(vec![7; 10]).unwrap();
            // Nothing else happens on the connection: the turn alone must bring it back.
            until_written(&recorder, 10 * round).await;
        }
        assert_eq!(recorder.writes().len(), 3);
        drop(tx);
        conn.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn past_the_soft_limit_the_write_follows_the_held_bytes_in_one_call() {
        let recorder = Recorder {
            vectored: true,
            ..Recorder::default()
        };
        let mut stream = CoalescingStream::new(recorder.clone());
        let small = vec![1u8; 100];
        let large: Vec<u8> = (0..SOFT_LIMIT).map(|i| (i % 251) as u8).collect();
        stream.write_all(&small).await.unwrap();
        assert!(recorder.writes().is_empty());
        stream.write_all(&large).await.unwrap();
        assert_eq!(
            recorder.writes().len(),
            1,
            "held bytes and the write together"
        );
        assert_eq!(recorder.bytes(), [small.clone(), large.clone()].concat());
        // A socket taking less than offered: nothing is lost, repeated or reordered.
        let partial = Recorder {
            vectored: true,
            cap: Some(7_000),
            ..Recorder::default()
        };
        let mut stream = CoalescingStream::new(partial.clone());
        stream.write_all(&small).await.unwrap();
        stream.write_all(&large).await.unwrap();
        stream.write_all(&small).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(partial.bytes(), [small.clone(), large, small].concat());
    }

    #[tokio::test]
    async fn past_the_soft_limit_bytes_go_out_before_the_flush() {
        let recorder = Recorder::default();
        let mut stream = CoalescingStream::new(recorder.clone());
        let piece: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
        let pieces = 3 * SOFT_LIMIT / piece.len();
        for _ in 0..pieces {
            stream.write_all(&piece).await.unwrap();
        }
        assert!(
            recorder.writes().len() >= 2,
            "{} writes before any flush",
            recorder.writes().len()
        );
        stream.shutdown().await.unwrap();
        assert_eq!(recorder.bytes(), piece.repeat(pieces));
    }

    /// A TLS handshake writes its hello, flushes once and waits for the answer: with writes
    /// held until a later flush, the hello never left and every TLS connection hung.
    #[tokio::test]
    async fn a_direct_stream_hands_each_write_to_the_socket_at_once() {
        let recorder = Recorder::default();
        let mut stream = CoalescingStream::direct(recorder.clone());
        stream.write_all(b"client hello").await.unwrap();
        assert_eq!(
            recorder.bytes(),
            b"client hello",
            "written before any flush"
        );
        stream.flush().await.unwrap();
        stream.write_all(b"finished").await.unwrap();
        assert_eq!(
            recorder.writes(),
            [b"client hello".to_vec(), b"finished".to_vec()]
        );
        // A coalescing stream holds the same write back: the difference is the point.
        let held = Recorder::default();
        let mut coalescing = CoalescingStream::new(held.clone());
        coalescing.write_all(b"client hello").await.unwrap();
        assert!(held.writes().is_empty());
    }
}
