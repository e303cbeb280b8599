//! The `pipeline.toml` frontend: the shipped examples parse to the expected
//! spec, defaults are applied, and every malformed pipeline under
//! `tests/fixtures/bad/` is rejected with exactly one diagnostic whose
//! rendering (message, line:column, underline, help) is snapshot-tested.

use coopc_compiler::frontend::{load_pipeline, parse_pipeline, FrontendError};
use coopc_compiler::spec::{
    Advantage, BackendKind, HypergradKind, KlEstimator, Lambda, LossAgg, LrSchedule,
    MatmulPrecision, Method, OptimKind, PolicyLoss, Precision, Projection, RatioLevel,
    ScheduleKind, ShadowMode, TaskKind,
};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

const MINIMAL: &str = "[model]
d_model = 64
n_layers = 2
n_heads = 4
d_ff = 128
max_seq = 64
";

// ---------------------------------------------------------------------------
// Malformed pipelines: one snapshot per fixture.
// ---------------------------------------------------------------------------

/// Renders the diagnostics of `tests/fixtures/bad/<name>.toml`, checking that
/// the pipeline is rejected with exactly one problem.
fn render_bad(name: &str) -> String {
    let file = format!("{name}.toml");
    let source = read(&format!("tests/fixtures/bad/{file}"));
    let diags = match parse_pipeline(&source) {
        Ok(spec) => panic!("{file} was accepted: {spec:?}"),
        Err(d) => d,
    };
    assert_eq!(
        diags.len(),
        1,
        "{file} should have exactly one problem:\n{}",
        diags.render(&file, &source)
    );
    diags.render(&file, &source)
}

macro_rules! bad_fixtures {
    ($($name:ident),* $(,)?) => {
        const BAD_FIXTURES: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                let name = stringify!($name);
                let rendered = render_bad(name);
                insta::with_settings!(
                    {
                        description => format!("tests/fixtures/bad/{name}.toml"),
                        omit_expression => true,
                    },
                    { insta::assert_snapshot!(name, rendered) }
                );
            }
        )*
    };
}

mod bad {
    use super::*;

    bad_fixtures!(
        syntax_error,
        duplicate_key,
        unknown_key,
        unknown_section,
        key_outside_section,
        wrong_type,
        missing_model,
        missing_model_key,
        rank_zero,
        clip_low_too_large,
        heads_not_dividing_d_model,
        kv_heads_not_dividing_heads,
        odd_head_dim,
        backprop_exceeds_unroll,
        first_order_with_backprop,
        lambda_out_of_range,
        lambda_schedule_out_of_range,
        bad_method,
        finite_difference_eps_zero,
        negative_lr,
        optimiser_key_wrong_kind,
        seq_len_exceeds_max_seq,
        duplicate_lora_target,
        group_size_one,
        jsonl_without_files,
        top_p_zero,
        max_new_tokens_fill_sequence,
        rl_digits_below_sft_digits,
        memory_budget_zero,
        tf32_with_f64,
    );

