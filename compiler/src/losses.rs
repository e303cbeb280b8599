//! The SFT loss and the GRPO surrogate as IR, over per-token log-probs
//! [B, T] and masks [B, T] (1 on response tokens). Semantics: docs/semantics.md §4.
//!
//! Each loss is one `token_loss` op, which executors run as one pass over
//! the tokens, and its gradient with respect to the log-probs one
//! `token_loss_grad` op; `reference_loss` and `reference_grad` write the
//! same computations with ordinary ops (their derivatives are the ops').

use crate::ir::{CompareOp, Graph, KlEstimator, NodeId, Scalar, TokenAgg, TokenLoss};
use crate::spec::{LossAgg, RlSpec};

/// `−Σ mask · logπ / Σ mask` over the whole batch (one `token_loss` op).
pub fn sft_loss(g: &mut Graph, logp: NodeId, mask: NodeId) -> NodeId {
    g.token_loss(TokenLoss::Sft, &[logp, mask])
}

/// The RL batch of one step, as graph nodes.
#[derive(Clone, Copy, Debug)]
pub struct RlBatch {
    pub input_ids: NodeId,
    /// [B, T], 1 on response tokens.
    pub loss_mask: NodeId,
    /// [B]
    pub advantages: NodeId,
    /// [B, T] log-probs of the sampling policy.
    pub old_logprobs: NodeId,
    /// [B, T] log-probs of the reference policy (used when kl_coef > 0).
    pub ref_logprobs: Option<NodeId>,
}

/// The GRPO loss of `rl` as an IR attribute: its clip range, the KL term
/// when it is in the loss, the aggregation (Dr. GRPO's constant is
/// `max_new_tokens`), the ratio level and the surrogate.
pub fn grpo(rl: &RlSpec) -> TokenLoss {
    TokenLoss::Grpo {
        clip_low: Scalar(rl.clip_low),
        clip_high: Scalar(rl.clip_high),
        kl_coef: Scalar(rl.loss_kl_coef()),
        kl: rl.kl_estimator,
        agg: match rl.loss_agg {
            LossAgg::TokenMean => TokenAgg::TokenMean,
            LossAgg::SeqMean => TokenAgg::SeqMean,
            LossAgg::SeqMeanTokenSumNorm => TokenAgg::SeqSum {
                norm: Scalar(rl.max_new_tokens as f64),
            },
        },
        ratio: rl.ratio_level,
        surrogate: rl.loss,
    }
}

/// The operands of `rl`'s GRPO loss of `logp` over `batch`: `(logπ, mask,
/// old, A)`, and `ref` with a KL term.
pub fn grpo_operands(rl: &RlSpec, logp: NodeId, batch: &RlBatch) -> Vec<NodeId> {
    let mut ops = vec![logp, batch.loss_mask, batch.old_logprobs, batch.advantages];
    if grpo(rl).has_kl() {
        ops.push(
            batch
                .ref_logprobs
                .expect("ref_logprobs are needed with a KL term in the loss"),
        );
    }
    ops
}

/// The GRPO loss of a batch (one `token_loss` op).
pub fn grpo_loss(g: &mut Graph, rl: &RlSpec, logp: NodeId, batch: &RlBatch) -> NodeId {
    let ops = grpo_operands(rl, logp, batch);
    g.token_loss(grpo(rl), &ops)
}

/// How many of this process's rows or tokens a loss aggregated with `agg`
/// averages over (a scalar of the mask's dtype): the mask's sum for the
/// token mean (and SFT), the rows with a response token for the sequence
/// mean, all rows for Dr. GRPO's sequence sum.
pub fn agg_count(g: &mut Graph, agg: TokenAgg, mask: NodeId) -> NodeId {
    match agg {
        TokenAgg::TokenMean => g.sum_all(mask),
        TokenAgg::SeqMean => {
            let (cnt, has, _) = row_counts(g, mask);
            let hasf = g.cast(has, g.ty(cnt).dtype);
            g.sum_all(hasf)
        }
        TokenAgg::SeqSum { .. } => {
            let ty = g.ty(mask);
            let (rows, dtype) = (ty.shape[0] as f64, ty.dtype);
            g.full(rows, dtype, vec![])
        }
    }
}

/// A count `n` (a mask's sum, or of sequences with a response token) as a
/// divisor: 1 where it is 0, so that a mean over nothing is 0 (its sum is
/// 0 too), not 0/0.
pub fn safe_count(g: &mut Graph, n: NodeId) -> NodeId {
    let zero = g.full_like(0.0, n);
    let has = g.compare(CompareOp::Gt, n, zero);
    let one = g.full_like(1.0, n);
    g.select(has, n, one)
}

/// Each sequence's mask sum `n_b` [B], whether it has a response token
/// (`n_b > 0`), and `n_b` with 1 where it is 0 (a safe divisor).
fn row_counts(g: &mut Graph, mask: NodeId) -> (NodeId, NodeId, NodeId) {
    let cnt = g.sum(mask, &[1], false);
    let zero = g.full_like(0.0, cnt);
    let has = g.compare(CompareOp::Gt, cnt, zero);
    let one = g.full_like(1.0, cnt);
    let safe = g.select(has, cnt, one);
    (cnt, has, safe)
}

