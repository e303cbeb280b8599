//! Shared helpers for the integration tests: seeded random data, evaluation
//! through the CPU executor, finite-difference gradient checks, and for
//! the tests that run the binary: scratch folders, the `coopc` command and
//! the tiny addition pipeline they train.
#![allow(dead_code)]

use coopc_compiler::autodiff::{grad, vjp};
use coopc_compiler::ir::{DType, Graph, NodeId};
use coopc_compiler::lowering::{BatchShapes, MetaStep};
use coopc_compiler::model::{Decoder, Params};
use coopc_compiler::spec::PipelineSpec;
use coopc_runtime::{execute_nodes, HostTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

pub type Inputs = HashMap<String, HostTensor>;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// Values in ±[lo, hi]: bounded away from zero.
pub fn away_from_zero(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let v = rng.gen_range(lo..hi);
            if rng.gen_bool(0.5) {
                v
            } else {
                -v
            }
        })
        .collect()
}

pub fn random_shape(rng: &mut StdRng, min_rank: usize, max_rank: usize) -> Vec<usize> {
    let r = rng.gen_range(min_rank..=max_rank);
    (0..r).map(|_| rng.gen_range(1..=4)).collect()
}

pub fn f64_tensor(shape: &[usize], values: &[f64]) -> HostTensor {
    HostTensor::from_f64(DType::F64, shape.to_vec(), values).expect("tensor")
}

/// Values of the given nodes, as f64.
pub fn eval(g: &Graph, inputs: &Inputs, nodes: &[NodeId]) -> Vec<Vec<f64>> {
    execute_nodes(g, inputs, nodes)
        .unwrap_or_else(|e| panic!("execution failed: {e}"))
        .iter()
        .map(|t| t.to_f64_vec())
        .collect()
}

pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖a − b‖ / max(‖b‖, floor): relative error with a floor for near-zero references.
pub fn rel_err(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b).max(floor)
}

/// A differentiable input of a gradient check: its name and initial value.
pub struct Var {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f64>,
}

impl Var {
    pub fn new(name: &str, shape: &[usize], value: Vec<f64>) -> Self {
        assert_eq!(value.len(), shape.iter().product::<usize>());
        Var {
            name: name.to_string(),
            shape: shape.to_vec(),
            value,
        }
    }
}

pub fn bind(vars: &[Var], extra: &Inputs) -> Inputs {
    let mut m = extra.clone();
    for v in vars {
        m.insert(v.name.clone(), f64_tensor(&v.shape, &v.value));
    }
    m
}

/// Central finite-difference gradient of the scalar node `loss` with respect
/// to every element of every var.
pub fn fd_grad(g: &Graph, loss: NodeId, vars: &[Var], extra: &Inputs, h: f64) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    for (vi, v) in vars.iter().enumerate() {
        let mut gv = Vec::with_capacity(v.value.len());
        for j in 0..v.value.len() {
            let at = |delta: f64| {
                let mut inputs = bind(vars, extra);
                let mut val = vars[vi].value.clone();
                val[j] += delta;
                inputs.insert(v.name.clone(), f64_tensor(&v.shape, &val));
                eval(g, &inputs, &[loss])[0][0]
            };
            gv.push((at(h) - at(-h)) / (2.0 * h));
        }
        out.push(gv);
    }
    out
}

