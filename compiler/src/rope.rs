//! Rotary position embedding written with ordinary ops: the reference
//! semantics of `Op::Rope`, and the graph autodiff differentiates for the
//! gradients with respect to the tables.
//!
//! The model applies RoPE with the single `Rope` op (one kernel that reads
//! `x` once); its gradient with respect to `x` is the transposed `Rope`,
//! so first and second derivatives stay single ops.

use crate::ir::{Graph, NodeId};

/// `[−x[h..], x[..h]]` along the last axis (`transpose`: `[x[h..],
/// −x[..h]]`, the transposed map), `h` half the last axis.
pub fn rotate_half(g: &mut Graph, x: NodeId, transpose: bool) -> NodeId {
    let s = g.ty(x).shape.clone();
    let (axis, hd) = (s.len() - 1, s[s.len() - 1]);
    let x1 = g.slice_axis(x, axis, 0, hd / 2);
    let x2 = g.slice_axis(x, axis, hd / 2, hd);
    if transpose {
        let n1 = g.neg(x1);
        g.concat(&[x2, n1], axis)
    } else {
        let n2 = g.neg(x2);
        g.concat(&[n2, x1], axis)
    }
}

/// `rope(x, cos, sin, transpose)` with ordinary ops: `x ∘ cos + rot(x) ∘
/// sin`, or `x ∘ cos + rotᵀ(x ∘ sin)`.
pub fn reference_rope(
    g: &mut Graph,
    x: NodeId,
    cos: NodeId,
    sin: NodeId,
    transpose: bool,
) -> NodeId {
    let shape = g.ty(x).shape.clone();
    let cb = g.broadcast(cos, shape.clone());
    let sb = g.broadcast(sin, shape);
    let a = g.mul(x, cb);
    let b = if transpose {
        let xs = g.mul(x, sb);
        rotate_half(g, xs, true)
    } else {
        let r = rotate_half(g, x, false);
        g.mul(r, sb)
    };
    g.add(a, b)
}
