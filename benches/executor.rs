//! CPU executor benches: a 512×512 f32 matmul through the executor beside
//! `matrixmultiply::sgemm` called directly, on one thread (the executor
//! splits a large product over its threads by output rows, so it should
//! take at most the peer's time, and about 1/cores of it), and a
//! matmul-heavy graph (an MLP's loss, gradient and Hessian-vector product).

use coopc_compiler::autodiff::{grad, vjp};
use coopc_compiler::ir::{DType, Graph};
use coopc_compiler::passes::Pipeline;
use coopc_runtime::{execute, HostTensor};
use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::HashMap;
use std::hint::black_box;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

fn matmul_512(c: &mut Criterion) {
    let n = 512;
    let a = values(n * n, 1);
    let b = values(n * n, 2);
    let mut group = c.benchmark_group("matmul_512_f32");
    group.bench_function("matrixmultiply_sgemm_direct", |bench| {
        let mut out = vec![0f32; n * n];
        bench.iter(|| {
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    n,
                    1.0,
                    a.as_ptr(),
                    n as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            black_box(&out);
        })
    });
    let mut g = Graph::new();
    let x = g.input("a", DType::F32, vec![n, n]);
    let y = g.input("b", DType::F32, vec![n, n]);
    let m = g.matmul(x, y);
    g.set_output("c", m);
    let mut inputs = HashMap::new();
    inputs.insert("a".to_string(), HostTensor::f32(vec![n, n], a.clone()));
    inputs.insert("b".to_string(), HostTensor::f32(vec![n, n], b.clone()));
    group.bench_function("coopc_executor", |bench| {
        bench.iter(|| black_box(execute(&g, &inputs).unwrap()))
    });
    group.finish();
}

fn mlp_second_order(c: &mut Criterion) {
    let (batch, d, h, o) = (256, 256, 512, 64);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![batch, d]);
    let t = g.input("t", DType::F32, vec![batch, o]);
    let w1 = g.input("w1", DType::F32, vec![h, d]);
    let w2 = g.input("w2", DType::F32, vec![o, h]);
    let w1t = g.transpose(w1);
    let z = g.matmul(x, w1t);
    let z = g.silu(z);
    let w2t = g.transpose(w2);
    let out = g.matmul(z, w2t);
    let diff = g.sub(out, t);
    let sq = g.mul(diff, diff);
    let loss = g.mean(sq, &[0, 1], false);
    let grads = grad(&mut g, loss, &[w1, w2]);
    let v1 = g.input("v1", DType::F32, vec![h, d]);
    let v2 = g.input("v2", DType::F32, vec![o, h]);
    let hv = vjp(&mut g, &grads, &[v1, v2], &[w1, w2]);
    g.set_output("loss", loss);
    for (i, (&gr, &hvp)) in grads.iter().zip(&hv).enumerate() {
        g.set_output(format!("grad{i}"), gr);
        g.set_output(format!("hvp{i}"), hvp);
    }
    Pipeline::standard().run(&mut g);
    let mut inputs = HashMap::new();
    for (i, (name, shape)) in [
        ("x", vec![batch, d]),
        ("t", vec![batch, o]),
        ("w1", vec![h, d]),
        ("w2", vec![o, h]),
        ("v1", vec![h, d]),
        ("v2", vec![o, h]),
    ]
    .into_iter()
    .enumerate()
    {
        let n = shape.iter().product();
        let scale = if name.starts_with('w') { 0.05 } else { 1.0 };
        let v: Vec<f32> = values(n, i as u32).iter().map(|x| x * scale).collect();
        inputs.insert(name.to_string(), HostTensor::f32(shape, v));
    }
    c.bench_function("mlp_loss_grad_hvp_f32_b256_h512", |bench| {
        bench.iter(|| black_box(execute(&g, &inputs).unwrap()))
    });
}

criterion_group!(benches, matmul_512, mlp_second_order);
criterion_main!(benches);
