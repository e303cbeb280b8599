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
use coopc_runtime::collective::{self, shard_rows, ThreadGroup};
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
        Buffer::Bool(_) => panic!("no boolean batch tensors"),
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
    let inputs = meta_inputs(spec, &ms, seed);
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
