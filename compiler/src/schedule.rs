//! The execution schedule of a graph and a memory estimate along it: which
//! nodes run, in which order, and how many buffer bytes are live at the
//! busiest point. The liveness model is the one the CPU executor follows
//! (`coopc_runtime::execute`), so `peak_bytes` predicts its footprint — as
//! an upper bound, since the executor also leaves out the transposes that
//! only matrix products read (it reads their operands through strides).

use crate::ir::{execution_order, Graph, NodeId, Op};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The order a graph's needed nodes run in, and what running them costs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The nodes the outputs depend on, in [`execution_order`].
    pub order: Vec<NodeId>,
    /// Most buffer bytes live at once (inputs included), see [`schedule`].
    pub peak_bytes: usize,
    /// Bytes of the inputs the outputs depend on.
    pub input_bytes: usize,
    /// Bytes of the output values (each output node counted once).
    pub output_bytes: usize,
    /// Scheduled nodes by op name (`Op::name`).
    pub op_counts: BTreeMap<String, usize>,
    /// Rough arithmetic count: `2·m·n·k·batch` per matmul (and per product
    /// an attention or linear log-prob op computes inside), one per result
    /// element of an arithmetic elementwise op, one per operand element of a
    /// reduction, one per update element of a scatter; data movement is free.
    pub flops: u64,
}

/// Schedules `g` (which should pass `Graph::validate`) and simulates the
/// liveness of its buffers along the schedule:
///
/// - every input the outputs need is live from the start until the step of
///   its last use;
/// - every other node's value is allocated at its own step and freed right
///   after its last use; outputs stay live to the end;
/// - a `reshape` or `stop_gradient` whose operand (not an input) dies at that
///   step takes the operand's buffer over and allocates nothing;
/// - at the end, an output named more than once is handed out as copies, and
///   an output that is an input is copied out of the caller's tensor.
///
/// The peak is the largest total over the steps, counted while a node's
/// result and all its operands are live.
pub fn schedule(g: &Graph) -> Schedule {
    simulate(g, None).0
}

/// What is live when a schedule reaches its peak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeakLive {
    /// Index into `Schedule::order` of the node running at the peak
    /// (`order.len()` when the peak is the handing out of the results).
    pub step: usize,
    /// The peak; when it is the handing out of the results, this also
    /// counts the copies made of outputs named twice or that are inputs,
    /// which `buffers` does not list.
    pub bytes: usize,
    /// Every buffer live then (inputs included), largest first.
    pub buffers: Vec<NodeId>,
}

/// The buffers live at the peak of [`schedule`]'s liveness simulation —
/// what to shrink to lower it.
pub fn peak_live(g: &Graph) -> PeakLive {
    let (sc, step, _) = simulate(g, None);
    let (_, _, live) = simulate(g, Some(step));
    let mut buffers = live.unwrap_or_default();
    buffers.sort_by_key(|&id| std::cmp::Reverse(g.ty(id).size_bytes()));
    PeakLive {
        step,
        bytes: sc.peak_bytes,
        buffers,
    }
}

