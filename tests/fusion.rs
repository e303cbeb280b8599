//! The fusion pass: a fused schedule, interpreted kernel by kernel on the
//! host (and run by the CPU executor on its fused kernels, bit for bit),
//! computes what the CPU executor computes — on hand-built patterns
//! and on whole meta-step graphs (autodiff and the bilevel lowering,
//! second-order ones included) — and it does fuse.

mod common;

use common::*;
use coopc_compiler::fusion::{fuse, ElemInstr, FusedSchedule, Kernel};
use coopc_compiler::ir::{DType, Graph, Op, ReduceKind};
use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
use coopc_compiler::passes::Pipeline;
use coopc_compiler::schedule::schedule;
use coopc_compiler::spec::{HypergradKind, OptimKind, PipelineSpec};
use coopc_runtime::execute;
use coopc_runtime::fused::execute_fused_host;
use coopc_runtime::fused_cpu::FusedPlan;

/// Fuses `g`, runs the kernels on the host and compares every output with
/// the CPU executor. Returns the fused schedule.
fn check_fused_equals_executor(g: &Graph, inputs: &Inputs, tol: f64) -> FusedSchedule {
    let sched = schedule(g);
    let fused = fuse(g, &sched.order);
    // Every scheduled node is written by exactly one kernel or folded into one.
    let written: usize = fused.kernels.iter().map(|k| k.writes().len()).sum();
    assert!(written <= sched.order.len());
    let host = execute_fused_host(g, &fused, inputs).expect("fused schedule runs");
    let want = execute(g, inputs).expect("executor runs");
    // The CPU executor on the same kernels: the node executor's values, bit
    // for bit. It declines (and runs node by node) only a schedule with a
    // hand-written kernel standing for a matched subgraph.
    match FusedPlan::for_schedule(g, &fused) {
        Ok(plan) => {
            let cpu = plan.run(inputs).expect("fused CPU run");
            for ((name, got), (_, w)) in cpu.iter().zip(&want) {
                assert_eq!(
                    got.data, w.data,
                    "output {name}: the fused CPU executor differs"
                );
            }
        }
        Err(e) => assert!(e.contains("matched subgraph"), "fused CPU executor: {e}"),
    }
    for ((name, id), (_, w)) in g.outputs().iter().zip(&want) {
        let got = host
            .get(id)
            .unwrap_or_else(|| panic!("output {name} (%{}) is never written", id.index()));
        let e = rel_err(got, &w.to_f64_vec(), 1e-12);
        assert!(e <= tol, "output {name}: relative error {e:e}");
    }
    fused
}

#[test]
fn log_sum_exp_becomes_two_reductions_with_prologue_and_epilogue() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![5, 9]);
    let lse = log_sum_exp(&mut g, x, 1);
    g.set_output("lse", lse);
    let mut r = rng(1);
    let inputs = Inputs::from([(
        "x".to_string(),
        f64_tensor(&[5, 9], &uniform(&mut r, 45, -3.0, 3.0)),
    )]);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
    assert_eq!(fused.count(), (0, 2, 1), "{fused}"); // the input node, two reductions
    let Kernel::Reduce {
        prologue, epilogue, ..
    } = &fused.kernels[2]
    else {
        panic!("last kernel is the sum: {:?}", fused.kernels[2]);
    };
    // broadcast load of m, load of x, sub, exp
    assert_eq!(prologue.instrs.len(), 4, "{prologue:?}");
    assert!(matches!(
        prologue.instrs[prologue.outputs[0] as usize],
        ElemInstr::Unary(..)
    ));
    // the sum, load of m, log, add
    assert_eq!(epilogue.instrs.len(), 4, "{epilogue:?}");
}

#[test]
fn a_value_used_twice_is_written_once_and_not_recomputed_in_a_prologue() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![3, 4]);
    let e = g.exp(x);
    let s = g.reduce(ReduceKind::Sum, e, &[0, 1], false);
    let t = g.tanh(e);
    g.set_output("s", s);
    g.set_output("t", t);
    let mut r = rng(2);
    let inputs = Inputs::from([(
        "x".to_string(),
        f64_tensor(&[3, 4], &uniform(&mut r, 12, -1.0, 1.0)),
    )]);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
    let writers: Vec<&Kernel> = fused
        .kernels
        .iter()
        .filter(|k| k.writes().contains(&e))
        .collect();
    assert_eq!(writers.len(), 1, "exp is written by one kernel: {fused:?}");
    for k in &fused.kernels {
        if let Kernel::Reduce { prologue, .. } = k {
            assert_eq!(
                prologue.instrs.len(),
                1,
                "the sum reads exp, not recomputes it"
            );
        }
    }
}

