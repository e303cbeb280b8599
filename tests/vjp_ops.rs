//! Every IR op's vector-Jacobian product (and the VJP of that VJP) checked
//! against central finite differences in f64, on random shapes and inputs.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{BinaryOp, CompareOp, DType, Graph, NodeId, ReduceKind, UnaryOp};
use rand::seq::SliceRandom;
use rand::Rng;

const SEEDS: [u64; 4] = [1, 2, 3, 4];

fn no_extra() -> Inputs {
    Inputs::new()
}

/// Input values in a domain where the unary op is smooth.
fn unary_domain(op: UnaryOp, r: &mut rand::rngs::StdRng, n: usize) -> Vec<f64> {
    match op {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => uniform(r, n, 0.3, 2.0),
        UnaryOp::Recip | UnaryOp::Abs | UnaryOp::Sign => away_from_zero(r, n, 0.3, 2.0),
        _ => uniform(r, n, -2.0, 2.0),
    }
}

#[test]
fn unary_ops_vjp_match_finite_differences() {
    for op in UnaryOp::ALL {
        for seed in SEEDS {
            let mut r = rng(seed);
            let shape = random_shape(&mut r, 0, 3);
            let n = shape.iter().product();
            let vars = [Var::new("x", &shape, unary_domain(op, &mut r, n))];
            check_op(seed, &vars, &no_extra(), true, |g, x| g.unary(op, x[0]));
        }
    }
}

#[test]
fn binary_ops_vjp_match_finite_differences() {
    for op in BinaryOp::ALL {
        for seed in SEEDS {
            let mut r = rng(seed + 100);
            let shape = random_shape(&mut r, 0, 3);
            let n: usize = shape.iter().product();
            let (a, b) = match op {
                BinaryOp::Div => (
                    uniform(&mut r, n, -2.0, 2.0),
                    away_from_zero(&mut r, n, 0.5, 2.0),
                ),
                BinaryOp::Pow => (uniform(&mut r, n, 0.5, 2.0), uniform(&mut r, n, -1.5, 1.5)),
                BinaryOp::Max | BinaryOp::Min => {
                    // b sits at least 0.1 away from a, so no tie is crossed.
                    let a = uniform(&mut r, n, -2.0, 2.0);
                    let off = away_from_zero(&mut r, n, 0.1, 1.0);
                    let b = a.iter().zip(&off).map(|(x, o)| x + o).collect();
                    (a, b)
                }
                _ => (uniform(&mut r, n, -2.0, 2.0), uniform(&mut r, n, -2.0, 2.0)),
            };
            let vars = [Var::new("a", &shape, a), Var::new("b", &shape, b)];
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                g.binary(op, x[0], x[1])
            });
            // The same operand on both sides accumulates both contributions.
            if op != BinaryOp::Pow {
                let vars = [Var::new("a", &shape, vars[0].value.clone())];
                if matches!(op, BinaryOp::Max | BinaryOp::Min | BinaryOp::Sub) {
                    continue; // x∘x is a tie or constant: not informative
                }
                check_op(seed, &vars, &no_extra(), true, |g, x| {
                    g.binary(op, x[0], x[0])
                });
            }
        }
    }
}

#[test]
fn compare_and_select_vjp_match_finite_differences() {
    for cmp in CompareOp::ALL {
        for seed in SEEDS {
            let mut r = rng(seed + 200);
            let shape = random_shape(&mut r, 1, 3);
            let n: usize = shape.iter().product();
            let a = uniform(&mut r, n, -2.0, 2.0);
            let off = away_from_zero(&mut r, n, 0.1, 1.0);
            let b: Vec<f64> = a.iter().zip(&off).map(|(x, o)| x + o).collect();
            let vars = [Var::new("a", &shape, a), Var::new("b", &shape, b)];
            // select(a cmp b, a·a, sin(b)): the mask itself carries no gradient.
            // No element is within 0.1 of a tie, so finite differences never
            // cross the discontinuity.
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                let c = g.compare(cmp, x[0], x[1]);
                let sq = g.mul(x[0], x[0]);
                let s = g.unary(UnaryOp::Sin, x[1]);
                g.select(c, sq, s)
            });
            // a cmp a: every element tied, and it stays tied under perturbation.
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                let c = g.compare(cmp, x[0], x[0]);
                let sq = g.mul(x[0], x[1]);
                let s = g.unary(UnaryOp::Sin, x[1]);
                g.select(c, sq, s)
            });
        }
    }
}

#[test]
fn clamp_vjp_matches_finite_differences() {
    for seed in SEEDS {
        let mut r = rng(seed + 300);
        let shape = random_shape(&mut r, 1, 3);
        let n: usize = shape.iter().product();
        // Values away from the bounds ±0.5 by at least 0.05.
        let x: Vec<f64> = (0..n)
            .map(|_| loop {
                let v: f64 = r.gen_range(-1.5..1.5);
                if (v.abs() - 0.5).abs() > 0.05 {
                    break v;
                }
            })
            .collect();
        let vars = [Var::new("x", &shape, x)];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let c = g.clamp(x[0], -0.5, 0.5);
            g.mul(c, x[0])
        });
    }
}

#[test]
fn reduce_ops_vjp_match_finite_differences() {
    for kind in [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max] {
        for seed in SEEDS {
            let mut r = rng(seed + 400);
            let shape = random_shape(&mut r, 1, 4);
            let rank = shape.len();
            let mut axes: Vec<usize> = (0..rank).collect();
            axes.shuffle(&mut r);
            axes.truncate(r.gen_range(1..=rank));
            let keepdim = r.gen_bool(0.5);
            let n: usize = shape.iter().product();
            let vars = [Var::new("x", &shape, uniform(&mut r, n, -2.0, 2.0))];
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                // A nonlinear use of the reduction, so the second order is non-trivial.
                let t = g.reduce(kind, x[0], &axes, keepdim);
                let s = g.unary(UnaryOp::Sin, t);
                g.mul(s, t)
            });
        }
    }
}

#[test]
fn matmul_vjp_matches_finite_differences() {
    for seed in SEEDS {
        let mut r = rng(seed + 500);
        let batch: Vec<usize> = random_shape(&mut r, 0, 2);
        let (m, k, n) = (r.gen_range(1..5), r.gen_range(1..5), r.gen_range(1..5));
        let sa: Vec<usize> = batch.iter().copied().chain([m, k]).collect();
        let sb: Vec<usize> = batch.iter().copied().chain([k, n]).collect();
        let va = uniform(&mut r, sa.iter().product(), -1.0, 1.0);
        let vb = uniform(&mut r, sb.iter().product(), -1.0, 1.0);
        let vars = [Var::new("a", &sa, va), Var::new("b", &sb, vb)];
        check_op(seed, &vars, &no_extra(), true, |g, x| g.matmul(x[0], x[1]));
    }
}

