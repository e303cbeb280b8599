//! Every pass preserves semantics: random graphs (seeded with the patterns
//! the passes look for) evaluate to the same outputs before and after each
//! pass alone and after the whole pipeline. Targeted tests check that each
//! pass actually performs its rewrite.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{BinaryOp, DType, Graph, NodeId, Op, UnaryOp};
use coopc_compiler::passes::{
    AlgebraicSimplify, CommonSubexpressions, ConstantFold, DeadCode, Pass, Pipeline,
};
use rand::rngs::StdRng;
use rand::Rng;

const A: usize = 3;
const B: usize = 4;

/// A random graph over three [A, B] inputs whose nodes all have shape [A, B]
/// (other shapes appear inside the patterns), with several outputs.
fn random_graph(r: &mut StdRng, steps: usize) -> Graph {
    let mut g = Graph::new();
    let mut pool: Vec<NodeId> = (0..3)
        .map(|i| g.input(format!("x{i}"), DType::F64, vec![A, B]))
        .collect();
    let pick = |r: &mut StdRng, pool: &[NodeId]| pool[r.gen_range(0..pool.len())];
    for _ in 0..steps {
        let a = pick(r, &pool);
        let b = pick(r, &pool);
        let n = match r.gen_range(0..16) {
            0 => {
                let op = [
                    UnaryOp::Tanh,
                    UnaryOp::Sigmoid,
                    UnaryOp::Sin,
                    UnaryOp::Neg,
                    UnaryOp::Silu,
                ][r.gen_range(0..5)];
                g.unary(op, a)
            }
            1 => {
                let op = [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Max,
                    BinaryOp::Min,
                ][r.gen_range(0..5)];
                g.binary(op, a, b)
            }
            2 => {
                let one = g.full(1.0, DType::F64, vec![A, B]);
                if r.gen_bool(0.5) {
                    g.mul(a, one)
                } else {
                    g.mul(one, a)
                }
            }
            3 => {
                let zero = g.full(0.0, DType::F64, vec![A, B]);
                if r.gen_bool(0.5) {
                    g.add(zero, a)
                } else {
                    g.sub(a, zero)
                }
            }
            4 => {
                let n1 = g.neg(a);
                g.neg(n1)
            }
            5 => {
                let t = g.transpose(a);
                let t = g.unary(UnaryOp::Tanh, t);
                g.transpose(t)
            }
            6 => {
                let t = g.transpose(a);
                g.transpose(t)
            }
            7 => {
                let s = g.reshape(a, vec![A * B]);
                let s = g.reshape(s, vec![B, A]);
                let s = g.reshape(s, vec![2, A * B / 2]);
                g.reshape(s, vec![A, B])
            }
            8 => {
                let c = g.full(r.gen_range(-2.0..2.0), DType::F64, vec![]);
                let c = g.broadcast(c, vec![1, B]);
                let c = g.broadcast(c, vec![A, B]);
                g.mul(a, c)
            }
            9 => {
                // The same expression twice (for CSE).
                let s1 = g.mul(a, b);
                let s2 = g.mul(b, a);
                let t1 = g.unary(UnaryOp::Tanh, s1);
                let t2 = g.unary(UnaryOp::Tanh, s2);
                g.add(t1, t2)
            }
            10 => {
                // Constant arithmetic (for folding).
                let c1 = g.full(1.5, DType::F64, vec![A, B]);
                let c2 = g.full(-0.25, DType::F64, vec![A, B]);
                let c = g.mul(c1, c2);
                let c = g.unary(UnaryOp::Exp, c);
                let s = g.sum(c, &[1], true);
                let s = g.broadcast(s, vec![A, B]);
                g.add(a, s)
            }
            11 => {
                let m = g.reduce_max(a, &[1], true);
                let m = g.broadcast(m, vec![A, B]);
                g.sub(a, m)
            }
            12 => {
                let lit: Vec<f64> = (0..A * B).map(|i| i as f64 * 0.1).collect();
                let l = g.literal(&lit, DType::F64, vec![A, B]);
                let k = g.full(2.0, DType::F64, vec![A, B]);
                let l = g.mul(l, k);
                g.add(a, l)
            }
            13 => {
                let c = g.compare(coopc_compiler::ir::CompareOp::Gt, a, b);
                g.select(c, a, b)
            }
            14 => {
                let p = g.pad(a, &[1, 0], &[0, 2], 0.0);
                g.slice(p, &[1, 0], &[A + 1, B])
            }
            _ => {
                let s = g.slice_axis(a, 1, 0, 2);
                let t = g.slice_axis(b, 1, 2, B);
                g.concat(&[s, t], 1)
            }
        };
        pool.push(n);
    }
    // Outputs: the last few nodes and one random earlier node; some nodes stay dead.
    let k = pool.len();
    for (i, &id) in pool[k - 3..].iter().enumerate() {
        g.set_output(format!("out{i}"), id);
    }
    g.set_output("mid", pool[r.gen_range(3..k)]);
    g
}

