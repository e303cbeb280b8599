//! Pattern matching for the fuser: the subgraphs that a hand-written
//! kernel computes whole (the linear log-prob, causal attention, their
//! gradients, an optimiser step's gradient pairs) and the tests that a
//! match may replace them (nothing outside reads an absorbed node).

use super::constant_value;
use crate::ir::{strides, BinaryOp, CompareOp, DType, Graph, NodeId, Op, ReduceKind, UnaryOp};
use coopc_ir::kernel::{
    device_chunk, ElemInstr, ElemProgram, Index, Kernel, MAX_ATTENTION_HEAD_DIM,
};
use std::collections::{HashMap, HashSet};

/// The hand-written kernel that computes an IR op by itself: the linear
/// log-prob and the causal attention.
pub(super) fn op_kernel(g: &Graph, id: NodeId) -> Option<Kernel> {
    let ins = g.inputs(id);
    match g.op(id) {
        Op::LinearLogprob => {
            let rows = g.ty(ins[0]).shape[0];
            Some(Kernel::LinearLogprob {
                id,
                h: ins[0],
                w: ins[1],
                targets: ins[2],
                seq_out: rows,
                seq_in: rows,
            })
        }
        Op::CausalAttention => Some(Kernel::Attention {
            id,
            q: ins[0],
            k: ins[1],
            v: ins[2],
            kv_heads: g.ty(ins[1]).shape[1],
        }),
        _ => None,
    }
}

/// Puts one `Kernel::AttentionGrads` (`Kernel::LogprobGrads`,
/// `Kernel::OptimStep`) in place of the `causal_attention_grad`
/// (`linear_logprob_grad`, `optim_step`) nodes that share their operands,
/// at the first of them in `order`; the others are absorbed (the kernel
/// writes them too). An optimiser step's gradient is loaded until the
/// fuser gives it a prologue.
pub(super) fn group_gradients(
    g: &Graph,
    order: &[NodeId],
    replaced: &mut HashMap<NodeId, Kernel>,
    absorbed: &mut HashSet<NodeId>,
) {
    let mut first: HashMap<Vec<NodeId>, NodeId> = HashMap::new();
    for &id in order {
        let inputs = g.inputs(id);
        let kernel = match g.op(id) {
            Op::CausalAttentionGrad { wrt } => Kernel::AttentionGrads {
                inputs: inputs[..].try_into().expect("validated arity"),
                grads: vec![(*wrt, id)],
                kv_heads: g.ty(inputs[1]).shape[1],
            },
            Op::LinearLogprobGrad { wrt } => Kernel::LogprobGrads {
                inputs: inputs[..].try_into().expect("validated arity"),
                grads: vec![(*wrt, id)],
                chunk: device_chunk(g.ty(inputs[0]).shape[0], g.ty(inputs[1]).shape[0]),
            },
            Op::OptimStep { rule, out } => Kernel::OptimStep {
                rule: *rule,
                numel: g.ty(id).numel(),
                prologue: ElemProgram::load(),
                prologue_inputs: vec![inputs[1]],
                state: [&inputs[..1], &inputs[2..]].concat(),
                outputs: vec![(*out, id)],
                gradient: None,
            },
            _ => continue,
        };
        match first.get(&inputs) {
            None => {
                first.insert(inputs, id);
                replaced.insert(id, kernel);
            }
            Some(lead) => {
                let more = kernel.writes()[0];
                match (replaced.get_mut(lead), kernel) {
                    (
                        Some(Kernel::AttentionGrads { grads, .. }),
                        Kernel::AttentionGrads { grads: g2, .. },
                    ) => grads.extend(g2),
                    (
                        Some(Kernel::LogprobGrads { grads, .. }),
                        Kernel::LogprobGrads { grads: g2, .. },
                    ) => grads.extend(g2),
                    (
                        Some(Kernel::OptimStep { rule, outputs, .. }),
                        Kernel::OptimStep {
                            rule: r2,
                            outputs: o2,
                            ..
                        },
                    ) if *rule == r2 => outputs.extend(o2),
                    // Same operands, other op family: a kernel of its own.
                    (_, kernel) => {
                        replaced.insert(more, kernel);
                        continue;
                    }
                }
                absorbed.insert(more);
            }
        }
    }
}

