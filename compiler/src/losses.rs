//! The SFT loss and the GRPO surrogate as IR, over per-token log-probs
//! [B, T] and masks [B, T] (1 on response tokens). Semantics: DESIGN §1.

use crate::ir::{CompareOp, Graph, NodeId};
use crate::spec::{LossAgg, RlSpec};

/// `−Σ mask · logπ / Σ mask` over the whole batch.
pub fn sft_loss(g: &mut Graph, logp: NodeId, mask: NodeId) -> NodeId {
    let num = g.mul(logp, mask);
    let num = g.sum_all(num);
    let den = g.sum_all(mask);
    let l = g.div(num, den);
    g.neg(l)
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

/// Per-token GRPO loss ℓ_t [B, T] (zero weight not yet applied):
/// `−min(ρA, clip(ρ, 1−clip_low, 1+clip_high)·A) + β·k3`.
pub fn grpo_token_loss(g: &mut Graph, rl: &RlSpec, logp: NodeId, batch: &RlBatch) -> NodeId {
    let shape = g.ty(logp).shape.clone();
    let d = g.sub(logp, batch.old_logprobs);
    let d = where_response(g, batch.loss_mask, d);
    let ratio = g.exp(d);
    let a = g.reshape(batch.advantages, vec![shape[0], 1]);
    let a = g.broadcast(a, shape.clone());
    let unclipped = g.mul(ratio, a);
    let clipped = g.clamp(ratio, 1.0 - rl.clip_low, 1.0 + rl.clip_high);
    let clipped = g.mul(clipped, a);
    // `min` returns (and credits) its first operand on ties.
    let surrogate = g.min(unclipped, clipped);
    let mut loss = g.neg(surrogate);
    if rl.kl_coef > 0.0 {
        let reference = batch
            .ref_logprobs
            .expect("ref_logprobs are needed when kl_coef > 0");
        let diff = g.sub(reference, logp);
        let diff = where_response(g, batch.loss_mask, diff);
        let e = g.exp(diff);
        let k3 = g.sub(e, diff);
        let one = g.full_like(1.0, k3);
        let k3 = g.sub(k3, one);
        let k3 = g.scale(k3, rl.kl_coef);
        loss = g.add(loss, k3);
    }
    loss
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

/// The GRPO loss of a batch.
pub fn grpo_loss(g: &mut Graph, rl: &RlSpec, logp: NodeId, batch: &RlBatch) -> NodeId {
    let per_token = grpo_token_loss(g, rl, logp, batch);
    aggregate(g, rl.loss_agg, per_token, batch.loss_mask)
}
