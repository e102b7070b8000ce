//! A hostile-input fuzzer for a live server that speaks etcd's v3 gRPC API.
//!
//! [`fuzz`] sends a seeded stream of random and malformed requests from [`CONCURRENCY`] tasks
//! over [`CHANNELS`] connections, counts how each was answered, and then checks that the
//! server came through unharmed. Request `i` of seed `s` depends on nothing but `(s, i)`, so an
//! anomaly reported as `#i` is reproduced by [`describe`]`(s, i)`.
//!
//! # The mix
//! By weight (`Gen::op`): Range, Put, DeleteRange and Txn (about half), raw bodies to the
//! unary KV, Lease and Maintenance methods (a sixth), watch streams, lease grants, revokes,
//! time-to-live, lists and keep-alive streams, raw bodies on the Watch and LeaseKeepAlive
//! streams, raw TCP garbage, Status, HashKV and Alarm(GET), and about one request in five
//! thousand a storm of hundreds of watch streams held open at once over fresh connections.
//! Keys come mostly from a small pool under `fuzz/` (so writes, reads, compares and deletes
//! meet), else random bytes, empty, the edges of the key space, the sentinels (for reads), or
//! megabytes.
//! Requests carry invalid enum values, negative and huge revisions, limits, TTLs and ids,
//! range ends below their keys, too many txn ops, keys written twice in a branch, txns nested
//! up to 64 deep, watch crowds of thousands on one stream; raw bodies are random bytes, valid
//! encodings cut short or with bytes flipped, protobuf-shaped junk (bad wire types, overlong
//! varints, lying lengths), nesting past the decoders' limit of 100, and bodies of megabytes.
//!
//! # What the fuzzer must not harm
//! Before fuzzing it writes [`SENTINELS`] keys `sentinel/NNN`, and remembers their values and
//! revisions, the revision `R` after them and `HashKV(R)`. No fuzzed write may touch them: the
//! key of every Put and the range of every DeleteRange, at any depth of a txn, goes through
//! [`shield`], which puts a `~` in front of a key starting with `sentinel/` and cuts a range
//! that could reach into the sentinel span `[sentinel/, sentinel0)` to end at `sentinel/`. A
//! raw body for Put, DeleteRange or Txn that decodes into a write of that span is not sent.
//! Reads (Range, compares, watches) name the sentinels freely, and whatever they return of
//! them is checked against what was written.
//!
//! Never sent, since they would change what the final checks compare or the cluster itself:
//! Compact, Defragment, Snapshot, MoveLeader, membership changes, auth, and alarm activation.
//! A raw body for Compact, Defragment, Snapshot or MoveLeader is sent only when it does not
//! decode, and a raw Alarm body only when it does not decode into an activation.
//!
//! # Anomalies
//! - a refusal whose message mentions a panic;
//! - a transport failure (connection refused or reset, the server went away);
//! - no answer within [`REQUEST_TIMEOUT`], or `Unavailable` (which a single healthy member
//!   never answers);
//! - a stream that is sent a message the server cannot take (malformed, or over the gRPC
//!   receive limit) and does not end with an error within [`STREAM_END_WAIT`], as etcd's does;
//! - an answer that breaks an invariant: a request etcd refuses was accepted (an empty key, a
//!   Put over `--max-request-bytes`, too many txn ops, an invalid sort option, a future
//!   revision, ...), a Range answer outside its range, limit, filters or order, a sentinel that
//!   reads back changed, revisions going back within one task, a raw answer that does not
//!   decode as the method's response;
//! - after the run: the process gone, Status unanswered, a sentinel changed, `HashKV(R)`
//!   changed, writes refused, an alarm raised, threads or open files not back near where they
//!   started, or resident memory more than [`RSS_GROWTH_KIB`] (plus what the store grew)
//!   above it.
//!
//! The checks assume a single member running with etcd's default limits
//! ([`MAX_REQUEST_BYTES`], [`MAX_TXN_OPS`]), whose `sentinel/` span belongs to the fuzzer: it
//! is cleared before the sentinels are written, so a server may be fuzzed more than once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kv_core::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, Compare,
    DefragmentResponse, DeleteRangeRequest, DeleteRangeResponse, DowngradeRequest,
    DowngradeResponse, HashKvRequest, HashKvResponse, HashResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, MoveLeaderRequest, MoveLeaderResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, SnapshotResponse, StatusRequest, StatusResponse,
    TxnRequest, TxnResponse, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse, alarm_request::AlarmAction, compare::TargetUnion,
    kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    request_op::Request as Op1, response_op::Response as R1, watch_client::WatchClient,
    watch_request::RequestUnion,
};
use kv_core::proto::mvccpb::{KeyValue, event::EventType};
use kv_core::proto::prefix_end;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// The server's `--max-request-bytes` (etcd's default, 1.5 MiB): a write whose proposal is
/// larger is refused with "etcdserver: request is too large".
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// The gRPC receive limit: `--max-request-bytes` plus etcd's 512 KiB of head-room. A larger
/// message is refused by the transport ("grpc: received message larger than max").
pub const GRPC_RECEIVE_LIMIT: usize = MAX_REQUEST_BYTES + 512 * 1024;
/// The server's `--max-txn-ops` (etcd's default).
pub const MAX_TXN_OPS: usize = 128;
/// etcd's largest lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// Requests in flight at once.
pub const CONCURRENCY: usize = 16;
/// Connections the requests are spread over.
pub const CHANNELS: usize = 4;
/// How long one request (or one stream's whole exchange) may take before it is an anomaly.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream gets to end with an error after a message the server cannot take.
pub const STREAM_END_WAIT: Duration = Duration::from_secs(2);
/// How long a storm of watch streams may take as a whole.
pub const STORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys written before the run, and checked after it.
pub const SENTINELS: usize = 100;
/// Where the sentinels live; nothing the fuzzer writes starts with it.
pub const SENTINEL_PREFIX: &[u8] = b"sentinel/";
/// The end of the sentinel span (`prefix_end("sentinel/")`).
const SENTINEL_END: &[u8] = b"sentinel0";
/// Keys the generator draws from most often, so that writes, reads, compares and deletes meet.
const KEY_POOL: u64 = 512;
/// Lease ids the generator grants, attaches, renews and revokes most often.
const LEASE_POOL: u64 = 64;
/// Watch streams a connection of a storm carries (the server allows 200 at once).
const STORM_STREAMS_PER_CONNECTION: usize = 100;
/// Threads the server may have gained over the run once it has settled: the blocking pool
/// grows under concurrent reads and shrinks after ten idle seconds.
pub const THREAD_SLACK: u64 = 24;
/// Open files the server may have gained over the run once it has settled.
pub const FD_SLACK: u64 = 16;
/// Resident memory the server may have gained over the run, beyond what its store grew on
/// disk (whose pages it may cache), once it has settled. A tripwire for leaks (per request,
/// per stream, per connection), not a bound on the server's footprint: the allocator keeps
/// part of what peaks of multi-megabyte messages and hundreds of streams took. A
/// 100,000-request run of kv-server settles 190-200 MiB above its start besides its store.
pub const RSS_GROWTH_KIB: u64 = 256 * 1024;
/// How long the server gets to settle after the run: to close connections, retire idle
/// blocking threads (after ten idle seconds) and hand freed memory back to the OS (mimalloc
/// does so a second after the free). Right after a burst the server still holds its peak:
/// 450-500 MiB resident after 100,000 requests, 365-375 MiB three seconds later.
const SETTLE: Duration = Duration::from_secs(15);
/// Anomalies kept word for word, in all...
const MAX_ANOMALIES: usize = 100;
/// ...and of each kind (the trouble without its request); the rest are counted by kind. Once
/// the server is down every request is an anomaly, and the first few tell the story.
const PER_KIND: u64 = 3;
/// Length of a request's description in an anomaly.
const SUMMARY_CHARS: usize = 400;

/// What a fuzz run saw.
#[derive(Debug, Default, Clone)]
pub struct FuzzReport {
    /// Requests sent (a stream, a storm of streams or a raw TCP connection counts as one).
    pub requests: u64,
    /// Requests answered with Ok.
    pub accepted: u64,
    /// Refused requests by gRPC code name (`InvalidArgument`, ...); `Timeout` for no answer,
    /// `RawTcp` for raw TCP garbage (which has no gRPC answer).
    pub refused: BTreeMap<String, u64>,
    /// Refusals by code and message (digits folded to `#`), to hold their wording against
    /// etcd's; [`FuzzReport`]'s `Display` marks the ones etcd does not use.
    pub messages: BTreeMap<String, u64>,
    /// For each entry of `messages`, the index of the first request refused with it.
    pub examples: BTreeMap<String, u64>,
    /// What went wrong, each with the request index that [`describe`] reproduces.
    pub anomalies: Vec<String>,
    /// What was measured of the server (threads, open files, memory before and after).
    pub notes: Vec<String>,
}

impl fmt::Display for FuzzReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} requests: {} accepted, {} refused",
            self.requests,
            self.accepted,
            self.refused.values().sum::<u64>()
        )?;
        for (code, n) in &self.refused {
            writeln!(f, "  {code}: {n}")?;
        }
        writeln!(f, "refusal messages:")?;
        for (message, n) in &self.messages {
            let mark = if is_etcd_wording(message) {
                ""
            } else {
                "   <- not etcd's wording"
            };
            let example = self.examples.get(message).copied().unwrap_or_default();
            writeln!(f, "  {n:>7}  {message} (#{example}){mark}")?;
        }
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        writeln!(f, "{} anomalies", self.anomalies.len())?;
        for a in &self.anomalies {
            writeln!(f, "  {a}")?;
        }
        Ok(())
    }
}

/// Whether a `Code: message` entry of [`FuzzReport::messages`] is worded as etcd 3.5 words it.
fn is_etcd_wording(entry: &str) -> bool {
    const ETCD: &[&str] = &[
        "InvalidArgument: etcdserver: key is not provided",
        "InvalidArgument: etcdserver: key not found",
        "InvalidArgument: etcdserver: value is provided",
        "InvalidArgument: etcdserver: lease is provided",
        "InvalidArgument: etcdserver: too many operations in txn request",
        "InvalidArgument: etcdserver: duplicate key given in txn request",
        "InvalidArgument: etcdserver: request is too large",
        "InvalidArgument: etcdserver: invalid sort option",
        "OutOfRange: etcdserver: mvcc: required revision has been compacted",
        "OutOfRange: etcdserver: mvcc: required revision is a future revision",
        "OutOfRange: etcdserver: too large lease TTL",
        "NotFound: etcdserver: requested lease not found",
        "FailedPrecondition: etcdserver: lease already exists",
        "ResourceExhausted: grpc: received message larger than max (# vs. #)",
        "Timeout: no answer in time",
        "RawTcp: connection of garbage",
    ];
    ETCD.contains(&entry)
        // grpc-go's words for a unary or a stream message that does not decode (tonic's
        // differ).
        || entry.starts_with("Internal: grpc: error unmarshalling request")
        || entry.starts_with("Internal: grpc: failed to unmarshal the received message")
}

/// The request `index` of a run seeded with `seed`, as it was sent (the middle of a very long
/// one left out).
pub fn describe(seed: u64, index: u64) -> String {
    let op = Gen::new(seed, index).op();
    let text = format!("{op:?}");
    const HEAD: usize = 16_000;
    const TAIL: usize = 4_000;
    if text.len() <= HEAD + TAIL {
        return text;
    }
    let mut tail_start = text.len() - TAIL;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{} …({} chars left out)… {}",
        cut(&text, HEAD),
        tail_start - cut(&text, HEAD).len(),
        &text[tail_start..]
    )
}

pub use crate::rng::Rng;

// ---- the sentinel span -------------------------------------------------------------------------

