//! The `coopc` command line: `check`, `compile`, `inspect`, `grad`, and
//! `demo` (a small model loss differentiated twice, optimised and run on the
//! CPU executor).

mod backend;
mod cli_check;
mod cli_compare;
mod cli_compile;
mod cli_grad;
mod cli_init;
mod cli_inspect;
mod cli_run;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use coopc_compiler::autodiff::{grad, vjp};
use coopc_compiler::ir::{to_dot, to_text, DType, Graph, NodeId};
use coopc_compiler::passes::Pipeline;
use coopc_runtime::{execute, HostTensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "coopc",
    version,
    about = "Compiler and runtime for cooperative SFT + RL training (BRIDGE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train: sample, score and run meta-steps, writing metrics and checkpoints.
    Run {
        /// A pipeline.toml (compiled first) or a .plan from `coopc compile`.
        pipeline: Option<PathBuf>,
        /// Override bilevel.method.
        #[arg(long, value_enum)]
        method: Option<MethodArg>,
        /// Override train.steps (a sft.cold_start_steps at its default, half of
        /// train.steps, stays half).
        #[arg(long)]
        steps: Option<usize>,
        /// Override train.seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override backend.kind.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Run folder (default runs/<pipeline>-<method>-s<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in DIR from its latest checkpoint.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Held-out problems per evaluation.
        #[arg(long, default_value_t = 100)]
        eval_limit: usize,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Stop after this many meta-steps (with a checkpoint), as if interrupted.
        #[arg(long, value_name = "N")]
        stop_after: Option<usize>,
    },
    /// Plot several runs (PNG) and tabulate them (markdown on stdout).
    Compare {
        /// Run folders (each with metrics.jsonl).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write the figure.
        #[arg(long, default_value = "compare.png")]
        png: PathBuf,
        /// Also write the markdown table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Held-out accuracy of a run's latest checkpoint.
    Eval {
        dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        eval_limit: usize,
        /// Also print this many held-out and training-distribution problems with the model's answers.
        #[arg(long, default_value_t = 0)]
        show: usize,
    },
    /// Validate a pipeline.toml (exit 2 with diagnostics when it is invalid).
    Check { pipeline: PathBuf },
    /// Lower a pipeline into a plan: the fused meta-step and the log-prob program.
    Compile {
        pipeline: PathBuf,
        /// Where to write the plan.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Also print the meta-step program (ir, dot), every program's schedule, or write
        /// every program's GPU kernels (kernels DIR).
        #[arg(long, value_enum)]
        emit: Option<cli_compile::Emit>,
        /// Folder for `--emit kernels`.
        dir: Option<PathBuf>,
    },
    /// Describe a compiled plan: programs, op counts, buffer bytes, peak memory.
    Inspect { plan: PathBuf },
    /// Write initial parameters (HF/PEFT initialisation) and optionally a synthetic batch.
    Init {
        pipeline: PathBuf,
        /// Output safetensors of θ and w.
        #[arg(long)]
        params: PathBuf,
        /// Also write a synthetic batch of the pipeline's shapes (for `grad`).
        #[arg(long)]
        batch: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// One meta-step on fixed data (CPU executor): lower gradient, hypergradient, losses, θ_K.
    Grad {
        pipeline: PathBuf,
        /// θ by Hugging Face names, w by PEFT names, optional shadow.* tensors.
        #[arg(long)]
        params: PathBuf,
        /// sft.* and rl.* tensors, optionally per step (step0., step1., …).
        #[arg(long)]
        batch: PathBuf,
        /// Output safetensors: lower.*, hyper.*, loss.*, theta_K.*.
        #[arg(long)]
        out: PathBuf,
        /// Execute the meta-step N more times and print the median time and peak RSS.
        #[arg(long, default_value_t = 0)]
        repeat: usize,
        /// Where to execute: cpu (default), wgpu, cuda, or auto (cuda when a device answers).
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
    },
    /// Differentiate a small MLP loss twice, optimise the graph and run it on the CPU executor.
    Demo {
        /// Print the optimised graph as text or Graphviz DOT instead of the summary.
        #[arg(long, value_enum)]
        emit: Option<Emit>,
        /// Element type of the graph.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DemoDType,
        /// Hidden width of the MLP.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Skip the pass pipeline.
        #[arg(long)]
        no_optimise: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum MethodArg {
    Bridge,
    RlZero,
    Sft,
    ColdStart,
    Mix,
    Alternating,
}

impl From<MethodArg> for coopc_compiler::spec::Method {
    fn from(m: MethodArg) -> Self {
        use coopc_compiler::spec::Method;
        match m {
            MethodArg::Bridge => Method::Bridge,
            MethodArg::RlZero => Method::RlZero,
            MethodArg::Sft => Method::Sft,
            MethodArg::ColdStart => Method::ColdStart,
            MethodArg::Mix => Method::Mix,
            MethodArg::Alternating => Method::Alternating,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
}

impl From<BackendArg> for coopc_compiler::spec::BackendKind {
    fn from(b: BackendArg) -> Self {
        use coopc_compiler::spec::BackendKind;
        match b {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Cuda => BackendKind::Cuda,
            BackendArg::Wgpu => BackendKind::Wgpu,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    Ir,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum DemoDType {
    F32,
    F64,
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

fn demo(emit: Option<Emit>, dtype: DType, hidden: usize, optimise: bool) -> Result<()> {
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

/// Output into a closed pipe (`coopc inspect PLAN | head`) ends the
/// process quietly, as it does for other command-line tools, instead of a
/// panic in `println!` (Rust ignores SIGPIPE by default).
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: restoring a signal's default disposition at the start of
    // `main`, before any other thread exists, has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The allocator keeps freed buffers of up to 32 MiB for reuse instead of
/// handing each back to the kernel and faulting it in again on the next
/// allocation (glibc's default trims and unmaps eagerly): a CPU meta-step
/// allocates and frees thousands of such buffers. Larger buffers are still
/// mapped and unmapped one by one, going back to the system when freed.
/// Settings a user gives through `GLIBC_TUNABLES` are left as they are.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called at the start
    // of `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    #[cfg(unix)]
    default_sigpipe();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_allocator();
    let cli = Cli::parse();
    // The command runs on a thread of the pool the CPU executor's parallel
    // loops use, so that it takes part in them instead of handing each
    // loop to the pool and waiting (12 % of a CPU meta-step on 2 cores).
    // The pool takes its size from RAYON_NUM_THREADS, else the cores.
    let code = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| dispatch(cli)),
        Err(_) => dispatch(cli),
    };
    std::process::exit(code);
}

/// Runs one command; returns the process's exit code.
fn dispatch(cli: Cli) -> i32 {
    match cli.command {
        Command::Run {
            pipeline,
            method,
            steps,
            seed,
            backend,
            out,
            resume,
            eval_limit,
            quiet,
            stop_after,
        } => {
            let ov = cli_run::Overrides {
                method: method.map(Into::into),
                steps,
                seed,
                backend: backend.map(Into::into),
            };
            user_result(cli_run::run(
                pipeline.as_deref(),
                resume.as_deref(),
                out.as_deref(),
                ov,
                cli_run::RunFlags {
                    eval_limit,
                    quiet,
                    stop_after,
                },
            ))
        }
        Command::Eval {
            dir,
            eval_limit,
            show,
        } => user_result(cli_run::eval(&dir, eval_limit, show)),
        Command::Compare {
            dirs,
            png,
            markdown,
        } => match cli_compare::compare(&dirs, &png, markdown.as_deref()) {
            Ok(table) => {
                print!("{table}");
                eprintln!("figure written to {}", png.display());
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::Check { pipeline } => cli_check::check(&pipeline),
        Command::Inspect { plan } => cli_inspect::inspect(&plan),
        Command::Compile {
            pipeline,
            output,
            emit,
            dir,
        } => user_result(cli_compile::run(
            &pipeline,
            output.as_deref(),
            emit,
            dir.as_deref(),
        )),
        Command::Init {
            pipeline,
            params,
            batch,
            seed,
        } => user_result(cli_init::run(&pipeline, &params, batch.as_deref(), seed)),
        Command::Grad {
            pipeline,
            params,
            batch,
            out,
            repeat,
            backend,
        } => user_result(cli_grad::run(
            &pipeline,
            &params,
            &batch,
            &out,
            repeat,
            backend.map(Into::into),
        )),
        Command::Demo {
            emit,
            dtype,
            hidden,
            no_optimise,
        } => {
            let dt = match dtype {
                DemoDType::F32 => DType::F32,
                DemoDType::F64 => DType::F64,
            };
            match demo(emit, dt, hidden, !no_optimise) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
    }
}

/// Exit code 2 for bad input, with the message on stderr.
fn user_result(r: Result<(), cli_grad::UserError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            let msg = e.0.trim_end();
            if msg.starts_with("error") {
                eprintln!("{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            2
        }
    }
}