    #[test]
    fn every_bad_fixture_has_a_snapshot_test() {
        let mut on_disk: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/bad"))
            .expect("fixture folder")
            .map(|e| e.expect("fixture entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut tested: Vec<String> = BAD_FIXTURES.iter().map(|s| s.to_string()).collect();
        tested.sort();
        assert_eq!(on_disk, tested);
    }
}

// ---------------------------------------------------------------------------
// Valid pipelines
// ---------------------------------------------------------------------------

#[test]
fn addition_example_parses_to_the_expected_spec() {
    let (_, spec) = load_pipeline(&root().join("examples/addition.toml")).expect("valid");
    let m = &spec.model;
    assert_eq!(
        (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads),
        (24, 128, 2, 4, 4)
    );
    assert_eq!((m.d_ff, m.max_seq, m.head_dim()), (384, 40, 32));
    assert_eq!(spec.lora.rank, 8);
    assert_eq!(spec.lora.alpha, 16.0);
    assert_eq!(spec.lora.targets, Projection::ALL.to_vec());
    assert_eq!(spec.task.kind, TaskKind::Addition);
    assert_eq!(spec.bilevel.method, Method::Bridge);
    assert_eq!(
        spec.bilevel.lambda,
        Lambda::Linear {
            start: 0.2,
            end: 0.8
        }
    );
    assert_eq!(spec.bilevel.shadow, ShadowMode::Persistent);
    let hg = spec.bilevel.hypergradient;
    assert_eq!(
        (hg.kind, hg.unroll, hg.backprop),
        (HypergradKind::FirstOrder, 1, 0)
    );
    assert!(matches!(spec.optim.lower.kind, OptimKind::AdamW { .. }));
    assert_eq!(spec.optim.lower.lr, 2e-3);
    assert!(matches!(spec.optim.upper.kind, OptimKind::AdamW { .. }));
    assert_eq!(spec.optim.upper.lr, 2e-4);
    assert_eq!(spec.rl.batch_size(), 16);
    assert_eq!(spec.train.seq_len, 40);
    assert_eq!(spec.sft.cold_start_steps, 750);
    assert_eq!(
        (
            spec.task.sft_max_digits,
            spec.task.rl_max_digits,
            spec.task.eval_digits
        ),
        (2, 3, None)
    );
}

#[test]
fn tiny_example_parses_to_the_expected_spec() {
    let (_, spec) = load_pipeline(&root().join("examples/tiny.toml")).expect("valid");
    let m = &spec.model;
    assert_eq!(
        (
            m.d_model,
            m.n_layers,
            m.n_heads,
            m.n_kv_heads,
            m.d_ff,
            m.max_seq
        ),
        (16, 1, 2, 1, 32, 16)
    );
    assert_eq!(m.head_dim(), 8);
    assert_eq!((spec.lora.rank, spec.lora.alpha), (2, 4.0));
    assert_eq!((spec.rl.group_size, spec.rl.prompts_per_step), (2, 2));
    assert_eq!(spec.sft.batch_size, 2);
    assert_eq!(spec.train.seq_len, 8);
    assert_eq!(spec.bilevel.lambda, Lambda::Constant(0.5));
    let hg = spec.bilevel.hypergradient;
    assert_eq!(
        (hg.kind, hg.unroll, hg.backprop),
        (HypergradKind::Truncated, 2, 2)
    );
    assert_eq!(spec.optim.lower.kind, OptimKind::Sgd);
    assert_eq!(spec.optim.lower.lr, 0.1);
    assert_eq!(spec.backend.kind, BackendKind::Cpu);
    assert_eq!(spec.backend.dtype, Precision::F64);
}

#[test]
fn defaults_fill_every_optional_section() {
    let spec = parse_pipeline(MINIMAL).expect("valid");
    let m = &spec.model;
    assert_eq!(m.vocab_size, 24, "built-in addition vocabulary");
    assert_eq!(m.n_kv_heads, 4, "n_kv_heads defaults to n_heads");
    assert_eq!((m.rope_theta, m.rms_eps), (10000.0, 1e-6));
    assert!(m.tie_embeddings && !m.qkv_bias);
    assert_eq!((spec.lora.rank, spec.lora.alpha), (8, 16.0));
    assert_eq!(spec.lora.targets, Projection::ALL.to_vec());
    let t = &spec.task;
    assert_eq!(t.kind, TaskKind::Addition);
    assert!(t.tokenizer.is_none() && t.sft_file.is_none() && t.rl_file.is_none());
    assert_eq!((t.reward_correct, t.reward_wrong), (1.0, -1.0));
    let rl = &spec.rl;
    assert_eq!((rl.group_size, rl.prompts_per_step), (8, 16));
    assert_eq!((rl.clip_low, rl.clip_high, rl.kl_coef), (0.2, 0.28, 0.0));
    assert_eq!(rl.advantage, Advantage::GroupStd);
    assert_eq!(rl.loss_agg, LossAgg::TokenMean);
    assert_eq!(
        (rl.loss, rl.ratio_level, rl.kl_estimator, rl.kl_in_reward),
        (
            PolicyLoss::PpoClip,
            RatioLevel::Token,
            KlEstimator::K3,
            false
        )
    );
    assert_eq!(rl.max_new_tokens, 32);
    assert_eq!((rl.temperature, rl.top_p, rl.top_k), (1.0, 1.0, 0));
    assert_eq!((spec.sft.batch_size, spec.sft.cold_start_steps), (16, 50));
    let b = &spec.bilevel;
    assert_eq!(b.method, Method::Bridge);
    assert_eq!(b.lambda, Lambda::Constant(0.5));
    assert_eq!(b.shadow, ShadowMode::Persistent);
    assert_eq!(
        (
            b.hypergradient.kind,
            b.hypergradient.unroll,
            b.hypergradient.backprop
        ),
        (HypergradKind::FirstOrder, 1, 0)
    );
    let adamw = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    assert_eq!((spec.optim.lower.kind, spec.optim.lower.lr), (adamw, 3e-4));
    assert_eq!((spec.optim.upper.kind, spec.optim.upper.lr), (adamw, 1e-3));
    let tr = &spec.train;
    assert_eq!(
        (tr.steps, tr.seed, tr.eval_every, tr.seq_len),
        (100, 0, 10, 64)
    );
    assert_eq!(spec.backend.kind, BackendKind::Auto);
    assert_eq!(spec.backend.dtype, Precision::F32);
    assert_eq!(spec.backend.matmul, MatmulPrecision::F32);
}

#[test]
fn policy_loss_keys_parse_and_reach_the_loss_op() {
    use coopc_compiler::ir::{TokenAgg, TokenLoss};
    use coopc_compiler::losses::grpo;
    let text = format!(
        "{MINIMAL}\n[rl]\nloss = \"cispo\"\nratio_level = \"sequence\"\n\
         loss_agg = \"seq_mean_token_sum_norm\"\nkl_coef = 0.02\nkl_estimator = \"k2\"\n\
         max_new_tokens = 12\ntop_k = 20\n"
    );
    let spec = parse_pipeline(&text).expect("valid");
    let rl = &spec.rl;
    assert_eq!(rl.loss, PolicyLoss::Cispo);
    assert_eq!(rl.ratio_level, RatioLevel::Sequence);
    assert_eq!(rl.loss_agg, LossAgg::SeqMeanTokenSumNorm);
    assert_eq!(rl.kl_estimator, KlEstimator::K2);
    assert_eq!(rl.top_k, 20);
    let loss = grpo(rl);
    assert!(loss.cispo() && loss.seq_ratio() && loss.has_kl());
    assert_eq!(loss.kl_estimator(), KlEstimator::K2);
    assert_eq!(loss.agg(), TokenAgg::SeqSum { norm: 12.0.into() });
    // With the penalty in the reward, the loss has no KL term.
    let spec = parse_pipeline(&format!(
        "{MINIMAL}\n[rl]\nkl_coef = 0.02\nkl_in_reward = true\n"
    ))
    .expect("valid");
    assert!(spec.rl.kl_in_reward);
    assert!(matches!(grpo(&spec.rl), TokenLoss::Grpo { .. }));
    assert!(!grpo(&spec.rl).has_kl());
    // Unknown choices name the key and the choices.
    let e = parse_pipeline(&format!("{MINIMAL}\n[rl]\nloss = \"ppo\"\n")).unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("rl.loss") && text.contains("cispo"), "{text}");
}

/// `entropy_coef` reaches the RL loss: the meta-step computes the linear
/// entropy only with a bonus, and a negative coefficient is refused.
#[test]
fn entropy_coef_parses_and_adds_the_entropy_to_the_meta_step() {
    use coopc_compiler::ir::Op;
    use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
    let entropy_ops = |src: &str| {
        let spec = parse_pipeline(src).expect("valid");
        let g = lower_meta_step(&spec, BatchShapes::from_spec(&spec)).graph;
        let n = g
            .node_ids()
            .filter(|&id| matches!(g.op(id), Op::LinearEntropy | Op::LinearEntropyGrad { .. }))
            .count();
        (spec.rl.entropy_coef, n)
    };
    assert_eq!(entropy_ops(MINIMAL).0, 0.0);
    assert_eq!(
        entropy_ops(MINIMAL).1,
        0,
        "no bonus, no entropy in the step"
    );
    let (c, n) = entropy_ops(&format!("{MINIMAL}\n[rl]\nentropy_coef = 0.01\n"));
    assert_eq!(c, 0.01);
    assert!(n >= 2, "the entropy and its gradient: {n} ops");
    let src = format!("{MINIMAL}\n[rl]\nentropy_coef = -0.1\n");
    let text = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
    assert!(text.contains("`rl.entropy_coef`"), "{text}");
}

/// `updates_per_batch` and `mini_batches` parse, make each step's batch
/// several updates (the note says how many), and must cut both batches
/// into equal slices.
#[test]
fn updates_per_batch_and_mini_batches_parse_and_must_divide_the_batches() {
    use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
    // MINIMAL: 16 SFT rows, 8 × 16 rollouts, K = 1.
    let src = format!("{MINIMAL}\n[rl]\nupdates_per_batch = 3\nmini_batches = 4\n");
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!((spec.rl.updates_per_batch, spec.rl.mini_batches), (3, 4));
    assert_eq!(spec.rl.updates(), 12);
    let notes = lower_meta_step(&spec, BatchShapes::from_spec(&spec)).notes;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("12 updates per rollout batch (3 × 4 mini-batches)")),
        "{notes:?}"
    );
    for (src, key) in [
        (
            format!("{MINIMAL}\n[rl]\ngroup_size = 3\nprompts_per_step = 3\nmini_batches = 2\n"),
            "`rl.mini_batches`",
        ),
        (
            format!("{MINIMAL}\n[rl]\nmini_batches = 4\n[sft]\nbatch_size = 6\n"),
            "`sft.batch_size`",
        ),
        (
            format!("{MINIMAL}\n[rl]\nupdates_per_batch = 0\n"),
            "`rl.updates_per_batch`",
        ),
    ] {
        let text = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
        assert!(text.contains(key), "{text}");
    }
}

