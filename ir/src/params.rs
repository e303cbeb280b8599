//! The parameter schema: every tensor of θ by its Hugging Face name and of
//! w (the LoRA factors) by its PEFT name, with shapes, in one canonical
//! order. The compiler declares the programs' parameter inputs from it, and
//! checkpoints and adapter files are written with these names.

use crate::spec::{LoraSpec, ModelSpec, Projection};
use crate::Shape;

/// Prefix PEFT puts before the base model's module path in adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `model.layers.{i}.{self_attn|mlp}.{proj}`.
pub fn module_path(layer: usize, p: Projection) -> String {
    format!("model.layers.{layer}.{}.{}", p.block(), p.name())
}

/// (out, in) extents of a projection's weight.
fn proj_dims(m: &ModelSpec, p: Projection) -> (usize, usize) {
    let hd = m.head_dim();
    match p {
        Projection::QProj => (m.n_heads * hd, m.d_model),
        Projection::KProj | Projection::VProj => (m.n_kv_heads * hd, m.d_model),
        Projection::OProj => (m.d_model, m.n_heads * hd),
        Projection::GateProj | Projection::UpProj => (m.d_ff, m.d_model),
        Projection::DownProj => (m.d_model, m.d_ff),
    }
}

/// θ: every base-model tensor, by Hugging Face name, in a canonical order.
pub fn theta_shapes(m: &ModelSpec) -> Vec<(String, Shape)> {
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![m.vocab_size, m.d_model],
    )];
    for i in 0..m.n_layers {
        v.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            vec![m.d_model],
        ));
        for p in Projection::ALL {
            let (o, inp) = proj_dims(m, p);
            v.push((format!("{}.weight", module_path(i, p)), vec![o, inp]));
            if m.qkv_bias && matches!(p, Projection::QProj | Projection::KProj | Projection::VProj)
            {
                v.push((format!("{}.bias", module_path(i, p)), vec![o]));
            }
        }
        if m.qk_norm {
            for which in ["q_norm", "k_norm"] {
                v.push((
                    format!("model.layers.{i}.self_attn.{which}.weight"),
                    vec![m.head_dim()],
                ));
            }
        }
        v.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            vec![m.d_model],
        ));
    }
    v.push(("model.norm.weight".to_string(), vec![m.d_model]));
    if !m.tie_embeddings {
        v.push(("lm_head.weight".to_string(), vec![m.vocab_size, m.d_model]));
    }
    v
}

/// Total elements of a list of parameter shapes.
pub fn parameter_count(shapes: &[(String, Shape)]) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// PEFT name of a LoRA matrix: `base_model.model.<module>.lora_{A|B}.weight`.
pub fn lora_name(layer: usize, p: Projection, which: char) -> String {
    format!("{PEFT_PREFIX}{}.lora_{which}.weight", module_path(layer, p))
}

/// w: LoRA A [rank, in] and B [out, rank] of every target, by PEFT name.
pub fn lora_shapes(m: &ModelSpec, l: &LoraSpec) -> Vec<(String, Shape)> {
    let mut v = Vec::new();
    for i in 0..m.n_layers {
        for p in Projection::ALL {
            if l.targets.contains(&p) {
                let (o, inp) = proj_dims(m, p);
                v.push((lora_name(i, p, 'A'), vec![l.rank, inp]));
                v.push((lora_name(i, p, 'B'), vec![o, l.rank]));
            }
        }
    }
    v
}

/// Prefix of the lower level's LoRA factors when it trains a LoRA of θ
/// (`model.lower`): `lower_lora.<module>.lora_{A|B}.weight`.
pub const LOWER_LORA_PREFIX: &str = "lower_lora.";

/// Name of a lower-level LoRA matrix.
pub fn lower_lora_name(layer: usize, p: Projection, which: char) -> String {
    format!(
        "{LOWER_LORA_PREFIX}{}.lora_{which}.weight",
        module_path(layer, p)
    )
}

/// The lower level's LoRA factors (empty when it trains all of θ).
pub fn lower_lora_shapes(m: &ModelSpec) -> Vec<(String, Shape)> {
    let Some(l) = &m.lower else {
        return Vec::new();
    };
    lora_shapes(m, l)
        .into_iter()
        .map(|(n, s)| {
            let rest = n.strip_prefix(PEFT_PREFIX).expect("PEFT names");
            (format!("{LOWER_LORA_PREFIX}{rest}"), s)
        })
        .collect()
}

/// The variables the lower level optimises: θ, or its LoRA.
pub fn lower_shapes(m: &ModelSpec) -> Vec<(String, Shape)> {
    if m.lower.is_some() {
        lower_lora_shapes(m)
    } else {
        theta_shapes(m)
    }
}

/// θ's tensors the lower level does not update: all of them when it
/// trains a LoRA of θ, none otherwise.
pub fn frozen_shapes(m: &ModelSpec) -> Vec<(String, Shape)> {
    if m.lower.is_some() {
        theta_shapes(m)
    } else {
        Vec::new()
    }
}

/// Every tensor the policy's forward reads besides w: θ, and the lower
/// LoRA when there is one.
pub fn policy_theta_shapes(m: &ModelSpec) -> Vec<(String, Shape)> {
    let mut v = theta_shapes(m);
    v.extend(lower_lora_shapes(m));
    v
}
