//! The fault driver: injects faults into a loopback [`Cluster`] while clients run, the way
//! Jepsen's nemesis does: SIGKILL and restart (leader favoured), SIGSTOP/SIGCONT pauses,
//! partitions, crashes at kv-server's failpoints (mid-snapshot, mid-purge, mid-compaction,
//! mid-write), a slow disk and a full disk. It counts what it injected, and reports as
//! anomalies a member that would not restart or died other than by the fault.
//!
//! It runs on a thread of its own (starting a member blocks until the member is ready) and
//! asks members about leadership through the runtime `handle`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_core::proto::etcdserverpb::{StatusRequest, maintenance_client::MaintenanceClient};
use tokio::runtime::Handle;

use crate::Cluster;
use crate::history::channel;
use crate::rng::Rng;

/// The kinds of fault a scenario draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the leader, restart it after a moment.
    LeaderKill,
    /// SIGSTOP a member (the leader two times in three) for up to 2.5 s.
    Pause,
    /// Cut a minority (holding the leader two times in three) off for up to 2.5 s.
    Partition,
    /// Restart a member with a snapshot failpoint armed; it crashes building or installing
    /// a snapshot.
    SnapshotCrash,
    /// Restart a member with a write-, purge-, apply- or compaction-path failpoint armed.
    CrashPoint,
    /// Make a member's log syncs slow (50-300 ms each) for up to 3 s.
    SlowDisk,
    /// Fill a member's disk: its next log write fails, and it must exit, then restart once
    /// the disk has room, losing nothing.
    DiskFull,
}

/// Snapshot failpoints (kv-server's `failpoint::CrashPoint` names).
const SNAPSHOT_POINTS: [&str; 5] = [
    "snapshot-build-start",
    "snapshot-build-after-sync",
    "snapshot-build-after-serialize",
    "snapshot-install-start",
    "snapshot-install-after-restore",
];

/// Failpoints on the write, purge, apply and compaction paths.
const OTHER_POINTS: [&str; 7] = [
    "wal-append-before-sync",
    "wal-append-after-sync",
    "log-purge-start",
    "log-purge-after-record",
    "compaction-start",
    "compaction-after-apply",
    "apply-start",
];

/// The line kv-server logs when it purges its Raft log behind a snapshot.
const PURGED_LINE: &str = "raft: log purged";

/// The line kv-server prints as a failpoint kills it.
const CRASH_LINE: &str = "failpoint: crash at";

/// Injects faults into a cluster it owns; see the module docs.
pub struct FaultDriver {
    /// The cluster under test.
    pub cluster: Cluster,
    rng: Rng,
    handle: Handle,
    /// What was injected, by name.
    pub counts: BTreeMap<String, u64>,
    /// Members that misbehaved under a fault.
    pub anomalies: Vec<String>,
    /// What was done when, to line an anomaly up with the faults around it.
    pub trace: Vec<(Instant, String)>,
}

impl FaultDriver {
    /// A driver for `cluster`, drawing its choices from `seed`.
    pub fn new(cluster: Cluster, seed: u64, handle: Handle) -> FaultDriver {
        FaultDriver {
            cluster,
            rng: Rng::new(seed),
            handle,
            counts: BTreeMap::new(),
            anomalies: Vec::new(),
            trace: Vec::new(),
        }
    }

    fn count(&mut self, what: &str) {
        *self.counts.entry(what.to_string()).or_default() += 1;
    }

    fn note(&mut self, what: String) {
        self.trace.push((Instant::now(), what));
    }

    /// Sleeps a random time in `lo..hi` milliseconds.
    pub fn nap(&mut self, lo: u64, hi: u64) {
        std::thread::sleep(Duration::from_millis(self.rng.range(lo, hi)));
    }