#[test]
fn partial_supervision_and_countdown_generator_keys_parse_and_are_checked() {
    use coopc_compiler::spec::{CountdownSpec, SftFlaw};
    let src = format!(
        "{MINIMAL}\n[task]\nsft_pool = 64\nsft_flaw = \"drop_final_carry\"\nsft_carry_free = true\n"
    );
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(spec.task.sft_pool, Some(64));
    assert_eq!(spec.task.sft_flaw, SftFlaw::DropFinalCarry);
    assert!(spec.task.sft_carry_free);
    // The defaults change nothing.
    let plain = parse_pipeline(MINIMAL).expect("valid");
    assert_eq!(
        (
            plain.task.sft_pool,
            plain.task.sft_flaw,
            plain.task.sft_carry_free
        ),
        (None, SftFlaw::None, false)
    );
    assert_eq!(plain.task.countdown, CountdownSpec::default());
    let src = format!(
        "{MINIMAL}\n[task]\nkind = \"countdown\"\nmin_numbers = 2\nmax_numbers = 5\nmax_number = 20\nmax_value = 500\nsearch_demos = true\nsft_pool = 8\n"
    );
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(
        spec.task.countdown,
        CountdownSpec {
            min_numbers: 2,
            max_numbers: 5,
            max_number: 20,
            max_value: 500,
            search_demos: true
        }
    );
    for (task, message) in [
        ("sft_pool = 0", "`task.sft_pool` must be at least 1"),
        ("sft_flaw = \"drop_carry\"", "drop_final_carry"),
        (
            "kind = \"countdown\"\nsft_flaw = \"drop_final_carry\"",
            "`task.sft_flaw`",
        ),
        (
            "sft_carry_free = true\nkind = \"jsonl\"\nsft_file = \"a\"\nrl_file = \"b\"",
            "`task.sft_carry_free`",
        ),
        ("max_numbers = 5", "`task.max_numbers`"),
        (
            "kind = \"countdown\"\nmin_numbers = 5\nmax_numbers = 4",
            "`task.max_numbers` must be between `task.min_numbers` and 8",
        ),
        (
            "kind = \"countdown\"\nmin_numbers = 1",
            "`task.min_numbers` must be between 2 and 8",
        ),
        (
            "kind = \"countdown\"\nmax_number = 50\nmax_value = 20",
            "`task.max_value` must be between `task.max_number`",
        ),
    ] {
        let src = format!("{MINIMAL}\n[task]\n{task}\n");
        let text = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
        assert!(text.contains(message), "{task}: {text}");
    }
}

