//! Token sampling on the device, so that a decode step's logits never
//! leave it: only the chosen token ids (and the uniform draws, made on the
//! host from the sampler's per-row random streams) cross. The rule is the
//! CPU sampler's (`coopc_runtime::sampler::choose_token`): argmax with the
//! lowest index on ties when greedy; otherwise softmax(logits /
//! temperature), cut to the top-p nucleus (most probable first, ties by
//! index; the whole vocabulary in index order when top_p ≥ 1), and the
//! first token of that order whose running mass exceeds `u · nucleus
//! mass`. It computes in f32 where the CPU sampler uses f64, so a draw
//! within rounding of a boundary between two tokens can pick the other.
//!
//! Two kernels, one cube per row: [`sample_prepare`] checks the row is
//! finite, takes the argmax (greedy) or writes the probabilities; then
//! [`sample_pick_ordered`] (top_p ≥ 1: index order, `O(V)` per row) or
//! [`sample_pick`] (a nucleus: ranks every token against the row,
//! `O(V²/block)` per row — simple, and fast for small vocabularies; a
//! radix select would make it `O(V)`) picks the token.

use crate::device::{arg, cubes, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Units per cube.
pub const SAMPLE_BLOCK: usize = 256;

/// Token written for a row with a non-finite logit.
pub const NON_FINITE: i32 = -1;

#[cube]
fn finite(x: f32) -> bool {
    !x.is_nan() && x <= f32::new(f32::MAX) && x >= f32::new(-f32::MAX)
}

/// Per row: `tokens[r] = −1` if a logit is not finite; else with `greedy`
/// the argmax; else `probs[r] = softmax(logits[r] / temperature)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sample_prepare(
    logits: &Array<f32>,
    probs: &mut Array<f32>,
    tokens: &mut Array<f32>,
    n_rows: u32,
    vocab: u32,
    temperature: f32,
    #[comptime] greedy: bool,
    #[comptime] block: usize,
) {
    let r = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if r >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let v = vocab as usize;
    let base = r * v;
    let mut best_v = SharedMemory::<f32>::new(block);
    let mut best_i = SharedMemory::<u32>::new(block);
    let mut bad = SharedMemory::<u32>::new(block);
    // A run-time zero that no logit (possibly NaN) can taint.
    let zero = f32::cast_from(UNIT_POS * 0u32);
    // Per unit: its largest logit (lowest index on ties), whether it saw a
    // non-finite one.
    let mut bv = zero - f32::new(3.0e38);
    let mut bi = v as u32;
    let mut nb = 0u32 * (tid as u32);
    let mut i = tid;
    while i < v {
        let x = logits[base + i];
        if !finite(x) {
            nb = 1u32;
        } else if x > bv || bi == v as u32 {
            bv = x;
            bi = i as u32;
        }
        i += block;
    }
    best_v[tid] = bv;
    best_i[tid] = bi;
    bad[tid] = nb;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride {
            let (v1, v2) = (best_v[tid], best_v[tid + stride]);
            let (i1, i2) = (best_i[tid], best_i[tid + stride]);
            // An empty unit has index `vocab`, which loses every tie.
            let take = i1 == v as u32 || (i2 != v as u32 && (v2 > v1 || (v2 == v1 && i2 < i1)));
            if take {
                best_v[tid] = v2;
                best_i[tid] = i2;
            }
            bad[tid] = max(bad[tid], bad[tid + stride]);
        }
        sync_cube();
        stride /= 2usize;
    }
    let m = best_v[0usize];
    let is_bad = bad[0usize] > 0u32;
    let best = best_i[0usize];
    // Every unit has read the results before `best_v` is reused below.
    sync_cube();
    let flag = zero - f32::new(1.0);
    if greedy {
        if tid == 0 {
            tokens[r] = select(is_bad, flag, f32::cast_from(best));
        }
    } else {
        // softmax(l / T): the max of l / T is max(l) / T for T > 0.
        let mt = m / temperature;
        let mut s = zero;
        let mut j = tid;
        while j < v {
            s += (logits[base + j] / temperature - mt).exp();
            j += block;
        }
        let total = cube_sum(s, &mut best_v, tid);
        let mut k = tid;
        while k < v {
            probs[base + k] = (logits[base + k] / temperature - mt).exp() / total;
            k += block;
        }
        if tid == 0 {
            tokens[r] = select(is_bad, flag, zero);
        }
    }
}

