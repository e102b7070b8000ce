//! The Watch service on the wire: its responses are encoded here rather than by prost, so that
//! one revision's events are encoded once per stream and copied, not re-encoded, into each
//! watcher's response that carries them.
//!
//! Under a fan-out a thousand watchers of one prefix get the same events. Built as messages,
//! each of those thousand responses cloned the events, measured their nested lengths (prost
//! does that once per level of nesting) and wrote their varints anew, which was most of the
//! server's CPU per delivered event. Here a watcher's response is its header, its id and runs
//! of already encoded `events` fields.
//!
//! [`WatchServer`] is what tonic's generator writes for a bidirectional method, with
//! [`WatchCodec`] in place of the prost codec: the generated server fixes its codec and its
//! response type.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::proto::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use kv_core::proto::mvccpb::Event;
use prost::Message;
use prost::encoding;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService};
use tonic_prost::ProstDecoder;

use super::watch::{Responses, WatchService};

/// `WatchResponse` field numbers written here (etcd's `rpc.proto`).
const HEADER_FIELD: u32 = 1;
const WATCH_ID_FIELD: u32 = 2;
const FRAGMENT_FIELD: u32 = 7;
const EVENTS_FIELD: u32 = 11;

/// Some of a revision's events, each encoded once as a `WatchResponse.events` field, for any
/// number of responses to copy.
pub struct EncodedEvents {
    bytes: Bytes,
    /// Each event's field in `bytes`; empty for events nobody asked for.
    spans: Vec<(usize, usize)>,
}

impl EncodedEvents {
    /// Encodes the events of `events` that `wanted` names; the others are skipped, so a
    /// stream whose watchers take one event of a large transaction encodes only that one.
    pub fn new(events: &[Event], wanted: impl Fn(usize) -> bool) -> Self {
        let size: usize = (0..events.len())
            .filter(|&i| wanted(i))
            .map(|i| encoding::message::encoded_len(EVENTS_FIELD, &events[i]))
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        let spans = events
            .iter()
            .enumerate()
            .map(|(i, ev)| {
                let start = buf.len();
                if wanted(i) {
                    encoding::message::encode(EVENTS_FIELD, ev, &mut buf);
                }
                (start, buf.len())
            })
            .collect();
        Self {
            bytes: buf.freeze(),
            spans,
        }
    }

    /// Appends the events at `picks` to `to`, in that order. Picks that follow each other
    /// here share one run, so a watcher taking a whole revision costs one run.
    pub fn take(&self, picks: &[u32], to: &mut EventRuns) {
        let mut run: Option<(usize, usize, usize)> = None;
        for &p in picks {
            let Some(&(start, end)) = self.spans.get(p as usize) else {
                continue;
            };
            if start == end {
                continue;
            }
            run = match run {
                Some((from, to_end, n)) if to_end == start => Some((from, end, n + 1)),
                Some((from, to_end, n)) => {
                    to.push(self.bytes.slice(from..to_end), n);
                    Some((start, end, 1))
                }
                None => Some((start, end, 1)),
            };
        }
        if let Some((from, end, n)) = run {
            to.push(self.bytes.slice(from..end), n);
        }
    }
}

/// The events of one response: runs of encoded `events` fields.
#[derive(Debug, Clone, Default)]
pub struct EventRuns {
    runs: Vec<Bytes>,
    count: usize,
    len: usize,
}

impl EventRuns {
    /// Encodes `events`, all of them, as one run.
    pub fn encode(events: &[Event]) -> Self {
        let mut runs = Self::default();
        let encoded = EncodedEvents::new(events, |_| true);
        if !encoded.bytes.is_empty() {
            runs.push(encoded.bytes, events.len());
        }
        runs
    }

    /// How many events.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Their encoded size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends `other`'s events after these.
    pub fn append(&mut self, other: EventRuns) {
        self.runs.extend(other.runs);
        self.count += other.count;
        self.len += other.len;
    }