#[test]
fn tf32_products_are_opt_in() {
    let src = format!("{MINIMAL}\n[backend]\nmatmul = \"tf32\"\n");
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(spec.backend.matmul, MatmulPrecision::Tf32);
    assert_eq!(spec.backend.dtype, Precision::F32);
    let src = format!("{MINIMAL}\n[backend]\nmatmul = \"bf16\"\n");
    let diags = parse_pipeline(&src).unwrap_err();
    let text = diags.render("p.toml", &src);
    assert!(
        text.contains("`backend.matmul`") && text.contains("tf32"),
        "{text}"
    );
}

#[test]
fn bf16_mixed_precision_parses_and_refuses_tf32_products() {
    let src = format!("{MINIMAL}\n[backend]\ndtype = \"bf16\"\n");
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(spec.backend.dtype, Precision::Bf16);
    // Master copies, state and program inputs stay f32; the policy computes in bf16.
    assert_eq!(spec.backend.dtype.dtype(), coopc_compiler::ir::DType::F32);
    assert_eq!(
        spec.backend.dtype.compute(),
        coopc_compiler::ir::DType::Bf16
    );
    let src = format!("{MINIMAL}\n[backend]\ndtype = \"bf16\"\nmatmul = \"tf32\"\n");
    let text = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
    assert!(
        text.contains("`backend.matmul`") && text.contains("\"bf16\"") && text.contains("p.toml:"),
        "{text}"
    );
}