#[test]
fn graph_outputs_inside_a_group_are_written() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![6]);
    let a = g.sigmoid(x);
    let b = g.mul(a, x);
    let c = g.clamp(b, -0.2, 0.3);
    g.set_output("a", a);
    g.set_output("c", c);
    let mut r = rng(3);
    let inputs = Inputs::from([(
        "x".to_string(),
        f64_tensor(&[6], &uniform(&mut r, 6, -2.0, 2.0)),
    )]);
    let fused = check_fused_equals_executor(&g, &inputs, 0.0);
    assert_eq!(fused.count(), (1, 0, 1));
}

fn meta_step_fuses_correctly(spec: &PipelineSpec, seed: u64) {
    let ms = lower_meta_step(spec, BatchShapes::from_spec(spec));
    let inputs = meta_inputs(spec, &ms, seed);
    let mut g = ms.graph.clone();
    Pipeline::standard().run(&mut g);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-9);
    let nodes = schedule(&g).order.len();
    let inputs_n = g
        .node_ids()
        .filter(|&id| matches!(g.op(id), Op::Input { .. }))
        .count();
    // Fusion removes a good share of the launches.
    assert!(
        fused.kernels.len() < (nodes - inputs_n) * 3 / 4 + inputs_n,
        "{fused} from {nodes} nodes"
    );
}

#[test]
fn truncated_meta_step_with_second_order_terms_fuses_correctly() {
    meta_step_fuses_correctly(&tiny_spec(), 11);
}

#[test]
fn first_order_adamw_meta_step_fuses_correctly() {
    let mut spec = tiny_spec();
    spec.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
    spec.bilevel.hypergradient.unroll = 1;
    spec.bilevel.hypergradient.backprop = 0;
    spec.optim.lower.kind = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    meta_step_fuses_correctly(&spec, 12);
}

/// The device footprint model: inputs held throughout, outputs allocated
/// per kernel and freed after their last reader, reshapes sharing their
/// operand's buffer.
#[test]
fn device_peak_follows_kernel_liveness() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![4, 8]); // 128 B
    let b = g.input("b", DType::F32, vec![8, 2]); // 64 B
    let y = g.matmul(a, b); // 32 B
    let z = g.exp(y); // 32 B, y freed after
    let r = g.reshape(z, vec![4, 2]); // shares z's buffer
    let p = g.permute(r, &[1, 0]); // 32 B, z freed after
    let w = g.matmul(p, a); // 64 B, p freed after
    g.set_output("w", w);
    let fused = fuse(&g, &schedule(&g).order);
    // The most at once: both inputs, p and w (or y and z before).
    assert_eq!(fused.device_peak_bytes(&g), 128 + 64 + 32 + 64);
    // An output stays live while later kernels run.
    let mut g2 = g.clone();
    let w2 = g2.exp(w);
    g2.set_output("w2", w2);
    let fused2 = fuse(&g2, &schedule(&g2).order);
    assert_eq!(fused2.device_peak_bytes(&g2), 128 + 64 + 64 + 64);
}

/// The attention gradients' launches use scratch buffers besides their
/// outputs (the log-sum-exp, the rows' delta, the gradients no node asked
/// for), which count while they run.
#[test]
fn device_peak_counts_the_scratch_of_gradient_kernels() {
    use coopc_compiler::ir::AttentionOperand;
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![1, 2, 8, 4]); // 256 B, 16 rows
    let kv = g.input("kv", DType::F32, vec![1, 1, 8, 4]); // 128 B
    let d_o = g.input("do", DType::F32, vec![1, 2, 8, 4]); // 256 B
    let o = g.causal_attention(q, kv, kv); // 256 B, scratch: lse 64 B
    let dk = g.causal_attention_grad(AttentionOperand::K, [q, kv, kv, o], d_o); // 128 B
    g.set_output("dk", dk);
    let fused = fuse(&g, &schedule(&g).order);
    let inputs = 256 + 128 + 256;
    // At the gradient: o and dk, and the scratch: lse (the log-sum-exp
    // pass writes no output), delta, dq and the unasked dv.
    let scratch = 64 + 64 + 256 + 128;
    assert_eq!(fused.device_peak_bytes(&g), inputs + 256 + 128 + scratch);
}