/// Whether a write of `key` (`range_end` empty) or of the range `[key, range_end)` could
/// reach a key starting with [`SENTINEL_PREFIX`]. A `range_end` of `"\0"` means every key from
/// `key` on, as in etcd.
pub fn covers_sentinels(key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return key.starts_with(SENTINEL_PREFIX);
    }
    // [key, end) meets [SENTINEL_PREFIX, SENTINEL_END) iff key < SENTINEL_END and
    // SENTINEL_PREFIX < end (and the range is not empty).
    let to_infinity = range_end == [0];
    key < SENTINEL_END && (to_infinity || (SENTINEL_PREFIX < range_end && key < range_end))
}

/// Makes a write safe for the sentinels: a key starting with [`SENTINEL_PREFIX`] gets a `~`
/// in front, and a range that still reaches the sentinel span then ends at its start.
pub fn shield(key: &mut Vec<u8>, range_end: &mut Vec<u8>) {
    if key.starts_with(SENTINEL_PREFIX) {
        key.insert(0, b'~');
    }
    if covers_sentinels(key, range_end) {
        // The key is below the span (it is not in it, and a range from above cannot reach
        // down), so ending at the span's start keeps the rest of the range.
        *range_end = SENTINEL_PREFIX.to_vec();
    }
}

fn shield_ops(ops: &mut [RequestOp]) {
    for op in ops {
        match &mut op.request {
            Some(Op1::RequestPut(p)) => shield(&mut p.key, &mut Vec::new()),
            Some(Op1::RequestDeleteRange(d)) => shield(&mut d.key, &mut d.range_end),
            Some(Op1::RequestTxn(t)) => shield_txn(t),
            Some(Op1::RequestRange(_)) | None => {}
        }
    }
}

fn shield_txn(t: &mut TxnRequest) {
    shield_ops(&mut t.success);
    shield_ops(&mut t.failure);
}

/// Whether any write of `t`, in either branch at any depth, could reach the sentinels.
pub fn txn_covers_sentinels(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(Op1::RequestPut(p)) => covers_sentinels(&p.key, &[]),
            // An empty key is refused, but counts as the lowest key here.
            Some(Op1::RequestDeleteRange(d)) => covers_sentinels(&d.key, &d.range_end),
            Some(Op1::RequestTxn(t)) => txn_covers_sentinels(t),
            Some(Op1::RequestRange(_)) | None => false,
        })
}

// ---- what is sent ------------------------------------------------------------------------------

/// A unary method a raw body is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
    LeaseGrant,
    LeaseRevoke,
    LeaseTimeToLive,
    LeaseLeases,
    Alarm,
    Status,
    Defragment,
    Hash,
    HashKv,
    Snapshot,
    MoveLeader,
    Downgrade,
}

impl Method {
    /// Every method with its weight among raw bodies (the whole-store hashes are expensive).
    const ALL: [(Method, u64); 17] = [
        (Method::Range, 10),
        (Method::Put, 10),
        (Method::DeleteRange, 8),
        (Method::Txn, 12),
        (Method::Compact, 4),
        (Method::LeaseGrant, 6),
        (Method::LeaseRevoke, 4),
        (Method::LeaseTimeToLive, 4),
        (Method::LeaseLeases, 2),
        (Method::Alarm, 4),
        (Method::Status, 3),
        (Method::Defragment, 3),
        (Method::Hash, 1),
        (Method::HashKv, 1),
        (Method::Snapshot, 3),
        (Method::MoveLeader, 3),
        (Method::Downgrade, 2),
    ];

    fn path(self) -> &'static str {
        match self {
            Method::Range => "/etcdserverpb.KV/Range",
            Method::Put => "/etcdserverpb.KV/Put",
            Method::DeleteRange => "/etcdserverpb.KV/DeleteRange",
            Method::Txn => "/etcdserverpb.KV/Txn",
            Method::Compact => "/etcdserverpb.KV/Compact",
            Method::LeaseGrant => "/etcdserverpb.Lease/LeaseGrant",
            Method::LeaseRevoke => "/etcdserverpb.Lease/LeaseRevoke",
            Method::LeaseTimeToLive => "/etcdserverpb.Lease/LeaseTimeToLive",
            Method::LeaseLeases => "/etcdserverpb.Lease/LeaseLeases",
            Method::Alarm => "/etcdserverpb.Maintenance/Alarm",
            Method::Status => "/etcdserverpb.Maintenance/Status",
            Method::Defragment => "/etcdserverpb.Maintenance/Defragment",
            Method::Hash => "/etcdserverpb.Maintenance/Hash",
            Method::HashKv => "/etcdserverpb.Maintenance/HashKV",
            Method::Snapshot => "/etcdserverpb.Maintenance/Snapshot",
            Method::MoveLeader => "/etcdserverpb.Maintenance/MoveLeader",
            Method::Downgrade => "/etcdserverpb.Maintenance/Downgrade",
        }
    }

    /// Whether `body` may be sent: it must not decode into a write of the sentinels, nor into
    /// a request of a kind the fuzzer never sends.
    fn is_safe(self, body: &[u8]) -> bool {
        match self {
            Method::Put => safe_if_decoded(body, |p: PutRequest| !covers_sentinels(&p.key, &[])),
            Method::DeleteRange => safe_if_decoded(body, |d: DeleteRangeRequest| {
                !covers_sentinels(&d.key, &d.range_end)
            }),
            Method::Txn => safe_if_decoded(body, |t: TxnRequest| !txn_covers_sentinels(&t)),
            Method::Alarm => safe_if_decoded(body, |a: AlarmRequest| {
                a.action != AlarmAction::Activate as i32
            }),
            Method::Compact | Method::Defragment | Method::Snapshot | Method::MoveLeader => {
                // These decode from any well-formed body, so only malformed ones go.
                match self {
                    Method::Compact => CompactionRequest::decode(body).is_err(),
                    Method::MoveLeader => MoveLeaderRequest::decode(body).is_err(),
                    // Empty messages: a body is malformed iff it does not parse as fields.
                    _ => StatusRequest::decode(body).is_err(),
                }
            }
            _ => true,
        }
    }

    /// Whether `answer` decodes as this method's response.
    fn decodes(self, answer: &[u8]) -> Result<(), prost::DecodeError> {
        match self {
            Method::Range => RangeResponse::decode(answer).map(drop),
            Method::Put => PutResponse::decode(answer).map(drop),
            Method::DeleteRange => DeleteRangeResponse::decode(answer).map(drop),
            Method::Txn => TxnResponse::decode(answer).map(drop),
            Method::Compact => CompactionResponse::decode(answer).map(drop),
            Method::LeaseGrant => LeaseGrantResponse::decode(answer).map(drop),
            Method::LeaseRevoke => LeaseRevokeResponse::decode(answer).map(drop),
            Method::LeaseTimeToLive => LeaseTimeToLiveResponse::decode(answer).map(drop),
            Method::LeaseLeases => LeaseLeasesResponse::decode(answer).map(drop),
            Method::Alarm => AlarmResponse::decode(answer).map(drop),
            Method::Status => StatusResponse::decode(answer).map(drop),
            Method::Defragment => DefragmentResponse::decode(answer).map(drop),
            Method::Hash => HashResponse::decode(answer).map(drop),
            Method::HashKv => HashKvResponse::decode(answer).map(drop),
            Method::Snapshot => SnapshotResponse::decode(answer).map(drop),
            Method::MoveLeader => MoveLeaderResponse::decode(answer).map(drop),
            Method::Downgrade => DowngradeResponse::decode(answer).map(drop),
        }
    }
}

/// Whether `body` is safe to send: it does not decode as a `T`, or the `T` it decodes into is
/// `safe`.
fn safe_if_decoded<T: Message + Default>(body: &[u8], safe: impl FnOnce(T) -> bool) -> bool {
    match T::decode(body) {
        Ok(message) => safe(message),
        Err(_) => true,
    }
}

/// The bidirectional stream a raw stream op talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPath {
    Watch,
    KeepAlive,
}

impl StreamPath {
    fn path(self) -> &'static str {
        match self {
            StreamPath::Watch => "/etcdserverpb.Watch/Watch",
            StreamPath::KeepAlive => "/etcdserverpb.Lease/LeaseKeepAlive",
        }
    }
}

/// One fuzz request.
#[derive(Debug)]
enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    LeaseLeases,
    /// Keep-alives of these ids on one stream; `half_close` ends the sending side at once.
    KeepAlive {
        ids: Vec<i64>,
        half_close: bool,
    },
    /// These requests on one watch stream, which is held open for `hold`, then dropped.
    Watch {
        requests: Vec<WatchRequest>,
        hold: Duration,
        half_close: bool,
    },
    /// One stream per create, all open at once (over several connections) for `hold`.
    WatchStorm {
        creates: Vec<WatchCreateRequest>,
        hold: Duration,
    },
    /// A body that need not be a valid message, to a unary method.
    Raw {
        method: Method,
        body: Vec<u8>,
    },
    /// Bodies that need not be valid messages, on a bidirectional stream.
    RawStream {
        path: StreamPath,
        bodies: Vec<Vec<u8>>,
        hold: Duration,
    },
    /// Bytes written to a fresh TCP connection.
    RawTcp(Vec<u8>),
    Status,
    HashKv(i64),
    AlarmGet,
}

impl Op {
    fn kind(&self) -> String {
        match self {
            Op::Range(_) => "Range".into(),
            Op::Put(_) => "Put".into(),
            Op::Delete(_) => "DeleteRange".into(),
            Op::Txn(_) => "Txn".into(),
            Op::LeaseGrant(_) => "LeaseGrant".into(),
            Op::LeaseRevoke(_) => "LeaseRevoke".into(),
            Op::LeaseTimeToLive(_) => "LeaseTimeToLive".into(),
            Op::LeaseLeases => "LeaseLeases".into(),
            Op::KeepAlive { .. } => "LeaseKeepAlive".into(),
            Op::Watch { .. } => "Watch".into(),
            Op::WatchStorm { creates, .. } => format!("WatchStorm({} streams)", creates.len()),
            Op::Raw { method, .. } => format!("Raw({})", method.path()),
            Op::RawStream { path, .. } => format!("RawStream({})", path.path()),
            Op::RawTcp(_) => "RawTcp".into(),
            Op::Status => "Status".into(),
            Op::HashKv(_) => "HashKV".into(),
            Op::AlarmGet => "Alarm(GET)".into(),
        }
    }
}

// ---- generation --------------------------------------------------------------------------------

/// Keys that sit on boundaries of the key space and of the fuzz and sentinel spans.
const EDGE_KEYS: &[&[u8]] = &[
    b"\0",
    b"\0\0",
    b"\x01",
    b"\xff",
    b"\xff\xff\xff\xff",
    b"fuzz",
    b"fuzz/",
    b"fuzz0",
    b"sentinel",
    b"sentinel/",
    b"sentinel0",
    b"sentinel/\xff",
    b"~sentinel/",
    b"a",
    b"z",
];

/// Builds request `index` of a run from `(seed, index)` alone.
struct Gen {
    rng: Rng,
    /// Whether this request may still carry a blob of megabytes (one per request, so a txn of
    /// a hundred ops does not become hundreds of megabytes).
    huge_left: bool,
}

