//! Initial parameters for a pipeline's model: θ as Hugging Face Llama
//! initialises it (normal(0, 0.02) weights, unit RMSNorm gains, zero biases)
//! and w as PEFT does (A ~ Kaiming-uniform(a = √5), i.e. U(±1/√fan_in);
//! B = 0). Deterministic in the seed.

use crate::tensor::HostTensor;
use coopc_compiler::ir::DType;
use coopc_compiler::model::{lora_shapes, theta_shapes};
use coopc_compiler::spec::PipelineSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Standard deviation of HF Llama's `initializer_range`.
pub const INIT_STD: f64 = 0.02;

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// θ and w of `spec`'s model, by HF and PEFT names, in `dtype`.
pub fn init_params(spec: &PipelineSpec, dtype: DType, seed: u64) -> BTreeMap<String, HostTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (name, shape) in theta_shapes(&spec.model) {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| INIT_STD * normal(&mut rng)).collect()
        };
        out.insert(name, from_f64(dtype, shape, &values));
    }
    for (name, shape) in lora_shapes(&spec.model, &spec.lora) {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = if name.ends_with("lora_A.weight") {
            let bound = 1.0 / (shape[1] as f64).sqrt();
            (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
        } else {
            vec![0.0; n]
        };
        out.insert(name, from_f64(dtype, shape, &values));
    }
    out
}

fn from_f64(dtype: DType, shape: Vec<usize>, values: &[f64]) -> HostTensor {
    HostTensor::from_f64(dtype, shape, values).expect("length matches the shape by construction")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PipelineSpec {
        let text = "[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nd_ff = 32\nmax_seq = 16\n[lora]\nrank = 4\n";
        coopc_compiler::frontend::parse_pipeline(text).expect("valid pipeline")
    }

    #[test]
    fn init_follows_hf_and_peft_conventions() {
        let s = spec();
        let p = init_params(&s, DType::F64, 1);
        assert_eq!(
            p.len(),
            theta_shapes(&s.model).len() + lora_shapes(&s.model, &s.lora).len()
        );
        assert!(p["model.norm.weight"]
            .to_f64_vec()
            .iter()
            .all(|&v| v == 1.0));
        let e = p["model.embed_tokens.weight"].to_f64_vec();
        let mean = e.iter().sum::<f64>() / e.len() as f64;
        let std = (e.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
        assert!((std - INIT_STD).abs() < 0.2 * INIT_STD, "std {std}");
        let a = p["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].to_f64_vec();
        let bound = 1.0 / 32f64.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound / 2.0));
        let b = p["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].to_f64_vec();
        assert!(b.iter().all(|&v| v == 0.0));
        // Deterministic in the seed, different across seeds.
        assert_eq!(init_params(&s, DType::F64, 1), p);
        assert_ne!(init_params(&s, DType::F64, 2), p);
    }
}