#[test]
fn data_movement_vjps_match_finite_differences() {
    for seed in SEEDS {
        let mut r = rng(seed + 600);
        // broadcast [3,1] → [2,3,4]
        let vars = [Var::new("x", &[3, 1], uniform(&mut r, 3, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let b = g.broadcast(x[0], vec![2, 3, 4]);
            g.mul(b, b)
        });
        // barrier: an identity the passes keep
        let vars = [Var::new("x", &[2, 3], uniform(&mut r, 6, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let b = g.barrier(x[0], 7);
            g.mul(b, b)
        });
        // reshape
        let shape = random_shape(&mut r, 1, 3);
        let n: usize = shape.iter().product();
        let vars = [Var::new("x", &shape, uniform(&mut r, n, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let y = g.reshape(x[0], vec![n]);
            g.mul(y, y)
        });
        // permute
        let shape = random_shape(&mut r, 2, 4);
        let n: usize = shape.iter().product();
        let mut perm: Vec<usize> = (0..shape.len()).collect();
        perm.shuffle(&mut r);
        let vars = [Var::new("x", &shape, uniform(&mut r, n, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let p = g.permute(x[0], &perm);
            g.unary(UnaryOp::Tanh, p)
        });
        // slice
        let shape: Vec<usize> = (0..3).map(|_| r.gen_range(2..5)).collect();
        let start: Vec<usize> = shape.iter().map(|&d| r.gen_range(0..d)).collect();
        let end: Vec<usize> = shape
            .iter()
            .zip(&start)
            .map(|(&d, &s)| r.gen_range(s + 1..=d))
            .collect();
        let n: usize = shape.iter().product();
        let vars = [Var::new("x", &shape, uniform(&mut r, n, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let s = g.slice(x[0], &start, &end);
            g.mul(s, s)
        });
        // pad
        let lo: Vec<usize> = (0..3).map(|_| r.gen_range(0..3)).collect();
        let hi: Vec<usize> = (0..3).map(|_| r.gen_range(0..3)).collect();
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let p = g.pad(x[0], &lo, &hi, 0.7);
            g.mul(p, p)
        });
        // concat of three along a random axis
        let axis = r.gen_range(0..2);
        let mut vars = Vec::new();
        for name in ["a", "b", "c"] {
            let mut s = vec![2, 3];
            s[axis] = r.gen_range(1..4);
            let n = s[0] * s[1];
            vars.push(Var::new(name, &s, uniform(&mut r, n, -1.0, 1.0)));
        }
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let c = g.concat(&[x[0], x[1], x[2]], axis);
            g.mul(c, c)
        });
    }
}

#[test]
fn index_ops_vjp_match_finite_differences() {
    for seed in SEEDS {
        let mut r = rng(seed + 700);
        // take_along_axis on axis 1: x [3, 5], idx [3, 4] (repeats allowed)
        let idx: Vec<f64> = (0..12).map(|_| r.gen_range(0..5) as f64).collect();
        let vars = [Var::new("x", &[3, 5], uniform(&mut r, 15, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let i = g.literal(&idx, DType::I32, vec![3, 4]);
            let t = g.take_along_axis(x[0], i, 1);
            g.mul(t, t)
        });
        // scatter_add on axis 0: base [4, 3], idx/upd [5, 3]
        let sidx: Vec<f64> = (0..15).map(|_| r.gen_range(0..4) as f64).collect();
        let vars = [
            Var::new("base", &[4, 3], uniform(&mut r, 12, -1.0, 1.0)),
            Var::new("upd", &[5, 3], uniform(&mut r, 15, -1.0, 1.0)),
        ];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let i = g.literal(&sidx, DType::I32, vec![5, 3]);
            let s = g.scatter_add(x[0], i, x[1], 0);
            g.mul(s, s)
        });
        // gather rows (embedding lookup): table [6, 4], ids [2, 3]
        let ids: Vec<f64> = (0..6).map(|_| r.gen_range(0..6) as f64).collect();
        let vars = [Var::new("table", &[6, 4], uniform(&mut r, 24, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let i = g.literal(&ids, DType::I32, vec![2, 3]);
            let e = g.gather(x[0], i);
            g.mul(e, e)
        });
        // scatter_add_rows: ids [2, 3], upd [2, 3, 4] → [5, 4]
        let rid: Vec<f64> = (0..6).map(|_| r.gen_range(0..5) as f64).collect();
        let vars = [Var::new("upd", &[2, 3, 4], uniform(&mut r, 24, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let i = g.literal(&rid, DType::I32, vec![2, 3]);
            let s = g.scatter_add_rows(i, x[0], 5);
            g.mul(s, s)
        });
        // one_hot (no gradient itself) used as a mask: one_hot(ids) · x
        let oh: Vec<f64> = (0..4).map(|_| r.gen_range(0..3) as f64).collect();
        let vars = [Var::new("x", &[4, 3], uniform(&mut r, 12, -1.0, 1.0))];
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let i = g.literal(&oh, DType::I32, vec![4]);
            let m = g.one_hot(i, 3, DType::F64);
            let y = g.mul(m, x[0]);
            g.mul(y, x[0])
        });
        // iota as data: x · iota
        check_op(seed, &vars, &no_extra(), true, |g, x| {
            let io = g.iota(1, DType::F64, vec![4, 3]);
            let y = g.mul(io, x[0]);
            g.mul(y, x[0])
        });
    }
}

/// Gradient of a scalar built from one input, evaluated at `x`.
fn grad_at(build: impl Fn(&mut Graph, NodeId) -> NodeId, shape: &[usize], x: &[f64]) -> Vec<f64> {
    let mut g = Graph::new();
    let xi = g.input("x", DType::F64, shape.to_vec());
    let y = build(&mut g, xi);
    let l = g.sum_all(y);
    let gr = grad(&mut g, l, &[xi]);
    let mut inputs = Inputs::new();
    inputs.insert("x".into(), f64_tensor(shape, x));
    eval(&g, &inputs, &gr).remove(0)
}

#[test]
fn stop_gradient_blocks_exactly_its_operand() {
    let mut r = rng(800);
    let x = uniform(&mut r, 6, -1.0, 1.0);
    // d/dx Σ sg(x)·x = sg(x) = x, not 2x.
    let gx = grad_at(
        |g, x| {
            let s = g.stop_gradient(x);
            g.mul(s, x)
        },
        &[2, 3],
        &x,
    );
    assert!(rel_err(&gx, &x, 1e-9) < 1e-12, "{gx:?} vs {x:?}");
}

#[test]
fn cast_vjp_is_the_cast_back() {
    let mut r = rng(900);
    let x = uniform(&mut r, 6, -1.0, 1.0);
    // Through f32 and back: d/dx Σ cast(cast(x, f32)², f64) = 2x up to f32 rounding.
    let gx = grad_at(
        |g, x| {
            let h = g.cast(x, DType::F32);
            let sq = g.mul(h, h);
            g.cast(sq, DType::F64)
        },
        &[6],
        &x,
    );
    let want: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
    assert!(rel_err(&gx, &want, 1e-9) < 1e-6, "{gx:?} vs {want:?}");
    // To an integer type nothing flows.
    let gz = grad_at(
        |g, x| {
            let i = g.cast(x, DType::I32);
            let f = g.cast(i, DType::F64);
            g.mul(f, x)
        },
        &[6],
        &x,
    );
    let trunc: Vec<f64> = x.iter().map(|v| v.trunc()).collect();
    assert_eq!(gz, trunc);
}

/// Builds pairs of nodes from f64 inputs bound to `vars` and checks that
/// the two values of each pair agree to 1e-12 (relative, floor 1e-3).
fn assert_pairs_agree(
    what: &str,
    vars: &[Var],
    build: impl FnOnce(&mut Graph, &[NodeId]) -> Vec<(NodeId, NodeId)>,
) {
    let mut g = Graph::new();
    let x: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
        .collect();
    let pairs = build(&mut g, &x);
    let nodes: Vec<NodeId> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    let vals = eval(&g, &bind(vars, &no_extra()), &nodes);
    for (i, pair) in vals.chunks(2).enumerate() {
        let e = rel_err(&pair[0], &pair[1], 1e-3);
        assert!(e < 1e-12, "{what}, value {i}: the two differ by {e:e}");
    }
}

