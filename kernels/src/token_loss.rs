//! The policy losses (`Op::TokenLoss`) and their gradients with respect to
//! the log-probs (`Op::TokenLossGrad`) as hand-written kernels over `[B,
//! T]` tokens. Each token's term `ℓ` and slope `∂ℓ/∂logπ` (SFT, or the RL
//! loss's ratio, clip and min or CISPO's weight, and its KL estimate) are
//! computed in registers by one helper and never stored, so a loss is one
//! launch and its gradient one launch.
//!
//! - loss: one cube. The cube sums `mask · ℓ` and `mask`, over the whole
//!   batch for the token mean (and Dr. GRPO's constant normaliser),
//!   sequence by sequence for the sequence mean or GSPO's sequence ratio
//!   (each sequence's ratio summed first); unit 0 writes `L`.
//! - gradient: one cube per sequence. The cube first sums what its weights
//!   need (the batch's mask for the token mean; for the sequence mean its
//!   own sequence's, and each unit a share of the sequences serially for
//!   the number with a response token) and its sequence's ratio for GSPO,
//!   then writes `gout · w ∘ ∂ℓ/∂logπ` over its sequence.
//!
//! The clip range, the KL coefficient and the constant normaliser are
//! launch arguments, so one compiled kernel serves every value; the loss
//! kind, surrogate, ratio level, KL estimator and aggregation are comptime.

use crate::sample::cube_sum;
use coopc_ir::{KlEstimator, TokenAgg, TokenLoss};
use cubecl::prelude::*;

/// Units per cube (a power of two: the cube-wide sums fold halves).
pub const LOSS_BLOCK: usize = 256;

/// What a token-loss kernel is specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossSpec {
    /// The RL loss (else SFT's `−logπ`).
    pub grpo: bool,
    /// CISPO's surrogate (else PPO's clip).
    pub cispo: bool,
    /// GSPO's sequence ratio (else per token).
    pub seq_ratio: bool,
    /// The KL term's estimator against reference log-probs: 0 without the
    /// term, else 1, 2 or 3 (k1, k2, k3).
    pub kl: u32,
    /// The mean per sequence first.
    pub seq_mean: bool,
    /// Dr. GRPO's `Σ mask ℓ / (B · norm)`.
    pub seq_sum: bool,
}

impl LossSpec {
    pub fn of(loss: TokenLoss) -> LossSpec {
        LossSpec {
            grpo: matches!(loss, TokenLoss::Grpo { .. }),
            cispo: loss.cispo(),
            seq_ratio: loss.seq_ratio(),
            kl: if loss.has_kl() {
                match loss.kl_estimator() {
                    KlEstimator::K1 => 1,
                    KlEstimator::K2 => 2,
                    KlEstimator::K3 => 3,
                }
            } else {
                0
            },
            seq_mean: loss.agg() == TokenAgg::SeqMean,
            seq_sum: matches!(loss.agg(), TokenAgg::SeqSum { .. }),
        }
    }

    /// The launch arguments `(1 − clip_low, 1 + clip_high, kl_coef, 1 / (B
    /// · norm))` of a loss over `rows` sequences (zeros for what the loss
    /// reads none of), rounded once from f64 as the CPU executor rounds
    /// them.
    pub fn hyper(loss: TokenLoss, rows: usize) -> [f32; 4] {
        let (lo, hi) = loss.ratio_range().unwrap_or((0.0, 0.0));
        let scale = match loss.agg() {
            TokenAgg::SeqSum { norm } => 1.0 / (rows as f64 * norm.get()),
            _ => 0.0,
        };
        [lo as f32, hi as f32, loss.kl_coef() as f32, scale as f32]
    }
}

