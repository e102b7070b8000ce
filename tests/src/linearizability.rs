//! Linearizability checker for the key-value histories the fault-injection tests record.
//!
//! Keys are independent registers, so the history is split per key and each sub-history is
//! checked alone, in two passes:
//! 1. A scan for reads that no order explains: a value never written, read before its only
//!    write was sent, or overwritten by an acknowledged change that began after that write
//!    returned and returned before the read began. Cheap, and the usual anomaly of a faulty
//!    store, a stale read, gets a precise reason.
//! 2. Wing & Gong's search with Lowe's memoization, as in porcupine: the call and return
//!    entries of the ops with a known outcome form one time-ordered doubly linked list; the
//!    search linearizes an op whose call precedes the first return entry left, lifts its
//!    entries out, and backtracks on reaching a return entry (an op that had to take effect by
//!    then). Explored nodes (linearized ops, state) prune revisits. At equal timestamps calls
//!    sort before returns: an op sent at the instant another was answered counts as concurrent
//!    with it, the lenient choice, since such clocks cannot order the two.
//!
//! An op with an unknown outcome has no return entry: it may take effect once, at any time
//! after its call, or never, so the search succeeds as soon as every known op is linearized.
//! Such ops stay candidates forever, which makes a plain search exponential, so it explores
//! only linearizations with the fewest unknown ops, each as late as possible (exchange
//! arguments show a linearizable history has one that follows these rules):
//! - an unknown op is applied only if it changes the state, no known candidate would make the
//!   same change, and the next op needs it (would fail, or end elsewhere, without it);
//! - values that no read or compare names are one anonymous value, and unknown ops with the
//!   same (anonymized) call are interchangeable: only the earliest unused one is a candidate;
//! - a node with the known ops and state of an explored one and a superset of its unknown ops
//!   is pruned: it has fewer choices left;
//! - a value with one writer is never overwritten while a known op that must read it waits.
//!
//! Unknown gets are dropped. Only nodes reached by a known op are memoized: the rules above
//! look at the op before, which is then a known one.

use std::collections::{BTreeMap, HashMap, HashSet};

/// What a client asked of one key. Values are u64 ids, unique per write within a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Call {
    /// Set the key to `value`.
    Put {
        /// The value written.
        value: u64,
    },
    /// Read the key.
    Get,
    /// Delete the key.
    Delete,
    /// Set the key to `value` if it holds `expect` (None: if it is absent).
    Cas {
        /// The value required, None for an absent key.
        expect: Option<u64>,
        /// The value written when the compare holds.
        value: u64,
    },
}

/// What the client observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A put that was acknowledged.
    Written,
    /// A get's result: the value, or None when the key was absent.
    Read(Option<u64>),
    /// A delete's result: whether it deleted a key (etcd's `deleted` count > 0).
    Deleted(bool),
    /// A CAS (etcd txn: compare value == expect (or key absent when None), then put) result.
    Swapped(bool),
    /// No answer: the call may have taken effect once, at any time after `call`, or never.
    Unknown,
}

/// One client request on one key, as the harness recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The key operated on; each key is checked separately.
    pub key: Vec<u8>,
    /// What was asked.
    pub call: Call,
    /// What was observed.
    pub outcome: Outcome,
    /// When the request was sent, in nanoseconds since a common origin.
    pub invoked: u64,
    /// When the answer arrived; None when the outcome is unknown (ignored then). A known
    /// outcome without one is taken as answered at the end of the history.
    pub returned: Option<u64>,
    /// Which client sent it, for the report.
    pub client: usize,
    /// Which member it was sent to (an index of the client's endpoint list), for the report.
    pub member: usize,
    /// The revision in the answer's header (0 with no answer), for the report: a stale read
    /// answered at a revision below a write it missed means a member's state lagged.
    pub revision: i64,
}

/// A key whose sub-history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// The key.
    pub key: Vec<u8>,
    /// Human readable: the op that could not be linearized, with its outcome, times and why.
    pub reason: String,
}

/// The verdict on a whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Distinct keys checked.
    pub keys: usize,
    /// Operations in the history.
    pub operations: usize,
    /// Operations among them with an unknown outcome.
    pub unknown: usize,
    /// The keys found not linearizable, in key order.
    pub anomalies: Vec<Anomaly>,
    /// The keys whose search ran out of steps, in key order: neither proven nor refuted.
    pub undecided: Vec<Vec<u8>>,
}