/// Random causal attention operands: q [B, H, T, hd], k, v [B, H_kv, T, hd].
fn attention_vars(r: &mut rand::rngs::StdRng) -> Vec<Var> {
    let (b, kv, group) = (r.gen_range(1..3), r.gen_range(1..3), r.gen_range(1..3));
    let (t, hd) = (r.gen_range(1..5), r.gen_range(1..4));
    let sq = vec![b, kv * group, t, hd];
    let skv = vec![b, kv, t, hd];
    let mut var = |name: &str, s: &Vec<usize>| {
        let n = s.iter().product();
        Var::new(name, s, uniform(r, n, -1.5, 1.5))
    };
    vec![
        var("q", &sq),
        var("k", &skv),
        var("v", &skv),
        var("o", &sq),
        var("do", &sq),
    ]
}

#[test]
fn causal_attention_matches_its_reference_expression() {
    use coopc_compiler::attention::{reference_attention, reference_grad};
    use coopc_compiler::ir::AttentionOperand;
    for seed in SEEDS {
        let vars = attention_vars(&mut rng(seed + 900));
        assert_pairs_agree(&format!("seed {seed}"), &vars, |g, x| {
            let qkvo = [x[0], x[1], x[2], x[3]];
            let mut pairs = vec![(
                g.causal_attention(x[0], x[1], x[2]),
                reference_attention(g, x[0], x[1], x[2]),
            )];
            for wrt in AttentionOperand::ALL {
                pairs.push((
                    g.causal_attention_grad(wrt, qkvo, x[4]),
                    reference_grad(g, wrt, qkvo, x[4]),
                ));
            }
            pairs
        });
    }
}

#[test]
fn causal_attention_vjp_matches_finite_differences() {
    for seed in SEEDS {
        let vars = attention_vars(&mut rng(seed + 1000));
        check_op(seed, &vars[..3], &no_extra(), true, |g, x| {
            g.causal_attention(x[0], x[1], x[2])
        });
        // Keys and values the same node: both slots' gradients add up.
        if vars[0].shape == vars[1].shape {
            check_op(seed, &vars[..2], &no_extra(), true, |g, x| {
                g.causal_attention(x[0], x[1], x[1])
            });
        }
    }
}

#[test]
fn causal_attention_grad_vjp_matches_finite_differences() {
    use coopc_compiler::ir::AttentionOperand;
    for seed in SEEDS {
        let vars = attention_vars(&mut rng(seed + 1100));
        for wrt in AttentionOperand::ALL {
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                g.causal_attention_grad(wrt, [x[0], x[1], x[2], x[3]], x[4])
            });
        }
    }
}

/// Random linear log-prob operands: h [N, d], w [V, d], g [N], and targets
/// in 0..V (repeats allowed).
fn logprob_case(r: &mut rand::rngs::StdRng) -> (Vec<Var>, Vec<f64>) {
    let (n, d, v) = (r.gen_range(1..6), r.gen_range(1..5), r.gen_range(2..7));
    let targets = (0..n).map(|_| r.gen_range(0..v) as f64).collect();
    let vars = vec![
        Var::new("h", &[n, d], uniform(r, n * d, -1.5, 1.5)),
        Var::new("w", &[v, d], uniform(r, v * d, -1.5, 1.5)),
        Var::new("g", &[n], uniform(r, n, -1.0, 1.0)),
    ];
    (vars, targets)
}

#[test]
fn linear_logprob_matches_its_reference_expression() {
    use coopc_compiler::ir::LogprobOperand;
    use coopc_compiler::linear_logprob::{reference_grad, reference_logprob};
    for seed in SEEDS {
        let (vars, targets) = logprob_case(&mut rng(seed + 1200));
        assert_pairs_agree(&format!("seed {seed}"), &vars, |g, x| {
            let y = g.literal(&targets, DType::I32, vec![targets.len()]);
            let hwt = [x[0], x[1], y];
            let mut pairs = vec![(
                g.linear_logprob(x[0], x[1], y),
                reference_logprob(g, x[0], x[1], y),
            )];
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                pairs.push((
                    g.linear_logprob_grad(wrt, hwt, x[2]),
                    reference_grad(g, wrt, hwt, x[2]),
                ));
            }
            pairs
        });
    }
}

#[test]
fn linear_logprob_vjp_matches_finite_differences() {
    use coopc_compiler::ir::LogprobOperand;
    for seed in SEEDS {
        let (vars, targets) = logprob_case(&mut rng(seed + 1300));
        let n = targets.len();
        check_op(seed, &vars[..2], &no_extra(), true, |g, x| {
            let y = g.literal(&targets, DType::I32, vec![n]);
            g.linear_logprob(x[0], x[1], y)
        });
        for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                let y = g.literal(&targets, DType::I32, vec![n]);
                g.linear_logprob_grad(wrt, [x[0], x[1], y], x[2])
            });
        }
    }
}

/// The second-derivative rule of `linear_logprob_grad` differentiates row
/// blocks of h one at a time on large vocabularies; blocks of 2 rows give
/// the cotangents of the whole-at-once rule.
#[test]
fn linear_logprob_grad_rule_by_row_blocks_equals_the_whole() {
    use coopc_compiler::autodiff::linear_logprob_grad_vjp;
    use coopc_compiler::ir::LogprobOperand;
    let mut r = rng(1400);
    let (n, d, v) = (7, 3, 5);
    let targets: Vec<f64> = (0..n).map(|_| r.gen_range(0..v) as f64).collect();
    let vars = [
        Var::new("h", &[n, d], uniform(&mut r, n * d, -1.5, 1.5)),
        Var::new("w", &[v, d], uniform(&mut r, v * d, -1.5, 1.5)),
        Var::new("g", &[n], uniform(&mut r, n, -1.0, 1.0)),
        Var::new("sh", &[n, d], uniform(&mut r, n * d, -1.0, 1.0)),
        Var::new("sw", &[v, d], uniform(&mut r, v * d, -1.0, 1.0)),
    ];
    for (wrt, seed) in [(LogprobOperand::Hidden, 3), (LogprobOperand::Weight, 4)] {
        assert_pairs_agree(&format!("{wrt:?}: blocks and whole"), &vars, |g, x| {
            let y = g.literal(&targets, DType::I32, vec![n]);
            let inputs = [x[0], x[1], y, x[2]];
            let [whole, blocks] = [n, 2].map(|rows| {
                let mut res = linear_logprob_grad_vjp(g, wrt, &inputs, x[seed], rows);
                res.sort_by_key(|&(slot, _)| slot);
                assert_eq!(res.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 3]);
                res
            });
            whole.iter().zip(&blocks).map(|(a, b)| (a.1, b.1)).collect()
        });
    }
}

#[test]
fn linear_entropy_matches_its_reference_expression() {
    use coopc_compiler::ir::LogprobOperand;
    use coopc_compiler::linear_logprob::{reference_entropy, reference_entropy_grad};
    for seed in SEEDS {
        let (vars, _) = logprob_case(&mut rng(seed + 1500));
        assert_pairs_agree(&format!("seed {seed}"), &vars, |g, x| {
            let hw = [x[0], x[1]];
            let mut pairs = vec![(
                g.linear_entropy(x[0], x[1]),
                reference_entropy(g, x[0], x[1]),
            )];
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                pairs.push((
                    g.linear_entropy_grad(wrt, hw, x[2]),
                    reference_entropy_grad(g, wrt, hw, x[2]),
                ));
            }
            pairs
        });
    }
}

