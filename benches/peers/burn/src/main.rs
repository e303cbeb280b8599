//! burn peer of `coopc grad`: one BRIDGE meta-step with the first-order
//! hypergradient, on fixed data, on the CPU (burn's ndarray backend with
//! autodiff).
//!
//! Reads what `coopc grad` reads (a pipeline file, a parameter file P and a
//! batch file B, see docs/cli.md) and writes the same outputs under the same
//! names: `loss.sft`, `loss.rl`, `lower.<θ>`, `theta_K.<θ>`, and for
//! `method = "bridge"` `loss.up` and `hyper.<w>`. Only
//! `hypergradient.kind = "first_order"` is computed: burn has no
//! second-order autodiff (no derivative of a gradient), which `truncated`
//! and `finite_difference` need.
//!
//! With `--repeat N` the meta-step runs N more times after the first
//! (warm-up) one and a line `  timing: N runs, median X ms, min Y ms, peak RSS
//! Z MiB, T threads` is printed (the format of `coopc grad`, read by
//! benches/compare.sh), then everything as JSON on a line starting with
//! `result:`.

mod io;
mod meta;
mod model;
mod spec;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;

use crate::meta::{Inputs, MetaStep};
use crate::spec::{Dtype, Spec};

const USAGE: &str = "usage: coopc-burn-peer PIPELINE --params P.safetensors --batch B.safetensors \
[--out G.safetensors] [--repeat N] [--threads N] [--dtype f32|f64]";

struct Args {
    pipeline: PathBuf,
    params: PathBuf,
    batch: PathBuf,
    out: Option<PathBuf>,
    repeat: usize,
    threads: Option<usize>,
    dtype: Option<Dtype>,
}