impl Gen {
    fn new(seed: u64, index: u64) -> Gen {
        let mut rng = Rng::new(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        // A second round so that seed and index never cancel out.
        rng = Rng::new(rng.next_u64() ^ index);
        Gen {
            rng,
            huge_left: true,
        }
    }

    /// The request mix, by weight.
    fn op(&mut self) -> Op {
        const MIX: &[(u8, u64)] = &[
            (0, 1700),  // Range
            (1, 1500),  // Put
            (2, 600),   // DeleteRange
            (3, 1500),  // Txn
            (4, 400),   // LeaseGrant
            (5, 250),   // LeaseRevoke
            (6, 250),   // LeaseTimeToLive
            (7, 80),    // LeaseLeases
            (8, 300),   // LeaseKeepAlive stream
            (9, 700),   // Watch stream
            (10, 2),    // storm of watch streams
            (11, 1700), // raw body to a unary method
            (12, 250),  // raw bodies on a stream
            (13, 60),   // raw TCP
            (14, 150),  // Status
            (15, 30),   // HashKV
            (16, 30),   // Alarm GET
        ];
        let total: u64 = MIX.iter().map(|m| m.1).sum();
        let mut roll = self.rng.below(total);
        let mut kind = 0;
        for &(k, w) in MIX {
            if roll < w {
                kind = k;
                break;
            }
            roll -= w;
        }
        let mut op = match kind {
            0 => Op::Range(self.range()),
            1 => Op::Put(self.put()),
            2 => Op::Delete(self.delete()),
            3 => Op::Txn(self.txn()),
            4 => Op::LeaseGrant(LeaseGrantRequest {
                ttl: self.ttl(),
                id: self.lease_id(),
            }),
            5 => Op::LeaseRevoke(LeaseRevokeRequest {
                id: self.lease_id(),
            }),
            6 => Op::LeaseTimeToLive(LeaseTimeToLiveRequest {
                id: self.lease_id(),
                keys: self.rng.chance(1, 2),
            }),
            7 => Op::LeaseLeases,
            8 => Op::KeepAlive {
                ids: (0..1 + self.rng.below(6))
                    .map(|_| self.lease_id())
                    .collect(),
                half_close: self.rng.chance(1, 4),
            },
            9 => self.watch(),
            10 => self.storm(),
            11 => self.raw(),
            12 => self.raw_stream(),
            13 => Op::RawTcp(self.tcp_garbage()),
            14 => Op::Status,
            15 => Op::HashKv(if self.rng.chance(1, 3) {
                // The sentinels' revision on a fresh server; compared in `check_hash_kv`.
                SENTINELS as i64 + 1
            } else {
                self.revision()
            }),
            _ => Op::AlarmGet,
        };
        match &mut op {
            Op::Put(p) => shield(&mut p.key, &mut Vec::new()),
            Op::Delete(d) => shield(&mut d.key, &mut d.range_end),
            Op::Txn(t) => shield_txn(t),
            _ => {}
        }
        op
    }

    fn blob_len(&mut self) -> usize {
        if self.rng.chance(1, 500) {
            return self.huge_len();
        }
        match self.rng.below(100) {
            0..=79 => self.rng.below(33) as usize,
            80..=97 => 33 + self.rng.below(1000) as usize,
            _ => 1024 + self.rng.below(63 * 1024) as usize,
        }
    }

    /// A length around or past the request limits, once per request.
    fn huge_len(&mut self) -> usize {
        if !std::mem::take(&mut self.huge_left) {
            return 4096 + self.rng.below(60_000) as usize;
        }
        match self.rng.below(3) {
            // Straddles --max-request-bytes.
            0 => MAX_REQUEST_BYTES - 512 + self.rng.below(1024) as usize,
            // Between it and the gRPC receive limit.
            1 => MAX_REQUEST_BYTES + self.rng.below(512 * 1024) as usize,
            // Past the gRPC receive limit, up to a few MiB.
            _ => GRPC_RECEIVE_LIMIT - 256 + self.rng.below(2 << 20) as usize,
        }
    }

    fn fill(&mut self, len: usize) -> Vec<u8> {
        if len > 4096 {
            // Random head, cheap tail.
            let mut b = self.rng.bytes(64);
            b.resize(len, self.rng.below(256) as u8);
            b
        } else if self.rng.chance(1, 2) {
            (0..len).map(|_| b' ' + self.rng.below(95) as u8).collect()
        } else {
            self.rng.bytes(len)
        }
    }

    fn blob(&mut self) -> Vec<u8> {
        let len = self.blob_len();
        self.fill(len)
    }

    fn key(&mut self) -> Vec<u8> {
        match self.rng.below(100) {
            0..=44 => format!("fuzz/{}", self.rng.below(KEY_POOL)).into_bytes(),
            45..=54 => {
                let mut k = b"fuzz/".to_vec();
                let n = self.rng.below(24) as usize;
                k.extend(self.fill(n));
                k
            }
            55..=62 => self.blob(),
            63..=66 => Vec::new(),
            67..=74 => self.rng.pick(EDGE_KEYS).to_vec(),
            75..=84 => format!("sentinel/{:03}", self.rng.below(SENTINELS as u64 + 5)).into_bytes(),
            85..=86 => {
                let len = if self.rng.chance(1, 4) {
                    self.huge_len()
                } else {
                    1024 + self.rng.below(60_000) as usize
                };
                let mut k = b"fuzz/big/".to_vec();
                k.extend(self.fill(len));
                k
            }
            _ => format!("fuzz/{}/{}", self.rng.below(16), self.rng.below(KEY_POOL)).into_bytes(),
        }
    }

    fn range_end(&mut self, key: &[u8]) -> Vec<u8> {
        match self.rng.below(100) {
            0..=39 => Vec::new(),
            40..=54 => vec![0],
            55..=69 => prefix_end(key),
            70..=74 => key.to_vec(),
            75..=86 => self.key(),
            87..=91 => vec![0xff],
            _ => {
                let mut end = key.to_vec();
                let n = 1 + self.rng.below(4) as usize;
                end.extend(self.rng.bytes(n));
                end
            }
        }
    }

    /// Revisions: current, past (the sentinels are at 2..=101 on a fresh server), negative,
    /// far future, extremes.
    fn revision(&mut self) -> i64 {
        match self.rng.below(100) {
            0..=39 => 0,
            40..=64 => 1 + self.rng.below(2000) as i64,
            65..=74 => -(1 + self.rng.below(1000) as i64),
            75..=89 => self.rng.pick(&[
                i64::MAX,
                i64::MIN,
                -1,
                1 << 40,
                1 << 62,
                i64::MAX - 1,
                i64::MIN + 1,
            ]),
            _ => self.rng.next_u64() as i64,
        }
    }

    fn wild(&mut self) -> i64 {
        match self.rng.below(10) {
            0 => 0,
            1 => -1,
            2 => i64::MIN,
            3 => i64::MAX,
            4..=6 => self.rng.below(100) as i64,
            7 => -(self.rng.below(100) as i64),
            _ => self.rng.next_u64() as i64,
        }
    }

    /// A value of an enum with `valid` members (`0..valid`), or now and then one outside it.
    fn enum_value(&mut self, valid: i32) -> i32 {
        if self.rng.chance(9, 10) {
            self.rng.below(valid as u64) as i32
        } else {
            self.rng
                .pick(&[valid, valid + 1, -1, i32::MIN, i32::MAX, 1000])
        }
    }

    fn lease_id(&mut self) -> i64 {
        match self.rng.below(10) {
            0..=4 => 1 + self.rng.below(LEASE_POOL) as i64,
            5..=6 => 0,
            _ => self.wild(),
        }
    }

    fn ttl(&mut self) -> i64 {
        match self.rng.below(10) {
            0 => self.rng.pick(&[-1, 0, i64::MIN, -3600]),
            // Short: these expire during the run and revoke the keys attached to them.
            1..=3 => 1 + self.rng.below(5) as i64,
            4..=6 => 10 + self.rng.below(3600) as i64,
            7 => MAX_LEASE_TTL,
            8 => MAX_LEASE_TTL + 1 + self.rng.below(1000) as i64,
            _ => self.rng.pick(&[i64::MAX, 1 << 40, MAX_LEASE_TTL - 1]),
        }
    }

    fn range(&mut self) -> RangeRequest {
        let key = self.key();
        let range_end = self.range_end(&key);
        let filter = |g: &mut Gen| if g.rng.chance(7, 10) { 0 } else { g.revision() };
        RangeRequest {
            range_end,
            key,
            // Mostly limited: a whole-store range grows with the run and costs both sides.
            limit: match self.rng.below(20) {
                0..=6 => 0,
                7..=15 => 1 + self.rng.below(20) as i64,
                _ => self.wild(),
            },
            revision: self.revision(),
            sort_order: self.enum_value(3),
            sort_target: self.enum_value(5),
            serializable: self.rng.chance(1, 3),
            keys_only: self.rng.chance(1, 4),
            count_only: self.rng.chance(1, 6),
            min_mod_revision: filter(self),
            max_mod_revision: filter(self),
            min_create_revision: filter(self),
            max_create_revision: filter(self),
        }
    }

    fn put(&mut self) -> PutRequest {
        let ignore_value = self.rng.chance(1, 10);
        let ignore_lease = self.rng.chance(1, 10);
        PutRequest {
            key: self.key(),
            value: if ignore_value && self.rng.chance(7, 10) {
                Vec::new()
            } else {
                self.blob()
            },
            lease: if (ignore_lease && self.rng.chance(7, 10)) || self.rng.chance(6, 10) {
                0
            } else {
                self.lease_id()
            },
            prev_kv: self.rng.chance(1, 3),
            ignore_value,
            ignore_lease,
        }
    }

    fn delete(&mut self) -> DeleteRangeRequest {
        let key = self.key();
        DeleteRangeRequest {
            range_end: self.range_end(&key),
            key,
            prev_kv: self.rng.chance(1, 3),
        }
    }

    fn compare(&mut self) -> Compare {
        let target = self.enum_value(5);
        let variant = if self.rng.chance(1, 6) {
            self.rng.below(6) as i32
        } else {
            target
        };
        let target_union = match variant {
            0 => Some(TargetUnion::Version(self.wild())),
            1 => Some(TargetUnion::CreateRevision(self.revision())),
            2 => Some(TargetUnion::ModRevision(self.revision())),
            3 => Some(TargetUnion::Value(self.blob())),
            4 => Some(TargetUnion::Lease(self.lease_id())),
            _ => None,
        };
        let key = self.key();
        Compare {
            result: self.enum_value(4),
            target,
            range_end: if self.rng.chance(1, 5) {
                self.range_end(&key)
            } else {
                Vec::new()
            },
            key,
            target_union,
        }
    }

    fn request_op(&mut self, depth: u32) -> RequestOp {
        let request = match self.rng.below(100) {
            0..=29 => Some(Op1::RequestRange(self.range())),
            30..=64 => Some(Op1::RequestPut(self.put())),
            65..=84 => Some(Op1::RequestDeleteRange(self.delete())),
            85..=94 if depth > 0 => Some(Op1::RequestTxn(self.flat_txn(depth - 1))),
            85..=94 => Some(Op1::RequestRange(self.range())),
            // An op naming no request.
            _ => None,
        };
        RequestOp { request }
    }

    /// A branch: a few ops, now and then more than `--max-txn-ops`, or a key written twice.
    fn branch(&mut self, depth: u32) -> Vec<RequestOp> {
        let n = if self.rng.chance(1, 40) {
            MAX_TXN_OPS as u64 - 2 + self.rng.below(80)
        } else {
            self.rng.below(6)
        };
        let mut ops: Vec<RequestOp> = (0..n).map(|_| self.request_op(depth)).collect();
        if self.rng.chance(1, 15)
            && let Some(put) = ops
                .iter()
                .find(|op| matches!(op.request, Some(Op1::RequestPut(_))))
                .cloned()
        {
            ops.push(put);
        }
        ops
    }

    fn flat_txn(&mut self, depth: u32) -> TxnRequest {
        let compares = if self.rng.chance(1, 40) {
            MAX_TXN_OPS as u64 - 2 + self.rng.below(80)
        } else {
            self.rng.below(4)
        };
        TxnRequest {
            compare: (0..compares).map(|_| self.compare()).collect(),
            success: self.branch(depth),
            failure: self.branch(depth),
        }
    }

    /// A txn, one in ten nested deep: around the depth where the server's decoder (and the
    /// log's, one level deeper) gives up, or at a random depth up to 64. The levels rarely
    /// compare, so the innermost ops (often a write) are what the txn does.
    fn txn(&mut self) -> TxnRequest {
        if !self.rng.chance(1, 10) {
            return self.flat_txn(2);
        }
        let depth = if self.rng.chance(3, 5) {
            45 + self.rng.below(8)
        } else {
            1 + self.rng.below(64)
        };
        let mut innermost = Vec::new();
        if self.rng.chance(1, 2) {
            innermost.push(RequestOp {
                request: Some(Op1::RequestPut(PutRequest {
                    key: format!("fuzz/deep/{}", self.rng.below(KEY_POOL)).into_bytes(),
                    value: self.blob(),
                    ..Default::default()
                })),
            });
        }
        for _ in 0..self.rng.below(3) {
            innermost.push(self.request_op(0));
        }
        let mut inner = TxnRequest {
            compare: Vec::new(),
            success: innermost,
            failure: Vec::new(),
        };
        for _ in 0..depth {
            inner = TxnRequest {
                compare: if self.rng.chance(1, 50) {
                    vec![self.compare()]
                } else {
                    Vec::new()
                },
                success: vec![RequestOp {
                    request: Some(Op1::RequestTxn(inner)),
                }],
                failure: if self.rng.chance(1, 20) {
                    vec![self.request_op(0)]
                } else {
                    Vec::new()
                },
            };
        }
        inner
    }

    fn watch_create(&mut self) -> WatchCreateRequest {
        let key = self.key();
        WatchCreateRequest {
            range_end: self.range_end(&key),
            key,
            start_revision: match self.rng.below(10) {
                0..=4 => 0,
                5..=6 => 1 + self.rng.below(200) as i64,
                _ => self.revision(),
            },
            progress_notify: self.rng.chance(1, 4),
            filters: (0..self.rng.below(3)).map(|_| self.enum_value(2)).collect(),
            prev_kv: self.rng.chance(1, 3),
            watch_id: if self.rng.chance(7, 10) {
                0
            } else {
                self.wild()
            },
            fragment: self.rng.chance(1, 4),
        }
    }

    fn watch_request(&mut self) -> WatchRequest {
        let request_union = match self.rng.below(10) {
            0..=5 => Some(RequestUnion::CreateRequest(self.watch_create())),
            6..=7 => Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: if self.rng.chance(1, 2) {
                    self.rng.below(8) as i64
                } else {
                    self.wild()
                },
            })),
            8 => Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
            _ => None,
        };
        WatchRequest { request_union }
    }

    fn watch(&mut self) -> Op {
        let mut requests = Vec::new();
        if self.rng.chance(4, 5) {
            requests.push(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(self.watch_create())),
            });
        }
        // Now and then a crowd of watchers on one stream.
        let more = if self.rng.chance(1, 100) {
            200 + self.rng.below(1800)
        } else {
            self.rng.below(5)
        };
        for _ in 0..more {
            requests.push(self.watch_request());
        }
        Op::Watch {
            requests,
            hold: Duration::from_millis(self.rng.below(50)),
            half_close: self.rng.chance(1, 5),
        }
    }

    fn storm(&mut self) -> Op {
        let n = 200 + self.rng.below(301);
        let creates = (0..n)
            .map(|_| {
                let key = match self.rng.below(3) {
                    0 => b"sentinel/".to_vec(),
                    _ => format!("fuzz/{}", self.rng.below(KEY_POOL)).into_bytes(),
                };
                WatchCreateRequest {
                    range_end: if self.rng.chance(1, 2) {
                        prefix_end(&key)
                    } else {
                        Vec::new()
                    },
                    key,
                    prev_kv: self.rng.chance(1, 2),
                    ..Default::default()
                }
            })
            .collect();
        Op::WatchStorm {
            creates,
            hold: Duration::from_millis(100 + self.rng.below(400)),
        }
    }

    /// A valid encoding of a random request for `method`.
    fn valid_body(&mut self, method: Method) -> Vec<u8> {
        match method {
            Method::Range => self.range().encode_to_vec(),
            Method::Put => self.put().encode_to_vec(),
            Method::DeleteRange => self.delete().encode_to_vec(),
            Method::Txn => self.flat_txn(2).encode_to_vec(),
            Method::Compact => CompactionRequest {
                revision: self.revision(),
                physical: self.rng.chance(1, 2),
            }
            .encode_to_vec(),
            Method::LeaseGrant => LeaseGrantRequest {
                ttl: self.ttl(),
                id: self.lease_id(),
            }
            .encode_to_vec(),
            Method::LeaseRevoke => LeaseRevokeRequest {
                id: self.lease_id(),
            }
            .encode_to_vec(),
            Method::LeaseTimeToLive => LeaseTimeToLiveRequest {
                id: self.lease_id(),
                keys: self.rng.chance(1, 2),
            }
            .encode_to_vec(),
            Method::Alarm => AlarmRequest {
                action: self.enum_value(3),
                member_id: self.rng.next_u64(),
                alarm: self.enum_value(3),
            }
            .encode_to_vec(),
            Method::HashKv => HashKvRequest {
                revision: self.revision(),
            }
            .encode_to_vec(),
            Method::MoveLeader => MoveLeaderRequest {
                target_id: self.rng.next_u64(),
            }
            .encode_to_vec(),
            Method::Downgrade => DowngradeRequest {
                action: self.enum_value(3),
                version: String::from_utf8_lossy(&self.fill(8)).into_owned(),
            }
            .encode_to_vec(),
            Method::LeaseLeases
            | Method::Status
            | Method::Defragment
            | Method::Hash
            | Method::Snapshot => Vec::new(),
        }
    }

    /// A valid encoding of a random message of the stream at `path`.
    fn valid_stream_body(&mut self, path: StreamPath) -> Vec<u8> {
        match path {
            StreamPath::Watch => self.watch_request().encode_to_vec(),
            StreamPath::KeepAlive => LeaseKeepAliveRequest {
                id: self.lease_id(),
            }
            .encode_to_vec(),
        }
    }

    /// Protobuf-shaped junk: fields of any number and wire type (invalid ones included),
    /// overlong varints, lengths that lie, and nesting `depth` deep.
    fn synthetic(&mut self, depth: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..1 + self.rng.below(6) {
            let field = match self.rng.below(10) {
                0..=6 => 1 + self.rng.below(16),
                7 => 0,
                8 => self.rng.pick(&[19_000, 19_999, (1 << 29) - 1, 1 << 29]),
                _ => self.rng.next_u64() >> 35,
            };
            let wire = if self.rng.chance(9, 10) {
                self.rng.pick(&[0, 0, 1, 2, 2, 2, 5, 3, 4])
            } else {
                self.rng.pick(&[6, 7])
            };
            prost::encoding::encode_varint((field << 3) | wire, &mut out);
            match wire {
                0 => {
                    if self.rng.chance(1, 5) {
                        // Eleven bytes of continuation: an overlong varint.
                        out.extend_from_slice(&[0xff; 10]);
                        out.push(0x01);
                    } else {
                        prost::encoding::encode_varint(self.rng.next_u64(), &mut out);
                    }
                }
                1 => {
                    let n = if self.rng.chance(4, 5) {
                        8
                    } else {
                        self.rng.below(8)
                    };
                    out.extend(self.rng.bytes(n as usize));
                }
                5 => {
                    let n = if self.rng.chance(4, 5) {
                        4
                    } else {
                        self.rng.below(4)
                    };
                    out.extend(self.rng.bytes(n as usize));
                }
                2 => {
                    let inner = if depth > 0 && self.rng.chance(1, 2) {
                        self.synthetic(depth - 1)
                    } else {
                        let n = self.rng.below(40) as usize;
                        self.rng.bytes(n)
                    };
                    let claimed = match self.rng.below(10) {
                        0 => inner.len() as u64 + 1 + self.rng.below(100),
                        1 => self
                            .rng
                            .pick(&[u32::MAX as u64, u64::MAX, 1 << 31, 1 << 62]),
                        2 if !inner.is_empty() => self.rng.below(inner.len() as u64),
                        _ => inner.len() as u64,
                    };
                    prost::encoding::encode_varint(claimed, &mut out);
                    out.extend(inner);
                }
                _ => {}
            }
        }
        out
    }

    /// One field nested `depth` times: past the decoders' recursion limit of 100.
    fn nested(&mut self, depth: u32) -> Vec<u8> {
        let mut body = Vec::new();
        let field = self.rng.pick(&[1u64, 2, 3, 4]);
        for _ in 0..depth {
            let mut outer = Vec::with_capacity(body.len() + 6);
            prost::encoding::encode_varint((field << 3) | 2, &mut outer);
            prost::encoding::encode_varint(body.len() as u64, &mut outer);
            outer.extend(body);
            body = outer;
        }
        body
    }

    /// A body for a message whose valid encodings `valid` makes.
    fn garbage(&mut self, mut valid: impl FnMut(&mut Gen) -> Vec<u8>) -> Vec<u8> {
        match self.rng.below(100) {
            0..=24 => {
                let n = self.rng.below(65) as usize;
                self.rng.bytes(n)
            }
            25..=34 => {
                let n = 64 + self.rng.below(4096) as usize;
                self.rng.bytes(n)
            }
            // A valid encoding cut short.
            35..=59 => {
                let mut b = valid(self);
                let at = self.rng.below(b.len() as u64 + 1) as usize;
                b.truncate(at);
                b
            }
            // A valid encoding with a few bytes flipped, inserted or removed.
            60..=79 => {
                let mut b = valid(self);
                for _ in 0..1 + self.rng.below(4) {
                    let at = self.rng.below(b.len() as u64 + 1) as usize;
                    match self.rng.below(3) {
                        0 if at < b.len() => b[at] ^= 1 << self.rng.below(8),
                        1 if at < b.len() => {
                            b.remove(at);
                        }
                        _ => b.insert(at, self.rng.below(256) as u8),
                    }
                }
                b
            }
            80..=92 => self.synthetic(4),
            93..=96 => {
                let depth = 90 + self.rng.below(200) as u32;
                self.nested(depth)
            }
            // Megabytes of junk behind a field header that tells the truth.
            _ => {
                let len = self.huge_len();
                let mut b = Vec::with_capacity(len + 8);
                b.push(0x0a);
                prost::encoding::encode_varint(len as u64, &mut b);
                b.extend(self.fill(len));
                b
            }
        }
    }

    fn raw(&mut self) -> Op {
        let total: u64 = Method::ALL.iter().map(|m| m.1).sum();
        let mut roll = self.rng.below(total);
        let mut method = Method::Range;
        for (m, w) in Method::ALL {
            if roll < w {
                method = m;
                break;
            }
            roll -= w;
        }
        for _ in 0..16 {
            let body = self.garbage(|g| g.valid_body(method));
            if method.is_safe(&body) {
                return Op::Raw { method, body };
            }
        }
        // A truncated varint: undecodable as any message.
        Op::Raw {
            method,
            body: vec![0xff],
        }
    }

    fn raw_stream(&mut self) -> Op {
        let path = if self.rng.chance(2, 3) {
            StreamPath::Watch
        } else {
            StreamPath::KeepAlive
        };
        let bodies = (0..1 + self.rng.below(5))
            .map(|_| {
                if self.rng.chance(1, 3) {
                    self.valid_stream_body(path)
                } else {
                    self.garbage(|g| g.valid_stream_body(path))
                }
            })
            .collect();
        Op::RawStream {
            path,
            bodies,
            hold: Duration::from_millis(self.rng.below(50)),
        }
    }

    fn tcp_garbage(&mut self) -> Vec<u8> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let n = self.rng.below(2048) as usize;
        let tail = self.rng.bytes(n);
        match self.rng.below(4) {
            0 => tail,
            1 => [PREFACE, &tail].concat(),
            // The preface, then an HTTP/2 frame header claiming a huge frame.
            2 => [PREFACE, &[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1], &tail].concat(),
            _ => [
                b"POST /etcdserverpb.KV/Range HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
                    as &[u8],
                &tail,
            ]
            .concat(),
        }
    }
}