/// The liveness simulation: the schedule, the step its peak is first
/// reached, and (when `at` is given) the buffers live at step `at`.
fn simulate(g: &Graph, at: Option<usize>) -> (Schedule, usize, Option<Vec<NodeId>>) {
    let bound = g.node_ids().map(|id| id.index() + 1).max().unwrap_or(0);
    let bytes = |id: NodeId| g.ty(id).size_bytes();
    let is_input = |id: NodeId| matches!(g.op(id), Op::Input { .. });

    // Output nodes, with how often each is named.
    let mut mentions: HashMap<NodeId, usize> = HashMap::new();
    for &(_, id) in g.outputs() {
        if g.contains(id) {
            *mentions.entry(id).or_default() += 1;
        }
    }

    // Nodes the outputs depend on.
    let mut needed = vec![false; bound];
    let mut stack: Vec<NodeId> = mentions.keys().copied().collect();
    for &id in &stack {
        needed[id.index()] = true;
    }
    while let Some(id) = stack.pop() {
        for o in g.inputs(id) {
            if !needed[o.index()] {
                needed[o.index()] = true;
                stack.push(o);
            }
        }
    }
    let order = execution_order(g, &needed);
    let operands: Vec<Vec<NodeId>> = order.iter().map(|&id| g.inputs(id)).collect();

    let mut last_use = vec![usize::MAX; bound];
    for (step, ops) in operands.iter().enumerate() {
        for o in ops {
            last_use[o.index()] = step;
        }
    }
    let dies_at =
        |id: NodeId, step: usize| last_use[id.index()] == step && !mentions.contains_key(&id);

    let input_bytes: usize = order
        .iter()
        .filter(|&&id| is_input(id))
        .map(|&id| bytes(id))
        .sum();
    let output_bytes: usize = mentions.keys().map(|&id| bytes(id)).sum();

    let mut live = input_bytes;
    let mut peak = live;
    let mut peak_step = 0;
    // Which buffers are live, kept only when asked for a snapshot.
    let mut alive: Vec<bool> = vec![false; if at.is_some() { bound } else { 0 }];
    if at.is_some() {
        for &id in order.iter().filter(|&&id| is_input(id)) {
            alive[id.index()] = true;
        }
    }
    let mut snapshot: Option<Vec<NodeId>> = None;
    let take = |alive: &[bool]| -> Vec<NodeId> {
        order
            .iter()
            .copied()
            .filter(|id| alive[id.index()])
            .collect()
    };
    let mut op_counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut flops: u64 = 0;
    for (step, (&id, ops)) in order.iter().zip(&operands).enumerate() {
        let op = g.op(id);
        *op_counts.entry(op.name().to_string()).or_default() += 1;
        flops = flops.saturating_add(crate::ir::cost::op_flops(g, id));

        let hands_over = matches!(
            op,
            Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. }
        ) && !is_input(ops[0])
            && dies_at(ops[0], step);
        if hands_over {
            // The operand's buffer becomes this node's: nothing changes.
            if at.is_some() {
                alive[ops[0].index()] = false;
                alive[id.index()] = true;
            }
            continue;
        }
        if !is_input(id) {
            live += bytes(id);
            if at.is_some() {
                alive[id.index()] = true;
            }
        }
        if live > peak {
            peak = live;
            peak_step = step;
        }
        if at == Some(step) {
            snapshot = Some(take(&alive));
        }
        let mut freed: Vec<NodeId> = Vec::with_capacity(ops.len());
        for &o in ops {
            if dies_at(o, step) && !freed.contains(&o) {
                freed.push(o);
                live -= bytes(o);
                if at.is_some() {
                    alive[o.index()] = false;
                }
            }
        }
    }

    // Handing out the results: repeated names and inputs are copies.
    let copies: usize = mentions
        .iter()
        .map(|(&id, &n)| (n - 1 + usize::from(is_input(id))) * bytes(id))
        .sum();
    if live + copies > peak {
        peak = live + copies;
        peak_step = order.len();
    }
    if at == Some(order.len()) {
        snapshot = Some(take(&alive));
    }

    let sc = Schedule {
        order,
        peak_bytes: peak,
        input_bytes,
        output_bytes,
        op_counts,
        flops,
    };
    (sc, peak_step, snapshot)
}

/// A byte count in binary units with two decimals: `512 B`, `1.50 MiB`.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

