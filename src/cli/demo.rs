//! `coopc demo`: a small MLP regression loss differentiated twice (loss,
//! gradient, Hessian-vector product), optimised and run on the CPU executor.

use anyhow::{Context, Result};
use clap::ValueEnum;
use coopc_compiler::autodiff::{grad, vjp};
use coopc_compiler::ir::{to_dot, to_text, DType, Graph, NodeId};
use coopc_compiler::passes::Pipeline;
use coopc_runtime::{execute, HostTensor};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum Emit {
    Ir,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DemoDType {
    F32,
    F64,
}

impl From<DemoDType> for DType {
    fn from(d: DemoDType) -> DType {
        match d {
            DemoDType::F32 => DType::F32,
            DemoDType::F64 => DType::F64,
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64).
fn pseudo_random(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

struct Demo {
    graph: Graph,
    params: Vec<(&'static str, Vec<usize>)>,
    data: Vec<(&'static str, Vec<usize>)>,
}

/// L = mean((W2 tanh(W1 x + b1) − y)²); outputs the loss, ∇L and H·v.
fn build_demo(dtype: DType, hidden: usize) -> Demo {
    let (n, d, o) = (32, 16, 4);
    let mut g = Graph::new();
    let x = g.input("x", dtype, vec![n, d]);
    let y = g.input("y", dtype, vec![n, o]);
    let w1 = g.input("w1", dtype, vec![hidden, d]);
    let b1 = g.input("b1", dtype, vec![hidden]);
    let w2 = g.input("w2", dtype, vec![o, hidden]);
    let w1t = g.transpose(w1);
    let h = g.matmul(x, w1t);
    let bb = g.broadcast(b1, vec![n, hidden]);
    let h = g.add(h, bb);
    let h = g.tanh(h);
    let w2t = g.transpose(w2);
    let out = g.matmul(h, w2t);
    let diff = g.sub(out, y);
    let sq = g.mul(diff, diff);
    let loss = g.mean(sq, &[0, 1], false);
    let params = [w1, b1, w2];
    let grads = grad(&mut g, loss, &params);
    let vs: Vec<NodeId> = ["v.w1", "v.b1", "v.w2"]
        .iter()
        .zip(&params)
        .map(|(name, &p)| {
            let shape = g.ty(p).shape.clone();
            g.input(*name, dtype, shape)
        })
        .collect();
    let hvp = vjp(&mut g, &grads, &vs, &params);
    g.set_output("loss", loss);
    for (name, (&gr, &hv)) in ["w1", "b1", "w2"].iter().zip(grads.iter().zip(&hvp)) {
        g.set_output(format!("grad.{name}"), gr);
        g.set_output(format!("hvp.{name}"), hv);
    }
    Demo {
        graph: g,
        params: vec![
            ("w1", vec![hidden, d]),
            ("b1", vec![hidden]),
            ("w2", vec![o, hidden]),
        ],
        data: vec![("x", vec![n, d]), ("y", vec![n, o])],
    }
}

pub fn demo(emit: Option<Emit>, dtype: DType, hidden: usize, optimise: bool) -> Result<()> {
    let t0 = Instant::now();
    let Demo {
        mut graph,
        params,
        data,
    } = build_demo(dtype, hidden);
    let built = graph.node_count();
    let report = optimise.then(|| Pipeline::standard().run(&mut graph));
    let compile_time = t0.elapsed();
    match emit {
        Some(Emit::Ir) => {
            print!("{}", to_text(&graph));
            return Ok(());
        }
        Some(Emit::Dot) => {
            print!("{}", to_dot(&graph));
            return Ok(());
        }
        None => {}
    }
    let mut inputs = HashMap::new();
    for (seed, (name, shape)) in (1..).zip(data.iter().chain(&params)) {
        let n = shape.iter().product();
        let scale = if name.starts_with('w') { 0.3 } else { 1.0 };
        let vals: Vec<f64> = pseudo_random(seed, n).iter().map(|v| v * scale).collect();
        inputs.insert(
            name.to_string(),
            HostTensor::from_f64(dtype, shape.clone(), &vals)?,
        );
        let v = pseudo_random(seed + 1000, n);
        inputs.insert(
            format!("v.{name}"),
            HostTensor::from_f64(dtype, shape.clone(), &v)?,
        );
    }
    let t1 = Instant::now();
    let outs = execute(&graph, &inputs).context("executing the demo graph")?;
    let run_time = t1.elapsed();

    println!("coopc demo: MLP regression loss, hidden {hidden}, {dtype}");
    println!("  graph: {built} nodes built (loss, gradient, Hessian-vector product)");
    if let Some(r) = &report {
        println!(
            "  passes: {} → {} nodes in {} round(s) ({})",
            r.nodes_before,
            r.nodes_after,
            r.rounds.len(),
            Pipeline::standard().pass_names().join(" → ")
        );
    }
    println!(
        "  compile {:.2?}, execute {:.2?} on the CPU executor",
        compile_time, run_time
    );
    for (name, t) in &outs {
        let v = t.to_f64_vec();
        let (label, value) = if v.len() == 1 {
            (name.clone(), v[0])
        } else {
            (
                format!("‖{name}‖"),
                v.iter().map(|x| x * x).sum::<f64>().sqrt(),
            )
        };
        println!("  {label:<12} = {value:.9}");
    }
    Ok(())
}