// ---- raw bodies over gRPC ----------------------------------------------------------------------

/// Passes message bodies through untouched: what goes out is exactly what the fuzzer made,
/// and what comes back is checked by decoding it as the method's response.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

// ---- running -----------------------------------------------------------------------------------

/// The clients of one connection.
#[derive(Clone)]
struct Clients {
    channel: Channel,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
}

async fn connect(endpoint: &str) -> Result<Clients, String> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    Ok(Clients {
        kv: KvClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
        lease: LeaseClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
        watch: WatchClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
        maintenance: MaintenanceClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
        channel,
    })
}

/// What the run compares against: the sentinels and the server as it was before fuzzing.
struct Baseline {
    /// Sentinel key → (value, the revision it was written at).
    sentinels: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    /// The revision of the first sentinel: what the span held before (an earlier run's
    /// sentinels, deleted by this one) is older and not checked.
    first_revision: i64,
    /// The revision after the sentinels (`R`).
    revision: i64,
    /// `HashKV(R)`.
    hash: u32,
    /// The store's size on disk (Status `db_size`), for the notes.
    db_size: i64,
    rss_kib: u64,
    threads: u64,
    fds: u64,
}

/// An accepted answer: what was wrong with it, and the revision its header carried.
#[derive(Default)]
struct Outcome {
    violations: Vec<String>,
    revision: Option<i64>,
}

