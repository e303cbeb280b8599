//! Hypergradients of the lowered BRIDGE meta-step on a tiny decoder in f64:
//! `truncated` (T = K) against central finite differences of the whole
//! unrolled meta-objective and against plain reverse mode through the
//! unrolled graph; `first_order` against finite differences of L_up with θ_K,
//! θ̂_K held fixed; `finite_difference` against `truncated` (T = 1). SGD,
//! momentum and AdamW (frozen preconditioner) as lower optimisers.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{DType, Graph, NodeId};
use coopc_compiler::losses::{grpo_loss, sft_loss, RlBatch};
use coopc_compiler::lowering::{
    lower_meta_step, lower_meta_step_with, BatchShapes, LowerOptions, MemoryPlan, MetaStep,
};
use coopc_compiler::model::{Decoder, Params};
use coopc_compiler::spec::*;

fn shapes(spec: &PipelineSpec) -> BatchShapes {
    BatchShapes::from_spec(spec)
}

fn outputs_with_prefix(g: &Graph, prefix: &str) -> Vec<(String, NodeId)> {
    g.outputs()
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, id)| (n[prefix.len()..].to_string(), *id))
        .collect()
}

/// Central differences of the scalar output `loss` with respect to every w element.
fn fd_wrt_w(g: &Graph, loss: NodeId, ms: &MetaStep, inputs: &Inputs) -> Vec<f64> {
    let vars: Vec<Var> = ms
        .lora
        .iter()
        .map(|(n, s)| Var::new(n, s, inputs[n].to_f64_vec()))
        .collect();
    let mut rest = inputs.clone();
    for v in &vars {
        rest.remove(&v.name);
    }
    fd_grad(g, loss, &vars, &rest, 1e-5).concat()
}

fn hyper(ms: &MetaStep, inputs: &Inputs) -> Vec<f64> {
    let ids: Vec<NodeId> = ms
        .lora
        .iter()
        .map(|(n, _)| ms.graph.output(&format!("hyper.{n}")).unwrap())
        .collect();
    eval(&ms.graph, inputs, &ids).concat()
}

/// Reverse mode straight through the unrolled graph.
fn reference_hyper(spec: &PipelineSpec, inputs: &Inputs) -> Vec<f64> {
    let opts = LowerOptions {
        differentiable_unroll: true,
        memory: None,
    };
    let mut ms = lower_meta_step_with(spec, shapes(spec), opts);
    let up = ms.graph.output("loss.up").unwrap();
    let by_name = ms.graph.inputs_by_name();
    let w: Vec<NodeId> = ms.lora.iter().map(|(n, _)| by_name[n]).collect();
    let gw = grad(&mut ms.graph, up, &w);
    eval(&ms.graph, inputs, &gw).concat()
}

fn with(mut spec: PipelineSpec, f: impl FnOnce(&mut PipelineSpec)) -> PipelineSpec {
    f(&mut spec);
    spec
}

/// [`meta_inputs`], with learning-rate multipliers of 0.6 (lower) and 0.3
/// (upper) where the meta-step takes them.
fn inputs_with_scales(spec: &PipelineSpec, ms: &MetaStep, seed: u64) -> Inputs {
    let mut inputs = meta_inputs(spec, ms, seed);
    for (name, s) in [("lr_scale.lower", 0.6), ("lr_scale.upper", 0.3)] {
        if inputs.contains_key(name) {
            inputs.insert(name.into(), f64_tensor(&[], &[s]));
        }
    }
    inputs
}