/// Token `i`'s (of sequence `row`) term `ℓ` and slope `∂ℓ/∂logπ`. SFT:
/// `(−logπ, −1)`. RL: the ratio `ρ = exp(logπ − old)`, or `srat` (the
/// sequence's ratio) for GSPO's; PPO's clip `ℓ = −min(ρA, clip(ρ, lo,
/// hi)A)`, the slope `−Aρ` where `ρA` wins the min (ties included) or `lo
/// ≤ ρ ≤ hi` (else 0); CISPO's `ℓ = −clip(ρ, lo, hi) A logπ`, slope
/// `−clip(ρ, lo, hi) A`; plus `β ·` the KL estimate of `κ = ref − logπ`
/// and its slope. Both differences are 0 off the response, where the
/// slope is 0.
#[cube]
#[allow(clippy::too_many_arguments)]
fn token_term(
    logp: &Array<f32>,
    mask: &Array<f32>,
    old: &Array<f32>,
    adv: &Array<f32>,
    refp: &Array<f32>,
    i: usize,
    row: usize,
    srat: f32,
    lo: f32,
    hi: f32,
    beta: f32,
    #[comptime] spec: LossSpec,
) -> (f32, f32) {
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let lp = logp[i];
    let mut value = zero - lp;
    let mut slope = zero - f32::new(1.0);
    if comptime!(spec.grpo) {
        let on = mask[i] > zero;
        let mut ratio = srat;
        if comptime!(!spec.seq_ratio) {
            let d = select(on, lp - old[i], zero);
            ratio = d.exp();
        }
        let a = adv[row];
        let clamped = select(ratio < lo, lo, select(ratio > hi, hi, ratio));
        if comptime!(spec.cispo) {
            let coef = clamped * a;
            value = zero - coef * select(on, lp, zero);
            slope = zero - coef;
        } else {
            let unclipped = ratio * a;
            let clipped = clamped * a;
            let first = unclipped <= clipped;
            // `min` returns its first operand when that is NaN, as the IR's does.
            value = zero - select(unclipped.is_nan() || first, unclipped, clipped);
            let passed = select(ratio < lo, zero, select(ratio > hi, zero, a));
            slope = zero - select(first, a, passed) * ratio;
        }
        if comptime!(spec.kl > 0) {
            let diff = select(on, refp[i] - lp, zero);
            if comptime!(spec.kl == 1) {
                value += (zero - diff) * beta;
                slope += beta;
            }
            if comptime!(spec.kl == 2) {
                value += diff * diff * f32::new(0.5) * beta;
                slope += (zero - diff) * beta;
            }
            if comptime!(spec.kl == 3) {
                let e = diff.exp();
                value += (e - diff - f32::new(1.0)) * beta;
                slope += (f32::new(1.0) - e) * beta;
            }
        }
        slope = select(on, slope, zero);
    }
    (value, slope)
}

/// GSPO's ratio of the sequence at tokens `start..end`: `exp(Σ mask δ /
/// n)` with `δ = logπ − old` on response tokens (0 elsewhere) and `n` the
/// mask sum (1 where it is 0). Every unit of the cube must call it.
#[cube]
fn sequence_ratio(
    logp: &Array<f32>,
    mask: &Array<f32>,
    old: &Array<f32>,
    start: usize,
    end: usize,
    shared: &mut SharedMemory<f32>,
    #[comptime] block: usize,
) -> f32 {
    let tid = UNIT_POS as usize;
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut num = zero;
    let mut cnt = zero;
    let mut i = start + tid;
    while i < end {
        let d = select(mask[i] > zero, logp[i] - old[i], zero);
        num += d * mask[i];
        cnt += mask[i];
        i += block;
    }
    let num = cube_sum(num, shared, tid);
    let cnt = cube_sum(cnt, shared, tid);
    (num / select(cnt > zero, cnt, f32::new(1.0))).exp()
}

/// The cube's sums of `mask · ℓ` and `mask` over tokens `start..end`
/// (with the sequence ratio `srat` for GSPO's, one sequence's tokens).
#[cube]
#[allow(clippy::too_many_arguments)]
fn masked_sums(
    logp: &Array<f32>,
    mask: &Array<f32>,
    old: &Array<f32>,
    adv: &Array<f32>,
    refp: &Array<f32>,
    start: usize,
    end: usize,
    cols: usize,
    srat: f32,
    lo: f32,
    hi: f32,
    beta: f32,
    shared: &mut SharedMemory<f32>,
    #[comptime] spec: LossSpec,
    #[comptime] block: usize,
) -> (f32, f32) {
    let tid = UNIT_POS as usize;
    let mut num = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut den = num;
    let mut i = start + tid;
    while i < end {
        let (value, _) = token_term(
            logp,
            mask,
            old,
            adv,
            refp,
            i,
            i / cols,
            srat,
            lo,
            hi,
            beta,
            spec,
        );
        num += value * mask[i];
        den += mask[i];
        i += block;
    }
    let num = cube_sum(num, shared, tid);
    let den = cube_sum(den, shared, tid);
    (num, den)
}

