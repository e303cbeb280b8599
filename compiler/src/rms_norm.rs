//! RMSNorm written with ordinary ops: the reference semantics of
//! `Op::RmsNorm` and `Op::RmsNormGrad`, and the graph autodiff
//! differentiates for the gradient of a gradient.
//!
//! The model normalises with the single `RmsNorm` op, whose backward is
//! `RmsNormGrad` ops reading only `x`, `w` and the cotangent: no per-row
//! statistic or normalised copy of `x` is kept for the backward pass.

use crate::ir::{Graph, NodeId, NormOperand};

/// `1 / √(mean(x²) + eps)` over the last axis, kept as an axis of 1.
fn inv_rms(g: &mut Graph, x: NodeId, eps: f64) -> NodeId {
    let last = g.ty(x).rank() - 1;
    let sq = g.mul(x, x);
    let ms = g.mean(sq, &[last], true);
    let e = g.full_like(eps, ms);
    let ms = g.add(ms, e);
    g.rsqrt(ms)
}

/// `rms_norm(x, w)` with ordinary ops: `x · r · w`.
pub fn reference_norm(g: &mut Graph, x: NodeId, w: NodeId, eps: f64) -> NodeId {
    let shape = g.ty(x).shape.clone();
    let r = inv_rms(g, x, eps);
    let rb = g.broadcast(r, shape.clone());
    let xn = g.mul(x, rb);
    let wb = g.broadcast(w, shape);
    g.mul(xn, wb)
}

/// `rms_norm_grad(wrt, x, w, dy)` with ordinary ops: `dx = r (dy ∘ w) − x
/// r³ Σ(dy ∘ w ∘ x) / d`, `dw = Σ_rows dy ∘ x · r`.
pub fn reference_grad(
    g: &mut Graph,
    wrt: NormOperand,
    [x, w]: [NodeId; 2],
    dy: NodeId,
    eps: f64,
) -> NodeId {
    let shape = g.ty(x).shape.clone();
    let (last, d) = (shape.len() - 1, shape[shape.len() - 1]);
    let r = inv_rms(g, x, eps);
    let rb = g.broadcast(r, shape.clone());
    match wrt {
        NormOperand::Weight => {
            let xr = g.mul(x, rb);
            let p = g.mul(dy, xr);
            g.unbroadcast(p, &[d])
        }
        NormOperand::Input => {
            let wb = g.broadcast(w, shape.clone());
            let dyw = g.mul(dy, wb);
            let dyw_x = g.mul(dyw, x);
            let dot = g.sum(dyw_x, &[last], true);
            let r2 = g.mul(r, r);
            let r3 = g.mul(r2, r);
            let c = g.mul(r3, dot);
            let c = g.scale(c, 1.0 / d as f64);
            let cb = g.broadcast(c, shape);
            let a = g.mul(rb, dyw);
            let b = g.mul(x, cb);
            g.sub(a, b)
        }
    }
}
