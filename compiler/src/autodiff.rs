//! Reverse-mode automatic differentiation as an IR → IR transformation.
//!
//! `vjp` appends to the graph the nodes that compute a vector-Jacobian
//! product. Every rule below is written with ordinary IR ops, so the result
//! is again a plain graph and can be differentiated in turn: gradients of
//! gradients, Hessian-vector products and mixed second derivatives come from
//! applying the same function twice.

use crate::ir::{
    AttentionOperand, BinaryOp, CompareOp, DType, Graph, LogprobOperand, NodeId, NormOperand, Op,
    ReduceKind, UnaryOp,
};
use std::collections::{HashMap, HashSet};

/// Nodes whose value depends differentiably on any of `wrt`: float-typed
/// descendants of `wrt`, not passing through `stop_gradient` or through ops
/// whose result carries no derivative (comparisons, casts to integers, …).
fn differentiable_descendants(g: &Graph, wrt: &[NodeId], order: &[NodeId]) -> HashSet<NodeId> {
    let mut dep: HashSet<NodeId> = wrt
        .iter()
        .copied()
        .filter(|&w| g.ty(w).dtype.is_float())
        .collect();
    for &id in order {
        if dep.contains(&id) || !g.ty(id).dtype.is_float() {
            continue;
        }
        let blocks = matches!(g.op(id), Op::StopGradient | Op::OneHot { .. });
        if !blocks && g.inputs(id).iter().any(|i| dep.contains(i)) {
            dep.insert(id);
        }
    }
    dep
}

/// Ancestors of `ys`, including `ys`.
fn ancestors(g: &Graph, ys: &[NodeId]) -> HashSet<NodeId> {
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = ys.to_vec();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.inputs(n));
        }
    }
    seen
}

/// Adds nodes computing `Σ_j seeds[j] · ∂ys[j]/∂wrt[i]` for each `wrt[i]`
/// and returns them (in the order of `wrt`). `seeds[j]` has the type of
/// `ys[j]`. A `wrt` node the outputs do not depend on gets a zero constant.
pub fn vjp(g: &mut Graph, ys: &[NodeId], seeds: &[NodeId], wrt: &[NodeId]) -> Vec<NodeId> {
    assert_eq!(ys.len(), seeds.len(), "one seed per output");
    let order = g.topo_order();
    let dep = differentiable_descendants(g, wrt, &order);
    let anc = ancestors(g, ys);
    let mut ct: HashMap<NodeId, NodeId> = HashMap::new();
    for (&y, &s) in ys.iter().zip(seeds) {
        assert_eq!(g.ty(y), g.ty(s), "seed type must match its output");
        if dep.contains(&y) {
            accumulate(g, &mut ct, y, s);
        }
    }
    for &id in order.iter().rev() {
        if !anc.contains(&id) || !dep.contains(&id) {
            continue;
        }
        let Some(&gout) = ct.get(&id) else { continue };
        let inputs = g.inputs(id);
        let needs: Vec<bool> = inputs.iter().map(|i| dep.contains(i)).collect();
        if !needs.iter().any(|&b| b) {
            continue;
        }
        for (slot, c) in input_cotangents(g, id, &inputs, &needs, gout) {
            accumulate(g, &mut ct, inputs[slot], c);
        }
    }
    wrt.iter()
        .map(|&w| match ct.get(&w) {
            Some(&c) => c,
            None => g.full_like(0.0, w),
        })
        .collect()
}

