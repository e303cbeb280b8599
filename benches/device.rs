//! GPU benches, run when a CUDA device answers (or on wgpu with
//! `COOPC_BENCH_DEVICE=wgpu`; elsewhere they print why they are skipped).
//! Operands are resident on the device and each call waits for its
//! kernels; no host copy is timed.
//!
//! - The fused linear log-prob at the "medium" shapes (4,096 tokens, d
//!   1,024) for a 32k and a 128k vocabulary (64 tokens and 32k on wgpu),
//!   with each matmul (CubeCL's: the logits a chunk at a time through its
//!   products; coopc's: fused register-blocked kernels). Forward, and both
//!   gradients (3× the forward's FLOPs: the logits recomputed, then dh and
//!   dW products). The throughput line is FLOP/s against 2·T·V·d per
//!   forward. Each prints the backward's device memory beyond its operands:
//!   dh and dW plus one chunk of scratch, the same at any vocabulary.
//! - The causal attention kernels, forward and forward + backward, at the
//!   medium pipeline's shapes (batch 8, 16 heads, 512 positions, head dim
//!   64); the throughput is the causal FLOPs a fused implementation does
//!   (`2·B·H·T(T+1)·hd` forward, 2.5× that for the backward; the backward
//!   kernels recompute the scores, once for `dq` and once for `dk, dv`).
//! - The matrix product at the medium MLP's shape (`[4096, 1024] × [1024,
//!   2816]`): coopc's register-blocked kernel and plain 16 × 16 tiling,
//!   and CubeCL's routines; the throughput is 2·m·k·n FLOP/s.
//! - Token generation through the KV-cache decode step (the sampler on the
//!   device, tokens drawn there): the medium pipeline's model, 8 rows × 240
//!   new tokens after 16 prompt tokens, a 256-position cache (on wgpu the
//!   default example's model, 16 rows × 120 tokens); the throughput is
//!   tokens per second.
//!
//! `COOPC_BENCH_SECS` sets every group's measurement time (default 5 to 20
//! seconds). `scripts/gpu-check.sh` runs the compiled bench binary on a GPU
//! machine.

use coopc_compiler::frontend::load_pipeline;
use coopc_compiler::ir::kernel::device_chunk;
use coopc_kernels::attention::AttentionShape;
use coopc_kernels::device::Device;
use coopc_kernels::linear_logprob::LogprobShape;
use coopc_kernels::matmul::{CubeclStrategy as Strategy, MatmulKernel, MatmulShape, Product};
use coopc_runtime::{Backend, HostTensor};
use coopc_train::init::init_params;
use coopc_train::sampler::{Sampler, SamplingConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cubecl::prelude::Runtime;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000;
            (x as f32 / 1000.0 - 1.0) * scale
        })
        .collect()
}

fn bench_on<R: Runtime>(c: &mut Criterion, mut dev: Device<R>, tokens: usize, vocabs: &[usize]) {
    let d = 1024;
    let h = dev.upload(&values(tokens * d, 1, 1.0));
    let targets: Vec<f32> = (0..tokens).map(|i| (i * 7919 % 32_000) as f32).collect();
    let (targets, g) = (dev.upload(&targets), dev.upload(&values(tokens, 9, 1.0)));
    let mut group = c.benchmark_group(format!("linear_logprob_{}", dev.backend()));
    group.sample_size(10).measurement_time(seconds(10));
    let default = dev.matmul;
    for &vocab in vocabs {
        let w = dev.upload(&values(vocab * d, 2, 0.05));
        let shape = LogprobShape::tokens(tokens, d, vocab);
        let flops = 2.0 * tokens as f64 * vocab as f64 * d as f64;
        let chunk = device_chunk(tokens, vocab);
        // The logits through each matmul: CubeCL's a chunk at a time (in
        // f32, and on CUDA also in TF32 on tensor cores), coopc's fused
        // with the log-sum-exp.
        let mut kernels = MatmulKernel::ALL.to_vec();
        if dev.backend() == "cuda" {
            kernels.insert(1, MatmulKernel::CubeclTf32);
        }
        for kernel in kernels {
            dev.matmul = kernel;
            let tag = format!("{kernel:?}_t{tokens}_d{d}_v{vocab}").to_lowercase();
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(format!("forward_{tag}"), |b| {
                b.iter(|| {
                    let out = dev.launch_linear_logprob([&h, &w, &targets], tokens * d, shape);
                    dev.wait().expect("runs");
                    black_box(out)
                })
            });
            // Both gradients: the logits recomputed once (2·T·V·d) and two
            // products of the same size.
            let (_, lse) = dev.launch_linear_logprob([&h, &w, &targets], tokens * d, shape);
            let ops = [&h, &w, &targets, &lse, &g];
            group.throughput(Throughput::Elements(3 * flops as u64));
            group.bench_function(format!("backward_{tag}"), |b| {
                b.iter(|| {
                    let out = dev.launch_linear_logprob_backward(ops, shape, [true, true], chunk);
                    dev.wait().expect("runs");
                    black_box(out)
                })
            });
            // The device memory beyond the operands and the results: flat
            // in the vocabulary (one chunk of logits or coefficients).
            dev.wait().expect("runs");
            dev.track_memory(true);
            let before = dev.memory_peak().expect("tracked");
            let grads = dev.launch_linear_logprob_backward(ops, shape, [true, true], chunk);
            dev.wait().expect("runs");
            let peak = dev.memory_peak().expect("tracked");
            dev.track_memory(false);
            drop(grads);
            eprintln!(
                "linear_logprob {tag}: backward peak {:.1} MiB above the operands' {:.1} MiB \
                 (dh and dW {:.1} MiB of it)",
                (peak - before) as f64 / MIB,
                before as f64 / MIB,
                ((tokens + vocab) * d * 4) as f64 / MIB
            );
        }
        dev.matmul = default;
        eprintln!(
            "linear_logprob t{tokens} v{vocab}: {:.3} GFLOP per forward; operands resident, \
             each call waits for its kernels",
            flops / 1e9,
        );
    }
    group.finish();
}

