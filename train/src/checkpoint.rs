//! Training checkpoints: θ by Hugging Face names (the folder is a Hugging
//! Face model folder), w by PEFT names (a PEFT adapter folder inside it), a merged
//! copy (LoRA folded into the base weights), and the rest of the training
//! state (shadow, optimiser state). A checkpoint is written whole into a
//! temporary folder, renamed to `step-N`, and becomes current only when the
//! `latest` pointer file is atomically replaced, so a crash or a failed
//! write (a full disk) never leaves a half-written checkpoint as the one to
//! resume from. `meta.txt` records the sha256 of every file; loading checks
//! them and names a file that changed instead of loading it.

use crate::export::{write_adapter_folder, write_model_folder, ExportError};
use coopc_ir::file::write_atomically;
use coopc_ir::params::{
    lora_name, lower_lora_name, module_path, theta_shapes, LOWER_LORA_PREFIX, PEFT_PREFIX,
};
use coopc_ir::spec::{LoraSpec, PipelineSpec, Projection};
use coopc_runtime::safetensors_io::{read_tensors, write_tensors, FloatStorage, TensorFileError};
use coopc_runtime::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Layout of a checkpoint folder, in its `meta.txt`: 3 adds a `sha256 HEX
/// PATH` line per file; 2 (still read) puts w in `adapter/` as a PEFT
/// adapter folder and makes the folder a Hugging Face model folder of θ;
/// 1 (still read) kept w in `adapter_model.safetensors`.
const META_VERSION: u32 = 3;

/// The specification a checkpoint was trained under (version 3).
pub const SPEC_FILE: &str = "spec.json";

/// The PEFT adapter folder of w inside a checkpoint.
pub const ADAPTER_DIR: &str = "adapter";

/// The PEFT adapter folder of the lower level's LoRA of θ (`model.lower`).
pub const LOWER_ADAPTER_DIR: &str = "lower_adapter";

fn export_error(e: ExportError) -> CheckpointError {
    match e {
        ExportError::Tensors(t) => CheckpointError::Tensors(t),
        ExportError::Io { path, message } => CheckpointError::Invalid {
            path,
            reason: message,
        },
    }
}

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
    #[error("checkpoint {}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a run needs to continue: the meta-step count and every state
/// tensor (θ, w, `shadow.*`, `opt.*`) by its meta-step input name.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub tensors: BTreeMap<String, HostTensor>,
}

/// θ with each LoRA product folded in: `W + (alpha / rank) · B A` for w,
/// and for the lower level's LoRA of θ when there is one.
pub fn merge_lora(
    spec: &PipelineSpec,
    tensors: &BTreeMap<String, HostTensor>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (name, _) in theta_shapes(&spec.model) {
        let Some(t) = tensors.get(&name) else {
            continue;
        };
        out.insert(name.clone(), t.clone());
    }
    let adapters: Vec<(&LoraSpec, fn(usize, Projection, char) -> String)> = spec
        .model
        .lower
        .iter()
        .map(|l| (l, lower_lora_name as fn(usize, Projection, char) -> String))
        .chain([(
            &spec.lora,
            lora_name as fn(usize, Projection, char) -> String,
        )])
        .collect();
    for (lora, name_of) in adapters {
        let scale = lora.scale();
        for layer in 0..spec.model.n_layers {
            for p in Projection::ALL {
                if !lora.targets.contains(&p) {
                    continue;
                }
                let w_name = format!("{}.weight", module_path(layer, p));
                let (Some(w), Some(a), Some(b)) = (
                    out.get(&w_name),
                    tensors.get(&name_of(layer, p, 'A')),
                    tensors.get(&name_of(layer, p, 'B')),
                ) else {
                    continue;
                };
                let (o, i, r) = (w.shape[0], w.shape[1], a.shape[0]);
                let (wv, av, bv) = (w.to_f64_vec(), a.to_f64_vec(), b.to_f64_vec());
                let mut merged = wv;
                for row in 0..o {
                    for col in 0..i {
                        let mut acc = 0.0;
                        for k in 0..r {
                            acc += bv[row * r + k] * av[k * i + col];
                        }
                        merged[row * i + col] += scale * acc;
                    }
                }
                let t =
                    HostTensor::from_f64(w.dtype(), w.shape.clone(), &merged).expect("same shape");
                out.insert(w_name, t);
            }
        }
    }
    out
}