/// GRPO's per-token values with ordinary ops: the response test `mask >
/// 0`, the ratio (`exp(logπ − old)`, 1 off the response, or GSPO's
/// sequence ratio broadcast over the sequence), the advantages broadcast
/// to `[B, T]`, `ρA` and `clip(ρ, lo, hi)·A`, and the KL difference `κ =
/// ref − logπ` (0 off the response) when the loss has the term.
struct Surrogate {
    on: NodeId,
    ratio: NodeId,
    adv: NodeId,
    unclipped: NodeId,
    clipped: NodeId,
    kl_diff: Option<NodeId>,
}

fn surrogate(g: &mut Graph, loss: TokenLoss, (lo, hi): (f64, f64), ops: &[NodeId]) -> Surrogate {
    let (logp, mask, old) = (ops[0], ops[1], ops[2]);
    let shape = g.ty(logp).shape.clone();
    let zero = g.full_like(0.0, mask);
    let on = g.compare(CompareOp::Gt, mask, zero);
    // Garbage (even NaN) off the response is dropped.
    let d = g.sub(logp, old);
    let d = g.select(on, d, zero);
    let ratio = if loss.seq_ratio() {
        // exp(Σ_t mask δ / n_b), n_b taken as 1 where it is 0 (then δ = 0).
        let weighted = g.mul(d, mask);
        let num = g.sum(weighted, &[1], false);
        let (_, _, safe) = row_counts(g, mask);
        let mean = g.div(num, safe);
        let s = g.exp(mean);
        let s = g.reshape(s, vec![shape[0], 1]);
        g.broadcast(s, shape.clone())
    } else {
        g.exp(d)
    };
    let adv = g.reshape(ops[3], vec![shape[0], 1]);
    let adv = g.broadcast(adv, shape);
    let unclipped = g.mul(ratio, adv);
    let clipped = g.clamp(ratio, lo, hi);
    let clipped = g.mul(clipped, adv);
    let kl_diff = loss.has_kl().then(|| {
        let diff = g.sub(ops[4], logp);
        g.select(on, diff, zero)
    });
    Surrogate {
        on,
        ratio,
        adv,
        unclipped,
        clipped,
        kl_diff,
    }
}

/// `β ·` the KL estimate of `κ` and its derivative with respect to logπ
/// (`∂κ/∂logπ = −1`): k1 `(−κ, 1)`, k2 `(κ²/2, −κ)`, k3 `(e^κ − κ − 1, 1 −
/// e^κ)`.
fn kl_term(g: &mut Graph, loss: TokenLoss, diff: NodeId) -> (NodeId, NodeId) {
    let beta = loss.kl_coef();
    let (value, slope) = match loss.kl_estimator() {
        KlEstimator::K1 => {
            let value = g.neg(diff);
            (value, g.full_like(1.0, diff))
        }
        KlEstimator::K2 => {
            let sq = g.mul(diff, diff);
            let value = g.scale(sq, 0.5);
            (value, g.neg(diff))
        }
        KlEstimator::K3 => {
            let e = g.exp(diff);
            let k3 = g.sub(e, diff);
            let one = g.full_like(1.0, k3);
            let value = g.sub(k3, one);
            let slope = g.sub(one, e);
            (value, slope)
        }
    };
    (g.scale(value, beta), g.scale(slope, beta))
}

/// Per-token terms ℓ [B, T] of `loss` over operands `ops` (zero weight not
/// yet applied), with ordinary ops. GRPO: `−min(ρA, clip(ρ, 1−clip_low,
/// 1+clip_high)·A)` or CISPO's `−sg(clip(ρ, …))·A·logπ`, plus `β ·` the KL
/// estimate.
pub fn token_terms(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let Some(range) = loss.ratio_range() else {
        return g.neg(ops[0]);
    };
    let s = surrogate(g, loss, range, ops);
    let terms = if loss.cispo() {
        let (lo, hi) = range;
        let weight = g.clamp(s.ratio, lo, hi);
        let weight = g.stop_gradient(weight);
        let weight = g.mul(weight, s.adv);
        let zero = g.full_like(0.0, ops[0]);
        let lp = g.select(s.on, ops[0], zero);
        let t = g.mul(weight, lp);
        g.neg(t)
    } else {
        // `min` returns (and credits) its first operand on ties.
        let min = g.min(s.unclipped, s.clipped);
        g.neg(min)
    };
    let Some(diff) = s.kl_diff else {
        return terms;
    };
    let (kl, _) = kl_term(g, loss, diff);
    g.add(terms, kl)
}

/// `Op::TokenLoss` written with ordinary ops: its per-token terms
/// aggregated with the mask's weights.
pub fn reference_loss(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let terms = token_terms(g, loss, ops);
    aggregate_with(g, loss.agg(), terms, ops[1])
}