/// The entropy of a uniform distribution is ln V, of a one-hot one 0.
#[test]
fn linear_entropy_of_uniform_and_peaked_logits() {
    let (n, d, v) = (2, 2, 5);
    // Row 0 of h is 0 (uniform logits); row 1 picks vocabulary row 0 by a wide margin.
    let h = [0.0, 0.0, 1.0, 0.0];
    let mut w = vec![0.0; v * d];
    w[0] = 400.0;
    let mut g = Graph::new();
    let hh = g.input("h", DType::F64, vec![n, d]);
    let ww = g.input("w", DType::F64, vec![v, d]);
    let e = g.linear_entropy(hh, ww);
    let vars = [
        Var::new("h", &[n, d], h.to_vec()),
        Var::new("w", &[v, d], w),
    ];
    let out = eval(&g, &bind(&vars, &no_extra()), &[e]).remove(0);
    assert!((out[0] - (v as f64).ln()).abs() < 1e-14, "{out:?}");
    assert!(out[1].abs() < 1e-12, "{out:?}");
}

#[test]
fn linear_entropy_vjp_matches_finite_differences() {
    use coopc_compiler::ir::LogprobOperand;
    for seed in SEEDS {
        let (vars, _) = logprob_case(&mut rng(seed + 1600));
        check_op(seed, &vars[..2], &no_extra(), true, |g, x| {
            g.linear_entropy(x[0], x[1])
        });
        for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                g.linear_entropy_grad(wrt, [x[0], x[1]], x[2])
            });
        }
    }
}

/// As for the log-prob, the entropy gradient's second-derivative rule by
/// row blocks gives the cotangents of the whole-at-once rule.
#[test]
fn linear_entropy_grad_rule_by_row_blocks_equals_the_whole() {
    use coopc_compiler::autodiff::linear_logprob_grad_vjp;
    use coopc_compiler::ir::LogprobOperand;
    let mut r = rng(1700);
    let (n, d, v) = (7, 3, 5);
    let vars = [
        Var::new("h", &[n, d], uniform(&mut r, n * d, -1.5, 1.5)),
        Var::new("w", &[v, d], uniform(&mut r, v * d, -1.5, 1.5)),
        Var::new("g", &[n], uniform(&mut r, n, -1.0, 1.0)),
        Var::new("sh", &[n, d], uniform(&mut r, n * d, -1.0, 1.0)),
        Var::new("sw", &[v, d], uniform(&mut r, v * d, -1.0, 1.0)),
    ];
    for (wrt, seed) in [(LogprobOperand::Hidden, 3), (LogprobOperand::Weight, 4)] {
        assert_pairs_agree(&format!("{wrt:?}: blocks and whole"), &vars, |g, x| {
            let inputs = [x[0], x[1], x[2]];
            let [whole, blocks] = [n, 2].map(|rows| {
                let mut res = linear_logprob_grad_vjp(g, wrt, &inputs, x[seed], rows);
                res.sort_by_key(|&(slot, _)| slot);
                assert_eq!(res.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 2]);
                res
            });
            whole.iter().zip(&blocks).map(|(a, b)| (a.1, b.1)).collect()
        });
    }
}

#[test]
fn linear_logprob_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::Op;
    let mut g = Graph::new();
    let h = g.input("h", DType::F32, vec![3, 4]);
    let w = g.input("w", DType::F32, vec![5, 4]);
    let y = g.input("y", DType::I32, vec![3]);
    let h0 = g.input("h0", DType::F32, vec![3, 0]);
    let w0 = g.input("w0", DType::F32, vec![5, 0]);
    let w3 = g.input("w3", DType::F32, vec![5, 3]);
    let yf = g.input("yf", DType::F32, vec![3]);
    assert!(g.try_add_op(Op::LinearLogprob, &[h, w, y]).is_ok());
    for (what, ops) in [
        ("no features", [h0, w0, y]),
        ("feature sizes differ", [h, w3, y]),
        ("float targets", [h, w, yf]),
    ] {
        let e = g.try_add_op(Op::LinearLogprob, &ops).unwrap_err();
        assert!(e.to_string().contains("linear_logprob"), "{what}: {e}");
    }
    assert!(g.try_add_op(Op::LinearEntropy, &[h, w]).is_ok());
    for (what, ops) in [
        ("no features", vec![h0, w0]),
        ("feature sizes differ", vec![h, w3]),
        ("one operand", vec![h]),
    ] {
        let e = g.try_add_op(Op::LinearEntropy, &ops).unwrap_err();
        assert!(e.to_string().contains("linear_entropy"), "{what}: {e}");
    }
}

/// Random rotary embedding operands: x [.., T, hd] (rank 2 to 4, hd even)
/// and tables cos, sin [T, hd].
fn rope_vars(r: &mut rand::rngs::StdRng) -> Vec<Var> {
    let (t, hd) = (r.gen_range(1..4), 2 * r.gen_range(1..4));
    let lead: Vec<usize> = (0..r.gen_range(0..3)).map(|_| r.gen_range(1..3)).collect();
    let xs: Vec<usize> = lead.iter().copied().chain([t, hd]).collect();
    let n = xs.iter().product();
    vec![
        Var::new("x", &xs, uniform(r, n, -1.5, 1.5)),
        Var::new("cos", &[t, hd], uniform(r, t * hd, -1.0, 1.0)),
        Var::new("sin", &[t, hd], uniform(r, t * hd, -1.0, 1.0)),
    ]
}

#[test]
fn rope_matches_its_reference_expression() {
    use coopc_compiler::rope::reference_rope;
    for seed in SEEDS {
        let vars = rope_vars(&mut rng(seed + 1500));
        assert_pairs_agree(&format!("seed {seed}"), &vars, |g, x| {
            [false, true]
                .map(|t| {
                    (
                        g.rope(x[0], x[1], x[2], t),
                        reference_rope(g, x[0], x[1], x[2], t),
                    )
                })
                .to_vec()
        });
    }
}

