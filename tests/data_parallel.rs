//! Data-parallel meta-steps: N processes, each with its share of every
//! batch (ranks as threads here, MPI processes in a run), give the
//! meta-step of one process on the whole batch — losses, gradients,
//! hypergradients, the next θ, θ̂ and w and their optimiser state — and
//! every rank the same bits.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use coopc_compiler::ir::plan::Program;
use coopc_compiler::lowering::{lower_meta_step_with, BatchShapes, LowerOptions, MemoryPlan};
use coopc_compiler::spec::{HypergradKind, LossAgg, OptimKind, PipelineSpec};
use coopc_compiler::{compile_for_world, Op};
use coopc_runtime::collective::{self, shard_rows, Collective, ThreadGroup};
use coopc_runtime::{Buffer, HostTensor};

type Inputs = HashMap<String, HostTensor>;

/// Rows `idx` (in that order) of a tensor's leading axis.
fn rows_of(t: &HostTensor, idx: &[usize]) -> HostTensor {
    fn pick<T: Copy>(v: &[T], idx: &[usize], row: usize) -> Vec<T> {
        idx.iter()
            .flat_map(|&i| v[i * row..(i + 1) * row].iter().copied())
            .collect()
    }
    let row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = idx.len();
    match &t.data {
        Buffer::F64(v) => HostTensor::f64(shape, pick(v, idx, row)),
        Buffer::F32(v) => HostTensor::f32(shape, pick(v, idx, row)),
        Buffer::I32(v) => HostTensor::i32(shape, pick(v, idx, row)),
        Buffer::Bool(_) | Buffer::Bf16(_) => panic!("batch tensors are never bool or bf16"),
    }
}

/// Rank `rank`'s inputs: its rows of every batch tensor, everything else
/// (parameters, state, λ) as it is.
fn shard(spec: &PipelineSpec, whole: &Inputs, rank: usize, world: usize) -> Inputs {
    let minis = spec.rl.mini_batches.max(1);
    whole
        .iter()
        .map(|(name, t)| {
            let batch =
                name.starts_with("step") && (name.contains(".sft.") || name.contains(".rl."));
            let t = if batch {
                rows_of(t, &shard_rows(t.shape[0], minis, rank, world))
            } else {
                t.clone()
            };
            (name.clone(), t)
        })
        .collect()
}

