//! Snapshots of the generated kernel source (CUDA C++ and WGSL, produced
//! without a device) for each kernel family: an elementwise program with a
//! broadcast load, a reduction with fused prologue and epilogue (the
//! log-sum-exp of a log-softmax, per unit and with one cube per long row),
//! the tiled and the register-blocked matrix products, a strided copy, and
//! the hand-written kernels: the fused linear log-prob, causal attention
//! (forward and backward) and the decode step's attention over its cache,
//! the rotary embedding (and its transpose), the policy losses (GRPO's
//! and its gradient, SFT's),
//! RMSNorm (forward, `dx`, `dw`), the optimiser steps (AdamW with its
//! gradient fused in, momentum, SGD) and the top-p token sampler.
//! A change to code generation shows up as a reviewable diff.

mod common;

use common::log_sum_exp;
use coopc_compiler::fusion::{fuse, Kernel};
use coopc_compiler::ir::{DType, Graph};
use coopc_compiler::schedule::schedule;
use coopc_kernels::matmul::Product;
use coopc_kernels::source::{schedule_sources, AttentionPart, KernelSource, NormPart, Traced};

fn sources(g: &Graph) -> (Vec<Kernel>, Vec<KernelSource>) {
    let fused = fuse(g, &schedule(g).order);
    let src = schedule_sources(g, &fused).expect("kernels compile to CUDA and WGSL");
    (fused.kernels, src.into_iter().map(|(s, _)| s).collect())
}

/// The generators declare mutable locals and shared arrays in hash order:
/// sort each run of consecutive declarations so the snapshot is stable.
fn stable(src: &str) -> String {
    // `float *shared_memory_3 = …`, `uint32 *shared_memory_7 = …`.
    let is_shared = |l: &str| {
        l.split_once(' ')
            .is_some_and(|(_, rest)| rest.starts_with("*shared_memory_"))
    };
    let is_decl = |l: &str| {
        let l = l.trim();
        (l.contains("l_mut_") && !l.contains('='))
            || is_shared(l)
            || l.starts_with("// Shared array size")
            || l.starts_with("var<workgroup>")
    };
    let mut out: Vec<String> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    // Shared arrays are also placed in hash order: drop their offsets.
    let lines: Vec<String> = src
        .lines()
        .map(|l| match (l.find("dynamic_shared_mem["), l.rfind(']')) {
            (Some(a), Some(b)) if is_shared(l) && b > a => {
                format!("{}dynamic_shared_mem[offset]{}", &l[..a], &l[b + 1..])
            }
            _ => l.to_string(),
        })
        .collect();
    for line in &lines {
        let line = line.as_str();
        if is_decl(line) {
            run.push(line);
            continue;
        }
        run.sort_unstable();
        out.extend(run.drain(..).map(String::from));
        out.push(line.to_string());
    }
    run.sort_unstable();
    out.extend(run.drain(..).map(String::from));
    out.join("\n")
}

fn snapshot(name: &str, k: &KernelSource) {
    insta::assert_snapshot!(format!("{name}.cu"), stable(&k.cuda));
    insta::assert_snapshot!(format!("{name}.wgsl"), stable(&k.wgsl));
}

#[test]
fn elementwise_program_with_broadcast_load() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 8]);
    let b = g.input("bias", DType::F32, vec![8]);
    let bb = g.broadcast(b, vec![4, 8]);
    let s = g.add(x, bb);
    let y = g.silu(s);
    g.set_output("y", y);
    let (kernels, src) = sources(&g);
    assert_eq!(src.len(), 1, "one generated kernel: {kernels:?}");
    snapshot("elementwise_silu_bias", &src[0]);
}

#[test]
fn reduction_with_prologue_and_epilogue() {
    let mut g = Graph::new();
    let x = g.input("logits", DType::F32, vec![6, 24]);
    let lse = log_sum_exp(&mut g, x, 1);
    g.set_output("lse", lse);
    let (_, src) = sources(&g);
    assert_eq!(src.len(), 2, "max, then the fused exp-sum-log");
    snapshot("reduce_log_sum_exp", &src[1]);
}

