//! Hugging Face model folders: what a `config.json` says about the
//! decoder, checked against what coopc computes. Every field that changes
//! the math is either read or refused with an error naming it; nothing is
//! silently ignored.
//!
//! Supported: `LlamaForCausalLM` (SmolLM2, Llama 3.x with `rope_scaling`
//! of type `llama3`), `Qwen2ForCausalLM` (q/k/v biases),
//! `Qwen3ForCausalLM` (per-head q/k RMSNorm, explicit `head_dim`) and
//! `MistralForCausalLM` without a sliding window in use.

use crate::spec::RopeScaling;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A decoder architecture coopc builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Mistral,
    ];

    /// The `architectures` entry of `config.json`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
        }
    }

    /// `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mistral => "mistral",
        }
    }
}

/// Why a model folder's configuration cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct HfConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// What coopc reads from a `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    /// `hidden_size`.
    pub d_model: usize,
    /// `num_hidden_layers`.
    pub n_layers: usize,
    /// `num_attention_heads`.
    pub n_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub n_kv_heads: usize,
    /// `intermediate_size`.
    pub d_ff: usize,
    /// `head_dim` when the config gives one that differs from
    /// `hidden_size / num_attention_heads` (Qwen3's default is 128).
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// `rms_norm_eps`.
    pub rms_eps: f64,
    /// `tie_word_embeddings` (default false for all four architectures).
    pub tie_embeddings: bool,
    /// q/k/v biases: always for Qwen2, never for the others.
    pub qkv_bias: bool,
    /// Qwen3's q_norm/k_norm.
    pub qk_norm: bool,
    /// The attention window when one applies to every layer (Mistral's
    /// `sliding_window`, Qwen's with `use_sliding_window`); sequences
    /// longer than it are refused.
    pub sliding_window: Option<usize>,
    /// `torch_dtype` (or `dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
    /// `bos_token_id` and `eos_token_id` (a list for Llama 3).
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The `config.json` of the model folder `dir`, read and checked.
pub fn read_config(dir: &Path) -> Result<HfConfig, HfConfigError> {
    let path = dir.join("config.json");
    let err = |message: String| HfConfigError {
        path: path.clone(),
        message,
    };
    if !dir.is_dir() {
        return Err(HfConfigError {
            path: dir.to_path_buf(),
            message: if dir.exists() {
                "not a folder (model.from names a Hugging Face model folder)".into()
            } else {
                "no such folder (model.from names a Hugging Face model folder)".into()
            },
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        err(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no config.json in the model folder (is it a Hugging Face model folder?)".into()
            }
            _ => e.to_string(),
        })
    })?;
    parse_config(&text).map_err(err)
}

