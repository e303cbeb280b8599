//! Pipeline-level benches: compiling the default example (frontend, both
//! lowerings and the pass pipeline — what `coopc compile` does before
//! writing the plan), one meta-step of each CPU bench pipeline on the CPU
//! executor (the graph the trainer runs, all outputs), and sampler
//! throughput (KV-cache decoding of the default example's model).
//!
//! The PyTorch comparison of the meta-step is `benches/compare.sh`.

use coopc_compiler::frontend::load_pipeline;
use coopc_compiler::lowering::{float_dtype, lower_logprobs, lower_meta_step, BatchShapes};
use coopc_compiler::passes::Pipeline;
use coopc_runtime::init::{init_params, initial_state, synthetic_batch};
use coopc_runtime::sampler::{Sampler, SamplingConfig};
use coopc_runtime::{execute, HostTensor};
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
            let shapes = BatchShapes::from_spec(&spec);
            let ms = lower_meta_step(&spec, shapes);
            let mut lp = lower_logprobs(&spec, shapes);
            Pipeline::standard().run(&mut lp);
            black_box((ms.graph.node_count(), lp.node_count()))
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
        let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
        let params = init_params(&spec, float_dtype(spec.backend.dtype), 0);
        let batch = synthetic_batch(&spec, &params, 0).expect("batch");
        let mut inputs: HashMap<String, HostTensor> =
            initial_state(&ms.graph, |n| params.get(n).cloned())
                .into_iter()
                .chain(params.clone())
                .collect();
        for k in 0..spec.bilevel.hypergradient.unroll.max(1) {
            for (key, t) in &batch {
                inputs.insert(format!("step{k}.{key}"), t.clone());
            }
        }
        let lambda = spec.lambda_at(0);
        let dt = float_dtype(spec.backend.dtype);
        inputs.insert(
            "lambda".into(),
            HostTensor::from_f64(dt, vec![], &[lambda]).unwrap(),
        );
        group.bench_function(name, |b| {
            b.iter(|| black_box(execute(&ms.graph, &inputs).expect("meta-step runs")))
        });
    }
    group.finish();
}

fn sampler(c: &mut Criterion) {
    let (_, spec) = load_pipeline(&root("examples/addition.toml")).expect("valid example");
    let (batch, prompt_len, new_tokens) = (16, 8, 16);
    let sampler = Sampler::new(&spec, batch, prompt_len + new_tokens);
    let params: HashMap<String, HostTensor> =
        init_params(&spec, float_dtype(spec.backend.dtype), 0)
            .into_iter()
            .collect();
    let prompts: Vec<Vec<i32>> = (0..batch)
        .map(|r| (0..prompt_len).map(|i| ((r + i) % 10) as i32 + 1).collect())
        .collect();
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: new_tokens,
        // Outside the vocabulary: every row generates all its tokens.
        stop_token: -1,
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