    fn push(&mut self, run: Bytes, events: usize) {
        self.len += run.len();
        self.count += events;
        self.runs.push(run);
    }

    /// The events one by one, each its own field; runs are cut at field boundaries.
    fn each(&self) -> impl Iterator<Item = Bytes> + '_ {
        self.runs.iter().flat_map(|run| {
            let mut rest = run.clone();
            std::iter::from_fn(move || {
                if rest.is_empty() {
                    return None;
                }
                let end = field_end(&rest).unwrap_or(rest.len());
                Some(rest.split_to(end))
            })
        })
    }
}

/// Where the first length-delimited field in `buf` ends: its key, its length, its body.
fn field_end(buf: &[u8]) -> Option<usize> {
    let mut cursor = buf;
    let before = cursor.len();
    encoding::decode_varint(&mut cursor).ok()?;
    let len = usize::try_from(encoding::decode_varint(&mut cursor).ok()?).ok()?;
    let end = before - cursor.len() + len;
    (end <= buf.len()).then_some(end)
}

/// A watcher's events, with its header and id: a `WatchResponse` written by [`Self::encode`].
#[derive(Debug, Clone)]
pub struct EventsResponse {
    /// The header, as in every etcd response.
    pub header: ResponseHeader,
    /// The watcher.
    pub watch_id: i64,
    /// More of this response follows in the next one (etcd's fragments).
    pub fragment: bool,
    /// The events.
    pub events: EventRuns,
}

impl EventsResponse {
    /// Its encoded size, not counting events.
    fn shell_len(&self, fragment: bool) -> usize {
        let mut len = encoding::message::encoded_len(HEADER_FIELD, &self.header);
        if self.watch_id != 0 {
            len += encoding::int64::encoded_len(WATCH_ID_FIELD, &self.watch_id);
        }
        if fragment {
            len += encoding::bool::encoded_len(FRAGMENT_FIELD, &true);
        }
        len
    }

    /// Its encoded size: what `WatchResponse::encoded_len` gives for the same response.
    pub fn encoded_len(&self) -> usize {
        self.shell_len(self.fragment) + self.events.len()
    }

    /// Writes it as prost writes a `WatchResponse`: fields in number order, defaults left
    /// out.
    pub fn encode(&self, buf: &mut impl BufMut) {
        encoding::message::encode(HEADER_FIELD, &self.header, buf);
        if self.watch_id != 0 {
            encoding::int64::encode(WATCH_ID_FIELD, &self.watch_id, buf);
        }
        if self.fragment {
            encoding::bool::encode(FRAGMENT_FIELD, &true, buf);
        }
        for run in &self.events.runs {
            buf.put_slice(run);
        }
    }

    /// etcd's `sendFragments`: a response of `limit` bytes or more with more than one event
    /// is cut into pieces under `limit` (at least one event each), all but the last marked
    /// `fragment`.
    pub fn fragments(self, limit: usize) -> Vec<EventsResponse> {
        if self.encoded_len() < limit || self.events.count() < 2 {
            return vec![self];
        }
        let shell = self.shell_len(true);
        let piece = |events| EventsResponse {
            header: self.header,
            watch_id: self.watch_id,
            fragment: true,
            events,
        };
        let mut out = Vec::new();
        let mut cur = EventRuns::default();
        for ev in self.events.each() {
            if cur.count() >= 1 && shell + cur.len() + ev.len() >= limit {
                out.push(piece(std::mem::take(&mut cur)));
            }
            cur.push(ev, 1);
        }
        let mut last = piece(cur);
        last.fragment = false;
        out.push(last);
        out
    }
}

/// A watch response on its way out.
#[derive(Debug, Clone)]
pub enum WatchFrame {
    /// Built as a message: created, canceled, compacted, progress.
    Message(WatchResponse),
    /// A watcher's events, encoded here.
    Events(EventsResponse),
}

