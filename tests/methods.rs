//! Every method lowers to a runnable meta-step; the baselines have no
//! shadow and no adapter update, and their λ follows the method.

mod common;

use common::*;
use coopc_compiler::ir::Op;
use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
use coopc_compiler::spec::{Lambda, Method};
use coopc_runtime::HostTensor;
use rand::Rng;

#[test]
fn lambda_follows_the_method() {
    let mut spec = tiny_spec();
    spec.train.steps = 5;
    spec.sft.cold_start_steps = 2;
    spec.bilevel.lambda = Lambda::Linear {
        start: 0.2,
        end: 0.6,
    };
    let at = |spec: &coopc_compiler::spec::PipelineSpec| {
        (0..5).map(|s| spec.lambda_at(s)).collect::<Vec<_>>()
    };
    let cases = [
        (Method::Bridge, vec![0.2, 0.3, 0.4, 0.5, 0.6]),
        (Method::Mix, vec![0.2, 0.3, 0.4, 0.5, 0.6]),
        (Method::RlZero, vec![1.0; 5]),
        (Method::Sft, vec![0.0; 5]),
        (Method::ColdStart, vec![0.0, 0.0, 1.0, 1.0, 1.0]),
        (Method::Alternating, vec![0.0, 1.0, 0.0, 1.0, 0.0]),
    ];
    for (m, want) in cases {
        spec.bilevel.method = m;
        let got = at(&spec);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{}: {got:?} vs {want:?}", m.name());
        }
    }
}

#[test]
fn every_method_lowers_and_baselines_train_theta_only() {
    for method in Method::ALL {
        let mut spec = tiny_spec();
        spec.bilevel.method = method;
        spec.bilevel.hypergradient.unroll = 1;
        spec.bilevel.hypergradient.backprop = 1;
        let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
        let names: Vec<&str> = ms.graph.outputs().iter().map(|(n, _)| n.as_str()).collect();
        let has = |p: &str| names.iter().any(|n| n.starts_with(p));
        let inputs: Vec<String> = ms
            .graph
            .node_ids()
            .filter_map(|id| match ms.graph.op(id) {
                Op::Input { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        assert!(
            has("theta_K.") && has("lower.") && has("loss.sft") && has("loss.rl"),
            "{}",
            method.name()
        );
        let bridge = method == Method::Bridge;
        assert_eq!(has("hyper."), bridge, "{}: hypergradient", method.name());
        assert_eq!(has("loss.up"), bridge, "{}: upper loss", method.name());
        assert_eq!(
            inputs.iter().any(|n| n.starts_with("shadow.")),
            bridge,
            "{}: shadow",
            method.name()
        );

        // SGD, K = 1: θ_K = θ_0 − lr · ∇θ L_low, with L_low at the method's λ.
        let mut r = rng(9);
        let mut feed = Inputs::new();
        for id in ms.graph.node_ids() {
            if let Op::Input { name, ty } = ms.graph.op(id) {
                let n = ty.numel();
                let t = match ty.dtype {
                    coopc_compiler::ir::DType::I32 => {
                        let v: Vec<f64> = (0..n)
                            .map(|_| r.gen_range(0..spec.model.vocab_size) as f64)
                            .collect();
                        HostTensor::from_f64(ty.dtype, ty.shape.clone(), &v).unwrap()
                    }
                    _ if name.ends_with("loss_mask") => {
                        let t = ty.shape[1];
                        let v: Vec<f64> =
                            (0..n).map(|i| if i % t == 0 { 0.0 } else { 1.0 }).collect();
                        f64_tensor(&ty.shape, &v)
                    }
                    _ if name == "lambda" => f64_tensor(&[], &[spec.lambda_at(0)]),
                    _ => f64_tensor(&ty.shape, &uniform(&mut r, n, -0.5, 0.5)),
                };
                feed.insert(name.clone(), t);
            }
        }
        let lr = spec.optim.lower.lr;
        for (name, _) in ms.theta.iter().take(3) {
            let ids = [
                ms.graph.output(&format!("theta_K.{name}")).unwrap(),
                ms.graph.output(&format!("lower.{name}")).unwrap(),
            ];
            let v = eval(&ms.graph, &feed, &ids);
            let theta0 = feed[name].to_f64_vec();
            let want: Vec<f64> = theta0.iter().zip(&v[1]).map(|(t, g)| t - lr * g).collect();
            assert!(
                rel_err(&v[0], &want, 1e-9) < 1e-12,
                "{}: {name}",
                method.name()
            );
        }
    }
}

/// Random inputs for every input of `g` (token ids within the vocabulary,
/// response masks, `lambda` = `lambda`).
fn random_feed(g: &coopc_compiler::Graph, vocab: usize, lambda: f64, seed: u64) -> Inputs {
    let mut r = rng(seed);
    let mut feed = Inputs::new();
    for id in g.node_ids() {
        if let Op::Input { name, ty } = g.op(id) {
            let n = ty.numel();
            let t = match ty.dtype {
                coopc_compiler::ir::DType::I32 => {
                    let v: Vec<f64> = (0..n).map(|_| r.gen_range(0..vocab) as f64).collect();
                    HostTensor::from_f64(ty.dtype, ty.shape.clone(), &v).unwrap()
                }
                _ if name.ends_with("loss_mask") => {
                    let t = ty.shape[1];
                    let v: Vec<f64> = (0..n).map(|i| if i % t == 0 { 0.0 } else { 1.0 }).collect();
                    f64_tensor(&ty.shape, &v)
                }
                _ if name == "lambda" => f64_tensor(&[], &[lambda]),
                _ => f64_tensor(&ty.shape, &uniform(&mut r, n, -0.5, 0.5)),
            };
            feed.insert(name.clone(), t);
        }
    }
    feed
}

/// `sft` has λ = 0 at every step, so its meta-step leaves the RL term out
/// (no RL forward or backward on stand-in rows): the same gradient and
/// update as `mix` at λ = 0, for much less arithmetic.
#[test]
fn sft_meta_step_has_no_rl_term_and_equals_mix_at_lambda_zero() {
    let lowered = |method| {
        let mut spec = tiny_spec();
        spec.bilevel.method = method;
        spec.bilevel.hypergradient.unroll = 1;
        (lower_meta_step(&spec, BatchShapes::from_spec(&spec)), spec)
    };
    let (sft, spec) = lowered(Method::Sft);
    let (mix, _) = lowered(Method::Mix);
    let flops = |g: &coopc_compiler::Graph| {
        coopc_compiler::ir::cost::program_flops(g, &g.node_ids().collect::<Vec<_>>())
    };
    let (fs, fm) = (flops(&sft.graph), flops(&mix.graph));
    assert!(fs * 10 < fm * 7, "sft {fs} FLOPs vs mix {fm}");
    let feed = random_feed(&mix.graph, spec.model.vocab_size, 0.0, 5);
    for (name, _) in &sft.theta {
        let out = |g: &coopc_compiler::Graph| {
            let ids = [
                g.output(&format!("lower.{name}")).unwrap(),
                g.output(&format!("theta_K.{name}")).unwrap(),
            ];
            eval(g, &feed, &ids)
        };
        let (a, b) = (out(&sft.graph), out(&mix.graph));
        assert!(a[0].iter().any(|&x| x != 0.0), "{name}: a gradient");
        for i in 0..2 {
            assert!(rel_err(&a[i], &b[i], 1e-12) < 1e-12, "{name}");
        }
    }
    let rl = sft.graph.output("loss.rl").unwrap();
    assert_eq!(eval(&sft.graph, &feed, &[rl])[0], vec![0.0]);
}