fn check_truncated_against_fd_and_reference(spec: &PipelineSpec, seed: u64, check_fd: bool) {
    let ms = lower_meta_step(spec, shapes(spec));
    let inputs = inputs_with_scales(spec, &ms, seed);
    let h = hyper(&ms, &inputs);
    assert!(norm(&h) > 1e-3, "degenerate test: hypergradient ~0");
    let reference = reference_hyper(spec, &inputs);
    let e = rel_err(&h, &reference, 1e-8);
    assert!(
        e < 1e-9,
        "adjoint recurrence vs reverse mode through the unroll: rel err {e:e}"
    );
    // Both memory plans compute the same hypergradient.
    for plan in [MemoryPlan::Keep, MemoryPlan::Recompute] {
        let opts = LowerOptions {
            differentiable_unroll: false,
            memory: Some(plan),
        };
        let forced = lower_meta_step_with(spec, shapes(spec), opts);
        let e = rel_err(&hyper(&forced, &inputs), &reference, 1e-8);
        assert!(e < 1e-9, "memory plan {plan:?}: rel err {e:e}");
    }
    if check_fd {
        let up = ms.graph.output("loss.up").unwrap();
        let fd = fd_wrt_w(&ms.graph, up, &ms, &inputs);
        let e = rel_err(&h, &fd, 1e-8);
        assert!(
            e < 1e-5,
            "truncated (T = K) vs finite differences of the unrolled meta-objective: rel err {e:e}"
        );
    }
}

#[test]
fn truncated_sgd_matches_finite_differences_of_the_unrolled_objective() {
    check_truncated_against_fd_and_reference(&tiny_spec(), 1, true);
}

#[test]
fn truncated_momentum_matches_finite_differences_of_the_unrolled_objective() {
    let spec = with(tiny_spec(), |s| {
        s.optim.lower = OptimSpec {
            kind: OptimKind::Momentum { momentum: 0.9 },
            lr: 0.3,
            ..s.optim.lower
        };
    });
    check_truncated_against_fd_and_reference(&spec, 2, true);
}

#[test]
fn truncated_adamw_matches_reverse_mode_with_frozen_preconditioner() {
    let spec = with(tiny_spec(), |s| {
        s.optim.lower = OptimSpec {
            kind: OptimKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            lr: 0.01,
            ..s.optim.lower
        };
    });
    // Finite differences would also move the preconditioner, which the
    // documented convention freezes; reverse mode with it frozen is the oracle.
    check_truncated_against_fd_and_reference(&spec, 3, false);
}

#[test]
fn truncated_with_kl_seq_mean_and_one_step_shadow_matches_finite_differences() {
    let spec = with(tiny_spec(), |s| {
        s.rl.kl_coef = 0.1;
        s.rl.loss_agg = LossAgg::SeqMean;
        s.bilevel.shadow = ShadowMode::OneStep;
        s.optim.lower.kind = OptimKind::Momentum { momentum: 0.5 };
    });
    check_truncated_against_fd_and_reference(&spec, 4, true);
}

/// The entropy bonus goes through the lower steps, the shadow and L_up:
/// its second derivatives (the `linear_entropy_grad` expansion) give the
/// finite differences of the unrolled objective, and the hypergradient is
/// not the one without it.
#[test]
fn truncated_with_an_entropy_bonus_matches_finite_differences() {
    let spec = with(tiny_spec(), |s| {
        s.rl.entropy_coef = 0.5;
        s.rl.loss_agg = LossAgg::SeqMean;
    });
    check_truncated_against_fd_and_reference(&spec, 5, true);
    let without = with(spec.clone(), |s| s.rl.entropy_coef = 0.0);
    let (ms, ms0) = (
        lower_meta_step(&spec, shapes(&spec)),
        lower_meta_step(&without, shapes(&without)),
    );
    let inputs = inputs_with_scales(&spec, &ms, 5);
    let e = rel_err(&hyper(&ms, &inputs), &hyper(&ms0, &inputs), 1e-8);
    assert!(
        e > 1e-3,
        "the bonus changes the hypergradient: rel diff {e:e}"
    );
}