/// Checks every key's sub-history separately; `max_steps` bounds the search per key (a key
/// whose search exceeds it is reported undecided, not as an anomaly).
pub fn check(history: &[Operation], max_steps: u64) -> Report {
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let unknown = history.iter().filter(|o| o.outcome == Outcome::Unknown);
    let mut report = Report {
        keys: by_key.len(),
        operations: history.len(),
        unknown: unknown.count(),
        ..Report::default()
    };
    for (key, ops) in by_key {
        let verdict = match impossible_read(&ops) {
            Some(reason) => Verdict::Anomaly(reason),
            None => Search::new(&ops).run(max_steps),
        };
        match verdict {
            Verdict::Linearizable => {}
            Verdict::Anomaly(reason) => report.anomalies.push(Anomaly {
                key: key.to_vec(),
                reason,
            }),
            Verdict::Undecided => report.undecided.push(key.to_vec()),
        }
    }
    report
}

/// The register: the key's value, None while absent.
type State = Option<u64>;

/// The state after `call` observed as `outcome` from `state`, None if impossible there.
fn step(call: Call, outcome: Outcome, state: State) -> Option<State> {
    match (call, outcome) {
        (_, Outcome::Unknown) => Some(effect(call, state)),
        (Call::Put { value }, Outcome::Written) => Some(Some(value)),
        (Call::Get, Outcome::Read(seen)) => (seen == state).then_some(state),
        (Call::Delete, Outcome::Deleted(deleted)) => (deleted == state.is_some()).then_some(None),
        (Call::Cas { expect, value }, Outcome::Swapped(swapped)) => {
            (swapped == (state == expect)).then_some(if swapped { Some(value) } else { state })
        }
        _ => None,
    }
}

/// The state after `call` from `state`, whatever it answered.
fn effect(call: Call, state: State) -> State {
    match call {
        Call::Put { value } => Some(value),
        Call::Get => state,
        Call::Delete => None,
        Call::Cas { expect, value } => Some(value).filter(|_| state == expect).or(state),
    }
}

/// The value an op must find to succeed: a get's non-empty result, a successful CAS's expect.
fn needs(call: Call, outcome: Outcome) -> Option<u64> {
    match (call, outcome) {
        (Call::Get, Outcome::Read(v)) | (Call::Cas { expect: v, .. }, Outcome::Swapped(true)) => v,
        _ => None,
    }
}

/// The value `call` writes (if it takes effect and, for a CAS, its compare holds).
fn written(call: Call) -> Option<u64> {
    match call {
        Call::Put { value } | Call::Cas { value, .. } => Some(value),
        Call::Get | Call::Delete => None,
    }
}

/// When `op` may take effect: from its call to its return (the end when unknown). A return
/// before the call is a caller bug; release builds take the interval between the two.
fn interval(op: &Operation) -> (u64, u64) {
    let known = op.outcome != Outcome::Unknown;
    let returned = op.returned.filter(|_| known).unwrap_or(u64::MAX);
    debug_assert!(returned >= op.invoked, "returned before invoked: {op:?}");
    (op.invoked.min(returned), op.invoked.max(returned))
}

fn describe(op: &Operation) -> String {
    let (client, member) = (op.client, op.member);
    let (call, outcome, invoked) = (op.call, op.outcome, op.invoked);
    let returned = match op.returned.filter(|_| outcome != Outcome::Unknown) {
        Some(returned) => format!("returned {returned} ns at revision {}", op.revision),
        None => "no answer".to_string(),
    };
    format!(
        "client {client} {call:?} -> {outcome:?} (to member {member}, invoked {invoked} ns, \
         {returned})"
    )
}

/// The first read of `ops` (one key) that no order of them explains, and why.
fn impossible_read(ops: &[&Operation]) -> Option<String> {
    let mut writers: HashMap<u64, Vec<&Operation>> = HashMap::new();
    let mut changes = Vec::new();
    for &o in ops {
        if let Some(v) = written(o.call).filter(|_| o.outcome != Outcome::Swapped(false)) {
            writers.entry(v).or_default().push(o);
        }
        if matches!(
            o.outcome,
            Outcome::Written | Outcome::Swapped(true) | Outcome::Deleted(true)
        ) {
            changes.push(o);
        }
    }
    // Acknowledged changes by call time; from each on, the one that returned first.
    changes.sort_by_key(|o| interval(o).0);
    let mut first_done = changes.clone();
    for i in (1..first_done.len()).rev() {
        if interval(first_done[i]).1 < interval(first_done[i - 1]).1 {
            first_done[i - 1] = first_done[i];
        }
    }
    for &read in ops.iter().filter(|o| o.outcome != Outcome::Unknown) {
        let Some(v) = needs(read.call, read.outcome) else {
            continue;
        };
        let (begun, done) = interval(read);
        let why = match writers.get(&v).map(Vec::as_slice) {
            None => format!("no op wrote {v}"),
            Some([w]) if done < interval(w).0 => {
                format!("its only writer was sent later: {}", describe(w))
            }
            Some([w]) if w.outcome != Outcome::Unknown => {
                let after = changes.partition_point(|o| interval(o).0 <= interval(w).1);
                match first_done.get(after) {
                    Some(o) if interval(o).1 < begun => {
                        format!(
                            "{} wrote {v}, then {} overwrote it",
                            describe(w),
                            describe(o)
                        )
                    }
                    _ => continue,
                }
            }
            _ => continue,
        };
        return Some(format!("{} cannot be linearized: {why}", describe(read)));
    }
    None
}