/// Builds `L = Σ out · R` (R a fixed random cotangent) around `build`, and
/// checks autodiff's gradient of L with respect to every var against
/// central finite differences, and — with `second_order` — the
/// Hessian-vector product (autodiff applied to its own output) against
/// finite differences of the gradient. Returns the worst relative errors.
pub fn check_op<F>(
    seed: u64,
    vars: &[Var],
    extra: &Inputs,
    second_order: bool,
    build: F,
) -> (f64, f64)
where
    F: Fn(&mut Graph, &[NodeId]) -> NodeId,
{
    let mut r = rng(seed ^ 0x5eed);
    let mut g = Graph::new();
    let xs: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(&v.name, DType::F64, v.shape.clone()))
        .collect();
    let out = build(&mut g, &xs);
    let shape = g.ty(out).shape.clone();
    let cot_val = uniform(&mut r, shape.iter().product(), -1.0, 1.0);
    let cot = g.input("__cotangent", DType::F64, shape.clone());
    let prod = g.mul(out, cot);
    let loss = g.sum_all(prod);
    let grads = grad(&mut g, loss, &xs);
    let mut extra = extra.clone();
    extra.insert("__cotangent".into(), f64_tensor(&shape, &cot_val));

    let inputs = bind(vars, &extra);
    let ad = eval(&g, &inputs, &grads);
    let fd = fd_grad(&g, loss, vars, &extra, 1e-5);
    let mut worst1: f64 = 0.0;
    for (i, (a, f)) in ad.iter().zip(&fd).enumerate() {
        let e = rel_err(a, f, 1e-3);
        assert!(
            e < 1e-6,
            "first-order VJP mismatch for `{}`: rel err {e:e}\n autodiff {a:?}\n finite-d {f:?}",
            vars[i].name
        );
        worst1 = worst1.max(e);
    }
    if !second_order {
        return (worst1, 0.0);
    }
    // Hessian-vector product: gradient of Σ_i <grad_i, v_i>.
    let vs: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| uniform(&mut r, v.value.len(), -1.0, 1.0))
        .collect();
    let v_nodes: Vec<NodeId> = vars
        .iter()
        .map(|v| g.input(format!("__v.{}", v.name), DType::F64, v.shape.clone()))
        .collect();
    let seeds: Vec<NodeId> = v_nodes.clone();
    let hvp = vjp(&mut g, &grads, &seeds, &xs);
    for (v, val) in vars.iter().zip(&vs) {
        extra.insert(format!("__v.{}", v.name), f64_tensor(&v.shape, val));
    }
    let inputs = bind(vars, &extra);
    let hv = eval(&g, &inputs, &hvp);
    // Finite differences of the gradient along v.
    let h = 1e-5;
    let shifted = |sign: f64| -> Vec<Vec<f64>> {
        let moved: Vec<Var> = vars
            .iter()
            .zip(&vs)
            .map(|(x, d)| {
                Var::new(
                    &x.name,
                    &x.shape,
                    x.value
                        .iter()
                        .zip(d)
                        .map(|(a, b)| a + sign * h * b)
                        .collect(),
                )
            })
            .collect();
        eval(&g, &bind(&moved, &extra), &grads)
    };
    let (gp, gm) = (shifted(1.0), shifted(-1.0));
    let mut worst2: f64 = 0.0;
    for i in 0..vars.len() {
        let fdh: Vec<f64> = gp[i]
            .iter()
            .zip(&gm[i])
            .map(|(a, b)| (a - b) / (2.0 * h))
            .collect();
        let e = rel_err(&hv[i], &fdh, 1e-3);
        assert!(
            e < 1e-6,
            "second-order (HVP) mismatch for `{}`: rel err {e:e}\n autodiff {:?}\n finite-d {fdh:?}",
            vars[i].name,
            hv[i]
        );
        worst2 = worst2.max(e);
    }
    (worst1, worst2)
}

/// Parses a pipeline's TOML text (every test pipeline is built this way).
pub fn pipeline(text: &str) -> PipelineSpec {
    coopc_compiler::frontend::parse_pipeline(text)
        .unwrap_or_else(|d| panic!("test pipeline rejected:\n{}", d.render("test.toml", text)))
}

/// A small pipeline: one layer, LoRA on every projection, truncated BRIDGE
/// with two lower steps, f64 (see [`tiny_spec`] for its vocabulary).
pub const TINY: &str = r#"
[model]
vocab_size = 24
d_model = 8
n_layers = 1
n_heads = 2
n_kv_heads = 1
d_ff = 12
max_seq = 8
qkv_bias = false
[lora]
rank = 2
alpha = 4.0
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[rl]
group_size = 2
prompts_per_step = 1
max_new_tokens = 4
top_p = 1.0
[sft]
batch_size = 2
cold_start_steps = 1
[bilevel]
method = "bridge"
lambda = 0.4
[bilevel.hypergradient]
kind = "truncated"
unroll = 2
backprop = 2
[optim.lower]
kind = "sgd"
lr = 0.5
[optim.upper]
kind = "sgd"
lr = 0.1
[train]
steps = 2
seed = 0
eval_every = 1
seq_len = 6
[backend]
kind = "cpu"
dtype = "f64"
"#;