/// The Watch service's codec: requests are decoded by prost, responses written as
/// [`WatchFrame`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

/// Writes [`WatchFrame`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchEncoder;

/// The size of a stream's encode buffer, allocated when it opens and again each time
/// [`ENCODE_YIELD_BYTES`] did not fit in what was left of it.
///
/// tonic hands the encoded bytes to the connection in pieces of [`ENCODE_YIELD_BYTES`] or a
/// little more, each split off the buffer. With its defaults (8 KiB buffer, 32 KiB pieces) a
/// busy fan-out stream regrew the buffer by doubling for every piece, and then copied the
/// part-written piece into a new buffer: `BytesMut::reserve` copied about one and a half
/// times the bytes sent (3.3 % of the server's CPU under `watch-fanout`, more than the
/// encoding's own copy). Here three pieces fit before the buffer is replaced, and the one
/// copied then is at most a piece.
const ENCODE_BUFFER_BYTES: usize = 64 << 10;
/// tonic passes the encoded bytes on once this many are ready (or the stream has no more):
/// h2's default frame size, so a piece is about one DATA frame.
const ENCODE_YIELD_BYTES: usize = 16 << 10;

impl Encoder for WatchEncoder {
    type Item = WatchFrame;
    type Error = tonic::Status;

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODE_BUFFER_BYTES, ENCODE_YIELD_BYTES)
    }

    fn encode(&mut self, item: WatchFrame, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        match item {
            WatchFrame::Message(m) => m
                .encode(dst)
                .map_err(|e| tonic::Status::internal(e.to_string())),
            WatchFrame::Events(e) => {
                e.encode(dst);
                Ok(())
            }
        }
    }
}

impl Codec for WatchCodec {
    type Encode = WatchFrame;
    type Decode = WatchRequest;
    type Encoder = WatchEncoder;
    type Decoder = ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> WatchEncoder {
        WatchEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<WatchRequest> {
        ProstDecoder::default()
    }
}

/// The `etcdserverpb.Watch` gRPC service over [`WatchService`], speaking [`WatchCodec`].
#[derive(Clone)]
pub struct WatchServer {
    inner: Arc<WatchService>,
    max_decoding_message_size: Option<usize>,
}

impl WatchServer {
    /// Serves `inner`.
    pub fn new(inner: WatchService) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding_message_size: None,
        }
    }

    /// Refuses requests over `limit` bytes, as the generated servers' option of that name.
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "etcdserverpb.Watch";
}

/// The one method, as a tonic streaming service.
struct WatchMethod(Arc<WatchService>);

impl tonic::server::StreamingService<WatchRequest> for WatchMethod {
    type Response = WatchFrame;
    type ResponseStream = Responses;
    type Future = BoxFuture<tonic::Response<Responses>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<WatchRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { Ok(inner.open(request)) })
    }
}