impl Outcome {
    fn at(revision: i64, violations: Vec<String>) -> Outcome {
        Outcome {
            violations,
            revision: Some(revision),
        }
    }
}

/// How a request ended, short of an answer.
enum Refusal {
    Status(Status),
    /// Raw TCP garbage: closed by the server, or dropped by the fuzzer after a while.
    RawTcp,
}

impl From<Status> for Refusal {
    fn from(s: Status) -> Refusal {
        Refusal::Status(s)
    }
}

type Answer = Result<Outcome, Refusal>;

/// What one task saw.
#[derive(Default)]
struct Tally {
    requests: u64,
    accepted: u64,
    refused: BTreeMap<String, u64>,
    messages: BTreeMap<String, u64>,
    examples: BTreeMap<String, u64>,
}

impl Tally {
    fn refused(&mut self, index: u64, code: &str, message: &str) {
        *self.refused.entry(code.to_string()).or_default() += 1;
        let entry = format!("{code}: {}", fold_message(message));
        self.examples.entry(entry.clone()).or_insert(index);
        *self.messages.entry(entry).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.accepted += other.accepted;
        for (k, n) in other.refused {
            *self.refused.entry(k).or_default() += n;
        }
        for (k, n) in other.messages {
            *self.messages.entry(k).or_default() += n;
        }
        for (k, i) in other.examples {
            let first = self.examples.entry(k).or_insert(i);
            *first = (*first).min(i);
        }
    }
}

/// The anomalies of a run, kept by the request index they came from (see [`PER_KIND`]).
#[derive(Default)]
struct Anomalies {
    kept: Vec<(u64, String)>,
    /// Every anomaly counted by its kind.
    kinds: BTreeMap<String, u64>,
}

impl Anomalies {
    /// Counts `trouble`, and keeps `text` (the trouble with its request) if few of its kind
    /// were kept.
    fn record(&mut self, index: u64, trouble: &str, text: impl FnOnce() -> String) {
        let seen = self.kinds.entry(fold_message(trouble)).or_default();
        *seen += 1;
        if *seen <= PER_KIND && self.kept.len() < MAX_ANOMALIES {
            self.kept.push((index, text()));
        }
    }

    /// The kept anomalies in request order, then a count of each kind seen more often.
    fn into_lines(mut self) -> Vec<String> {
        self.kept.sort_by_key(|a| a.0);
        let kept = self.kept.len() as u64;
        let mut lines: Vec<String> = self.kept.into_iter().map(|a| a.1).collect();
        let mut shown = 0;
        for (kind, &n) in &self.kinds {
            shown += n.min(PER_KIND);
            if n > PER_KIND {
                lines.push(format!("… {n} in all of: {kind}"));
            }
        }
        if shown > kept {
            lines.push(format!("… only the first {MAX_ANOMALIES} were kept"));
        }
        lines
    }
}

/// A refusal's message as [`FuzzReport::messages`] groups it: digits folded to one `#` per
/// run, long messages cut, and the protobuf decoder's details of a malformed body dropped.
fn fold_message(message: &str) -> String {
    const DECODE: &str = "failed to decode Protobuf message";
    if message.starts_with(DECODE) {
        return format!("{DECODE}: …");
    }
    let mut out = String::new();
    for c in cut(message, 160).chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bytes shown for a human: escaped, long ones cut.
fn show(b: &[u8]) -> String {
    let head = &b[..b.len().min(48)];
    let text: String = head.escape_ascii().to_string();
    if b.len() > head.len() {
        format!("\"{text}\"…({} bytes)", b.len())
    } else {
        format!("\"{text}\"")
    }
}

/// Why a refusal is an anomaly, if it is one.
/// A refusal mentioning a panic is one; so is a failed connection (the server went away) and
/// `Unavailable`, which a single healthy member never answers.
fn judge(status: &Status) -> Option<String> {
    /// Words of a connection that failed under the request (not of a refusal by the server).
    const TRANSPORT: &[&str] = &[
        "connection refused",
        "connection reset",
        "broken pipe",
        "transport error",
        "connection closed",
        "error trying to connect",
        "h2 protocol error",
    ];
    let message = status.message();
    let lower = message.to_ascii_lowercase();
    if lower.contains("panic") {
        return Some(format!(
            "refusal mentions a panic: {:?} {message}",
            status.code()
        ));
    }
    if TRANSPORT.iter().any(|w| lower.contains(w)) {
        return Some(format!("transport failure: {:?} {message}", status.code()));
    }
    if status.code() == tonic::Code::Unavailable {
        return Some(format!("not serving: {message}"));
    }
    None
}

/// Runs the fuzz and the checks; see the module docs.
pub async fn fuzz(endpoint: &str, pid: u32, seed: u64, requests: u64) -> FuzzReport {
    let mut report = FuzzReport::default();
    let (mut control, baseline) = match setup(endpoint, pid, seed).await {
        Ok(found) => found,
        Err(why) => {
            report.anomalies.push(format!("setup failed: {why}"));
            return report;
        }
    };
    let baseline = Arc::new(baseline);
    let (tally, anomalies) = run(endpoint, pid, seed, requests, &baseline).await;
    let mut health = Vec::new();
    check_health(&mut control, &baseline, pid, &mut health, &mut report.notes).await;
    report.requests = tally.requests;
    report.accepted = tally.accepted;
    report.refused = tally.refused;
    report.messages = tally.messages;
    report.examples = tally.examples;
    report.anomalies = anomalies;
    report
        .anomalies
        .extend(health.into_iter().map(|h| format!("after the run: {h}")));
    report
}

/// Writes the sentinels and takes the baseline.
async fn setup(endpoint: &str, pid: u32, seed: u64) -> Result<(Clients, Baseline), String> {
    let mut control = tokio::time::timeout(REQUEST_TIMEOUT, connect(endpoint))
        .await
        .map_err(|_| format!("no connection to {endpoint} in {REQUEST_TIMEOUT:?}"))??;
    // A fresh span, so that every sentinel is at version 1 (a server fuzzed before holds the
    // sentinels of that run).
    let clear = DeleteRangeRequest {
        key: SENTINEL_PREFIX.to_vec(),
        range_end: SENTINEL_END.to_vec(),
        prev_kv: false,
    };
    tokio::time::timeout(REQUEST_TIMEOUT, control.kv.delete_range(clear))
        .await
        .map_err(|_| "clearing the sentinel span timed out".to_string())?
        .map_err(|s| format!("clearing the sentinel span failed: {s}"))?;
    let mut sentinels = BTreeMap::new();
    let mut revision = 0;
    let mut first_revision = 0;
    let mut rng = Rng::new(seed ^ 0x5E47_1E15);
    for i in 0..SENTINELS {
        let key = format!("sentinel/{i:03}").into_bytes();
        // Values of many lengths and all byte values.
        let mut value = format!("sentinel-{i}-{seed:x}-").into_bytes();
        value.extend(rng.bytes(i * 37 % 700));
        let put = PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, control.kv.put(put))
            .await
            .map_err(|_| "a sentinel put timed out".to_string())?
            .map_err(|s| format!("a sentinel put failed: {s}"))?
            .into_inner();
        revision = resp.header.map_or(0, |h| h.revision);
        if first_revision == 0 {
            first_revision = revision;
        }
        sentinels.insert(key, (value, revision));
    }
    let hash = tokio::time::timeout(
        REQUEST_TIMEOUT,
        control.maintenance.hash_kv(HashKvRequest { revision }),
    )
    .await
    .map_err(|_| "HashKV timed out".to_string())?
    .map_err(|s| format!("HashKV failed: {s}"))?
    .into_inner()
    .hash;
    let db_size = tokio::time::timeout(
        REQUEST_TIMEOUT,
        control.maintenance.status(StatusRequest {}),
    )
    .await
    .map_err(|_| "Status timed out".to_string())?
    .map_err(|s| format!("Status failed: {s}"))?
    .into_inner()
    .db_size;
    Ok((
        control,
        Baseline {
            sentinels,
            first_revision,
            revision,
            hash,
            db_size,
            rss_kib: crate::procfs::rss_kib(pid)?,
            threads: threads(pid)?,
            fds: open_fds(pid)?,
        },
    ))
}

/// Runs the requests from [`CONCURRENCY`] tasks; what they saw, and the anomalies.
async fn run(
    endpoint: &str,
    pid: u32,
    seed: u64,
    requests: u64,
    b: &Arc<Baseline>,
) -> (Tally, Vec<String>) {
    let mut total = Tally::default();
    let mut conns = Vec::new();
    for _ in 0..CHANNELS {
        match connect(endpoint).await {
            Ok(c) => conns.push(c),
            Err(why) => return (total, vec![why]),
        }
    }
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let clients = conns[t % CHANNELS].clone();
        let (shared, b) = (shared.clone(), b.clone());
        let endpoint = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut clients = clients;
            let mut last_revision = 0;
            loop {
                let index = shared.next.fetch_add(1, Ordering::Relaxed);
                if index >= requests || shared.gone.load(Ordering::Relaxed) {
                    break;
                }
                let op = Gen::new(seed, index).op();
                let kind = op.kind();
                let limit = match op {
                    Op::WatchStorm { .. } => STORM_TIMEOUT,
                    _ => REQUEST_TIMEOUT,
                };
                let answer =
                    tokio::time::timeout(limit, execute(op, &mut clients, &endpoint, &b)).await;
                tally.requests += 1;
                let mut faults = Vec::new();
                match answer {
                    Ok(Ok(outcome)) => {
                        tally.accepted += 1;
                        faults = outcome.violations;
                        if let Some(rev) = outcome.revision {
                            if rev < last_revision {
                                faults.push(format!(
                                    "revision went back within one client: {rev} after {last_revision}"
                                ));
                            }
                            last_revision = last_revision.max(rev);
                        }
                    }
                    Ok(Err(Refusal::Status(status))) => {
                        tally.refused(index, &format!("{:?}", status.code()), status.message());
                        faults.extend(judge(&status));
                    }
                    Ok(Err(Refusal::RawTcp)) => {
                        tally.refused(index, "RawTcp", "connection of garbage")
                    }
                    Err(_) => {
                        tally.refused(index, "Timeout", "no answer in time");
                        faults.push(format!("no answer in {limit:?}"));
                    }
                }
                if faults.is_empty() {
                    continue;
                }
                let with_request = |trouble: &str| {
                    let request = describe(seed, index);
                    format!(
                        "#{index} {kind}: {trouble}; request: {}",
                        cut(&request, SUMMARY_CHARS)
                    )
                };
                let gone = !alive(pid) && !shared.gone.swap(true, Ordering::Relaxed);
                let mut anomalies = shared.anomalies.lock().unwrap_or_else(|e| e.into_inner());
                for fault in faults {
                    anomalies.record(index, &fault, || with_request(&fault));
                }
                if gone {
                    let exited = format!("the server (pid {pid}) exited");
                    anomalies.record(index, &exited, || {
                        format!("{exited}; #{index} was among the last requests")
                    });
                }
            }
            tally
        }));
    }
    drop(conns);
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(e) => {
                let failed = format!("a fuzz task failed: {e}");
                let mut anomalies = shared.anomalies.lock().unwrap_or_else(|e| e.into_inner());
                anomalies.record(u64::MAX, &failed, || failed.clone());
            }
        }
    }
    let anomalies =
        std::mem::take(&mut *shared.anomalies.lock().unwrap_or_else(|e| e.into_inner()));
    (total, anomalies.into_lines())
}

