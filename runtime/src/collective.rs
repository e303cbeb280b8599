//! Collectives of a data-parallel run: the interface coopc's executors and
//! trainer use (sum of f32/f64 buffers over the processes, broadcast,
//! barrier, rank and world size), a single-process implementation (every
//! operation is the identity), and [`ThreadGroup`], ranks that are threads
//! of one process. The MPI implementation lives with the binary, which
//! links the system's MPI library; NCCL's with the device executor.
//!
//! Sums are computed in rank order, 0 to N − 1, and every rank receives the
//! same bits, so replicated parameters stay bit-equal across ranks after
//! any number of steps.
//!
//! An executor finds the collective of the run it is part of through
//! [`current`]: the one installed for the thread with [`scope`], else the
//! one installed for the process with [`install`], else the single process.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use thiserror::Error;

/// Why a collective operation failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CollectiveError {
    /// Another rank stopped (it failed, or was killed) before it reached
    /// this operation.
    #[error("rank {rank} of {world} stopped: {reason}")]
    PeerFailed {
        rank: usize,
        world: usize,
        reason: String,
    },
    /// Some ranks did not reach the operation in time.
    #[error(
        "collective #{op} ({what}): rank(s) {missing:?} of {world} did not take part within {secs} s"
    )]
    Timeout {
        op: u64,
        what: &'static str,
        missing: Vec<usize>,
        world: usize,
        secs: u64,
    },
    /// The ranks disagree about the operation (a different kind or size):
    /// they are not running the same program.
    #[error("collective #{op}: rank {rank} called {theirs}, this rank {ours}")]
    Mismatch {
        op: u64,
        rank: usize,
        theirs: String,
        ours: String,
    },
    /// The communication library reported an error.
    #[error("{0}")]
    Library(String),
}

/// The operations a data-parallel run needs, over the ranks `0..world()`.
/// Every rank must call the same operations in the same order with buffers
/// of the same length.
pub trait Collective: Send + Sync {
    /// What implements it (`single`, `threads`, `mpi`, `nccl`).
    fn name(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `buf ← Σ_ranks buf`, summed in rank order; every rank gets the same bits.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError>;
    /// `buf ← Σ_ranks buf` in f32, summed in rank order.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// `buf ←` rank `root`'s `buf` (any length; the others' are replaced).
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;
    /// Tells the other ranks that this one is stopping with an error, where
    /// the implementation can (they then fail instead of waiting for it).
    fn abort(&self, reason: &str) {
        let _ = reason;
    }

    /// `buf ← (Σ_ranks buf) / world`.
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.all_reduce_sum_f64(buf)?;
        let n = self.world() as f64;
        buf.iter_mut().for_each(|x| *x /= n);
        Ok(())
    }
}

/// One process: rank 0 of 1, every operation the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn name(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, _: usize, _: &mut Vec<u8>) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// What a rank deposited for the operation in progress.
#[derive(Clone)]
enum Slot {
    F64(Vec<f64>),
    F32(Vec<f32>),
    Bytes(Vec<u8>),
    Barrier,
}

impl Slot {
    fn describe(&self) -> String {
        match self {
            Slot::F64(v) => format!("all_reduce_sum(f64 × {})", v.len()),
            Slot::F32(v) => format!("all_reduce_sum(f32 × {})", v.len()),
            Slot::Bytes(_) => "broadcast".into(),
            Slot::Barrier => "barrier".into(),
        }
    }
    fn same_kind(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::F64(a), Slot::F64(b)) => a.len() == b.len(),
            (Slot::F32(a), Slot::F32(b)) => a.len() == b.len(),
            (Slot::Bytes(_), Slot::Bytes(_)) | (Slot::Barrier, Slot::Barrier) => true,
            _ => false,
        }
    }
}

/// The float types collectives sum, with their slot and their sum over
/// another collective.
trait Summed: Copy + std::ops::Add<Output = Self> + Sized {
    fn slot(v: Vec<Self>) -> Slot;
    fn values(s: &Slot) -> &[Self];
    fn sum_over(c: &dyn Collective, buf: &mut [Self]) -> Result<(), CollectiveError>;
}

