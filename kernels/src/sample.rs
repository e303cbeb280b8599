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
//! [`sample_pick`] (a nucleus: thresholds found by bisection over the
//! probabilities' bits, about 64 passes over the row, no sort) picks the
//! token.

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

/// The sum (or with `take_max` the maximum) over the cube of each unit's
/// `x`, by a tree in `shared` (one slot per unit); every unit gets it, and
/// `shared` may be reused on return. Every unit of the cube must call it.
#[cube]
fn cube_fold(
    x: f32,
    shared: &mut SharedMemory<f32>,
    tid: usize,
    #[comptime] take_max: bool,
) -> f32 {
    shared[tid] = x;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride {
            let (a, b) = (shared[tid], shared[tid + stride]);
            shared[tid] = if take_max { max(a, b) } else { a + b };
        }
        sync_cube();
        stride /= 2usize;
    }
    let total = shared[0usize];
    sync_cube();
    total
}

/// The sum over the cube of each unit's `x` (see [`cube_fold`]).
#[cube]
pub(crate) fn cube_sum(x: f32, shared: &mut SharedMemory<f32>, tid: usize) -> f32 {
    cube_fold(x, shared, tid, false)
}

/// The maximum over the cube of each unit's `x` (see [`cube_fold`]).
#[cube]
pub(crate) fn cube_max(x: f32, shared: &mut SharedMemory<f32>, tid: usize) -> f32 {
    cube_fold(x, shared, tid, true)
}

/// The smallest of the cube's units' `x`, by a tree in `shared` (one slot
/// per unit); every unit gets it. Every unit of the cube must call it.
#[cube]
fn cube_min_u32(x: u32, shared: &mut SharedMemory<u32>, tid: usize) -> u32 {
    shared[tid] = x;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride {
            shared[tid] = min(shared[tid], shared[tid + stride]);
        }
        sync_cube();
        stride /= 2usize;
    }
    shared[0usize]
}

/// Whether `sample_prepare` marked a row's token slot as non-finite (−1),
/// or left NaN there because something went wrong.
#[cube]
fn flagged(token: f32) -> bool {
    token < f32::new(0.0) || token.is_nan()
}

/// The mass of the row's probabilities above `x` (`p > x`, or `p ≥ x`
/// with `inclusive`), for every unit of the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mass_above(
    probs: &Array<f32>,
    base: usize,
    v: usize,
    x: f32,
    shared: &mut SharedMemory<f32>,
    tid: usize,
    #[comptime] inclusive: bool,
    #[comptime] block: usize,
) -> f32 {
    let mut s = f32::cast_from(UNIT_POS * 0u32);
    let mut i = tid;
    while i < v {
        let p = probs[base + i];
        let inside = if inclusive { p >= x } else { p > x };
        if inside {
            s += p;
        }
        i += block;
    }
    cube_sum(s, shared, tid)
}

/// How many of the row's probabilities equal `y`, for every unit.
#[cube]
#[allow(clippy::too_many_arguments)]
fn count_equal(
    probs: &Array<f32>,
    base: usize,
    v: usize,
    y: f32,
    shared: &mut SharedMemory<f32>,
    tid: usize,
    #[comptime] block: usize,
) -> f32 {
    let mut c = f32::cast_from(UNIT_POS * 0u32);
    let mut i = tid;
    while i < v {
        if probs[base + i] == y {
            c += f32::new(1.0);
        }
        i += block;
    }
    cube_sum(c, shared, tid)
}

