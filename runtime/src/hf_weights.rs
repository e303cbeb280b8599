//! The weights of a Hugging Face model folder: `model.safetensors`, or the
//! shards a `model.safetensors.index.json` maps tensor names to. Files are
//! memory-mapped and read one tensor at a time, converted to the dtype the
//! program expects (bf16/f16/f32/f64 → f32 or f64) as they are read; the
//! pages of a tensor are released once it is converted, so the peak
//! resident memory is the converted weights plus about one tensor.

use crate::safetensors_io::{decode_as, TensorFileError, TensorProblem};
use crate::tensor::HostTensor;
use coopc_ir::TensorType;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The single-file weights of a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Which file of `dir` holds each tensor: the index's `weight_map` when
/// the folder is sharded, otherwise every tensor of `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, TensorFileError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| TensorFileError::Io {
            path: index.clone(),
            action: "read",
            source,
        })?;
        let format = |message: String| TensorFileError::Format {
            path: index.clone(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format("no `weight_map` object".into()))?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format(format!("`weight_map.{name}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(format(format!(
                    "`weight_map.{name}` names {file:?}, not a file of the folder"
                )));
            }
            files.insert(file.to_string());
        }
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                return Err(TensorFileError::Format {
                    path: index.clone(),
                    message: format!(
                        "the shard {} it lists does not exist",
                        f.file_name().unwrap_or_default().to_string_lossy()
                    ),
                });
            }
        }
        Ok(files)
    } else {
        let single = dir.join(WEIGHTS_FILE);
        if !single.exists() {
            return Err(TensorFileError::NotFound { path: single });
        }
        Ok(vec![single])
    }
}

/// Reads the expected tensors (θ by Hugging Face name, with the types of the
/// program's ports) from the model folder `dir`.
///
/// Every expected tensor must be present with its shape; tensors of the
/// files nothing expects are an error too, except RoPE's `inv_freq`
/// buffers and a `lm_head.weight` of a model whose embeddings are tied
/// (`ignore_lm_head`), which transformers ignores as well. One error lists
/// every problem.
pub fn read_model_weights(
    dir: &Path,
    expected: &[(String, TensorType)],
    ignore_lm_head: bool,
) -> Result<BTreeMap<String, HostTensor>, TensorFileError> {
    let files = weight_files(dir)?;
    let wanted: BTreeMap<&str, &TensorType> =
        expected.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for path in &files {
        let file = std::fs::File::open(path).map_err(|source| TensorFileError::Io {
            path: path.clone(),
            action: "read",
            source,
        })?;
        // SAFETY: the map is read-only and only read while `file` is open;
        // a model folder changed by another process while it loads is
        // outside what coopc guards against (as with transformers).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| TensorFileError::Io {
            path: path.clone(),
            action: "map",
            source,
        })?;
        let st = SafeTensors::deserialize(&map).map_err(|e| TensorFileError::Format {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.iter() {
            let Some(ty) = wanted.get(name) else {
                let ignorable = name.ends_with("rotary_emb.inv_freq")
                    || (ignore_lm_head && name == "lm_head.weight");
                if !ignorable {
                    problems.push(TensorProblem::Unexpected {
                        name: name.to_string(),
                        got: TensorType::new(coopc_ir::DType::F32, view.shape().to_vec()),
                    });
                }
                continue;
            };
            if view.shape() != ty.shape.as_slice() {
                problems.push(TensorProblem::WrongShape {
                    name: name.to_string(),
                    expected: (*ty).clone(),
                    got: TensorType::new(ty.dtype, view.shape().to_vec()),
                });
                continue;
            }
            let t = decode_as(
                path,
                name,
                view.dtype(),
                view.shape(),
                view.data(),
                ty.dtype,
            )?;
            out.insert(name.to_string(), t);
            // The converted copy is all that is kept: drop the mapped pages.
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            #[cfg(unix)]
            // SAFETY: a read-only file mapping; nothing refers to these
            // bytes any more, and a later read would fetch them again.
            unsafe {
                let _ = map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    data.len(),
                );
            }
        }
    }
    for (name, ty) in expected {
        if !out.contains_key(name) && !problems.iter().any(|p| p.name() == name) {
            problems.push(TensorProblem::Missing {
                name: name.clone(),
                expected: ty.clone(),
            });
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        let what = if files.len() > 1 {
            format!("model folder {} ({} shards)", dir.display(), files.len())
        } else {
            format!("model folder {}", dir.display())
        };
        Err(TensorFileError::Mismatch { what, problems })
    }
}