/// A broadcast read by several kernels is never written out: each reader's
/// program loads its source through the broadcast's index map.
#[test]
fn broadcasts_are_recomputed_by_their_readers() {
    let mut g = Graph::new();
    let mut inputs = Inputs::new();
    let mut r = rng(9);
    let mut input = |g: &mut Graph, name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        inputs.insert(
            name.to_string(),
            coopc_runtime::HostTensor::from_f64(
                DType::F32,
                shape.clone(),
                &uniform(&mut r, n, -1.0, 1.0),
            )
            .unwrap(),
        );
        g.input(name, DType::F32, shape)
    };
    let x = input(&mut g, "x", vec![4, 1]);
    let a = input(&mut g, "a", vec![4, 3]);
    let w = input(&mut g, "w", vec![3, 8]);
    let b = g.broadcast(x, vec![4, 8]);
    let e = g.exp(b);
    let s = g.reduce(ReduceKind::Sum, b, &[1], false);
    let q = g.matmul(a, w);
    let y = g.add(b, q);
    g.set_output("e", e);
    g.set_output("s", s);
    g.set_output("y", y);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-6);
    assert!(
        fused.kernels.iter().all(|k| !k.writes().contains(&b)),
        "{:?}",
        fused.kernels
    );
}

/// The GRPO loss (ratio, clip, min, k3 KL, masked token mean) is one
/// `token_loss` kernel and its gradient with respect to the log-probs one
/// `token_loss_grad` kernel; the per-token terms are never a buffer.
#[test]
fn grpo_loss_and_its_gradient_are_one_kernel_each() {
    use coopc_compiler::autodiff::grad;
    use coopc_compiler::losses::{grpo_loss, RlBatch};
    let (b, t) = (4, 24);
    let mut rl = tiny_spec().rl;
    rl.kl_coef = 0.05;
    let mut g = Graph::new();
    let mut inputs = Inputs::new();
    let mut r = rng(12);
    let mut input = |g: &mut Graph, name: &str, shape: Vec<usize>, lo: f64, hi: f64| {
        let n = shape.iter().product();
        let mut v = uniform(&mut r, n, lo, hi);
        if name == "mask" {
            v.iter_mut()
                .for_each(|x| *x = if *x > 0.3 { 1.0 } else { 0.0 });
        }
        inputs.insert(
            name.to_string(),
            coopc_runtime::HostTensor::from_f64(DType::F64, shape.clone(), &v).unwrap(),
        );
        g.input(name, DType::F64, shape)
    };
    let logp = input(&mut g, "logp", vec![b, t], -3.0, -0.1);
    let batch = RlBatch {
        input_ids: logp, // unused by the loss
        loss_mask: input(&mut g, "mask", vec![b, t], 0.0, 1.0),
        advantages: input(&mut g, "adv", vec![b], -1.0, 1.0),
        old_logprobs: input(&mut g, "old", vec![b, t], -3.0, -0.1),
        ref_logprobs: Some(input(&mut g, "ref", vec![b, t], -3.0, -0.1)),
    };
    let loss = grpo_loss(&mut g, &rl, logp, &batch);
    let dlogp = grad(&mut g, loss, &[logp])[0];
    g.set_output("loss", loss);
    g.set_output("dlogp", dlogp);
    Pipeline::standard().run(&mut g);
    let nodes = schedule(&g).order.len();
    let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
    // Inputs and relabelings launch nothing.
    let launches = fused
        .kernels
        .iter()
        .filter(|k| match k {
            Kernel::Node(id) => !matches!(
                g.op(*id),
                Op::Input { .. } | Op::Reshape { .. } | Op::StopGradient
            ),
            _ => true,
        })
        .count();
    let ops: Vec<&str> = fused
        .kernels
        .iter()
        .filter_map(|k| match k {
            Kernel::Node(id) => Some(g.op(*id).name()),
            _ => None,
        })
        .collect();
    assert!(
        ops.contains(&"token_loss") && ops.contains(&"token_loss_grad"),
        "{ops:?}"
    );
    // The loss, its gradient and at most the gradient's seed.
    assert!(
        launches <= 3,
        "{nodes} nodes became {launches} kernels: {:?}",
        fused.kernels
    );
}

