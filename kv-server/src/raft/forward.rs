//! Client writes a follower forwards to the leader, over one long-lived stream per leader:
//! many writes in flight at once, each tagged with an id and answered in any order. A unary
//! call per write cost the follower and the leader an HTTP/2 stream each; with clients spread
//! over all members of a 3-member cluster, two writes in three take this path.
//!
//! A stream is opened for one leader of one term ([`MEANT_LEADER`]): the leader appends its
//! writes only while it is that leader, and says so in its answer's opening. A write whose
//! answer is then lost can be resolved from the log (see `resolve`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use kv_core::proto::kvserverpb::PeerRequest;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::network::{PeerCall, PeerConnection, PeerError};
use super::types::LeaderId;

/// Bytes of the id in front of every forwarded write and every answer.
const ID_BYTES: usize = 8;

/// Time for the leader to accept a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Metadata on a forwarding stream's opening: the leader (`term.node`) its writes are meant
/// for. A leader that appends them only as that leader sends it back on its answer's opening;
/// one of an older version ignores it and appends them whatever happened since.
pub(crate) const MEANT_LEADER: &str = "kv-meant-leader";

/// `leader` as [`MEANT_LEADER`] carries it.
pub(crate) fn leader_text(leader: LeaderId) -> String {
    format!("{}.{}", leader.term, leader.node_id)
}

/// The leader in a [`MEANT_LEADER`] value.
pub(crate) fn parse_leader(text: &str) -> Option<LeaderId> {
    let (term, node_id) = text.split_once('.')?;
    Some(LeaderId {
        term: term.parse().ok()?,
        node_id: node_id.parse().ok()?,
    })
}

/// A message body behind its id.
pub(crate) fn frame(id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ID_BYTES + body.len());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Takes the id off the front of a framed message; `None` when it is too short to have one.
pub(crate) fn unframe(mut data: Vec<u8>) -> Option<(u64, Vec<u8>)> {
    let id = u64::from_le_bytes(*data.first_chunk::<ID_BYTES>()?);
    data.drain(..ID_BYTES);
    Some((id, data))
}

/// Where a forwarding stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Opening or open: writes may be forwarded.
    Open,
    /// Ended (the leader went, or the connection broke): a new stream is needed.
    Closed,
    /// The leader is of a version without `ProposeStream`: forward one write per call.
    Unsupported,
}

/// A forwarded write waiting for its answer.
struct Waiter {
    answer: oneshot::Sender<Result<Vec<u8>, PeerError>>,
    /// Taken by the stream's sending half: from then on the leader may have it, and a lost
    /// answer means the outcome is unknown rather than that nothing happened.
    sent: bool,
}

/// The writes in flight on one stream.
struct Book {
    state: State,
    /// The leader confirmed it appends these writes only as the meant leader.
    conditional: bool,
    next_id: u64,
    waiting: HashMap<u64, Waiter>,
}

/// One follower's stream of forwarded writes to one leader.
pub(crate) struct Forwarder {
    addr: String,
    meant: Option<LeaderId>,
    queue: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    book: Arc<Mutex<Book>>,
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(|e| e.into_inner())
}

impl Forwarder {
    /// Opens a stream to the leader at `conn`, for its writes to be appended only by `meant`
    /// if given (in the background; writes queue meanwhile). Dropping the forwarder ends the
    /// stream once the writes on it are answered.
    pub(crate) fn open(conn: PeerConnection, meant: Option<LeaderId>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let book = Arc::new(Mutex::new(Book {
            state: State::Open,
            conditional: false,
            next_id: 0,
            waiting: HashMap::new(),
        }));
        let addr = conn.addr().to_string();
        tokio::spawn(drive(conn, meant, rx, book.clone()));
        Self {
            addr,
            meant,
            queue,
            book,
        }
    }

    /// The leader's peer URL.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The leader the writes are meant for.
    pub(crate) fn meant(&self) -> Option<LeaderId> {
        self.meant
    }

    /// True once the leader confirmed that it appends the writes only as the meant leader,
    /// so that a write whose answer is lost is in an entry of that leader or nowhere.
    pub(crate) fn conditional(&self) -> bool {
        lock(&self.book).conditional
    }

    /// False once the stream has ended and a new one is needed.
    pub(crate) fn usable(&self) -> bool {
        lock(&self.book).state != State::Closed
    }

    /// True once the leader turned out not to serve the stream.
    #[cfg(test)]
    pub(crate) fn unsupported(&self) -> bool {
        lock(&self.book).state == State::Unsupported
    }

    /// How many writes were put on this stream.
    #[cfg(test)]
    pub(crate) fn streamed(&self) -> u64 {
        lock(&self.book).next_id
    }

