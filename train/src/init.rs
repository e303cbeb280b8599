//! Initial parameters for a pipeline's model: θ as Hugging Face Llama
//! initialises it (normal(0, 0.02) weights, unit RMSNorm gains, zero biases)
//! and w as PEFT does (A ~ Kaiming-uniform(a = √5), i.e. U(±1/√fan_in);
//! B = 0). Deterministic in the seed.

use crate::train::advantages;
use coopc_ir::params::LOWER_LORA_PREFIX;
use coopc_ir::plan::{BatchField, Port, Program, Role, Signature, LOGPROBS, TOKEN_IDS};
use coopc_ir::spec::PipelineSpec;
use coopc_ir::DType;
use coopc_ir::TensorType;
use coopc_runtime::hf_weights::read_model_weights;
use coopc_runtime::safetensors_io::TensorFileError;
use coopc_runtime::{execute_program, ExecError, HostTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Standard deviation of HF Llama's `initializer_range`.
pub const INIT_STD: f64 = 0.02;

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// θ and w by HF and PEFT names: one tensor per port of `params` (θ's
/// then w's, in the parameter schema's order, as a plan's signature lists
/// them), of the port's type, drawn in that order from `seed`.
pub fn init_params<'a>(
    params: impl IntoIterator<Item = &'a Port>,
    seed: u64,
) -> BTreeMap<String, HostTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for port in params {
        let (name, shape, dtype) = (&port.name, port.ty.shape.clone(), port.ty.dtype);
        let n: usize = shape.iter().product();
        // LoRA factors — w, and the lower level's LoRA of θ — as PEFT
        // initialises them.
        let lora = port.role == Role::Lora || name.starts_with(LOWER_LORA_PREFIX);
        let values: Vec<f64> = match port.role {
            _ if lora && name.ends_with("lora_A.weight") => {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
            }
            _ if lora => vec![0.0; n],
            _ if name.ends_with("norm.weight") => vec![1.0; n],
            _ if name.ends_with(".bias") => vec![0.0; n],
            _ => (0..n).map(|_| INIT_STD * normal(&mut rng)).collect(),
        };
        out.insert(name.clone(), from_f64(dtype, shape, &values));
    }
    out
}

/// θ and w for `spec`: θ read from the Hugging Face folder `model.from`
/// when there is one (converted to the ports' dtype), drawn from `seed`
/// otherwise; w drawn from `seed` (see [`init_params`]).
pub fn pretrained_or_init<'a>(
    spec: &PipelineSpec,
    params: impl IntoIterator<Item = &'a Port>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>, TensorFileError> {
    let Some(dir) = &spec.model.from else {
        return Ok(init_params(params, seed));
    };
    // θ's tensors (trained or frozen) by their Hugging Face names; the
    // LoRA factors are not in the folder.
    let (theta, lora): (Vec<&Port>, Vec<&Port>) = params.into_iter().partition(|p| {
        matches!(p.role, Role::Theta | Role::Frozen) && !p.name.starts_with(LOWER_LORA_PREFIX)
    });
    let expected: Vec<(String, TensorType)> = theta
        .iter()
        .map(|p| (p.name.clone(), p.ty.clone()))
        .collect();
    let mut out = read_model_weights(Path::new(dir), &expected, spec.model.tie_embeddings)?;
    out.extend(init_params(lora, seed));
    Ok(out)
}

fn from_f64(dtype: DType, shape: Vec<usize>, values: &[f64]) -> HostTensor {
    HostTensor::from_f64(dtype, shape, values).expect("length matches the shape by construction")
}

/// A synthetic batch of `spec`'s shapes (`sft.*`, `rl.*` by the names
/// `coopc grad` reads): random tokens, responses on the second half of each
/// sequence, ±1 rewards turned into advantages as `rl.advantage` says, and
/// π_old (and π_ref) log-probs of the rollouts under `params` (θ and w),
/// scored by `scorer`, the plan's log-prob program.
pub fn synthetic_batch(
    spec: &PipelineSpec,
    scorer: &Program,
    params: &BTreeMap<String, HostTensor>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>, ExecError> {
    let dt = spec.backend.dtype.dtype();
    let (bs, br, t) = (
        spec.sft.batch_size,
        spec.rl.batch_size(),
        spec.train.seq_len,
    );
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
    let mut inputs: HashMap<String, HostTensor> = params.clone().into_iter().collect();
    inputs.insert(TOKEN_IDS.into(), rl_ids.clone());
    let lp = execute_program(scorer, &inputs)?
        .into_iter()
        .find(|(name, _)| name == LOGPROBS)
        .map(|(_, t)| t)
        .expect("the log-prob program outputs log-probs");
    let key = |f: BatchField| f.key().to_string();
    let mut b = BTreeMap::new();
    b.insert(key(BatchField::SftInputIds), sft_ids);
    b.insert(key(BatchField::SftLossMask), mask(bs)?);
    b.insert(key(BatchField::RlInputIds), rl_ids);
    b.insert(key(BatchField::RlLossMask), mask(br)?);
    b.insert(
        key(BatchField::RlAdvantages),
        HostTensor::from_f64(dt, vec![br], &adv)?,
    );
    if spec.rl.loss_kl_coef() > 0.0 {
        b.insert(key(BatchField::RlRefLogprobs), lp.clone());
    }
    b.insert(key(BatchField::RlOldLogprobs), lp);
    Ok(b)
}

/// The state inputs of a meta-step at the start of a run, from its
/// signature: every shadow input is the θ tensor it shadows, as
/// `theta(name)` gives it (θ̂ = θ), and every optimiser state input is zero
/// (AdamW step 0).
pub fn initial_state(
    meta: &Signature,
    theta: impl Fn(&str) -> Option<HostTensor>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for port in &meta.inputs {
        match &port.role {
            Role::Shadow { of } => {
                if let Some(t) = theta(of) {
                    out.insert(port.name.clone(), t);
                }
            }
            Role::OptimState => {
                out.insert(port.name.clone(), HostTensor::zeros(&port.ty));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use coopc_compiler::frontend::parse_pipeline;
    use coopc_ir::params::{lora_shapes, theta_shapes};

    #[test]
    fn init_follows_hf_and_peft_conventions() {
        let text = "[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nd_ff = 32\nmax_seq = 16\n[lora]\nrank = 4\n[backend]\ndtype = \"f64\"\n";
        let plan = coopc_compiler::compile(parse_pipeline(text).expect("valid pipeline"));
        let s = &plan.spec;
        let ports = || plan.meta_step().signature.parameters();
        let p = init_params(ports(), 1);
        assert_eq!(
            p.len(),
            theta_shapes(&s.model).len() + lora_shapes(&s.model, &s.lora).len()
        );
        assert!(p.values().all(|t| t.dtype() == DType::F64));
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
        assert_eq!(init_params(ports(), 1), p);
        assert_ne!(init_params(ports(), 2), p);
    }
}