#[test]
fn learning_rate_schedules_and_clipping_parse() {
    let src = format!(
        "{MINIMAL}\n[optim.lower]\nschedule = \"cosine\"\nwarmup_steps = 10\nmax_grad_norm = 1.0\n[optim.upper]\nschedule = \"linear\"\n"
    );
    let spec = parse_pipeline(&src).expect("valid");
    let lower = spec.optim.lower;
    assert_eq!(
        (
            lower.schedule.kind,
            lower.schedule.warmup_steps,
            lower.max_grad_norm
        ),
        (ScheduleKind::Cosine, 10, Some(1.0))
    );
    assert_eq!(spec.optim.upper.schedule.kind, ScheduleKind::Linear);
    assert_eq!(spec.optim.upper.max_grad_norm, None);
    // Defaults: constant, no warm-up, no clipping.
    let spec = parse_pipeline(MINIMAL).unwrap();
    assert!(spec.optim.lower.schedule.is_constant() && spec.optim.lower.max_grad_norm.is_none());
    for (bad, needle) in [
        ("schedule = \"step\"", "`optim.lower.schedule`"),
        ("max_grad_norm = 0", "`optim.lower.max_grad_norm`"),
        ("warmup_steps = -1", "`optim.lower.warmup_steps`"),
    ] {
        let src = format!("{MINIMAL}\n[optim.lower]\n{bad}\n");
        let text = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
        assert!(text.contains(needle), "{bad}: {text}");
    }
}

/// Hugging Face's `get_{constant,linear,cosine}_schedule_with_warmup`
/// multipliers at a few steps (warm-up 10 of 100 steps).
#[test]
fn learning_rate_schedules_follow_hugging_face() {
    let at = |kind, step| {
        LrSchedule {
            kind,
            warmup_steps: 10,
        }
        .scale(step, 100)
    };
    for kind in [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cosine,
    ] {
        assert_eq!(at(kind, 0), 0.0);
        assert_eq!(at(kind, 5), 0.5);
        assert_eq!(at(kind, 10), 1.0);
    }
    assert_eq!(at(ScheduleKind::Constant, 99), 1.0);
    assert_eq!(at(ScheduleKind::Linear, 55), 0.5);
    assert_eq!(at(ScheduleKind::Linear, 100), 0.0);
    assert!((at(ScheduleKind::Cosine, 55) - 0.5).abs() < 1e-15);
    assert!(
        (at(ScheduleKind::Cosine, 32) - 0.5 * (1.0 + (std::f64::consts::PI * 22.0 / 90.0).cos()))
            .abs()
            < 1e-15
    );
    assert!(at(ScheduleKind::Cosine, 100).abs() < 1e-15);
    let none = LrSchedule::default();
    assert!(none.is_constant() && none.scale(0, 100) == 1.0);
}

