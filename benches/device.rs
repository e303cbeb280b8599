//! GPU benches, run when a CUDA device answers (or on wgpu with
//! `COOPC_BENCH_DEVICE=wgpu`; elsewhere they print why they are skipped):
//! the fused linear log-prob at the "medium" shapes (4,096 tokens, d 1,024)
//! for a 32k and a 128k vocabulary (32k only on wgpu, whose bindings are
//! limited in size), against its bound (2·T·V·d FLOPs, printed; the
//! throughput line is FLOP/s). Its memory is the inputs plus 2·T output
//! floats at any vocabulary: no `[T, V]` buffer exists. `scripts/gpu-check.sh` runs
//! the compiled bench binary on a GPU machine.

use coopc_kernels::device::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cubecl::prelude::Runtime;
use std::hint::black_box;
use std::time::Duration;

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000;
            (x as f32 / 1000.0 - 1.0) * scale
        })
        .collect()
}

fn bench_on<R: Runtime>(c: &mut Criterion, dev: Device<R>, tokens: usize, vocabs: &[usize]) {
    let d = 1024;
    let h = values(tokens * d, 1, 1.0);
    let targets: Vec<f32> = (0..tokens).map(|i| (i * 7919 % 32_000) as f32).collect();
    let mut group = c.benchmark_group(format!("linear_logprob_{}", dev.backend()));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for &vocab in vocabs {
        let w = values(vocab * d, 2, 0.05);
        let flops = 2.0 * tokens as f64 * vocab as f64 * d as f64;
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(format!("t{tokens}_d{d}_v{vocab}"), |b| {
            b.iter(|| black_box(dev.linear_logprob(&h, &w, &targets, d).expect("runs")))
        });
        eprintln!(
            "linear_logprob t{tokens} v{vocab}: {:.3} GFLOP per call; inputs {:.1} MiB",
            flops / 1e9,
            ((tokens + vocab) * d * 4) as f64 / (1u64 << 20) as f64
        );
    }
    group.finish();
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

criterion_group!(benches, linear_logprob);
criterion_main!(benches);
