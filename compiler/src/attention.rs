//! Causal attention written with ordinary ops: the reference semantics of
//! `Op::CausalAttention` and `Op::CausalAttentionGrad`, and the graph that
//! autodiff differentiates to get the gradient of a gradient.
//!
//! The model computes attention with the single `CausalAttention` op, whose
//! backward is three `CausalAttentionGrad` ops that recompute the
//! probabilities; neither stores a `[B, H, T, T]` value. Only the second
//! derivative (differentiating a `CausalAttentionGrad`) expands the
//! computation below, one layer at a time, as the adjoint sweep reaches it.

use crate::ir::{AttentionOperand, CompareOp, DType, Graph, NodeId};

/// `[B, H_kv, T, hd] → [B, H, T, hd]`: query head h reads key/value head
/// h / (H / H_kv).
pub fn expand_kv(g: &mut Graph, x: NodeId, heads: usize) -> NodeId {
    let s = g.ty(x).shape.clone();
    let kv = s[1];
    if kv == heads {
        return x;
    }
    let e = g.reshape(x, vec![s[0], kv, 1, s[2], s[3]]);
    let e = g.broadcast(e, vec![s[0], kv, heads / kv, s[2], s[3]]);
    g.reshape(e, vec![s[0], heads, s[2], s[3]])
}

/// `[B, H, T, hd] → [B, H_kv, T, hd]`: each key/value head sums over the
/// query heads that read it (the adjoint of [`expand_kv`]).
pub fn sum_groups(g: &mut Graph, x: NodeId, kv_heads: usize) -> NodeId {
    let s = g.ty(x).shape.clone();
    let heads = s[1];
    if kv_heads == heads {
        return x;
    }
    let r = g.reshape(x, vec![s[0], kv_heads, heads / kv_heads, s[2], s[3]]);
    g.sum(r, &[2], false)
}

/// The causal softmax probabilities `[B, H, T, T]` of q over keys of the
/// same head count: scores scaled by 1/√hd, keys after the query masked
/// with −∞, a max-subtracted softmax.
pub fn causal_probs(g: &mut Graph, q: NodeId, k: NodeId) -> NodeId {
    let s = g.ty(q).shape.clone();
    let dtype = g.ty(q).dtype;
    let (b, h, t, hd) = (s[0], s[1], s[2], s[3]);
    let kt = g.transpose(k);
    let scores = g.matmul(q, kt);
    let scores = g.scale(scores, 1.0 / (hd as f64).sqrt());
    let row = g.iota(0, DType::I32, vec![t, t]);
    let col = g.iota(1, DType::I32, vec![t, t]);
    let allowed = g.compare(CompareOp::Le, col, row);
    let allowed = g.broadcast(allowed, vec![b, h, t, t]);
    let masked = g.full(f64::NEG_INFINITY, dtype, vec![b, h, t, t]);
    let scores = g.select(allowed, scores, masked);
    let m = g.reduce_max(scores, &[3], true);
    let m = g.stop_gradient(m);
    let mb = g.broadcast(m, vec![b, h, t, t]);
    let z = g.sub(scores, mb);
    let e = g.exp(z);
    let den = g.sum(e, &[3], true);
    let den = g.broadcast(den, vec![b, h, t, t]);
    g.div(e, den)
}

/// `Op::CausalAttention` with ordinary ops.
pub fn reference_attention(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId) -> NodeId {
    let heads = g.ty(q).shape[1];
    let kx = expand_kv(g, k, heads);
    let vx = expand_kv(g, v, heads);
    let p = causal_probs(g, q, kx);
    g.matmul(p, vx)
}

/// `Op::CausalAttentionGrad { wrt }` of `(q, k, v, o, do)` with ordinary
/// ops: with `P` the probabilities, `dv = Pᵀ do`, and with `dS = P ∘ (do
/// vᵀ − rowsum(do ∘ o)) / √hd`, `dq = dS k` and `dk = dSᵀ q` (key/value
/// gradients summed over the query heads of their group).
pub fn reference_grad(
    g: &mut Graph,
    wrt: AttentionOperand,
    [q, k, v, o]: [NodeId; 4],
    d_o: NodeId,
) -> NodeId {
    let s = g.ty(q).shape.clone();
    let (heads, t, hd) = (s[1], s[2], s[3]);
    let kv_heads = g.ty(k).shape[1];
    let kx = expand_kv(g, k, heads);
    let p = causal_probs(g, q, kx);
    if wrt == AttentionOperand::V {
        let pt = g.transpose(p);
        let dvx = g.matmul(pt, d_o);
        return sum_groups(g, dvx, kv_heads);
    }
    let vx = expand_kv(g, v, heads);
    let vt = g.transpose(vx);
    let dp = g.matmul(d_o, vt);
    let od = g.mul(d_o, o);
    let delta = g.sum(od, &[3], true);
    let delta = g.broadcast(delta, vec![s[0], heads, t, t]);
    let centred = g.sub(dp, delta);
    let ds = g.mul(p, centred);
    let ds = g.scale(ds, 1.0 / (hd as f64).sqrt());
    if wrt == AttentionOperand::Q {
        return g.matmul(ds, kx);
    }
    let dst = g.transpose(ds);
    let dkx = g.matmul(dst, q);
    sum_groups(g, dkx, kv_heads)
}

/// `cached_attention(q, k, v, pos)` with ordinary ops: the cache expanded
/// to every query head, scores over all `L` rows with the rows after `pos`
/// masked to −∞, softmax, and the product with the values.
pub fn reference_cached_attention(
    g: &mut Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    pos: NodeId,
) -> NodeId {
    use crate::ir::{CompareOp, DType};
    let s = g.ty(q).shape.clone();
    let (b, h, hd) = (s[0], s[1], s[3]);
    let l = g.ty(k).shape[2];
    let dtype = g.ty(q).dtype;
    let k = expand_kv(g, k, h);
    let v = expand_kv(g, v, h);
    let j = g.iota(0, DType::I32, vec![l]);
    let p = g.broadcast(pos, vec![l]);
    let visible = g.compare(CompareOp::Le, j, p);
    let kt = g.transpose(k);
    let scores = g.matmul(q, kt);
    let scores = g.scale(scores, 1.0 / (hd as f64).sqrt());
    let allowed = g.reshape(visible, vec![1, l]);
    let allowed = g.broadcast(allowed, vec![b, h, 1, l]);
    let masked = g.full(f64::NEG_INFINITY, dtype, vec![b, h, 1, l]);
    let scores = g.select(allowed, scores, masked);
    let m = g.reduce_max(scores, &[3], true);
    let m = g.stop_gradient(m);
    let mb = g.broadcast(m, vec![b, h, 1, l]);
    let z = g.sub(scores, mb);
    let e = g.exp(z);
    let den = g.sum(e, &[3], true);
    let den = g.broadcast(den, vec![b, h, 1, l]);
    let p = g.div(e, den);
    g.matmul(p, v)
}