const MIB: f64 = (1u64 << 20) as f64;

/// A group's measurement time: `default` seconds, or `COOPC_BENCH_SECS`
/// where it is set (a short check on a borrowed GPU).
fn seconds(default: u64) -> Duration {
    let secs = std::env::var("COOPC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0);
    secs.map_or(Duration::from_secs(default), Duration::from_secs_f64)
}

fn attention_on<R: Runtime>(c: &mut Criterion, dev: Device<R>, s: AttentionShape) {
    let q_len = s.batch * s.heads * s.seq * s.head_dim;
    let kv_len = s.batch * s.kv_heads * s.seq * s.head_dim;
    let (q, k, v) = (
        dev.upload(&values(q_len, 3, 1.0)),
        dev.upload(&values(kv_len, 4, 1.0)),
        dev.upload(&values(kv_len, 5, 1.0)),
    );
    let d_o = dev.upload(&values(q_len, 6, 1.0));
    let fwd_flops =
        2.0 * (s.batch * s.heads) as f64 * (s.seq * (s.seq + 1)) as f64 * s.head_dim as f64;
    let mut group = c.benchmark_group(format!("attention_{}", dev.backend()));
    group.sample_size(10).measurement_time(seconds(10));
    let name = format!("b{}_h{}_t{}_hd{}", s.batch, s.heads, s.seq, s.head_dim);
    group.throughput(Throughput::Elements(fwd_flops as u64));
    group.bench_function(format!("forward_{name}"), |b| {
        b.iter(|| {
            let out = dev.launch_attention([&q, &k, &v], s).expect("runs");
            dev.wait().expect("runs");
            black_box(out)
        })
    });
    let (o, lse) = dev.launch_attention([&q, &k, &v], s).expect("runs");
    group.throughput(Throughput::Elements((2.5 * fwd_flops) as u64));
    group.bench_function(format!("backward_{name}"), |b| {
        b.iter(|| {
            let ops = [&q, &k, &v, &o, &lse, &d_o];
            let out = dev.launch_attention_backward(ops, s, true).expect("runs");
            dev.wait().expect("runs");
            black_box(out)
        })
    });
    eprintln!(
        "attention {name}: {:.3} GFLOP forward, {:.3} GFLOP backward (causal, fused count)",
        fwd_flops / 1e9,
        2.5 * fwd_flops / 1e9
    );
    group.finish();
}

fn attention(c: &mut Criterion) {
    let medium = AttentionShape {
        batch: 8,
        heads: 16,
        kv_heads: 16,
        seq: 512,
        head_dim: 64,
    };
    match std::env::var("COOPC_BENCH_DEVICE").as_deref() {
        Ok("wgpu") => match Device::wgpu() {
            Ok(dev) => attention_on(
                c,
                dev,
                AttentionShape {
                    batch: 1,
                    heads: 2,
                    kv_heads: 2,
                    seq: 128,
                    ..medium
                },
            ),
            Err(e) => eprintln!("skipped: {e}"),
        },
        _ => match Device::cuda() {
            Ok(dev) => attention_on(c, dev, medium),
            Err(e) => eprintln!("skipped (set COOPC_BENCH_DEVICE=wgpu to use wgpu): {e}"),
        },
    }
}

fn linear_logprob(c: &mut Criterion) {
    match std::env::var("COOPC_BENCH_DEVICE").as_deref() {
        Ok("wgpu") => match Device::wgpu() {
            // lavapipe emulates a GPU on the CPU: a small token count.
            Ok(dev) => bench_on(c, dev, 64, &[32_000]),
            Err(e) => eprintln!("skipped: {e}"),
        },
        _ => match Device::cuda() {
            Ok(dev) => bench_on(c, dev, 4096, &[32_000, 128_000]),
            Err(e) => eprintln!("skipped (set COOPC_BENCH_DEVICE=wgpu to use wgpu): {e}"),
        },
    }
}

fn matmul_on<R: Runtime>(c: &mut Criterion, dev: Device<R>, [m, k, n]: [usize; 3]) {
    let a = dev.upload(&values(m * k, 7, 1.0));
    let b = dev.upload(&values(k * n, 8, 1.0));
    let shape = MatmulShape {
        batch: 1,
        m,
        k,
        n,
        trans_a: false,
        trans_b: false,
    };
    let mut group = c.benchmark_group(format!("matmul_{}", dev.backend()));
    group.sample_size(10).measurement_time(seconds(5));
    group.throughput(Throughput::Elements((2 * m * k * n) as u64));
    for (name, kernel) in [
        ("wide", Product::Wide),
        ("blocked", Product::Blocked),
        ("tiled", Product::Tiled),
    ] {
        group.bench_function(format!("{name}_{m}x{k}x{n}"), |bch| {
            bch.iter(|| {
                let out = dev.launch_matmul(&a, &b, shape, kernel);
                dev.wait().expect("runs");
                black_box(out)
            })
        });
    }
    // CubeCL's matmul routines: the f32 ones on CUDA cores, and its own
    // choice (`auto`, which may compute in TF32 on tensor cores).
    for (name, strategy) in [
        (
            "cubecl_simple_unit",
            Strategy::SimpleUnit(Default::default()),
        ),
        (
            "cubecl_double_unit",
            Strategy::DoubleUnit(Default::default()),
        ),
        ("cubecl_auto", Strategy::Auto),
    ] {
        group.bench_function(format!("{name}_{m}x{k}x{n}"), |bch| {
            bch.iter(|| {
                let out = dev.launch_matmul_cubecl(&a, &b, shape, &strategy);
                dev.wait().expect("runs");
                black_box(out.expect("launches"))
            })
        });
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    match std::env::var("COOPC_BENCH_DEVICE").as_deref() {
        Ok("wgpu") => match Device::wgpu() {
            Ok(dev) => matmul_on(c, dev, [256, 256, 256]),
            Err(e) => eprintln!("skipped: {e}"),
        },
        _ => match Device::cuda() {
            Ok(dev) => matmul_on(c, dev, [4096, 1024, 2816]),
            Err(e) => eprintln!("skipped (set COOPC_BENCH_DEVICE=wgpu to use wgpu): {e}"),
        },
    }
}

fn decode_on(
    c: &mut Criterion,
    backend: Arc<dyn Backend>,
    pipeline: &str,
    rows: usize,
    new: usize,
) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(pipeline);
    let (_, mut spec) = load_pipeline(&path).expect("valid pipeline");
    let (prompt_len, max_len) = (16, 256);
    spec.model.max_seq = spec.model.max_seq.max(max_len);
    let (decode, merge) = coopc_compiler::sampling_programs(&spec, rows, max_len);
    let sampler = Sampler::new(decode, merge)
        .expect("a decode step")
        .with_backend(backend.clone());
    let params: HashMap<String, HostTensor> =
        init_params(&coopc_compiler::parameter_ports(&spec), 0)
            .into_iter()
            .collect();
    let prompts: Vec<Vec<i32>> = (0..rows)
        .map(|r| (0..prompt_len).map(|i| ((r + i) % 10) as i32 + 1).collect())
        .collect();
    let cfg = SamplingConfig {
        top_k: 0,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: new,
        // Outside the vocabulary: every row generates all its tokens.
        stop_tokens: vec![],
        pad_token: 0,
        greedy: false,
    };
    let name = std::path::Path::new(pipeline)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut group = c.benchmark_group(format!("decode_{}", backend.name()));
    group.sample_size(10).measurement_time(seconds(20));
    group.throughput(Throughput::Elements((rows * new) as u64));
    group.bench_function(format!("{name}_{rows}x{new}_tokens"), |b| {
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

fn decode(c: &mut Criterion) {
    match std::env::var("COOPC_BENCH_DEVICE").as_deref() {
        Ok("wgpu") => match Device::wgpu() {
            Ok(dev) => decode_on(c, Arc::new(dev), "examples/addition.toml", 16, 120),
            Err(e) => eprintln!("skipped: {e}"),
        },
        _ => match Device::cuda() {
            Ok(dev) => decode_on(
                c,
                Arc::new(dev),
                "benches/pipelines/medium-first-order.toml",
                8,
                240,
            ),
            Err(e) => eprintln!("skipped (set COOPC_BENCH_DEVICE=wgpu to use wgpu): {e}"),
        },
    }
}

criterion_group!(benches, linear_logprob, attention, matmul, decode);
criterion_main!(benches);
