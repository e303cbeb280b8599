//! `coopc score`: token log-probabilities of given ids under a run's policy
//! (θ and the LoRA w of its latest checkpoint) or a Hugging Face model
//! folder — what other implementations are checked against.

use crate::cli::run::read_spec;
use crate::cli::UserError;
use coopc_compiler::compile_logprobs;
use coopc_compiler::plan::{LOGPROBS, TOKEN_IDS};
use coopc_runtime::safetensors_io::{read_tensors, write_tensors};
use coopc_runtime::{execute_program, HostTensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// What to score under.
pub enum Source<'a> {
    /// A run's latest checkpoint (θ and w), in the run's dtype.
    Run(&'a Path),
    /// A Hugging Face model folder as it is, in `dtype` (`f32` or `f64`).
    Model { dir: &'a Path, dtype: &'a str },
}

/// Scores `ids` (`input_ids` [B, T] of a safetensors file) and writes
/// `logprobs` [B, T] (entry t: log p(ids[t] | ids[<t]), entry 0 is 0) to
/// `out`, on the CPU executor.
pub fn run(source: Source, ids: &Path, out: &Path) -> Result<(), UserError> {
    let t0 = Instant::now();
    let mut file = read_tensors(ids).map_err(|e| UserError(e.to_string()))?;
    let input = file
        .remove("input_ids")
        .ok_or_else(|| UserError(format!("{}: no `input_ids` tensor", ids.display())))?;
    let (b, t) = match input.shape[..] {
        [b, t] if b >= 1 && t >= 2 => (b, t),
        _ => {
            return Err(UserError(format!(
                "{}: `input_ids` must be [batch, tokens] with at least 2 tokens, not {:?}",
                ids.display(),
                input.shape
            )))
        }
    };
    let (mut spec, tensors, what) = match source {
        Source::Run(run_dir) => {
            let spec = read_spec(run_dir)?;
            let state = coopc_train::checkpoint::load_latest(run_dir)
                .map_err(|e| UserError(e.to_string()))?;
            let what = format!("{}: step {}", run_dir.display(), state.step);
            (spec, state.tensors, what)
        }
        Source::Model { dir, dtype } => {
            // The folder's model with an adapter that adds nothing (B = 0).
            let text = format!(
                "[model]\nmax_seq = {t}\n[lora]\nrank = 1\ntargets = [\"q_proj\"]\n\
                 [backend]\ndtype = \"{dtype}\"\n"
            );
            let options = coopc_compiler::frontend::Options {
                model_from: Some(dir.display().to_string()),
            };
            let spec = coopc_compiler::frontend::parse_pipeline_with(&text, &options)
                .map_err(|d| UserError(d.render("--model", &text)))?;
            let program = compile_logprobs(&spec);
            let tensors =
                coopc_train::init::pretrained_or_init(&spec, program.signature.parameters(), 0)
                    .map_err(|e| UserError(e.to_string()))?;
            (spec, tensors, dir.display().to_string())
        }
    };
    let loaded = t0.elapsed();
    if t > spec.model.max_seq {
        return Err(UserError(format!(
            "{}: {t} tokens per row, more than model.max_seq = {}",
            ids.display(),
            spec.model.max_seq
        )));
    }
    if let Some(bad) = input
        .to_f64_vec()
        .iter()
        .find(|&&v| v < 0.0 || v >= spec.model.vocab_size as f64)
    {
        return Err(UserError(format!(
            "{}: token id {bad} is outside the vocabulary (0..{})",
            ids.display(),
            spec.model.vocab_size
        )));
    }
    // The log-prob program of exactly these shapes.
    spec.rl.prompts_per_step = b;
    spec.rl.group_size = 1;
    spec.train.seq_len = t;
    let program = compile_logprobs(&spec);
    let mut inputs: HashMap<String, HostTensor> = HashMap::new();
    let mut tensors = tensors;
    for p in program.signature.parameters() {
        if let Some(v) = tensors.remove(&p.name) {
            inputs.insert(p.name.clone(), v);
        }
    }
    drop(tensors);
    inputs.insert(TOKEN_IDS.to_string(), input);
    let t1 = Instant::now();
    let lp = execute_program(&program, &inputs)
        .map_err(|e| UserError(e.to_string()))?
        .into_iter()
        .find(|(n, _)| n == LOGPROBS)
        .map(|(_, t)| t)
        .ok_or_else(|| UserError("the log-prob program returned no log-probs".into()))?;
    let scored = t1.elapsed();
    write_tensors(out, &BTreeMap::from([("logprobs".to_string(), lp)]))
        .map_err(|e| UserError(e.to_string()))?;
    println!(
        "{what} · log-probs of {b}×{t} ids written to {} · load {:.2} s, score {:.2} s",
        out.display(),
        loaded.as_secs_f64(),
        scored.as_secs_f64()
    );
    Ok(())
}