impl Summed for f64 {
    fn slot(v: Vec<f64>) -> Slot {
        Slot::F64(v)
    }
    fn values(s: &Slot) -> &[f64] {
        match s {
            Slot::F64(v) => v,
            _ => unreachable!("one kind per operation (checked)"),
        }
    }
    fn sum_over(c: &dyn Collective, buf: &mut [f64]) -> Result<(), CollectiveError> {
        c.all_reduce_sum_f64(buf)
    }
}

impl Summed for f32 {
    fn slot(v: Vec<f32>) -> Slot {
        Slot::F32(v)
    }
    fn values(s: &Slot) -> &[f32] {
        match s {
            Slot::F32(v) => v,
            _ => unreachable!("one kind per operation (checked)"),
        }
    }
    fn sum_over(c: &dyn Collective, buf: &mut [f32]) -> Result<(), CollectiveError> {
        c.all_reduce_sum_f32(buf)
    }
}

struct GroupState {
    /// Operations completed; the one in progress is number `op`.
    op: u64,
    slots: Vec<Option<Slot>>,
    /// Ranks that have read the result of operation `op`.
    read: usize,
    failed: Option<(usize, String)>,
}

struct Group {
    world: usize,
    state: Mutex<GroupState>,
    changed: Condvar,
    timeout: Duration,
}

/// Ranks that are threads of one process: each thread holds its own
/// handle ([`ThreadGroup::new`] gives one per rank). Used by the tests to
/// hold N ranks to one process on the whole batch, and by runs that split a
/// batch over threads. A rank that does not reach an operation within the
/// timeout, or that [`Collective::abort`]s, makes the others fail with an
/// error naming it.
#[derive(Clone)]
pub struct ThreadGroup {
    group: Arc<Group>,
    rank: usize,
}

impl ThreadGroup {
    /// Handles for ranks `0..world`, waiting at most `timeout` for the
    /// others at each operation.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        assert!(world > 0, "a group has at least one rank");
        let group = Arc::new(Group {
            world,
            state: Mutex::new(GroupState {
                op: 0,
                slots: vec![None; world],
                read: 0,
                failed: None,
            }),
            changed: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| ThreadGroup {
                group: group.clone(),
                rank,
            })
            .collect()
    }

