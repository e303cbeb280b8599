//! `coopc compile`: pipeline.toml → lowered, optimised, scheduled programs →
//! a plan file; optionally prints the meta-step as IR, DOT or its schedule.

use crate::cli_grad::UserError;
use coopc_compiler::ir::{to_dot, to_text};
use coopc_compiler::lowering::{lower_logprobs, lower_meta_step, BatchShapes};
use coopc_compiler::passes::Pipeline;
use coopc_compiler::plan::{pipeline_hash, Plan, Program};
use coopc_compiler::schedule::{human_bytes, schedule};
use coopc_compiler::spec::PipelineSpec;
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

/// Lowers and optimises every program of a pipeline.
pub fn build_plan(source: &str, path: &Path, spec: PipelineSpec) -> Plan {
    let shapes = BatchShapes::from_spec(&spec);
    // The lowering runs the pass pipeline on the meta-step itself (its
    // memory plan is chosen on optimised graphs).
    let ms = lower_meta_step(&spec, shapes);
    let mut logprobs = lower_logprobs(&spec, shapes);
    Pipeline::standard().run(&mut logprobs);
    Plan {
        spec,
        pipeline_hash: pipeline_hash(source),
        pipeline_path: path.display().to_string(),
        programs: vec![
            Program::new("meta_step", ms.graph),
            Program::new("logprobs", logprobs),
        ],
        notes: ms.notes,
    }
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
    use coopc_compiler::fusion::fuse;
    use std::fmt::Write as _;
    let mut index = String::new();
    // The plan's programs, and the decode step training samples rollouts
    // with (built at run time for the RL batch and the sequence length)
    // with its LoRA merge.
    let spec = &plan.spec;
    let decode = coopc_compiler::decode::decode_step_program(
        &spec.model,
        &spec.lora,
        coopc_compiler::lowering::float_dtype(spec.backend.dtype),
        spec.rl.batch_size(),
        spec.train.seq_len,
    );
    // Run once per sampling call: the LoRA factors merged into the weights
    // the decode step reads.
    let merge = coopc_compiler::decode::lora_merge_program(
        &spec.model,
        &spec.lora,
        coopc_compiler::lowering::float_dtype(spec.backend.dtype),
    );
    let programs = plan
        .programs
        .iter()
        .map(|p| (p.name.as_str(), &p.graph))
        .chain([("decode_step", &decode)])
        .chain(merge.as_ref().map(|m| ("lora_merge", m)));
    for (name, graph) in programs {
        let sched = schedule(graph);
        let fused = fuse(graph, &sched.order);
        let sources = coopc_kernels::source::schedule_sources(graph, &fused).map_err(UserError)?;
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)
            .map_err(|e| UserError(format!("cannot create {}: {e}", sub.display())))?;
        let (peak, live) = fused.device_peak_live(graph);
        let _ = writeln!(
            index,
            "{}: {} scheduled nodes → {}; {} distinct kernel sources; device footprint {} (estimate), largest groups then:",
            name,
            sched.order.len(),
            fused,
            sources.len(),
            human_bytes(peak)
        );
        let four = |id| 4 * graph.ty(id).numel().max(1);
        for line in crate::cli_inspect::buffer_groups(graph, &live, four) {
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
    out: Option<&Path>,
    emit: Option<Emit>,
    dir: Option<&Path>,
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
    let (source, spec) =
        coopc_compiler::frontend::load_pipeline(pipeline).map_err(|e| UserError(e.render()))?;
    let plan = build_plan(&source, pipeline, spec);
    let elapsed = t0.elapsed();
    let meta = &plan.programs[0];
    match emit {
        Some(Emit::Ir) => print!("{}", to_text(&meta.graph)),
        Some(Emit::Dot) => print!("{}", to_dot(&meta.graph)),
        Some(Emit::Schedule) => {
            for p in &plan.programs {
                let s = schedule(&p.graph);
                println!(
                    "program {} — {} steps, peak {} (inputs {}, outputs {}), {:.3} GFLOP",
                    p.name,
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
                p.name,
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
