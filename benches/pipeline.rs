//! Pipeline-level benches: compiling the default example (what `coopc
//! compile` does before writing the plan: every program lowered,
//! optimised, scheduled and fused), one meta-step of each CPU bench pipeline on the CPU
//! executor (the graph the trainer runs, all outputs), and sampler
//! throughput (KV-cache decoding of the default example's model).
//!
//! The PyTorch comparison of the meta-step is `benches/compare.sh`.

use coopc_compiler::frontend::load_pipeline;
use coopc_compiler::plan::{BatchField, LAMBDA};
use coopc_compiler::{compile as compile_spec, sampling_programs};
use coopc_runtime::{execute_program, HostTensor};
use coopc_train::init::{init_params, initial_state, synthetic_batch};
use coopc_train::sampler::{Sampler, SamplingConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

fn root(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn compile(c: &mut Criterion) {
    let path = root("examples/addition.toml");
    c.bench_function("compile/examples_addition", |b| {
        b.iter(|| {
            let (_, spec) = load_pipeline(&path).expect("valid example");
            black_box(compile_spec(spec).programs.len())
        })
    });
}

fn meta_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("meta_step_cpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for name in ["tiny-first-order", "tiny-truncated"] {
        let (_, spec) = load_pipeline(&root(&format!("benches/pipelines/{name}.toml")))
            .expect("valid bench pipeline");
        let plan = compile_spec(spec.clone());
        let meta = plan.meta_step();
        let params = init_params(meta.signature.parameters(), 0);
        let batch = synthetic_batch(&spec, plan.logprobs(), &params, 0).expect("batch");
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
        let lambda = spec.lambda_at(0);
        let dt = spec.backend.dtype.dtype();
        inputs.insert(
            LAMBDA.into(),
            HostTensor::from_f64(dt, vec![], &[lambda]).unwrap(),
        );
        group.bench_function(name, |b| {
            b.iter(|| black_box(execute_program(meta, &inputs).expect("meta-step runs")))
        });
    }
    group.finish();
}

fn sampler(c: &mut Criterion) {
    let (_, spec) = load_pipeline(&root("examples/addition.toml")).expect("valid example");
    let (batch, prompt_len, new_tokens) = (16, 8, 16);
    let (decode, merge) = sampling_programs(&spec, batch, prompt_len + new_tokens);
    let sampler = Sampler::new(decode, merge).expect("a decode step");
    let params: HashMap<String, HostTensor> =
        init_params(&coopc_compiler::parameter_ports(&spec), 0)
            .into_iter()
            .collect();
    let prompts: Vec<Vec<i32>> = (0..batch)
        .map(|r| (0..prompt_len).map(|i| ((r + i) % 10) as i32 + 1).collect())
        .collect();
    let cfg = SamplingConfig {
        top_k: 0,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: new_tokens,
        // Outside the vocabulary: every row generates all its tokens.
        stop_tokens: vec![],
        pad_token: 0,
        greedy: false,
    };
    let mut group = c.benchmark_group("sampler");
    group.sample_size(10);
    group.throughput(Throughput::Elements((batch * new_tokens) as u64));
    group.bench_function("addition_example_16x16_tokens", |b| {
        let mut rng = StdRng::seed_from_u64(0);
        b.iter(|| {
            black_box(
                sampler
                    .generate(&params, &prompts, &cfg, &mut rng)
                    .expect("generates"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, compile, meta_step, sampler);
criterion_main!(benches);
