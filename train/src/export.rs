//! Hugging Face outputs: model folders (`config.json`, safetensors, the
//! tokenizer files of the source folder) that `transformers`, vLLM or
//! llama.cpp's converter load, and PEFT adapter folders
//! (`adapter_config.json`, `adapter_model.safetensors` with PEFT's names).

use coopc_ir::file::write_atomically;
use coopc_ir::hf::Architecture;
use coopc_ir::params::theta_shapes;
use coopc_ir::spec::{PipelineSpec, RopeScaling};
use coopc_runtime::safetensors_io::{write_tensors_as, FloatStorage, TensorFileError};
use coopc_runtime::HostTensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {message}", path.display())]
    Io {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
}

fn io(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Files of a source model folder that an exported model folder carries
/// over unchanged.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// The `config.json` of a model folder holding θ of `spec` stored as
/// `dtype` (`"bfloat16"`, `"float32"`): the source folder's config with
/// its dtype updated when the model came from one, otherwise a config of
/// the architecture the spec describes (Qwen3 with q/k norm, Qwen2 with
/// q/k/v biases, Llama otherwise).
pub fn config_json(spec: &PipelineSpec, dtype: &str) -> Result<Value, ExportError> {
    let m = &spec.model;
    if let Some(dir) = &m.from {
        let path = Path::new(dir).join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let mut v: Value = serde_json::from_str(&text).map_err(|e| io(&path, e))?;
        if let Value::Object(o) = &mut v {
            o.insert("torch_dtype".into(), json!(dtype));
            if o.contains_key("dtype") {
                o.insert("dtype".into(), json!(dtype));
            }
        }
        return Ok(v);
    }
    let arch = if m.qk_norm {
        Architecture::Qwen3
    } else if m.qkv_bias {
        Architecture::Qwen2
    } else {
        Architecture::Llama
    };
    let rope_scaling = match &m.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    Ok(json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "intermediate_size": m.d_ff,
        "head_dim": m.head_dim(),
        "max_position_embeddings": m.max_seq,
        "rope_theta": m.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": m.rms_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "torch_dtype": dtype,
    }))
}

fn write_json(path: &Path, v: &Value) -> Result<(), ExportError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_atomically(path, format!("{text}\n").as_bytes()).map_err(|e| io(path, e))
}

/// Writes a Hugging Face model folder of θ (by HF names) into `dir`:
/// `config.json`, `model.safetensors` in `storage` (bf16 or f32), and the
/// tokenizer and generation files of `model.from` when there is one.
/// Tensors of `theta` that are not θ of `spec` are an error.
pub fn write_model_folder(
    dir: &Path,
    spec: &PipelineSpec,
    theta: &BTreeMap<String, HostTensor>,
    storage: FloatStorage,
) -> Result<(), ExportError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let names: Vec<String> = theta_shapes(&spec.model)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    if let Some(extra) = theta.keys().find(|k| !names.contains(k)) {
        return Err(io(dir, format!("`{extra}` is not a tensor of the model")));
    }
    if let Some(missing) = names.iter().find(|n| !theta.contains_key(*n)) {
        return Err(io(dir, format!("the model's `{missing}` is missing")));
    }
    let dtype = match storage {
        FloatStorage::Bf16 => "bfloat16",
        FloatStorage::F32 => "float32",
        FloatStorage::Native => match spec.backend.dtype.dtype() {
            coopc_ir::DType::F64 => "float64",
            _ => "float32",
        },
    };
    write_json(&dir.join("config.json"), &config_json(spec, dtype)?)?;
    write_tensors_as(&dir.join("model.safetensors"), theta, storage)?;
    if let Some(src) = &spec.model.from {
        for f in TOKENIZER_FILES {
            let from = Path::new(src).join(f);
            if from.exists() {
                let to = dir.join(f);
                let bytes = std::fs::read(&from).map_err(|e| io(&from, e))?;
                write_atomically(&to, &bytes).map_err(|e| io(&to, e))?;
            }
        }
    }
    Ok(())
}

/// Writes a PEFT LoRA adapter folder of w (by PEFT names) into `dir`:
/// `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
/// `base_model_name_or_path`) and `adapter_model.safetensors` in `storage`.
pub fn write_adapter_folder(
    dir: &Path,
    spec: &PipelineSpec,
    adapter: &BTreeMap<String, HostTensor>,
    base_model: &str,
    storage: FloatStorage,
) -> Result<(), ExportError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let targets: Vec<&str> = spec.lora.targets.iter().map(|p| p.name()).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.lora.rank,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_json(&dir.join("adapter_config.json"), &config)?;
    write_tensors_as(&dir.join("adapter_model.safetensors"), adapter, storage)?;
    Ok(())
}