fn random_inputs(r: &mut StdRng) -> Inputs {
    (0..3)
        .map(|i| {
            (
                format!("x{i}"),
                f64_tensor(&[A, B], &uniform(r, A * B, -2.0, 2.0)),
            )
        })
        .collect()
}

fn outputs(g: &Graph, inputs: &Inputs) -> Vec<Vec<f64>> {
    let ids: Vec<NodeId> = g.outputs().iter().map(|&(_, id)| id).collect();
    eval(g, inputs, &ids)
}

fn assert_same(before: &[Vec<f64>], after: &[Vec<f64>], what: &str) {
    assert_eq!(before.len(), after.len());
    for (o, (b, a)) in before.iter().zip(after).enumerate() {
        let e = rel_err(a, b, 1e-12);
        assert!(
            e < 1e-13,
            "{what} changed output {o}: rel err {e:e}\n before {b:?}\n after  {a:?}"
        );
    }
}

fn passes() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(AlgebraicSimplify),
        Box::new(ConstantFold::default()),
        Box::new(CommonSubexpressions),
        Box::new(DeadCode),
    ]
}

#[test]
fn every_pass_alone_preserves_random_graph_outputs() {
    for seed in 0..40 {
        let mut r = rng(seed);
        let g0 = random_graph(&mut r, 25);
        let inputs = random_inputs(&mut r);
        let want = outputs(&g0, &inputs);
        for p in passes() {
            let mut g = g0.clone();
            // Run to a fixed point so rewrites that expose more are covered.
            for _ in 0..8 {
                if !p.run(&mut g) {
                    break;
                }
            }
            g.validate()
                .unwrap_or_else(|e| panic!("{} left an invalid graph: {e}", p.name()));
            assert_same(&want, &outputs(&g, &inputs), p.name());
        }
    }
}

#[test]
fn pipeline_preserves_random_graphs_and_shrinks_them() {
    let mut shrunk = 0;
    for seed in 100..140 {
        let mut r = rng(seed);
        let mut g = random_graph(&mut r, 30);
        let inputs = random_inputs(&mut r);
        let want = outputs(&g, &inputs);
        let report = Pipeline::standard().run(&mut g);
        g.validate().unwrap();
        assert_same(&want, &outputs(&g, &inputs), "pipeline");
        if report.nodes_after < report.nodes_before {
            shrunk += 1;
        }
    }
    assert_eq!(shrunk, 40, "every random graph has something to remove");
}

#[test]
fn pipeline_preserves_gradients_of_random_graphs() {
    for seed in 200..215 {
        let mut r = rng(seed);
        let mut g = random_graph(&mut r, 20);
        let inputs = random_inputs(&mut r);
        let outs: Vec<NodeId> = g.outputs().iter().map(|&(_, id)| id).collect();
        let sums: Vec<NodeId> = outs.iter().map(|&o| g.sum_all(o)).collect();
        let mut total = sums[0];
        for &s in &sums[1..] {
            total = g.add(total, s);
        }
        let xs: Vec<NodeId> = (0..3)
            .map(|i| g.inputs_by_name()[&format!("x{i}")])
            .collect();
        let grads = grad(&mut g, total, &xs);
        g.clear_outputs();
        for (i, &gi) in grads.iter().enumerate() {
            g.set_output(format!("g{i}"), gi);
        }
        let want = outputs(&g, &inputs);
        Pipeline::standard().run(&mut g);
        assert_same(&want, &outputs(&g, &inputs), "pipeline on a gradient graph");
    }
}

fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().filter(|&id| f(g.op(id))).count()
}

#[test]
fn dce_removes_exactly_the_unused_nodes() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    let unused_input = g.input("y", DType::F32, vec![2]);
    let used = g.exp(x);
    let dead = g.tanh(x);
    let _dead2 = g.mul(dead, unused_input);
    g.set_output("out", used);
    assert!(DeadCode.run(&mut g));
    assert_eq!(g.node_count(), 3, "x, y (an input, kept) and exp remain");
    assert!(!DeadCode.run(&mut g), "second run finds nothing");
}

#[test]
fn cse_merges_identical_and_commuted_expressions() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    let y = g.input("y", DType::F32, vec![2]);
    let a = g.mul(x, y);
    let b = g.mul(y, x);
    let ta = g.exp(a);
    let tb = g.exp(b);
    let s1 = g.sub(ta, x);
    let s2 = g.sub(x, tb); // sub is not commutative: stays distinct
    g.set_output("a", s1);
    g.set_output("b", s2);
    assert!(CommonSubexpressions.run(&mut g));
    DeadCode.run(&mut g);
    assert_eq!(count(&g, |op| matches!(op, Op::Binary(BinaryOp::Mul))), 1);
    assert_eq!(count(&g, |op| matches!(op, Op::Unary(UnaryOp::Exp))), 1);
    assert_eq!(count(&g, |op| matches!(op, Op::Binary(BinaryOp::Sub))), 2);
}

#[test]
fn cse_keeps_large_fills_that_a_non_elementwise_op_reads_apart() {
    use coopc_compiler::passes::UNSHARED_FILL;
    let (rows, cols) = (UNSHARED_FILL / 64 + 1, 64);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![rows, cols]);
    let idx = g.input("idx", DType::I32, vec![rows, 1]);
    let upd = g.input("upd", DType::F32, vec![rows, 1]);
    // Two scatter bases: each must be written out, so they stay apart
    // (shared, one buffer would live from the first scatter to the last).
    let z1 = g.full(0.0, DType::F32, vec![rows, cols]);
    let s1 = g.scatter_add(z1, idx, upd, 1);
    let e = g.exp(s1);
    let z2 = g.full(0.0, DType::F32, vec![rows, cols]);
    let s2 = g.scatter_add(z2, idx, upd, 1);
    // Two elementwise readers of the same fill: inlined, so merged (and
    // their users with them).
    let c1 = g.full(2.0, DType::F32, vec![rows, cols]);
    let m1 = g.mul(x, c1);
    let c2 = g.full(2.0, DType::F32, vec![rows, cols]);
    let m2 = g.mul(x, c2);
    let out = g.add(e, s2);
    let out = g.add(out, m1);
    let out = g.add(out, m2);
    g.set_output("out", out);
    assert!(CommonSubexpressions.run(&mut g));
    DeadCode.run(&mut g);
    let fills = |g: &Graph, v: f64| {
        count(
            g,
            |op| matches!(op, Op::Full { value, .. } if value.get() == v),
        )
    };
    assert_eq!(fills(&g, 0.0), 2);
    assert_eq!(fills(&g, 2.0), 1);
    assert_eq!(count(&g, |op| matches!(op, Op::Binary(BinaryOp::Mul))), 1);
}