    /// Deposits `mine`, waits for every rank's, returns all of them (in rank
    /// order) to `finish`, and waits until every rank has read them.
    fn exchange<R>(
        &self,
        mine: Slot,
        what: &'static str,
        finish: impl FnOnce(&[Option<Slot>]) -> R,
    ) -> Result<R, CollectiveError> {
        let g = &self.group;
        let mut st = g.state.lock().unwrap_or_else(|e| e.into_inner());
        let failed = |st: &GroupState| {
            st.failed
                .as_ref()
                .map(|(rank, reason)| CollectiveError::PeerFailed {
                    rank: *rank,
                    world: g.world,
                    reason: reason.clone(),
                })
        };
        if let Some(e) = failed(&st) {
            return Err(e);
        }
        let op = st.op;
        st.slots[self.rank] = Some(mine);
        g.changed.notify_all();
        let deadline = std::time::Instant::now() + g.timeout;
        // Wait for every rank's deposit.
        while st.op == op && st.slots.iter().any(Option::is_none) {
            if let Some(e) = failed(&st) {
                return Err(e);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                let missing = (0..g.world).filter(|&r| st.slots[r].is_none()).collect();
                return Err(CollectiveError::Timeout {
                    op,
                    what,
                    missing,
                    world: g.world,
                    secs: g.timeout.as_secs(),
                });
            }
            st = g
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let ours = st.slots[self.rank].as_ref().expect("deposited");
        if let Some((rank, theirs)) = st
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| !s.as_ref().expect("all deposited").same_kind(ours))
        {
            let e = CollectiveError::Mismatch {
                op,
                rank,
                theirs: theirs.as_ref().expect("deposited").describe(),
                ours: ours.describe(),
            };
            st.failed = Some((self.rank, e.to_string()));
            g.changed.notify_all();
            return Err(e);
        }
        let out = finish(&st.slots);
        st.read += 1;
        if st.read == g.world {
            // The last reader opens the next operation.
            st.slots.iter_mut().for_each(|s| *s = None);
            st.read = 0;
            st.op += 1;
            g.changed.notify_all();
        } else {
            while st.op == op {
                if let Some(e) = failed(&st) {
                    return Err(e);
                }
                st = g
                    .changed
                    .wait_timeout(st, g.timeout)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        Ok(out)
    }
}

impl ThreadGroup {
    fn sum<T: Summed>(&self, buf: &mut [T]) -> Result<(), CollectiveError> {
        let sum = self.exchange(T::slot(buf.to_vec()), "all_reduce_sum", |slots| {
            sum_in_rank_order::<T>(slots)
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }
}

impl Collective for ThreadGroup {
    fn name(&self) -> &'static str {
        "threads"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.sum(buf)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.sum(buf)
    }
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let got = self.exchange(Slot::Bytes(buf.clone()), "broadcast", |slots| {
            match slots[root].as_ref() {
                Some(Slot::Bytes(b)) => b.clone(),
                _ => unreachable!("kinds checked"),
            }
        })?;
        *buf = got;
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.exchange(Slot::Barrier, "barrier", |_| ())
    }
    fn abort(&self, reason: &str) {
        let mut st = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed.is_none() {
            st.failed = Some((self.rank, reason.to_string()));
        }
        self.group.changed.notify_all();
    }
}

/// `Σ_r slots[r]`, element by element, added in rank order from rank 0's.
fn sum_in_rank_order<T: Summed>(slots: &[Option<Slot>]) -> Vec<T> {
    let mut it = slots
        .iter()
        .map(|s| T::values(s.as_ref().expect("all deposited")));
    let mut acc = it.next().expect("a rank").to_vec();
    for part in it {
        acc.iter_mut().zip(part).for_each(|(a, &b)| *a = *a + b);
    }
    acc
}

/// The rows of a batch of `rows` that rank `rank` of `world` holds, as
/// indices into the whole batch, in the order the rank's batch has them.
/// The meta-step slices a batch into `minis` equal mini-batches; each
/// mini-batch is split into `world` equal contiguous parts and rank r takes
/// part r of every one, so that each rank's mini-batch m is its share of
/// the whole batch's mini-batch m. `rows` must be a multiple of `minis ×
/// world` (`BatchShapes::for_world` checks it when the plan is compiled).
pub fn shard_rows(rows: usize, minis: usize, rank: usize, world: usize) -> Vec<usize> {
    let minis = minis.max(1);
    let per_mini = rows / minis;
    let per_rank = per_mini / world;
    (0..minis)
        .flat_map(|m| {
            let start = m * per_mini + rank * per_rank;
            start..start + per_rank
        })
        .collect()
}

/// State of one process's micro-batches (see [`MicroBatches`]).
struct MicroState {
    /// The instance allowed to compute.
    turn: usize,
    slots: Vec<Option<Slot>>,
    /// The last operation's result, read by each instance in its turn.
    result: Option<Slot>,
    /// Operations completed.
    op: u64,
    failed: Option<String>,
}

struct MicroShared {
    m: usize,
    outer: Arc<dyn Collective>,
    state: Mutex<MicroState>,
    changed: Condvar,
}

/// The micro-batches of one process (`[train] micro_batches = M`): M
/// instances of a program, each on its share of the process's rows, that
/// take turns — one computes at a time, up to its next collective, so only
/// one micro-batch's activations are being built at once. Their sums are
/// taken in instance order and then over the processes (`outer`): M
/// micro-batches on N processes compute what N·M processes would, and what
/// one process computes on the whole batch, up to the rounding of the
/// sums' order (the same on every process).
/// Each instance runs on its own thread with its handle ([`MicroBatch`]).
pub struct MicroBatches;

impl MicroBatches {
    /// Handles of instances `0..m` of this process, summing over `outer`.
    pub fn handles(m: usize, outer: Arc<dyn Collective>) -> Vec<MicroBatch> {
        assert!(m > 0, "at least one micro-batch");
        let shared = Arc::new(MicroShared {
            m,
            outer,
            state: Mutex::new(MicroState {
                turn: 0,
                slots: vec![None; m],
                result: None,
                op: 0,
                failed: None,
            }),
            changed: Condvar::new(),
        });
        (0..m)
            .map(|index| MicroBatch {
                shared: shared.clone(),
                index,
            })
            .collect()
    }
}

/// One micro-batch's handle: its collective, and [`MicroBatch::run`], which
/// runs the instance in its turn.
#[derive(Clone)]
pub struct MicroBatch {
    shared: Arc<MicroShared>,
    index: usize,
}

impl MicroBatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, MicroState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_turn<'a>(
        &self,
        mut st: std::sync::MutexGuard<'a, MicroState>,
        ready: impl Fn(&MicroState) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, MicroState>, CollectiveError> {
        while !ready(&st) {
            if let Some(reason) = &st.failed {
                return Err(CollectiveError::PeerFailed {
                    rank: self.index,
                    world: self.shared.m,
                    reason: format!("micro-batch: {reason}"),
                });
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(st)
    }

    /// Runs `f` (the instance's program, with this handle as the thread's
    /// collective) when this instance's turn comes, then hands the turn on.
    /// An instance that fails stops the others.
    pub fn run<R, E: std::fmt::Display>(
        &self,
        f: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, RunError<E>> {
        let st = self.lock();
        let i = self.index;
        drop(
            self.wait_turn(st, |s| s.turn == i)
                .map_err(RunError::Collective)?,
        );
        let out = scope(Arc::new(self.clone()), f);
        let mut st = self.lock();
        match &out {
            Ok(_) => st.turn = i + 1,
            Err(e) => {
                if st.failed.is_none() {
                    st.failed = Some(format!("micro-batch {i} failed: {e}"));
                }
            }
        }
        self.shared.changed.notify_all();
        out.map_err(RunError::Inner)
    }

    /// Deposits `mine`; the last instance to arrive combines the deposits
    /// (in instance order, then over the processes); each instance reads
    /// the result in its turn.
    fn exchange(
        &self,
        mine: Slot,
        combine: impl FnOnce(&[Option<Slot>], &dyn Collective) -> Result<Slot, CollectiveError>,
    ) -> Result<Slot, CollectiveError> {
        let (i, m) = (self.index, self.shared.m);
        let mut st = self.lock();
        if let Some(reason) = &st.failed {
            return Err(CollectiveError::PeerFailed {
                rank: i,
                world: m,
                reason: reason.clone(),
            });
        }
        let op = st.op;
        st.slots[i] = Some(mine);
        if st.slots.iter().all(Option::is_some) {
            let r = combine(&st.slots, self.shared.outer.as_ref());
            match r {
                Ok(r) => st.result = Some(r),
                Err(e) => {
                    st.failed = Some(e.to_string());
                    self.shared.changed.notify_all();
                    return Err(e);
                }
            }
            st.slots.iter_mut().for_each(|s| *s = None);
            st.op += 1;
            st.turn = 0;
        } else {
            st.turn = i + 1;
        }
        self.shared.changed.notify_all();
        let st = self.wait_turn(st, |s| s.op > op && s.turn == i)?;
        Ok(st.result.clone().expect("a combined result"))
    }
}

impl MicroBatch {
    /// The micro-batches' sum in instance order, then over the processes.
    fn sum<T: Summed>(&self, buf: &mut [T]) -> Result<(), CollectiveError> {
        let r = self.exchange(T::slot(buf.to_vec()), |slots, outer| {
            let mut sum = sum_in_rank_order::<T>(slots);
            T::sum_over(outer, &mut sum)?;
            Ok(T::slot(sum))
        })?;
        buf.copy_from_slice(T::values(&r));
        Ok(())
    }
}

/// Why a micro-batch's run failed: its own error, or another's.
#[derive(Debug)]
pub enum RunError<E> {
    Inner(E),
    Collective(CollectiveError),
}

impl Collective for MicroBatch {
    fn name(&self) -> &'static str {
        "micro-batches"
    }
    fn rank(&self) -> usize {
        self.shared.outer.rank() * self.shared.m + self.index
    }
    fn world(&self) -> usize {
        self.shared.outer.world() * self.shared.m
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.sum(buf)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.sum(buf)
    }
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let m = self.shared.m;
        let r = self.exchange(Slot::Bytes(buf.clone()), |slots, outer| {
            let mut b = match &slots[root % m] {
                Some(Slot::Bytes(b)) => b.clone(),
                _ => unreachable!("one kind per operation"),
            };
            outer.broadcast(root / m, &mut b)?;
            Ok(Slot::Bytes(b))
        })?;
        if let Slot::Bytes(b) = r {
            *buf = b;
        }
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.exchange(Slot::Barrier, |_, outer| {
            outer.barrier()?;
            Ok(Slot::Barrier)
        })
        .map(|_| ())
    }
    fn abort(&self, reason: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(reason.to_string());
        }
        self.shared.changed.notify_all();
        drop(st);
        self.shared.outer.abort(reason);
    }
}

static PROCESS: OnceLock<Arc<dyn Collective>> = OnceLock::new();

thread_local! {
    static SCOPED: RefCell<Vec<Arc<dyn Collective>>> = const { RefCell::new(Vec::new()) };
}

/// Installs the process's collective (once; the MPI or NCCL world the
/// launcher started). Returns false when one was installed already.
pub fn install(c: Arc<dyn Collective>) -> bool {
    PROCESS.set(c).is_ok()
}

/// Runs `f` with `c` as this thread's collective.
pub fn scope<R>(c: Arc<dyn Collective>, f: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            SCOPED.with(|s| s.borrow_mut().pop());
        }
    }
    SCOPED.with(|s| s.borrow_mut().push(c));
    let _pop = Pop;
    f()
}

