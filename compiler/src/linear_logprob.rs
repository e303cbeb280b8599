//! The linear log-prob written with ordinary ops: the reference semantics
//! of `Op::LinearLogprob` and `Op::LinearLogprobGrad`, and the graph that
//! autodiff differentiates to get the gradient of a gradient.
//!
//! The model scores tokens with the single `LinearLogprob` op, whose
//! backward is two `LinearLogprobGrad` ops that recompute the logits;
//! neither stores a `[rows, vocab]` value. Only the second derivative
//! expands the computation below, when the adjoint sweep reaches it.

use crate::ir::{Graph, LogprobOperand, NodeId};

/// Most logits (`rows × V` elements) a second-derivative expansion holds
/// per row block: 2²⁴, 64 MiB in f32.
pub const EXPANSION_LOGITS: usize = 1 << 24;

/// Rows of h per block when autodiff expands a `LinearLogprobGrad` of h
/// `[N, d]` and w `[V, d]` (see `autodiff::linear_logprob_grad_vjp`).
pub fn expansion_rows(h: &[usize], w: &[usize]) -> usize {
    (EXPANSION_LOGITS / w[0].max(1)).clamp(1, h[0].max(1))
}

/// `Op::LinearLogprob` with ordinary ops: logits `h wᵀ`, their
/// log-softmax, the targets' entries.
pub fn reference_logprob(g: &mut Graph, h: NodeId, w: NodeId, targets: NodeId) -> NodeId {
    let n = g.ty(h).shape[0];
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let idx = g.reshape(targets, vec![n, 1]);
    let picked = g.take_along_axis(lp, idx, 1);
    g.reshape(picked, vec![n])
}

/// `Op::LinearLogprobGrad { wrt }` of `(h, w, targets, g)` with ordinary
/// ops: with `C = g ∘ (onehot(targets) − softmax(h wᵀ))` (`[rows, V]`),
/// `dh = C w` and `dw = Cᵀ h`.
pub fn reference_grad(
    g: &mut Graph,
    wrt: LogprobOperand,
    [h, w, targets]: [NodeId; 3],
    grad: NodeId,
) -> NodeId {
    let n = g.ty(h).shape[0];
    let v = g.ty(w).shape[0];
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let p = g.exp(lp);
    let gc = g.reshape(grad, vec![n, 1]);
    let gb = g.broadcast(gc, vec![n, v]);
    let gp = g.mul(gb, p);
    // g at each row's target (the scatter checks the targets' range).
    let zero = g.full_like(0.0, z);
    let idx = g.reshape(targets, vec![n, 1]);
    let hit = g.scatter_add(zero, idx, gc, 1);
    let c = g.sub(hit, gp);
    coefficient_products(g, wrt, c, [h, w])
}

/// `dh = C w` or `dw = Cᵀ h` from the gradients' coefficients `C [rows, V]`.
fn coefficient_products(
    g: &mut Graph,
    wrt: LogprobOperand,
    c: NodeId,
    [h, w]: [NodeId; 2],
) -> NodeId {
    match wrt {
        LogprobOperand::Hidden => g.matmul(c, w),
        LogprobOperand::Weight => {
            let ct = g.transpose(c);
            g.matmul(ct, h)
        }
    }
}

/// `Op::LinearEntropy` with ordinary ops: `−Σ_v p log p` per row of the
/// log-softmax of the logits `h wᵀ`.
pub fn reference_entropy(g: &mut Graph, h: NodeId, w: NodeId) -> NodeId {
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let p = g.exp(lp);
    let plp = g.mul(p, lp);
    let s = g.sum(plp, &[1], false);
    g.neg(s)
}

/// `Op::LinearEntropyGrad { wrt }` of `(h, w, g)` with ordinary ops: with
/// `C = −g ∘ p ∘ (log p + H)` (`[rows, V]`, `H` each row's entropy),
/// `dh = C w` and `dw = Cᵀ h`.
pub fn reference_entropy_grad(
    g: &mut Graph,
    wrt: LogprobOperand,
    [h, w]: [NodeId; 2],
    grad: NodeId,
) -> NodeId {
    let n = g.ty(h).shape[0];
    let v = g.ty(w).shape[0];
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let p = g.exp(lp);
    let plp = g.mul(p, lp);
    let s = g.sum(plp, &[1], true);
    // log p + H = log p − Σ p log p.
    let sb = g.broadcast(s, vec![n, v]);
    let centred = g.sub(lp, sb);
    let pc = g.mul(p, centred);
    let gc = g.reshape(grad, vec![n, 1]);
    let gb = g.broadcast(gc, vec![n, v]);
    let gpc = g.mul(gb, pc);
    let c = g.neg(gpc);
    coefficient_products(g, wrt, c, [h, w])
}