#[test]
fn rope_transpose_is_the_adjoint_and_inverts_rope_tables() {
    // <rope(x), u> == <x, ropeᵀ(u)> for any tables; with RoPE's tables
    // (cos² + sin² = 1, equal halves) the transpose undoes the rotation.
    for seed in SEEDS {
        let mut r = rng(seed + 1600);
        let mut vars = rope_vars(&mut r);
        let n = vars[0].value.len();
        vars.push(Var::new(
            "u",
            &vars[0].shape.clone(),
            uniform(&mut r, n, -1.0, 1.0),
        ));
        let mut g = Graph::new();
        let x: Vec<NodeId> = vars
            .iter()
            .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
            .collect();
        let fx = g.rope(x[0], x[1], x[2], false);
        let tu = g.rope(x[3], x[1], x[2], true);
        let lhs = g.mul(fx, x[3]);
        let lhs = g.sum_all(lhs);
        let rhs = g.mul(x[0], tu);
        let rhs = g.sum_all(rhs);
        let v = eval(&g, &bind(&vars, &no_extra()), &[lhs, rhs]);
        assert!(
            (v[0][0] - v[1][0]).abs() < 1e-12 * (1.0 + v[0][0].abs()),
            "{v:?}"
        );

        let (t, hd) = (vars[1].shape[0], vars[1].shape[1]);
        let angle: Vec<f64> = (0..t * hd)
            .map(|i| (i / hd) as f64 * 0.7 + (i % (hd / 2)) as f64)
            .collect();
        let mut g = Graph::new();
        let xi = g.input("x", DType::F64, vars[0].shape.clone());
        let c = g.literal(
            &angle.iter().map(|a| a.cos()).collect::<Vec<_>>(),
            DType::F64,
            vec![t, hd],
        );
        let s = g.literal(
            &angle.iter().map(|a| a.sin()).collect::<Vec<_>>(),
            DType::F64,
            vec![t, hd],
        );
        let y = g.rope(xi, c, s, false);
        let back = g.rope(y, c, s, true);
        let v = eval(&g, &bind(&vars[..1], &no_extra()), &[back]);
        assert!(rel_err(&v[0], &vars[0].value, 1e-3) < 1e-12, "seed {seed}");
    }
}

#[test]
fn rope_vjp_matches_finite_differences() {
    for seed in SEEDS {
        let vars = rope_vars(&mut rng(seed + 1700));
        for transpose in [false, true] {
            // With respect to x alone (the transposed op) and with the
            // tables too (ordinary ops), first and second order.
            let tables = bind(&vars[1..], &no_extra());
            check_op(seed, &vars[..1], &tables, true, |g, x| {
                let c = g.input("cos", DType::F64, vars[1].shape.clone());
                let s = g.input("sin", DType::F64, vars[2].shape.clone());
                g.rope(x[0], c, s, transpose)
            });
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                g.rope(x[0], x[1], x[2], transpose)
            });
        }
    }
}

#[test]
fn rope_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::Op;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3, 4]);
    let t = g.input("t", DType::F32, vec![3, 4]);
    let x5 = g.input("x5", DType::F32, vec![2, 3, 5]);
    let t5 = g.input("t5", DType::F32, vec![3, 5]);
    let t2 = g.input("t2", DType::F32, vec![2, 4]);
    let t64 = g.input("t64", DType::F64, vec![3, 4]);
    assert!(g
        .try_add_op(Op::Rope { transpose: false }, &[x, t, t])
        .is_ok());
    for (what, ops) in [
        ("odd head dim", [x5, t5, t5]),
        ("table rows differ", [x, t2, t]),
        ("table dtype differs", [x, t, t64]),
    ] {
        let e = g
            .try_add_op(Op::Rope { transpose: true }, &ops)
            .unwrap_err();
        assert!(e.to_string().contains("rope"), "{what}: {e}");
    }
}

/// Random RMSNorm operands: x [.., d] (rank 1 to 3), w [d], dy like x.
fn norm_vars(r: &mut rand::rngs::StdRng) -> Vec<Var> {
    let d = r.gen_range(1..6);
    let lead: Vec<usize> = (0..r.gen_range(0..3)).map(|_| r.gen_range(1..4)).collect();
    let xs: Vec<usize> = lead.iter().copied().chain([d]).collect();
    let n = xs.iter().product();
    vec![
        Var::new("x", &xs, uniform(r, n, -1.5, 1.5)),
        Var::new("w", &[d], uniform(r, d, -1.5, 1.5)),
        Var::new("dy", &xs, uniform(r, n, -1.0, 1.0)),
    ]
}

#[test]
fn rms_norm_matches_its_reference_expression() {
    use coopc_compiler::ir::NormOperand;
    use coopc_compiler::rms_norm::{reference_grad, reference_norm};
    for seed in SEEDS {
        let vars = norm_vars(&mut rng(seed + 1800));
        let eps = [1e-6, 0.3][seed as usize % 2];
        assert_pairs_agree(&format!("seed {seed}"), &vars, |g, x| {
            let mut pairs = vec![(
                g.rms_norm(x[0], x[1], eps),
                reference_norm(g, x[0], x[1], eps),
            )];
            for wrt in [NormOperand::Input, NormOperand::Weight] {
                pairs.push((
                    g.rms_norm_grad(wrt, [x[0], x[1]], x[2], eps),
                    reference_grad(g, wrt, [x[0], x[1]], x[2], eps),
                ));
            }
            pairs
        });
    }
}

#[test]
fn rms_norm_vjp_matches_finite_differences() {
    use coopc_compiler::ir::NormOperand;
    for seed in SEEDS {
        let vars = norm_vars(&mut rng(seed + 1900));
        check_op(seed, &vars[..2], &no_extra(), true, |g, x| {
            g.rms_norm(x[0], x[1], 1e-3)
        });
        for wrt in [NormOperand::Input, NormOperand::Weight] {
            check_op(seed, &vars, &no_extra(), true, |g, x| {
                g.rms_norm_grad(wrt, [x[0], x[1]], x[2], 1e-3)
            });
        }
    }
}

#[test]
fn rms_norm_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::{NormOperand, Op, Scalar};
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3, 4]);
    let w = g.input("w", DType::F32, vec![4]);
    let w3 = g.input("w3", DType::F32, vec![3]);
    let w64 = g.input("w64", DType::F64, vec![4]);
    let x0 = g.input("x0", DType::F32, vec![2, 0]);
    let w0 = g.input("w0", DType::F32, vec![0]);
    let dy = g.input("dy", DType::F32, vec![2, 3, 5]);
    let eps = Scalar(1e-6);
    assert!(g.try_add_op(Op::RmsNorm { eps }, &[x, w]).is_ok());
    for (what, ops) in [
        ("gain size", [x, w3]),
        ("gain dtype", [x, w64]),
        ("no features", [x0, w0]),
    ] {
        let e = g.try_add_op(Op::RmsNorm { eps }, &ops).unwrap_err();
        assert!(e.to_string().contains("rms_norm"), "{what}: {e}");
    }
    let wrt = NormOperand::Input;
    let e = g
        .try_add_op(Op::RmsNormGrad { wrt, eps }, &[x, w, dy])
        .unwrap_err();
    assert!(e.to_string().contains("dy"), "{e}");
}

/// Random operands of one step of `rule`: θ, g and the state of a random
/// shape (second moments positive), AdamW's step count a whole number.
fn step_vars(r: &mut rand::rngs::StdRng, rule: coopc_compiler::ir::StepRule) -> Vec<Var> {
    let shape = random_shape(r, 0, 3);
    let n: usize = shape.iter().product();
    let mut vars = vec![
        Var::new("p", &shape, uniform(r, n, -1.5, 1.5)),
        Var::new("g", &shape, uniform(r, n, -1.0, 1.0)),
    ];
    if rule.arity() >= 3 {
        vars.push(Var::new("m", &shape, uniform(r, n, -0.5, 0.5)));
    }
    if rule.arity() == 5 {
        vars.push(Var::new("v", &shape, uniform(r, n, 0.01, 0.5)));
        let t = r.gen_range(1..6) as f64;
        vars.push(Var::new("t", &[], vec![t]));
    }
    vars
}

