//! The Raft log's write-ahead log: append-only, preallocated segment files, as etcd's WAL.
//!
//! # Why not a B-tree
//! The log was a redb table. Each durable append then cost a B-tree commit: about nine page
//! writes and an fdatasync that had to flush file metadata too (~240 µs here), all while the
//! Raft core waited, so followers got new entries only after the leader's own sync. A
//! preallocated file takes one write per batch and a data-only fdatasync (~150 µs), and the
//! write reaches the page cache at once, so entries are readable (and replicated) while the
//! sync runs on its own thread ([`Wal::sync_later`]), which folds every append that queued
//! meanwhile into one fdatasync.
//!
//! # Layout
//! `wal/<seq>.wal`, `seq` 16 hex digits. A segment starts with [`MAGIC`] and its seq, then
//! records: `len u32 | crc32c u32 | kind u8 | body`, `len` counting kind and body, the CRC
//! covering them. A zero `len` ends the data: segments are preallocated (`fallocate`, so
//! they read as zeros) to [`SEGMENT_BYTES`]; a batch that does not fit starts a new segment.
//! Every segment opens with the vote, committed id and purge point current at its creation,
//! so deleting older segments never loses them.
//!
//! # Recovery
//! Segments are read in order; entries are indexed (segment, offset) and read back with
//! `pread`, never kept in memory. In the last segment the first short, zero or corrupt record
//! is the end: it can only be a write that was never acknowledged. Bytes after it are zeroed
//! before anything new is written, so a torn batch can never reappear behind newer records.
//! A bad record in any other segment is corruption and opening fails.
//!
//! # Failures
//! A failed write or sync poisons the log: every later call fails, as etcd stops on a WAL
//! error, since after a failed fsync the kernel may have dropped the dirty pages.

use crate::failpoint::{self, CrashPoint};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use kv_core::checksum::Crc32c;

use crate::metrics::{DISK_BUCKETS, Histogram};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"KVWAL\0\0\x01";
/// Magic plus the segment's seq.
const HEADER_BYTES: u64 = 16;
/// Size segments are preallocated to (etcd's is 64 MiB too).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Frame before the kind byte: length and CRC.
const FRAME_BYTES: usize = 8;
/// No record is larger (a corrupt length must not make recovery allocate gigabytes).
const MAX_RECORD: usize = 1 << 30;
/// Zeroing the tail after recovery works in chunks of this size.
const ZERO_CHUNK: usize = 1 << 20;
/// Zeros written ahead of the records at a time (see [`Wal::write`]).
const ZERO_AHEAD: usize = 256 << 10;
/// The zeros both [`Wal::write`] and recovery's tail clearing write from.
static ZEROS: [u8; ZERO_AHEAD] = [0; ZERO_AHEAD];
/// Most bytes [`Wal::visit_entries`] reads with one `pread` (a longer record is read whole).
const READ_SPAN: u64 = 1 << 20;

const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const PURGED: u8 = 4;
const TRUNCATED: u8 = 5;

/// A log entry, encoded by the caller: `(index, bytes)`.
pub type RawEntry = (u64, Vec<u8>);

/// Called by the sync thread once the writes before [`Wal::sync_later`] are durable.
pub type SyncDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// A request to the sync thread: the file to sync and who to tell.
type SyncJob = (Arc<File>, SyncDone);

/// Where one live entry is.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    offset: u64,
    len: u32,
}

/// The log's state: what recovery rebuilds and writes maintain.
#[derive(Debug, Default)]
struct State {
    /// Open segments by seq; the last is the one written.
    segments: BTreeMap<u64, Arc<File>>,
    /// Where the next record goes in the last segment.
    write_at: u64,
    /// In the last segment, everything before this offset has been written (records or
    /// zeros); after it the preallocated range may never have been written.
    zeroed_to: u64,
    /// Live entries, consecutive, the first at `first_index`.
    slots: VecDeque<Slot>,
    first_index: u64,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    /// Last purged index and the caller's encoding of it.
    purged: Option<(u64, Vec<u8>)>,
}

impl State {
    fn last_index(&self) -> Option<u64> {
        (!self.slots.is_empty()).then(|| self.first_index + self.slots.len() as u64 - 1)
    }

    /// Drops every entry at or after `from`.
    fn truncate(&mut self, from: u64) {
        if from <= self.first_index {
            self.slots.clear();
        } else {
            let keep = (from - self.first_index) as usize;
            self.slots.truncate(keep);
        }
    }

