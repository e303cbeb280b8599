//! `coopc init`: initial parameters for a pipeline (HF/PEFT initialisation)
//! and, on request, a synthetic batch of the pipeline's shapes — enough to
//! run `coopc grad` without any other tool.

use crate::cli_compile::logprobs_program;
use crate::cli_grad::UserError;
use coopc_compiler::ir::DType;
use coopc_compiler::lowering::{float_dtype, BatchShapes};
use coopc_runtime::init::init_params;
use coopc_runtime::safetensors_io::write_tensors;
use coopc_runtime::train::advantages;
use coopc_runtime::{execute, HostTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub fn run(
    pipeline: &Path,
    params: &Path,
    batch: Option<&Path>,
    seed: u64,
) -> Result<(), UserError> {
    let (_, spec) =
        coopc_compiler::frontend::load_pipeline(pipeline).map_err(|e| UserError(e.render()))?;
    let dt = float_dtype(spec.backend.dtype);
    let p = init_params(&spec, dt, seed);
    write_tensors(params, &p)?;
    println!(
        "{} initial tensors (θ and w) written to {}",
        p.len(),
        params.display()
    );
    let Some(batch) = batch else { return Ok(()) };

    let shapes = BatchShapes::from_spec(&spec);
    let (bs, br, t) = (shapes.sft_batch, shapes.rl_batch, shapes.seq_len);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xba7c4);
    let vocab = spec.model.vocab_size as i32;
    let mut ids = |b: usize| {
        HostTensor::i32(
            vec![b, t],
            (0..b * t).map(|_| rng.gen_range(0..vocab)).collect(),
        )
    };
    let sft_ids = ids(bs);
    let rl_ids = ids(br);
    // Responses: the second half of every sequence.
    let mask = |b: usize| {
        let v: Vec<f64> = (0..b * t)
            .map(|i| if i % t >= t / 2 { 1.0 } else { 0.0 })
            .collect();
        HostTensor::from_f64(dt, vec![b, t], &v)
    };
    // Rewards ±1, advantages as the pipeline's `rl.advantage` computes them.
    let g = spec.rl.group_size;
    let rewards: Vec<f64> = (0..br)
        .map(|_| if rng.gen_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let adv = advantages(&rewards, g, spec.rl.advantage);
    // π_old (and π_ref) = the initial policy: score the rollouts with it.
    let scorer = logprobs_program(&spec, shapes);
    let mut inputs: HashMap<String, HostTensor> = p.clone().into_iter().collect();
    inputs.insert("input_ids".into(), rl_ids.clone());
    let lp = execute(&scorer, &inputs)?.remove(0).1;
    let mut b = BTreeMap::new();
    b.insert("sft.input_ids".to_string(), sft_ids);
    b.insert("sft.loss_mask".to_string(), mask(bs)?);
    b.insert("rl.input_ids".to_string(), rl_ids);
    b.insert("rl.loss_mask".to_string(), mask(br)?);
    b.insert(
        "rl.advantages".to_string(),
        HostTensor::from_f64(dt, vec![br], &adv)?,
    );
    if spec.rl.kl_coef > 0.0 {
        b.insert("rl.ref_logprobs".to_string(), lp.clone());
    }
    b.insert("rl.old_logprobs".to_string(), lp);
    debug_assert!(b
        .values()
        .all(|x| x.dtype() == dt || x.dtype() == DType::I32));
    write_tensors(batch, &b)?;
    println!(
        "synthetic batch (SFT {bs} × {t}, RL {br} × {t}, random tokens, responses on the second half) written to {}",
        batch.display()
    );
    Ok(())
}