#[test]
fn optim_step_matches_its_reference_expression() {
    use coopc_compiler::optim::reference_step;
    for seed in SEEDS {
        for (i, rule) in step_rules().into_iter().enumerate() {
            let vars = step_vars(&mut rng(seed * 10 + i as u64 + 2000), rule);
            assert_pairs_agree(&format!("seed {seed}, {}", rule.name()), &vars, |g, x| {
                rule.outputs()
                    .iter()
                    .map(|&out| (g.optim_step(rule, out, x), reference_step(g, rule, out, x)))
                    .collect()
            });
        }
    }
}

#[test]
fn optim_step_matches_pytorch_formulas() {
    use coopc_compiler::ir::{StepOut, StepRule};
    // One element, values written out as torch.optim computes them.
    let (p, gr, m, v, t) = (0.7, -0.3, 0.2, 0.05, 3.0);
    let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.999, 1e-8, 0.1);
    let m2: f64 = b1 * m + (1.0 - b1) * gr;
    let v2: f64 = b2 * v + (1.0 - b2) * gr * gr;
    let c1 = 1.0 - b1.powf(t);
    let c2 = 1.0 - b2.powf(t);
    let want_p = p * (1.0 - lr * wd) - lr * (m2 / c1) / ((v2 / c2).sqrt() + eps);
    let rule = StepRule::AdamW {
        lr: lr.into(),
        beta1: b1.into(),
        beta2: b2.into(),
        eps: eps.into(),
        weight_decay: wd.into(),
    };
    let vars = [("p", p), ("g", gr), ("m", m), ("v", v)]
        .map(|(n, x)| Var::new(n, &[1], vec![x]))
        .into_iter()
        .chain([Var::new("t", &[], vec![t])])
        .collect::<Vec<_>>();
    let mut g = Graph::new();
    let x: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
        .collect();
    let outs = g.optim_steps(rule, &x);
    let got = eval(&g, &bind(&vars, &no_extra()), &outs);
    for (what, got, want) in [
        ("param", got[0][0], want_p),
        ("exp_avg", got[1][0], m2),
        ("exp_avg_sq", got[2][0], v2),
    ] {
        assert!((got - want).abs() < 1e-14, "{what}: {got} vs {want}");
    }
    // Momentum: b' = μ b + g, θ' = θ − lr b'; SGD: θ − lr g.
    let mom = StepRule::Momentum {
        lr: 0.1.into(),
        mu: 0.9.into(),
    };
    let sgd = StepRule::Sgd { lr: 0.1.into() };
    let mut g = Graph::new();
    let x: Vec<NodeId> = vars[..3]
        .iter()
        .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
        .collect();
    let outs = [
        g.optim_step(mom, StepOut::Param, &x),
        g.optim_step(mom, StepOut::MomentumBuffer, &x),
        g.optim_step(sgd, StepOut::Param, &x[..2]),
    ];
    let got = eval(&g, &bind(&vars[..3], &no_extra()), &outs);
    let b2 = 0.9 * m + gr;
    for (got, want) in [
        (got[0][0], p - 0.1 * b2),
        (got[1][0], b2),
        (got[2][0], p - 0.1 * gr),
    ] {
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }
}

#[test]
fn optim_step_vjp_matches_finite_differences() {
    use coopc_compiler::ir::StepOut;
    for seed in SEEDS {
        for (i, rule) in step_rules().into_iter().enumerate() {
            let vars = step_vars(&mut rng(seed * 10 + i as u64 + 2100), rule);
            // AdamW's θ' and D hold D constant: checked below instead.
            for &out in rule.outputs() {
                if matches!(out, StepOut::Param | StepOut::Precond) && rule.arity() == 5 {
                    continue;
                }
                check_op(seed, &vars, &no_extra(), true, |g, x| {
                    g.optim_step(rule, out, x)
                });
            }
        }
    }
}

#[test]
fn adamw_step_vjp_holds_the_step_size_constant() {
    use coopc_compiler::ir::StepOut;
    // ∂θ'/∂θ = 1 − lr·wd, ∂θ'/∂g = −D (1 − β1), ∂θ'/∂m = −D β1, nothing
    // through v, t or D itself.
    for seed in SEEDS {
        let rule = step_rules()[3];
        let vars = step_vars(&mut rng(seed + 2200), rule);
        let mut g = Graph::new();
        let x: Vec<NodeId> = vars
            .iter()
            .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
            .collect();
        let p2 = g.optim_step(rule, StepOut::Param, &x);
        let d = g.optim_step(rule, StepOut::Precond, &x);
        let loss = g.sum_all(p2);
        let grads = grad(&mut g, loss, &x);
        let dl = g.sum_all(d);
        let dgrads = grad(&mut g, dl, &x);
        let mut nodes = vec![d];
        nodes.extend(&grads);
        nodes.extend(&dgrads);
        let vals = eval(&g, &bind(&vars, &no_extra()), &nodes);
        let dv = &vals[0];
        let (lr, wd, b1) = (3e-3, 0.1, 0.8);
        let want = [
            dv.iter().map(|_| 1.0 - lr * wd).collect::<Vec<_>>(),
            dv.iter().map(|d| -d * (1.0 - b1)).collect(),
            dv.iter().map(|d| -d * b1).collect(),
            dv.iter().map(|_| 0.0).collect(),
            vec![0.0],
        ];
        for (i, w) in want.iter().enumerate() {
            let e = rel_err(&vals[1 + i], w, 1e-3);
            assert!(e < 1e-12, "seed {seed}, ∂θ'/∂{}: {e:e}", vars[i].name);
            assert!(vals[6 + i].iter().all(|&z| z == 0.0), "D is constant");
        }
    }
}

#[test]
fn optim_step_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::{Op, StepOut};
    let rules = step_rules();
    let mut g = Graph::new();
    let p = g.input("p", DType::F32, vec![3, 4]);
    let gr = g.input("g", DType::F32, vec![3, 4]);
    let g5 = g.input("g5", DType::F32, vec![3, 5]);
    let g64 = g.input("g64", DType::F64, vec![3, 4]);
    let t = g.input("t", DType::F32, vec![]);
    let t1 = g.input("t1", DType::F32, vec![1]);
    let ids = g.input("ids", DType::I32, vec![3, 4]);
    let step = |rule, out| Op::OptimStep { rule, out };
    assert!(g
        .try_add_op(step(rules[0], StepOut::Param), &[p, gr])
        .is_ok());
    for (what, op, ops) in [
        (
            "state of sgd",
            step(rules[0], StepOut::MomentumBuffer),
            vec![p, gr],
        ),
        ("arity", step(rules[1], StepOut::Param), vec![p, gr]),
        (
            "gradient shape",
            step(rules[0], StepOut::Param),
            vec![p, g5],
        ),
        (
            "gradient dtype",
            step(rules[0], StepOut::Param),
            vec![p, g64],
        ),
        (
            "integer parameter",
            step(rules[0], StepOut::Param),
            vec![ids, ids],
        ),
        (
            "step count shape",
            step(rules[2], StepOut::Param),
            vec![p, gr, gr, gr, t1],
        ),
        (
            "buffer shape",
            step(rules[2], StepOut::Param),
            vec![p, gr, g5, gr, t],
        ),
    ] {
        let e = g.try_add_op(op, &ops).unwrap_err();
        assert!(e.to_string().contains("optim_step"), "{what}: {e}");
    }
}