/// Two epochs of two mini-batches per rollout batch: each of the K steps is
/// four updates on row slices of its batch (π_old the sampling policy's,
/// so later updates see ratios ≠ 1), and the truncated hypergradient
/// through all of them is the finite differences of the unrolled objective.
#[test]
fn truncated_through_several_updates_per_batch_matches_finite_differences() {
    let spec = with(tiny_spec(), |s| {
        s.rl.updates_per_batch = 2;
        s.rl.mini_batches = 2;
        // Eight updates at the tiny spec's 0.5 make a chaotic trajectory,
        // whose finite differences are noise.
        s.optim.lower.lr = 0.1;
    });
    assert_eq!(spec.rl.batch_size() % 2, 0);
    assert_eq!(spec.sft.batch_size % 2, 0);
    check_truncated_against_fd_and_reference(&spec, 6, true);
    let once = with(spec.clone(), |s| {
        s.rl.updates_per_batch = 1;
        s.rl.mini_batches = 1;
    });
    let (ms, ms1) = (
        lower_meta_step(&spec, shapes(&spec)),
        lower_meta_step(&once, shapes(&once)),
    );
    let inputs = inputs_with_scales(&spec, &ms, 6);
    let theta_k = |ms: &MetaStep| {
        let ids: Vec<NodeId> = outputs_with_prefix(&ms.graph, "theta_K.")
            .into_iter()
            .map(|p| p.1)
            .collect();
        eval(&ms.graph, &inputs, &ids).concat()
    };
    let e = rel_err(&theta_k(&ms), &theta_k(&ms1), 1e-8);
    assert!(
        e > 1e-3,
        "four updates per batch move θ elsewhere: rel diff {e:e}"
    );
}

fn adamw(weight_decay: f64) -> OptimKind {
    OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    }
}

/// Every output of the meta-step, by name.
fn all_outputs(ms: &MetaStep, inputs: &Inputs) -> Vec<(String, Vec<f64>)> {
    let outs: Vec<(String, NodeId)> = ms.graph.outputs().to_vec();
    let ids: Vec<NodeId> = outs.iter().map(|o| o.1).collect();
    outs.iter()
        .map(|o| o.0.clone())
        .zip(eval(&ms.graph, inputs, &ids))
        .collect()
}

/// A scheduled learning rate is an input of the meta-step; fed a multiplier
/// s, every output (θ_K, the next shadow, w and optimiser state, the
/// hypergradient through the truncated adjoint) equals that of the same
/// meta-step compiled with the constant rate s·lr — for SGD, momentum and
/// AdamW with weight decay at the lower level.
#[test]
fn a_scheduled_learning_rate_is_the_step_at_the_scaled_rate() {
    for (i, kind) in [
        OptimKind::Sgd,
        OptimKind::Momentum { momentum: 0.9 },
        adamw(0.1),
    ]
    .into_iter()
    .enumerate()
    {
        let lr = if matches!(kind, OptimKind::AdamW { .. }) {
            0.01
        } else {
            0.3
        };
        let scheduled = with(tiny_spec(), |s| {
            s.bilevel.shadow = ShadowMode::Persistent;
            s.optim.lower = OptimSpec {
                schedule: LrSchedule {
                    kind: ScheduleKind::Cosine,
                    warmup_steps: 1,
                },
                ..OptimSpec::new(kind, lr)
            };
            s.optim.upper = OptimSpec {
                schedule: LrSchedule {
                    kind: ScheduleKind::Linear,
                    warmup_steps: 0,
                },
                ..OptimSpec::new(adamw(0.01), 0.02)
            };
        });
        let constant = with(scheduled.clone(), |s| {
            s.optim.lower = OptimSpec::new(kind, lr * 0.6);
            s.optim.upper = OptimSpec::new(adamw(0.01), 0.02 * 0.3);
        });
        let ms = lower_meta_step(&scheduled, shapes(&scheduled));
        let inputs = inputs_with_scales(&scheduled, &ms, 10 + i as u64);
        assert!(inputs.contains_key("lr_scale.lower") && inputs.contains_key("lr_scale.upper"));
        let mc = lower_meta_step(&constant, shapes(&constant));
        let mut plain = inputs.clone();
        plain.remove("lr_scale.lower");
        plain.remove("lr_scale.upper");
        let a = all_outputs(&ms, &inputs);
        let b = all_outputs(&mc, &plain);
        assert_eq!(a.len(), b.len());
        for ((name, x), (name_b, y)) in a.iter().zip(&b) {
            assert_eq!(name, name_b);
            let e = rel_err(x, y, 1e-12);
            assert!(e < 1e-10, "{kind:?}: {name}: rel err {e:e}");
        }
        // And the adjoint agrees with reverse mode through the unroll.
        check_truncated_against_fd_and_reference(&scheduled, 20 + i as u64, false);
    }
}