/// The log-prob scorer never materialises its logits or attention scores:
/// matmul → slice → log-softmax → take-along-axis becomes one fused linear
/// log-prob kernel and each causal attention the attention kernel, equal
/// to the executor's result; no kernel writes a vocabulary-wide or
/// `[T, T]` buffer.
#[test]
fn scorer_logits_and_attention_become_fused_kernels() {
    use coopc_compiler::lowering::lower_logprobs;
    let spec = tiny_spec();
    let shapes = BatchShapes::from_spec(&spec);
    let ms = lower_meta_step(&spec, shapes);
    let mut inputs = meta_inputs(&spec, &ms, 21);
    let ids = inputs["step0.rl.input_ids"].clone();
    inputs.insert("input_ids".into(), ids);
    let mut g = lower_logprobs(&spec, shapes);
    Pipeline::standard().run(&mut g);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-9);
    let fused_lp = fused
        .kernels
        .iter()
        .filter(|k| matches!(k, Kernel::LinearLogprob { .. }))
        .count();
    assert_eq!(fused_lp, 1, "{fused}");
    // Each layer's attention is the attention kernel, reading the key and
    // value heads unexpanded (grouped-query: 2 query heads over 1).
    let attention: Vec<usize> = fused
        .kernels
        .iter()
        .filter_map(|k| match k {
            Kernel::Attention { kv_heads, .. } => Some(*kv_heads),
            _ => None,
        })
        .collect();
    assert_eq!(attention, vec![spec.model.n_kv_heads; spec.model.n_layers]);
    // No kernel writes vocabulary-wide logits or [T, T] scores.
    let (vocab, t) = (spec.model.vocab_size, shapes.seq_len);
    for k in &fused.kernels {
        for id in k.writes() {
            let ty = g.ty(id);
            let wide = ty.shape.last() == Some(&vocab) || ty.shape.ends_with(&[t, t]);
            assert!(
                !wide || matches!(g.op(id), Op::Input { .. }),
                "{k:?} writes {ty}"
            );
        }
    }
}

/// A fused linear log-prob whose hidden states are a transpose that only
/// the absorbed logits product read: the transpose is computed for the
/// kernel, not folded away.
#[test]
fn a_transposed_input_of_a_fused_linear_logprob_is_computed() {
    let (n, d, v) = (5, 4, 7);
    let mut g = Graph::new();
    let mut r = rng(33);
    let xt = g.input("xt", DType::F64, vec![d, n]);
    let w = g.input("w", DType::F64, vec![v, d]);
    let y = g.input("y", DType::I32, vec![n, 1]);
    let h = g.transpose(xt);
    let wt = g.transpose(w);
    let logits = g.matmul(h, wt);
    let ls = g.log_softmax(logits);
    let lp = g.take_along_axis(ls, y, 1);
    g.set_output("lp", lp);
    let inputs = Inputs::from([
        (
            "xt".to_string(),
            f64_tensor(&[d, n], &uniform(&mut r, d * n, -1.0, 1.0)),
        ),
        (
            "w".to_string(),
            f64_tensor(&[v, d], &uniform(&mut r, v * d, -1.0, 1.0)),
        ),
        (
            "y".to_string(),
            coopc_runtime::HostTensor::i32(vec![n, 1], vec![0, 6, 3, 3, 1]),
        ),
    ]);
    let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
    assert!(fused
        .kernels
        .iter()
        .any(|k| matches!(k, Kernel::LinearLogprob { h: hh, .. } if *hh == h)));
}