/// Floating-point operations in decimal units: `13.78 GFLOP`.
pub fn human_flops(n: u64) -> String {
    const UNITS: [&str; 6] = ["FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"];
    if n < 1000 {
        return format!("{n} FLOP");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;

    /// x f32[4,8] (128 B), w f32[8,2] (64 B); y = x·w (32 B), z = exp(y)
    /// (32 B), r = reshape(z) (taken over), s = sum(r) (4 B); outputs s, y;
    /// plus a node no output needs.
    fn small() -> (Graph, [NodeId; 7]) {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![4, 8]);
        let w = g.input("w", DType::F32, vec![8, 2]);
        let y = g.matmul(x, w);
        let z = g.exp(y);
        let r = g.reshape(z, vec![8]);
        let s = g.sum(r, &[0], false);
        let dead = g.neg(x);
        g.set_output("s", s);
        g.set_output("y", y);
        (g, [x, w, y, z, r, s, dead])
    }

    #[test]
    fn views_run_just_before_their_first_user() {
        // b = broadcast(x) is created first but only used at the end: run
        // eagerly it would be live through the whole chain.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![1, 256]);
        let y = g.input("y", DType::F32, vec![64, 256]);
        let b = g.broadcast(x, vec![64, 256]);
        let mut c = y;
        for _ in 0..5 {
            c = g.exp(c);
        }
        let out = g.add(b, c);
        g.set_output("out", out);
        let sc = schedule(&g);
        let at = |id: NodeId| sc.order.iter().position(|&n| n == id).unwrap();
        assert_eq!(at(b) + 1, at(out));
        // The peak is the final add (b, c5 and the sum, 64 KiB each). Run
        // eagerly, b would also be live beside x, y and the first exp.
        let kib = 1024;
        assert_eq!(sc.peak_bytes, 3 * 64 * kib);
    }

    #[test]
    fn a_node_recreated_at_the_end_does_not_hold_back_its_users() {
        // f = exp(x) · c, summed, then an independent chain of exps on y.
        // With `recreate`, c is rebuilt after the chain (as a pass that
        // rewrites a node does): in index order the product, and so f's
        // release, would wait until after the chain.
        let build = |recreate: bool| {
            let mut g = Graph::new();
            let x = g.input("x", DType::F32, vec![64, 256]);
            let y = g.input("y", DType::F32, vec![64, 256]);
            let f = g.exp(x);
            let c = g.neg(x);
            let m = g.mul(f, c);
            let h = g.sum(m, &[0, 1], false);
            let mut ch = y;
            let mut chain = vec![];
            for _ in 0..5 {
                ch = g.exp(ch);
                chain.push(ch);
            }
            let t = g.sum(ch, &[0, 1], false);
            let out = g.add(h, t);
            g.set_output("out", out);
            if recreate {
                let c2 = g.neg(x);
                g.replace_uses(c, c2);
                g.remove(c);
            }
            (g, m, chain[0])
        };
        let (g, m, first_exp) = build(true);
        let sc = schedule(&g);
        let at = |id: NodeId| sc.order.iter().position(|&n| n == id).unwrap();
        assert!(at(m) < at(first_exp), "{:?}", sc.order);
        assert_eq!(sc.peak_bytes, schedule(&build(false).0).peak_bytes);
    }

    #[test]
    fn fused_ops_count_the_products_they_compute() {
        use crate::ir::{AttentionOperand, LogprobOperand};
        let mut g = Graph::new();
        let q = g.input("q", DType::F32, vec![1, 2, 3, 4]);
        let kv = g.input("kv", DType::F32, vec![1, 1, 3, 4]);
        let o = g.causal_attention(q, kv, kv);
        let dq = g.causal_attention_grad(AttentionOperand::Q, [q, kv, kv, o], o);
        let h = g.input("h", DType::F32, vec![3, 4]);
        let w = g.input("w", DType::F32, vec![5, 4]);
        let y = g.input("y", DType::I32, vec![3]);
        let lp = g.linear_logprob(h, w, y);
        let dw = g.linear_logprob_grad(LogprobOperand::Weight, [h, w, y], lp);
        g.set_output("dq", dq);
        g.set_output("dw", dw);
        // Attention: 2·B·H·T²·hd = 144 per product, 2 forward, 3 gradient;
        // log-prob: 2·N·V·d = 120, 1 forward, 2 gradient.
        assert_eq!(schedule(&g).flops, 144 * 5 + 120 * 3);
        let sc = schedule(&g);
        assert_eq!(crate::ir::cost::program_flops(&g, &sc.order), sc.flops);
    }

    #[test]
    fn peak_live_lists_the_buffers_at_the_peak() {
        let (g, [x, w, y, ..]) = small();
        let p = peak_live(&g);
        // At the matmul both inputs and its result are live: 224 B.
        assert_eq!(p.bytes, schedule(&g).peak_bytes);
        assert_eq!(p.bytes, 224);
        assert_eq!(schedule(&g).order[p.step], y);
        assert_eq!(p.buffers, vec![x, w, y]);
        let total: usize = p.buffers.iter().map(|&b| g.ty(b).size_bytes()).sum();
        assert_eq!(total, p.bytes);
    }

    #[test]
    fn peak_of_small_graph_matches_hand_count() {
        let (g, [x, w, y, z, r, s, _dead]) = small();
        let sc = schedule(&g);
        assert_eq!(sc.order, vec![x, w, y, z, r, s]);
        // start: x + w = 192; step y: 192 + 32 = 224 (peak), then x and w
        // die → 32; z: 64; r takes z's buffer: 64; s: 68, r dies → 36.
        assert_eq!(sc.peak_bytes, 224);
        assert_eq!(sc.input_bytes, 192);
        assert_eq!(sc.output_bytes, 36);
        // matmul 2·4·2·8 = 128, exp 8, sum over 8 elements.
        assert_eq!(sc.flops, 144);
        let counts: Vec<(&str, usize)> =
            sc.op_counts.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        assert_eq!(
            counts,
            vec![
                ("exp", 1),
                ("input", 2),
                ("matmul", 1),
                ("reduce_sum", 1),
                ("reshape", 1)
            ]
        );
    }

    #[test]
    fn peak_counts_a_large_intermediate_and_repeated_operands() {
        // a f64[10] (80 B) → b = broadcast to [10,10] (800 B) → c = b + b
        // (800 B) → d = sum (8 B). At c: a is dead (after b), b + c = 1600.
        let mut g = Graph::new();
        let a = g.input("a", DType::F64, vec![10]);
        let b = g.broadcast(a, vec![10, 10]);
        let c = g.add(b, b);
        let d = g.sum_all(c);
        g.set_output("d", d);
        let sc = schedule(&g);
        assert_eq!(sc.order, vec![a, b, c, d]);
        assert_eq!(sc.peak_bytes, 1600);
        assert_eq!(sc.output_bytes, 8);
        // b + b counted once when freed: after c only c is live, then d.
        assert_eq!(sc.flops, 100 + 100);
    }

    #[test]
    fn outputs_named_twice_and_input_outputs_are_copied_out() {
        // x f32[16] (64 B) returned as itself and y = neg(x) named twice.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![16]);
        let y = g.neg(x);
        g.set_output("x", x);
        g.set_output("y", y);
        g.set_output("y_again", y);
        let sc = schedule(&g);
        // During y: 64 + 64 = 128; at the end x, y live plus a copy of x
        // and one extra copy of y: 256.
        assert_eq!(sc.peak_bytes, 256);
        assert_eq!(sc.output_bytes, 128);
        assert_eq!(sc.input_bytes, 64);
    }

    #[test]
    fn reshape_of_an_input_copies_it() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![2, 8]);
        let r = g.reshape(x, vec![16]);
        let s = g.sum_all(r);
        g.set_output("s", s);
        // x 64 + its reshaped copy 64.
        assert_eq!(schedule(&g).peak_bytes, 128);
    }

    #[test]
    fn graph_without_outputs_schedules_nothing() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![3]);
        g.exp(x);
        let sc = schedule(&g);
        assert!(sc.order.is_empty());
        assert_eq!((sc.peak_bytes, sc.input_bytes, sc.flops), (0, 0, 0));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(1536 * 1024), "1.50 MiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }

    #[test]
    fn human_flops_uses_decimal_units() {
        assert_eq!(human_flops(999), "999 FLOP");
        assert_eq!(human_flops(1000), "1.00 kFLOP");
        assert_eq!(human_flops(13_775_100_000), "13.78 GFLOP");
        assert_eq!(human_flops(72_800_000_000_000), "72.80 TFLOP");
    }
}