enum Verdict {
    Linearizable,
    Anomaly(String),
    Undecided,
}

/// One op of a key's sub-history, values anonymized (see the module doc).
struct Op<'a> {
    call: Call,
    outcome: Outcome,
    invoked: u64,
    /// Its unknown-op class; None for a known op.
    class: Option<usize>,
    /// Its bit in the known or the unknown ops' bitset.
    slot: usize,
    src: &'a Operation,
}

/// A known op's call or return entry: (time, is the return, op). Sorting puts calls first
/// at equal times.
type Entry = (u64, bool, usize);

/// After the last entry; the head sentinel is index `entries.len()`.
const NIL: usize = usize::MAX;

/// Where the search resumes among a node's candidates.
#[derive(Clone, Copy)]
enum Cursor {
    /// At this entry: a known op's call, else the first return entry (or NIL).
    Known(usize),
    /// At this position among the unknown-op classes; ops sent after `frontier` (the first
    /// return entry's time) are not candidates yet.
    Unknown { at: usize, frontier: u64 },
}

/// One linearized op on the search stack.
struct Frame {
    op: usize,
    before: State,
    resume: Cursor,
}

/// The search over one key's sub-history: the entry list, the stack and the explored nodes.
struct Search<'a> {
    ops: Vec<Op<'a>>,
    entries: Vec<Entry>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per op, its call and return entries (known ops only).
    call_at: Vec<usize>,
    return_at: Vec<usize>,
    /// Unknown ops by anonymized call, each class in call order.
    classes: Vec<Vec<usize>>,
    /// The classes of puts and deletes; those of CASes by expected state.
    blind: Vec<usize>,
    conditional: HashMap<State, Vec<usize>>,
    /// Per class, how many of its ops are linearized: always its first ones.
    used: Vec<usize>,
    known_done: Vec<u64>,
    unknown_done: Vec<u64>,
    /// Explored nodes: per set of linearized known ops, (state, linearized unknown ops).
    explored: HashMap<Vec<u64>, Vec<(State, Vec<u64>)>>,
    stack: Vec<Frame>,
    state: State,
    known: usize,
    remaining: usize,
    /// Per value with a single writer, how many unlinearized known ops must read it.
    waiting: HashMap<u64, usize>,
    /// The deepest dead end: known ops linearized, the op blocking it, the state (its value
    /// as written, not anonymized), and whether a pending op must still read that value.
    deepest: Option<(usize, usize, State, bool)>,
}