/// Runs `program` on every rank's inputs, each rank a thread with its own
/// handle of one collective group; `nodes` selects the node-by-node executor.
fn run_ranks(program: &Program, inputs: &[Inputs], nodes: bool) -> Vec<Vec<(String, HostTensor)>> {
    let handles = ThreadGroup::new(inputs.len(), Duration::from_secs(120));
    std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .into_iter()
            .zip(inputs)
            .map(|(h, inp)| {
                s.spawn(move || {
                    collective::scope(Arc::new(h), || {
                        if nodes {
                            coopc_runtime::execute_program_nodes(program, inp)
                        } else {
                            coopc_runtime::execute_program(program, inp)
                        }
                    })
                    .expect("a rank's meta-step")
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn meta(plan: &coopc_compiler::ir::plan::Plan) -> &Program {
    plan.meta_step()
}

/// Every output of every rank is bit-equal to rank 0's, and within `tol`
/// (relative to the tensor's norm) of the single process's.
fn assert_same(
    single: &[(String, HostTensor)],
    ranks: &[Vec<(String, HostTensor)>],
    tol: f64,
    what: &str,
) {
    let one: HashMap<&str, Vec<f64>> = single
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_f64_vec()))
        .collect();
    for (r, outs) in ranks.iter().enumerate() {
        assert_eq!(outs.len(), single.len(), "{what}: rank {r} outputs");
        for ((name, t), (name0, t0)) in outs.iter().zip(&ranks[0]) {
            assert_eq!(name, name0);
            assert_eq!(
                t.data, t0.data,
                "{what}: `{name}` differs between rank {r} and rank 0"
            );
        }
    }
    let mut worst = (0.0f64, String::new());
    for (name, t) in &ranks[0] {
        let e = rel_err(&t.to_f64_vec(), &one[name.as_str()], 1e-12);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: `{}` differs from one process by {:.3e} (tolerance {tol:.0e})",
        worst.1,
        worst.0
    );
    // Something was compared, and the run moved the parameters.
    assert!(ranks[0]
        .iter()
        .any(|(n, _)| n.starts_with("next.") || n.starts_with("theta_K.")));
}

/// A pipeline whose batches split over two processes and two mini-batches.
fn spec_for_world() -> PipelineSpec {
    let mut spec = tiny_spec();
    spec.sft.batch_size = 4;
    spec.rl.prompts_per_step = 2;
    spec
}

fn check(spec: &PipelineSpec, world: usize, seed: u64, tol: f64, what: &str) {
    check_edited(spec, world, seed, tol, what, |_| {});
}

/// [`check`] on inputs changed by `edit` first.
fn check_edited(
    spec: &PipelineSpec,
    world: usize,
    seed: u64,
    tol: f64,
    what: &str,
    edit: impl Fn(&mut Inputs),
) {
    let whole_plan = compile_for_world(spec.clone(), 1).unwrap();
    let dp_plan = compile_for_world(spec.clone(), world).unwrap();
    assert_eq!(dp_plan.world, world);
    let dp_graph = &meta(&dp_plan).graph;
    let sums = dp_graph
        .node_ids()
        .filter(|&id| matches!(dp_graph.op(id), Op::AllReduceSum))
        .count();
    assert!(sums > 0, "{what}: no sums over processes in the plan");
    let whole_graph = &meta(&whole_plan).graph;
    assert!(
        !whole_graph
            .node_ids()
            .any(|id| matches!(whole_graph.op(id), Op::AllReduceSum)),
        "{what}: a one-process plan sums over processes"
    );
    let ms = lower_meta_step_with(spec, BatchShapes::from_spec(spec), LowerOptions::default());
    let mut inputs = meta_inputs(spec, &ms, seed);
    edit(&mut inputs);
    let single = coopc_runtime::execute_program(meta(&whole_plan), &inputs).unwrap();
    let shards: Vec<Inputs> = (0..world).map(|r| shard(spec, &inputs, r, world)).collect();
    let fused = run_ranks(meta(&dp_plan), &shards, false);
    assert_same(&single, &fused, tol, what);
    let nodes = run_ranks(meta(&dp_plan), &shards, true);
    assert_same(&single, &nodes, tol, &format!("{what} (node by node)"));
}

#[test]
fn truncated_token_mean_on_two_processes_equals_one() {
    check(&spec_for_world(), 2, 1, 1e-12, "truncated, token_mean, sgd");
}

/// In bf16 a process rounds its share's sums (its weight gradients'
/// products over its rows) before they are added over processes, so two
/// processes give one process's meta-step to bf16's rounding, not bit for
/// bit: the gradients of two processes may differ from one process's by no
/// more than one process's bf16 gradients differ from f64's (on this
/// pipeline, whose two SGD steps at lr 0.5 make the hypergradient
/// ill-conditioned, f32 is 2e-5 from f64 and bf16 6e-1; two processes are
/// 2e-1 from one). Every rank still holds the same bits.
#[test]
fn bf16_on_two_processes_equals_one_to_bf16_rounding() {
    use coopc_compiler::ir::DType;
    use coopc_compiler::spec::Precision;
    let mut spec = spec_for_world();
    spec.backend.dtype = Precision::Bf16;
    let ms = lower_meta_step_with(
        &spec,
        BatchShapes::from_spec(&spec),
        LowerOptions::default(),
    );
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 3), DType::F32);
    let gradients = |outs: &[(String, HostTensor)]| {
        gradient_outputs(outs.iter().map(|(n, t)| (n.as_str(), t.to_f64_vec())))
    };
    let single =
        coopc_runtime::execute_program(meta(&compile_for_world(spec.clone(), 1).unwrap()), &inputs)
            .unwrap();
    let mut wide = spec.clone();
    wide.backend.dtype = Precision::F64;
    let reference = coopc_runtime::execute_program(
        meta(&compile_for_world(wide, 1).unwrap()),
        &with_float_dtype(&inputs, DType::F64),
    )
    .unwrap();
    let dp_plan = compile_for_world(spec.clone(), 2).unwrap();
    let shards: Vec<Inputs> = (0..2).map(|r| shard(&spec, &inputs, r, 2)).collect();
    let ranks = run_ranks(meta(&dp_plan), &shards, false);
    for (name, t) in &ranks[1] {
        let t0 = &ranks[0].iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(t.data, t0.data, "`{name}` differs between the ranks");
    }
    let want = gradients(&reference);
    let one = gradients(&single);
    let two = gradients(&ranks[0]);
    assert!(want.len() > 100 && one.len() == want.len() && two.len() == want.len());
    let bf16_error = rel_err(&one, &want, 1e-12);
    let split = rel_err(&two, &one, 1e-12);
    eprintln!("bf16 against f64 {bf16_error:.2e}; two processes against one {split:.2e}");
    assert!(bf16_error > 1e-4, "no bf16 rounding? {bf16_error:.2e}");
    assert!(
        split <= 2.0 * bf16_error,
        "two processes differ from one by {split:.2e}, more than bf16's own {bf16_error:.2e}"
    );
}

#[test]
fn first_order_seq_mean_with_kl_entropy_and_momentum_equals_one() {
    let mut spec = spec_for_world();
    spec.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
    spec.rl.loss_agg = LossAgg::SeqMean;
    spec.rl.kl_coef = 0.05;
    spec.rl.entropy_coef = 0.01;
    spec.optim.lower.kind = OptimKind::Momentum { momentum: 0.9 };
    spec.optim.upper.kind = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    check(
        &spec,
        2,
        2,
        1e-12,
        "first_order, seq_mean, KL, entropy, momentum/adamw",
    );
}

#[test]
fn truncated_seq_mean_momentum_over_mini_batches_equals_one() {
    let mut spec = spec_for_world();
    spec.rl.loss_agg = LossAgg::SeqMean;
    spec.rl.mini_batches = 2;
    spec.optim.lower.kind = OptimKind::Momentum { momentum: 0.5 };
    check(
        &spec,
        2,
        3,
        1e-12,
        "truncated, seq_mean, momentum, 2 mini-batches",
    );
}

#[test]
fn finite_differences_and_dr_grpo_on_four_processes_equal_one() {
    let mut spec = spec_for_world();
    spec.bilevel.hypergradient.kind = HypergradKind::FiniteDifference { eps: 1e-3 };
    spec.rl.loss_agg = LossAgg::SeqMeanTokenSumNorm;
    // The finite differences' rounding differs with the order of sums more
    // than an exact product's does.
    check(
        &spec,
        4,
        4,
        1e-9,
        "finite_difference, Dr. GRPO, 4 processes",
    );
}

/// Rank 1's share of every batch has no response token (all its rows
/// masked out): its loss shares are 0, not 0/0, and the processes still
/// compute what one process computes on the whole batch.
#[test]
fn a_process_whose_share_has_no_response_token_adds_nothing() {
    for agg in [LossAgg::TokenMean, LossAgg::SeqMean] {
        let mut spec = spec_for_world();
        spec.rl.loss_agg = agg;
        let minis = spec.rl.mini_batches.max(1);
        let zeroed = std::cell::Cell::new(0);
        check_edited(
            &spec,
            2,
            29,
            1e-12,
            &format!("{agg:?}, rank 1 without tokens"),
            |inputs| {
                for (name, t) in inputs.iter_mut() {
                    if name.starts_with("step") && name.ends_with("loss_mask") {
                        let row: usize = t.shape[1..].iter().product();
                        let mut v = t.to_f64_vec();
                        for r in shard_rows(t.shape[0], minis, 1, 2) {
                            v[r * row..(r + 1) * row].fill(0.0);
                        }
                        *t = HostTensor::from_f64(t.dtype(), t.shape.clone(), &v).unwrap();
                        zeroed.set(zeroed.get() + 1);
                    }
                }
            },
        );
        // The SFT and RL masks of every step batch.
        assert!(zeroed.get() >= 2, "{agg:?}: no mask was edited");
    }
}

#[test]
fn both_memory_plans_of_truncated_agree_across_processes() {
    let spec = spec_for_world();
    let world = 2;
    let whole = BatchShapes::from_spec(&spec);
    let per = BatchShapes::for_world(&spec, world).unwrap();
    for memory in [MemoryPlan::Keep, MemoryPlan::Recompute] {
        let opts = LowerOptions {
            memory: Some(memory),
            ..LowerOptions::default()
        };
        let one = lower_meta_step_with(&spec, whole, opts);
        let dp = lower_meta_step_with(&spec, per, opts);
        let inputs = meta_inputs(&spec, &one, 5);
        let single = coopc_runtime::execute(&one.graph, &inputs).unwrap();
        let handles = ThreadGroup::new(world, Duration::from_secs(120));
        let shards: Vec<Inputs> = (0..world)
            .map(|r| shard(&spec, &inputs, r, world))
            .collect();
        let ranks: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .zip(&shards)
                .map(|(h, inp)| {
                    let g = &dp.graph;
                    s.spawn(move || {
                        collective::scope(Arc::new(h), || coopc_runtime::execute(g, inp)).unwrap()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        assert_same(&single, &ranks, 1e-12, &format!("{memory:?}"));
    }
}

#[test]
fn batches_that_do_not_split_are_refused_naming_the_section() {
    let mut spec = spec_for_world();
    spec.sft.batch_size = 3;
    let e = compile_for_world(spec, 2).expect_err("refused");
    assert!(e.contains("sft.batch_size") && e.contains("3"), "{e}");
    let mut spec = spec_for_world();
    spec.rl.mini_batches = 2;
    let e = compile_for_world(spec, 4).expect_err("refused");
    assert!(
        e.contains("rl.mini_batches") && e.contains("multiple of 8"),
        "{e}"
    );
}

/// A tiny addition run in f64 whose batches split over two processes.
fn train_text() -> String {
    tiny_addition_f64().replace("steps = 4", "steps = 3")
}

fn run_options(dir: &std::path::Path) -> coopc_train::train::RunOptions {
    coopc_train::train::RunOptions {
        out_dir: dir.to_path_buf(),
        resume: false,
        progress: false,
        eval_limit: 4,
        stop_after: None,
    }
}

type Trained = (
    Vec<coopc_train::train::Metrics>,
    std::collections::BTreeMap<String, HostTensor>,
);

/// Trains `spec` on `world` processes (threads), each with its own output
/// folder; returns every rank's metrics and final state.
fn train_on(spec: &PipelineSpec, world: usize, dir: &std::path::Path) -> Vec<Trained> {
    use coopc_train::train::Trainer;
    let handles = ThreadGroup::new(world, Duration::from_secs(300));
    let plan = compile_for_world(spec.clone(), world).unwrap();
    std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .into_iter()
            .map(|h| {
                let plan = plan.clone();
                let out = dir.join(format!("rank{}", h.rank()));
                s.spawn(move || {
                    collective::scope(Arc::new(h), || {
                        let mut t = Trainer::new(plan, run_options(&out)).unwrap();
                        let m = t.run(|_| {}).unwrap();
                        (m, t.state().unwrap().tensors)
                    })
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    // Relative to the value, or to 1 for values near 0 (a loss of
    // advantages that average to 0 is a sum that cancels).
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}

fn check_training(spec: &PipelineSpec, name: &str) {
    check_split(spec, spec, 2, name);
}

/// `split` (micro-batches, processes) trains what `spec` trains on one
/// process; `split` runs on `world` processes.
fn check_split(spec: &PipelineSpec, split: &PipelineSpec, world: usize, name: &str) {
    let dir = tmpdir(name);
    let single = train_on(spec, 1, &dir.join("one")).remove(0);
    let ranks = train_on(split, world, &dir.join("two"));
    // The other ranks trained the same parameters and wrote nothing.
    for (r, rank) in ranks.iter().enumerate().skip(1) {
        let differ: Vec<&String> = rank
            .1
            .iter()
            .filter(|(n, t)| ranks[0].1.get(*n) != Some(*t))
            .map(|(n, _)| n)
            .collect();
        assert!(
            differ.is_empty(),
            "{name}: rank {r} holds other values of {differ:?}"
        );
        let dir = dir.join("two").join(format!("rank{r}"));
        assert!(!dir.join("metrics.jsonl").exists() && !dir.join("checkpoints").exists());
    }
    let rank0 = dir.join("two").join("rank0");
    assert!(rank0.join("metrics.jsonl").exists() && rank0.join("checkpoints").exists());
    let (m1, s1) = &single;
    let (m2, s2) = &ranks[0];
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(m2) {
        let pairs = [
            ("sft_loss", Some(a.sft_loss), Some(b.sft_loss)),
            ("rl_loss", a.rl_loss, b.rl_loss),
            ("reward_mean", a.reward_mean, b.reward_mean),
            ("accuracy", a.accuracy, b.accuracy),
            ("coop_gain", a.coop_gain, b.coop_gain),
            ("kl", a.kl, b.kl),
            ("entropy", a.entropy, b.entropy),
            ("response_len", a.response_len, b.response_len),
            ("truncated", a.truncated, b.truncated),
            ("grad_norm_lower", a.grad_norm_lower, b.grad_norm_lower),
            ("grad_norm_upper", a.grad_norm_upper, b.grad_norm_upper),
            ("eval_accuracy", a.eval_accuracy, b.eval_accuracy),
        ];
        for (what, x, y) in pairs {
            match (x, y) {
                (Some(x), Some(y)) => assert!(
                    close(x, y, 1e-10),
                    "{name}, step {}: {what} {x} on one process, {y} on two",
                    a.step
                ),
                (x, y) => assert_eq!(x.is_some(), y.is_some(), "{name}: {what}"),
            }
        }
        assert!(a.sft_loss.is_finite() && a.reward_mean.is_some());
    }
    // Some step had an RL signal (rewards that differ within a group).
    assert!(
        m1.iter().any(|m| m.rl_loss.is_some_and(|l| l != 0.0)),
        "{name}: no RL signal in {m1:?}"
    );
    let mut moved = 0;
    for (n, t) in s1 {
        let e = rel_err(&s2[n].to_f64_vec(), &t.to_f64_vec(), 1e-12);
        // Three AdamW steps amplify the rounding of sums taken in another
        // order (a meta-step itself agrees to 1e-12, see above).
        assert!(
            e <= 1e-9,
            "{name}: `{n}` differs by {e:.3e} between one and two processes"
        );
        moved += (n.contains("lora_B") && t.to_f64_vec().iter().any(|&x| x != 0.0)) as usize;
    }
    assert!(moved > 0, "{name}: the adapter never moved");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_on_two_processes_equals_one_truncated_token_mean() {
    let mut spec = pipeline(&train_text());
    // An untrained model answers nothing right: the KL penalty in the
    // reward is what makes rewards, and so advantages, differ by row.
    spec.rl.kl_coef = 0.5;
    spec.rl.kl_in_reward = true;
    check_training(&spec, "truncated");
}

#[test]
fn training_on_two_processes_equals_one_first_order_seq_mean_with_kl() {
    let mut spec = pipeline(&train_text());
    spec.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
    spec.rl.loss_agg = LossAgg::SeqMean;
    spec.rl.kl_coef = 0.5;
    spec.rl.kl_in_reward = true;
    spec.rl.advantage = coopc_compiler::spec::Advantage::BatchStd;
    check_training(&spec, "first-order");
}

#[test]
fn two_micro_batches_train_what_one_batch_trains() {
    let mut spec = pipeline(&train_text());
    spec.rl.kl_coef = 0.5;
    spec.rl.kl_in_reward = true;
    spec.rl.advantage = coopc_compiler::spec::Advantage::BatchStd;
    let mut micro = spec.clone();
    micro.train.micro_batches = 2;
    let plan = compile_for_world(micro.clone(), 1).unwrap();
    assert_eq!(plan.world, 1);
    // The meta-step takes one micro-batch's rows; the scorer the process's.
    let rows = |prog: &Program| {
        prog.signature
            .inputs
            .iter()
            .find(|i| i.name.ends_with("rl.input_ids") || i.name == "input_ids")
            .map(|i| i.ty.shape[0])
    };
    assert_eq!(rows(plan.meta_step()), Some(2));
    assert_eq!(rows(plan.logprobs()), Some(4));
    check_split(&spec, &micro, 1, "micro");
}

#[test]
fn micro_batches_on_two_processes_train_what_one_process_trains() {
    let mut spec = pipeline(&train_text());
    spec.sft.batch_size = 4;
    spec.rl.kl_coef = 0.5;
    spec.rl.kl_in_reward = true;
    spec.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
    spec.rl.loss_agg = LossAgg::SeqMean;
    let mut micro = spec.clone();
    micro.train.micro_batches = 2;
    check_split(&spec, &micro, 2, "micro-two");
}

#[test]
fn micro_batches_that_do_not_split_the_batch_are_refused_in_the_pipeline() {
    let text = train_text().replace("seed = 5", "seed = 5\nmicro_batches = 3");
    let e = coopc_compiler::frontend::parse_pipeline(&text)
        .expect_err("refused")
        .render("p.toml", &text);
    assert!(
        e.contains("micro_batches") && e.contains("batch_size"),
        "{e}"
    );
}

#[test]
fn a_plan_for_another_number_of_processes_is_refused() {
    let spec = pipeline(&train_text());
    let plan = compile_for_world(spec, 2).unwrap();
    let dir = tmpdir("mismatch");
    let e = coopc_train::train::Trainer::new(plan, run_options(&dir))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("compiled for 2 process(es)") && e.contains("has 1"),
        "{e}"
    );
}

#[test]
fn dynamic_sampling_with_micro_batches_is_refused_clearly() {
    let mut spec = pipeline(&train_text());
    spec.train.micro_batches = 2;
    spec.rl.dynamic_sampling = true;
    let dir = tmpdir("dynamic");
    let e =
        coopc_train::train::Trainer::new(compile_for_world(spec, 1).unwrap(), run_options(&dir))
            .err()
            .expect("refused")
            .to_string();
    assert!(
        e.contains("rl.dynamic_sampling") && e.contains("micro_batches"),
        "{e}"
    );
}