/// Parses a `config.json` text; the error is the message alone.
pub fn parse_config(text: &str) -> Result<HfConfig, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err("not a JSON object".into());
    };
    let c = Fields(&o);

    let architecture = {
        let names: Vec<String> = match o.get("architectures") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().unwrap_or("?").to_string())
                .collect(),
            Some(_) => return Err("`architectures` must be a list of class names".into()),
            None => Vec::new(),
        };
        let by_class = names.iter().find_map(|n| {
            Architecture::ALL
                .into_iter()
                .find(|a| a.class_name() == n.as_str())
        });
        let by_type = c.str("model_type")?.and_then(|t| {
            Architecture::ALL
                .into_iter()
                .find(|a| a.model_type() == t.as_str())
        });
        match (by_class, names.is_empty()) {
            (Some(a), _) => a,
            (None, true) => by_type.ok_or_else(|| {
                format!(
                    "unsupported architecture: no `architectures` and `model_type` {}; coopc builds {}",
                    c.str("model_type").ok().flatten().map_or("missing".into(), |t| format!("{t:?}")),
                    supported()
                )
            })?,
            (None, false) => {
                return Err(format!(
                    "unsupported architecture {}; coopc builds {}",
                    names.join(", "),
                    supported()
                ))
            }
        }
    };

    let d_model = c.req_usize("hidden_size")?;
    let n_heads = c.req_usize("num_attention_heads")?;
    let n_layers = c.req_usize("num_hidden_layers")?;
    let d_ff = c.req_usize("intermediate_size")?;
    let vocab_size = c.req_usize("vocab_size")?;
    let n_kv_heads = c.usize("num_key_value_heads")?.unwrap_or(n_heads);
    if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(format!(
            "num_key_value_heads ({n_kv_heads}) must divide num_attention_heads ({n_heads})"
        ));
    }
    let default_head_dim = match architecture {
        // Qwen3Config's default; the others derive it.
        Architecture::Qwen3 => 128,
        _ => d_model / n_heads,
    };
    let head_dim = c.usize("head_dim")?.unwrap_or(default_head_dim);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(format!(
            "head_dim {head_dim} must be even (RoPE rotates pairs)"
        ));
    }
    let max_position_embeddings = c.usize("max_position_embeddings")?.unwrap_or(2048);
    let rms_eps = c.f64("rms_norm_eps")?.unwrap_or(1e-6);
    let tie_embeddings = c.bool("tie_word_embeddings")?.unwrap_or(false);

    let act = c
        .str("hidden_act")?
        .or(c.str("hidden_activation")?)
        .unwrap_or_else(|| "silu".into());
    if act != "silu" {
        return Err(format!(
            "hidden_act {act:?} is not supported (coopc's MLP is SwiGLU with silu)"
        ));
    }
    if c.bool("attention_bias")? == Some(true) {
        return Err(format!(
            "attention_bias = true is not supported for {} (it adds a bias to o_proj too)",
            architecture.class_name()
        ));
    }
    if c.bool("mlp_bias")? == Some(true) {
        return Err("mlp_bias = true is not supported".into());
    }

    // RoPE: `rope_theta` and `rope_scaling` (transformers 4), or
    // `rope_parameters` holding both (transformers 5).
    let params = match o.get("rope_parameters") {
        Some(Value::Object(p)) => Some(p),
        Some(Value::Null) | None => None,
        Some(_) => return Err("`rope_parameters` must be an object".into()),
    };
    let rope_theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| "`rope_parameters.rope_theta` must be a number".to_string())?,
        None => c.f64("rope_theta")?.unwrap_or(10000.0),
    };
    if rope_theta <= 0.0 {
        return Err(format!("rope_theta {rope_theta} must be positive"));
    }
    let scaling = match (params, o.get("rope_scaling")) {
        (_, Some(Value::Object(s))) => Some(s),
        (Some(p), _) => Some(p),
        (_, Some(Value::Null) | None) => None,
        (_, Some(_)) => return Err("`rope_scaling` must be an object or null".into()),
    };
    let rope_scaling = match scaling {
        None => None,
        Some(s) => {
            let s = Fields(s);
            let kind = s.str("rope_type")?.or(s.str("type")?);
            match kind.as_deref() {
                None | Some("default") => None,
                Some("llama3") => Some(RopeScaling::Llama3 {
                    factor: s.req_f64("factor", "rope_scaling")?,
                    low_freq_factor: s.req_f64("low_freq_factor", "rope_scaling")?,
                    high_freq_factor: s.req_f64("high_freq_factor", "rope_scaling")?,
                    original_max_position_embeddings: s
                        .usize("original_max_position_embeddings")?
                        .ok_or_else(|| {
                            "rope_scaling of type \"llama3\" needs original_max_position_embeddings"
                                .to_string()
                        })?,
                }),
                Some(other) => {
                    return Err(format!(
                        "rope_scaling of type {other:?} is not supported (coopc computes \"default\" and \"llama3\")"
                    ))
                }
            }
        }
    };
    if let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        ..
    }) = &rope_scaling
    {
        if *factor <= 0.0 || *high_freq_factor <= *low_freq_factor {
            return Err(format!(
                "rope_scaling: factor ({factor}) must be positive and high_freq_factor ({high_freq_factor}) above low_freq_factor ({low_freq_factor})"
            ));
        }
    }

    let sliding_window = match architecture {
        Architecture::Mistral => c.usize("sliding_window")?,
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if c.bool("use_sliding_window")? == Some(true) {
                let window = c.usize("sliding_window")?;
                let from_layer = c.usize("max_window_layers")?.unwrap_or(0);
                // Layers from `max_window_layers` on use the window.
                if from_layer < n_layers {
                    window
                } else {
                    None
                }
            } else {
                None
            }
        }
        Architecture::Llama => None,
    };

    // transformers 5 lists each layer's attention; anything but full
    // attention is a window in use.
    if let Some(Value::Array(kinds)) = o.get("layer_types") {
        if let Some(other) = kinds.iter().find(|k| k.as_str() != Some("full_attention")) {
            return Err(format!(
                "layer_types has {other}: only full attention is supported (no sliding window)"
            ));
        }
    }
    let torch_dtype = c.str("torch_dtype")?.or(c.str("dtype")?);
    let bos_token_id = c.u32("bos_token_id")?;
    let eos_token_ids = match o.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|i| i as u32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "`eos_token_id` must be an integer or a list of integers".to_string())?,
        Some(v) => vec![v
            .as_u64()
            .ok_or_else(|| "`eos_token_id` must be an integer or a list of integers".to_string())?
            as u32],
    };

    Ok(HfConfig {
        architecture,
        vocab_size,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        d_ff,
        head_dim: (head_dim != d_model / n_heads || d_model % n_heads != 0).then_some(head_dim),
        max_position_embeddings,
        rope_theta,
        rope_scaling,
        rms_eps,
        tie_embeddings,
        qkv_bias: architecture == Architecture::Qwen2,
        qk_norm: architecture == Architecture::Qwen3,
        sliding_window,
        torch_dtype,
        bos_token_id,
        eos_token_ids,
    })
}