    /// Drops every entry at or before `upto`.
    fn purge(&mut self, upto: u64) {
        while !self.slots.is_empty() && self.first_index <= upto {
            self.slots.pop_front();
            self.first_index += 1;
        }
        if self.slots.is_empty() {
            self.first_index = self.first_index.max(upto + 1);
        }
    }

    /// Indexes an entry found or written at `slot`. An index at or below the last one
    /// replaces it and what follows (an overwrite after a conflict); a gap is corruption.
    fn index(&mut self, index: u64, slot: Slot) -> io::Result<()> {
        if self.purged.as_ref().is_some_and(|(upto, _)| index <= *upto) {
            return Ok(());
        }
        check_follows(self.last_index(), index)?;
        // An index at or below the last replaces the suffix from there; one past the last
        // truncates nothing.
        self.truncate(index);
        if self.slots.is_empty() {
            self.first_index = index;
        }
        self.slots.push_back(slot);
        Ok(())
    }

    /// Whether entries with these indexes, in this order, may follow the log.
    fn accepts(&self, indexes: impl Iterator<Item = u64>) -> io::Result<()> {
        let mut last = self.last_index();
        for index in indexes {
            check_follows(last, index)?;
            last = Some(index);
        }
        Ok(())
    }

    fn active(&self) -> io::Result<(u64, Arc<File>)> {
        self.segments
            .last_key_value()
            .map(|(seq, f)| (*seq, f.clone()))
            .ok_or_else(|| corrupt("no segment".into()))
    }
}

/// An entry may follow `last` if it is at most one past it (lower replaces a suffix).
fn check_follows(last: Option<u64>, index: u64) -> io::Result<()> {
    match last {
        Some(last) if index > last + 1 => Err(corrupt(format!(
            "entry {index} cannot follow entry {last}: the log would have a gap"
        ))),
        _ => Ok(()),
    }
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("raft wal: {msg}"))
}

/// Appends one framed record to `buf`.
fn frame(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut crc = Crc32c::new();
    crc.update(&[kind]);
    for p in parts {
        crc.update(p);
    }
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finish().to_le_bytes());
    buf.push(kind);
    for p in parts {
        buf.extend_from_slice(p);
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes an exclusive lock on `dir/lock`, held as long as the returned file is open.
fn lock_dir(dir: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))?;
    // SAFETY: the descriptor is owned by `file` and open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "raft wal: {} is in use by another process ({e})",
                dir.display()
            ),
        ));
    }
    Ok(file)
}

/// Reserves `len` bytes of disk for `file`, so appends inside them need no metadata sync.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: the descriptor is owned by `file` and open for the duration of the call.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        // A file system without fallocate still works, with slower syncs.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// One record read back: its kind, body, and where the next one starts.
struct Record {
    kind: u8,
    body: Vec<u8>,
    next: u64,
}

/// Reads the record at `at`; `None` at the end of the data (zeros, a short or corrupt frame).
fn read_record(file: &File, at: u64, file_len: u64) -> Option<Record> {
    if at + FRAME_BYTES as u64 + 1 > file_len {
        return None;
    }
    let mut head = [0u8; FRAME_BYTES];
    file.read_exact_at(&mut head, at).ok()?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_RECORD || at + (FRAME_BYTES + len) as u64 > file_len {
        return None;
    }
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, at + FRAME_BYTES as u64)
        .ok()?;
    let mut check = Crc32c::new();
    check.update(&data);
    if check.finish() != crc {
        return None;
    }
    let kind = data[0];
    data.remove(0);
    Some(Record {
        kind,
        body: data,
        next: at + (FRAME_BYTES + len) as u64,
    })
}

fn u64_at(body: &[u8]) -> io::Result<u64> {
    body.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| corrupt("short record".into()))
}