    /// Forwards one encoded write and waits (at most `timeout`) for the leader's answer, an
    /// encoded `Result<Vec<u8>, ForwardError>` as the unary `Propose` call returns.
    pub(crate) async fn forward(
        &self,
        cmd: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        let not_delivered = |reason: &str| PeerError::NotDelivered {
            addr: self.addr.clone(),
            reason: reason.into(),
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut book = lock(&self.book);
            match book.state {
                State::Open => {}
                State::Closed => return Err(not_delivered("forwarding stream ended")),
                State::Unsupported => {
                    return Err(PeerError::Unsupported {
                        addr: self.addr.clone(),
                        call: format!("{:?}", PeerCall::ProposeStream),
                    });
                }
            }
            let id = book.next_id;
            book.next_id += 1;
            let waiter = Waiter {
                answer: tx,
                sent: false,
            };
            book.waiting.insert(id, waiter);
            id
        };
        if self.queue.send((id, frame(id, cmd))).is_err() {
            lock(&self.book).waiting.remove(&id);
            return Err(not_delivered("forwarding stream ended"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            // The driver answers every waiter it drops; this is only its task being torn down.
            Ok(Err(_)) => Err(PeerError::Unreachable {
                addr: self.addr.clone(),
                reason: "forwarding stream stopped".into(),
            }),
            Err(_) => match lock(&self.book).waiting.remove(&id) {
                // Removed before the sending half took it, so it is never sent.
                Some(Waiter { sent: false, .. }) => Err(not_delivered("timed out in the queue")),
                _ => Err(PeerError::Unreachable {
                    addr: self.addr.clone(),
                    reason: format!("ProposeStream: no answer in {timeout:?}"),
                }),
            },
        }
    }
}

/// Runs one stream: sends what the queue holds, hands each answer to its waiter, and when
/// the stream ends answers every waiter left with what is known of its write.
async fn drive(
    conn: PeerConnection,
    meant: Option<LeaderId>,
    queue: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    book: Arc<Mutex<Book>>,
) {
    let cluster_id = conn.cluster_id();
    let marks = book.clone();
    let peer = conn.addr().to_string();
    // Nothing is sent before the leader's answer opens: a leader starts taking writes before
    // its opening is out, so a write sent on a stream whose opening then failed might have
    // been appended, though the failure says the leader was never reached.
    let (opened, gate) = oneshot::channel::<()>();
    let mut opened = Some(opened);
    let requests = futures::stream::once(gate)
        .filter_map(|_| std::future::ready(None))
        .chain(UnboundedReceiverStream::new(queue))
        .take_while(move |_| std::future::ready(!crate::failpoint::cut_off(&peer)))
        .filter_map(move |(id, data)| {
            // A write whose caller gave up before it was taken is not sent at all.
            let taken = lock(&marks).waiting.get_mut(&id).map(|w| w.sent = true);
            std::future::ready(taken.map(|()| PeerRequest { cluster_id, data }))
        });
    let meant = meant.map(leader_text);
    let mut opening = tonic::metadata::MetadataMap::new();
    if let Some(value) = meant.as_deref().and_then(|m| m.parse().ok()) {
        opening.insert(MEANT_LEADER, value);
    }
    let end = match conn
        .open_stream(PeerCall::ProposeStream, requests, opening, OPEN_TIMEOUT)
        .await
    {
        Err(PeerError::Unsupported { .. }) => State::Unsupported,
        Err(e) => {
            tracing::debug!("forwarding stream not opened: {e}");
            State::Closed
        }
        Ok(answers) => {
            let echoed = answers
                .metadata()
                .get(MEANT_LEADER)
                .and_then(|v| v.to_str().ok());
            // Set before any write is sent, so before any waiter can hear of a lost answer.
            lock(&book).conditional = meant.is_some() && echoed == meant.as_deref();
            if let Some(opened) = opened.take() {
                let _ = opened.send(());
            }
            let mut answers = answers.into_inner();
            loop {
                let message = match answers.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(addr = conn.addr(), "forwarding stream: {status}");
                        break;
                    }
                };
                if crate::failpoint::cut_off(conn.addr()) {
                    break;
                }
                let Some((id, answer)) = unframe(message.data) else {
                    tracing::warn!(
                        addr = conn.addr(),
                        "forwarding stream: answer without an id"
                    );
                    break;
                };
                if let Some(waiter) = lock(&book).waiting.remove(&id) {
                    let _ = waiter.answer.send(Ok(answer));
                }
            }
            State::Closed
        }
    };
    let left = {
        let mut book = lock(&book);
        book.state = end;
        std::mem::take(&mut book.waiting)
    };
    let addr = conn.addr().to_string();
    for waiter in left.into_values() {
        let reason = "forwarding stream ended".to_string();
        let error = if waiter.sent {
            PeerError::Unreachable {
                addr: addr.clone(),
                reason,
            }
        } else {
            PeerError::NotDelivered {
                addr: addr.clone(),
                reason,
            }
        };
        let _ = waiter.answer.send(Err(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_refuses_short_messages() {
        let framed = frame(0x0102_0304_0506_0708, b"write");
        assert_eq!(framed.len(), ID_BYTES + 5);
        assert_eq!(
            unframe(framed),
            Some((0x0102_0304_0506_0708, b"write".to_vec()))
        );
        assert_eq!(unframe(frame(7, b"")), Some((7, Vec::new())));
        assert_eq!(unframe(vec![1, 2, 3]), None);
    }

    #[test]
    fn the_meant_leader_round_trips_as_text() {
        let leader = LeaderId {
            term: 12,
            node_id: u64::MAX,
        };
        assert_eq!(parse_leader(&leader_text(leader)), Some(leader));
        assert_eq!(parse_leader("12"), None);
        assert_eq!(parse_leader("x.1"), None);
        assert_eq!(parse_leader("1.-1"), None);
    }
}