/// An optimiser step whose gradient is a permutation (a LoRA factor's
/// gradient comes out of the product transposed) that only the step reads
/// loads the permutation's source through the permuted strides instead:
/// the permutation is absorbed (written by the step when it is a graph
/// output), so no copy kernel runs for it.
pub(super) fn transposed_step_gradients(
    g: &Graph,
    users: &HashMap<NodeId, Vec<NodeId>>,
    graph_outputs: &HashSet<NodeId>,
    replaced: &mut HashMap<NodeId, Kernel>,
    absorbed: &mut HashSet<NodeId>,
) {
    for kernel in replaced.values_mut() {
        let Kernel::OptimStep {
            prologue,
            prologue_inputs,
            outputs,
            gradient,
            ..
        } = kernel
        else {
            continue;
        };
        let grad = prologue_inputs[0];
        let Op::Permute { perm } = g.op(grad) else {
            continue;
        };
        let only_the_step = users
            .get(&grad)
            .is_some_and(|us| us.iter().all(|u| outputs.iter().any(|o| o.1 == *u)));
        if !only_the_step {
            continue;
        }
        let src = g.inputs(grad)[0];
        let src_strides = strides(&g.ty(src).shape);
        *prologue = ElemProgram {
            n_inputs: 1,
            instrs: vec![ElemInstr::Load {
                input: 0,
                index: Index::Broadcast {
                    shape: g.ty(grad).shape.iter().map(|&d| d as u32).collect(),
                    strides: perm.iter().map(|&a| src_strides[a] as u32).collect(),
                },
            }],
            outputs: vec![0],
        };
        *prologue_inputs = vec![src];
        *gradient = graph_outputs.contains(&grad).then_some(grad);
        absorbed.insert(grad);
    }
}

/// Whether `id` reduces its operand with `kind` over `axis` alone,
/// keeping the axis.
fn reduces_over(g: &Graph, id: NodeId, kind: ReduceKind, axis: usize) -> bool {
    matches!(g.op(id), Op::Reduce { kind: k, axes, keepdim: true } if *k == kind && axes[..] == [axis])
}

/// Matches `z = x − broadcast([stop_gradient] max(x))` with the max over
/// `axis` (the shift of a softmax): `x` and the nodes between it and `z`
/// (`z` included, `x` not).
fn max_subtracted(g: &Graph, z: NodeId, axis: usize) -> Option<(NodeId, Vec<NodeId>)> {
    if !matches!(g.op(z), Op::Binary(BinaryOp::Sub)) {
        return None;
    }
    let [x, mb] = g.inputs(z)[..] else {
        return None;
    };
    if !matches!(g.op(mb), Op::Broadcast { .. }) {
        return None;
    }
    let mut nodes = vec![z, mb];
    let mut m = g.inputs(mb)[0];
    if let Op::StopGradient = g.op(m) {
        nodes.push(m);
        m = g.inputs(m)[0];
    }
    if !reduces_over(g, m, ReduceKind::Max, axis) || g.inputs(m)[..] != [x] {
        return None;
    }
    nodes.push(m);
    Some((x, nodes))
}