/// `out[0] = L` over `rows × cols` tokens; launch one cube of `block`
/// units.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn token_loss(
    logp: &Array<f32>,
    mask: &Array<f32>,
    old: &Array<f32>,
    adv: &Array<f32>,
    refp: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    cols: u32,
    lo: f32,
    hi: f32,
    beta: f32,
    scale: f32,
    #[comptime] spec: LossSpec,
    #[comptime] block: usize,
) {
    let (rows, cols) = (rows as usize, cols as usize);
    let mut shared = SharedMemory::<f32>::new(block);
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    // Segments of tokens summed in turn: the sequences for the sequence
    // mean or ratio, the whole batch as one otherwise.
    let mut segments = rows * 0usize + 1usize;
    let mut len = rows * cols;
    if comptime!(spec.seq_mean || spec.seq_ratio) {
        segments = rows;
        len = cols;
    }
    let mut total = zero;
    let mut count = zero;
    let mut b = rows * 0usize;
    while b < segments {
        let mut srat = zero + f32::new(1.0);
        if comptime!(spec.seq_ratio) {
            srat = sequence_ratio(logp, mask, old, b * len, (b + 1) * len, &mut shared, block);
        }
        let (num, cnt) = masked_sums(
            logp,
            mask,
            old,
            adv,
            refp,
            b * len,
            (b + 1) * len,
            cols,
            srat,
            lo,
            hi,
            beta,
            &mut shared,
            spec,
            block,
        );
        if comptime!(spec.seq_mean) {
            // As the reference: `num / n_b · [n_b > 0]` with n_b = 1 where 0.
            let has = cnt > zero;
            let flag = select(has, f32::new(1.0), zero);
            total += num / select(has, cnt, f32::new(1.0)) * flag;
            count += flag;
        } else {
            total += num;
            count += cnt;
        }
        b += 1usize;
    }
    if UNIT_POS == 0 {
        // A mean over no token (or no sequence) is 0: its sum is 0 too.
        let mut l = total / select(count > zero, count, zero + f32::new(1.0));
        if comptime!(spec.seq_sum) {
            l = total * scale;
        }
        out[0usize] = l;
    }
}

/// The cube's sum of `mask[start..end]`.
#[cube]
fn mask_sum(
    mask: &Array<f32>,
    start: usize,
    end: usize,
    shared: &mut SharedMemory<f32>,
    #[comptime] block: usize,
) -> f32 {
    let tid = UNIT_POS as usize;
    let mut s = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut i = start + tid;
    while i < end {
        s += mask[i];
        i += block;
    }
    cube_sum(s, shared, tid)
}

/// `out = gout[0] · w ∘ ∂ℓ/∂logπ [rows, cols]`, with `w = mask / Σ mask`
/// (token mean), `mask · [n_b > 0] / (n_b · #{b : n_b > 0})` (sequence
/// mean) or `mask · scale` (Dr. GRPO's, `scale = 1 / (B · norm)`); launch
/// one cube of `block` units per sequence.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn token_loss_grad(
    logp: &Array<f32>,
    mask: &Array<f32>,
    old: &Array<f32>,
    adv: &Array<f32>,
    refp: &Array<f32>,
    gout: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    cols: u32,
    lo: f32,
    hi: f32,
    beta: f32,
    scale: f32,
    #[comptime] spec: LossSpec,
    #[comptime] block: usize,
) {
    let row = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if row >= rows as usize {
        terminate!();
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let mut shared = SharedMemory::<f32>::new(block);
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let one = zero + f32::new(1.0);
    // Token mean: w = mask / den; sequence mean: w = mask · per; Dr.
    // GRPO's: w = mask · scale.
    let mut den = one;
    let mut per = one;
    if comptime!(spec.seq_mean) {
        // Sequences with a response token: unit u sums sequences u, u +
        // block, … serially, then one cube-wide sum of the flags.
        let mut flags = zero;
        let mut b = UNIT_POS as usize;
        while b < rows {
            let mut cnt = zero;
            let mut t = b * cols;
            while t < (b + 1) * cols {
                cnt += mask[t];
                t += 1usize;
            }
            flags += select(cnt > zero, one, zero);
            b += block;
        }
        let n = cube_sum(flags, &mut shared, UNIT_POS as usize);
        let n = select(n > zero, n, one);
        let own = mask_sum(mask, row * cols, (row + 1) * cols, &mut shared, block);
        let has = own > zero;
        per = select(has, one, zero) / (select(has, own, one) * n);
    } else if comptime!(spec.seq_sum) {
        per = scale;
    } else {
        let s = mask_sum(mask, 0usize, rows * cols, &mut shared, block);
        den = select(s > zero, s, one);
    }
    let mut srat = one;
    if comptime!(spec.seq_ratio) {
        srat = sequence_ratio(
            logp,
            mask,
            old,
            row * cols,
            (row + 1) * cols,
            &mut shared,
            block,
        );
    }
    let g = gout[0usize];
    let mut t = UNIT_POS as usize;
    while t < cols {
        let i = row * cols + t;
        let (_, slope) = token_term(logp, mask, old, adv, refp, i, row, srat, lo, hi, beta, spec);
        let mut w = mask[i] / den;
        if comptime!(spec.seq_mean || spec.seq_sum) {
            w = mask[i] * per;
        }
        out[i] = g * (w * slope);
        t += block;
    }
}