#[test]
fn long_rows_reduce_with_one_cube_per_row() {
    // A log-sum-exp over a vocabulary-long row: units stride over the row
    // and fold their partials in shared memory.
    let mut g = Graph::new();
    let x = g.input("logits", DType::F32, vec![4, 4096]);
    let lse = log_sum_exp(&mut g, x, 1);
    g.set_output("lse", lse);
    let (_, src) = sources(&g);
    assert_eq!(src.len(), 2);
    assert!(src[1].name.ends_with("reduce_sum_rows"), "{}", src[1].name);
    snapshot("reduce_rows_log_sum_exp", &src[1]);
}

#[test]
fn optimiser_steps_are_hand_written_kernels() {
    use coopc_compiler::ir::{StepOut, StepRule};
    // PyTorch AdamW on one parameter (m, v, bias correction, decoupled
    // decay), its gradient (1 − λ) g_sft + λ g_rl fused in as prologue; then
    // SGD with momentum and plain SGD on a loaded gradient.
    let adamw = StepRule::AdamW {
        lr: 1e-3.into(),
        beta1: 0.9.into(),
        beta2: 0.999.into(),
        eps: 1e-8.into(),
        weight_decay: 0.01.into(),
    };
    let momentum = StepRule::Momentum {
        lr: 1e-2.into(),
        mu: 0.9.into(),
    };
    let sgd = StepRule::Sgd { lr: 1e-2.into() };
    let mut g = Graph::new();
    let shape = vec![16, 8];
    let f = |g: &mut Graph, name: &str| g.input(name, DType::F32, shape.clone());
    let (p, g_sft, g_rl, m, v) = (
        f(&mut g, "param"),
        f(&mut g, "g_sft"),
        f(&mut g, "g_rl"),
        f(&mut g, "exp_avg"),
        f(&mut g, "exp_avg_sq"),
    );
    let step = g.input("step", DType::F32, vec![]);
    let a = g.scale(g_sft, 0.4);
    let b = g.scale(g_rl, 0.6);
    let grad = g.add(a, b);
    let outs = g.optim_steps(adamw, &[p, grad, m, v, step]);
    for (o, id) in adamw.outputs().iter().zip(&outs[..3]) {
        g.set_output(format!("adamw.{}", o.name()), *id);
    }
    for (o, id) in momentum
        .outputs()
        .iter()
        .zip(g.optim_steps(momentum, &[p, g_sft, m]))
    {
        g.set_output(format!("momentum.{}", o.name()), id);
    }
    let p2 = g.optim_step(sgd, StepOut::Param, &[p, g_rl]);
    g.set_output("sgd.param", p2);
    let (kernels, src) = sources(&g);
    // The inputs, then one kernel per step.
    let steps: Vec<&Kernel> = kernels
        .iter()
        .filter(|k| !matches!(k, Kernel::Node(_)))
        .collect();
    assert_eq!(steps.len(), 3, "{kernels:?}");
    let names: Vec<&str> = src.iter().map(|s| &s.name[5..]).collect();
    assert_eq!(names, ["adamw_step", "momentum_step", "sgd_step"]);
    let Kernel::OptimStep {
        outputs,
        prologue_inputs,
        ..
    } = steps[0]
    else {
        panic!("{kernels:?}")
    };
    assert_eq!(outputs.len(), 3, "writes param, exp_avg, exp_avg_sq");
    assert_eq!(prologue_inputs, &[g_sft, g_rl], "computes the gradient");
    for (s, name) in src.iter().zip(&names) {
        snapshot(name, s);
    }
}

#[test]
fn tiled_matmul_and_strided_copy() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![2, 8, 16]);
    let b = g.input("b", DType::F32, vec![2, 16, 4]);
    let c = g.matmul(a, b);
    let t = g.permute(c, &[0, 2, 1]);
    g.set_output("t", t);
    let (_, src) = sources(&g);
    assert_eq!(src.len(), 2);
    snapshot("matmul_tiled", &src[0]);
    snapshot("permute_copy", &src[1]);
    // A transpose that only a matrix product reads is read through swapped
    // strides, never copied.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 8, 16]);
    let w = g.input("w", DType::F32, vec![2, 4, 16]);
    let wt = g.transpose(w);
    let y = g.matmul(x, wt);
    g.set_output("y", y);
    let (kernels, src) = sources(&g);
    assert_eq!(src.len(), 1, "{kernels:?}");
    assert!(src[0].name.ends_with("matmul_tb"), "{}", src[0].name);
    snapshot("matmul_tiled_transposed_b", &src[0]);
    // Products of at least 64 rows and columns run the register-blocked
    // kernel; one whose first operand is a transpose reads it so.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![96, 128]);
    let w = g.input("w", DType::F32, vec![96, 80]);
    let xt = g.transpose(x);
    let y = g.matmul(xt, w);
    g.set_output("y", y);
    let (kernels, src) = sources(&g);
    assert_eq!(src.len(), 1, "{kernels:?}");
    assert!(
        src[0].name.ends_with("matmul_blocked_ta"),
        "{}",
        src[0].name
    );
    snapshot("matmul_blocked_transposed_a", &src[0]);
    // At least 128 rows and columns: 128 × 128 blocks, 8 × 8 per unit.
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![128, 64]);
    let b = g.input("b", DType::F32, vec![64, 256]);
    let y = g.matmul(a, b);
    g.set_output("y", y);
    let (kernels, src) = sources(&g);
    assert_eq!(src.len(), 1, "{kernels:?}");
    assert!(src[0].name.ends_with("matmul_wide"), "{}", src[0].name);
    snapshot("matmul_wide", &src[0]);
}