#[test]
fn constant_fold_evaluates_constant_subgraphs_in_the_node_type() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let c1 = g.full(0.1, DType::F32, vec![2, 3]);
    let c2 = g.full(0.2, DType::F32, vec![2, 3]);
    let c = g.add(c1, c2);
    let s = g.sum(c, &[1], true);
    let s = g.broadcast(s, vec![2, 3]);
    let y = g.mul(x, s);
    g.set_output("y", y);
    let fold = ConstantFold::default();
    while fold.run(&mut g) {}
    DeadCode.run(&mut g);
    let fulls: Vec<f64> = g
        .node_ids()
        .filter_map(|id| match g.op(id) {
            Op::Full { value, .. } => Some(value.get()),
            _ => None,
        })
        .collect();
    // 0.1f32 + 0.2f32 summed three times in f32.
    let v = 0.1f32 + 0.2f32;
    let want = (v + v + v) as f64;
    assert_eq!(fulls, vec![want]);
    assert_eq!(g.node_count(), 3, "x, the folded constant and mul remain");
    // Folded in place: the constant is the node it replaced (the
    // broadcast, the last node folded), so its index keeps its place in
    // creation order.
    assert!(matches!(g.op(s), Op::Full { .. }), "{:?}", g.op(s));
    assert_eq!(g.inputs(y), vec![x, s]);
}

#[test]
fn simplify_removes_identities_and_chains() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let one = g.full(1.0, DType::F32, vec![2, 3]);
    let zero = g.full(0.0, DType::F32, vec![2, 3]);
    let a = g.mul(x, one);
    let a = g.add(zero, a);
    let a = g.neg(a);
    let a = g.neg(a);
    let a = g.transpose(a);
    let a = g.transpose(a);
    let a = g.reshape(a, vec![6]);
    let a = g.reshape(a, vec![3, 2]);
    let a = g.reshape(a, vec![2, 3]);
    let k = g.full(2.0, DType::F32, vec![]);
    let k = g.broadcast(k, vec![2, 3]);
    let y = g.mul(a, k);
    g.set_output("y", y);
    let p = Pipeline::new(vec![Box::new(AlgebraicSimplify), Box::new(DeadCode)]);
    p.run(&mut g);
    // Left: x, full 2.0 [2,3], mul.
    assert_eq!(g.node_count(), 3, "{}", coopc_compiler::ir::to_text(&g));
    let y = g.output("y").unwrap();
    assert!(matches!(g.op(y), Op::Binary(BinaryOp::Mul)));
    assert_eq!(g.inputs(y)[0], x);
}

#[test]
fn simplify_turns_permutes_of_unit_axes_into_reshapes() {
    // [2, 1, 3, 4] → [2, 3, 1, 4] moves only the unit axis: a reshape; the
    // transpose of [2, 3] and a permute that reorders sizes > 1 across a
    // unit axis stay permutes.
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![2, 1, 3, 4]);
    let unit = g.permute(x, &[0, 2, 1, 3]);
    let swapped = g.permute(x, &[2, 1, 0, 3]);
    let m = g.input("m", DType::F64, vec![2, 3]);
    let t = g.transpose(m);
    g.set_output("unit", unit);
    g.set_output("swapped", swapped);
    g.set_output("t", t);
    let mut r = rng(5);
    let inputs = Inputs::from([
        (
            "x".to_string(),
            f64_tensor(&[2, 1, 3, 4], &uniform(&mut r, 24, -1.0, 1.0)),
        ),
        (
            "m".to_string(),
            f64_tensor(&[2, 3], &uniform(&mut r, 6, -1.0, 1.0)),
        ),
    ]);
    let before = outputs(&g, &inputs);
    Pipeline::new(vec![Box::new(AlgebraicSimplify), Box::new(DeadCode)]).run(&mut g);
    assert_same(&before, &outputs(&g, &inputs), "simplify");
    let op = |name: &str| g.op(g.output(name).unwrap()).clone();
    assert!(matches!(op("unit"), Op::Reshape { .. }), "{:?}", op("unit"));
    assert!(matches!(op("swapped"), Op::Permute { .. }));
    assert!(matches!(op("t"), Op::Permute { .. }));
}