/// Gradient clipping: the first lower step and the upper step take
/// `min(1, max / (‖g‖ + 1e-6)) g`, the norms are reported, and the
/// truncated hypergradient (clip coefficient held constant) agrees with
/// reverse mode through the unroll.
#[test]
fn clipped_steps_take_the_scaled_gradient() {
    let (lower_max, upper_max) = (0.05, 0.01);
    let spec = with(tiny_spec(), |s| {
        s.bilevel.hypergradient.unroll = 1;
        s.bilevel.hypergradient.backprop = 1;
        s.optim.lower.max_grad_norm = Some(lower_max);
        s.optim.upper.max_grad_norm = Some(upper_max);
    });
    let ms = lower_meta_step(&spec, shapes(&spec));
    let inputs = meta_inputs(&spec, &ms, 7);
    let out: std::collections::HashMap<String, Vec<f64>> =
        all_outputs(&ms, &inputs).into_iter().collect();
    // Each level: the gradient (`lower.*` / `hyper.*`), its reported norm,
    // and the step θ' = θ − lr·c·g from the inputs to the next values
    // (`theta_K.*` / `next.*`).
    let levels = [
        (
            &ms.theta,
            "lower.",
            "theta_K.",
            "grad_norm.lower",
            lower_max,
            spec.optim.lower.lr,
        ),
        (
            &ms.lora,
            "hyper.",
            "next.",
            "grad_norm.upper",
            upper_max,
            spec.optim.upper.lr,
        ),
    ];
    for (params, grad, next, norm_out, max, lr) in levels {
        let g: Vec<f64> = params
            .iter()
            .flat_map(|(n, _)| out[&format!("{grad}{n}")].clone())
            .collect();
        let gn = norm(&g);
        assert!((out[norm_out][0] - gn).abs() < 1e-12 * gn, "{norm_out}");
        assert!(gn > 10.0 * max, "degenerate: {norm_out} does not clip");
        let c = max / (gn + 1e-6);
        for (n, _) in params {
            let (p0, p1, gr) = (
                inputs[n].to_f64_vec(),
                &out[&format!("{next}{n}")],
                &out[&format!("{grad}{n}")],
            );
            for ((a, b), d) in p0.iter().zip(p1).zip(gr) {
                assert!(
                    (a - lr * c * d - b).abs() < 1e-12,
                    "{n}: {a} - {lr}·{c}·{d} vs {b}"
                );
            }
        }
    }
    // Two steps, momentum, truncated through both: the adjoint with the
    // clip coefficients held constant is reverse mode through the unroll
    // with them behind a stop_gradient.
    let two = with(tiny_spec(), |s| {
        s.optim.lower = OptimSpec {
            max_grad_norm: Some(lower_max),
            ..OptimSpec::new(OptimKind::Momentum { momentum: 0.9 }, 0.3)
        };
    });
    check_truncated_against_fd_and_reference(&two, 8, false);
}