/// Random `update_slice` operands: base of rank 1–4, an axis, an update of
/// extent 1 there and an index (the last seed's outside the axis).
fn update_slice_case(seed: u64) -> (Vec<Var>, usize, i32) {
    let mut r = rng(seed + 2300);
    let shape = random_shape(&mut r, 1, 4);
    let axis = r.gen_range(0..shape.len());
    let mut us = shape.clone();
    us[axis] = 1;
    let index = if seed == 4 {
        shape[axis] as i32
    } else {
        r.gen_range(0..shape[axis]) as i32
    };
    let n: usize = shape.iter().product();
    let m: usize = us.iter().product();
    let vars = vec![
        Var::new("base", &shape, uniform(&mut r, n, -1.0, 1.0)),
        Var::new("update", &us, uniform(&mut r, m, -1.0, 1.0)),
    ];
    (vars, axis, index)
}

#[test]
fn update_slice_writes_one_position_of_the_axis() {
    use coopc_runtime::HostTensor;
    for seed in SEEDS {
        let (vars, axis, index) = update_slice_case(seed);
        let shape = vars[0].shape.clone();
        let mut g = Graph::new();
        let base = g.input("base", DType::F64, shape.clone());
        let upd = g.input("update", DType::F64, vars[1].shape.clone());
        let at = g.input("index", DType::I32, vec![1]);
        let out = g.update_slice(base, upd, at, axis);
        let extra = Inputs::from([("index".into(), HostTensor::i32(vec![1], vec![index]))]);
        let got = &eval(&g, &bind(&vars, &extra), &[out])[0];
        // Element by element: the update's element where the axis index is
        // `index`, the base's elsewhere.
        let inner: usize = shape[axis + 1..].iter().product();
        let len = shape[axis];
        for (i, &v) in got.iter().enumerate() {
            let (o, j, c) = (i / (len * inner), (i / inner) % len, i % inner);
            let want = if j as i32 == index {
                vars[1].value[o * inner + c]
            } else {
                vars[0].value[i]
            };
            assert_eq!(v, want, "seed {seed}, element {i}");
        }
    }
}

#[test]
fn update_slice_vjp_matches_finite_differences() {
    use coopc_runtime::HostTensor;
    for seed in SEEDS {
        let (vars, axis, index) = update_slice_case(seed);
        let extra = Inputs::from([("index".into(), HostTensor::i32(vec![1], vec![index]))]);
        check_op(seed, &vars, &extra, true, |g, x| {
            let at = g.input("index", DType::I32, vec![1]);
            g.update_slice(x[0], x[1], at, axis)
        });
    }
}

#[test]
fn update_slice_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::Op;
    let mut g = Graph::new();
    let base = g.input("base", DType::F32, vec![2, 5, 3]);
    let upd = g.input("upd", DType::F32, vec![2, 1, 3]);
    let wide = g.input("wide", DType::F32, vec![2, 2, 3]);
    let upd64 = g.input("upd64", DType::F64, vec![2, 1, 3]);
    let at = g.input("at", DType::I32, vec![1]);
    let at2 = g.input("at2", DType::I32, vec![2]);
    let atf = g.input("atf", DType::F32, vec![1]);
    let op = |axis| Op::UpdateSlice { axis };
    assert!(g.try_add_op(op(1), &[base, upd, at]).is_ok());
    for (what, axis, ops) in [
        ("axis", 3, [base, upd, at]),
        ("update extent", 1, [base, wide, at]),
        ("update on another axis", 0, [base, upd, at]),
        ("update dtype", 1, [base, upd64, at]),
        ("index shape", 1, [base, upd, at2]),
        ("index dtype", 1, [base, upd, atf]),
    ] {
        let e = g.try_add_op(op(axis), &ops).unwrap_err();
        assert!(e.to_string().contains("update_slice"), "{what}: {e}");
    }
}

/// Random cached-attention operands: q [B, H, 1, hd], caches [B, H_kv, L,
/// hd], and a position (the last seed's past the cache, which reads it
/// all).
fn cached_attention_case(seed: u64) -> (Vec<Var>, i32) {
    let mut r = rng(seed + 2400);
    let (b, kv, group) = (r.gen_range(1..3), r.gen_range(1..3), r.gen_range(1..3));
    let (l, hd) = (r.gen_range(1..6), r.gen_range(1..4));
    let pos = if seed == 4 {
        l as i32 + 2
    } else {
        r.gen_range(0..l) as i32
    };
    let mut var = |name: &str, s: Vec<usize>| {
        let n = s.iter().product();
        Var::new(name, &s, uniform(&mut r, n, -1.5, 1.5))
    };
    let vars = vec![
        var("q", vec![b, kv * group, 1, hd]),
        var("k", vec![b, kv, l, hd]),
        var("v", vec![b, kv, l, hd]),
    ];
    (vars, pos)
}

#[test]
fn cached_attention_matches_its_reference_expression() {
    use coopc_compiler::attention::reference_cached_attention;
    use coopc_runtime::HostTensor;
    for seed in SEEDS {
        let (vars, pos) = cached_attention_case(seed);
        let mut g = Graph::new();
        let x: Vec<NodeId> = vars
            .iter()
            .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
            .collect();
        let p = g.input("pos", DType::I32, vec![1]);
        let op = g.cached_attention(x[0], x[1], x[2], p);
        let reference = reference_cached_attention(&mut g, x[0], x[1], x[2], p);
        let extra = Inputs::from([("pos".into(), HostTensor::i32(vec![1], vec![pos]))]);
        let vals = eval(&g, &bind(&vars, &extra), &[op, reference]);
        let e = rel_err(&vals[0], &vals[1], 1e-3);
        assert!(e < 1e-12, "seed {seed}: {e:e}");
    }
}

#[test]
fn cached_attention_vjp_matches_finite_differences() {
    use coopc_runtime::HostTensor;
    for seed in SEEDS {
        let (vars, pos) = cached_attention_case(seed);
        let extra = Inputs::from([("pos".into(), HostTensor::i32(vec![1], vec![pos]))]);
        check_op(seed, &vars, &extra, true, |g, x| {
            let p = g.input("pos", DType::I32, vec![1]);
            g.cached_attention(x[0], x[1], x[2], p)
        });
    }
}

#[test]
fn cached_attention_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::Op;
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![2, 4, 1, 8]);
    let q2 = g.input("q2", DType::F32, vec![2, 4, 2, 8]);
    let k = g.input("k", DType::F32, vec![2, 2, 16, 8]);
    let k3 = g.input("k3", DType::F32, vec![2, 3, 16, 8]);
    let kd = g.input("kd", DType::F32, vec![2, 2, 16, 4]);
    let pos = g.input("pos", DType::I32, vec![1]);
    let posf = g.input("posf", DType::F32, vec![1]);
    assert!(g.try_add_op(Op::CachedAttention, &[q, k, k, pos]).is_ok());
    for (what, ops) in [
        ("one query row", [q2, k, k, pos]),
        ("kv heads dividing heads", [q, k3, k3, pos]),
        ("head dim", [q, kd, kd, pos]),
        ("k and v alike", [q, k, kd, pos]),
        ("i32 position", [q, k, k, posf]),
    ] {
        let e = g.try_add_op(Op::CachedAttention, &ops).unwrap_err();
        assert!(e.to_string().contains("cached_attention"), "{what}: {e}");
    }
}