/// The sum over the cube of each unit's `x`, by a tree in `shared` (one
/// slot per unit); every unit gets it, and `shared` may be reused on
/// return. Every unit of the cube must call it.
#[cube]
pub(crate) fn cube_sum(x: f32, shared: &mut SharedMemory<f32>, tid: usize) -> f32 {
    shared[tid] = x;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride {
            shared[tid] = shared[tid] + shared[tid + stride];
        }
        sync_cube();
        stride /= 2usize;
    }
    let total = shared[0usize];
    sync_cube();
    total
}

/// Whether `sample_prepare` marked a row's token slot as non-finite (−1),
/// or left NaN there because something went wrong.
#[cube]
fn flagged(token: f32) -> bool {
    token < f32::new(0.0) || token.is_nan()
}

/// Token `i`'s place in the sampling order of row `base` (descending
/// probability, ties to the lower index): how many tokens come before it,
/// and their mass. `zero` is a run-time 0.
#[cube]
fn rank_and_mass(probs: &Array<f32>, base: usize, v: usize, i: usize, zero: f32) -> (u32, f32) {
    let pi = probs[base + i];
    let mut rank = 0u32 * (i as u32);
    let mut mass = zero;
    let mut j = i * 0usize;
    while j < v {
        let pj = probs[base + j];
        if pj > pi || (pj == pi && j < i) {
            rank += 1u32;
            mass += pj;
        }
        j += 1usize;
    }
    (rank, mass)
}

/// Per row not marked non-finite by [`sample_prepare`], for `top_p < 1`:
/// the nucleus is the tokens whose mass before them (in the order of
/// decreasing probability, ties by index) is below `top_p` (the first
/// always);
/// the token is the first (in order) kept one with positive probability
/// whose running mass exceeds `draws[r] · nucleus mass`, or the last kept
/// one when rounding leaves none.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sample_pick(
    probs: &Array<f32>,
    draws: &Array<f32>,
    tokens: &mut Array<f32>,
    n_rows: u32,
    vocab: u32,
    top_p: f32,
    #[comptime] block: usize,
) {
    let r = CUBE_POS;
    if r >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let v = vocab as usize;
    let base = r * v;
    let flagged = flagged(tokens[r]);
    let mut sums = SharedMemory::<f32>::new(block);
    let mut first = SharedMemory::<u32>::new(block);
    let mut first_tok = SharedMemory::<u32>::new(block);
    let mut last = SharedMemory::<u32>::new(block);
    let mut last_tok = SharedMemory::<u32>::new(block);
    let zero = f32::cast_from(UNIT_POS * 0u32);
    // The nucleus mass.
    let mut kept_mass = zero;
    let mut i = tid;
    while i < v {
        let pi = probs[base + i];
        let (rank, mass) = rank_and_mass(probs, base, v, i, zero);
        if rank == 0u32 || mass < top_p {
            kept_mass += pi;
        }
        i += block;
    }
    let target = draws[r] * cube_sum(kept_mass, &mut sums, tid);
    // The first kept token whose running mass passes the target, and the
    // last kept token (ranks: `vocab` for none; 0 is a real rank for last).
    let none = v as u32;
    let mut f = none;
    let mut ft = none;
    let mut l = none;
    let mut lt = none;
    let mut k = tid;
    while k < v {
        let p = probs[base + k];
        let (rank, mass) = rank_and_mass(probs, base, v, k, zero);
        if rank == 0u32 || mass < top_p {
            if p > zero && target < mass + p && (f == none || rank < f) {
                f = rank;
                ft = k as u32;
            }
            if l == none || rank > l {
                l = rank;
                lt = k as u32;
            }
        }
        k += block;
    }
    first[tid] = f;
    first_tok[tid] = ft;
    last[tid] = l;
    last_tok[tid] = lt;
    sync_cube();
    let mut st = (CUBE_DIM / 2) as usize;
    while st > 0usize {
        if tid < st {
            let (f2, l2) = (first[tid + st], last[tid + st]);
            if f2 != none && (first[tid] == none || f2 < first[tid]) {
                first[tid] = f2;
                first_tok[tid] = first_tok[tid + st];
            }
            if l2 != none && (last[tid] == none || l2 > last[tid]) {
                last[tid] = l2;
                last_tok[tid] = last_tok[tid + st];
            }
        }
        sync_cube();
        st /= 2usize;
    }
    if tid == 0 && !flagged {
        let chosen = select(first[0usize] != none, first_tok[0usize], last_tok[0usize]);
        tokens[r] = f32::cast_from(chosen);
    }
}