fn io<'p>(
    path: &'p Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'p {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The folder holding a run's checkpoints.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes `state` as checkpoint `step-N` of the run in `run_dir` and makes it
/// the latest; older checkpoints are removed afterwards. On any error the
/// previous checkpoint stays current and the partial one is removed.
pub fn save(
    run_dir: &Path,
    spec: &PipelineSpec,
    state: &TrainState,
) -> Result<PathBuf, CheckpointError> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(io(&root, "create the folder"))?;
    let name = format!("step-{}", state.step);
    let dir = root.join(&name);
    let partial = root.join(format!(".{name}.partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial, "remove the stale folder"))?;
    }
    let written = write_folder(&partial, &dir, spec, state).and_then(|()| {
        // A `step-N` that is not current is what a crash between the rename
        // and the pointer left behind: it is replaced.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "replace the folder"))?;
        }
        std::fs::rename(&partial, &dir).map_err(io(&dir, "rename the written checkpoint to"))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let latest = root.join("latest");
    write_atomically(&latest, format!("{name}\n").as_bytes()).map_err(io(&latest, "write"))?;
    // Older checkpoints, and what crashed runs left, go only after the new
    // one is current.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let p = e.path();
            let n = e.file_name().to_string_lossy().to_string();
            let stale = (n.starts_with("step-") && p != dir) || n.starts_with(".step-");
            if p.is_dir() && stale {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(dir)
}

/// The files of checkpoint `state` in `dir`, for a folder that will be
/// renamed to `final_dir` (the adapters name it as their base model).
fn write_folder(
    dir: &Path,
    final_dir: &Path,
    spec: &PipelineSpec,
    state: &TrainState,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir, "create the folder"))?;
    let theta_names: Vec<String> = theta_shapes(&spec.model)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut theta = BTreeMap::new();
    let mut adapter = BTreeMap::new();
    let mut rest = BTreeMap::new();
    for (name, t) in &state.tensors {
        if theta_names.contains(name) {
            theta.insert(name.clone(), t.clone());
        } else if name.starts_with(coopc_ir::params::PEFT_PREFIX) {
            adapter.insert(name.clone(), t.clone());
        } else {
            rest.insert(name.clone(), t.clone());
        }
    }
    // The folder is a Hugging Face model folder of θ (config, weights,
    // tokenizer files), with w as a PEFT adapter of it in `adapter/`.
    write_model_folder(dir, spec, &theta, FloatStorage::Native).map_err(export_error)?;
    let base = std::path::absolute(final_dir).unwrap_or_else(|_| final_dir.to_path_buf());
    write_adapter_folder(
        &dir.join(ADAPTER_DIR),
        spec,
        &adapter,
        &base.display().to_string(),
        FloatStorage::Native,
    )
    .map_err(export_error)?;
    // The lower level's LoRA of θ, when it trains one, as a second PEFT
    // adapter of the same base (also kept in state.safetensors to resume).
    if let Some(lower) = &spec.model.lower {
        let as_peft: BTreeMap<String, HostTensor> = rest
            .iter()
            .filter_map(|(n, t)| {
                let module = n.strip_prefix(LOWER_LORA_PREFIX)?;
                Some((format!("{PEFT_PREFIX}{module}"), t.clone()))
            })
            .collect();
        let lower_spec = PipelineSpec {
            lora: lower.clone(),
            ..spec.clone()
        };
        write_adapter_folder(
            &dir.join(LOWER_ADAPTER_DIR),
            &lower_spec,
            &as_peft,
            &base.display().to_string(),
            FloatStorage::Native,
        )
        .map_err(export_error)?;
    }
    write_tensors(
        &dir.join("merged.safetensors"),
        &merge_lora(spec, &state.tensors),
    )?;
    write_tensors(&dir.join("state.safetensors"), &rest)?;
    // The specification the state was trained under: a resume checks that
    // what it continues with computes the same meta-step.
    let spec_path = dir.join(SPEC_FILE);
    let spec_json = serde_json::to_string_pretty(spec).map_err(|e| CheckpointError::Invalid {
        path: spec_path.clone(),
        reason: e.to_string(),
    })?;
    write_atomically(&spec_path, spec_json.as_bytes()).map_err(io(&spec_path, "write"))?;
    let mut meta = format!("version {META_VERSION}\nstep {}\n", state.step);
    for rel in files_under(dir).map_err(io(dir, "list"))? {
        let path = dir.join(&rel);
        let sum = coopc_ir::file::sha256_file(&path).map_err(io(&path, "read back"))?;
        meta.push_str(&format!("sha256 {sum} {rel}\n"));
    }
    let meta_path = dir.join("meta.txt");
    write_atomically(&meta_path, meta.as_bytes()).map_err(io(&meta_path, "write"))
}

/// Every file under `dir`, as `/`-separated paths relative to it, sorted.
fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            let rel = format!("{prefix}{name}");
            if e.file_type()?.is_dir() {
                stack.push((e.path(), format!("{rel}/")));
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The specification the latest checkpoint of the run in `run_dir` was
/// trained under, checked against its checksum; `None` for a checkpoint
/// of a layout that did not record it (version 1 and 2).
pub fn latest_spec(run_dir: &Path) -> Result<Option<PipelineSpec>, CheckpointError> {
    let dir = latest_dir(run_dir)?;
    let meta_path = dir.join("meta.txt");
    let meta = std::fs::read_to_string(&meta_path).map_err(io(&meta_path, "read"))?;
    let Some(sum) = meta.lines().find_map(|l| {
        let (sum, file) = l.strip_prefix("sha256 ")?.split_once(' ')?;
        (file == SPEC_FILE).then_some(sum)
    }) else {
        return Ok(None);
    };
    let path = dir.join(SPEC_FILE);
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(io(&path, "read"))?;
    let actual = coopc_ir::file::hex(&coopc_ir::file::sha256_bytes(&bytes));
    if actual != sum {
        return Err(invalid(
            "does not match the sha256 checksum meta.txt records for it; not loaded".into(),
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| invalid(format!("not a valid run specification: {e}")))
}

/// The folder `checkpoints/latest` names.
pub fn latest_dir(run_dir: &Path) -> Result<PathBuf, CheckpointError> {
    let root = checkpoints_dir(run_dir);
    let latest = root.join("latest");
    let pointer = std::fs::read_to_string(&latest)
        .map_err(io(&latest, "read (no checkpoint to resume from)"))?;
    let name = pointer.trim();
    let valid = name
        .strip_prefix("step-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !valid {
        return Err(CheckpointError::Invalid {
            path: latest,
            reason: format!("names `{}`, not a `step-N` folder", name.escape_debug()),
        });
    }
    Ok(root.join(name))
}

/// Reads the latest checkpoint of the run in `run_dir`.
pub fn load_latest(run_dir: &Path) -> Result<TrainState, CheckpointError> {
    load(&latest_dir(run_dir)?)
}

/// Reads one checkpoint folder, checking every file against the sha256
/// its `meta.txt` records (version 3).
pub fn load(dir: &Path) -> Result<TrainState, CheckpointError> {
    let meta_path = dir.join("meta.txt");
    let meta = std::fs::read_to_string(&meta_path).map_err(io(&meta_path, "read"))?;
    let invalid = |reason: String| CheckpointError::Invalid {
        path: dir.to_path_buf(),
        reason,
    };
    let mut version = None;
    let mut step = None;
    let mut sums = Vec::new();
    for (i, line) in meta.lines().enumerate() {
        match line.split_once(' ') {
            Some(("version", v)) => version = v.trim().parse::<u32>().ok(),
            Some(("step", v)) => step = v.trim().parse::<usize>().ok(),
            Some(("sha256", rest)) => match rest.split_once(' ') {
                Some((sum, file))
                    if sum.len() == 64
                        && !file.is_empty()
                        && !file.split('/').any(|c| c == ".." || c.is_empty()) =>
                {
                    sums.push((sum.to_string(), file.to_string()))
                }
                _ => {
                    return Err(invalid(format!(
                        "meta.txt line {}: expected `sha256 HEX PATH`",
                        i + 1
                    )))
                }
            },
            _ => {}
        }
    }
    if !matches!(version, Some(1..=META_VERSION)) {
        return Err(invalid(format!(
            "meta.txt has no supported version (expected 1 to {META_VERSION})"
        )));
    }
    let step = step.ok_or_else(|| invalid("meta.txt has no step".into()))?;
    if version == Some(META_VERSION) && sums.is_empty() {
        return Err(invalid("meta.txt lists no checksums".into()));
    }
    for (sum, file) in &sums {
        let path = dir.join(file);
        let actual = coopc_ir::file::sha256_file(&path).map_err(io(&path, "read"))?;
        if &actual != sum {
            return Err(invalid(format!(
                "{file} does not match the sha256 checksum meta.txt records for it \
                 (the file was changed or damaged after it was written); not loaded"
            )));
        }
    }
    let adapter = if version == Some(1) {
        dir.join("adapter_model.safetensors")
    } else {
        dir.join(ADAPTER_DIR).join("adapter_model.safetensors")
    };
    let mut tensors = BTreeMap::new();
    for file in [
        dir.join("model.safetensors"),
        adapter,
        dir.join("state.safetensors"),
    ] {
        tensors.extend(read_tensors(&file)?);
    }
    Ok(TrainState { step, tensors })
}