/// A token-loss case of `loss`: its operands as f64 inputs of a `[b, t]`
/// batch; the mask (0/1 values, data) is not differentiable: a finite
/// difference across 0 would cross the response test.
fn token_loss_case(loss: coopc_compiler::ir::TokenLoss, seed: u64) -> (Vec<Var>, Inputs) {
    let (b, t) = (2 + seed as usize % 3, 1 + seed as usize);
    let values = token_loss_batch(seed + 2600, b, t, seed.is_multiple_of(2), false);
    let mut vars = Vec::new();
    let mut mask = Inputs::new();
    for ((name, shape), v) in token_loss_operands(loss, b, t).into_iter().zip(values) {
        if name == "mask" {
            mask.insert(name.into(), f64_tensor(&shape, &v));
        } else {
            vars.push(Var::new(name, &shape, v));
        }
    }
    (vars, mask)
}

/// The loss's operands in order from the differentiable ones `x` (logπ,
/// then old, A, ref) and the mask input.
fn token_loss_ops(g: &mut Graph, x: &[NodeId]) -> Vec<NodeId> {
    let shape = g.ty(x[0]).shape.clone();
    let mask = g.input("mask", DType::F64, shape);
    let mut ops = vec![x[0], mask];
    ops.extend(&x[1..]);
    ops
}

#[test]
fn token_loss_matches_its_reference_expression() {
    use coopc_compiler::autodiff::vjp;
    use coopc_compiler::ir::TokenLoss;
    use coopc_compiler::losses::{reference_grad, reference_loss};
    for loss in token_losses() {
        for seed in SEEDS {
            let (b, t) = (2 + seed as usize % 3, 1 + seed as usize);
            // GRPO drops garbage at masked positions; SFT's masked mean does not.
            let garbage = matches!(loss, TokenLoss::Grpo { .. });
            let values = token_loss_batch(seed + 2700, b, t, seed.is_multiple_of(2), garbage);
            let mut g = Graph::new();
            let mut inputs = Inputs::new();
            let mut ops = Vec::new();
            for ((name, shape), v) in token_loss_operands(loss, b, t).into_iter().zip(values) {
                inputs.insert(name.into(), f64_tensor(&shape, &v));
                ops.push(g.input(name, DType::F64, shape));
            }
            inputs.insert("gout".into(), f64_tensor(&[], &[0.7]));
            let gout = g.input("gout", DType::F64, vec![]);
            let op = g.token_loss(loss, &ops);
            let reference = reference_loss(&mut g, loss, &ops);
            let dop = g.token_loss_grad(loss, &ops, gout);
            let dref = reference_grad(&mut g, loss, &ops, gout);
            let autodiff = vjp(&mut g, &[reference], &[gout], &[ops[0]])[0];
            let vals = eval(&g, &inputs, &[op, reference, dop, dref, autodiff]);
            let what = format!("{loss:?}, seed {seed}");
            assert!(vals[0][0].is_finite(), "{what}: loss {}", vals[0][0]);
            for (i, name) in [(1, "loss"), (3, "reference gradient"), (4, "autodiff")] {
                let against = if i == 1 { &vals[0] } else { &vals[2] };
                let e = rel_err(against, &vals[i], 1e-3);
                assert!(e < 1e-12, "{what}: {name} differs by {e:e}");
            }
        }
    }
}

#[test]
fn token_loss_vjp_matches_finite_differences() {
    // CISPO's value holds its clipped ratio as a constant (a stop-gradient),
    // so its gradient is not the value's finite difference:
    // tests/losses.rs `cispo_weights_every_token_by_its_clipped_ratio`
    // checks it by hand instead.
    for loss in token_losses().into_iter().filter(|l| !l.cispo()) {
        for seed in SEEDS {
            let (vars, mask) = token_loss_case(loss, seed);
            check_op(seed, &vars, &mask, true, |g, x| {
                let ops = token_loss_ops(g, x);
                g.token_loss(loss, &ops)
            });
        }
    }
}

#[test]
fn token_loss_grad_vjp_matches_finite_differences() {
    for loss in token_losses() {
        for seed in SEEDS {
            let (mut vars, mask) = token_loss_case(loss, seed);
            vars.push(Var::new("gout", &[], vec![0.5 + seed as f64 / 4.0]));
            check_op(seed, &vars, &mask, true, |g, x| {
                let (gout, x) = x.split_last().expect("gout");
                let ops = token_loss_ops(g, x);
                g.token_loss_grad(loss, &ops, *gout)
            });
        }
    }
}

#[test]
fn token_loss_refuses_operands_that_do_not_fit() {
    use coopc_compiler::ir::{Op, TokenLoss};
    let [sft, grpo, grpo_kl] = [0, 1, 2].map(|i| token_losses()[i]);
    assert_eq!(grpo_kl.arity(), 5);
    let mut g = Graph::new();
    let lp = g.input("logp", DType::F32, vec![4, 6]);
    let mask = g.input("mask", DType::F32, vec![4, 6]);
    let adv = g.input("adv", DType::F32, vec![4]);
    let adv2 = g.input("adv2", DType::F32, vec![4, 1]);
    let m64 = g.input("m64", DType::F64, vec![4, 6]);
    let short = g.input("short", DType::F32, vec![4, 5]);
    let flat = g.input("flat", DType::F32, vec![24]);
    let ids = g.input("ids", DType::I32, vec![4, 6]);
    let s = g.input("s", DType::F32, vec![]);
    let v = g.input("v", DType::F32, vec![1]);
    let fits =
        |g: &mut Graph, loss: TokenLoss, ops: &[NodeId]| g.try_add_op(Op::TokenLoss { loss }, ops);
    assert!(fits(&mut g, sft, &[lp, mask]).is_ok());
    assert!(fits(&mut g, grpo, &[lp, mask, lp, adv]).is_ok());
    assert!(fits(&mut g, grpo_kl, &[lp, mask, lp, adv, lp]).is_ok());
    assert!(g
        .try_add_op(Op::TokenLossGrad { loss: sft }, &[lp, mask, s])
        .is_ok());
    for (what, loss, ops) in [
        ("arity", grpo, vec![lp, mask, lp]),
        ("arity with KL", grpo_kl, vec![lp, mask, lp, adv]),
        ("mask dtype", sft, vec![lp, m64]),
        ("mask shape", sft, vec![lp, short]),
        ("rank", sft, vec![flat, flat]),
        ("float logπ", sft, vec![ids, ids]),
        ("advantages per sequence", grpo, vec![lp, mask, lp, adv2]),
        ("old like logπ", grpo, vec![lp, mask, short, adv]),
    ] {
        let e = fits(&mut g, loss, &ops).unwrap_err();
        assert!(e.to_string().contains("token_loss"), "{what}: {e}");
    }
    let e = g
        .try_add_op(Op::TokenLossGrad { loss: sft }, &[lp, mask, v])
        .unwrap_err();
    assert!(e.to_string().contains("gout"), "{e}");
}

#[test]
fn token_loss_vjp_with_the_log_probs_also_as_old_log_probs() {
    // logπ in two slots: the expansion gives its one total (the ratio is
    // 1 whatever logπ is, so only the KL term depends on it).
    for loss in token_losses().into_iter().skip(1) {
        for seed in SEEDS {
            let (vars, mask) = token_loss_case(loss, seed);
            let vars: Vec<Var> = vars.into_iter().filter(|v| v.name != "old").collect();
            check_op(seed, &vars, &mask, true, |g, x| {
                let shape = g.ty(x[0]).shape.clone();
                let m = g.input("mask", DType::F64, shape);
                let mut ops = vec![x[0], m, x[0]];
                ops.extend(&x[1..]);
                g.token_loss(loss, &ops)
            });
        }
    }
}