/// What the fuzz tasks share.
#[derive(Default)]
struct Shared {
    /// The index of the next request to send.
    next: AtomicU64,
    /// Set once the server process is seen gone: the tasks stop.
    gone: AtomicBool,
    /// What went wrong so far.
    anomalies: std::sync::Mutex<Anomalies>,
}

/// Sends one request and checks its answer.
async fn execute(op: Op, c: &mut Clients, endpoint: &str, b: &Baseline) -> Answer {
    match op {
        Op::Range(req) => {
            let resp = c.kv.range(req.clone()).await?.into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut v = Vec::new();
            check_range(&req, &resp, rev, b, &mut v);
            check_header(rev, b, &mut v);
            Ok(Outcome::at(rev, v))
        }
        Op::Put(req) => {
            let resp = c.kv.put(req.clone()).await?.into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut v = Vec::new();
            check_put(&req, &resp, b, &mut v);
            Ok(Outcome::at(rev, v))
        }
        Op::Delete(req) => {
            let resp = c.kv.delete_range(req.clone()).await?.into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut v = Vec::new();
            check_delete(&req, &resp, &mut v);
            check_header(rev, b, &mut v);
            Ok(Outcome::at(rev, v))
        }
        Op::Txn(req) => {
            let resp = c.kv.txn(req.clone()).await?.into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut v = Vec::new();
            check_txn_limits(&req, &mut v);
            check_txn(&req, &resp, rev, b, &mut v);
            check_header(rev, b, &mut v);
            Ok(Outcome::at(rev, v))
        }
        Op::LeaseGrant(req) => {
            let resp = c.lease.lease_grant(req).await?.into_inner();
            let mut v = Vec::new();
            check_grant(&req, &resp, &mut v);
            Ok(Outcome {
                violations: v,
                revision: None,
            })
        }
        Op::LeaseRevoke(req) => {
            c.lease.lease_revoke(req).await?;
            Ok(Outcome::default())
        }
        Op::LeaseTimeToLive(req) => {
            let resp = c.lease.lease_time_to_live(req).await?.into_inner();
            let mut v = Vec::new();
            if resp.id != req.id {
                v.push(format!("answered for lease {} instead", resp.id));
            }
            if !req.keys && !resp.keys.is_empty() {
                v.push("listed keys it was not asked for".into());
            }
            if resp.keys.iter().any(|k| k.starts_with(SENTINEL_PREFIX)) {
                v.push("a sentinel key is attached to a lease".into());
            }
            Ok(Outcome {
                violations: v,
                revision: None,
            })
        }
        Op::LeaseLeases => {
            c.lease.lease_leases(LeaseLeasesRequest {}).await?;
            Ok(Outcome::default())
        }
        Op::KeepAlive { ids, half_close } => keep_alive(c, ids, half_close).await,
        Op::Watch {
            requests,
            hold,
            half_close,
        } => watch(c, requests, hold, half_close, b).await,
        Op::WatchStorm { creates, hold } => storm(endpoint, creates, hold).await,
        Op::Raw { method, body } => raw(c, method, body, b).await,
        Op::RawStream { path, bodies, hold } => raw_stream(c, path, bodies, hold, b).await,
        Op::RawTcp(bytes) => raw_tcp(endpoint, bytes).await,
        Op::Status => {
            let resp = c.maintenance.status(StatusRequest {}).await?.into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            Ok(Outcome::at(rev, Vec::new()))
        }
        Op::HashKv(revision) => {
            let resp = c
                .maintenance
                .hash_kv(HashKvRequest { revision })
                .await?
                .into_inner();
            let mut v = Vec::new();
            check_hash_kv(revision, &resp, b, &mut v);
            Ok(Outcome {
                violations: v,
                revision: None,
            })
        }
        Op::AlarmGet => {
            let resp = c
                .maintenance
                .alarm(AlarmRequest {
                    action: AlarmAction::Get as i32,
                    member_id: 0,
                    alarm: 0,
                })
                .await?
                .into_inner();
            let mut v = Vec::new();
            if !resp.alarms.is_empty() {
                v.push(format!("alarms raised: {:?}", resp.alarms));
            }
            Ok(Outcome {
                violations: v,
                revision: None,
            })
        }
    }
}

async fn keep_alive(c: &mut Clients, ids: Vec<i64>, half_close: bool) -> Answer {
    let (tx, rx) = mpsc::channel(ids.len().max(1));
    for &id in &ids {
        let _ = tx.try_send(LeaseKeepAliveRequest { id });
    }
    let keep = (!half_close).then_some(tx);
    let mut stream = c
        .lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut v = Vec::new();
    for &id in &ids {
        match stream.message().await? {
            Some(resp) if resp.id != id => {
                v.push(format!("keep-alive of {id} answered for {}", resp.id));
            }
            Some(_) => {}
            None => {
                v.push(format!("stream ended before answering {}", ids.len()));
                break;
            }
        }
    }
    drop(keep);
    Ok(Outcome {
        violations: v,
        revision: None,
    })
}

async fn watch(
    c: &mut Clients,
    requests: Vec<WatchRequest>,
    hold: Duration,
    half_close: bool,
    b: &Baseline,
) -> Answer {
    let too_large = requests
        .iter()
        .any(|r| r.encoded_len() > GRPC_RECEIVE_LIMIT);
    let (tx, rx) = mpsc::channel(requests.len().max(1));
    for r in requests {
        let _ = tx.try_send(r);
    }
    let keep = (!half_close).then_some(tx);
    let deadline = Instant::now() + if too_large { STREAM_END_WAIT } else { hold };
    let mut v = Vec::new();
    let ended =
        match tokio::time::timeout_at(deadline, c.watch.watch(ReceiverStream::new(rx))).await {
            Ok(opened) => {
                let mut stream = opened?.into_inner();
                read_until(deadline, &mut stream, |resp| {
                    check_watch_response(&resp, b, &mut v)
                })
                .await?
            }
            // Nothing came back yet: a gRPC server need not answer a stream's opening before it
            // has a message to send (etcd's does not).
            Err(_) => false,
        };
    if too_large {
        v.push(unended(ended, "a message over the gRPC receive limit"));
    }
    drop(keep);
    Ok(Outcome {
        violations: v,
        revision: None,
    })
}

/// Reads `stream` until `deadline`, handing each message to `each`; whether the server ended it.
/// An error status ends the read and is returned.
async fn read_until<T>(
    deadline: Instant,
    stream: &mut tonic::Streaming<T>,
    mut each: impl FnMut(T),
) -> Result<bool, Status> {
    while let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await {
        match message? {
            Some(m) => each(m),
            None => return Ok(true),
        }
    }
    Ok(false)
}

/// What is wrong with a stream that did not end with an error after `what`: etcd's gRPC ends
/// the call with the receive error (ResourceExhausted "grpc: received message larger than
/// max", Internal "grpc: error unmarshalling request"). A server that stops reading instead
/// leaves a larger message's sender blocked by flow control, so the stream, its watchers and
/// its connection stay for good.
fn unended(ended: bool, what: &str) -> String {
    if ended {
        format!("the stream ended without an error after {what}")
    } else {
        format!(
            "the stream stayed open (no error in {STREAM_END_WAIT:?}) after {what}; etcd ends the \
             call with the receive error"
        )
    }
}

/// Opens one stream per create at once, each with its create sent, over fresh connections;
/// waits for every created answer, holds them all for `hold`, then drops them.
async fn storm(endpoint: &str, creates: Vec<WatchCreateRequest>, hold: Duration) -> Answer {
    let mut conns = Vec::new();
    for _ in 0..creates.len().div_ceil(STORM_STREAMS_PER_CONNECTION) {
        conns.push(connect(endpoint).await.map_err(Status::unavailable)?);
    }
    let opening = creates.into_iter().enumerate().map(|(i, create)| {
        let mut client = conns[i / STORM_STREAMS_PER_CONNECTION].watch.clone();
        async move {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            });
            let mut stream = client.watch(ReceiverStream::new(rx)).await?.into_inner();
            loop {
                match stream.message().await? {
                    Some(resp) if resp.created => return Ok((tx, stream)),
                    Some(_) => {}
                    None => return Err(Status::unknown("watch stream ended before created")),
                }
            }
        }
    });
    let opened: Vec<Result<_, Status>> = futures::future::join_all(opening).await;
    tokio::time::sleep(hold).await;
    let mut held = Vec::new();
    for o in opened {
        held.push(o?);
    }
    drop(held);
    Ok(Outcome::default())
}

async fn raw(c: &mut Clients, method: Method, body: Vec<u8>, b: &Baseline) -> Answer {
    // The request as the server decodes it, to check an answer against.
    let decoded = match method {
        Method::Range => RangeRequest::decode(body.as_slice()).ok().map(Op::Range),
        Method::Put => PutRequest::decode(body.as_slice()).ok().map(Op::Put),
        Method::DeleteRange => DeleteRangeRequest::decode(body.as_slice())
            .ok()
            .map(Op::Delete),
        Method::Txn => TxnRequest::decode(body.as_slice()).ok().map(Op::Txn),
        Method::LeaseGrant => LeaseGrantRequest::decode(body.as_slice())
            .ok()
            .map(Op::LeaseGrant),
        _ => None,
    };
    let mut grpc =
        tonic::client::Grpc::new(c.channel.clone()).max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("transport error: {e}")))?;
    let answer = grpc
        .unary(
            tonic::Request::new(body),
            PathAndQuery::from_static(method.path()),
            RawCodec,
        )
        .await?
        .into_inner();
    let mut v = Vec::new();
    if let Err(e) = method.decodes(&answer) {
        v.push(format!("the answer does not decode: {e}"));
        return Ok(Outcome {
            violations: v,
            revision: None,
        });
    }
    match decoded {
        Some(Op::Range(req)) => {
            let resp = RangeResponse::decode(answer.as_slice()).unwrap_or_default();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            check_range(&req, &resp, rev, b, &mut v);
        }
        Some(Op::Put(req)) => {
            let resp = PutResponse::decode(answer.as_slice()).unwrap_or_default();
            check_put(&req, &resp, b, &mut v);
        }
        Some(Op::Delete(req)) => {
            let resp = DeleteRangeResponse::decode(answer.as_slice()).unwrap_or_default();
            check_delete(&req, &resp, &mut v);
        }
        Some(Op::Txn(req)) => {
            let resp = TxnResponse::decode(answer.as_slice()).unwrap_or_default();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            check_txn_limits(&req, &mut v);
            check_txn(&req, &resp, rev, b, &mut v);
        }
        Some(Op::LeaseGrant(req)) => {
            let resp = LeaseGrantResponse::decode(answer.as_slice()).unwrap_or_default();
            check_grant(&req, &resp, &mut v);
        }
        _ => {}
    }
    Ok(Outcome {
        violations: v,
        revision: None,
    })
}

/// Sends `bodies` as raw messages on the bidirectional stream method `path` and reads its
/// answers until the server ends the call (within 10 s): the answers, or the status the call
/// ended with. For regression tests of how a stream ends on bad input.
pub async fn raw_stream_call(
    channel: Channel,
    path: &'static str,
    bodies: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, Status> {
    let (tx, rx) = mpsc::channel(bodies.len().max(1));
    for body in bodies {
        let _ = tx.try_send(body);
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("transport error: {e}")))?;
    let call = async {
        let mut stream = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await?
            .into_inner();
        let mut answers = Vec::new();
        while let Some(answer) = stream.message().await? {
            answers.push(answer);
        }
        Ok(answers)
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), call).await;
    drop(tx);
    ended.map_err(|_| Status::deadline_exceeded("the call did not end within 10 s"))?
}

/// What a raw stream sent when it must end with an error.
const CANNOT_TAKE: &str = "a message that is malformed or over the gRPC receive limit";