#[test]
fn fused_linear_logprob() {
    let src = Traced::LinearLogprob
        .source("linear_logprob_forward")
        .expect("compiles to CUDA and WGSL");
    snapshot("linear_logprob_forward", &src);
    // Tokens that are rows of h: with CubeCL's matmul, each chunk's logits
    // folded into partial log-sum-exps; with coopc's, the register-blocked
    // forward over spans of the vocabulary; then the merge.
    let src = Traced::LinearLogprobSplit
        .source("linear_logprob")
        .expect("compiles to CUDA and WGSL");
    for part in ["_fold", "", "_merge"] {
        let kernel = format!("linear_logprob{part} (");
        assert!(
            src.cuda.contains(&kernel),
            "no `{kernel}` in the CUDA source"
        );
    }
    snapshot("linear_logprob_forward_blocked", &src);
    // The gradients: a chunk's coefficients, then dh += C · W[chunk]
    // (storing for the first chunk) and dW[chunk] = Cᵀ · h.
    let src = Traced::LogprobGradients {
        dh: Some(Product::Blocked),
        dh_chunks: true,
        dw: Some(Product::Blocked),
        dw_rest: None,
    }
    .source("linear_logprob_backward_hw")
    .expect("compiles to CUDA and WGSL");
    assert!(!src.cuda.contains("_dw_last"));
    for part in [
        "_forward_fold",
        "_forward",
        "_merge",
        "_scale",
        "_coefficients",
        "_dh_add_into",
        "_dh",
        "_dh_add",
        "_dw",
    ] {
        let kernel = format!("linear_logprob_backward_hw{part} ");
        assert!(
            src.cuda.contains(&kernel),
            "no `{kernel}` in the CUDA source"
        );
    }
    // A last, shorter vocabulary chunk whose dW runs another kernel is
    // listed as a part of its own.
    let with_last = Traced::LogprobGradients {
        dh: None,
        dh_chunks: true,
        dw: Some(Product::Wide),
        dw_rest: Some(Product::Tiled),
    }
    .source("linear_logprob_backward_w")
    .expect("compiles to CUDA and WGSL");
    for kernel in [
        "linear_logprob_backward_w_dw ",
        "linear_logprob_backward_w_dw_last ",
    ] {
        assert!(
            with_last.cuda.contains(kernel),
            "no `{kernel}` in the CUDA source"
        );
        assert!(
            with_last.wgsl.contains(kernel.trim_end()),
            "no `{kernel}` in the WGSL"
        );
    }
    let coefficients = Traced::LogprobCoefficients
        .source("linear_logprob_coefficients")
        .expect("compiles to CUDA and WGSL");
    snapshot("linear_logprob_coefficients", &coefficients);
    // Around CubeCL's products: a chunk's logits turned into coefficients,
    // and dh's later chunks added.
    for (traced, name) in [
        (Traced::LogprobScale, "linear_logprob_scale"),
        (Traced::AddInto, "add_into"),
        (Traced::EntropyFold, "linear_entropy_fold"),
        (Traced::EntropyScale, "linear_entropy_scale"),
    ] {
        let src = traced.source(name).expect("compiles to CUDA and WGSL");
        snapshot(name, &src);
    }
}