#[test]
fn first_order_is_the_partial_derivative_with_iterates_fixed() {
    let spec = with(tiny_spec(), |s| {
        s.bilevel.hypergradient = HypergradSpec {
            kind: HypergradKind::FirstOrder,
            unroll: 2,
            backprop: 0,
        };
    });
    let ms = lower_meta_step(&spec, shapes(&spec));
    let inputs = meta_inputs(&spec, &ms, 5);
    let h = hyper(&ms, &inputs);
    // θ_K and θ̂_K from the meta-step, then L_up as a function of w alone.
    let theta_k = outputs_with_prefix(&ms.graph, "theta_K.");
    let shadow_k = outputs_with_prefix(&ms.graph, "next.shadow.");
    let tk = eval(
        &ms.graph,
        &inputs,
        &theta_k.iter().map(|x| x.1).collect::<Vec<_>>(),
    );
    let sk = eval(
        &ms.graph,
        &inputs,
        &shadow_k.iter().map(|x| x.1).collect::<Vec<_>>(),
    );
    let mut g = Graph::new();
    let mut up_inputs = inputs.clone();
    let mut theta = Params::new();
    let mut shadow = Params::new();
    for (((name, _), v), (sname, _)) in theta_k.iter().zip(&tk).zip(&shadow_k) {
        let shape = ms.theta.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let a = g.input(format!("tk.{name}"), DType::F64, shape.clone());
        let b = g.input(format!("sk.{sname}"), DType::F64, shape.clone());
        up_inputs.insert(format!("tk.{name}"), f64_tensor(&shape, v));
        theta.insert(name.clone(), a);
        shadow.insert(sname.clone(), b);
    }
    for ((sname, _), v) in shadow_k.iter().zip(&sk) {
        let shape = ms.theta.iter().find(|(n, _)| n == sname).unwrap().1.clone();
        up_inputs.insert(format!("sk.{sname}"), f64_tensor(&shape, v));
    }
    let w: Params = ms
        .lora
        .iter()
        .map(|(n, s)| (n.clone(), g.input(n.clone(), DType::F64, s.clone())))
        .collect();
    let dec = Decoder {
        model: &spec.model,
        lora: &spec.lora,
        dtype: DType::F64,
    };
    let last = spec.bilevel.hypergradient.unroll - 1;
    let p = format!("step{last}.");
    let (bs, br, t) = (2, 2, 6);
    let sft_ids = g.input(format!("{p}sft.input_ids"), DType::I32, vec![bs, t]);
    let sft_mask = g.input(format!("{p}sft.loss_mask"), DType::F64, vec![bs, t]);
    let batch = RlBatch {
        input_ids: g.input(format!("{p}rl.input_ids"), DType::I32, vec![br, t]),
        loss_mask: g.input(format!("{p}rl.loss_mask"), DType::F64, vec![br, t]),
        advantages: g.input(format!("{p}rl.advantages"), DType::F64, vec![br]),
        old_logprobs: g.input(format!("{p}rl.old_logprobs"), DType::F64, vec![br, t]),
        ref_logprobs: None,
    };
    let lam = 0.4;
    let lp_sft = dec.token_logprobs(&mut g, &theta, &w, sft_ids);
    let l_sft = sft_loss(&mut g, lp_sft, sft_mask);
    let lp_rl = dec.token_logprobs(&mut g, &theta, &w, batch.input_ids);
    let l_rl = grpo_loss(&mut g, &spec.rl, lp_rl, &batch);
    let lp_sh = dec.token_logprobs(&mut g, &shadow, &w, batch.input_ids);
    let l_sh = grpo_loss(&mut g, &spec.rl, lp_sh, &batch);
    let a = g.scale(l_sft, 1.0 - lam);
    let gain = g.sub(l_rl, l_sh);
    let b = g.scale(gain, lam);
    let up = g.add(a, b);
    // The same L_up value as the meta-step reports.
    let up_val = eval(&g, &up_inputs, &[up])[0][0];
    let ms_up = eval(&ms.graph, &inputs, &[ms.graph.output("loss.up").unwrap()])[0][0];
    assert!((up_val - ms_up).abs() < 1e-12, "{up_val} vs {ms_up}");
    let fd = fd_wrt_w(&g, up, &ms, &up_inputs);
    let e = rel_err(&h, &fd, 1e-8);
    assert!(
        norm(&h) > 1e-3 && e < 1e-6,
        "first_order vs ∂L_up/∂w: rel err {e:e}"
    );
}

