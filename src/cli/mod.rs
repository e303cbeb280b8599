//! The `coopc` command line as a library: argument parsing (clap) and one
//! module per command. `main.rs` parses and calls [`dispatch`].

pub mod backend;
pub mod check;
pub mod compare;
pub mod compile;
pub mod demo;
pub mod export;
pub mod grad;
pub mod init;
pub mod inspect;
pub mod run;
pub mod score;

use clap::{Parser, Subcommand};
use coopc_compiler::spec::{BackendKind, Method};
use std::path::PathBuf;

/// A user-facing failure: the message names what is wrong and where.
#[derive(Debug)]
pub struct UserError(pub String);

impl<E: std::fmt::Display> From<E> for UserError {
    fn from(e: E) -> Self {
        UserError(e.to_string())
    }
}

/// Exit status of bad input: a pipeline, plan, data file, checkpoint or
/// argument that is wrong (the message names it).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit status of a run that failed while it ran: a non-finite loss, a
/// checkpoint or metrics write that failed (a full disk), a device error.
pub const EXIT_RUN_FAILED: i32 = 1;

/// A failure and the exit status it ends the process with (`128 + N` for
/// a stop requested by signal N, as shells report it).
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl From<UserError> for Failure {
    fn from(e: UserError) -> Self {
        Failure {
            code: EXIT_BAD_INPUT,
            message: e.0,
        }
    }
}

