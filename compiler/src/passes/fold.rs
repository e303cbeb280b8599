//! Constant folding. A node whose operands are all constants becomes a
//! constant, computed in the node's element type with the same scalar
//! semantics the executors use, so folding does not change results:
//! - `full` operands (one value everywhere): elementwise ops, casts, data
//!   movement (broadcast, reshape, permute, slice, pad, concat) and
//!   reductions give a `full`;
//! - small `literal`/`full` mixes under elementwise ops give a `literal`;
//! - `select` with a constant condition becomes the chosen branch.
//!
//! Index-taking ops (gather, take_along_axis, …) are left to run time, so an
//! out-of-range index is still reported there.

use super::Pass;
use crate::ir::{clamp_value, numel, DType, Graph, NodeId, Op, ReduceKind, Scalar};

/// Constant folding; literals above `max_literal` elements are not expanded.
pub struct ConstantFold {
    pub max_literal: usize,
}

impl Default for ConstantFold {
    fn default() -> Self {
        ConstantFold {
            max_literal: 1 << 16,
        }
    }
}

/// Rounds an f64 to what the element type can hold.
pub(crate) fn to_dtype(dt: DType, v: f64) -> f64 {
    match dt {
        DType::F32 => v as f32 as f64,
        DType::F64 => v,
        DType::Bf16 => crate::ir::round_bf16(v as f32) as f64,
        DType::I32 => v as i32 as f64,
        DType::Bool => (v != 0.0) as i32 as f64,
    }
}

/// Applies an elementwise op to one element of each operand, in the node's type.
fn eval_elementwise(op: &Op, in_dt: DType, args: &[f64]) -> Option<f64> {
    macro_rules! float {
        ($t:ty) => {
            match op {
                Op::Unary(u) => Some(u.apply(args[0] as $t) as f64),
                Op::Binary(b) => Some(b.apply(args[0] as $t, args[1] as $t) as f64),
                Op::Clamp { min, max } => {
                    Some(clamp_value(args[0] as $t, min.get() as $t, max.get() as $t) as f64)
                }
                _ => None,
            }
        };
    }
    match op {
        Op::Compare(c) => Some(c.apply(args[0], args[1]) as i32 as f64),
        Op::Cast { to } => Some(to_dtype(*to, args[0])),
        Op::StopGradient => Some(args[0]),
        _ => match in_dt {
            DType::F32 => float!(f32),
            DType::F64 => float!(f64),
            _ => None,
        },
    }
}

/// Sum of `count` copies of `v`, accumulated left to right in `dt`.
fn repeated_sum(dt: DType, v: f64, count: usize) -> f64 {
    match dt {
        DType::F32 => (0..count).fold(0f32, |acc, _| acc + v as f32) as f64,
        _ => (0..count).fold(0f64, |acc, _| acc + v),
    }
}

fn splat(g: &Graph, id: NodeId) -> Option<f64> {
    match g.op(id) {
        Op::Full { value, ty } => Some(to_dtype(ty.dtype, value.get())),
        _ => None,
    }
}

/// The constant a node folds to: one value, or one value per element.
enum Folded {
    Splat(f64),
    Values(Vec<f64>),
    Forward(NodeId),
}

impl ConstantFold {
    fn fold(&self, g: &Graph, id: NodeId) -> Option<Folded> {
        let op = g.op(id);
        let inputs = g.inputs(id);
        if op.is_source() {
            return None;
        }
        if let Op::Select = op {
            let c = splat(g, inputs[0])?;
            return Some(Folded::Forward(if c != 0.0 {
                inputs[1]
            } else {
                inputs[2]
            }));
        }
        let splats: Option<Vec<f64>> = inputs.iter().map(|&i| splat(g, i)).collect();
        let ty = g.ty(id);
        let in_dt = g.ty(inputs[0]).dtype;
        if let Some(vals) = splats {
            let v = match op {
                _ if op.is_elementwise() => eval_elementwise(op, in_dt, &vals)?,
                Op::Broadcast { .. }
                | Op::Reshape { .. }
                | Op::Permute { .. }
                | Op::Slice { .. } => vals[0],
                Op::Concat { .. } if vals.iter().all(|&v| v.to_bits() == vals[0].to_bits()) => {
                    vals[0]
                }
                Op::Pad { value, .. }
                    if to_dtype(ty.dtype, value.get()).to_bits() == vals[0].to_bits() =>
                {
                    vals[0]
                }
                Op::Reduce { kind, axes, .. } => {
                    let s = &g.ty(inputs[0]).shape;
                    let count: usize = axes.iter().map(|&a| s[a]).product();
                    if count == 0 || count > 1 << 20 {
                        return None;
                    }
                    match kind {
                        ReduceKind::Max => vals[0],
                        ReduceKind::Sum => repeated_sum(ty.dtype, vals[0], count),
                        ReduceKind::Mean => {
                            let sum = repeated_sum(ty.dtype, vals[0], count);
                            eval_elementwise(
                                &Op::Binary(crate::ir::BinaryOp::Div),
                                ty.dtype,
                                &[sum, to_dtype(ty.dtype, count as f64)],
                            )?
                        }
                    }
                }
                _ => return None,
            };
            return Some(Folded::Splat(v));
        }
        // Elementwise over small literals (and splats).
        if !op.is_elementwise() || ty.numel() > self.max_literal {
            return None;
        }
        let n = ty.numel();
        let mut cols: Vec<Vec<f64>> = Vec::with_capacity(inputs.len());
        for &i in &inputs {
            match g.op(i) {
                Op::Full { value, ty } => cols.push(vec![to_dtype(ty.dtype, value.get()); n]),
                Op::Literal { values, ty } => {
                    cols.push(values.iter().map(|v| to_dtype(ty.dtype, v.get())).collect())
                }
                _ => return None,
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut args = vec![0.0; inputs.len()];
        for e in 0..n {
            for (a, c) in args.iter_mut().zip(&cols) {
                *a = c[e];
            }
            out.push(eval_elementwise(op, in_dt, &args)?);
        }
        Some(Folded::Values(out))
    }
}

impl Pass for ConstantFold {
    fn name(&self) -> &'static str {
        "constant-fold"
    }

    fn run(&self, g: &mut Graph) -> bool {
        let mut changed = false;
        for id in g.topo_order() {
            let Some(f) = self.fold(g, id) else { continue };
            let ty = g.ty(id).clone();
            // A constant replaces the node in place: it keeps the node's
            // index, which the scheduler reads as its place in creation
            // order (a new node could take the index of one removed
            // earlier, anywhere).
            let constant = match f {
                Folded::Splat(v) => Op::Full {
                    value: Scalar(v),
                    ty,
                },
                Folded::Values(vs) => {
                    debug_assert_eq!(vs.len(), numel(&ty.shape));
                    let values = vs.into_iter().map(Scalar).collect();
                    Op::Literal { values, ty }
                }
                Folded::Forward(n) => {
                    g.replace_uses(id, n);
                    g.remove(id);
                    changed = true;
                    continue;
                }
            };
            g.rewrite(id, constant, &[])
                .expect("a folded constant keeps the node's type");
            changed = true;
        }
        changed
    }
}