/// The meta-step holds the activations of one loss term at a time: each
/// term's forward pass (SFT batch, RL batch) is differentiated — to second
/// order in the adjoint sweep — before the next term's forward pass runs,
/// and attention keeps no `[T, T]` value outside the second-order products.
#[test]
fn loss_terms_are_differentiated_one_at_a_time() {
    use coopc_compiler::lowering::{lower_meta_step_with, LowerOptions, MemoryPlan};
    use std::collections::HashSet;
    let mut spec = tiny_spec();
    // SFT batch 3, RL batch 2: an activation's leading axis names its term.
    spec.sft.batch_size = 3;
    // …and no parameter has 2·T or 3·T rows.
    spec.model.d_ff = 16;
    let t = spec.train.seq_len;
    let heads = spec.model.n_heads;
    let opts = LowerOptions {
        memory: Some(MemoryPlan::Recompute),
        ..Default::default()
    };
    let ms = lower_meta_step_with(&spec, BatchShapes::from_spec(&spec), opts);
    let g = &ms.graph;
    let order = schedule(g).order;
    let params: HashSet<String> = ms
        .theta
        .iter()
        .chain(&ms.lora)
        .flat_map(|(n, _)| [n.clone(), format!("shadow.{n}")])
        .collect();
    // Nodes computed from the parameters, in schedule order.
    let mut from_params = HashSet::new();
    for &id in &order {
        let param = matches!(g.op(id), Op::Input { name, .. } if params.contains(name));
        if param || g.inputs(id).iter().any(|i| from_params.contains(i)) {
            from_params.insert(id);
        }
    }
    let term_of = |id| {
        let s = &g.ty(id).shape;
        if !from_params.contains(&id) || s.len() < 2 || matches!(g.op(id), Op::Input { .. }) {
            return None;
        }
        let per_sequence = [t, t - 1, heads].contains(&s[1]);
        match s[0] {
            3 if per_sequence => Some(0),
            n if n == 3 * t => Some(0),
            2 if per_sequence => Some(1),
            n if n == 2 * t => Some(1),
            _ => None,
        }
    };
    let pos: std::collections::HashMap<_, _> =
        order.iter().enumerate().map(|(p, &id)| (id, p)).collect();
    // Live activations of each term after each step.
    let mut live = vec![[0i64; 2]; order.len() + 1];
    for &id in &order {
        let Some(term) = term_of(id) else { continue };
        let last = g.users(id).iter().filter_map(|u| pos.get(u)).max().copied();
        let last = last.unwrap_or(order.len());
        live[pos[&id]][term] += 1;
        live[last][term] -= 1;
    }
    let mut now = [0i64; 2];
    let mut seen = [false; 2];
    for (p, d) in live.iter().enumerate() {
        now = [now[0] + d[0], now[1] + d[1]];
        seen = [seen[0] || now[0] > 0, seen[1] || now[1] > 0];
        assert!(
            now[0] == 0 || now[1] == 0,
            "step {p} of {}: SFT and RL activations live at once",
            order.len()
        );
    }
    assert_eq!(seen, [true, true], "activations of both terms were found");
    // No [T, T] value outside the second-order products (which recompute
    // one layer's probabilities as the adjoint sweep reaches it).
    let first_order = {
        let mut s = spec.clone();
        s.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
        lower_meta_step(&s, BatchShapes::from_spec(&s)).graph
    };
    let square = first_order
        .node_ids()
        .filter(|&id| first_order.ty(id).shape.ends_with(&[t, t]))
        .count();
    assert_eq!(square, 0, "a first-order meta-step stores no [T, T] value");
}