/// [`TINY`], parsed, with a vocabulary of 11 tokens. The front end refuses
/// fewer than the addition task's 24 tokens, but these tests build and
/// differentiate graphs without running the task, and a smaller vocabulary
/// keeps their finite-difference checks fast.
pub fn tiny_spec() -> PipelineSpec {
    let mut spec = pipeline(TINY);
    spec.model.vocab_size = 11;
    spec
}

/// A sampler of `spec`'s decode step for `batch` rows and `max_len`
/// positions, compiled as a plan compiles it.
pub fn sampler(spec: &PipelineSpec, batch: usize, max_len: usize) -> coopc_train::sampler::Sampler {
    let (decode, merge) = coopc_compiler::sampling_programs(spec, batch, max_len);
    coopc_train::sampler::Sampler::new(decode, merge).expect("a decode step")
}

/// θ and w of `spec` initialised from `seed` as a run initialises them.
pub fn init_params(
    spec: &PipelineSpec,
    seed: u64,
) -> std::collections::BTreeMap<String, HostTensor> {
    coopc_train::init::init_params(&coopc_compiler::parameter_ports(spec), seed)
}

/// Random 0/1 response mask [b, t] with column 0 zero and ≥ 1 one per row.
pub fn mask(r: &mut StdRng, b: usize, t: usize) -> Vec<f64> {
    let mut m = vec![0.0; b * t];
    for i in 0..b {
        for j in 1..t {
            m[i * t + j] = if r.gen_bool(0.7) { 1.0 } else { 0.0 };
        }
        m[i * t + t - 1] = 1.0;
    }
    m
}

pub fn ids(r: &mut StdRng, n: usize, vocab: usize) -> HostTensor {
    let v: Vec<f64> = (0..n).map(|_| r.gen_range(0..vocab) as f64).collect();
    HostTensor::from_f64(DType::I32, vec![n], &v).unwrap()
}

/// Log-probs of `ids` [b, t] under θ, w.
pub fn logprobs(
    spec: &PipelineSpec,
    inputs: &Inputs,
    ids: &HostTensor,
    b: usize,
    t: usize,
) -> Vec<f64> {
    let mut g = Graph::new();
    let theta: Params = coopc_compiler::model::theta_shapes(&spec.model)
        .into_iter()
        .map(|(n, s)| {
            let id = g.input(n.clone(), DType::F64, s);
            (n, id)
        })
        .collect();
    let w: Params = coopc_compiler::model::lora_shapes(&spec.model, &spec.lora)
        .into_iter()
        .map(|(n, s)| {
            let id = g.input(n.clone(), DType::F64, s);
            (n, id)
        })
        .collect();
    let x = g.input("__ids", DType::I32, vec![b, t]);
    let dec = Decoder {
        model: &spec.model,
        lora: &spec.lora,
        dtype: DType::F64,
    };
    let lp = dec.token_logprobs(&mut g, &theta, &w, x);
    let mut inp = inputs.clone();
    let mut t2 = ids.clone();
    t2.shape = vec![b, t];
    inp.insert("__ids".into(), t2);
    eval(&g, &inp, &[lp]).remove(0)
}

