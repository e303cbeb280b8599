//! `coopc export RUN --merged DIR`: a run's latest checkpoint as a Hugging
//! Face model folder, the LoRA folded into θ.

use crate::cli::run::read_spec;
use crate::cli::UserError;
use coopc_runtime::safetensors_io::FloatStorage;
use coopc_train::checkpoint::{load_latest, merge_lora};
use coopc_train::export::write_model_folder;
use std::path::Path;

/// Weight dtype of an exported model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    Bf16,
    F32,
}

pub fn run(run_dir: &Path, out: &Path, dtype: ExportDtype) -> Result<(), UserError> {
    let spec = read_spec(run_dir)?;
    let state = load_latest(run_dir).map_err(|e| UserError(e.to_string()))?;
    if out.exists() && out.read_dir().map_or(true, |mut d| d.next().is_some()) {
        return Err(UserError(format!(
            "{}: exists and is not an empty folder; choose a new one",
            out.display()
        )));
    }
    let merged = merge_lora(&spec, &state.tensors);
    let storage = match dtype {
        ExportDtype::Bf16 => FloatStorage::Bf16,
        ExportDtype::F32 => FloatStorage::F32,
    };
    write_model_folder(out, &spec, &merged, storage).map_err(|e| UserError(e.to_string()))?;
    println!(
        "{}: step {} merged (LoRA rank {}, alpha {}) into {} ({:?})",
        run_dir.display(),
        state.step,
        spec.lora.rank,
        spec.lora.alpha,
        out.display(),
        dtype
    );
    Ok(())
}
