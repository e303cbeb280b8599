//! The SFT loss and the GRPO surrogate as IR, over per-token log-probs
//! [B, T] and masks [B, T] (1 on response tokens). Semantics: DESIGN §1.
//!
//! Each loss is one `token_loss` op, which executors run as one pass over
//! the tokens, and its gradient with respect to the log-probs one
//! `token_loss_grad` op; `reference_loss` and `reference_grad` write the
//! same computations with ordinary ops (their derivatives are the ops').

use crate::ir::{CompareOp, Graph, NodeId, Scalar, TokenLoss};
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

/// `select(mask > 0, x, 0)`: garbage (even NaN) at masked positions is dropped.
fn where_response(g: &mut Graph, mask: NodeId, x: NodeId) -> NodeId {
    let zero = g.full_like(0.0, mask);
    let on = g.compare(CompareOp::Gt, mask, zero);
    let z = g.full_like(0.0, x);
    g.select(on, x, z)
}

/// The GRPO loss of `rl` as an IR attribute.
pub fn grpo(rl: &RlSpec) -> TokenLoss {
    TokenLoss::Grpo {
        clip_low: Scalar(rl.clip_low),
        clip_high: Scalar(rl.clip_high),
        kl_coef: Scalar(rl.kl_coef),
        seq_mean: rl.loss_agg == LossAgg::SeqMean,
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
                .expect("ref_logprobs are needed when kl_coef > 0"),
        );
    }
    ops
}

/// The GRPO loss of a batch (one `token_loss` op).
pub fn grpo_loss(g: &mut Graph, rl: &RlSpec, logp: NodeId, batch: &RlBatch) -> NodeId {
    let ops = grpo_operands(rl, logp, batch);
    g.token_loss(grpo(rl), &ops)
}

/// Per-token terms ℓ [B, T] of `loss` over operands `ops` (zero weight not
/// yet applied), with ordinary ops. GRPO: `−min(ρA, clip(ρ, 1−clip_low,
/// 1+clip_high)·A) + β·k3`.
pub fn token_terms(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let Some((lo, hi)) = loss.ratio_range() else {
        return g.neg(ops[0]);
    };
    let (logp, mask, old, adv) = (ops[0], ops[1], ops[2], ops[3]);
    let shape = g.ty(logp).shape.clone();
    let d = g.sub(logp, old);
    let d = where_response(g, mask, d);
    let ratio = g.exp(d);
    let a = g.reshape(adv, vec![shape[0], 1]);
    let a = g.broadcast(a, shape.clone());
    let unclipped = g.mul(ratio, a);
    let clipped = g.clamp(ratio, lo, hi);
    let clipped = g.mul(clipped, a);
    // `min` returns (and credits) its first operand on ties.
    let surrogate = g.min(unclipped, clipped);
    let mut terms = g.neg(surrogate);
    if loss.has_kl() {
        let diff = g.sub(ops[4], logp);
        let diff = where_response(g, mask, diff);
        let e = g.exp(diff);
        let k3 = g.sub(e, diff);
        let one = g.full_like(1.0, k3);
        let k3 = g.sub(k3, one);
        let k3 = g.scale(k3, loss.kl_coef());
        terms = g.add(terms, k3);
    }
    terms
}

/// `Op::TokenLoss` written with ordinary ops: its per-token terms
/// aggregated with the mask's weights.
pub fn reference_loss(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let terms = token_terms(g, loss, ops);
    let agg = if loss.seq_mean() {
        LossAgg::SeqMean
    } else {
        LossAgg::TokenMean
    };
    aggregate(g, agg, terms, ops[1])
}

/// The weights `w [B, T]` of `L = Σ w ∘ ℓ`: `mask / Σ mask`, or per
/// sequence `mask · [n_b > 0] / (n_b · #{b : n_b > 0})` with `n_b` the
/// sequence's mask sum.
fn token_weights(g: &mut Graph, seq_mean: bool, mask: NodeId) -> NodeId {
    let shape = g.ty(mask).shape.clone();
    if !seq_mean {
        let den = g.sum_all(mask);
        let den = g.broadcast(den, shape);
        return g.div(mask, den);
    }
    let cnt = g.sum(mask, &[1], false);
    let zero = g.full_like(0.0, cnt);
    let has = g.compare(CompareOp::Gt, cnt, zero);
    let one = g.full_like(1.0, cnt);
    let safe = g.select(has, cnt, one);
    let hasf = g.cast(has, g.ty(cnt).dtype);
    let n = g.sum_all(hasf);
    let n = g.broadcast(n, vec![shape[0]]);
    let den = g.mul(safe, n);
    let per = g.div(hasf, den);
    let per = g.reshape(per, vec![shape[0], 1]);
    let per = g.broadcast(per, shape);
    g.mul(mask, per)
}