/// Random parameters, optimiser state and K batches for a meta-step.
pub fn meta_inputs(spec: &PipelineSpec, ms: &MetaStep, seed: u64) -> Inputs {
    let mut r = rng(seed);
    let mut inputs = Inputs::new();
    for (name, shape) in ms.theta.iter().chain(&ms.lora) {
        let n: usize = shape.iter().product();
        let vals = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            uniform(&mut r, n, 0.8, 1.2)
        } else {
            uniform(&mut r, n, -0.5, 0.5)
        };
        inputs.insert(name.clone(), f64_tensor(shape, &vals));
    }
    let sh = BatchShapes::from_spec(spec);
    let (bs, br, t) = (sh.sft_batch, sh.rl_batch, sh.seq_len);
    let v = spec.model.vocab_size;
    for k in 0..spec.bilevel.hypergradient.unroll {
        let p = format!("step{k}.");
        let sft_ids = ids(&mut r, bs * t, v);
        let rl_ids = ids(&mut r, br * t, v);
        let lp = logprobs(spec, &inputs, &rl_ids, br, t);
        let old: Vec<f64> = lp.iter().map(|x| x + r.gen_range(-0.35..0.35)).collect();
        let reference: Vec<f64> = lp.iter().map(|x| x + r.gen_range(-0.5..0.5)).collect();
        let mut sft_ids = sft_ids;
        sft_ids.shape = vec![bs, t];
        let mut rl_ids = rl_ids;
        rl_ids.shape = vec![br, t];
        inputs.insert(format!("{p}sft.input_ids"), sft_ids);
        inputs.insert(
            format!("{p}sft.loss_mask"),
            f64_tensor(&[bs, t], &mask(&mut r, bs, t)),
        );
        inputs.insert(format!("{p}rl.input_ids"), rl_ids);
        inputs.insert(
            format!("{p}rl.loss_mask"),
            f64_tensor(&[br, t], &mask(&mut r, br, t)),
        );
        inputs.insert(
            format!("{p}rl.advantages"),
            f64_tensor(&[br], &away_from_zero(&mut r, br, 0.3, 1.5)),
        );
        inputs.insert(format!("{p}rl.old_logprobs"), f64_tensor(&[br, t], &old));
        inputs.insert(
            format!("{p}rl.ref_logprobs"),
            f64_tensor(&[br, t], &reference),
        );
    }
    inputs.insert("lambda".into(), f64_tensor(&[], &[0.4]));
    // Every other input (shadow and optimiser state): small random values,
    // positive for second moments, a step count of 3.
    for id in ms.graph.node_ids().collect::<Vec<_>>() {
        if let coopc_compiler::ir::Op::Input { name, ty } = ms.graph.op(id) {
            if inputs.contains_key(name) {
                continue;
            }
            let n = ty.numel();
            let vals = if name.ends_with(".step") {
                vec![3.0]
            } else if name.contains("exp_avg_sq") {
                uniform(&mut r, n, 0.01, 0.05)
            } else if let Some(base) = name.strip_prefix("shadow.") {
                let b = inputs[base].to_f64_vec();
                b.iter().map(|x| x + r.gen_range(-0.05..0.05)).collect()
            } else {
                uniform(&mut r, n, -0.05, 0.05)
            };
            inputs.insert(name.clone(), f64_tensor(&ty.shape, &vals));
        }
    }
    inputs
}