#[test]
fn finite_difference_agrees_with_truncated_one_step() {
    for (opt, seed) in [
        (OptimKind::Sgd, 6),
        (OptimKind::Momentum { momentum: 0.9 }, 7),
    ] {
        let base = with(tiny_spec(), |s| s.optim.lower.kind = opt);
        let trunc = with(base.clone(), |s| {
            s.bilevel.hypergradient = HypergradSpec {
                kind: HypergradKind::Truncated,
                unroll: 2,
                backprop: 1,
            };
        });
        let fdspec = with(base, |s| {
            s.bilevel.hypergradient = HypergradSpec {
                kind: HypergradKind::FiniteDifference { eps: 1e-3 },
                unroll: 2,
                backprop: 1,
            };
        });
        let ms_t = lower_meta_step(&trunc, shapes(&trunc));
        let ms_f = lower_meta_step(&fdspec, shapes(&fdspec));
        let inputs = meta_inputs(&trunc, &ms_t, seed);
        let ht = hyper(&ms_t, &inputs);
        let hf = hyper(&ms_f, &inputs);
        let e = rel_err(&hf, &ht, 1e-8);
        assert!(
            e < 1e-3,
            "finite_difference vs truncated (T = 1): rel err {e:e}"
        );
        // And truncation matters: T = 1 differs from first order.
        let fo = with(trunc.clone(), |s| {
            s.bilevel.hypergradient.kind = HypergradKind::FirstOrder
        });
        let ms_o = lower_meta_step(&fo, shapes(&fo));
        let ho = hyper(&ms_o, &inputs);
        assert!(
            rel_err(&ho, &ht, 1e-8) > 1e-3,
            "T = 1 should differ from first order"
        );
    }
}

/// A memory budget the kept activations fit makes the compiler keep them
/// (no recomputation in the adjoint sweep); one they do not fit leaves the
/// smaller-peak choice, here recomputation.
#[test]
fn a_memory_budget_that_fits_keeps_the_activations() {
    use coopc_compiler::schedule::schedule;
    let spec = tiny_spec();
    let forced = |plan| {
        let opts = LowerOptions {
            differentiable_unroll: false,
            memory: Some(plan),
        };
        let g = lower_meta_step_with(&spec, shapes(&spec), opts).graph;
        (g.node_count(), schedule(&g).peak_bytes as u64)
    };
    let (keep_nodes, keep_peak) = forced(MemoryPlan::Keep);
    let (re_nodes, re_peak) = forced(MemoryPlan::Recompute);
    assert!(
        re_peak < keep_peak && re_nodes > keep_nodes,
        "the tiny spec recomputes without a budget"
    );
    let plan_with = |budget: Option<u64>| {
        let s = with(tiny_spec(), |s| s.backend.memory_budget = budget);
        let ms = lower_meta_step(&s, shapes(&s));
        let note = ms
            .notes
            .iter()
            .find(|n| n.starts_with("memory plan"))
            .cloned();
        (ms.graph.node_count(), note.expect("the plan is noted"))
    };
    let (n, note) = plan_with(None);
    assert_eq!(n, re_nodes, "{note}");
    // The note gives each plan's arithmetic (recomputing costs more) and
    // the smallest budget, in hundredths of a GiB, that keeps.
    let flops: Vec<f64> = note
        .split("FLOP")
        .filter_map(|part| {
            let mut words = part.rsplit(' ');
            let scale = match words.next()? {
                "k" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "T" => 1e12,
                _ => return None,
            };
            Some(words.next()?.parse::<f64>().ok()? * scale)
        })
        .collect();
    assert!(
        flops.len() == 2 && flops[1] > flops[0] && flops[0] > 0.0,
        "{note}"
    );
    let hint: f64 = note
        .split("memory_budget_gib = ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no budget hint in: {note}"));
    let bytes = |gib: f64| (gib * (1u64 << 30) as f64) as u64;
    assert_eq!(plan_with(Some(bytes(hint))).0, keep_nodes, "{hint} GiB");
    assert_eq!(
        plan_with(Some(bytes(hint - 0.01))).0,
        re_nodes,
        "{hint} GiB"
    );
    let (n, note) = plan_with(Some(keep_peak));
    assert_eq!(n, keep_nodes, "{note}");
    assert!(note.contains("within the budget"), "{note}");
    let (n, note) = plan_with(Some(keep_peak - 1));
    assert_eq!(n, re_nodes, "{note}");
}