async fn raw_stream(
    c: &mut Clients,
    path: StreamPath,
    bodies: Vec<Vec<u8>>,
    hold: Duration,
    b: &Baseline,
) -> Answer {
    // A body the server cannot take must end the stream with an error.
    let refused = bodies.iter().any(|body| {
        body.len() > GRPC_RECEIVE_LIMIT
            || match path {
                StreamPath::Watch => WatchRequest::decode(body.as_slice()).is_err(),
                StreamPath::KeepAlive => LeaseKeepAliveRequest::decode(body.as_slice()).is_err(),
            }
    });
    let (tx, rx) = mpsc::channel(bodies.len().max(1));
    for body in bodies {
        let _ = tx.try_send(body);
    }
    let mut grpc =
        tonic::client::Grpc::new(c.channel.clone()).max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("transport error: {e}")))?;
    let deadline = Instant::now() + if refused { STREAM_END_WAIT } else { hold };
    let opening = grpc.streaming(
        tonic::Request::new(ReceiverStream::new(rx)),
        PathAndQuery::from_static(path.path()),
        RawCodec,
    );
    let mut stream = match tokio::time::timeout_at(deadline, opening).await {
        Ok(opened) => opened?.into_inner(),
        // Nothing came back yet (see `watch`).
        Err(_) if refused => {
            return Ok(Outcome {
                violations: vec![unended(false, CANNOT_TAKE)],
                revision: None,
            });
        }
        Err(_) => return Ok(Outcome::default()),
    };
    let mut v = Vec::new();
    let ended = read_until(deadline, &mut stream, |answer| match path {
        StreamPath::Watch => match WatchResponse::decode(answer.as_slice()) {
            Ok(resp) => check_watch_response(&resp, b, &mut v),
            Err(e) => v.push(format!("a watch answer does not decode: {e}")),
        },
        StreamPath::KeepAlive => {
            if let Err(e) = LeaseKeepAliveResponse::decode(answer.as_slice()) {
                v.push(format!("a keep-alive answer does not decode: {e}"));
            }
        }
    })
    .await?;
    if refused {
        v.push(unended(ended, CANNOT_TAKE));
    }
    drop(tx);
    Ok(Outcome {
        violations: v,
        revision: None,
    })
}

async fn raw_tcp(endpoint: &str, bytes: Vec<u8>) -> Answer {
    let mut conn = tokio::net::TcpStream::connect(endpoint)
        .await
        .map_err(|e| Status::unavailable(format!("error trying to connect: {e}")))?;
    // The server may close before reading it all; either way is fine.
    let _ = conn.write_all(&bytes).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    Err(Refusal::RawTcp)
}

// ---- checks of answers -------------------------------------------------------------------------

/// Whether `key` is in the range a request names (`range_end` empty: the key alone; `"\0"`:
/// every key from `start` on).
fn in_range(key: &[u8], start: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        key == start
    } else if range_end == [0] {
        key >= start
    } else {
        key >= start && key < range_end
    }
}

/// A key-value as the server returns it: a sentinel must be as written.
fn check_kv(kv: &KeyValue, values: bool, b: &Baseline, v: &mut Vec<String>) {
    if !kv.key.starts_with(SENTINEL_PREFIX) || kv.mod_revision < b.first_revision {
        return;
    }
    let Some((value, rev)) = b.sentinels.get(&kv.key[..]) else {
        v.push(format!(
            "a key {} appeared among the sentinels",
            show(&kv.key)
        ));
        return;
    };
    if kv.create_revision != *rev || kv.mod_revision != *rev || kv.version != 1 || kv.lease != 0 {
        v.push(format!(
            "sentinel {} changed: create {} mod {} version {} lease {} (written at {rev})",
            show(&kv.key),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease
        ));
    }
    if values && kv.value != *value {
        v.push(format!(
            "sentinel {} reads back {} instead of {}",
            show(&kv.key),
            show(&kv.value),
            show(value)
        ));
    }
}

fn check_header(rev: i64, b: &Baseline, v: &mut Vec<String>) {
    if rev < b.revision {
        v.push(format!(
            "header revision {rev} is below the sentinels' {}",
            b.revision
        ));
    }
}

/// An accepted Range: etcd would have refused it, or the answer is not what it asked for.
/// `current` is the revision of the answer's header (of the txn's, for a range in a txn).
fn check_range(
    req: &RangeRequest,
    resp: &RangeResponse,
    current: i64,
    b: &Baseline,
    v: &mut Vec<String>,
) {
    if req.key.is_empty() {
        v.push("accepted an empty key".into());
    }
    if !(0..=2).contains(&req.sort_order) || !(0..=4).contains(&req.sort_target) {
        v.push("accepted an invalid sort option".into());
    }
    if req.encoded_len() > GRPC_RECEIVE_LIMIT {
        v.push(format!(
            "accepted {} bytes, over the gRPC limit",
            req.encoded_len()
        ));
    }
    if req.revision > 0 && current > 0 && req.revision > current {
        v.push(format!(
            "accepted future revision {} at {current}",
            req.revision
        ));
    }
    if req.count_only && !resp.kvs.is_empty() {
        v.push("count_only returned key-values".into());
    }
    if req.limit > 0 && resp.kvs.len() as i64 > req.limit {
        v.push(format!(
            "limit {} returned {} key-values",
            req.limit,
            resp.kvs.len()
        ));
    }
    if resp.count < resp.kvs.len() as i64 {
        v.push(format!(
            "count {} below the {} key-values returned",
            resp.count,
            resp.kvs.len()
        ));
    }
    for kv in &resp.kvs {
        if !in_range(&kv.key, &req.key, &req.range_end) {
            v.push(format!(
                "key {} outside the range [{}, {})",
                show(&kv.key),
                show(&req.key),
                show(&req.range_end)
            ));
        }
        if req.keys_only && !kv.value.is_empty() {
            v.push("keys_only returned a value".into());
        }
        if req.revision > 0 && kv.mod_revision > req.revision {
            v.push(format!(
                "a key modified at {} read at revision {}",
                kv.mod_revision, req.revision
            ));
        }
        let filters = [
            (
                req.min_mod_revision,
                kv.mod_revision,
                true,
                "min_mod_revision",
            ),
            (
                req.max_mod_revision,
                kv.mod_revision,
                false,
                "max_mod_revision",
            ),
            (
                req.min_create_revision,
                kv.create_revision,
                true,
                "min_create_revision",
            ),
            (
                req.max_create_revision,
                kv.create_revision,
                false,
                "max_create_revision",
            ),
        ];
        for (bound, value, is_min, name) in filters {
            if bound > 0 && ((is_min && value < bound) || (!is_min && value > bound)) {
                v.push(format!("{name} {bound} let through {value}"));
            }
        }
        check_kv(kv, !req.keys_only, b, v);
    }
    // By key: ascending unless told otherwise (NONE and ASCEND), descending for DESCEND.
    if req.sort_target == 0 && (0..=2).contains(&req.sort_order) {
        let descending = req.sort_order == 2;
        let ordered = resp.kvs.windows(2).all(|w| {
            if descending {
                w[0].key > w[1].key
            } else {
                w[0].key < w[1].key
            }
        });
        if !ordered {
            v.push("key-values out of key order".into());
        }
    }
}

fn check_put(req: &PutRequest, resp: &PutResponse, b: &Baseline, v: &mut Vec<String>) {
    if req.key.is_empty() {
        v.push("accepted an empty key".into());
    }
    if req.encoded_len() > MAX_REQUEST_BYTES {
        v.push(format!(
            "accepted a put of {} bytes, over --max-request-bytes",
            req.encoded_len()
        ));
    }
    if req.ignore_value && !req.value.is_empty() {
        v.push("accepted ignore_value with a value".into());
    }
    if req.ignore_lease && req.lease != 0 {
        v.push("accepted ignore_lease with a lease".into());
    }
    if req.key.starts_with(SENTINEL_PREFIX) {
        v.push("wrote a sentinel (the fuzzer's own fault)".into());
    }
    if !req.prev_kv && resp.prev_kv.is_some() {
        v.push("returned prev_kv unasked".into());
    }
    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
    if rev <= b.revision {
        v.push(format!(
            "a put at revision {rev}, not after the sentinels' {}",
            b.revision
        ));
    }
}

fn check_delete(req: &DeleteRangeRequest, resp: &DeleteRangeResponse, v: &mut Vec<String>) {
    if req.key.is_empty() {
        v.push("accepted an empty key".into());
    }
    if req.prev_kv && resp.prev_kvs.len() as i64 != resp.deleted {
        v.push(format!(
            "deleted {} but returned {} prev_kvs",
            resp.deleted,
            resp.prev_kvs.len()
        ));
    }
    if !req.prev_kv && !resp.prev_kvs.is_empty() {
        v.push("returned prev_kvs unasked".into());
    }
    for kv in &resp.prev_kvs {
        if kv.key.starts_with(SENTINEL_PREFIX) {
            v.push(format!("deleted sentinel {}", show(&kv.key)));
        }
        if !in_range(&kv.key, &req.key, &req.range_end) {
            v.push(format!("deleted {} outside its range", show(&kv.key)));
        }
    }
}

/// An accepted Txn must be within the limits etcd checks before running one.
fn check_txn_limits(req: &TxnRequest, v: &mut Vec<String>) {
    let most = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len());
    if most > MAX_TXN_OPS {
        v.push(format!("accepted {most} ops, over --max-txn-ops"));
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        v.push("accepted a compare of an empty key".into());
    }
    if req.encoded_len() > GRPC_RECEIVE_LIMIT {
        v.push(format!(
            "accepted {} bytes, over the gRPC limit",
            req.encoded_len()
        ));
    }
}

/// An accepted Txn's answer: one response per op of the branch taken, of the op's kind.
fn check_txn(
    req: &TxnRequest,
    resp: &TxnResponse,
    current: i64,
    b: &Baseline,
    v: &mut Vec<String>,
) {
    let branch = if resp.succeeded {
        &req.success
    } else {
        &req.failure
    };
    if branch.len() != resp.responses.len() {
        v.push(format!(
            "{} ops in the branch taken, {} responses",
            branch.len(),
            resp.responses.len()
        ));
        return;
    }
    for (op, answer) in branch.iter().zip(&resp.responses) {
        match (&op.request, &answer.response) {
            (Some(Op1::RequestRange(q)), Some(R1::ResponseRange(a))) => {
                check_range(q, a, current, b, v)
            }
            (Some(Op1::RequestPut(q)), Some(R1::ResponsePut(a))) => {
                if q.key.is_empty() {
                    v.push("accepted a put of an empty key".into());
                }
                if !q.prev_kv && a.prev_kv.is_some() {
                    v.push("returned prev_kv unasked".into());
                }
            }
            (Some(Op1::RequestDeleteRange(q)), Some(R1::ResponseDeleteRange(a))) => {
                check_delete(q, a, v)
            }
            (Some(Op1::RequestTxn(q)), Some(R1::ResponseTxn(a))) => check_txn(q, a, current, b, v),
            (None, _) => v.push("accepted an op naming no request".into()),
            (_, answer) => v.push(format!(
                "an op answered with {}",
                match answer {
                    None => "nothing",
                    Some(R1::ResponseRange(_)) => "a range",
                    Some(R1::ResponsePut(_)) => "a put",
                    Some(R1::ResponseDeleteRange(_)) => "a delete",
                    Some(R1::ResponseTxn(_)) => "a txn",
                }
            )),
        }
    }
}

fn check_grant(req: &LeaseGrantRequest, resp: &LeaseGrantResponse, v: &mut Vec<String>) {
    if req.ttl > MAX_LEASE_TTL {
        v.push(format!("granted TTL {} over etcd's maximum", req.ttl));
    }
    if req.id != 0 && resp.id != req.id {
        v.push(format!("asked for lease {}, granted {}", req.id, resp.id));
    }
    if resp.id == 0 {
        v.push("granted lease 0 (no lease)".into());
    }
    if resp.ttl < 1 || resp.ttl < req.ttl {
        v.push(format!("asked for TTL {}, granted {}", req.ttl, resp.ttl));
    }
}