    /// The member that reports itself leader, asked for up to `within`.
    pub fn leader(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            for i in 0..self.cluster.members.len() {
                let Some(ep) = self.cluster.members[i].proc.as_ref().map(|p| &p.endpoint) else {
                    continue;
                };
                let mut client = MaintenanceClient::new(channel(ep, Duration::from_secs(1)));
                let status = self.handle.block_on(client.status(StatusRequest {}));
                if let Ok(s) = status.map(|s| s.into_inner())
                    && s.leader != 0
                    && s.header.is_some_and(|h| h.member_id == s.leader)
                {
                    return Some(i);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The leader two times in three (when there is one), else a random member.
    fn target(&mut self) -> usize {
        let n = self.cluster.members.len() as u64;
        if self.rng.chance(2, 3)
            && let Some(l) = self.leader(Duration::from_secs(5))
        {
            return l;
        }
        self.rng.below(n) as usize
    }

    /// Starts member `i` again with no failpoint armed; an anomaly if it will not start.
    fn restart(&mut self, i: usize) {
        self.note(format!("restart m{i}"));
        for _ in 0..3 {
            match self.cluster.try_start_member(i) {
                Ok(()) => return,
                Err(e) => {
                    self.anomalies
                        .push(format!("member {i} did not restart: {}", tail(&e, 3000)));
                }
            }
        }
    }

    /// Injects one fault drawn from `faults`.
    pub fn inject_any(&mut self, faults: &[Fault]) {
        let fault = self.rng.pick(faults);
        self.inject(fault);
    }

    /// Injects one fault of kind `fault`.
    pub fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::LeaderKill => self.kill_leader(),
            Fault::Pause => self.pause(),
            Fault::Partition => self.partition(),
            Fault::SnapshotCrash => {
                let point = self.rng.pick(&SNAPSHOT_POINTS);
                self.crash_at(point, "crashes mid-snapshot");
            }
            Fault::CrashPoint => {
                let point = self.rng.pick(&OTHER_POINTS);
                self.crash_at(point, "crashes at a write/purge/compaction failpoint");
            }
            Fault::SlowDisk => self.slow_disk(),
            Fault::DiskFull => self.disk_full(),
        }
    }

    fn kill_leader(&mut self) {
        let Some(l) = self.leader(Duration::from_secs(10)) else {
            self.anomalies
                .push("no leader within 10 s before a leader kill".to_string());
            return;
        };
        self.cluster.kill(l);
        self.note(format!("SIGKILL leader m{l}"));
        self.count("leader kills");
        self.nap(0, 500);
        self.restart(l);
    }

    fn pause(&mut self) {
        let m = self.target();
        let Some(p) = self.cluster.members[m].proc.as_ref() else {
            return;
        };
        p.signal("STOP");
        self.note(format!("SIGSTOP m{m}"));
        self.count("pauses (SIGSTOP)");
        self.nap(300, 2500);
        if let Some(p) = self.cluster.members[m].proc.as_ref() {
            p.signal("CONT");
        }
        self.note(format!("SIGCONT m{m}"));
    }

    fn partition(&mut self) {
        let n = self.cluster.members.len();
        let minority = self.rng.range(1, (n as u64 - 1) / 2 + 1) as usize;
        let mut side = Vec::new();
        if self.rng.chance(2, 3)
            && let Some(l) = self.leader(Duration::from_secs(5))
        {
            side.push(l);
        }
        while side.len() < minority {
            let m = self.rng.below(n as u64) as usize;
            if !side.contains(&m) {
                side.push(m);
            }
        }
        self.cluster.partition(&side);
        self.note(format!("partition {side:?} from the rest"));
        self.count("partitions");
        self.nap(300, 2500);
        self.cluster.heal_all();
        self.note("heal".to_string());
    }

    fn crash_at(&mut self, point: &str, what: &str) {
        let leader = self.leader(Duration::from_secs(5));
        let followers: Vec<usize> = (0..self.cluster.members.len())
            .filter(|&i| Some(i) != leader)
            .collect();
        // Installing a snapshot needs a member sent one; serializing one needs a leader
        // sending one: a follower is kept down until the leader's log has moved past it.
        let (m, lagging) = match point {
            "snapshot-install-start" | "snapshot-install-after-restore" => {
                let f = self.rng.pick(&followers);
                (f, Some(f))
            }
            "snapshot-build-after-serialize" => match leader {
                Some(l) => (l, Some(self.rng.pick(&followers))),
                None => (self.target(), None),
            },
            _ => (self.target(), None),
        };
        // One install per return: its first pass is the one to crash at.
        let nth = if m == lagging.unwrap_or(usize::MAX) {
            1
        } else {
            self.rng.range(1, 3)
        };
        let spec = format!("{point}:{nth}");
        let crash_file = self.cluster.members[m].crash_file.clone();
        std::fs::write(&crash_file, &spec).expect("write crash switch");
        self.note(format!("arm {spec} on m{m}"));
        let mut crashed = false;
        if let Some(f) = lagging {
            let purges = |d: &FaultDriver| {
                leader
                    .and_then(|l| d.cluster.members[l].proc.as_ref())
                    .map_or(0, |p| p.log_text().matches(PURGED_LINE).count())
            };
            let purged_before = purges(self);
            self.cluster.kill(f);
            self.note(format!("SIGKILL m{f}, to come back behind the purged log"));
            // The leader purges (behind the scenario's small --snapshot-count) only while
            // no replication to the member is in flight, so wait until it has.
            let deadline = Instant::now() + Duration::from_secs(20);
            self.nap(1000, 2000);
            while purges(self) <= purged_before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            self.note(format!("restart m{f}"));
            match self.cluster.try_start_member(f) {
                Ok(()) => {}
                Err(e) if f == m && e.contains(CRASH_LINE) => crashed = true,
                Err(e) => self
                    .anomalies
                    .push(format!("member {f} did not restart: {}", tail(&e, 3000))),
            }
        }
        crashed = crashed || self.await_crash(m, &spec, Duration::from_secs(15));
        let _ = std::fs::remove_file(&crash_file);
        self.note(format!("m{m} crashed at {point}: {crashed}"));
        if crashed {
            self.count(what);
            self.count(&format!("crash at {point}"));
        } else {
            self.count(&format!("armed {point}, not reached in 15 s"));
        }
        for i in [Some(m), lagging].into_iter().flatten() {
            let down = self.cluster.members[i]
                .proc
                .as_mut()
                .is_none_or(|p| p.exited());
            if down {
                self.cluster.kill(i);
                self.restart(i);
            }
        }
    }

    /// Waits for member `m` to die at its armed failpoint; true if it did.
    fn await_crash(&mut self, m: usize, spec: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let Some(p) = self.cluster.members[m].proc.as_mut() else {
                return false;
            };
            if p.exited() {
                let log = p.log_text();
                if log.contains(CRASH_LINE) {
                    return true;
                }
                self.anomalies.push(format!(
                    "member {m} armed with {spec} exited otherwise: {}",
                    tail(&log, 3000)
                ));
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn slow_disk(&mut self) {
        let m = self.target();
        let ms = self.rng.range(50, 300);
        let file = self.cluster.members[m].sync_delay_file.clone();
        std::fs::write(&file, ms.to_string()).expect("write slow-disk switch");
        self.note(format!("slow disk ({ms} ms a sync) on m{m}"));
        self.count("slow-disk spells");
        self.nap(500, 3000);
        let _ = std::fs::remove_file(&file);
    }

    fn disk_full(&mut self) {
        let m = self.target();
        let file = self.cluster.members[m].disk_full_file.clone();
        std::fs::write(&file, b"").expect("write disk-full switch");
        self.note(format!("full disk on m{m}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline && !exited {
            std::thread::sleep(Duration::from_millis(20));
            exited = self.cluster.members[m]
                .proc
                .as_mut()
                .is_none_or(|p| p.exited());
        }
        let _ = std::fs::remove_file(&file);
        if exited {
            self.count("disk-full exits");
        } else {
            self.count("disk full, no write in 10 s");
        }
        self.cluster.kill(m);
        self.restart(m);
    }

    /// Ends every fault: heals partitions, resumes paused members, clears the disk switches,
    /// restarts members that are down, and waits for a leader.
    pub fn settle(&mut self) {
        self.cluster.heal_all();
        for i in 0..self.cluster.members.len() {
            let m = &mut self.cluster.members[i];
            let _ = std::fs::remove_file(&m.sync_delay_file);
            let _ = std::fs::remove_file(&m.disk_full_file);
            let down = match m.proc.as_mut() {
                Some(p) => {
                    p.signal("CONT");
                    p.exited()
                }
                None => true,
            };
            if down {
                if let Some(p) = m.proc.as_ref() {
                    let log = p.log_text();
                    if !log.contains(CRASH_LINE) {
                        self.anomalies.push(format!(
                            "member {i} had died by itself: {}",
                            tail(&log, 3000)
                        ));
                    }
                }
                self.cluster.kill(i);
                self.restart(i);
            }
        }
        if self.leader(Duration::from_secs(30)).is_none() {
            self.anomalies
                .push("no leader within 30 s of the faults ending".to_string());
        }
    }
}

/// The last `n` bytes of `text` (at a char boundary), for anomaly reports.
pub fn tail(text: &str, n: usize) -> &str {
    let mut from = text.len().saturating_sub(n);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    &text[from..]
}