/// Per row not marked non-finite by [`sample_prepare`], for `top_p < 1`,
/// in the order of decreasing probability (ties by index): the nucleus
/// is the tokens whose mass before them is below `top_p` (the first
/// always), and the token is the first kept one whose running mass
/// exceeds `draws[r] · nucleus mass` — or the last kept one when rounding
/// (or a zero probability) leaves none.
///
/// No sort: with `G(x)` the mass of the probabilities above `x`, the
/// nucleus is every token above `v* = min{x : G(x) < top_p}` and the first
/// `c` tokens (by index) equal to `v*`, `c` the ties for which `G(v*) + q
/// v* < top_p`; the chosen token's probability `y` is the largest with
/// `G(y) + ties(y) · y > target`, and among the ties of `y` it is the one
/// of rank `⌊(target − G(y)) / y⌋`. Each threshold is a bisection over the
/// bits of non-negative f32 (ordered as the numbers are), each step one
/// pass over the row: `O(32 · V / block)` per unit.
#[cube(launch)]
#[allow(clippy::too_many_arguments, unused_assignments)]
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
    let zero = f32::cast_from(UNIT_POS * 0u32);
    let one = zero + f32::new(1.0);
    // The largest and the smallest probability.
    let mut pm = zero;
    let mut pn = one;
    let mut i = tid;
    while i < v {
        let p = probs[base + i];
        pm = max(pm, p);
        pn = min(pn, p);
        i += block;
    }
    let pmax = cube_max(pm, &mut sums, tid);
    let pmin = zero - cube_max(zero - pn, &mut sums, tid);
    // v*: the smallest x in [pmin, pmax] with G(x) < top_p — a probability
    // of the row: pmax when top_p ≤ 0 (the first token is always kept),
    // pmin when rounding leaves the whole row's mass below top_p (all kept).
    let mut lo = u32::reinterpret(pmin);
    let mut hi = u32::reinterpret(pmax);
    while lo < hi {
        let mid = lo + (hi - lo) / 2u32;
        let g = mass_above(
            probs,
            base,
            v,
            f32::reinterpret(mid),
            &mut sums,
            tid,
            false,
            block,
        );
        if g < top_p {
            hi = mid;
        } else {
            lo = mid + 1u32;
        }
    }
    let vstar = f32::reinterpret(lo);
    let g_star = mass_above(probs, base, v, vstar, &mut sums, tid, false, block);
    let ties_star = count_equal(probs, base, v, vstar, &mut sums, tid, block);
    // Ties kept: q < (top_p − G(v*)) / v*, at least one.
    let c = clamp((top_p - g_star) / vstar, one, ties_star);
    let c = select(c > c.floor(), c.floor() + one, c);
    let c = min(c, ties_star);
    let target = draws[r] * (g_star + c * vstar);
    // The chosen token's probability y and its rank among y's ties.
    let mut y = vstar;
    let mut q = zero;
    if target < g_star {
        // Above v*: the largest x with G(x) + ties · x = Σ_{p ≥ x} p > target.
        let mut a = u32::reinterpret(vstar) + 1u32;
        let mut b = u32::reinterpret(pmax);
        while a < b {
            let mid = a + (b - a).div_ceil(2u32);
            let h = mass_above(
                probs,
                base,
                v,
                f32::reinterpret(mid),
                &mut sums,
                tid,
                true,
                block,
            );
            if h > target {
                a = mid;
            } else {
                b = mid - 1u32;
            }
        }
        y = f32::reinterpret(a);
        let g_y = mass_above(probs, base, v, y, &mut sums, tid, false, block);
        let ties_y = count_equal(probs, base, v, y, &mut sums, tid, block);
        q = clamp(((target - g_y) / y).floor(), zero, ties_y - one);
    } else {
        // Among the kept ties of v* (the last one when v* is 0 or rounding
        // overshoots).
        let k = select(vstar > zero, ((target - g_star) / vstar).floor(), c - one);
        q = clamp(k, zero, c - one);
    }
    // The token: the tie of y of rank q in index order. Each unit counts
    // the ties in a contiguous chunk; the chunks before it give its first
    // rank.
    let mut part = SharedMemory::<f32>::new(block);
    let mut found = SharedMemory::<u32>::new(block);
    let chunk = v.div_ceil(block);
    let start = min(tid * chunk, v);
    let end = min(start + chunk, v);
    let mut n_here = zero;
    let mut j = start;
    while j < end {
        if probs[base + j] == y {
            n_here += one;
        }
        j += 1usize;
    }
    part[tid] = n_here;
    sync_cube();
    let mut before = zero;
    let mut w = tid * 0usize;
    while w < tid {
        before += part[w];
        w += 1usize;
    }
    let none = v as u32;
    let mut f = none;
    let mut rank = before;
    let mut k2 = start;
    while k2 < end {
        if probs[base + k2] == y {
            if rank == q {
                f = k2 as u32;
            }
            rank += one;
        }
        k2 += 1usize;
    }
    let first = cube_min_u32(f, &mut found, tid);
    if tid == 0 && !flagged {
        tokens[r] = f32::cast_from(first);
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
    let first = cube_min_u32(f, &mut found, tid);
    if tid == 0 && !flagged {
        let chosen = select(first != none, first, none - 1u32);
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