/// An optimiser step is one hand-written kernel that computes the gradient
/// from its producers (a fused prologue) and writes every value asked for;
/// it writes the gradient too when something else reads it.
#[test]
fn optimiser_step_fuses_the_gradient_as_its_prologue() {
    use coopc_compiler::ir::{StepOut, StepRule};
    let rule = StepRule::AdamW {
        lr: 1e-2.into(),
        beta1: 0.9.into(),
        beta2: 0.999.into(),
        eps: 1e-8.into(),
        weight_decay: 0.1.into(),
    };
    let shape = vec![4, 6];
    let mut r = rng(40);
    for grad_is_output in [false, true] {
        let mut g = Graph::new();
        let mut inputs = Inputs::new();
        let mut input = |g: &mut Graph, name: &str, shape: Vec<usize>, lo, hi| {
            let n = shape.iter().product();
            inputs.insert(name.into(), f64_tensor(&shape, &uniform(&mut r, n, lo, hi)));
            g.input(name, DType::F64, shape)
        };
        let p = input(&mut g, "p", shape.clone(), -1.0, 1.0);
        let ga = input(&mut g, "ga", shape.clone(), -1.0, 1.0);
        let gb = input(&mut g, "gb", shape.clone(), -1.0, 1.0);
        let m = input(&mut g, "m", shape.clone(), -0.3, 0.3);
        let v = input(&mut g, "v", shape.clone(), 0.01, 0.2);
        let t = input(&mut g, "t", vec![], 1.0, 5.0);
        // (1 − λ) g_a + λ g_b with λ a run-time scalar.
        let lam = input(&mut g, "lambda", vec![], 0.0, 1.0);
        let one = g.full(1.0, DType::F64, vec![]);
        let keep = g.sub(one, lam);
        let kb = g.broadcast(keep, shape.clone());
        let lb = g.broadcast(lam, shape.clone());
        let a = g.mul(ga, kb);
        let b = g.mul(gb, lb);
        let grad = g.add(a, b);
        if grad_is_output {
            g.set_output("grad", grad);
        }
        let outs = g.optim_steps(rule, &[p, grad, m, v, t]);
        // D is not read: not computed.
        for (&o, id) in rule.outputs().iter().zip(&outs[..3]) {
            g.set_output(o.name(), *id);
        }
        let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
        let steps: Vec<&Kernel> = fused
            .kernels
            .iter()
            .filter(|k| matches!(k, Kernel::OptimStep { .. }))
            .collect();
        assert_eq!(
            steps.len(),
            1,
            "one kernel for the step: {:?}",
            fused.kernels
        );
        let Kernel::OptimStep {
            prologue_inputs,
            outputs,
            gradient,
            ..
        } = steps[0]
        else {
            unreachable!()
        };
        // g_a, g_b and the scalars λ, 1 − λ (read through broadcasts).
        assert!(
            prologue_inputs.contains(&ga)
                && prologue_inputs.contains(&gb)
                && prologue_inputs.contains(&lam)
                && !prologue_inputs.contains(&grad),
            "the gradient's producers are read, not the gradient: {prologue_inputs:?}"
        );
        let asked: Vec<StepOut> = outputs.iter().map(|o| o.0).collect();
        assert_eq!(asked, [StepOut::Param, StepOut::ExpAvg, StepOut::ExpAvgSq]);
        assert_eq!(*gradient, grad_is_output.then_some(grad));
        assert!(
            !fused
                .kernels
                .iter()
                .any(|k| matches!(k, Kernel::Elementwise { numel: 24, .. })),
            "no kernel of its own for the gradient: {:?}",
            fused.kernels
        );
    }
}

/// A gradient that comes out of a product transposed (as a LoRA factor's
/// does) is read by the step kernel through permuted strides: no copy
/// kernel runs for the transpose, which the step writes when it is an
/// output.
#[test]
fn a_transposed_gradient_is_read_by_the_step_through_strides() {
    use coopc_compiler::ir::StepRule;
    let rule = StepRule::Momentum {
        lr: 0.1.into(),
        mu: 0.9.into(),
    };
    let mut r = rng(41);
    for grad_is_output in [false, true] {
        let mut g = Graph::new();
        let mut inputs = Inputs::new();
        let mut input = |g: &mut Graph, name: &str, shape: Vec<usize>| {
            let n = shape.iter().product();
            inputs.insert(
                name.into(),
                f64_tensor(&shape, &uniform(&mut r, n, -1.0, 1.0)),
            );
            g.input(name, DType::F64, shape)
        };
        let p = input(&mut g, "p", vec![3, 5]);
        let b = input(&mut g, "b", vec![3, 5]);
        let x = input(&mut g, "x", vec![4, 5]);
        let dy = input(&mut g, "dy", vec![4, 3]);
        // (xᵀ dy)ᵀ: [5, 3] transposed to p's [3, 5].
        let xt = g.transpose(x);
        let prod = g.matmul(xt, dy);
        let grad = g.transpose(prod);
        if grad_is_output {
            g.set_output("grad", grad);
        }
        for (o, id) in rule
            .outputs()
            .iter()
            .zip(g.optim_steps(rule, &[p, grad, b]))
        {
            g.set_output(o.name(), id);
        }
        let fused = check_fused_equals_executor(&g, &inputs, 1e-12);
        assert!(
            !fused
                .kernels
                .iter()
                .any(|k| matches!(k, Kernel::Node(id) if *id == grad)),
            "no kernel of its own for the transpose: {:?}",
            fused.kernels
        );
        let Some(Kernel::OptimStep {
            prologue_inputs,
            gradient,
            ..
        }) = fused
            .kernels
            .iter()
            .find(|k| matches!(k, Kernel::OptimStep { .. }))
        else {
            panic!("a step kernel: {:?}", fused.kernels)
        };
        assert_eq!(prologue_inputs, &[prod], "reads the product");
        assert_eq!(*gradient, grad_is_output.then_some(grad));
    }
}
