//! The CPU executor on a program's fused kernels (`coopc_runtime::fused_cpu`)
//! against the node-by-node executor: every output of the meta-step, bit
//! for bit, over the bench pipelines in f32, f64 and bf16, every method and
//! hypergradient, and the lower optimisers, loss aggregations, KL penalty
//! and grouped-query attention that change the graph. Each program must run fused (no silent
//! fallback to the node executor).

use coopc_compiler::compile;
use coopc_compiler::frontend::parse_pipeline;
use coopc_compiler::plan::{BatchField, Program, LAMBDA};
use coopc_compiler::spec::PipelineSpec;
use coopc_runtime::fused_cpu::FusedPlan;
use coopc_runtime::{execute_program_nodes, Buffer, HostTensor};
use coopc_train::init::{init_params, initial_state, synthetic_batch};
use std::collections::HashMap;
use std::path::Path;

fn text(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect("pipeline")
}

fn spec(text: &str) -> PipelineSpec {
    parse_pipeline(text).unwrap_or_else(|d| panic!("{}", d.render("test.toml", text)))
}

/// `text` with `key = …` of `[table]` set to `value` (the key added when absent).
fn with(text: &str, table: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut in_table = false;
    let mut done = false;
    for line in text.lines() {
        let header = line.trim_start().starts_with('[');
        if header && in_table && !done {
            out += &format!("{key} = {value}\n");
            done = true;
        }
        if header {
            in_table = line.trim() == format!("[{table}]");
        }
        if in_table && line.split('=').next().map(str::trim) == Some(key) {
            out += &format!("{key} = {value}\n");
            done = true;
            continue;
        }
        out += line;
        out += "\n";
    }
    if in_table && !done {
        out += &format!("{key} = {value}\n");
    } else if !done {
        out += &format!("[{table}]\n{key} = {value}\n");
    }
    out
}

/// Initial θ, w, state, a synthetic batch per lower step and λ: what a run
/// gives the meta-step at its first step.
fn meta_inputs(
    spec: &PipelineSpec,
    plan: &coopc_compiler::plan::Plan,
) -> HashMap<String, HostTensor> {
    let meta = plan.meta_step();
    let params = init_params(meta.signature.parameters(), 3);
    let batch = synthetic_batch(spec, plan.logprobs(), &params, 5).expect("batch");
    let mut inputs: HashMap<String, HostTensor> =
        initial_state(&meta.signature, |n| params.get(n).cloned())
            .into_iter()
            .chain(params.clone())
            .collect();
    for k in 0..spec.bilevel.hypergradient.unroll.max(1) {
        for f in BatchField::ALL {
            if let Some(t) = batch.get(f.key()) {
                inputs.insert(f.input_name(k), t.clone());
            }
        }
    }
    let dt = spec.backend.dtype.dtype();
    inputs.insert(
        LAMBDA.into(),
        HostTensor::from_f64(dt, vec![], &[spec.lambda_at(0)]).unwrap(),
    );
    inputs
}

fn bits(b: &Buffer) -> Vec<u64> {
    match b {
        Buffer::F32(v) | Buffer::Bf16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
        Buffer::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
        Buffer::I32(v) => v.iter().map(|&x| x as u64).collect(),
        Buffer::Bool(v) => v.iter().map(|&x| x as u64).collect(),
    }
}

/// Runs `program` both ways and requires every output bit-identical;
/// returns the number of fused elementwise and reduction kernels.
fn same(label: &str, program: &Program, inputs: &HashMap<String, HostTensor>) -> (usize, usize) {
    let plan = FusedPlan::new(program).unwrap_or_else(|e| {
        panic!(
            "{label}: the {} program does not run fused: {e}",
            program.name()
        )
    });
    let fused = plan.run(inputs).expect("fused run");
    let nodes = execute_program_nodes(program, inputs).expect("node run");
    assert_eq!(fused.len(), nodes.len(), "{label}: output count");
    let mut checked = 0;
    for ((n1, t1), (n2, t2)) in fused.iter().zip(&nodes) {
        assert_eq!(n1, n2, "{label}: output order");
        assert_eq!(t1.shape, t2.shape, "{label}: {n1} shape");
        assert_eq!(t1.dtype(), t2.dtype(), "{label}: {n1} dtype");
        let (a, b) = (bits(&t1.data), bits(&t2.data));
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!(
                "{label}: output {n1} differs at element {i}: fused {:?}, node by node {:?}",
                t1.to_f64_vec()[i],
                t2.to_f64_vec()[i]
            );
        }
        checked += a.len();
    }
    assert!(checked > 0, "{label}: no output values compared");
    // Relabelings of values that live on are read in place.
    let [_, aliased, _] = plan.relabel_counts();
    assert!(
        aliased > 0,
        "{label}: no relabeling read its operand in place"
    );
    let (e, r, _) = program.fused.count();
    (e, r)
}

/// Checks the meta-step of the pipeline `text`; returns its count of fused
/// reductions.
fn check(label: &str, text: &str) -> usize {
    let spec = spec(text);
    let plan = compile(spec.clone());
    let inputs = meta_inputs(&spec, &plan);
    let (e, r) = same(label, plan.meta_step(), &inputs);
    assert!(e > 10, "{label}: only {e} elementwise kernels");
    r
}

#[test]
fn bench_pipelines_fused_equal_node_by_node_in_f32_f64_and_bf16() {
    for name in ["tiny-first-order", "tiny-truncated", "tiny-truncated-keep"] {
        let t = text(&format!("benches/pipelines/{name}.toml"));
        let r = check(&format!("{name} f32"), &t);
        for dtype in ["f64", "bf16"] {
            check(
                &format!("{name} {dtype}"),
                &with(&t, "backend", "dtype", &format!("\"{dtype}\"")),
            );
        }
        // The truncated hypergradient's adjoint sums over broadcast axes.
        assert!(
            name == "tiny-first-order" || r > 0,
            "{name}: no fused reduction checked"
        );
    }
}

#[test]
fn the_default_example_fused_equals_node_by_node() {
    check("examples/addition.toml", &text("examples/addition.toml"));
}

#[test]
fn every_method_and_hypergradient_fused_equals_node_by_node() {
    let t = text("benches/pipelines/tiny-first-order.toml");
    for method in ["sft", "rl_zero", "mix", "alternating", "cold_start"] {
        check(
            method,
            &with(&t, "bilevel", "method", &format!("\"{method}\"")),
        );
    }
    check(
        "finite_difference",
        &with(
            &t,
            "bilevel",
            "hypergradient",
            "{ kind = \"finite_difference\", unroll = 2 }",
        ),
    );
}

#[test]
fn optimisers_aggregations_kl_and_gqa_fused_equal_node_by_node() {
    let t = text("benches/pipelines/tiny-truncated.toml");
    for (label, table, key, value) in [
        ("lower momentum", "optim.lower", "kind", "\"momentum\""),
        ("lower adamw", "optim.lower", "kind", "\"adamw\""),
        ("seq_mean", "rl", "loss_agg", "\"seq_mean\""),
        ("Dr. GRPO", "rl", "loss_agg", "\"seq_mean_token_sum_norm\""),
        ("KL penalty", "rl", "kl_coef", "0.05"),
        ("grouped-query attention", "model", "n_kv_heads", "2"),
    ] {
        assert!(
            check(label, &with(&t, table, key, value)) > 0,
            "{label}: no reduction"
        );
    }
}