fn check_hash_kv(revision: i64, resp: &HashKvResponse, b: &Baseline, v: &mut Vec<String>) {
    let current = resp.header.as_ref().map_or(0, |h| h.revision);
    if revision > current {
        v.push(format!("hashed future revision {revision} at {current}"));
    }
    if revision == b.revision && resp.hash != b.hash {
        v.push(format!(
            "HashKV({revision}) is {} instead of {}",
            resp.hash, b.hash
        ));
    }
    if resp.compact_revision > 0 {
        v.push(format!("compacted at {}", resp.compact_revision));
    }
}

fn check_watch_response(resp: &WatchResponse, b: &Baseline, v: &mut Vec<String>) {
    for event in &resp.events {
        let Some(kv) = &event.kv else {
            v.push("an event without a key-value".into());
            continue;
        };
        if kv.key.starts_with(SENTINEL_PREFIX) {
            if event.r#type == EventType::Delete as i32 {
                if kv.mod_revision >= b.first_revision {
                    v.push(format!("sentinel {} deleted", show(&kv.key)));
                }
            } else {
                check_kv(kv, true, b, v);
            }
        }
        if let Some(prev) = &event.prev_kv {
            check_kv(prev, true, b, v);
        }
    }
}

// ---- checks of the server ----------------------------------------------------------------------

/// Whether process `pid` runs: it has a `/proc` entry and is not a zombie (a child that
/// exited stays one until its parent reaps it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        !matches!(state, Some(Some('Z' | 'X')) | None)
    })
}

/// The `Threads:` of `/proc/<pid>/status`.
fn threads(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no Threads"))
}

/// Entries of `/proc/<pid>/fd`.
fn open_fds(pid: u32) -> Result<u64, String> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
        .count() as u64)
}

/// After the run: the server is alive, answers, has its sentinels and `HashKV(R)`, still
/// takes writes, raised no alarm, and its threads, files and memory are back near the start.
async fn check_health(
    c: &mut Clients,
    b: &Baseline,
    pid: u32,
    v: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    if !alive(pid) {
        v.push(format!("the server (pid {pid}) is gone"));
        return;
    }
    let t = REQUEST_TIMEOUT;
    let mut db_size = 0;
    match tokio::time::timeout(t, c.maintenance.status(StatusRequest {})).await {
        Ok(Ok(status)) => db_size = status.into_inner().db_size,
        Ok(Err(s)) => v.push(format!("Status refused: {s}")),
        Err(_) => v.push("Status unanswered".into()),
    }
    let sentinels = RangeRequest {
        key: SENTINEL_PREFIX.to_vec(),
        range_end: SENTINEL_END.to_vec(),
        ..Default::default()
    };
    match tokio::time::timeout(t, c.kv.range(sentinels)).await {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            let found: BTreeMap<&[u8], &KeyValue> =
                resp.kvs.iter().map(|kv| (&kv.key[..], kv)).collect();
            for key in b.sentinels.keys() {
                match found.get(key.as_slice()) {
                    Some(kv) => check_kv(kv, true, b, v),
                    None => v.push(format!("sentinel {} is missing", show(key))),
                }
            }
            if resp.kvs.len() != b.sentinels.len() {
                v.push(format!(
                    "{} keys in the sentinel span, {} written",
                    resp.kvs.len(),
                    b.sentinels.len()
                ));
            }
        }
        Ok(Err(s)) => v.push(format!("reading the sentinels refused: {s}")),
        Err(_) => v.push("reading the sentinels unanswered".into()),
    }
    let hash = HashKvRequest {
        revision: b.revision,
    };
    match tokio::time::timeout(t, c.maintenance.hash_kv(hash)).await {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            if resp.hash != b.hash {
                v.push(format!(
                    "HashKV({}) is {} instead of {}",
                    b.revision, resp.hash, b.hash
                ));
            }
        }
        Ok(Err(s)) => v.push(format!("HashKV refused: {s}")),
        Err(_) => v.push("HashKV unanswered".into()),
    }
    let put = PutRequest {
        key: b"fuzz/after".to_vec(),
        value: b"still writable".to_vec(),
        ..Default::default()
    };
    match tokio::time::timeout(t, c.kv.put(put)).await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => v.push(format!("a write after the run refused: {s}")),
        Err(_) => v.push("a write after the run unanswered".into()),
    }
    let alarms = AlarmRequest {
        action: AlarmAction::Get as i32,
        member_id: 0,
        alarm: 0,
    };
    match tokio::time::timeout(t, c.maintenance.alarm(alarms)).await {
        Ok(Ok(resp)) if resp.get_ref().alarms.is_empty() => {}
        Ok(Ok(resp)) => v.push(format!("alarms raised: {:?}", resp.get_ref().alarms)),
        Ok(Err(s)) => v.push(format!("Alarm(GET) refused: {s}")),
        Err(_) => v.push("Alarm(GET) unanswered".into()),
    }
    // Connections close, idle blocking threads retire and freed memory goes back to the OS
    // in the background: wait until all three are within their limits, for at most SETTLE.
    let store_growth_kib = (db_size - b.db_size).max(0) as u64 / 1024;
    let rss_limit = b.rss_kib + RSS_GROWTH_KIB + store_growth_kib;
    let deadline = Instant::now() + SETTLE;
    let (now_threads, now_fds, rss) = loop {
        let (t, f, r) = match (threads(pid), open_fds(pid), crate::procfs::rss_kib(pid)) {
            (Ok(t), Ok(f), Ok(r)) => (t, f, r),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                v.push(e);
                return;
            }
        };
        let settled = t <= b.threads + THREAD_SLACK && f <= b.fds + FD_SLACK && r <= rss_limit;
        if settled || Instant::now() >= deadline {
            break (t, f, r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if now_threads > b.threads + THREAD_SLACK {
        v.push(format!(
            "{now_threads} threads, {} before the run",
            b.threads
        ));
    }
    if now_fds > b.fds + FD_SLACK {
        v.push(format!("{now_fds} open files, {} before the run", b.fds));
    }
    if rss > rss_limit {
        v.push(format!(
            "resident memory {} MiB, {} MiB before the run (the store grew {} MiB)",
            rss / 1024,
            b.rss_kib / 1024,
            store_growth_kib / 1024
        ));
    }
    notes.push(format!(
        "server before → after the run: {} → {now_threads} threads, {} → {now_fds} open files, \
         {} → {} MiB resident, store {} → {} MiB",
        b.threads,
        b.fds,
        b.rss_kib / 1024,
        rss / 1024,
        b.db_size >> 20,
        db_size >> 20
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_depend_on_seed_and_index_alone() {
        for i in [0, 1, 17, 99_999] {
            assert_eq!(describe(3, i), describe(3, i));
        }
        assert_ne!(describe(3, 5), describe(4, 5));
    }

    /// Every sentinel-span key, and keys just outside it.
    const PROBES_IN: &[&[u8]] = &[
        b"sentinel/",
        b"sentinel/0",
        b"sentinel/099",
        b"sentinel/\xff\xff",
    ];
    const PROBES_OUT: &[&[u8]] = &[b"sentinel", b"sentinel0", b"sentinel.", b"~sentinel/"];

    fn reaches(key: &[u8], end: &[u8]) -> bool {
        PROBES_IN.iter().any(|p| in_range(p, key, end))
    }

    #[test]
    fn covers_sentinels_matches_membership() {
        let mut g = Gen::new(1, 1);
        for _ in 0..50_000 {
            let key = if g.rng.chance(1, 3) {
                g.rng.pick(EDGE_KEYS).to_vec()
            } else {
                g.key()
            };
            let end = g.range_end(&key);
            if reaches(&key, &end) {
                assert!(
                    covers_sentinels(&key, &end),
                    "{} {}",
                    show(&key),
                    show(&end)
                );
            }
        }
        assert!(covers_sentinels(b"a", b"\0"));
        assert!(covers_sentinels(b"a", b"sentinel/1"));
        assert!(!covers_sentinels(b"a", b"sentinel/"));
        assert!(!covers_sentinels(b"sentinel0", b"\0"));
        assert!(!covers_sentinels(b"z", b"a"));
        for p in PROBES_OUT {
            assert!(!covers_sentinels(p, b""));
        }
    }

    #[test]
    fn shield_keeps_every_write_off_the_sentinels() {
        let mut g = Gen::new(2, 2);
        for _ in 0..50_000 {
            let mut key = if g.rng.chance(1, 3) {
                g.rng.pick(EDGE_KEYS).to_vec()
            } else {
                g.key()
            };
            let mut end = g.range_end(&key);
            shield(&mut key, &mut end);
            assert!(!covers_sentinels(&key, &end));
            assert!(!reaches(&key, &end), "{} {}", show(&key), show(&end));
        }
    }

    #[test]
    fn generated_writes_never_reach_the_sentinels() {
        for i in 0..20_000 {
            match Gen::new(9, i).op() {
                Op::Put(p) => assert!(!covers_sentinels(&p.key, &[]), "#{i}"),
                Op::Delete(d) => assert!(!covers_sentinels(&d.key, &d.range_end), "#{i}"),
                Op::Txn(t) => assert!(!txn_covers_sentinels(&t), "#{i}"),
                Op::Raw { method, body } => assert!(method.is_safe(&body), "#{i}"),
                _ => {}
            }
        }
    }

    #[test]
    fn raw_bodies_that_decode_into_forbidden_requests_are_not_sent() {
        let compact = CompactionRequest {
            revision: 5,
            physical: true,
        }
        .encode_to_vec();
        assert!(!Method::Compact.is_safe(&compact));
        assert!(!Method::Defragment.is_safe(&[]));
        assert!(Method::Defragment.is_safe(&[0xff]));
        let activate = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 1,
            alarm: 1,
        }
        .encode_to_vec();
        assert!(!Method::Alarm.is_safe(&activate));
        let put = PutRequest {
            key: b"sentinel/001".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(!Method::Put.is_safe(&put));
        let txn = TxnRequest {
            failure: vec![RequestOp {
                request: Some(Op1::RequestTxn(TxnRequest {
                    success: vec![RequestOp {
                        request: Some(Op1::RequestDeleteRange(DeleteRangeRequest {
                            key: b"a".to_vec(),
                            range_end: vec![0],
                            prev_kv: false,
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(!Method::Txn.is_safe(&txn));
    }

    #[test]
    fn the_mix_has_every_kind() {
        let mut kinds = std::collections::BTreeSet::new();
        for i in 0..20_000 {
            let kind = Gen::new(11, i).op().kind();
            kinds.insert(kind.split('(').next().unwrap_or_default().to_string());
        }
        for k in [
            "Range",
            "Put",
            "DeleteRange",
            "Txn",
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseTimeToLive",
            "LeaseLeases",
            "LeaseKeepAlive",
            "Watch",
            "WatchStorm",
            "Raw",
            "RawStream",
            "RawTcp",
            "Status",
            "HashKV",
            "Alarm",
        ] {
            assert!(kinds.contains(k), "no {k} in {kinds:?}");
        }
    }

    #[test]
    fn anomalies_keep_a_few_of_each_kind_in_request_order_and_count_the_rest() {
        let mut a = Anomalies::default();
        for i in [9, 3, 7, 5, 1] {
            a.record(i, "not serving: tcp connect error", || format!("#{i} down"));
        }
        a.record(4, "sentinel \"sentinel/001\" deleted", || {
            "#4 deleted".into()
        });
        assert_eq!(
            a.into_lines(),
            [
                "#3 down",
                "#4 deleted",
                "#7 down",
                "#9 down",
                "… 5 in all of: not serving: tcp connect error",
            ]
        );
    }

    #[test]
    fn digits_fold_so_messages_group() {
        assert_eq!(
            fold_message("grpc: received message larger than max (3145800 vs. 2097152)"),
            "grpc: received message larger than max (# vs. #)"
        );
        assert!(is_etcd_wording(&format!(
            "ResourceExhausted: {}",
            fold_message("grpc: received message larger than max (3145800 vs. 2097152)")
        )));
    }
}