fn parse_args() -> Result<Args> {
    let mut pipeline = None;
    let (mut params, mut batch, mut out) = (None, None, None);
    let (mut repeat, mut threads, mut dtype) = (0, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--params" => params = Some(PathBuf::from(value("--params")?)),
            "--batch" => batch = Some(PathBuf::from(value("--batch")?)),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--repeat" => {
                repeat = value("--repeat")?
                    .parse()
                    .context("--repeat takes a whole number")?
            }
            "--threads" => {
                let n: usize = value("--threads")?
                    .parse()
                    .context("--threads takes a whole number")?;
                if n == 0 {
                    bail!("--threads must be at least 1");
                }
                threads = Some(n);
            }
            "--dtype" => {
                dtype = Some(match value("--dtype")?.as_str() {
                    "f32" => Dtype::F32,
                    "f64" => Dtype::F64,
                    other => bail!("--dtype {other}: f32 or f64"),
                })
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => {
                if pipeline.is_some() {
                    bail!("one pipeline file only\n{USAGE}");
                }
                pipeline = Some(PathBuf::from(s));
            }
        }
    }
    Ok(Args {
        pipeline: pipeline.with_context(|| format!("no pipeline file given\n{USAGE}"))?,
        params: params.with_context(|| format!("--params is required\n{USAGE}"))?,
        batch: batch.with_context(|| format!("--batch is required\n{USAGE}"))?,
        out,
        repeat,
        threads,
        dtype,
    })
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn run<B: AutodiffBackend>(args: &Args, spec: &Spec, dtype: Dtype, threads: usize) -> Result<()> {
    let device = B::Device::default();
    let (theta, w, shadow) = io::load_params::<B>(spec, &args.params, &device)?;
    let batches = io::load_batches::<B>(spec, &args.batch, &device)?;
    let inputs = Inputs::<B> {
        theta,
        w,
        shadow,
        batches,
    };
    let step = MetaStep { spec };

    let t0 = Instant::now();
    let out = step.run(&inputs);
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;

    let value = |name: &str| {
        out.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| meta::scalar_of::<B>(t))
    };
    for k in ["loss.sft", "loss.rl", "loss.up"] {
        if let Some(v) = value(k) {
            println!("  {k:<9} = {v:.9}");
        }
    }
    let host = io::to_host::<B>(&out);
    let norm = |prefix: &str| -> f64 {
        host.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .flat_map(|(_, v)| v.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    };
    println!("  ‖lower‖   = {:.9}", norm("lower."));
    if spec.bridge() {
        println!("  ‖hyper‖   = {:.9}", norm("hyper."));
    }
    if let Some(path) = &args.out {
        io::write_outputs(spec, path, &host, dtype)?;
        println!(
            "  {} tensors written to {} (first meta-step {first_ms:.1} ms)",
            host.len(),
            path.display()
        );
    }

    let mut result = format!(
        "{{\"peer\": \"burn\", \"burn\": \"0.21.0\", \"backend\": \"ndarray\", \"device\": \"cpu\", \
         \"dtype\": \"{}\", \"mode\": \"eager\", \"threads\": {threads}, \"method\": \"{}\", \
         \"hypergradient\": {}, \"status\": \"ok\", \"first_ms\": {first_ms}",
        dtype.name(),
        spec.method,
        if spec.bridge() { "\"first_order\"" } else { "null" },
    );
    if args.repeat > 0 {
        let mut times = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let t = Instant::now();
            let o = step.run(&inputs);
            times.push(t.elapsed().as_secs_f64());
            drop(o);
        }
        times.sort_by(f64::total_cmp);
        let med = median(&times);
        let peak = peak_rss_bytes().map(|b| b as f64 / (1u64 << 20) as f64);
        let peak_text = peak
            .map(|m| format!("{m:.1} MiB"))
            .unwrap_or_else(|| "unknown".into());
        println!(
            "  timing: {} runs, median {:.3} ms, min {:.3} ms, peak RSS {peak_text}, {threads} threads",
            times.len(),
            med * 1e3,
            times[0] * 1e3
        );
        result.push_str(&format!(
            ", \"runs\": {}, \"median_ms\": {}, \"min_ms\": {}, \"peak_mib\": {}, \"peak_kind\": \"rss\"",
            times.len(),
            med * 1e3,
            times[0] * 1e3,
            peak.map(|m| m.to_string()).unwrap_or_else(|| "null".into())
        ));
    }
    result.push('}');
    println!("result: {result}");
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Threads: burn's ndarray backend runs on rayon's global pool and its
    // matmuls on matrixmultiply's pool; both read these variables once, at
    // first use, so they are set before any tensor exists.
    let threads = match args.threads {
        Some(n) => {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            std::env::set_var("MATMUL_NUM_THREADS", n.to_string());
            n
        }
        None => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            for var in ["RAYON_NUM_THREADS", "MATMUL_NUM_THREADS"] {
                if std::env::var_os(var).is_none() {
                    std::env::set_var(var, n.to_string());
                }
            }
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(n)
        }
    };
    let spec = match spec::load(&args.pipeline) {
        Ok(s) => s,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<spec::Unsupported>() {
                // What benches/compare.sh reads for a pipeline this peer
                // cannot run (as the PyTorch peer does for torch.compile).
                let reason = u.0.replace('\\', "\\\\").replace('"', "\\\"");
                println!("unsupported: {u}");
                println!(
                    "result: {{\"peer\": \"burn\", \"burn\": \"0.21.0\", \"status\": \"unsupported\", \"reason\": \"{reason}\"}}"
                );
                return ExitCode::from(3);
            }
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let dtype = args.dtype.unwrap_or(spec.dtype);
    println!(
        "coopc-burn-peer: burn 0.21.0 · ndarray (CPU) · {} · {threads} threads · {}{}, K = {} · λ = {}",
        dtype.name(),
        spec.method,
        if spec.bridge() {
            " · first_order hypergradient (the only kind: burn has no second-order autodiff)"
        } else {
            ""
        },
        spec.unroll,
        spec.lambda0
    );
    let r = match dtype {
        Dtype::F32 => run::<Autodiff<NdArray<f32>>>(&args, &spec, dtype, threads),
        Dtype::F64 => run::<Autodiff<NdArray<f64>>>(&args, &spec, dtype, threads),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