/// Reverse mode over the part of the graph between `leaves` and `y` only:
/// the leaves are treated as independent variables, whatever they depend
/// on and whatever depends on them. Returns each leaf's cotangent (`None`
/// when `y` does not depend on it). Used to differentiate a subgraph built
/// for one node's derivative rule.
fn vjp_between(g: &mut Graph, y: NodeId, seed: NodeId, leaves: &[NodeId]) -> Vec<Option<NodeId>> {
    let is_leaf = |n: &NodeId| leaves.contains(n);
    // Post-order from y, not entering the leaves: a topological order of
    // the subgraph.
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(y, false)];
    while let Some((n, expanded)) = stack.pop() {
        if expanded {
            order.push(n);
            continue;
        }
        if !seen.insert(n) {
            continue;
        }
        stack.push((n, true));
        if !is_leaf(&n) {
            for i in g.inputs(n) {
                if !seen.contains(&i) {
                    stack.push((i, false));
                }
            }
        }
    }
    let mut dep: HashSet<NodeId> = HashSet::new();
    for &n in &order {
        if !g.ty(n).dtype.is_float() {
            continue;
        }
        let blocks = matches!(g.op(n), Op::StopGradient | Op::OneHot { .. });
        if is_leaf(&n) || (!blocks && g.inputs(n).iter().any(|i| dep.contains(i))) {
            dep.insert(n);
        }
    }
    let mut ct: HashMap<NodeId, NodeId> = HashMap::new();
    if dep.contains(&y) {
        accumulate(g, &mut ct, y, seed);
    }
    for &n in order.iter().rev() {
        if is_leaf(&n) || !dep.contains(&n) {
            continue;
        }
        let Some(&gout) = ct.get(&n) else { continue };
        let inputs = g.inputs(n);
        let needs: Vec<bool> = inputs.iter().map(|i| dep.contains(i)).collect();
        for (slot, c) in input_cotangents(g, n, &inputs, &needs, gout) {
            accumulate(g, &mut ct, inputs[slot], c);
        }
    }
    leaves.iter().map(|l| ct.get(l).copied()).collect()
}

/// The cotangents of a node's operand slots when its value is `r`, a
/// subgraph built from the operands for the node's derivative rule and
/// seeded with `gout`; an operand named twice gets its total once.
fn operand_cotangents(
    g: &mut Graph,
    r: NodeId,
    gout: NodeId,
    inputs: &[NodeId],
) -> Vec<(usize, NodeId)> {
    let cts = vjp_between(g, r, gout, inputs);
    cts.into_iter()
        .enumerate()
        .filter(|&(slot, _)| !inputs[..slot].contains(&inputs[slot]))
        .filter_map(|(slot, c)| c.map(|c| (slot, c)))
        .collect()
}

/// `update_slice`'s written positions as a boolean of `base`'s shape:
/// `j == index[0]` along `axis`.
pub fn update_slice_mask(g: &mut Graph, base: NodeId, index: NodeId, axis: usize) -> NodeId {
    let shape = g.ty(base).shape.clone();
    let l = shape[axis];
    let j = g.iota(0, DType::I32, vec![l]);
    let p = g.broadcast(index, vec![l]);
    let at = g.compare(CompareOp::Eq, j, p);
    let mut aligned = vec![1; shape.len()];
    aligned[axis] = l;
    let at = g.reshape(at, aligned);
    g.broadcast(at, shape)
}

/// `build` over `xs`, each bf16 one cast to f32 first, and its result cast
/// to `out`: how the derivative rules of the ops that compute in f32 from
/// bf16 operands (attention, RMSNorm, the linear log-prob) write that
/// computation with ordinary ops. Without bf16 operands, `build(xs)`.
pub fn widened(
    g: &mut Graph,
    xs: &[NodeId],
    out: DType,
    build: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId,
) -> NodeId {
    if xs
        .iter()
        .all(|&x| g.ty(x).dtype.accumulator() == g.ty(x).dtype)
    {
        return build(g, xs);
    }
    let wide: Vec<NodeId> = xs
        .iter()
        .map(|&x| {
            let dt = g.ty(x).dtype;
            if dt.accumulator() == dt {
                x
            } else {
                g.cast(x, dt.accumulator())
            }
        })
        .collect();
    let r = build(g, &wide);
    if g.ty(r).dtype == out {
        r
    } else {
        g.cast(r, out)
    }
}

/// Barrier tags of the row blocks of `linear_logprob_grad_vjp` (distinct
/// from the memory plan's step tags).
const LOGPROB_BLOCK_TAG: u32 = 1 << 24;