/// Whether every one of `nodes` is read only by nodes in `inside` and is
/// not a graph output (so a kernel replacing them all changes nothing
/// else).
fn sealed(
    nodes: &[NodeId],
    inside: &HashSet<NodeId>,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> bool {
    nodes.iter().all(|n| {
        !outputs.contains(n)
            && users
                .get(n)
                .is_some_and(|us| us.iter().all(|u| inside.contains(u)))
    })
}

/// Matches the log-probs of `take` = take_along_axis(log_softmax(X),
/// targets) over the last axis, where X is the logits `h · wᵀ` (a matmul of
/// `h [N, d]` and the transpose of `w [V, d]`, reshaped to `[B, T, V]` or
/// not, optionally sliced to the first `T'` positions of each sequence) and
/// the log-softmax is the one `Graph::log_softmax` builds. Every node in
/// between must be read only inside the pattern and not be an output.
/// Returns the fused kernel and the nodes it absorbs.
pub(super) fn match_linear_logprob(
    g: &Graph,
    take: NodeId,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Option<(Kernel, Vec<NodeId>)> {
    let Op::TakeAlongAxis { axis } = g.op(take) else {
        return None;
    };
    let rank = g.ty(take).rank();
    let [l, targets] = g.inputs(take)[..] else {
        return None;
    };
    if *axis + 1 != rank || g.ty(targets).shape.last() != Some(&1) {
        return None;
    }
    let last = rank - 1;
    let op_is = |id: NodeId, f: &dyn Fn(&Op) -> bool| f(g.op(id));
    let ins = |id: NodeId| g.inputs(id);
    // l = z − broadcast(log(sum(exp(z)))), z = x − broadcast(max(x)).
    if !op_is(l, &|o| matches!(o, Op::Binary(BinaryOp::Sub))) {
        return None;
    }
    let [z, lb] = ins(l)[..] else { return None };
    let ls = *ins(lb).first()?;
    let s_ = *ins(ls).first()?;
    let e = *ins(s_).first()?;
    let ok = op_is(lb, &|o| matches!(o, Op::Broadcast { .. }))
        && op_is(ls, &|o| matches!(o, Op::Unary(UnaryOp::Log)))
        && reduces_over(g, s_, ReduceKind::Sum, last)
        && op_is(e, &|o| matches!(o, Op::Unary(UnaryOp::Exp)))
        && ins(e)[..] == [z];
    if !ok {
        return None;
    }
    let (x, shift) = max_subtracted(g, z, last)?;
    let mut inner = vec![l, lb, ls, s_, e, x];
    inner.extend(shift);
    // x = [slice of the first positions of] [reshape of] matmul(h, wᵀ).
    let xs = g.ty(x).shape.clone();
    let (mut logits, mut sliced_from) = (x, None);
    if let Op::Slice { start, end } = g.op(x) {
        let src = ins(x)[0];
        let ss = &g.ty(src).shape;
        let prefix = rank >= 3
            && start.iter().all(|&v| v == 0)
            && (0..rank).all(|a| a == rank - 2 || end[a] == ss[a]);
        if !prefix {
            return None;
        }
        logits = src;
        sliced_from = Some(ss[rank - 2]);
        inner.push(src);
    }
    let mut mm = logits;
    if let Op::Reshape { .. } = g.op(logits) {
        mm = ins(logits)[0];
        inner.push(mm);
    }
    let vocab_last = |id: NodeId| g.ty(id).shape.last().copied();
    if !matches!(g.op(mm), Op::MatMul)
        || g.ty(mm).rank() != 2
        || vocab_last(mm) != vocab_last(logits)
    {
        return None;
    }
    let [h, wt] = ins(mm)[..] else { return None };
    if !g.op(wt).is_matrix_transpose() || g.ty(wt).rank() != 2 {
        return None;
    }
    let w = ins(wt)[0];
    inner.push(wt);
    // Without a slice every row is scored.
    let (seq_out, seq_in) = match sliced_from {
        Some(t) => (xs[rank - 2], t),
        None => (g.ty(mm).shape[0], g.ty(mm).shape[0]),
    };
    let f32_like = |id: NodeId| matches!(g.ty(id).dtype, DType::F32 | DType::F64);
    if !f32_like(h) || !f32_like(w) || g.ty(take).dtype != g.ty(h).dtype {
        return None;
    }
    inner.sort();
    inner.dedup();
    // Nothing in between is read from outside or is an output.
    let inside: HashSet<NodeId> = inner.iter().copied().chain([take]).collect();
    if !sealed(&inner, &inside, users, outputs) {
        return None;
    }
    Some((
        Kernel::LinearLogprob {
            id: take,
            h,
            w,
            targets,
            seq_out,
            seq_in,
        },
        inner,
    ))
}

/// Whether `id` is a constant equal to `want` (to 1e-12 relative).
fn constant_is(g: &Graph, id: NodeId, want: f64) -> bool {
    constant_value(g, id)
        .is_some_and(|v| v == want || (v - want).abs() <= 1e-12 * want.abs().max(1.0))
}

/// Whether `mask` is the causal mask `col ≤ row` over `[T, T]`,
/// broadcast: `le(iota(axis 1), iota(axis 0))` or `ge(iota 0, iota 1)`.
fn is_causal_mask(g: &Graph, mask: NodeId, t: usize) -> bool {
    let Op::Broadcast { .. } = g.op(mask) else {
        return false;
    };
    let c = g.inputs(mask)[0];
    if g.ty(c).shape[..] != [t, t] {
        return false;
    }
    let iota_axis = |id: NodeId| match g.op(id) {
        Op::Iota { axis, .. } if g.ty(id).rank() == 2 => Some(*axis),
        _ => None,
    };
    let ops = g.inputs(c);
    match g.op(c) {
        Op::Compare(CompareOp::Le) => iota_axis(ops[0]) == Some(1) && iota_axis(ops[1]) == Some(0),
        Op::Compare(CompareOp::Ge) => iota_axis(ops[0]) == Some(0) && iota_axis(ops[1]) == Some(1),
        _ => false,
    }
}

/// Matches `model::causal_attention`: `out = matmul(P, V)` with `P` the
/// max-subtracted softmax over the last axis of `select(causal mask, (Q ·
/// Kᵀ) · 1/√hd, −∞)`. Keys and values expanded by `attention::expand_kv` (reshape →
/// broadcast → reshape of `[B, H_kv, T, hd]`) are read unexpanded when the
/// expansion has no other reader. Returns the fused kernel and the nodes it
/// absorbs (the masks and constants, shared between layers, are not).
pub(super) fn match_attention(
    g: &Graph,
    out: NodeId,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Option<(Kernel, Vec<NodeId>)> {
    if !matches!(g.op(out), Op::MatMul) || g.ty(out).rank() != 4 {
        return None;
    }
    let ins = |id: NodeId| g.inputs(id);
    let [p, vx] = ins(out)[..] else { return None };
    let qs = g.ty(out).shape.clone();
    let (t, hd) = (qs[2], qs[3]);
    let is = |id: NodeId, f: &dyn Fn(&Op) -> bool| f(g.op(id));
    // p = e / broadcast(sum(e)), e = exp(z), z = s2 − broadcast(max(s2)).
    if !is(p, &|o| matches!(o, Op::Binary(BinaryOp::Div))) {
        return None;
    }
    let [e, db] = ins(p)[..] else { return None };
    let den = *ins(db).first()?;
    let ok = is(db, &|o| matches!(o, Op::Broadcast { .. }))
        && reduces_over(g, den, ReduceKind::Sum, 3)
        && ins(den)[..] == [e]
        && is(e, &|o| matches!(o, Op::Unary(UnaryOp::Exp)));
    if !ok {
        return None;
    }
    let (s2, shift) = max_subtracted(g, ins(e)[0], 3)?;
    let mut inner = vec![p, db, den, e, s2];
    inner.extend(shift);
    // s2 = select(causal, sc, −∞), sc = qk · 1/√hd, qk = q · kᵀ.
    let [mask, sc, neg] = ins(s2)[..] else {
        return None;
    };
    if !matches!(g.op(s2), Op::Select)
        || !is_causal_mask(g, mask, t)
        || !constant_is(g, neg, f64::NEG_INFINITY)
        || !is(sc, &|o| matches!(o, Op::Binary(BinaryOp::Mul)))
    {
        return None;
    }
    let [qk, scale] = ins(sc)[..] else {
        return None;
    };
    if !constant_is(g, scale, 1.0 / (hd as f64).sqrt()) || !matches!(g.op(qk), Op::MatMul) {
        return None;
    }
    let [q, kt] = ins(qk)[..] else { return None };
    if !g.op(kt).is_matrix_transpose() {
        return None;
    }
    let kx = ins(kt)[0];
    inner.extend([sc, qk, kt]);
    let shape_ok = g.ty(q).shape == qs && g.ty(kx).shape == qs && g.ty(vx).shape == qs;
    let dtype_ok = [q, kx, vx]
        .iter()
        .all(|&x| matches!(g.ty(x).dtype, DType::F32 | DType::F64));
    if !shape_ok || !dtype_ok || t == 0 || hd == 0 || hd > MAX_ATTENTION_HEAD_DIM {
        return None;
    }
    let inside: HashSet<NodeId> = inner.iter().copied().chain([out]).collect();
    if !sealed(&inner, &inside, users, outputs) {
        return None;
    }
    // expand_kv: reshape(broadcast(reshape(x [B, H_kv, T, hd]))).
    let unexpand = |x: NodeId| -> Option<(NodeId, [NodeId; 2])> {
        let b = *ins(x).first()?;
        let r = *ins(b).first()?;
        let src = *ins(r).first()?;
        let chain = matches!(g.op(x), Op::Reshape { .. })
            && matches!(g.op(b), Op::Broadcast { .. })
            && matches!(g.op(r), Op::Reshape { .. });
        let ss = &g.ty(src).shape;
        let grouped = ss.len() == 4
            && ss[0] == qs[0]
            && ss[2] == t
            && ss[3] == hd
            && ss[1] > 0
            && qs[1].is_multiple_of(ss[1])
            && g.ty(r).shape[..] == [qs[0], ss[1], 1, t, hd]
            && g.ty(b).shape[..] == [qs[0], ss[1], qs[1] / ss[1], t, hd];
        (chain && grouped).then_some((src, [x, b]))
    };
    let (mut k, mut v, mut kv_heads) = (kx, vx, qs[1]);
    if let (Some((ks, ke)), Some((vs, ve))) = (unexpand(kx), unexpand(vx)) {
        let mut all = inner.clone();
        all.extend(ke.iter().chain(&ve).copied());
        let reshapes = [ins(ke[1])[0], ins(ve[1])[0]];
        all.extend(reshapes);
        let inside2: HashSet<NodeId> = all.iter().copied().chain([out]).collect();
        if g.ty(ks).shape[1] == g.ty(vs).shape[1]
            && sealed(&all[inner.len()..], &inside2, users, outputs)
        {
            (k, v, kv_heads) = (ks, vs, g.ty(ks).shape[1]);
            inner = all;
        }
    }
    inner.sort();
    inner.dedup();
    Some((
        Kernel::Attention {
            id: out,
            q,
            k,
            v,
            kv_heads,
        },
        inner,
    ))
}