impl From<coopc_train::TrainError> for Failure {
    /// An error of the training loop: an interruption, bad data met on
    /// the way, or a failure of the run itself.
    fn from(e: coopc_train::TrainError) -> Self {
        use coopc_train::TrainError as E;
        let code = match &e {
            E::Interrupted { signal, .. } => 128 + signal,
            E::Task(_) => EXIT_BAD_INPUT,
            _ => EXIT_RUN_FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

#[derive(Parser)]
#[command(
    name = "coopc",
    version,
    about = "Compiler and runtime for cooperative SFT + RL training (BRIDGE)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train: sample, score and run meta-steps, writing metrics and checkpoints.
    Run {
        /// A pipeline.toml (compiled first) or a .plan from `coopc compile`.
        pipeline: Option<PathBuf>,
        /// Override bilevel.method.
        #[arg(long, value_enum)]
        method: Option<Method>,
        /// Override train.steps (a sft.cold_start_steps at its default, half of
        /// train.steps, stays half).
        #[arg(long)]
        steps: Option<usize>,
        /// Override train.seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override backend.kind.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Hugging Face model folder to start from (sets or replaces model.from).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Run folder (default runs/<pipeline>-<method>-s<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in DIR from its latest checkpoint.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Held-out problems per evaluation (default: all of them).
        #[arg(long, value_name = "N")]
        eval_limit: Option<usize>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Stop after this many meta-steps (with a checkpoint), as if interrupted.
        #[arg(long, value_name = "N")]
        stop_after: Option<usize>,
        /// With --resume: accept a pipeline (or spec.json) that changed since
        /// the checkpoint in keys that do not change what a meta-step
        /// computes (train.steps, train.eval_every, train.on_nonfinite,
        /// train.max_nonfinite_in_row, backend.kind).
        #[arg(long, requires = "resume")]
        force: bool,
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
        /// A field of the runs' spec.json (dotted path, e.g. bilevel.hypergradient) that, beside the method, splits runs into groups; repeatable.
        #[arg(long, value_name = "FIELD")]
        group_by: Vec<String>,
        /// The spread each group's band shows over its runs.
        #[arg(long, value_enum, default_value = "minmax")]
        band: compare::Band,
        /// Smoothing of the reward and SFT-loss curves: TensorBoard's debiased EMA weight in [0, 1), 0 for none.
        #[arg(long, default_value_t = 0.6)]
        smooth: f64,
        /// The x axis of the panels.
        #[arg(long, value_enum, default_value = "step")]
        x: compare::XAxis,
        /// A fixed y range, QUANTITY=LO:HI with QUANTITY one of eval, reward, sft (e.g. reward=-1:1); repeatable.
        #[arg(long, value_name = "QUANTITY=LO:HI", allow_hyphen_values = true)]
        ylim: Vec<compare::YLimit>,
        /// A run's accuracy in the tables: the mean of its last K evaluations.
        #[arg(long, value_name = "K", default_value_t = 1)]
        last: usize,
        /// Add paired differences, BASELINE − group, over runs sharing a train.seed (at equal steps, wall time and FLOPs, with bootstrap 95% intervals).
        #[arg(long, value_name = "GROUP")]
        baseline: Option<String>,
        /// With --baseline: also the wall time and FLOPs at which each group first reaches this held-out accuracy.
        #[arg(long, value_name = "ACCURACY", requires = "baseline")]
        threshold: Option<f64>,
    },
    /// Greedy held-out accuracy of a run's latest checkpoint, or of a Hugging
    /// Face model folder on a pipeline's task (--model DIR --task PIPELINE).
    Eval {
        /// A run folder.
        #[arg(required_unless_present = "model", conflicts_with = "model")]
        dir: Option<PathBuf>,
        /// A Hugging Face model folder to evaluate as it is (no run needed).
        #[arg(long, value_name = "DIR", requires = "task")]
        model: Option<PathBuf>,
        /// The pipeline whose task (held-out file, format, chat template, verifier) --model is evaluated on.
        #[arg(long, value_name = "PIPELINE")]
        task: Option<PathBuf>,
        /// Held-out problems to evaluate (default: all of them).
        #[arg(long, value_name = "N")]
        eval_limit: Option<usize>,
        /// Also print this many held-out and training-distribution problems with the model's answers.
        #[arg(long, default_value_t = 0)]
        show: usize,
        /// Also sample this many answers per held-out problem: pass@1, pass@N and maj@N beside greedy accuracy.
        #[arg(long, value_name = "N", default_value_t = 0)]
        samples: usize,
        /// The temperature of those samples.
        #[arg(long, value_name = "T", default_value_t = 1.0)]
        temperature: f64,
    },
    /// Validate a pipeline.toml (exit 2 with diagnostics when it is invalid).
    Check { pipeline: PathBuf },
    /// Token log-probabilities of given ids under a run's latest policy (θ and LoRA), on the CPU.
    Score {
        /// A run folder.
        #[arg(required_unless_present = "model", conflicts_with = "model")]
        run: Option<PathBuf>,
        /// A Hugging Face model folder to score under instead, as it is.
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Element type with --model (a run uses its own).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: demo::DemoDType,
        /// safetensors with `input_ids` [batch, tokens].
        #[arg(long)]
        ids: PathBuf,
        /// Output safetensors with `logprobs` [batch, tokens] (entry 0 is 0).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a run's latest checkpoint as a Hugging Face model folder with the LoRA merged into θ.
    Export {
        /// A run folder.
        run: PathBuf,
        /// Folder to write the merged model to (config.json, model.safetensors, tokenizer files).
        #[arg(long, value_name = "DIR")]
        merged: PathBuf,
        /// Weight dtype of the written model.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: export::ExportDtype,
    },
    /// Lower a pipeline into a plan: the fused meta-step and the log-prob program.
    Compile {
        pipeline: PathBuf,
        /// Hugging Face model folder (sets or replaces model.from).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Where to write the plan.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Also print the meta-step program (ir, dot), every program's schedule, or write
        /// every program's GPU kernels (kernels DIR).
        #[arg(long, value_enum)]
        emit: Option<compile::Emit>,
        /// Folder for `--emit kernels`.
        dir: Option<PathBuf>,
        /// Compile the plan of one process of a data-parallel run of N
        /// processes (`mpirun -np N coopc run PLAN`).
        #[arg(long, value_name = "N", default_value_t = 1)]
        world: usize,
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
        backend: Option<BackendKind>,
    },
    /// Differentiate a small MLP loss twice, optimise the graph and run it on the CPU executor.
    Demo {
        /// Print the optimised graph as text or Graphviz DOT instead of the summary.
        #[arg(long, value_enum)]
        emit: Option<demo::Emit>,
        /// Element type of the graph.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: demo::DemoDType,
        /// Hidden width of the MLP.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Skip the pass pipeline.
        #[arg(long)]
        no_optimise: bool,
    },
}

/// The processes of this run as the launcher started them:
/// - under an MPI launcher (`mpirun`, `srun --mpi=pmix`) in a build with
///   MPI, MPI is initialised and its world installed as the process's
///   collective (see `coopc_runtime::collective`); a CUDA backend adds an
///   NCCL communicator for the device's sums (`backend::open`);
/// - with `COOPC_NCCL_RENDEZVOUS` (a path on a file system every process
///   sees) and the rank and size from the launcher's environment
///   (`RANK`/`WORLD_SIZE`, Slurm's or an MPI launcher's), the processes join
///   an NCCL communicator, which is the collective (GPUs, no MPI needed);
/// - otherwise the run is one process.
///
/// The returned guard finalises MPI when dropped, before the process exits.
pub fn start_processes() -> Result<Option<Box<dyn std::any::Any>>, String> {
    let var = |k: &str| std::env::var(k).ok();
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|k| var(k).is_some());
    #[cfg(feature = "mpi")]
    if launched {
        let (universe, world) = crate::mpi_world::MpiWorld::init()?;
        coopc_runtime::collective::install(std::sync::Arc::new(world));
        return Ok(Some(Box::new(universe)));
    }
    if let Some(path) = var("COOPC_NCCL_RENDEZVOUS") {
        return start_nccl(std::path::Path::new(&path)).map(|()| None);
    }
    if !launched {
        return Ok(None);
    }
    let size = var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| var("SLURM_NTASKS"))
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(2);
    if size > 1 {
        return Err(format!(
            "started by an MPI launcher with {size} processes, but this coopc was built without MPI: build it with `cargo build --release --features mpi` (needs the system's MPI, e.g. Debian's libopenmpi-dev and libclang-dev), or give the processes an NCCL rendezvous file (COOPC_NCCL_RENDEZVOUS) to run on GPUs without MPI"
        ));
    }
    Ok(None)
}

/// The rank and number of processes from the launcher's environment: the
/// first pair of variables that is set, of torchrun's, Slurm's, Open MPI's
/// and PMI's.
pub fn launcher_rank_and_size() -> Result<(usize, usize), String> {
    const PAIRS: [(&str, &str); 4] = [
        ("RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ];
    let number = |k: &str, text: String| {
        text.trim()
            .parse::<usize>()
            .map_err(|_| format!("{k} = {text:?} is not a number"))
    };
    for (rank_var, size_var) in PAIRS {
        let (rank, size) = (std::env::var(rank_var).ok(), std::env::var(size_var).ok());
        match (rank, size) {
            (None, None) => continue,
            (Some(rank), Some(size)) => {
                let (rank, size) = (number(rank_var, rank)?, number(size_var, size)?);
                if size == 0 || rank >= size {
                    return Err(format!(
                        "{rank_var} = {rank} is not a rank of {size_var} = {size} processes"
                    ));
                }
                return Ok((rank, size));
            }
            (Some(_), None) => return Err(format!("{rank_var} is set but {size_var} is not")),
            (None, Some(_)) => return Err(format!("{size_var} is set but {rank_var} is not")),
        }
    }
    Err(
        "COOPC_NCCL_RENDEZVOUS is set, but no launcher gave this process its rank and the number \
         of processes: set RANK and WORLD_SIZE (or start it with srun or mpirun)"
            .into(),
    )
}

/// Joins the NCCL communicator of a run started without MPI, through the
/// rendezvous file `path` (`COOPC_NCCL_RENDEZVOUS`), and installs it as
/// the process's collective.
fn start_nccl(path: &std::path::Path) -> Result<(), String> {
    use coopc_kernels::nccl;
    let fail = |e: String| format!("NCCL rendezvous through {}: {e}", path.display());
    let (rank, world) = launcher_rank_and_size().map_err(fail)?;
    if !nccl::nccl_present() {
        return Err(fail(
            "the NCCL library (libnccl.so.2) was not found: install NCCL, or run without \
             COOPC_NCCL_RENDEZVOUS"
                .into(),
        ));
    }
    if !coopc_kernels::device::cuda_driver_present() {
        return Err(fail("no NVIDIA driver library (libcuda.so) found".into()));
    }
    let ordinal = coopc_kernels::device::cuda_ordinal().map_err(fail)?;
    let timeout = std::env::var("COOPC_NCCL_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(300);
    let comm = nccl::NcclComm::from_file(
        path,
        rank,
        world,
        ordinal,
        std::time::Duration::from_secs(timeout),
    )
    .map_err(|e| fail(e.to_string()))?;
    nccl::install_process_comm(std::sync::Arc::new(comm));
    Ok(())
}

/// Runs one command; returns the process's exit code. Under a launcher of
/// several processes, `run` trains on all of them; any other command is
/// one process's work, which rank 0 does by itself while the others exit
/// at once.
pub fn dispatch(cli: Cli) -> i32 {
    use coopc_runtime::collective::{self, Single};
    let world = collective::current();
    if world.world() > 1 && !matches!(cli.command, Command::Run { .. }) {
        if world.rank() != 0 {
            return 0;
        }
        return collective::scope(std::sync::Arc::new(Single), || dispatch_command(cli));
    }
    dispatch_command(cli)
}

fn dispatch_command(cli: Cli) -> i32 {
    match cli.command {
        Command::Run {
            pipeline,
            method,
            steps,
            seed,
            backend,
            model,
            out,
            resume,
            eval_limit,
            quiet,
            stop_after,
            force,
        } => {
            let ov = run::Overrides {
                method,
                steps,
                seed,
                backend,
                model,
            };
            exit_status(run::run(
                pipeline.as_deref(),
                resume.as_deref(),
                out.as_deref(),
                ov,
                run::RunFlags {
                    eval_limit: eval_limit.unwrap_or(usize::MAX),
                    quiet,
                    stop_after,
                    force,
                },
            ))
        }
        Command::Eval {
            dir,
            model,
            task,
            eval_limit,
            show,
            samples,
            temperature,
        } => user_result(match (dir, model, task, eval_limit.unwrap_or(usize::MAX)) {
            _ if temperature.is_nan() || temperature <= 0.0 => Err(UserError(format!(
                "--temperature must be > 0, found {temperature}"
            ))),
            (Some(dir), None, None, eval_limit) => {
                run::eval(&dir, eval_limit, show, (samples, temperature))
            }
            (None, Some(model), Some(task), eval_limit) => {
                run::eval_model(&model, &task, eval_limit, show, (samples, temperature))
            }
            (Some(_), _, Some(_), _) => Err(UserError(
                "--task goes with --model; a run folder is evaluated on its own task".into(),
            )),
            _ => Err(UserError(
                "give a run folder, or --model DIR --task PIPELINE".into(),
            )),
        }),
        Command::Score {
            run,
            model,
            dtype,
            ids,
            out,
        } => {
            let dtype = match dtype {
                demo::DemoDType::F32 => "f32",
                demo::DemoDType::F64 => "f64",
            };
            let source = match (&run, &model) {
                (Some(r), None) => score::Source::Run(r),
                (None, Some(m)) => score::Source::Model { dir: m, dtype },
                _ => return user_result(Err(UserError("give a run folder or --model DIR".into()))),
            };
            user_result(score::run(source, &ids, &out))
        }
        Command::Export { run, merged, dtype } => user_result(export::run(&run, &merged, dtype)),
        Command::Compare {
            dirs,
            png,
            markdown,
            group_by,
            band,
            smooth,
            x,
            ylim,
            last,
            baseline,
            threshold,
        } => match compare::compare(
            &dirs,
            &png,
            markdown.as_deref(),
            &compare::Options {
                group_by,
                band,
                smooth,
                x,
                ylim,
                last,
                baseline,
                threshold,
            },
        ) {
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
        Command::Check { pipeline } => check::check(&pipeline),
        Command::Inspect { plan } => inspect::inspect(&plan),
        Command::Compile {
            pipeline,
            model,
            output,
            emit,
            dir,
            world,
        } => user_result(compile::run(
            &pipeline,
            model.as_deref(),
            output.as_deref(),
            emit,
            dir.as_deref(),
            world,
        )),
        Command::Init {
            pipeline,
            params,
            batch,
            seed,
        } => user_result(init::run(&pipeline, &params, batch.as_deref(), seed)),
        Command::Grad {
            pipeline,
            params,
            batch,
            out,
            repeat,
            backend,
        } => user_result(grad::run(&pipeline, &params, &batch, &out, repeat, backend)),
        Command::Demo {
            emit,
            dtype,
            hidden,
            no_optimise,
        } => match demo::demo(emit, dtype.into(), hidden, !no_optimise) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
    }
}

/// Exit code 2 for bad input, with the message on stderr.
fn user_result(r: Result<(), UserError>) -> i32 {
    exit_status(r.map_err(Failure::from))
}

/// The failure's exit status, with its message on stderr.
fn exit_status(r: Result<(), Failure>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            let msg = e.message.trim_end();
            if msg.starts_with("error") {
                eprintln!("{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            e.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn the_command_line_spells_methods_and_backends_as_pipelines_do() {
        for m in Method::ALL {
            assert_eq!(Method::from_str(m.name(), false), Ok(m));
        }
        assert_eq!(Method::value_variants().len(), Method::ALL.len());
        for b in BackendKind::ALL {
            assert_eq!(BackendKind::from_str(b.name(), false), Ok(b));
        }
        assert_eq!(BackendKind::value_variants().len(), BackendKind::ALL.len());
    }
}
