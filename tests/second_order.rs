//! Second-order derivatives from autodiff applied to its own output:
//! Hessian-vector products of an MLP regression loss and of softmax
//! cross-entropy, and a mixed ∂²L/∂w∂θ · v product of a LoRA-style layer,
//! each against finite differences of first-order gradients.

mod common;

use common::*;
use coopc_compiler::autodiff::{grad, vjp};
use coopc_compiler::ir::{DType, Graph, NodeId};
use coopc_compiler::passes::Pipeline;

/// x Wᵀ + b for x [n, in], W [out, in], b [out].
fn linear(g: &mut Graph, x: NodeId, w: NodeId, b: Option<NodeId>) -> NodeId {
    let wt = g.transpose(w);
    let y = g.matmul(x, wt);
    match b {
        Some(b) => {
            let shape = g.ty(y).shape.clone();
            let bb = g.broadcast(b, shape);
            g.add(y, bb)
        }
        None => y,
    }
}

/// Checks H·v (autodiff twice) against (∇L(p + hv) − ∇L(p − hv)) / 2h for the
/// params `vars`, where `build` makes the scalar loss from the param nodes.
fn check_hvp(
    seed: u64,
    vars: &[Var],
    data: &Inputs,
    optimise: bool,
    build: impl Fn(&mut Graph, &[NodeId]) -> NodeId,
) {
    let mut r = rng(seed);
    let mut g = Graph::new();
    let ps: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
        .collect();
    let loss = build(&mut g, &ps);
    let grads = grad(&mut g, loss, &ps);
    let vnodes: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(format!("v.{}", v.name), DType::F64, v.shape.clone()))
        .collect();
    let hvp = vjp(&mut g, &grads, &vnodes, &ps);
    for (i, (&gi, &hi)) in grads.iter().zip(&hvp).enumerate() {
        g.set_output(format!("grad{i}"), gi);
        g.set_output(format!("hvp{i}"), hi);
    }
    if optimise {
        Pipeline::standard().run(&mut g);
    }
    let outs = |g: &Graph, prefix: &str| -> Vec<NodeId> {
        (0..vars.len())
            .map(|i| g.output(&format!("{prefix}{i}")).unwrap())
            .collect()
    };
    let (grads, hvp) = (outs(&g, "grad"), outs(&g, "hvp"));
    let vs: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| uniform(&mut r, v.value.len(), -1.0, 1.0))
        .collect();
    let mut inputs = data.clone();
    for (v, d) in vars.iter().zip(&vs) {
        inputs.insert(v.name.clone(), f64_tensor(&v.shape, &v.value));
        inputs.insert(format!("v.{}", v.name), f64_tensor(&v.shape, d));
    }
    let hv = eval(&g, &inputs, &hvp);
    let h = 1e-5;
    let at = |sign: f64| {
        let mut inp = inputs.clone();
        for (v, d) in vars.iter().zip(&vs) {
            let moved: Vec<f64> = v
                .value
                .iter()
                .zip(d)
                .map(|(a, b)| a + sign * h * b)
                .collect();
            inp.insert(v.name.clone(), f64_tensor(&v.shape, &moved));
        }
        eval(&g, &inp, &grads)
    };
    let (gp, gm) = (at(1.0), at(-1.0));
    let fd: Vec<f64> = gp
        .concat()
        .iter()
        .zip(gm.concat())
        .map(|(a, b)| (a - b) / (2.0 * h))
        .collect();
    let ad = hv.concat();
    let e = rel_err(&ad, &fd, 1e-6);
    assert!(
        norm(&fd) > 1e-3,
        "degenerate test: Hessian-vector product is ~0"
    );
    assert!(
        e < 1e-6,
        "HVP mismatch: rel err {e:e}\n autodiff {ad:?}\n finite-d {fd:?}"
    );
}

fn mlp_vars(seed: u64) -> (Vec<Var>, Inputs) {
    let mut r = rng(seed);
    let (n, d, h, o) = (5, 4, 6, 3);
    let vars = vec![
        Var::new("w1", &[h, d], uniform(&mut r, h * d, -0.8, 0.8)),
        Var::new("b1", &[h], uniform(&mut r, h, -0.5, 0.5)),
        Var::new("w2", &[o, h], uniform(&mut r, o * h, -0.8, 0.8)),
        Var::new("b2", &[o], uniform(&mut r, o, -0.5, 0.5)),
    ];
    let mut data = Inputs::new();
    data.insert(
        "x".into(),
        f64_tensor(&[n, d], &uniform(&mut r, n * d, -1.0, 1.0)),
    );
    data.insert(
        "y".into(),
        f64_tensor(&[n, o], &uniform(&mut r, n * o, -1.0, 1.0)),
    );
    (vars, data)
}

fn mlp_loss(g: &mut Graph, p: &[NodeId]) -> NodeId {
    let x = g.input("x", DType::F64, vec![5, 4]);
    let y = g.input("y", DType::F64, vec![5, 3]);
    let h = linear(g, x, p[0], Some(p[1]));
    let h = g.tanh(h);
    let out = linear(g, h, p[2], Some(p[3]));
    let d = g.sub(out, y);
    let sq = g.mul(d, d);
    g.mean(sq, &[0, 1], false)
}

#[test]
fn mlp_hessian_vector_product_matches_finite_differences() {
    for seed in [11, 12, 13] {
        let (vars, data) = mlp_vars(seed);
        check_hvp(seed, &vars, &data, false, mlp_loss);
    }
}