/// `inputs` with every float tensor converted to `dtype`.
pub fn with_float_dtype(inputs: &Inputs, dtype: DType) -> Inputs {
    inputs
        .iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() {
                HostTensor::from_f64(dtype, t.shape.clone(), &t.to_f64_vec()).unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect()
}

/// `log Σ exp(x)` over `axis` (kept), written out as max, shifted
/// exp-sum, log and add back: the pattern a fused reduction should absorb.
pub fn log_sum_exp(g: &mut Graph, x: NodeId, axis: usize) -> NodeId {
    let shape = g.ty(x).shape.clone();
    let m = g.reduce_max(x, &[axis], true);
    let bm = g.broadcast(m, shape);
    let d = g.sub(x, bm);
    let e = g.exp(d);
    let s = g.reduce(coopc_compiler::ir::ReduceKind::Sum, e, &[axis], true);
    let l = g.log(s);
    g.add(l, m)
}

/// The three optimiser rules with PyTorch-like hyperparameters (AdamW with
/// and without weight decay).
pub fn step_rules() -> Vec<coopc_compiler::ir::StepRule> {
    use coopc_compiler::ir::StepRule;
    let s = |v: f64| v.into();
    vec![
        StepRule::Sgd { lr: s(0.1) },
        StepRule::Momentum {
            lr: s(0.05),
            mu: s(0.9),
        },
        StepRule::AdamW {
            lr: s(1e-2),
            beta1: s(0.9),
            beta2: s(0.999),
            eps: s(1e-8),
            weight_decay: s(0.0),
        },
        StepRule::AdamW {
            lr: s(3e-3),
            beta1: s(0.8),
            beta2: s(0.95),
            eps: s(1e-3),
            weight_decay: s(0.1),
        },
    ]
}

/// The policy losses of the token-loss tests: SFT; GRPO with and without
/// the KL term, token and sequence mean (indices 1–4); then one of each
/// other variant: the k1 and k2 estimators, Dr. GRPO's constant
/// normaliser, GSPO's sequence ratio (with each aggregation), CISPO (with
/// the token and the sequence ratio).
pub fn token_losses() -> Vec<coopc_compiler::ir::TokenLoss> {
    use coopc_compiler::ir::{KlEstimator, PolicyLoss, RatioLevel, TokenAgg, TokenLoss};
    use KlEstimator::{K1, K2, K3};
    use PolicyLoss::{Cispo, PpoClip};
    use RatioLevel::{Sequence, Token};
    let loss = |(low, high): (f64, f64),
                (kl_coef, kl): (f64, KlEstimator),
                agg: TokenAgg,
                ratio: RatioLevel,
                surrogate: PolicyLoss| TokenLoss::Grpo {
        clip_low: low.into(),
        clip_high: high.into(),
        kl_coef: kl_coef.into(),
        kl,
        agg,
        ratio,
        surrogate,
    };
    let (tm, sm) = (TokenAgg::TokenMean, TokenAgg::SeqMean);
    let dr = TokenAgg::SeqSum { norm: 7.0.into() };
    let (wide, narrow) = ((0.2, 0.28), (0.05, 0.05));
    let no_kl = (0.0, K3);
    // GSPO's ratios sit near 1: a narrow range lets them leave it.
    vec![
        TokenLoss::Sft,
        loss(wide, no_kl, tm, Token, PpoClip),
        loss(wide, (0.05, K3), tm, Token, PpoClip),
        loss((0.1, 0.3), (0.1, K3), sm, Token, PpoClip),
        loss((0.2, 0.2), no_kl, sm, Token, PpoClip),
        loss(wide, (0.1, K1), tm, Token, PpoClip),
        loss(wide, (0.1, K2), sm, Token, PpoClip),
        loss(wide, (0.05, K3), dr, Token, PpoClip),
        loss(narrow, no_kl, tm, Sequence, PpoClip),
        loss(narrow, (0.05, K3), sm, Sequence, PpoClip),
        loss(narrow, no_kl, dr, Sequence, PpoClip),
        loss(wide, no_kl, tm, Token, Cispo),
        loss(narrow, (0.05, K3), sm, Sequence, Cispo),
    ]
}

/// The operands of a token loss, in order, with their shapes for a `[b, t]`
/// batch: logπ, mask, old, A, ref (as many as the loss reads).
pub fn token_loss_operands(
    loss: coopc_compiler::ir::TokenLoss,
    b: usize,
    t: usize,
) -> Vec<(&'static str, Vec<usize>)> {
    let all = [
        ("logp", vec![b, t]),
        ("mask", vec![b, t]),
        ("old", vec![b, t]),
        ("adv", vec![b]),
        ("ref", vec![b, t]),
    ];
    all.into_iter().take(loss.arity()).collect()
}

/// A random `[b, t]` token-loss batch, the values of `token_loss_operands`
/// in order: log-probs in [−3, −0.1], old and ref log-probs within ±0.6 of
/// them (ratios on both sides of the clip ranges), advantages of both
/// signs, a mask of weights 0, 0.5 and 1 whose last token is a response
/// token. `empty_row`
/// leaves sequence 0 without response tokens; `garbage` puts NaN at the
/// masked positions of logπ, old and ref.
pub fn token_loss_batch(
    seed: u64,
    b: usize,
    t: usize,
    empty_row: bool,
    garbage: bool,
) -> [Vec<f64>; 5] {
    let mut r = rng(seed);
    let n = b * t;
    let mut logp = uniform(&mut r, n, -3.0, -0.1);
    // Weights: mostly 1, some 0.5 on response tokens.
    let mut mask: Vec<f64> = (0..n)
        .map(|i| match r.gen_bool(0.7) && !(empty_row && i < t) {
            true if r.gen_bool(0.2) => 0.5,
            true => 1.0,
            false => 0.0,
        })
        .collect();
    mask[n - 1] = 1.0;
    let near = |r: &mut StdRng, x: &[f64]| -> Vec<f64> {
        x.iter().map(|v| v + r.gen_range(-0.6..0.6)).collect()
    };
    let mut old = near(&mut r, &logp);
    let mut reference = near(&mut r, &logp);
    let adv = uniform(&mut r, b, -1.5, 1.5);
    if garbage {
        for i in (0..n).filter(|&i| mask[i] == 0.0) {
            logp[i] = f64::NAN;
            old[i] = f64::NAN;
            reference[i] = f64::NAN;
        }
    }
    [logp, mask, old, adv, reference]
}

/// A fresh, empty scratch folder for test `name`, distinct per test binary
/// and process.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "coopc-{}-{name}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the `coopc` binary with `args`.
pub fn coopc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coopc"))
        .args(args)
        .output()
        .expect("run coopc")
}