/// The collective of the run this thread is part of.
pub fn current() -> Arc<dyn Collective> {
    if let Some(c) = SCOPED.with(|s| s.borrow().last().cloned()) {
        return c;
    }
    match PROCESS.get() {
        Some(c) => c.clone(),
        None => Arc::new(Single),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_ranks<R: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(ThreadGroup) -> R + Sync,
    ) -> Vec<R> {
        let handles = ThreadGroup::new(world, timeout);
        std::thread::scope(|s| {
            let f = &f;
            let joins: Vec<_> = handles.into_iter().map(|h| s.spawn(move || f(h))).collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        let out = run_ranks(3, Duration::from_secs(20), |c| {
            let r = c.rank() as f64;
            // Values whose sum depends on the order of addition.
            let mut v = vec![1e16 * (1.0 - r), 1.0 + r, 0.1 * (r + 1.0)];
            c.all_reduce_sum_f64(&mut v).unwrap();
            let mut w = vec![c.rank() as f32 + 0.5; 4];
            c.all_reduce_sum_f32(&mut w).unwrap();
            let mut m = vec![c.rank() as f64];
            c.all_reduce_mean_f64(&mut m).unwrap();
            assert_eq!(m, vec![1.0], "(0 + 1 + 2) / 3");
            (v, w)
        });
        let expect: [f64; 3] = [
            (1e16 + 0.0) + (0.0) + (-1e16),
            1.0 + 2.0 + 3.0,
            (0.1 + 0.2) + 0.30000000000000004,
        ];
        for (v, w) in &out {
            assert_eq!(v[0].to_bits(), expect[0].to_bits());
            assert_eq!(v[1], expect[1]);
            assert_eq!(v[2].to_bits(), expect[2].to_bits());
            assert_eq!(w, &vec![0.5f32 + 1.5 + 2.5; 4]);
        }
        assert!(out.windows(2).all(|p| p[0].0 == p[1].0));
    }

    #[test]
    fn broadcast_and_many_operations_in_a_row() {
        let out = run_ranks(4, Duration::from_secs(20), |c| {
            let mut acc = Vec::new();
            for i in 0..50u8 {
                let mut b = vec![c.rank() as u8, i];
                c.broadcast((i % 4) as usize, &mut b).unwrap();
                acc.push(b);
                c.barrier().unwrap();
            }
            acc
        });
        for acc in &out {
            for (i, b) in acc.iter().enumerate() {
                assert_eq!(b, &vec![(i % 4) as u8, i as u8]);
            }
        }
    }

    #[test]
    fn a_rank_that_stops_fails_the_others_naming_it() {
        let out = run_ranks(3, Duration::from_secs(20), |c| {
            if c.rank() == 2 {
                c.abort("could not read the batch");
                return Err(CollectiveError::Library("aborted".into()));
            }
            let mut v = vec![1.0; 2];
            c.all_reduce_sum_f64(&mut v)
        });
        for r in &out[..2] {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(e, CollectiveError::PeerFailed { rank: 2, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("rank 2 of 3"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_never_comes_times_out_naming_it() {
        let out = run_ranks(2, Duration::from_millis(300), |c| {
            if c.rank() == 1 {
                return Ok(());
            }
            c.barrier()
        });
        match &out[0] {
            Err(CollectiveError::Timeout { missing, .. }) => assert_eq!(missing, &vec![1]),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn mismatched_operations_are_reported() {
        let out = run_ranks(2, Duration::from_secs(20), |c| {
            let mut v = vec![0.0; 2 + c.rank()];
            c.all_reduce_sum_f64(&mut v)
        });
        assert!(out.iter().any(|r| matches!(
            r,
            Err(CollectiveError::Mismatch { .. }) | Err(CollectiveError::PeerFailed { .. })
        )));
        assert!(out.iter().all(Result::is_err));
    }

    #[test]
    fn micro_batches_take_turns_and_sum_in_instance_order() {
        // Two processes (threads) of three micro-batches each: the sums
        // are those of six ranks, and only one micro-batch of a process
        // computes at a time.
        let running = std::sync::atomic::AtomicUsize::new(0);
        let out = run_ranks(2, Duration::from_secs(20), |outer| {
            let outer: Arc<dyn Collective> = Arc::new(outer);
            let handles = MicroBatches::handles(3, outer);
            std::thread::scope(|s| {
                let joins: Vec<_> = handles
                    .into_iter()
                    .map(|h| {
                        let running = &running;
                        s.spawn(move || {
                            h.run(|| -> Result<Vec<f64>, CollectiveError> {
                                let c = current();
                                let mut acc = vec![];
                                for k in 0..4 {
                                    let now =
                                        running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    // At most one micro-batch per process.
                                    assert!(now < 2, "{now} computing at once");
                                    std::thread::sleep(Duration::from_millis(2));
                                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                                    let mut v = vec![0.1 * (c.rank() + k) as f64];
                                    c.all_reduce_sum_f64(&mut v)?;
                                    acc.push(v[0]);
                                }
                                Ok(acc)
                            })
                            .map_err(|_| ())
                            .unwrap()
                        })
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| j.join().unwrap())
                    .collect::<Vec<_>>()
            })
        });
        for k in 0..4 {
            // Each process's three in order, then the two processes'.
            let part = |p: usize| (0..3).fold(0.0, |a, i| a + 0.1 * (3 * p + i + k) as f64);
            let expect = part(0) + part(1);
            for process in &out {
                for inst in process {
                    assert_eq!(inst[k].to_bits(), expect.to_bits());
                }
            }
        }
    }

    #[test]
    fn a_failing_micro_batch_stops_the_others() {
        let handles = MicroBatches::handles(2, Arc::new(Single));
        let out: Vec<bool> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    s.spawn(move || {
                        h.run(|| -> Result<(), String> {
                            if current().rank() == 0 {
                                return Err("bad batch".into());
                            }
                            current().barrier().map_err(|e| e.to_string())
                        })
                        .is_err()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        assert_eq!(out, vec![true, true]);
    }

    #[test]
    fn shards_cover_every_row_once_and_keep_mini_batches() {
        for (rows, minis, world) in [(8, 1, 2), (12, 2, 3), (16, 4, 2), (6, 1, 1)] {
            let shards: Vec<Vec<usize>> = (0..world)
                .map(|r| shard_rows(rows, minis, r, world))
                .collect();
            let mut all: Vec<usize> = shards.concat();
            all.sort_unstable();
            assert_eq!(all, (0..rows).collect::<Vec<_>>());
            // Rank r's mini-batch m lies inside the whole batch's mini-batch m.
            for shard in &shards {
                let local = shard.len() / minis;
                for (i, &row) in shard.iter().enumerate() {
                    assert_eq!(row / (rows / minis), i / local);
                }
            }
        }
        assert_eq!(shard_rows(8, 2, 1, 2), vec![2, 3, 6, 7]);
    }

    #[test]
    fn scope_overrides_the_process_collective_on_this_thread_only() {
        assert_eq!(current().world(), 1);
        let handles = ThreadGroup::new(2, Duration::from_secs(1));
        let inner = scope(Arc::new(handles[1].clone()), || {
            (current().rank(), current().world())
        });
        assert_eq!(inner, (1, 2));
        assert_eq!(current().name(), "single");
    }
}