#[test]
fn derived_defaults_follow_the_keys_they_depend_on() {
    let src = format!(
        "{MINIMAL}\n[lora]\nrank = 3\n[train]\nsteps = 7\nseq_len = 20\n\
         [task]\nkind = \"countdown\"\n\
         [bilevel.hypergradient]\nkind = \"finite_difference\"\nunroll = 3\n\
         [optim.upper]\nkind = \"momentum\"\n"
    );
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(spec.model.vocab_size, 32, "built-in countdown vocabulary");
    assert_eq!(spec.lora.alpha, 6.0, "alpha = 2 * rank");
    assert_eq!(spec.sft.cold_start_steps, 3, "steps / 2");
    assert_eq!(spec.rl.max_new_tokens, 10, "half of a short seq_len");
    let hg = spec.bilevel.hypergradient;
    assert_eq!(hg.kind, HypergradKind::FiniteDifference { eps: 1e-2 });
    assert_eq!(hg.backprop, 3, "backprop defaults to unroll");
    assert_eq!(spec.optim.upper.kind, OptimKind::Momentum { momentum: 0.9 });
    assert_eq!(spec.optim.upper.lr, 1e-3);
}

#[test]
fn dotted_keys_and_subtables_mean_the_same_as_sections() {
    let dotted = "model.d_model = 64\nmodel.n_layers = 2\nmodel.n_heads = 4\n\
                  model.d_ff = 128\nmodel.max_seq = 64\n\
                  bilevel.hypergradient.kind = \"truncated\"\n\
                  bilevel.hypergradient.unroll = 2\n\
                  optim.lower = { kind = \"sgd\", lr = 0.5 }\n";
    let sections = format!(
        "{MINIMAL}[bilevel]\nhypergradient = {{ kind = \"truncated\", unroll = 2 }}\n\
         [optim.lower]\nkind = \"sgd\"\nlr = 0.5\n"
    );
    assert_eq!(
        parse_pipeline(dotted).expect("dotted form"),
        parse_pipeline(&sections).expect("section form")
    );
}