fn supported() -> String {
    Architecture::ALL
        .iter()
        .map(|a| a.class_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Typed reads of a JSON object's fields; `null` reads as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| format!("`{key}` must be a non-negative integer, not {v}")),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>, String> {
        Ok(self.usize(key)?.map(|x| x as u32))
    }

    fn req_usize(&self, key: &str) -> Result<usize, String> {
        match self.usize(key)? {
            Some(0) => Err(format!("`{key}` must be at least 1")),
            Some(x) => Ok(x),
            None => Err(format!("`{key}` is missing")),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("`{key}` must be a number, not {v}")),
        }
    }

    fn req_f64(&self, key: &str, within: &str) -> Result<f64, String> {
        self.f64(key)?
            .ok_or_else(|| format!("`{within}.{key}` is missing"))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("`{key}` must be true or false, not {v}")),
        }
    }

    fn str(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| format!("`{key}` must be a string, not {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN25: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
      "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936,
      "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
      "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 32768,
      "max_window_layers": 21, "hidden_act": "silu", "torch_dtype": "bfloat16",
      "bos_token_id": 151643, "eos_token_id": 151643
    }"#;

    #[test]
    fn qwen25_config_reads_every_shape() {
        let c = parse_config(QWEN25).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(
            (
                c.vocab_size,
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.d_ff
            ),
            (151936, 896, 24, 14, 2, 4864)
        );
        assert_eq!(c.head_dim, None);
        assert!(c.qkv_bias && !c.qk_norm && c.tie_embeddings);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.eos_token_ids, vec![151643]);
    }

    #[test]
    fn qwen3_head_dim_defaults_to_128() {
        let text = r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
          "num_attention_heads": 16, "num_key_value_heads": 8, "num_hidden_layers": 2,
          "intermediate_size": 3072, "vocab_size": 1000}"#;
        let c = parse_config(text).unwrap();
        assert_eq!(
            c.head_dim,
            Some(128),
            "1024 / 16 = 64 ≠ Qwen3's default 128"
        );
        assert!(c.qk_norm && !c.qkv_bias);
        let text = text.replace("\"vocab_size\"", "\"head_dim\": 64, \"vocab_size\"");
        let c = parse_config(&text).unwrap();
        assert_eq!(c.head_dim, None, "64 is d_model / n_heads");
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_others_refused() {
        let base = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
          "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
          "vocab_size": 100, "eos_token_id": [1, 2], "rope_scaling": SCALING}"#;
        let c = parse_config(&base.replace(
            "SCALING",
            r#"{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        ))
        .unwrap();
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        let e = parse_config(&base.replace("SCALING", r#"{"type": "yarn", "factor": 4.0}"#))
            .unwrap_err();
        assert!(e.contains("\"yarn\" is not supported"), "{e}");
        assert!(parse_config(&base.replace("SCALING", "null"))
            .unwrap()
            .rope_scaling
            .is_none());
    }

    #[test]
    fn what_changes_the_math_is_refused() {
        let base = r#"{"architectures": ["ARCH"], "hidden_size": 64,
          "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
          "vocab_size": 100 EXTRA}"#;
        let cfg = |arch: &str, extra: &str| {
            parse_config(&base.replace("ARCH", arch).replace("EXTRA", extra))
        };
        let e = cfg("GPT2LMHeadModel", "").unwrap_err();
        assert!(
            e.contains("unsupported architecture GPT2LMHeadModel"),
            "{e}"
        );
        assert!(e.contains("Qwen3ForCausalLM"), "{e}");
        let e = cfg("LlamaForCausalLM", r#", "attention_bias": true"#).unwrap_err();
        assert!(e.contains("attention_bias"), "{e}");
        let e = cfg("LlamaForCausalLM", r#", "hidden_act": "gelu""#).unwrap_err();
        assert!(e.contains("gelu"), "{e}");
        let e = cfg("LlamaForCausalLM", r#", "num_key_value_heads": 3"#).unwrap_err();
        assert!(e.contains("must divide"), "{e}");
        let c = cfg("MistralForCausalLM", r#", "sliding_window": 4096"#).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        let c = cfg(
            "Qwen2ForCausalLM",
            r#", "use_sliding_window": true, "sliding_window": 16, "max_window_layers": 1"#,
        )
        .unwrap();
        assert_eq!(c.sliding_window, Some(16));
        let e = cfg("LlamaForCausalLM", r#", "hidden_size": "wide""#).unwrap_err();
        assert!(
            e.contains("not valid JSON") || e.contains("hidden_size"),
            "{e}"
        );
        let e = parse_config("[1, 2]").unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
    }

    #[test]
    fn llama3_inv_freq_matches_the_reference_formula() {
        use crate::spec::ModelSpec;
        let m = ModelSpec {
            vocab_size: 10,
            d_model: 64,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            d_ff: 8,
            max_seq: 8,
            rope_theta: 500000.0,
            rms_eps: 1e-5,
            tie_embeddings: true,
            qkv_bias: false,
            head_dim: None,
            qk_norm: false,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            from: None,
            lower: None,
        };
        let f = m.rope_inv_freq();
        assert_eq!(f.len(), 32);
        // Short wavelengths (< 8192 / 4 = 2048) are kept.
        assert_eq!(f[0], 1.0);
        // The longest wavelength (> 8192) is divided by the factor.
        let plain = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!((f[31] - plain / 32.0).abs() < 1e-18);
        // In between, a blend strictly between the two.
        let mid = (0..32)
            .find(|&i| {
                let p = 1.0 / 500000f64.powf((2 * i) as f64 / 64.0);
                let w = 2.0 * std::f64::consts::PI / p;
                (2048.0..=8192.0).contains(&w)
            })
            .expect("a medium frequency");
        let p = 1.0 / 500000f64.powf((2 * mid) as f64 / 64.0);
        assert!(f[mid] < p && f[mid] > p / 32.0);
    }
}