impl<'a> Search<'a> {
    fn new(history: &[&'a Operation]) -> Search<'a> {
        let mut named = HashSet::new();
        let mut writers: HashMap<u64, usize> = HashMap::new();
        for o in history {
            if let Some(v) = written(o.call) {
                *writers.entry(v).or_default() += 1;
            }
            if let (Call::Get, Outcome::Read(Some(v)))
            | (
                Call::Cas {
                    expect: Some(v), ..
                },
                _,
            ) = (o.call, o.outcome)
            {
                named.insert(v);
            }
        }
        let anonymous = (0..=u64::MAX)
            .rev()
            .find(|v| !named.contains(v))
            .unwrap_or(0);
        let anon = |v| if named.contains(&v) { v } else { anonymous };
        let (mut ops, mut entries, mut waiting) = (Vec::new(), Vec::new(), HashMap::new());
        let mut groups: BTreeMap<Call, Vec<usize>> = BTreeMap::new();
        for &src in history {
            let call = match src.call {
                Call::Put { value: v } => Call::Put { value: anon(v) },
                Call::Cas { expect, value: v } => Call::Cas {
                    expect,
                    value: anon(v),
                },
                call => call,
            };
            let (op, slot, (invoked, returned)) = (ops.len(), entries.len() / 2, interval(src));
            if src.outcome == Outcome::Unknown {
                if call == Call::Get {
                    continue;
                }
                groups.entry(call).or_default().push(op);
            } else {
                entries.extend([(invoked, false, op), (returned, true, op)]);
                let need = needs(call, src.outcome);
                if let Some(v) = need.filter(|v| writers.get(v).is_none_or(|&n| n <= 1)) {
                    *waiting.entry(v).or_default() += 1;
                }
            }
            ops.push(Op {
                call,
                outcome: src.outcome,
                invoked,
                class: None,
                slot,
                src,
            });
        }
        let mut classes: Vec<Vec<usize>> = groups.into_values().collect();
        let (mut blind, mut conditional) = (Vec::new(), HashMap::<State, Vec<usize>>::new());
        let mut unknown = 0;
        for (c, class) in classes.iter_mut().enumerate() {
            class.sort_by_key(|&i| (ops[i].invoked, i));
            match ops[class[0]].call {
                Call::Cas { expect, .. } => conditional.entry(expect).or_default().push(c),
                _ => blind.push(c),
            }
            for &i in class.iter() {
                (ops[i].class, ops[i].slot) = (Some(c), unknown);
                unknown += 1;
            }
        }
        entries.sort_unstable();
        let n = entries.len();
        let (mut call_at, mut return_at) = (vec![NIL; ops.len()], vec![NIL; ops.len()]);
        for (i, &(_, is_return, op)) in entries.iter().enumerate() {
            if is_return {
                return_at[op] = i
            } else {
                call_at[op] = i
            }
        }
        // Index n is the head sentinel.
        let next = (1..=n)
            .map(|i| if i == n { NIL } else { i })
            .chain([if n == 0 { NIL } else { 0 }]);
        let known = n / 2;
        Search {
            used: vec![0; classes.len()],
            known_done: vec![0; known.div_ceil(64)],
            unknown_done: vec![0; unknown.div_ceil(64)],
            ops,
            entries,
            next: next.collect(),
            prev: (0..=n).map(|i| if i == 0 { n } else { i - 1 }).collect(),
            call_at,
            return_at,
            classes,
            blind,
            conditional,
            explored: HashMap::new(),
            stack: Vec::new(),
            state: None,
            known,
            remaining: known,
            waiting,
            deepest: None,
        }
    }

    /// Depth-first search; a step is one candidate tried or one backtrack.
    fn run(mut self, max_steps: u64) -> Verdict {
        let head = self.entries.len();
        let mut cursor = Cursor::Known(self.next[head]);
        for _ in 0..max_steps {
            if self.remaining == 0 {
                return Verdict::Linearizable;
            }
            if let Some((op, resume)) = self.candidate(cursor) {
                let linearized = self.linearize(op, resume);
                cursor = if linearized {
                    Cursor::Known(self.next[head])
                } else {
                    resume
                };
                continue;
            }
            self.note_dead_end();
            let Some(frame) = self.stack.pop() else {
                return Verdict::Anomaly(self.explain());
            };
            self.undo(&frame);
            cursor = frame.resume;
        }
        if self.remaining == 0 {
            Verdict::Linearizable
        } else {
            Verdict::Undecided
        }
    }

    fn top_is_unknown(&self) -> bool {
        self.stack
            .last()
            .is_some_and(|f| self.ops[f.op].class.is_some())
    }

    /// The first candidate at or after `cursor`, and where to resume after it.
    fn candidate(&self, cursor: Cursor) -> Option<(usize, Cursor)> {
        let (at, frontier) = match cursor {
            Cursor::Known(e) => match self.entries.get(e) {
                Some(&(_, false, op)) => return Some((op, Cursor::Known(self.next[e]))),
                entry => (0, entry.map_or(u64::MAX, |entry| entry.0)),
            },
            Cursor::Unknown { at, frontier } => (at, frontier),
        };
        // After an unknown op only a CAS may need it; only a CAS expecting the state changes it.
        let after_unknown = self.top_is_unknown();
        let blind = self.blind.iter().filter(|_| !after_unknown);
        let conditional = self.conditional.get(&self.state).into_iter().flatten();
        blind
            .chain(conditional)
            .enumerate()
            .skip(at)
            .find_map(|(i, &c)| {
                let op = *self.classes[c].get(self.used[c])?;
                let resume = Cursor::Unknown {
                    at: i + 1,
                    frontier,
                };
                (self.ops[op].invoked <= frontier).then_some((op, resume))
            })
    }

    /// Linearizes `op` next if the model allows it, the canonical form wants it and the node
    /// it leads to is new.
    fn linearize(&mut self, op: usize, resume: Cursor) -> bool {
        let o = &self.ops[op];
        let (class, slot) = (o.class, o.slot);
        let Some(after) = step(o.call, o.outcome, self.state) else {
            return false;
        };
        if class.is_some() && (after == self.state || self.known_does(after)) {
            return false; // drop it, or swap it with that known op
        }
        if after != self.state
            && let Some(v) = self.state
            && self
                .waiting
                .get(&v)
                .is_some_and(|&n| n > usize::from(needs(o.call, o.outcome) == Some(v)))
        {
            return false; // the only writer of a value still to be read is spent
        }
        if let Some(&Frame {
            op: top, before, ..
        }) = self.stack.last()
            && self.ops[top].class.is_some()
            && let Some(without) = step(o.call, o.outcome, before)
            && (without == after || class.is_none() && effect(self.ops[top].call, without) == after)
        {
            return false; // drop the unknown op on top, or move it after this one
        }
        if class.is_none() {
            flip(&mut self.known_done, slot);
            if !self.first_visit(after) {
                flip(&mut self.known_done, slot);
                return false;
            }
        } else {
            flip(&mut self.unknown_done, slot);
        }
        self.stack.push(Frame {
            op,
            before: self.state,
            resume,
        });
        self.state = after;
        self.take(op, true);
        true
    }

    fn undo(&mut self, frame: &Frame) {
        self.state = frame.before;
        let o = &self.ops[frame.op];
        let done = if o.class.is_some() {
            &mut self.unknown_done
        } else {
            &mut self.known_done
        };
        flip(done, o.slot);
        self.take(frame.op, false);
    }

    /// Counts `op` as linearized (`taken`) or not, lifting its entries out or back in (in
    /// the reverse order, as dancing links require).
    fn take(&mut self, op: usize, taken: bool) {
        let (o, delta) = (&self.ops[op], if taken { 1 } else { -1 });
        if let Some(c) = o.class {
            self.used[c] = self.used[c].wrapping_add_signed(delta);
            return;
        }
        if let Some(n) = needs(o.call, o.outcome).and_then(|v| self.waiting.get_mut(&v)) {
            *n = n.wrapping_add_signed(-delta);
        }
        self.remaining = self.remaining.wrapping_add_signed(-delta);
        let (call, ret) = (self.call_at[op], self.return_at[op]);
        for e in if taken { [call, ret] } else { [ret, call] } {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = if taken { n } else { e };
            if n != NIL {
                self.prev[n] = if taken { p } else { e };
            }
        }
    }

    /// Whether a known candidate of this node would also take the state to `after`.
    fn known_does(&self, after: State) -> bool {
        let mut e = self.next[self.entries.len()];
        while let Some(&(_, false, op)) = self.entries.get(e) {
            let o = &self.ops[op];
            if step(o.call, o.outcome, self.state) == Some(after) {
                return true;
            }
            e = self.next[e];
        }
        false
    }

    /// Records the node the last known op led to; false if it, or a node it is dominated by,
    /// was explored. A recorded node failed (known ops only grow along a path), and one with
    /// more unknown ops spent has fewer choices, so fails too.
    fn first_visit(&mut self, state: State) -> bool {
        let unknown = &self.unknown_done;
        let Some(seen) = self.explored.get_mut(&self.known_done[..]) else {
            self.explored
                .insert(self.known_done.clone(), vec![(state, unknown.clone())]);
            return true;
        };
        let subset = |u: &Vec<u64>| u.iter().zip(unknown).all(|(a, b)| a & !b == 0);
        if seen.iter().any(|(s, u)| *s == state && subset(u)) {
            return false;
        }
        seen.push((state, unknown.clone()));
        true
    }

    /// Remembers the deepest dead end (by known ops linearized), for the report.
    fn note_dead_end(&mut self) {
        let done = self.known - self.remaining;
        if self.top_is_unknown() || self.deepest.is_some_and(|(d, ..)| d >= done) {
            return;
        }
        let mut e = self.next[self.entries.len()];
        while let Some(&(_, false, _)) = self.entries.get(e) {
            e = self.next[e];
        }
        let Some(&(_, _, blocked)) = self.entries.get(e) else {
            return;
        };
        let read = self
            .state
            .and_then(|v| self.waiting.get(&v))
            .is_some_and(|&n| n > 0);
        // The value as written (not anonymized): by the last op that changed the state.
        let mut after = self.state;
        let changed = |f: &&Frame| std::mem::replace(&mut after, f.before) != f.before;
        let writer = self
            .stack
            .iter()
            .rev()
            .find(changed)
            .map(|f| self.ops[f.op].src.call);
        let state = self.state.and(writer.and_then(written));
        self.deepest = Some((done, blocked, state, read));
    }

    fn explain(&self) -> String {
        let Some((done, blocked, state, read)) = self.deepest else {
            return "no linearization exists".to_string();
        };
        let state = match state {
            None => "absent".to_string(),
            Some(v) if read => format!("holding {v}, which a pending op must still read"),
            Some(v) => format!("holding {v}"),
        };
        format!(
            "{} cannot be linearized: the longest linearizable prefix has {done} of {} \
             acknowledged ops and leaves the key {state}",
            describe(self.ops[blocked].src),
            self.known
        )
    }
}

fn flip(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const BUDGET: u64 = 1_000_000;

    /// Parses `[key:]verb args invoked-returned, ...` with verbs `put V`, `get V|-`,
    /// `del y|n` and `cas E|- V y|n`; a `?` return time makes the outcome unknown.
    fn history(spec: &str) -> Vec<Operation> {
        let op = |op: &str| {
            let (key, op) = op.trim().split_once(':').unwrap_or(("k", op.trim()));
            let words: Vec<&str> = op.split_whitespace().collect();
            let (value, yes) = (|w: &str| w.parse().ok(), |w: &str| w == "y");
            let (call, outcome) = match words[..] {
                ["put", v, _] => (
                    Call::Put {
                        value: value(v).unwrap(),
                    },
                    Outcome::Written,
                ),
                ["get", v, _] => (Call::Get, Outcome::Read(value(v))),
                ["del", d, _] => (Call::Delete, Outcome::Deleted(yes(d))),
                ["cas", e, v, s, _] => {
                    let call = Call::Cas {
                        expect: value(e),
                        value: value(v).unwrap(),
                    };
                    (call, Outcome::Swapped(yes(s)))
                }
                _ => panic!("bad op: {op}"),
            };
            let (invoked, returned) = words[words.len() - 1].split_once('-').unwrap();
            let returned = returned.parse().ok();
            let outcome = if returned.is_some() {
                outcome
            } else {
                Outcome::Unknown
            };
            let (key, invoked) = (key.as_bytes().to_vec(), invoked.parse().unwrap());
            Operation {
                key,
                call,
                outcome,
                invoked,
                returned,
                client: 0,
                member: 0,
                revision: 0,
            }
        };
        spec.split(',').map(op).collect()
    }

    /// Checks a one-key history; the search alone must reach the same verdict.
    fn linearizable(spec: &str) -> bool {
        let h = history(spec);
        let report = check(&h, BUDGET);
        assert!(report.undecided.is_empty(), "{report:?}");
        let searched = Search::new(&h.iter().collect::<Vec<_>>()).run(BUDGET);
        assert!(!matches!(searched, Verdict::Undecided), "{spec}");
        let agree = matches!(searched, Verdict::Linearizable) == report.anomalies.is_empty();
        assert!(agree, "scan and search disagree on {spec}: {report:?}");
        report.anomalies.is_empty()
    }

    fn reason(spec: &str) -> String {
        check(&history(spec), BUDGET).anomalies.remove(0).reason
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ok = "get - 0-1, put 1 2-3, get 1 4-5, cas 1 2 y 6-7, cas 1 3 n 8-9, get 2 10-11, \
                  del y 12-13, del n 14-15, cas - 4 y 16-17, get 4 18-19";
        assert!(linearizable(ok));
        assert!(!linearizable(&ok.replace("get 2", "get -")));
        assert!(!linearizable(&ok.replace("del n", "del y")));
    }

    #[test]
    fn overlapping_get_sees_old_or_new_value() {
        assert!(linearizable("put 1 0-10, put 2 20-40, get 1 25-35"));
        assert!(linearizable("put 1 0-10, put 2 20-40, get 2 25-35"));
        assert!(!linearizable("put 1 0-10, put 2 20-40, get - 25-35"));
        // Sent at the instant the put was answered: concurrent with it.
        assert!(linearizable("put 1 0-10, get - 10-20"));
        assert!(!linearizable("put 1 0-10, get - 11-20"));
    }

    #[test]
    fn stale_read_is_an_anomaly() {
        let stale = "put 1 0-10, put 2 20-30, get 1 40-50";
        assert!(!linearizable(stale));
        let why = reason(stale);
        assert!(
            why.contains("Read(Some(1)) (to member 0, invoked 40 ns") && why.contains("value: 2"),
            "{why}"
        );
        assert!(linearizable("put 1 0-10, put 2 20-60, get 1 40-50"));
        assert!(!linearizable("put 1 0-10, del y 20-30, cas 1 3 y 40-50"));
    }

    #[test]
    fn lost_acknowledged_put_is_an_anomaly() {
        let lost = "put 1 0-10, get - 20-30";
        assert!(!linearizable(lost));
        let why = reason(lost);
        assert!(
            why.contains("Read(None) (to member 0, invoked 20 ns, returned 30 ns at revision 0)"),
            "{why}"
        );
        assert!(
            why.contains("1 of 2 acknowledged ops and leaves the key holding 1"),
            "{why}"
        );
    }

    #[test]
    fn unknown_put_may_take_effect_late_or_never() {
        assert!(linearizable("put 1 0-10, put 2 15-?, get 2 20-30"));
        assert!(linearizable("put 1 0-10, put 2 15-?, get 1 20-30"));
        assert!(linearizable(
            "put 1 0-10, put 2 15-?, put 3 20-30, get 3 40-50, get 2 60-70"
        ));
        assert!(linearizable(
            "get ? 0-?, put 1 5-?, del ? 6-?, cas 7 8 ? 9-?"
        ));
    }

    #[test]
    fn unknown_op_takes_effect_once_and_only_after_its_call() {
        // Seen, then the value from before it is back.
        assert!(!linearizable(
            "put 1 0-10, put 2 15-?, get 2 20-30, get 1 40-50"
        ));
        // Seen, overwritten by an acknowledged put, then seen again.
        assert!(!linearizable(
            "put 1 0-10, put 2 15-?, get 2 20-30, put 3 40-50, get 2 60-70"
        ));
        // Seen before it was sent.
        assert!(!linearizable("put 1 0-10, get 2 20-30, put 2 40-?"));
        // An unknown delete explains one absent read, not two around an acknowledged put.
        assert!(!linearizable(
            "put 1 0-10, del ? 15-?, get - 20-30, put 2 40-50, get - 60-70"
        ));
    }

    #[test]
    fn unknown_delete_and_cas_follow_the_model() {
        assert!(linearizable("put 1 0-10, del ? 15-?, get - 20-30"));
        assert!(linearizable(
            "put 1 0-10, del ? 15-?, del n 20-30, put 2 40-50, get 2 60-70"
        ));
        assert!(linearizable("put 1 0-10, cas 1 2 ? 15-?, get 2 20-30"));
        assert!(!linearizable("put 1 0-10, cas 5 2 ? 15-?, get 2 20-30"));
        assert!(!linearizable("put 1 0-10, cas - 2 ? 15-?, get 2 20-30"));
        // A chain of unknown ops explains the read: the delete, then the CAS from absent.
        assert!(linearizable(
            "put 1 0-10, del ? 11-?, cas - 2 ? 12-?, get 2 20-30"
        ));
        assert!(!linearizable("put 1 0-10, cas - 2 ? 12-?, get 2 20-30"));
    }

    #[test]
    fn impossible_cas_or_delete_result_is_an_anomaly() {
        assert!(!linearizable("put 1 0-10, cas 7 2 y 20-30"));
        assert!(!linearizable("put 1 0-10, cas - 2 y 20-30"));
        assert!(!linearizable("put 1 0-10, cas 1 2 n 20-30"));
        assert!(!linearizable("del y 0-10"));
        assert!(!linearizable("put 1 0-10, del y 20-30, del y 40-50"));
        assert!(linearizable(
            "put 1 0-10, del y 20-50, del y 30-40, put 2 25-35"
        ));
    }

    #[test]
    fn keys_are_checked_independently() {
        let h = history("a:put 1 0-10, b:put 2 0-10, a:get 1 20-30, b:get 1 20-30, c:put 3 0-?");
        let report = check(&h, BUDGET);
        assert_eq!((report.keys, report.operations, report.unknown), (3, 5, 1));
        assert_eq!(report.anomalies.len(), 1, "{report:?}");
        assert_eq!(report.anomalies[0].key, b"b");
        assert!(report.undecided.is_empty());
    }

    #[test]
    fn exhausted_budget_is_undecided_not_an_anomaly() {
        let report = check(&history("put 1 0-10, put 2 0-10, get - 20-30"), 2);
        assert!(report.anomalies.is_empty(), "{report:?}");
        assert_eq!(report.undecided, vec![b"k".to_vec()]);
    }

    #[test]
    fn interchangeable_unknown_writes_do_not_blow_up() {
        // 60 unread unknown puts; 20 deletes each need one of them (C(60, 20) choices).
        let mut ops: Vec<String> = (0..60).map(|v| format!("put {v} {v}-?")).collect();
        ops.extend((0..20).map(|i| format!("del y {}-{}", 100 + 10 * i, 105 + 10 * i)));
        let spec = ops.join(", ");
        assert!(linearizable(&spec));
        assert!(!linearizable(&format!(
            "{spec}, put 99 400-410, get - 420-430"
        )));
    }

    /// xorshift64: deterministic and good enough to draw intervals.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// `clients` clients of a correct atomic register, driving it as the harness drives a
    /// key: each op takes effect at a random instant of its interval, a CAS expects what its
    /// client last saw, and every `lost_every`-th op is a write whose answer is lost, which
    /// takes effect at a random instant after its call (maybe after the client gave up) or
    /// never.
    fn simulate(seed: u64, count: usize, clients: usize, lost_every: usize) -> Vec<Operation> {
        let (mut rng, mut ops, mut state) = (Rng(seed), Vec::<Operation>::new(), None);
        let mut seen = vec![None; clients];
        // (time, is a return, op, client): effects sort before returns at the same instant.
        let mut events: BinaryHeap<_> = (0..clients).map(|c| Reverse((0, true, NIL, c))).collect();
        while let Some(Reverse((time, is_return, i, client))) = events.pop() {
            if !is_return {
                let (call, op) = (ops[i].call, &mut ops[i]);
                let outcome = match call {
                    Call::Put { .. } => Outcome::Written,
                    Call::Get => Outcome::Read(state),
                    Call::Delete => Outcome::Deleted(state.is_some()),
                    Call::Cas { expect, .. } => Outcome::Swapped(state == expect),
                };
                state = effect(call, state);
                op.outcome = if op.returned.is_some() {
                    outcome
                } else {
                    Outcome::Unknown
                };
                continue;
            }
            if let Some((Outcome::Read(v), _) | (Outcome::Written | Outcome::Swapped(true), v)) =
                ops.get(i).map(|op| (op.outcome, written(op.call)))
            {
                seen[client] = v;
            }
            if ops.len() == count {
                continue;
            }
            let (i, lost) = (ops.len(), ops.len() % lost_every == lost_every / 2);
            let (invoked, value) = (time + rng.below(10), i as u64 + 1);
            let returned = invoked + 1 + rng.below(60);
            // The harness's mix; a read whose answer is lost is not recorded at all.
            let roll = rng.below(100);
            let call = match if lost && (35..70).contains(&roll) {
                roll + 35
            } else {
                roll
            } {
                0..35 => Call::Put { value },
                35..70 => Call::Get,
                70..78 => Call::Delete,
                _ => Call::Cas {
                    expect: seen[client],
                    value,
                },
            };
            let at = match lost {
                true => (rng.below(2) == 0).then(|| invoked + rng.below(200)),
                false => Some(invoked + rng.below(returned - invoked + 1)),
            };
            events.extend(at.map(|at| Reverse((at, false, i, client))));
            events.push(Reverse((returned, true, i, client)));
            let (key, outcome, returned) = (b"k".to_vec(), Outcome::Unknown, Some(returned));
            let returned = returned.filter(|_| !lost);
            ops.push(Operation {
                key,
                call,
                outcome,
                invoked,
                returned,
                client,
                member: 0,
                revision: 0,
            });
        }
        ops
    }

    #[test]
    fn simulated_history_with_unknown_writes_is_decided() {
        const BUDGET: u64 = 5_000_000;
        let h = simulate(0x9e37_79b9_7f4a_7c15, 3_000, 6, 30);
        let report = check(&h, BUDGET);
        assert_eq!((report.operations, report.unknown), (3_000, 100));
        assert!(
            report.anomalies.is_empty() && report.undecided.is_empty(),
            "{report:?}"
        );
        // A read from `at` on answers a value overwritten long before.
        let stale = |at: usize| {
            let mut h = h.clone();
            let read = (at..)
                .find(|&i| matches!(h[i].outcome, Outcome::Read(_)))
                .unwrap();
            let old = (0..read - 100)
                .rev()
                .find_map(|i| match (h[i].call, h[i].outcome) {
                    (Call::Put { value }, Outcome::Written) => Some(value),
                    _ => None,
                });
            h[read].outcome = Outcome::Read(old);
            (h, read)
        };
        let (h, read) = stale(1_500);
        let report = check(&h, BUDGET);
        assert_eq!(report.anomalies.len(), 1, "{report:?}");
        assert!(
            report.anomalies[0].reason.starts_with(&describe(&h[read])),
            "{report:?}"
        );
        // The search alone refutes one too; it explores every order of the ops before the
        // read, which grows fast with the unknown ops pending, so one early on.
        let (h, _) = stale(300);
        let searched = Search::new(&h.iter().collect::<Vec<_>>()).run(BUDGET);
        assert!(matches!(searched, Verdict::Anomaly(_)));
    }
}
