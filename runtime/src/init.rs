//! Initial parameters for a pipeline's model: θ as Hugging Face Llama
//! initialises it (normal(0, 0.02) weights, unit RMSNorm gains, zero biases)
//! and w as PEFT does (A ~ Kaiming-uniform(a = √5), i.e. U(±1/√fan_in);
//! B = 0). Deterministic in the seed.

use crate::tensor::HostTensor;
use crate::train::advantages;
use crate::{execute, ExecError};
use coopc_compiler::ir::{DType, Graph, Op};
use coopc_compiler::lowering::{float_dtype, lower_logprobs, BatchShapes};
use coopc_compiler::model::{lora_shapes, theta_shapes};
use coopc_compiler::spec::PipelineSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

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

/// A synthetic batch of the pipeline's shapes (`sft.*`, `rl.*` by the names
/// `coopc grad` reads): random tokens, responses on the second half of each
/// sequence, ±1 rewards turned into advantages as `rl.advantage` says, and
/// π_old (and π_ref) log-probs of the rollouts under `params` (θ and w).
pub fn synthetic_batch(
    spec: &PipelineSpec,
    params: &BTreeMap<String, HostTensor>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>, ExecError> {
    let dt = float_dtype(spec.backend.dtype);
    let shapes = BatchShapes::from_spec(spec);
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
    let rewards: Vec<f64> = (0..br)
        .map(|_| if rng.gen_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let adv = advantages(&rewards, spec.rl.group_size, spec.rl.advantage);
    // π_old (and π_ref) = the policy of `params`: score the rollouts with it.
    let scorer = lower_logprobs(spec, shapes);
    let mut inputs: HashMap<String, HostTensor> = params.clone().into_iter().collect();
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
    Ok(b)
}

/// The state inputs of a meta-step graph at the start of a run: for every
/// `shadow.<θ>` input, θ as `theta(name)` gives it (θ̂ = θ), and for every
/// `opt.*` input zeros (optimiser state, AdamW step 0).
pub fn initial_state(
    meta: &Graph,
    theta: impl Fn(&str) -> Option<HostTensor>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for id in meta.node_ids() {
        if let Op::Input { name, ty } = meta.op(id) {
            if let Some(base) = name.strip_prefix("shadow.") {
                if let Some(t) = theta(base) {
                    out.insert(name.clone(), t);
                }
            } else if name.starts_with("opt.") {
                out.insert(name.clone(), HostTensor::zeros(ty));
            }
        }
    }
    out
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