#[test]
fn causal_attention() {
    for (part, name) in [
        (AttentionPart::Forward, "attention_forward"),
        (AttentionPart::BackwardQ, "attention_backward_q"),
        (AttentionPart::BackwardKv, "attention_backward_kv"),
    ] {
        let src = Traced::Attention(part)
            .source(name)
            .expect("compiles to CUDA and WGSL");
        snapshot(name, &src);
    }
}

#[test]
fn cached_attention_of_the_decode_step() {
    // One query row per head over a grouped-query cache: one kernel, which
    // reads the position on the device.
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![2, 4, 1, 16]);
    let k = g.input("k", DType::F32, vec![2, 2, 32, 16]);
    let v = g.input("v", DType::F32, vec![2, 2, 32, 16]);
    let pos = g.input("pos", DType::I32, vec![1]);
    let o = g.cached_attention(q, k, v, pos);
    g.set_output("o", o);
    let (kernels, src) = sources(&g);
    let launched: Vec<&Kernel> = kernels
        .iter()
        .filter(|k| !matches!(k, Kernel::Node(id) if g.op(*id).is_source()))
        .collect();
    assert_eq!(launched.len(), 1, "{kernels:?}");
    assert_eq!(src.len(), 1);
    snapshot("cached_attention", &src[0]);
}

#[test]
fn policy_losses_and_their_gradients() {
    // GRPO with the KL term and the sequence mean (the loss and its
    // gradient), and SFT's token mean: one kernel each.
    use common::{token_loss_operands, token_losses};
    use coopc_compiler::autodiff::grad;
    let [sft, grpo] = [0, 3].map(|i| token_losses()[i]);
    assert!(grpo.has_kl() && grpo.seq_mean());
    let mut g = Graph::new();
    let mut names = Vec::new();
    for (loss, tag) in [(grpo, "grpo"), (sft, "sft")] {
        let ops: Vec<_> = token_loss_operands(loss, 4, 16)
            .into_iter()
            .map(|(name, shape)| g.input(format!("{tag}.{name}"), DType::F32, shape))
            .collect();
        let l = g.token_loss(loss, &ops);
        g.set_output(format!("{tag}.loss"), l);
        if loss == grpo {
            let d = grad(&mut g, l, &[ops[0]])[0];
            g.set_output("grpo.grad", d);
            names.extend(["grpo_loss", "grpo_loss_grad"]);
        } else {
            names.push("sft_loss");
        }
    }
    let (_, src) = sources(&g);
    let losses: Vec<&KernelSource> = src
        .iter()
        .filter(|k| k.name.contains("token_loss"))
        .collect();
    let kernels: Vec<&str> = losses.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        kernels,
        ["k000_token_loss", "k002_token_loss_grad", "k003_token_loss"],
        "{:?}",
        src.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    for (k, name) in losses.into_iter().zip(names) {
        snapshot(name, k);
    }
}

#[test]
fn rotary_embedding() {
    // The model's RoPE is one `rope` kernel; its gradient the transposed one.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4, 8, 16]);
    let c = g.input("cos", DType::F32, vec![8, 16]);
    let s = g.input("sin", DType::F32, vec![8, 16]);
    let y = g.rope(x, c, s, false);
    g.set_output("y", y);
    let back = g.rope(y, c, s, true);
    g.set_output("back", back);
    let (kernels, src) = sources(&g);
    let ropes = kernels
        .iter()
        .filter(|k| matches!(k, Kernel::Node(id) if g.op(*id).name() == "rope"))
        .count();
    assert_eq!(ropes, 2, "{kernels:?}");
    let names: Vec<&str> = src.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k000_rope", "k001_rope_transpose"]);
    for (k, name) in src.iter().zip(["rope", "rope_transpose"]) {
        snapshot(name, k);
    }
}

#[test]
fn rms_norm() {
    for (part, name) in [
        (NormPart::Forward, "rms_norm_forward"),
        (NormPart::BackwardX, "rms_norm_backward_x"),
        (NormPart::BackwardW, "rms_norm_backward_w"),
    ] {
        let src = Traced::RmsNorm(part)
            .source(name)
            .expect("compiles to CUDA and WGSL");
        snapshot(name, &src);
    }
}

#[test]
fn top_p_sampler() {
    use coopc_kernels::source::SamplePart;
    let part = SamplePart::Pick;
    let src = Traced::Sample(part)
        .source(part.name())
        .expect("compiles to CUDA and WGSL");
    snapshot("sample_pick_top_p", &src);
}