#[test]
fn mlp_hessian_vector_product_survives_the_pass_pipeline() {
    let (vars, data) = mlp_vars(21);
    check_hvp(21, &vars, &data, true, mlp_loss);
}

/// Mean softmax cross-entropy of logits = silu(x W1ᵀ) W2ᵀ against labels.
fn softmax_ce(g: &mut Graph, p: &[NodeId]) -> NodeId {
    let x = g.input("x", DType::F64, vec![6, 4]);
    let labels = g.input("labels", DType::I32, vec![6, 1]);
    let h = linear(g, x, p[0], None);
    let h = g.silu(h);
    let logits = linear(g, h, p[1], None);
    let lp = g.log_softmax(logits);
    let picked = g.take_along_axis(lp, labels, 1);
    let m = g.mean(picked, &[0, 1], false);
    g.neg(m)
}

#[test]
fn softmax_cross_entropy_hessian_vector_product_matches_finite_differences() {
    for seed in [31, 32, 33] {
        let mut r = rng(seed);
        let vars = vec![
            Var::new("w1", &[5, 4], uniform(&mut r, 20, -1.0, 1.0)),
            Var::new("w2", &[7, 5], uniform(&mut r, 35, -1.0, 1.0)),
        ];
        let mut data = Inputs::new();
        data.insert(
            "x".into(),
            f64_tensor(&[6, 4], &uniform(&mut r, 24, -1.0, 1.0)),
        );
        let labels: Vec<f64> = (0..6)
            .map(|i| ((i * 5 + seed as usize) % 7) as f64)
            .collect();
        data.insert(
            "labels".into(),
            coopc_runtime::HostTensor::from_f64(DType::I32, vec![6, 1], &labels).unwrap(),
        );
        check_hvp(seed, &vars, &data, seed == 33, softmax_ce);
    }
}

/// Loss of a LoRA-adapted layer: y = x (θ + s·B A)ᵀ, L = mean(tanh(y)·t).
fn lora_loss(g: &mut Graph, theta: NodeId, a: NodeId, b: NodeId) -> NodeId {
    let x = g.input("x", DType::F64, vec![5, 4]);
    let t = g.input("t", DType::F64, vec![5, 3]);
    let base = linear(g, x, theta, None);
    let xa = linear(g, x, a, None);
    let xab = linear(g, xa, b, None);
    let xab = g.scale(xab, 2.0);
    let y = g.add(base, xab);
    let y = g.tanh(y);
    let yt = g.mul(y, t);
    g.mean(yt, &[0, 1], false)
}

#[test]
fn mixed_second_derivative_matches_finite_differences() {
    for seed in [41, 42, 43] {
        let mut r = rng(seed);
        let theta_v = uniform(&mut r, 12, -1.0, 1.0);
        let a_v = uniform(&mut r, 8, -1.0, 1.0);
        let b_v = uniform(&mut r, 6, -1.0, 1.0);
        let v_v = uniform(&mut r, 12, -1.0, 1.0);
        let mut g = Graph::new();
        let theta = g.input("theta", DType::F64, vec![3, 4]);
        let a = g.input("A", DType::F64, vec![2, 4]);
        let b = g.input("B", DType::F64, vec![3, 2]);
        let v = g.input("v", DType::F64, vec![3, 4]);
        let l = lora_loss(&mut g, theta, a, b);
        let gt = grad(&mut g, l, &[theta])[0];
        // ∂/∂w <∂L/∂θ, v>
        let mixed = vjp(&mut g, &[gt], &[v], &[a, b]);
        let gw = grad(&mut g, l, &[a, b]);
        let mut inputs = Inputs::new();
        inputs.insert(
            "x".into(),
            f64_tensor(&[5, 4], &uniform(&mut r, 20, -1.0, 1.0)),
        );
        inputs.insert(
            "t".into(),
            f64_tensor(&[5, 3], &uniform(&mut r, 15, -1.0, 1.0)),
        );
        inputs.insert("A".into(), f64_tensor(&[2, 4], &a_v));
        inputs.insert("B".into(), f64_tensor(&[3, 2], &b_v));
        inputs.insert("v".into(), f64_tensor(&[3, 4], &v_v));
        let at = |theta_val: &[f64]| {
            let mut inp = inputs.clone();
            inp.insert("theta".into(), f64_tensor(&[3, 4], theta_val));
            inp
        };
        let ad = eval(&g, &at(&theta_v), &mixed).concat();
        let h = 1e-5;
        let plus: Vec<f64> = theta_v.iter().zip(&v_v).map(|(t, d)| t + h * d).collect();
        let minus: Vec<f64> = theta_v.iter().zip(&v_v).map(|(t, d)| t - h * d).collect();
        let gp = eval(&g, &at(&plus), &gw).concat();
        let gm = eval(&g, &at(&minus), &gw).concat();
        let fd: Vec<f64> = gp
            .iter()
            .zip(&gm)
            .map(|(p, m)| (p - m) / (2.0 * h))
            .collect();
        assert!(norm(&fd) > 1e-3, "degenerate test");
        let e = rel_err(&ad, &fd, 1e-6);
        assert!(
            e < 1e-6,
            "mixed ∂²/∂w∂θ mismatch: rel err {e:e}\n autodiff {ad:?}\n finite-d {fd:?}"
        );
    }
}