impl<B> Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/etcdserverpb.Watch/Watch" {
            // What tonic's generated servers answer for a method they do not have.
            return Box::pin(async {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            });
        }
        let method = WatchMethod(self.inner.clone());
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(WatchCodec).apply_max_message_size_config(max_decoding, None);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::proto::mvccpb::KeyValue;

    fn event(key: &str, size: usize) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                value: vec![7; size].into(),
                mod_revision: 9,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn header() -> ResponseHeader {
        ResponseHeader {
            cluster_id: 17,
            member_id: 4,
            revision: 9,
            raft_term: 2,
        }
    }

    /// What a client decodes from `r`.
    fn decoded(r: &EventsResponse) -> WatchResponse {
        let mut buf = BytesMut::new();
        r.encode(&mut buf);
        assert_eq!(buf.len(), r.encoded_len());
        WatchResponse::decode(buf.freeze()).expect("a well-formed WatchResponse")
    }

    #[test]
    fn a_response_encodes_byte_for_byte_as_prost_would() {
        let events: Vec<Event> = (0..5).map(|i| event(&format!("k{i}"), 40 * i)).collect();
        let encoded = EncodedEvents::new(&events, |_| true);
        for (picks, fragment) in [(vec![0, 1, 2, 3, 4], false), (vec![4, 1, 2], true)] {
            let mut runs = EventRuns::default();
            encoded.take(&picks, &mut runs);
            let ours = EventsResponse {
                header: header(),
                watch_id: 3,
                fragment,
                events: runs,
            };
            let theirs = WatchResponse {
                header: Some(header()),
                watch_id: 3,
                fragment,
                events: picks.iter().map(|&p| events[p as usize].clone()).collect(),
                ..Default::default()
            };
            let mut buf = BytesMut::new();
            ours.encode(&mut buf);
            assert_eq!(buf.freeze(), Bytes::from(theirs.encode_to_vec()));
        }
        // Watch id 0 (the first watch of a stream) is left out, as prost leaves it.
        let first = EventsResponse {
            header: header(),
            watch_id: 0,
            fragment: false,
            events: EventRuns::encode(&events[..1]),
        };
        assert_eq!(decoded(&first).watch_id, 0);
        assert_eq!(decoded(&first).events, events[..1]);
    }

    #[test]
    fn consecutive_picks_share_a_run_and_skipped_events_are_not_encoded() {
        let events: Vec<Event> = (0..4).map(|i| event(&format!("k{i}"), 8)).collect();
        let all = EncodedEvents::new(&events, |_| true);
        let mut runs = EventRuns::default();
        all.take(&[0, 1, 2, 3], &mut runs);
        assert_eq!((runs.runs.len(), runs.count()), (1, 4));
        let mut runs = EventRuns::default();
        all.take(&[0, 2, 3], &mut runs);
        assert_eq!((runs.runs.len(), runs.count()), (2, 3));
        let some = EncodedEvents::new(&events, |i| i == 2);
        assert_eq!(
            some.bytes.len(),
            encoding::message::encoded_len(EVENTS_FIELD, &events[2])
        );
        let mut runs = EventRuns::default();
        some.take(&[1, 2, 7], &mut runs);
        assert_eq!(runs.count(), 1);
    }

    #[test]
    fn fragments_split_at_the_limit_and_flag_all_but_the_last() {
        let events: Vec<Event> = (0..10).map(|i| event(&format!("k{i}"), 100)).collect();
        let response = EventsResponse {
            header: header(),
            watch_id: 3,
            fragment: false,
            events: EventRuns::encode(&events),
        };
        assert_eq!(response.clone().fragments(1 << 20).len(), 1);
        let parts = response.clone().fragments(350);
        assert!(parts.len() > 2);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(parts.iter().all(|p| p.encoded_len() < 350));
        // The pieces carry every event, once, in order.
        let seen: Vec<Event> = parts.iter().flat_map(|p| decoded(p).events).collect();
        assert_eq!(seen, events);
        assert!(parts.iter().all(|p| decoded(p).watch_id == 3));
        // A single event is never split, however large.
        let one = EventsResponse {
            events: EventRuns::encode(&[event("big", 1000)]),
            ..response
        };
        assert_eq!(one.fragments(10).len(), 1);
    }

    #[test]
    fn a_run_is_cut_only_at_field_boundaries() {
        // Values long enough that their lengths take two varint bytes.
        let events: Vec<Event> = (0..3).map(|i| event(&format!("k{i}"), 300)).collect();
        let runs = EventRuns::encode(&events);
        let each: Vec<Event> = runs
            .each()
            .map(|field| {
                let mut cursor = &field[..];
                encoding::decode_varint(&mut cursor).unwrap();
                Event::decode_length_delimited(cursor).unwrap()
            })
            .collect();
        assert_eq!(each, events);
        assert_eq!(field_end(&[0x5a, 0x05, 1]), None);
    }
}