/// The cotangents of the operand slots of `linear_logprob_grad(wrt, h, w,
/// targets, g)` (operands `inputs`, cotangent `gout`), or of
/// `linear_entropy_grad(wrt, h, w, g)` (`inputs` without targets): the
/// same computation written with ordinary ops, differentiated `rows` rows
/// of h at a time, so at most `[rows, V]` of its logit-sized values are
/// alive at once; the row blocks' cotangents are concatenated (h, g) and
/// added (w). The derivative rule of `Op::LinearLogprobGrad` and
/// `Op::LinearEntropyGrad`, with `rows` from `linear_logprob::expansion_rows`.
pub fn linear_logprob_grad_vjp(
    g: &mut Graph,
    wrt: LogprobOperand,
    inputs: &[NodeId],
    gout: NodeId,
    rows: usize,
) -> Vec<(usize, NodeId)> {
    use crate::linear_logprob::{reference_entropy_grad, reference_grad};
    // The gradient's coefficient g is the last operand; targets (a log-prob's) the third of four.
    let (h, w, gr) = match inputs[..] {
        [h, w, _, gr] | [h, w, gr] => (h, w, gr),
        _ => panic!("linear_logprob_grad takes four operands, linear_entropy_grad three"),
    };
    let g_slot = inputs.len() - 1;
    let targets = (inputs.len() == 4).then(|| inputs[2]);
    let out = g.ty(inputs[wrt.slot()]).dtype;
    let reference = |g: &mut Graph, hc, yc: Option<NodeId>, gc| {
        widened(g, &[hc, w], out, |g, hw| match yc {
            Some(yc) => reference_grad(g, wrt, [hw[0], hw[1], yc], gc),
            None => reference_entropy_grad(g, wrt, [hw[0], hw[1]], gc),
        })
    };
    let n = g.ty(h).shape[0];
    if rows >= n {
        let r = reference(g, h, targets, gr);
        return operand_cotangents(g, r, gout, inputs);
    }
    let (mut dh, mut dg, mut dw) = (vec![], vec![], None);
    for r0 in (0..n).step_by(rows.max(1)) {
        let r1 = (r0 + rows).min(n);
        // Behind barriers per operand, so that CSE does not share a
        // block's logit-sized values between the h and the w rule (the two run at
        // different points of the adjoint sweep; shared, every block's
        // logits would be alive in between).
        let tag = LOGPROB_BLOCK_TAG + wrt.slot() as u32;
        let hc = g.slice_axis(h, 0, r0, r1);
        let hc = g.barrier(hc, tag);
        let yc = targets.map(|y| g.slice_axis(y, 0, r0, r1));
        let gc = g.slice_axis(gr, 0, r0, r1);
        let gc = g.barrier(gc, tag);
        let r = reference(g, hc, yc, gc);
        let seed = match wrt {
            LogprobOperand::Hidden => g.slice_axis(gout, 0, r0, r1),
            LogprobOperand::Weight => gout,
        };
        let cts = vjp_between(g, r, seed, &[hc, w, gc]);
        let or_zero =
            |g: &mut Graph, c: Option<NodeId>, like| c.unwrap_or_else(|| g.full_like(0.0, like));
        dh.push(or_zero(g, cts[0], hc));
        dg.push(or_zero(g, cts[2], gc));
        if let Some(c) = cts[1] {
            // Summed block by block: the barrier ends each partial sum's
            // elementwise group, so the fusion pass does not make the
            // whole sum one kernel that holds every block's term.
            dw = Some(match dw {
                Some(a) => {
                    let s = g.add(a, c);
                    g.barrier(s, 0)
                }
                None => c,
            });
        }
    }
    let mut res = vec![(0, g.concat(&dh, 0)), (g_slot, g.concat(&dg, 0))];
    if let Some(c) = dw {
        res.push((1, c));
    }
    res
}

/// Gradient of a one-element output `y` (seed 1) with respect to `wrt`.
pub fn grad(g: &mut Graph, y: NodeId, wrt: &[NodeId]) -> Vec<NodeId> {
    assert_eq!(
        g.ty(y).numel(),
        1,
        "grad needs a one-element output; use vjp"
    );
    let seed = g.full_like(1.0, y);
    vjp(g, &[y], &[seed], wrt)
}

fn accumulate(g: &mut Graph, ct: &mut HashMap<NodeId, NodeId>, node: NodeId, c: NodeId) {
    let c = match ct.get(&node) {
        Some(&prev) => g.add(prev, c),
        None => c,
    };
    ct.insert(node, c);
}