/// Runs the `coopc` binary with `args`, which must succeed.
pub fn coopc_ok(args: &[&str]) -> Output {
    let out = coopc(args);
    assert!(
        out.status.success(),
        "coopc {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The tiny addition pipeline the training tests run: a truncated BRIDGE
/// meta-step, AdamW, 4 steps, held-out evaluation every 2.
pub const TINY_ADDITION: &str = r#"
[model]
d_model = 16
n_layers = 1
n_heads = 2
n_kv_heads = 1
d_ff = 32
max_seq = 48
[lora]
rank = 2
[rl]
group_size = 2
prompts_per_step = 2
max_new_tokens = 32
[sft]
batch_size = 2
cold_start_steps = 2
[bilevel]
method = "bridge"
lambda = { start = 0.2, end = 0.8 }
hypergradient = { kind = "truncated", unroll = 2, backprop = 2 }
[optim.lower]
kind = "adamw"
lr = 1e-2
[train]
steps = 4
eval_every = 2
seed = 5
"#;

/// [`TINY_ADDITION`] computed in f64.
pub fn tiny_addition_f64() -> String {
    format!("{TINY_ADDITION}[backend]\ndtype = \"f64\"\n")
}

/// The hypergradient and lower-gradient outputs (`hyper.*`, `lower.*`) of
/// a meta-step, concatenated in name order.
pub fn gradient_outputs<'a>(outs: impl IntoIterator<Item = (&'a str, Vec<f64>)>) -> Vec<f64> {
    let mut v: Vec<(&str, Vec<f64>)> = outs
        .into_iter()
        .filter(|(n, _)| n.starts_with("hyper.") || n.starts_with("lower."))
        .collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().flat_map(|(_, t)| t).collect()
}

/// Whether a test of a wgpu run can run here: a wgpu adapter answers, or
/// `COOPC_REQUIRE_WGPU=1` (set by `.ci/run`, which installs lavapipe)
/// demands one, so that a missing adapter fails the run instead of
/// skipping it. Says why when it skips.
pub fn wgpu_present() -> bool {
    if std::env::var("COOPC_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        return true;
    }
    match coopc_kernels::device::Device::wgpu() {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "skipped: no wgpu adapter ({e}); set COOPC_REQUIRE_WGPU=1 to make this a failure"
            );
            false
        }
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{d:?}: {e}")) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
