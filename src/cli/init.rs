//! `coopc init`: initial parameters for a pipeline (HF/PEFT initialisation)
//! and, on request, a synthetic batch of the pipeline's shapes — enough to
//! run `coopc grad` without any other tool.

use crate::cli::UserError;
use coopc_compiler::compile_logprobs;
use coopc_compiler::ir::DType;
use coopc_compiler::lowering::BatchShapes;
use coopc_runtime::safetensors_io::write_tensors;
use coopc_train::init::{init_params, synthetic_batch};
use std::path::Path;

pub fn run(
    pipeline: &Path,
    params: &Path,
    batch: Option<&Path>,
    seed: u64,
) -> Result<(), UserError> {
    let (_, spec) =
        coopc_compiler::frontend::load_pipeline(pipeline).map_err(|e| UserError(e.render()))?;
    let dt = spec.backend.dtype.dtype();
    // The scorer's signature lists θ and w in the schema's order, as the
    // meta-step's does; it also scores the synthetic rollouts.
    let scorer = compile_logprobs(&spec);
    let p = init_params(scorer.signature.parameters(), seed);
    write_tensors(params, &p)?;
    println!(
        "{} initial tensors (θ and w) written to {}",
        p.len(),
        params.display()
    );
    let Some(batch) = batch else { return Ok(()) };

    let b = synthetic_batch(&spec, &scorer, &p, seed)?;
    debug_assert!(b
        .values()
        .all(|x| x.dtype() == dt || x.dtype() == DType::I32));
    let shapes = BatchShapes::from_spec(&spec);
    let (bs, br, t) = (shapes.sft_batch, shapes.rl_batch, shapes.seq_len);
    write_tensors(batch, &b)?;
    println!(
        "synthetic batch (SFT {bs} × {t}, RL {br} × {t}, random tokens, responses on the second half) written to {}",
        batch.display()
    );
    Ok(())
}