/// The cotangent contribution of node `id` (cotangent `gout`) to each operand
/// slot that needs one.
fn input_cotangents(
    g: &mut Graph,
    id: NodeId,
    inputs: &[NodeId],
    needs: &[bool],
    gout: NodeId,
) -> Vec<(usize, NodeId)> {
    let op = g.op(id).clone();
    let out = id;
    let x = inputs.first().copied().unwrap_or(id);
    let mut res = Vec::new();
    let in_shape = |g: &Graph, i: usize| g.ty(inputs[i]).shape.clone();
    match op {
        Op::Unary(u) => {
            let c = match u {
                UnaryOp::Neg => Some(g.neg(gout)),
                UnaryOp::Exp => Some(g.mul(gout, out)),
                UnaryOp::Log => Some(g.div(gout, x)),
                UnaryOp::Sqrt => {
                    let two_out = g.scale(out, 2.0);
                    Some(g.div(gout, two_out))
                }
                UnaryOp::Rsqrt => {
                    // d/dx x^(-1/2) = -1/2 · x^(-1/2) / x
                    let r = g.div(out, x);
                    let r = g.scale(r, -0.5);
                    Some(g.mul(gout, r))
                }
                UnaryOp::Tanh => {
                    let sq = g.mul(out, out);
                    let one = g.full_like(1.0, out);
                    let d = g.sub(one, sq);
                    Some(g.mul(gout, d))
                }
                UnaryOp::Sigmoid => {
                    let one = g.full_like(1.0, out);
                    let om = g.sub(one, out);
                    let d = g.mul(out, om);
                    Some(g.mul(gout, d))
                }
                UnaryOp::Silu => {
                    // silu' = s · (1 + x · (1 − s)), s = sigmoid(x)
                    let s = g.sigmoid(x);
                    let one = g.full_like(1.0, x);
                    let om = g.sub(one, s);
                    let xom = g.mul(x, om);
                    let one2 = g.full_like(1.0, x);
                    let t = g.add(one2, xom);
                    let d = g.mul(s, t);
                    Some(g.mul(gout, d))
                }
                UnaryOp::Abs => {
                    let s = g.unary(UnaryOp::Sign, x);
                    Some(g.mul(gout, s))
                }
                UnaryOp::Sign => None,
                UnaryOp::Recip => {
                    let sq = g.mul(out, out);
                    let t = g.mul(gout, sq);
                    Some(g.neg(t))
                }
                UnaryOp::Sin => {
                    let c = g.unary(UnaryOp::Cos, x);
                    Some(g.mul(gout, c))
                }
                UnaryOp::Cos => {
                    let s = g.unary(UnaryOp::Sin, x);
                    let t = g.mul(gout, s);
                    Some(g.neg(t))
                }
            };
            if let Some(c) = c {
                res.push((0, c));
            }
        }
        Op::Binary(b) => {
            let (a, bb) = (inputs[0], inputs[1]);
            match b {
                BinaryOp::Add => {
                    res.push((0, gout));
                    res.push((1, gout));
                }
                BinaryOp::Sub => {
                    res.push((0, gout));
                    if needs[1] {
                        res.push((1, g.neg(gout)));
                    }
                }
                BinaryOp::Mul => {
                    if needs[0] {
                        res.push((0, g.mul(gout, bb)));
                    }
                    if needs[1] {
                        res.push((1, g.mul(gout, a)));
                    }
                }
                BinaryOp::Div => {
                    if needs[0] {
                        res.push((0, g.div(gout, bb)));
                    }
                    if needs[1] {
                        let t = g.mul(gout, out);
                        let t = g.div(t, bb);
                        res.push((1, g.neg(t)));
                    }
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // The forward op returns `a` on ties; so does the credit.
                    let cmp = if b == BinaryOp::Max {
                        CompareOp::Ge
                    } else {
                        CompareOp::Le
                    };
                    let mask = g.compare(cmp, a, bb);
                    let zero = g.full_like(0.0, gout);
                    if needs[0] {
                        res.push((0, g.select(mask, gout, zero)));
                    }
                    if needs[1] {
                        res.push((1, g.select(mask, zero, gout)));
                    }
                }
                BinaryOp::Pow => {
                    if needs[0] {
                        // b · a^(b−1)
                        let one = g.full_like(1.0, bb);
                        let bm1 = g.sub(bb, one);
                        let p = g.pow(a, bm1);
                        let d = g.mul(bb, p);
                        res.push((0, g.mul(gout, d)));
                    }
                    if needs[1] {
                        // a^b · ln a
                        let l = g.log(a);
                        let d = g.mul(out, l);
                        res.push((1, g.mul(gout, d)));
                    }
                }
            }
        }
        Op::Select => {
            let cond = inputs[0];
            let zero = g.full_like(0.0, gout);
            if needs[1] {
                res.push((1, g.select(cond, gout, zero)));
            }
            if needs[2] {
                res.push((2, g.select(cond, zero, gout)));
            }
        }
        Op::Clamp { min, max } => {
            // Passes the gradient where min ≤ x ≤ max (as PyTorch does).
            let lo = g.full_like(min.get(), x);
            let hi = g.full_like(max.get(), x);
            let below = g.compare(CompareOp::Lt, x, lo);
            let above = g.compare(CompareOp::Gt, x, hi);
            let zero = g.full_like(0.0, gout);
            let t = g.select(above, zero, gout);
            res.push((0, g.select(below, zero, t)));
        }
        Op::Reduce {
            kind,
            axes,
            keepdim: _,
        } => {
            let shape = in_shape(g, 0);
            let keep: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            let gk = g.reshape(gout, keep.clone());
            match kind {
                ReduceKind::Sum => res.push((0, g.broadcast(gk, shape))),
                ReduceKind::Mean => {
                    let count: usize = axes.iter().map(|&a| shape[a]).product();
                    let b = g.broadcast(gk, shape);
                    res.push((0, g.scale(b, 1.0 / count as f64)));
                }
                ReduceKind::Max => {
                    // Split evenly between tied maxima.
                    let mk = g.reshape(out, keep.clone());
                    let mb = g.broadcast(mk, shape.clone());
                    let hit = g.compare(CompareOp::Eq, x, mb);
                    let mask = g.cast(hit, g.ty(x).dtype);
                    let cnt = g.sum(mask, &axes, true);
                    let share = g.div(gk, cnt);
                    let sb = g.broadcast(share, shape);
                    res.push((0, g.mul(sb, mask)));
                }
            }
        }
        Op::MatMul => {
            let (a, b) = (inputs[0], inputs[1]);
            if needs[0] {
                let bt = g.transpose(b);
                res.push((0, g.matmul(gout, bt)));
            }
            if needs[1] {
                let at = g.transpose(a);
                res.push((1, g.matmul(at, gout)));
            }
        }
        Op::Broadcast { .. } => {
            let s = in_shape(g, 0);
            res.push((0, g.unbroadcast(gout, &s)));
        }
        Op::Reshape { .. } => {
            let s = in_shape(g, 0);
            res.push((0, g.reshape(gout, s)));
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            res.push((0, g.permute(gout, &inv)));
        }
        Op::Slice { start, end } => {
            let s = in_shape(g, 0);
            let hi: Vec<usize> = s.iter().zip(&end).map(|(&d, &e)| d - e).collect();
            res.push((0, g.pad(gout, &start, &hi, 0.0)));
        }
        Op::Pad { lo, .. } => {
            let s = in_shape(g, 0);
            let end: Vec<usize> = lo.iter().zip(&s).map(|(&l, &d)| l + d).collect();
            res.push((0, g.slice(gout, &lo, &end)));
        }
        Op::Concat { axis } => {
            let mut off = 0;
            for (slot, &i) in inputs.iter().enumerate() {
                let len = g.ty(i).shape[axis];
                if needs[slot] {
                    res.push((slot, g.slice_axis(gout, axis, off, off + len)));
                }
                off += len;
            }
        }
        Op::TakeAlongAxis { axis } => {
            let zero = g.full_like(0.0, x);
            res.push((0, g.scatter_add(zero, inputs[1], gout, axis)));
        }
        Op::ScatterAdd { axis } => {
            if needs[0] {
                res.push((0, gout));
            }
            if needs[2] {
                res.push((2, g.take_along_axis(gout, inputs[1], axis)));
            }
        }
        Op::UpdateSlice { axis } => {
            // The written slice's cotangent goes to the update, the rest to
            // the base.
            let mask = update_slice_mask(g, inputs[0], inputs[2], axis);
            let zero = g.full_like(0.0, gout);
            if needs[0] {
                res.push((0, g.select(mask, zero, gout)));
            }
            if needs[1] {
                let on = g.select(mask, gout, zero);
                res.push((1, g.sum(on, &[axis], true)));
            }
        }
        Op::Gather => {
            let rows = g.ty(inputs[0]).shape[0];
            res.push((0, g.scatter_add_rows(inputs[1], gout, rows)));
        }
        Op::ScatterAddRows { .. } => {
            res.push((1, g.gather(gout, inputs[0])));
        }
        Op::CausalAttention => {
            let qkvo = [inputs[0], inputs[1], inputs[2], out];
            for wrt in AttentionOperand::ALL {
                if needs[wrt.slot()] {
                    res.push((wrt.slot(), g.causal_attention_grad(wrt, qkvo, gout)));
                }
            }
        }
        Op::CachedAttention => {
            let [q, k, v, pos] = [inputs[0], inputs[1], inputs[2], inputs[3]];
            let r = crate::attention::reference_cached_attention(g, q, k, v, pos);
            res.extend(operand_cotangents(g, r, gout, inputs));
        }
        Op::LinearLogprob => {
            let hwt = [inputs[0], inputs[1], inputs[2]];
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                if needs[wrt.slot()] {
                    res.push((wrt.slot(), g.linear_logprob_grad(wrt, hwt, gout)));
                }
            }
        }
        Op::LinearEntropy => {
            let hw = [inputs[0], inputs[1]];
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                if needs[wrt.slot()] {
                    res.push((wrt.slot(), g.linear_entropy_grad(wrt, hw, gout)));
                }
            }
        }
        Op::LinearLogprobGrad { wrt } | Op::LinearEntropyGrad { wrt } => {
            let [h, w] = [inputs[0], inputs[1]];
            let rows = crate::linear_logprob::expansion_rows(&g.ty(h).shape, &g.ty(w).shape);
            res.extend(linear_logprob_grad_vjp(g, wrt, inputs, gout, rows));
        }
        Op::CausalAttentionGrad { wrt } => {
            // Differentiate the same computation written with ordinary ops,
            // built here so its [T, T] values live only while this node's
            // cotangents are computed.
            let out = g.ty(inputs[wrt.slot()]).dtype;
            let r = widened(g, &inputs[..5], out, |g, x| {
                crate::attention::reference_grad(g, wrt, [x[0], x[1], x[2], x[3]], x[4])
            });
            res.extend(operand_cotangents(g, r, gout, inputs));
        }
        Op::RmsNorm { eps } => {
            let xw = [inputs[0], inputs[1]];
            for wrt in [NormOperand::Input, NormOperand::Weight] {
                if needs[wrt.slot()] {
                    res.push((wrt.slot(), g.rms_norm_grad(wrt, xw, gout, eps.get())));
                }
            }
        }
        Op::RmsNormGrad { wrt, eps } => {
            let out = g.ty(inputs[wrt.slot()]).dtype;
            let r = widened(g, &inputs[..3], out, |g, x| {
                crate::rms_norm::reference_grad(g, wrt, [x[0], x[1]], x[2], eps.get())
            });
            res.extend(operand_cotangents(g, r, gout, inputs));
        }
        Op::Rope { transpose } => {
            let [x, c, s] = [inputs[0], inputs[1], inputs[2]];
            if needs[1] || needs[2] {
                // The tables' gradients (sums over the leading axes) from
                // the op written with ordinary ops.
                let r = crate::rope::reference_rope(g, x, c, s, transpose);
                res.extend(operand_cotangents(g, r, gout, inputs));
            } else {
                res.push((0, g.rope(gout, c, s, !transpose)));
            }
        }
        Op::OptimStep { rule, out } => {
            let r = crate::optim::reference_step(g, rule, out, inputs);
            res.extend(operand_cotangents(g, r, gout, inputs));
        }
        Op::TokenLoss { loss } => {
            // logπ also in a data slot gets its one total from the
            // expansion below.
            let aliased = inputs[1..].contains(&inputs[0]);
            if needs[0] && !aliased {
                res.push((0, g.token_loss_grad(loss, inputs, gout)));
            }
            if aliased || needs[1..].iter().any(|&n| n) {
                // The data operands' cotangents (none in the pipelines:
                // masks, advantages and old log-probs are inputs) from the
                // loss written with ordinary ops.
                let r = crate::losses::reference_loss(g, loss, inputs);
                let cts = operand_cotangents(g, r, gout, inputs);
                res.extend(cts.into_iter().filter(|&(slot, _)| aliased || slot > 0));
            }
        }
        Op::TokenLossGrad { loss } => {
            let (ops, gr) = inputs.split_at(loss.arity());
            let r = crate::losses::reference_grad(g, loss, ops, gr[0]);
            res.extend(operand_cotangents(g, r, gout, inputs));
        }
        Op::Barrier { .. } => res.push((0, gout)),
        // Every process's objective reads the sum: the cotangent of each
        // operand is the sum of the processes' cotangents.
        Op::AllReduceSum => res.push((0, g.all_reduce_sum(gout))),
        Op::Cast { .. } => {
            let dt = g.ty(x).dtype;
            if dt.is_float() {
                res.push((0, g.cast(gout, dt)));
            }
        }
        Op::StopGradient
        | Op::Compare(_)
        | Op::OneHot { .. }
        | Op::Input { .. }
        | Op::Full { .. }
        | Op::Literal { .. }
        | Op::Iota { .. } => {}
    }
    res.retain(|&(slot, _)| needs[slot]);
    res
}
