//! `coopc compile`: pipeline.toml → plan file (`coopc_compiler::compile`);
//! optionally prints the meta-step as IR, DOT or every program's schedule,
//! or writes every program's fused kernels as CUDA C++ and WGSL.

use crate::cli::UserError;
use coopc_compiler::ir::{to_dot, to_text};
use coopc_compiler::plan::Plan;
use coopc_compiler::schedule::{human_bytes, schedule};
use std::path::Path;
use std::time::Instant;

/// What `--emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// The meta-step program as text IR.
    Ir,
    /// The meta-step program as Graphviz DOT.
    Dot,
    /// Every program's schedule and memory estimate.
    Schedule,
    /// Every program's fused GPU kernels as CUDA C++ and WGSL files in DIR.
    Kernels,
}

/// Writes a kernel's CUDA C++ and WGSL as `DIR/<name>.cu` and `.wgsl`.
fn write_source(dir: &Path, src: &coopc_kernels::source::KernelSource) -> Result<(), UserError> {
    for (ext, text) in [("cu", &src.cuda), ("wgsl", &src.wgsl)] {
        let path = dir.join(format!("{}.{ext}", src.name));
        std::fs::write(&path, text)
            .map_err(|e| UserError(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Writes every program's fused kernels (CUDA C++ and WGSL) under `dir`,
/// one folder per program, with an index of which kernel runs where.
fn emit_kernels(plan: &Plan, dir: &Path) -> Result<(), UserError> {
    use std::fmt::Write as _;
    let mut index = String::new();
    // Every program of the plan — the meta-step, the scorer, the decode step
    // the sampler runs per token and the LoRA merge it runs per call — as
    // the plan fused it.
    for p in &plan.programs {
        let (name, graph, fused) = (p.name(), &p.graph, &p.fused);
        let sources = coopc_kernels::source::schedule_sources(graph, fused).map_err(UserError)?;
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)
            .map_err(|e| UserError(format!("cannot create {}: {e}", sub.display())))?;
        let (peak, live) = fused.device_peak_live(graph);
        let _ = writeln!(
            index,
            "{}: {} scheduled nodes → {}; {} distinct kernel sources; device footprint {} (estimate), largest groups then:",
            name,
            p.schedule.len(),
            fused,
            sources.len(),
            human_bytes(peak)
        );
        let four = |id| 4 * graph.ty(id).numel().max(1);
        for line in crate::cli::inspect::buffer_groups(graph, &live, four) {
            let _ = writeln!(index, "    {line}");
        }
        for (src, uses) in &sources {
            write_source(&sub, src)?;
            let _ = writeln!(index, "  {:<28} launched {} time(s)", src.name, uses.len());
        }
    }
    // The sampler's kernels, which take the decode step's logits to tokens
    // on the device.
    use coopc_kernels::source::{SamplePart, Traced};
    let _ = writeln!(index, "sampling (after each decode step, on the device):");
    for part in SamplePart::ALL {
        let src = Traced::Sample(part)
            .source(part.name())
            .map_err(UserError)?;
        write_source(&dir.join("decode_step"), &src)?;
        let _ = writeln!(index, "  {}", src.name);
    }
    let _ = writeln!(
        index,
        "matrix products: the schedules' matmul_* launches run CubeCL's matmul \
         (cubek-matmul's simple_unit routine, or simple_cyclic_cmma with backend.matmul = \
         \"tf32\", generated for the device at launch, so not written here) unless \
         COOPC_MATMUL=coopc; the matmul_* files are coopc's own product \
         kernels, which run then (and where CubeCL's refuses a problem). Likewise the \
         linear_logprob* kernels: with CubeCL's matmul its products compute the logits a \
         vocabulary chunk at a time, and the *_fold, *_merge, *_scale and *_dh_add_into parts \
         run around them; with coopc's, the fused parts (\"\", *_forward, *_merge, \
         *_coefficients, *_dh, *_dh_add, *_dw)"
    );
    let path = dir.join("index.txt");
    std::fs::write(&path, &index)
        .map_err(|e| UserError(format!("cannot write {}: {e}", path.display())))?;
    print!("{index}");
    Ok(())
}

pub fn run(
    pipeline: &Path,
    model: Option<&Path>,
    out: Option<&Path>,
    emit: Option<Emit>,
    dir: Option<&Path>,
    world: usize,
) -> Result<(), UserError> {
    if emit == Some(Emit::Kernels) && dir.is_none() {
        return Err(UserError(
            "`--emit kernels` needs a folder to write to: coopc compile PIPELINE --emit kernels DIR".into(),
        ));
    }
    if emit != Some(Emit::Kernels) && dir.is_some() {
        return Err(UserError(
            "a second positional argument (DIR) is only used with `--emit kernels`".into(),
        ));
    }
    let t0 = Instant::now();
    let options = coopc_compiler::frontend::Options {
        model_from: model.map(|m| m.display().to_string()),
    };
    let plan = if world <= 1 {
        coopc_compiler::compile_file_with(pipeline, &options).map_err(|e| UserError(e.render()))?
    } else {
        // The plan of one process of a data-parallel run of `world`.
        let (source, spec) = coopc_compiler::frontend::load_pipeline_with(pipeline, &options)
            .map_err(|e| UserError(e.render()))?;
        let mut plan = coopc_compiler::compile_for_world(spec, world)
            .map_err(|e| UserError(format!("--world {world}: {e}")))?;
        plan.pipeline_hash = coopc_compiler::plan::pipeline_hash(&source);
        plan.pipeline_path = pipeline.display().to_string();
        plan
    };
    let elapsed = t0.elapsed();
    let meta = plan.meta_step();
    match emit {
        Some(Emit::Ir) => print!("{}", to_text(&meta.graph)),
        Some(Emit::Dot) => print!("{}", to_dot(&meta.graph)),
        Some(Emit::Schedule) => {
            for p in &plan.programs {
                let s = schedule(&p.graph);
                println!(
                    "program {} — {} steps, peak {} (inputs {}, outputs {}), {:.3} GFLOP",
                    p.name(),
                    s.order.len(),
                    human_bytes(s.peak_bytes),
                    human_bytes(s.input_bytes),
                    human_bytes(s.output_bytes),
                    s.flops as f64 / 1e9
                );
                for (i, id) in s.order.iter().enumerate() {
                    let n = p.graph.node(*id);
                    println!(
                        "  {i:>6}  %{:<6} {:<40} {}",
                        id.index(),
                        n.op.to_string(),
                        n.ty
                    );
                }
            }
        }
        Some(Emit::Kernels) => emit_kernels(&plan, dir.expect("checked above"))?,
        None => {}
    }
    if let Some(out) = out {
        plan.write(out)?;
    }
    let summary = format!(
        "compiled {} ({}, {} hypergradient) in {:.2?}: {}",
        pipeline.display(),
        plan.spec.bilevel.method.name(),
        plan.spec.bilevel.hypergradient.kind.name(),
        elapsed,
        plan.programs
            .iter()
            .map(|p| format!(
                "{} {} nodes, peak {}",
                p.name(),
                p.graph.node_count(),
                human_bytes(p.peak_bytes)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    // With --emit the program text owns stdout.
    if emit.is_some() {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
        for n in &plan.notes {
            println!("  note: {n}");
        }
        if let Some(out) = out {
            println!("  plan written to {}", out.display());
        }
    }
    Ok(())
}