/// The Raft log's write-ahead log (see the module docs). Shared by the log store and its
/// readers.
pub struct Wal {
    /// Held while open: two processes writing one log would destroy it.
    _lock: File,
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<State>,
    failed: AtomicBool,
    sync_jobs: Mutex<Option<mpsc::Sender<SyncJob>>>,
    /// How long each fsync of an append or a vote took (`etcd_disk_wal_fsync_duration_seconds`).
    fsyncs: Arc<Histogram>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.dir).finish()
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, recovering it as the module docs say.
    /// Blocking.
    pub fn open(dir: &Path) -> io::Result<Arc<Self>> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// [`Wal::open`] with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".wal")
                && stem.len() == 16
                && let Ok(seq) = u64::from_str_radix(stem, 16)
            {
                seqs.push(seq);
            } else if name.ends_with(".wal.tmp") {
                // A segment whose creation was cut short: never part of the log.
                std::fs::remove_file(dir.join(name.as_ref()))?;
            }
        }
        seqs.sort_unstable();
        let mut state = State::default();
        for (i, seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            Self::replay(dir, *seq, last, &mut state)?;
        }
        let wal = Arc::new(Self {
            _lock: lock,
            dir: dir.to_path_buf(),
            segment_bytes,
            state: Mutex::new(state),
            failed: AtomicBool::new(false),
            sync_jobs: Mutex::new(None),
            fsyncs: Arc::new(Histogram::new(DISK_BUCKETS)),
        });
        if seqs.is_empty() {
            let mut state = wal.lock();
            wal.start_segment(&mut state, 0)?;
        }
        wal.start_sync_thread()?;
        Ok(wal)
    }

    /// Reads segment `seq` into `state`; for the last segment also sets where writing goes
    /// on and clears whatever lies after the last good record.
    fn replay(dir: &Path, seq: u64, last: bool, state: &mut State) -> io::Result<()> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let file_len = file.metadata()?.len();
        let mut head = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| corrupt(format!("{} has no header", path.display())))?;
        if &head[..8] != MAGIC || head[8..] != seq.to_le_bytes() {
            return Err(corrupt(format!("{} has a bad header", path.display())));
        }
        let mut at = HEADER_BYTES;
        while let Some(rec) = read_record(&file, at, file_len) {
            match rec.kind {
                ENTRY => {
                    let index = u64_at(&rec.body)?;
                    let slot = Slot {
                        seq,
                        offset: at,
                        len: (rec.next - at) as u32,
                    };
                    state.index(index, slot)?;
                }
                VOTE => state.vote = Some(rec.body),
                COMMITTED => state.committed = Some(rec.body),
                PURGED => {
                    let upto = u64_at(&rec.body)?;
                    state.purge(upto);
                    state.purged = Some((upto, rec.body[8..].to_vec()));
                }
                TRUNCATED => state.truncate(u64_at(&rec.body)?),
                other => {
                    return Err(corrupt(format!(
                        "{} holds a record of unknown kind {other} at {at}",
                        path.display()
                    )));
                }
            }
            at = rec.next;
        }
        if last {
            zero_tail(&file, at, file_len)?;
            state.write_at = at;
            state.zeroed_to = at;
        } else if at + FRAME_BYTES as u64 <= file_len && !is_zero_at(&file, at)? {
            return Err(corrupt(format!(
                "{} is corrupt at offset {at}, and later segments follow",
                path.display()
            )));
        }
        state.segments.insert(seq, Arc::new(file));
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "raft wal: an earlier write or sync failed; the log is read-only",
            ));
        }
        Ok(())
    }

    /// Marks the log failed when `res` is an error, and passes it on.
    fn poison_on<T>(&self, res: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &res {
            tracing::error!("raft wal: {e}; refusing further writes");
            self.failed.store(true, Ordering::Release);
        }
        res
    }

    /// Creates segment `seq` (made under a temporary name, so a crash never leaves half a
    /// segment), opening with the current vote, committed id and purge point, and makes it
    /// the one written.
    fn start_segment(&self, state: &mut State, seq: u64) -> io::Result<()> {
        let tmp = self.dir.join(format!("{seq:016x}.wal.tmp"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        preallocate(&file, self.segment_bytes)?;
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&seq.to_le_bytes());
        if let Some(v) = &state.vote {
            frame(&mut buf, VOTE, &[v]);
        }
        if let Some(c) = &state.committed {
            frame(&mut buf, COMMITTED, &[c]);
        }
        if let Some((upto, bytes)) = &state.purged {
            frame(&mut buf, PURGED, &[&upto.to_le_bytes(), bytes]);
        }
        file.write_all_at(&buf, 0)?;
        file.sync_all()?;
        std::fs::rename(&tmp, segment_path(&self.dir, seq))?;
        sync_dir(&self.dir)?;
        state.segments.insert(seq, Arc::new(file));
        state.write_at = buf.len() as u64;
        state.zeroed_to = state.write_at;
        Ok(())
    }

    /// Writes `buf` (framed records) at the end of the log, starting a new segment first if
    /// it does not fit (after syncing the old one, so no unsynced write is left behind in
    /// it). Returns the segment written and where `buf` starts in it.
    ///
    /// Also keeps [`ZERO_AHEAD`] bytes of zeros written ahead of the records. A preallocated
    /// range that was never written is an "unwritten" extent to ext4 (and XFS): the first
    /// write into each page of it changes the file's extent map, and the next fdatasync then
    /// writes that metadata too, synchronously, before the flush. Records of a few hundred
    /// bytes met a fresh page every dozen syncs. Measured here (`pwrite` of 320 bytes then
    /// `fdatasync`, 6,000 times): p90 186-194 µs and p99 550-640 µs into a fresh
    /// preallocation, p90 140-156 µs and p99 208-251 µs with zeros written ahead. The zeros
    /// are written with a sync's records, so each range is converted once, by one sync.
    fn write(&self, state: &mut State, buf: &[u8]) -> io::Result<(u64, Arc<File>, u64)> {
        failpoint::disk_full()?;
        let (seq, file) = state.active()?;
        if state.write_at + buf.len() as u64 > self.segment_bytes
            && state.write_at > HEADER_BYTES + 1024
        {
            file.sync_data()?;
            self.start_segment(state, seq + 1)?;
        }
        let (seq, file) = state.active()?;
        let at = state.write_at;
        file.write_all_at(buf, at)?;
        state.write_at += buf.len() as u64;
        let from = state.write_at.max(state.zeroed_to);
        if from < self.segment_bytes && from - state.write_at < ZERO_AHEAD as u64 / 2 {
            let len = (ZERO_AHEAD as u64).min(self.segment_bytes - from);
            write_zeros(&file, from, len)?;
            state.zeroed_to = from + len;
        }
        Ok((seq, file, at))
    }

    /// Appends `entries` (consecutive, or overwriting a suffix) and, if given, the committed
    /// id. They are readable when this returns, durable only after a sync: hand the returned
    /// file to [`Wal::sync_later`]. Blocking (a page-cache write; a new segment now and then).
    pub fn append(
        &self,
        entries: &[RawEntry],
        committed: Option<Vec<u8>>,
    ) -> io::Result<Arc<File>> {
        self.check()?;
        let mut buf =
            Vec::with_capacity(entries.iter().map(|(_, b)| b.len() + 24).sum::<usize>() + 64);
        let mut offsets = Vec::with_capacity(entries.len());
        if let Some(c) = &committed {
            frame(&mut buf, COMMITTED, &[c]);
        }
        for (index, bytes) in entries {
            let start = buf.len();
            frame(&mut buf, ENTRY, &[&index.to_le_bytes(), bytes]);
            offsets.push((start as u64, (buf.len() - start) as u32));
        }
        let mut state = self.lock();
        // Checked before writing: a record on disk that recovery would reject must never be
        // written.
        state.accepts(entries.iter().map(|(i, _)| *i))?;
        let res = self.write(&mut state, &buf);
        let (seq, file, at) = self.poison_on(res)?;
        if let Some(c) = committed {
            state.committed = Some(c);
        }
        for ((index, _), (offset, len)) in entries.iter().zip(offsets) {
            let slot = Slot {
                seq,
                offset: at + offset,
                len,
            };
            state.index(*index, slot)?;
        }
        Ok(file)
    }

    /// Calls `done` once everything written to `file` so far is durable. Syncs run on one
    /// thread; appends that queue while it syncs share its next fdatasync.
    pub fn sync_later(&self, file: Arc<File>, done: SyncDone) {
        let sender = self
            .sync_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match sender {
            Some(tx) => {
                if let Err(mpsc::SendError((_, done))) = tx.send((file, done)) {
                    done(Err(io::Error::other("raft wal: closed")));
                }
            }
            None => done(Err(io::Error::other("raft wal: closed"))),
        }
    }

    /// Syncs `file`'s data, recording how long it took.
    fn timed_sync(&self, file: &File) -> io::Result<()> {
        let start = std::time::Instant::now();
        let result = file.sync_data();
        self.fsyncs.observe(start.elapsed());
        result
    }

    /// The fsync latencies of this log.
    pub fn fsyncs(&self) -> Arc<Histogram> {
        self.fsyncs.clone()
    }

    fn start_sync_thread(self: &Arc<Self>) -> io::Result<()> {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        let wal = Arc::downgrade(self);
        let fsyncs = self.fsyncs.clone();
        std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter());
                    let mut result = Ok(());
                    let mut synced: Vec<*const File> = Vec::new();
                    for (file, _) in &jobs {
                        let key = Arc::as_ptr(file);
                        if result.is_ok() && !synced.contains(&key) {
                            failpoint::sync_delay();
                            failpoint::crash(CrashPoint::WalAppendBeforeSync);
                            let start = std::time::Instant::now();
                            result = file.sync_data();
                            fsyncs.observe(start.elapsed());
                            synced.push(key);
                        }
                    }
                    if result.is_ok() {
                        failpoint::crash(CrashPoint::WalAppendAfterSync);
                    }
                    if let (Err(e), Some(wal)) = (&result, wal.upgrade()) {
                        let _ = wal.poison_on::<()>(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                    for (_, done) in jobs {
                        done(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                        });
                    }
                }
            })?;
        *self.sync_jobs.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(())
    }

    /// Writes `buf` and syncs it before returning. Blocking.
    fn write_durable(&self, state: &mut State, buf: &[u8]) -> io::Result<()> {
        let res = self.write(state, buf).and_then(|(_, file, _)| {
            failpoint::sync_delay();
            self.timed_sync(&file)
        });
        self.poison_on(res)
    }

    /// Stores the vote durably. Blocking.
    pub fn save_vote(&self, vote: &[u8], committed: Option<Vec<u8>>) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        if let Some(c) = &committed {
            frame(&mut buf, COMMITTED, &[c]);
        }
        frame(&mut buf, VOTE, &[vote]);
        let mut state = self.lock();
        self.write_durable(&mut state, &buf)?;
        state.vote = Some(vote.to_vec());
        if committed.is_some() {
            state.committed = committed;
        }
        Ok(())
    }

    /// Stores the committed id durably. Blocking.
    pub fn save_committed(&self, committed: Vec<u8>) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        frame(&mut buf, COMMITTED, &[&committed]);
        let mut state = self.lock();
        self.write_durable(&mut state, &buf)?;
        state.committed = Some(committed);
        Ok(())
    }

    /// Drops every entry at or after `from`, durably. Blocking.
    pub fn truncate(&self, from: u64) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        frame(&mut buf, TRUNCATED, &[&from.to_le_bytes()]);
        let mut state = self.lock();
        self.write_durable(&mut state, &buf)?;
        state.truncate(from);
        Ok(())
    }

    /// Drops every entry at or before `upto` (its id encoded as `bytes`), durably, then
    /// deletes the segments that hold nothing live. Blocking.
    pub fn purge(&self, upto: u64, bytes: Vec<u8>) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        frame(&mut buf, PURGED, &[&upto.to_le_bytes(), &bytes]);
        let mut state = self.lock();
        self.write_durable(&mut state, &buf)?;
        failpoint::crash(CrashPoint::LogPurgeAfterRecord);
        state.purge(upto);
        state.purged = Some((upto, bytes));
        // Every segment opens with the purge point current then, and this one's record is in
        // the active segment: segments older than the first live entry's are not needed.
        let (active, _) = state.active()?;
        let keep_from = state.slots.front().map_or(active, |s| s.seq);
        let doomed: Vec<u64> = state.segments.range(..keep_from).map(|(s, _)| *s).collect();
        for seq in &doomed {
            state.segments.remove(seq);
            let res = std::fs::remove_file(segment_path(&self.dir, *seq));
            self.poison_on(res)?;
        }
        if !doomed.is_empty() {
            let res = sync_dir(&self.dir);
            self.poison_on(res)?;
        }
        Ok(())
    }

    /// The entries with index in `[from, to)` that exist, in order. Blocking (`pread`s that
    /// the page cache normally answers).
    pub fn entries(&self, from: u64, to: u64) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.visit_entries(from, to, |body| {
            out.push(body.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `visit` with each entry with index in `[from, to)` that exists, in order.
    /// Records that lie next to each other in a segment (a batch, or batches appended one
    /// after another) are read with one `pread` per [`READ_SPAN`] bytes. One `pread` per
    /// entry cost applying a batch of a thousand writes a thousand syscalls.
    pub fn visit_entries(
        &self,
        from: u64,
        to: u64,
        mut visit: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let picks: Vec<(Arc<File>, Slot)> = {
            let state = self.lock();
            let Some(last) = state.last_index() else {
                return Ok(());
            };
            let from = from.max(state.first_index);
            let to = to.min(last + 1);
            if from >= to {
                return Ok(());
            }
            let start = (from - state.first_index) as usize;
            let end = (to - state.first_index) as usize;
            let mut picks = Vec::with_capacity(end - start);
            for slot in state.slots.range(start..end) {
                let file = state
                    .segments
                    .get(&slot.seq)
                    .ok_or_else(|| corrupt(format!("segment {:016x} is gone", slot.seq)))?;
                picks.push((file.clone(), *slot));
            }
            picks
        };
        // Only the caller's bytes are visited: they follow the frame, the kind and the index.
        let skip = FRAME_BYTES + 1 + 8;
        let mut span = Vec::new();
        let mut rest = picks.as_slice();
        while let Some((file, first)) = rest.first() {
            let mut end = first.offset + u64::from(first.len);
            let mut count = 1;
            for (_, next) in &rest[1..] {
                if next.seq != first.seq
                    || next.offset != end
                    || end - first.offset + u64::from(next.len) > READ_SPAN
                {
                    break;
                }
                end += u64::from(next.len);
                count += 1;
            }
            span.resize((end - first.offset) as usize, 0);
            file.read_exact_at(&mut span, first.offset)?;
            for (_, slot) in &rest[..count] {
                let at = (slot.offset - first.offset) as usize;
                let body = span
                    .get(at + skip..at + slot.len as usize)
                    .ok_or_else(|| corrupt(format!("entry record of {} bytes", slot.len)))?;
                visit(body)?;
            }
            rest = &rest[count..];
        }
        Ok(())
    }

    /// The stored vote.
    pub fn vote(&self) -> Option<Vec<u8>> {
        self.lock().vote.clone()
    }

    /// The stored committed id.
    pub fn committed(&self) -> Option<Vec<u8>> {
        self.lock().committed.clone()
    }

    /// The last purged index and its encoded id.
    pub fn purged(&self) -> Option<(u64, Vec<u8>)> {
        self.lock().purged.clone()
    }

    /// The index of the last entry.
    pub fn last_index(&self) -> Option<u64> {
        self.lock().last_index()
    }

    /// Stops the sync thread once it has finished what is queued. Later syncs fail.
    pub fn close(&self) {
        self.sync_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Whether the bytes at `at` start with a zero length (the clean end of a segment).
fn is_zero_at(file: &File, at: u64) -> io::Result<bool> {
    let mut head = [0u8; 4];
    file.read_exact_at(&mut head, at)?;
    Ok(head == [0; 4])
}

/// Writes `len` zero bytes at `at`, from [`ZEROS`].
fn write_zeros(file: &File, mut at: u64, len: u64) -> io::Result<()> {
    let end = at + len;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Zeroes whatever non-zero bytes lie in `[from, len)`, then syncs if it wrote any.
fn zero_tail(file: &File, from: u64, len: u64) -> io::Result<()> {
    let mut chunk = vec![0u8; ZERO_CHUNK];
    let mut at = from;
    let mut wrote = false;
    while at < len {
        let n = ZERO_CHUNK.min((len - at) as usize);
        file.read_exact_at(&mut chunk[..n], at)?;
        if chunk[..n].iter().any(|b| *b != 0) {
            write_zeros(file, at, n as u64)?;
            wrote = true;
        }
        at += n as u64;
    }
    if wrote {
        tracing::warn!("raft wal: cleared an unfinished write after offset {from}");
        file.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, tag: &str) -> RawEntry {
        (index, format!("{tag}-{index}").into_bytes())
    }

    fn batch(from: u64, to: u64, tag: &str) -> Vec<RawEntry> {
        (from..to).map(|i| entry(i, tag)).collect()
    }

    /// Appends and waits for the sync thread to report the batch durable.
    fn append_synced(wal: &Wal, entries: &[RawEntry]) {
        let file = wal.append(entries, None).unwrap();
        let (tx, rx) = mpsc::channel();
        wal.sync_later(
            file,
            Box::new(move |res| {
                let _ = tx.send(res.is_ok());
            }),
        );
        assert!(rx.recv().unwrap(), "sync failed");
    }

    fn all(wal: &Wal) -> Vec<String> {
        wal.entries(0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|b| String::from_utf8(b).unwrap())
            .collect()
    }

    fn expected(from: u64, to: u64, tag: &str) -> Vec<String> {
        (from..to).map(|i| format!("{tag}-{i}")).collect()
    }

    #[test]
    fn entries_vote_and_committed_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            append_synced(&wal, &batch(1, 50, "a"));
            append_synced(&wal, &batch(50, 101, "a"));
            wal.save_vote(b"vote-1", Some(b"c-1".to_vec())).unwrap();
            assert_eq!(wal.entries(10, 13).unwrap().len(), 3);
        }
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(all(&wal), expected(1, 101, "a"));
        assert_eq!(wal.last_index(), Some(100));
        assert_eq!(wal.vote().as_deref(), Some(&b"vote-1"[..]));
        assert_eq!(wal.committed().as_deref(), Some(&b"c-1"[..]));
    }

    #[test]
    fn reads_come_back_whole_across_gaps_segments_and_span_limits() {
        // Entries of 0.3 MiB, so a run of them outgrows one read span; 3 MiB segments, so the
        // log rolls twice; a truncated suffix replaced in the same segment, so a record there
        // does not follow the one before it.
        let body = |index: u64, tag: &str| {
            let mut b = format!("{tag}-{index}-").into_bytes();
            b.resize(300 << 10, index as u8);
            b
        };
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open_with(dir.path(), 3 << 20).unwrap();
        let mut model = std::collections::BTreeMap::new();
        for (from, to, tag) in [
            (1, 9, "a"),
            (9, 15, "a"),
            (12, 14, "b"),
            (14, 20, "c"),
            (20, 21, "d"),
        ] {
            if model.contains_key(&from) {
                wal.truncate(from).unwrap();
                model.split_off(&from);
            }
            let entries: Vec<RawEntry> = (from..to).map(|i| (i, body(i, tag))).collect();
            append_synced(&wal, &entries);
            model.extend(entries);
        }
        assert_eq!(wal.lock().segments.len(), 3);
        for (from, to) in [(0, u64::MAX), (1, 2), (3, 12), (11, 13), (13, 21), (20, 99)] {
            let want: Vec<Vec<u8>> = model.range(from..to).map(|(_, b)| b.clone()).collect();
            let got = wal.entries(from, to).unwrap();
            assert_eq!(got.len(), want.len(), "[{from}, {to})");
            assert!(got == want, "[{from}, {to}) came back different");
        }
    }

    #[test]
    fn zeros_stay_written_ahead_of_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 1 << 20;
        let wal = Wal::open_with(dir.path(), segment).unwrap();
        let margin = |wal: &Wal| {
            let state = wal.lock();
            (state.write_at, state.zeroed_to)
        };
        let (start, zeroed) = margin(&wal);
        assert_eq!(zeroed, start, "nothing is zeroed before the first write");
        let mut index = 1;
        // Small batches, then batches bigger than the margin, until the segment rolls.
        for size in [100usize, 300, 5_000, 200_000, 300_000, 300_000, 300_000] {
            append_synced(&wal, &[(index, vec![7u8; size])]);
            index += 1;
            let (write_at, zeroed_to) = margin(&wal);
            assert!(
                zeroed_to <= segment,
                "zeros past the preallocation: {zeroed_to}"
            );
            assert!(
                zeroed_to - write_at >= (ZERO_AHEAD as u64 / 2).min(segment - write_at),
                "after a {size}-byte entry: records end at {write_at}, zeros at {zeroed_to}"
            );
            // What lies ahead reads as the end of the log.
            let file = wal.lock().active().unwrap().1;
            assert!(is_zero_at(&file, write_at).unwrap());
        }
        assert!(wal.lock().segments.len() > 1, "the log rolled");
        drop(wal);
        let wal = Wal::open_with(dir.path(), segment).unwrap();
        assert_eq!(wal.entries(0, u64::MAX).unwrap().len(), index as usize - 1);
        let (write_at, zeroed_to) = margin(&wal);
        assert_eq!(
            zeroed_to, write_at,
            "reopening starts from the records' end"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let end = {
            let wal = Wal::open(dir.path()).unwrap();
            append_synced(&wal, &batch(1, 11, "a"));
            wal.lock().write_at
        };
        // What a crash mid-batch can leave: a record whose bytes only partly reached the disk,
        // and behind it a later record of the same batch that reached it whole.
        let path = segment_path(dir.path(), 0);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let mut torn = Vec::new();
        frame(&mut torn, ENTRY, &[&11u64.to_le_bytes(), b"a-11"]);
        let last = torn.len() - 1;
        torn[last] ^= 0xff;
        let mut whole = Vec::new();
        frame(&mut whole, ENTRY, &[&12u64.to_le_bytes(), b"a-12"]);
        file.write_all_at(&torn, end).unwrap();
        file.write_all_at(&whole, end + torn.len() as u64).unwrap();
        drop(file);

        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(
            all(&wal),
            expected(1, 11, "a"),
            "the torn record ends the log"
        );
        // Rewriting entry 11 must not let the stale entry 12 join the log on the next open.
        append_synced(&wal, &[(11, b"b-11".to_vec())]);
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        let mut want = expected(1, 11, "a");
        want.push("b-11".into());
        assert_eq!(all(&wal), want);
    }

    #[test]
    fn segments_roll_and_purging_deletes_the_ones_no_longer_needed() {
        let dir = tempfile::tempdir().unwrap();
        let small = 8 << 10;
        {
            let wal = Wal::open_with(dir.path(), small).unwrap();
            wal.save_vote(b"vote-1", None).unwrap();
            for from in (1..2001).step_by(20) {
                append_synced(&wal, &batch(from, from + 20, "a"));
            }
            let segments = wal.lock().segments.len();
            assert!(segments > 5, "only {segments} segments");
            wal.purge(1500, b"p-1500".to_vec()).unwrap();
            let left = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some("wal".as_ref()))
                .count();
            assert!(left < segments / 2, "{left} of {segments} segments left");
            assert_eq!(all(&wal), expected(1501, 2001, "a"));
        }
        let wal = Wal::open_with(dir.path(), small).unwrap();
        assert_eq!(all(&wal), expected(1501, 2001, "a"));
        // The segment the vote was written to is gone; newer segments carried it over.
        assert_eq!(wal.vote().as_deref(), Some(&b"vote-1"[..]));
        assert_eq!(wal.purged(), Some((1500, b"p-1500".to_vec())));
        // Purging past the end leaves an empty log that continues after the purge point.
        wal.purge(3000, b"p-3000".to_vec()).unwrap();
        assert!(all(&wal).is_empty());
        append_synced(&wal, &batch(3001, 3005, "b"));
        drop(wal);
        let wal = Wal::open_with(dir.path(), small).unwrap();
        assert_eq!(all(&wal), expected(3001, 3005, "b"));
    }

    #[test]
    fn a_log_opens_once_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(wal);
        Wal::open(dir.path()).unwrap();
    }

    #[test]
    fn a_truncated_suffix_is_replaced_by_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            append_synced(&wal, &batch(1, 11, "a"));
            wal.truncate(6).unwrap();
            assert_eq!(all(&wal), expected(1, 6, "a"));
            append_synced(&wal, &batch(6, 9, "b"));
        }
        let wal = Wal::open(dir.path()).unwrap();
        let mut want = expected(1, 6, "a");
        want.extend(expected(6, 9, "b"));
        assert_eq!(all(&wal), want);
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open_with(dir.path(), 4 << 10).unwrap();
            for from in (1..401).step_by(20) {
                append_synced(&wal, &batch(from, from + 20, "a"));
            }
        }
        let path = segment_path(dir.path(), 0);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // Inside the first entry's body.
        file.write_all_at(b"X", HEADER_BYTES + FRAME_BYTES as u64 + 10)
            .unwrap();
        drop(file);
        let err = Wal::open_with(dir.path(), 4 << 10).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn a_batch_that_would_leave_a_gap_is_refused_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        append_synced(&wal, &batch(1, 4, "a"));
        assert!(wal.append(&[entry(6, "a")], None).is_err());
        assert!(wal.append(&[entry(4, "a"), entry(6, "a")], None).is_err());
        append_synced(&wal, &batch(4, 6, "a"));
        drop(wal);
        // Nothing of the refused batches was written.
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(all(&wal), expected(1, 6, "a"));
    }
}