/// Per row not marked non-finite by [`sample_prepare`], for `top_p ≥ 1`:
/// the whole vocabulary in index order, so the first token with positive
/// probability whose running mass exceeds `draws[r] · Σp`, or the last
/// token when rounding leaves none. Each unit scans a contiguous chunk;
/// the chunks' masses are combined in shared memory (`O(V)` per row).
#[cube(launch)]
pub fn sample_pick_ordered(
    probs: &Array<f32>,
    draws: &Array<f32>,
    tokens: &mut Array<f32>,
    n_rows: u32,
    vocab: u32,
    #[comptime] block: usize,
) {
    let r = CUBE_POS;
    if r >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let v = vocab as usize;
    let base = r * v;
    let flagged = flagged(tokens[r]);
    let mut part = SharedMemory::<f32>::new(block);
    let mut found = SharedMemory::<u32>::new(block);
    let zero = f32::cast_from(UNIT_POS * 0u32);
    let chunk = v.div_ceil(block);
    let lo = min(tid * chunk, v);
    let hi = min(lo + chunk, v);
    let mut s = zero;
    let mut i = lo;
    while i < hi {
        s += probs[base + i];
        i += 1usize;
    }
    part[tid] = s;
    sync_cube();
    // The mass of the chunks before this one, and of all of them.
    let mut before = zero;
    let mut total = zero;
    let mut u = tid * 0usize;
    while u < block {
        let x = part[u];
        if u < tid {
            before += x;
        }
        total += x;
        u += 1usize;
    }
    let target = draws[r] * total;
    let none = v as u32;
    let mut f = none;
    let mut mass = before;
    let mut k = lo;
    while k < hi {
        let p = probs[base + k];
        if f == none && p > zero && target < mass + p {
            f = k as u32;
        }
        mass += p;
        k += 1usize;
    }
    found[tid] = f;
    sync_cube();
    let mut st = (CUBE_DIM / 2) as usize;
    while st > 0usize {
        if tid < st {
            found[tid] = min(found[tid], found[tid + st]);
        }
        sync_cube();
        st /= 2usize;
    }
    if tid == 0 && !flagged {
        let chosen = select(found[0usize] != none, found[0usize], none - 1u32);
        tokens[r] = f32::cast_from(chosen);
    }
}

impl<R: Runtime> Device<R> {
    /// One token per row of `logits` (`rows × vocab` f32 on this device):
    /// [`NON_FINITE`] for a row with a non-finite logit. `draws` holds one
    /// uniform number in [0, 1) per row (ignored when greedy).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_rows(
        &self,
        logits: &Handle,
        rows: usize,
        vocab: usize,
        draws: &[f32],
        temperature: f32,
        top_p: f32,
        greedy: bool,
    ) -> Result<Vec<i32>, DeviceError> {
        if rows == 0 || vocab == 0 || draws.len() != rows {
            return Err(DeviceError::Device(format!(
                "sample_rows: {rows} rows of {vocab} logits with {} draws",
                draws.len()
            )));
        }
        let usable = temperature.is_normal() && temperature > 0.0;
        if !greedy && !usable {
            return Err(DeviceError::Device(format!(
                "sampling temperature {temperature} is not a positive normal f32"
            )));
        }
        let n = rows * vocab;
        let probs = self.output(n);
        let tokens = self.output(rows);
        sample_prepare::launch::<R>(
            self.client(),
            cubes(rows),
            CubeDim::new_1d(SAMPLE_BLOCK as u32),
            arg(logits, n),
            arg(&probs, n),
            arg(&tokens, rows),
            rows as u32,
            vocab as u32,
            temperature,
            greedy,
            SAMPLE_BLOCK,
        );
        if !greedy {
            let d = self.upload(draws);
            let (count, dim) = (cubes(rows), CubeDim::new_1d(SAMPLE_BLOCK as u32));
            let (p, dr, t) = (arg(&probs, n), arg(&d, rows), arg(&tokens, rows));
            let (rows_u, vocab_u) = (rows as u32, vocab as u32);
            if top_p < 1.0 {
                sample_pick::launch::<R>(
                    self.client(),
                    count,
                    dim,
                    p,
                    dr,
                    t,
                    rows_u,
                    vocab_u,
                    top_p,
                    SAMPLE_BLOCK,
                );
            } else {
                sample_pick_ordered::launch::<R>(
                    self.client(),
                    count,
                    dim,
                    p,
                    dr,
                    t,
                    rows_u,
                    vocab_u,
                    SAMPLE_BLOCK,
                );
            }
        }
        // Anything but a whole number ≥ 0 (the −1 mark, or a NaN) is a row
        // with a non-finite logit.
        Ok(self
            .download(tokens, rows)?
            .into_iter()
            .map(|t| if t >= 0.0 { t as i32 } else { NON_FINITE })
            .collect())
    }
}