#[test]
fn jsonl_task_reads_its_files_and_vocabulary() {
    let src = format!(
        "{MINIMAL}vocab_size = 1000\n[task]\nkind = \"jsonl\"\nsft_file = \"sft.jsonl\"\n\
         rl_file = \"rl.jsonl\"\neval_file = \"eval.jsonl\"\ntokenizer = \"tokenizer.json\"\n"
    );
    let spec = parse_pipeline(&src).expect("valid");
    assert_eq!(spec.model.vocab_size, 1000);
    assert_eq!(spec.task.sft_file.as_deref(), Some("sft.jsonl"));
    assert_eq!(spec.task.rl_file.as_deref(), Some("rl.jsonl"));
    assert_eq!(spec.task.eval_file.as_deref(), Some("eval.jsonl"));
    assert_eq!(spec.task.tokenizer.as_deref(), Some("tokenizer.json"));

    let without_vocab = src.replace("vocab_size = 1000\n", "");
    let diags = parse_pipeline(&without_vocab).unwrap_err();
    assert!(diags.mentions("model.vocab_size"), "{diags}");
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

#[test]
fn all_problems_are_reported_in_source_order() {
    let src = format!(
        "{MINIMAL}n_kv_heads = 3\n[lora]\nrank = 0\n[rl]\nclip_low = 2.0\ntop_q = 0.9\n\
         [optim.lower]\nkind = \"sgd\"\nlr = -1\nmomentum = 0.9\n[sft]\nbatch_size = \"4\"\n"
    );
    let diags = parse_pipeline(&src).unwrap_err();
    let paths: Vec<&str> = diags.iter().filter_map(|d| d.path.as_deref()).collect();
    assert_eq!(
        paths,
        [
            "model.n_kv_heads",
            "lora.rank",
            "rl.clip_low",
            "rl.top_q",
            "optim.lower.lr",
            "optim.lower.momentum",
            "sft.batch_size",
        ]
    );
    assert!(diags.iter().all(|d| d.span.is_some()));
    let rendered = diags.render("p.toml", &src);
    assert!(rendered.contains(" --> p.toml:9:8\n"), "{rendered}");
    assert!(
        rendered.ends_with("found 7 errors in p.toml\n"),
        "{rendered}"
    );
}

#[test]
fn spans_point_at_the_offending_value() {
    let src = format!("{MINIMAL}[lora]\nrank = 0\n");
    let diags = parse_pipeline(&src).unwrap_err();
    let span = diags.iter().next().and_then(|d| d.span.clone()).unwrap();
    assert_eq!(&src[span], "0");
}

#[test]
fn columns_count_characters_not_bytes() {
    // `é` takes two bytes but is one column: 5 is the 17th character.
    let src = format!("{MINIMAL}[lora]\ntargets = [\"é\", 5]\n");
    let rendered = parse_pipeline(&src).unwrap_err().render("p.toml", &src);
    assert!(rendered.contains("p.toml:8:12\n"), "{rendered}");
    assert!(rendered.contains("p.toml:8:17\n"), "{rendered}");
    assert!(
        rendered.contains("\n  |                 ^ here\n"),
        "{rendered}"
    );
}

#[test]
fn unreadable_files_are_reported_by_name() {
    let missing = Path::new("tests/fixtures/no_such_pipeline.toml");
    match load_pipeline(missing) {
        Err(e @ FrontendError::Read { .. }) => {
            let text = e.render();
            assert!(text.contains("no_such_pipeline.toml"), "{text}");
            assert!(text.contains("no such file"), "{text}");
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    match load_pipeline(&root().join("tests/fixtures")) {
        Err(FrontendError::Read { reason, .. }) => assert!(reason.contains("directory")),
        other => panic!("expected a read error, got {other:?}"),
    }
}

#[test]
fn invalid_files_render_with_their_path() {
    let path = root().join("tests/fixtures/bad/rank_zero.toml");
    let err = load_pipeline(&path).unwrap_err();
    assert!(matches!(err, FrontendError::Invalid { .. }));
    let text = err.render();
    assert!(text.contains("rank_zero.toml:10:8"), "{text}");
}

#[test]
fn no_input_makes_the_frontend_panic() {
    // Every prefix of the examples and of each bad fixture, and each with one
    // character replaced by a TOML metacharacter: parsing and rendering must
    // return, whatever they say.
    let mut sources = vec![read("examples/addition.toml"), read("examples/tiny.toml")];
    for name in std::fs::read_dir(root().join("tests/fixtures/bad")).unwrap() {
        sources.push(std::fs::read_to_string(name.unwrap().path()).unwrap());
    }
    let mut inputs = Vec::new();
    for src in &sources {
        for (i, _) in src.char_indices() {
            inputs.push(src[..i].to_string());
            for c in ['"', '[', '=', '\n', '-', 'é'] {
                let mut s = src.clone();
                let len = s[i..].chars().next().map_or(0, char::len_utf8);
                s.replace_range(i..i + len, &c.to_string());
                inputs.push(s);
            }
        }
    }
    for input in &inputs {
        if let Err(d) = parse_pipeline(input) {
            assert!(!d.is_empty());
            let _ = d.render("x.toml", input);
        }
    }
}

#[test]
fn the_reference_examples_are_valid_pipelines() {
    let doc = read("docs/pipeline.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or(""))
        .collect();
    assert_eq!(blocks.len(), 2);
    for block in blocks {
        if let Err(d) = parse_pipeline(block) {
            panic!("{}", d.render("docs/pipeline.md", block));
        }
    }
    // The full example spells out the defaults of examples/addition.toml.
    let full = doc
        .split("```toml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let (_, addition) = load_pipeline(&root().join("examples/addition.toml")).unwrap();
    assert_eq!(parse_pipeline(full).unwrap(), addition);
}
