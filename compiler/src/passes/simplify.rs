//! Algebraic simplification: local rewrites that remove work without
//! changing values — `x·1`, `x+0`, `x−0`, `x/1`, `−(−x)`, permute∘permute,
//! identity permutes, permutes that move only axes of size 1 (reshapes),
//! reshape chains, broadcast chains and broadcasts of
//! constants, casts and reshapes to the same type, double stop-gradients,
//! whole-tensor slices.

use super::fold::to_dtype;
use super::Pass;
use crate::ir::{BinaryOp, Graph, NodeId, Op, UnaryOp};

pub struct AlgebraicSimplify;

/// The value of a `full` node, rounded to its element type.
fn splat(g: &Graph, id: NodeId) -> Option<f64> {
    match g.op(id) {
        Op::Full { value, ty } => Some(to_dtype(ty.dtype, value.get())),
        _ => None,
    }
}

fn is_splat(g: &Graph, id: NodeId, v: f64) -> bool {
    splat(g, id) == Some(v)
}

/// What a node is rewritten to.
enum Rewrite {
    /// Use an existing node instead.
    Forward(NodeId),
    /// Replace by a new node with this op and operands (same type).
    New(Op, Vec<NodeId>),
}

fn rewrite(g: &Graph, id: NodeId) -> Option<Rewrite> {
    use Rewrite::*;
    let inputs = g.inputs(id);
    let ty = g.ty(id);
    let same_type_as_input = |i: usize| g.ty(inputs[i]) == ty;
    match g.op(id) {
        Op::Binary(BinaryOp::Mul) => {
            if is_splat(g, inputs[1], 1.0) {
                Some(Forward(inputs[0]))
            } else if is_splat(g, inputs[0], 1.0) {
                Some(Forward(inputs[1]))
            } else {
                None
            }
        }
        Op::Binary(BinaryOp::Add) => {
            // Exact up to the sign of a zero result (−0 + 0 = +0), as in XLA.
            if is_splat(g, inputs[1], 0.0) {
                Some(Forward(inputs[0]))
            } else if is_splat(g, inputs[0], 0.0) {
                Some(Forward(inputs[1]))
            } else {
                None
            }
        }
        Op::Binary(BinaryOp::Sub) if is_splat(g, inputs[1], 0.0) => Some(Forward(inputs[0])),
        Op::Binary(BinaryOp::Div) if is_splat(g, inputs[1], 1.0) => Some(Forward(inputs[0])),
        Op::Unary(UnaryOp::Neg) => match g.op(inputs[0]) {
            Op::Unary(UnaryOp::Neg) => Some(Forward(g.inputs(inputs[0])[0])),
            _ => None,
        },
        Op::Permute { perm } => {
            if perm.iter().enumerate().all(|(i, &p)| i == p) {
                return Some(Forward(inputs[0]));
            }
            // Moving only axes of size 1 keeps the elements in order: a
            // reshape, which executors run as a relabeling (the decode
            // step's [B, 1, H, hd] ↔ [B, H, 1, hd]).
            let from = &g.ty(inputs[0]).shape;
            let kept: Vec<usize> = perm.iter().copied().filter(|&p| from[p] != 1).collect();
            if kept.windows(2).all(|w| w[0] < w[1]) {
                let shape = ty.shape.clone();
                return Some(New(Op::Reshape { shape }, vec![inputs[0]]));
            }
            match g.op(inputs[0]) {
                Op::Permute { perm: inner } => {
                    let composed: Vec<usize> = perm.iter().map(|&p| inner[p]).collect();
                    Some(New(Op::Permute { perm: composed }, g.inputs(inputs[0])))
                }
                _ => None,
            }
        }
        Op::Reshape { shape } => {
            if same_type_as_input(0) {
                return Some(Forward(inputs[0]));
            }
            match g.op(inputs[0]) {
                Op::Reshape { .. } => {
                    let inner = g.inputs(inputs[0])[0];
                    if g.ty(inner) == ty {
                        Some(Forward(inner))
                    } else {
                        Some(New(
                            Op::Reshape {
                                shape: shape.clone(),
                            },
                            vec![inner],
                        ))
                    }
                }
                _ => None,
            }
        }
        Op::Broadcast { shape } => {
            if same_type_as_input(0) {
                return Some(Forward(inputs[0]));
            }
            match g.op(inputs[0]) {
                Op::Broadcast { .. } => {
                    let inner = g.inputs(inputs[0])[0];
                    Some(New(
                        Op::Broadcast {
                            shape: shape.clone(),
                        },
                        vec![inner],
                    ))
                }
                Op::Full { value, .. } => Some(New(
                    Op::Full {
                        value: *value,
                        ty: ty.clone(),
                    },
                    vec![],
                )),
                _ => None,
            }
        }
        Op::Cast { .. } if same_type_as_input(0) => Some(Forward(inputs[0])),
        Op::StopGradient => match g.op(inputs[0]) {
            Op::StopGradient => Some(Forward(inputs[0])),
            _ => None,
        },
        Op::Slice { .. } if same_type_as_input(0) => Some(Forward(inputs[0])),
        _ => None,
    }
}

impl Pass for AlgebraicSimplify {
    fn name(&self) -> &'static str {
        "simplify"
    }

    fn run(&self, g: &mut Graph) -> bool {
        let mut changed = false;
        for id in g.topo_order() {
            let Some(r) = rewrite(g, id) else { continue };
            match r {
                Rewrite::Forward(n) => {
                    debug_assert_ne!(n, id, "a node forwarded to itself");
                    g.replace_uses(id, n);
                    g.remove(id);
                }
                // In place: the node keeps its index, which the scheduler
                // reads as its place in creation order (a new node could
                // take the index of one removed earlier, anywhere).
                Rewrite::New(op, ins) => g
                    .rewrite(id, op, &ins)
                    .expect("a simplification keeps the node's type"),
            }
            changed = true;
        }
        changed
    }
}