/// The weights `w [B, T]` of `L = Σ w ∘ ℓ` (see `TokenAgg`).
fn token_weights(g: &mut Graph, agg: TokenAgg, mask: NodeId) -> NodeId {
    let shape = g.ty(mask).shape.clone();
    match agg {
        TokenAgg::TokenMean => {
            let den = g.sum_all(mask);
            let den = safe_count(g, den);
            let den = g.broadcast(den, shape);
            g.div(mask, den)
        }
        TokenAgg::SeqSum { norm } => g.scale(mask, 1.0 / (shape[0] as f64 * norm.get())),
        TokenAgg::SeqMean => {
            let (cnt, has, safe) = row_counts(g, mask);
            let hasf = g.cast(has, g.ty(cnt).dtype);
            let n = g.sum_all(hasf);
            let n = safe_count(g, n);
            let n = g.broadcast(n, vec![shape[0]]);
            let den = g.mul(safe, n);
            let per = g.div(hasf, den);
            let per = g.reshape(per, vec![shape[0], 1]);
            let per = g.broadcast(per, shape);
            g.mul(mask, per)
        }
    }
}

/// `∂ℓ/∂logπ [B, T]` of the per-token terms, with ordinary ops: `−1` for
/// SFT; for PPO's clip `−A·ρ` where the unclipped term wins the `min` or
/// the ratio is inside the clip range (else 0), for CISPO `−clip(ρ)·A`;
/// plus the KL term's, all zero off the response. With the sequence ratio
/// this is `∂ℓ/∂log s` (see `TokenLoss::Grpo`).
fn token_slopes(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let Some((lo, hi)) = loss.ratio_range() else {
        return g.full_like(-1.0, ops[0]);
    };
    let s = surrogate(g, loss, (lo, hi), ops);
    let zero = g.full_like(0.0, s.ratio);
    let mut slope = if loss.cispo() {
        // The weight is a constant of the loss, not of its gradient: the
        // update `θ − lr·∇L` depends on θ through it, and second-order
        // hypergradients differentiate that.
        let weight = g.clamp(s.ratio, lo, hi);
        let coef = g.mul(weight, s.adv);
        g.neg(coef)
    } else {
        // The clamp passes the gradient where lo ≤ ρ ≤ hi.
        let (lo, hi) = (g.full_like(lo, s.ratio), g.full_like(hi, s.ratio));
        let below = g.compare(CompareOp::Lt, s.ratio, lo);
        let above = g.compare(CompareOp::Gt, s.ratio, hi);
        let passed = g.select(above, zero, s.adv);
        let passed = g.select(below, zero, passed);
        let first = g.compare(CompareOp::Le, s.unclipped, s.clipped);
        let coef = g.select(first, s.adv, passed);
        let slope = g.mul(coef, s.ratio);
        g.neg(slope)
    };
    if let Some(diff) = s.kl_diff {
        let (_, k) = kl_term(g, loss, diff);
        slope = g.add(slope, k);
    }
    g.select(s.on, slope, zero)
}

/// `Op::TokenLossGrad` written with ordinary ops: `gout · w ∘ ∂ℓ/∂logπ`
/// (the derivative of [`reference_loss`] with respect to logπ).
pub fn reference_grad(g: &mut Graph, loss: TokenLoss, ops: &[NodeId], gout: NodeId) -> NodeId {
    let shape = g.ty(ops[0]).shape.clone();
    let w = token_weights(g, loss.agg(), ops[1]);
    let s = token_slopes(g, loss, ops);
    let gb = g.reshape(gout, vec![1, 1]);
    let gb = g.broadcast(gb, shape);
    let ws = g.mul(w, s);
    g.mul(gb, ws)
}

/// `Σ w ∘ v` of per-token values `v [B, T]` with the weights of `agg`.
pub fn aggregate_with(g: &mut Graph, agg: TokenAgg, per_token: NodeId, mask: NodeId) -> NodeId {
    let weighted = g.mul(per_token, mask);
    match agg {
        TokenAgg::TokenMean => {
            let num = g.sum_all(weighted);
            let den = g.sum_all(mask);
            let den = safe_count(g, den);
            g.div(num, den)
        }
        TokenAgg::SeqSum { norm } => {
            let rows = g.ty(mask).shape[0] as f64;
            let num = g.sum_all(weighted);
            g.scale(num, 1.0 / (rows * norm.get()))
        }
        TokenAgg::SeqMean => {
            let num = g.sum(weighted, &[1], false);
            let (cnt, has, safe) = row_counts(g, mask);
            let per_seq = g.div(num, safe);
            let dt = g.ty(cnt).dtype;
            let hasf = g.cast(has, dt);
            let per_seq = g.mul(per_seq, hasf);
            let total = g.sum_all(per_seq);
            let n = g.sum_all(hasf);
            let n = safe_count(g, n);
            g.div(total, n)
        }
    }
}