/// `∂ℓ/∂logπ [B, T]` of the per-token terms, with ordinary ops: `−1` for
/// SFT; for GRPO `−A·ρ` where the unclipped term wins the `min` or the
/// ratio is inside the clip range (else 0), plus `β (1 − e^δ)`, all zero
/// off the response.
fn token_slopes(g: &mut Graph, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
    let Some((lo, hi)) = loss.ratio_range() else {
        return g.full_like(-1.0, ops[0]);
    };
    let (logp, mask, old, adv) = (ops[0], ops[1], ops[2], ops[3]);
    let shape = g.ty(logp).shape.clone();
    let zero = g.full_like(0.0, mask);
    let on = g.compare(CompareOp::Gt, mask, zero);
    let d = g.sub(logp, old);
    let d = g.select(on, d, zero);
    let ratio = g.exp(d);
    let a = g.reshape(adv, vec![shape[0], 1]);
    let a = g.broadcast(a, shape);
    let unclipped = g.mul(ratio, a);
    let clipped = g.clamp(ratio, lo, hi);
    let clipped = g.mul(clipped, a);
    let first = g.compare(CompareOp::Le, unclipped, clipped);
    let lo = g.full_like(lo, ratio);
    let hi = g.full_like(hi, ratio);
    let below = g.compare(CompareOp::Lt, ratio, lo);
    let above = g.compare(CompareOp::Gt, ratio, hi);
    let passed = g.select(above, zero, a);
    let passed = g.select(below, zero, passed);
    let coef = g.select(first, a, passed);
    let s = g.mul(coef, ratio);
    let mut s = g.neg(s);
    if loss.has_kl() {
        let diff = g.sub(ops[4], logp);
        let diff = g.select(on, diff, zero);
        let e = g.exp(diff);
        let one = g.full_like(1.0, e);
        let k = g.sub(one, e);
        let k = g.scale(k, loss.kl_coef());
        s = g.add(s, k);
    }
    g.select(on, s, zero)
}

/// `Op::TokenLossGrad` written with ordinary ops: `gout · w ∘ ∂ℓ/∂logπ`
/// (the derivative of [`reference_loss`] with respect to logπ).
pub fn reference_grad(g: &mut Graph, loss: TokenLoss, ops: &[NodeId], gout: NodeId) -> NodeId {
    let shape = g.ty(ops[0]).shape.clone();
    let w = token_weights(g, loss.seq_mean(), ops[1]);
    let s = token_slopes(g, loss, ops);
    let gb = g.reshape(gout, vec![1, 1]);
    let gb = g.broadcast(gb, shape);
    let ws = g.mul(w, s);
    g.mul(gb, ws)
}

/// Aggregates per-token values [B, T] with mask weights as `loss_agg` says.
pub fn aggregate(g: &mut Graph, agg: LossAgg, per_token: NodeId, mask: NodeId) -> NodeId {
    let weighted = g.mul(per_token, mask);
    match agg {
        LossAgg::TokenMean => {
            let num = g.sum_all(weighted);
            let den = g.sum_all(mask);
            g.div(num, den)
        }
        LossAgg::SeqMean => {
            let num = g.sum(weighted, &[1], false);
            let cnt = g.sum(mask, &[1], false);
            let zero = g.full_like(0.0, cnt);
            let has = g.compare(CompareOp::Gt, cnt, zero);
            let one = g.full_like(1.0, cnt);
            let safe = g.select(has, cnt, one);
            let per_seq = g.div(num, safe);
            let dt = g.ty(cnt).dtype;
            let hasf = g.cast(has, dt);
            let per_seq = g.mul(per_seq, hasf);
            let total = g.sum_all(per_seq);
            let n = g.sum_all(hasf);
            g.div(total, n)
        }
    }
}
