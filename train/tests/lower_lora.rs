//! The lower level as a LoRA of θ (`model.lower = { lora_rank = r }`):
//! its gradients are the chain rule of the full-θ pipeline's at the merged
//! weights, the merge the sampler decodes with is the forward's own
//! arithmetic, and a run leaves the base weights untouched.

use coopc_compiler::compile::compile_gradients;
use coopc_compiler::frontend::parse_pipeline;
use coopc_compiler::lowering::BatchShapes;
use coopc_compiler::plan::{BatchField, Role, LAMBDA};
use coopc_compiler::spec::{PipelineSpec, Projection};
use coopc_compiler::{compile, compile_logprobs};
use coopc_ir::params::{lora_name, lower_lora_name, module_path};
use coopc_runtime::{execute_program, HostTensor};
use coopc_train::checkpoint::merge_lora;
use coopc_train::init::{init_params, initial_state, synthetic_batch};
use std::collections::{BTreeMap, HashMap};

const TINY: &str = "[model]\nd_model = 16\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\n\
d_ff = 24\nmax_seq = 10\nvocab_size = 24\nqkv_bias = true\nLOWER\n\
[lora]\nrank = 2\ntargets = [\"q_proj\", \"v_proj\", \"down_proj\"]\n\
[rl]\ngroup_size = 2\nprompts_per_step = 1\n[sft]\nbatch_size = 2\n\
[bilevel]\nhypergradient = { kind = \"first_order\" }\n\
[optim.lower]\nkind = \"sgd\"\nlr = 0.1\n[backend]\ndtype = \"f64\"\n";

fn spec(lower: &str) -> PipelineSpec {
    let text = TINY.replace("LOWER", lower);
    parse_pipeline(&text).unwrap_or_else(|d| panic!("{}", d.render("tiny", &text)))
}

fn lower_spec() -> PipelineSpec {
    spec("lower = { lora_rank = 3, alpha = 4.5, targets = [\"q_proj\", \"o_proj\", \"up_proj\"] }")
}

/// θ, lower LoRA and w with every factor non-zero (B too), from `seed`.
fn params(spec: &PipelineSpec, seed: u64) -> BTreeMap<String, HostTensor> {
    let program = compile_logprobs(spec);
    let mut p = init_params(program.signature.parameters(), seed);
    let noise = init_params(
        program
            .signature
            .parameters()
            .filter(|p| p.name.ends_with("lora_A.weight")),
        seed + 1,
    );
    for (name, t) in p.iter_mut() {
        if name.ends_with("lora_B.weight") {
            let a = noise
                .values()
                .find(|a| a.numel() >= t.numel())
                .map(|a| a.to_f64_vec())
                .unwrap_or_else(|| vec![0.3; t.numel()]);
            *t = HostTensor::from_f64(t.dtype(), t.shape.clone(), &a[..t.numel()]).unwrap();
        }
    }
    p
}

fn run(
    program: &coopc_compiler::plan::Program,
    inputs: &HashMap<String, HostTensor>,
) -> HashMap<String, HostTensor> {
    execute_program(program, inputs)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn the_lower_lora_gradients_are_the_chain_rule_of_the_full_ones() {
    let low = lower_spec();
    let full = spec("");
    let p_low = params(&low, 1);
    // θ_eff = W₀ + s·B·A of the lower LoRA (w stays a LoRA in both).
    let mut only_lower = low.clone();
    only_lower.lora.targets.clear();
    let theta_eff = merge_lora(&only_lower, &p_low);
    let mut p_full: BTreeMap<String, HostTensor> = theta_eff.clone();
    for (n, t) in &p_low {
        if n.starts_with(coopc_ir::params::PEFT_PREFIX) {
            p_full.insert(n.clone(), t.clone());
        }
    }
    let shapes = BatchShapes::from_spec(&full);
    let batch = synthetic_batch(&full, &compile_logprobs(&full), &p_full, 5).unwrap();
    let grads = |spec: &PipelineSpec, params: &BTreeMap<String, HostTensor>| {
        let program = compile_gradients(spec, shapes);
        let mut inputs: HashMap<String, HostTensor> = params.clone().into_iter().collect();
        for (n, t) in initial_state(&program.signature, |n| params.get(n).cloned()) {
            inputs.insert(n, t);
        }
        for f in BatchField::ALL {
            if let Some(t) = batch.get(f.key()) {
                inputs.insert(f.input_name(0), t.clone());
            }
        }
        inputs.insert(
            LAMBDA.into(),
            HostTensor::from_f64(coopc_ir::DType::F64, vec![], &[0.4]).unwrap(),
        );
        let out = run(&program, &inputs);
        (program, out)
    };
    let (prog_low, out_low) = grads(&low, &p_low);
    let (_, out_full) = grads(&full, &p_full);
    // The trained variables of the LoRA pipeline are the lower LoRA's factors.
    let trained: Vec<&str> = prog_low
        .signature
        .inputs_where(|r| *r == Role::Theta)
        .map(|p| p.name.as_str())
        .collect();
    assert!(!trained.is_empty() && trained.iter().all(|n| n.starts_with("lower_lora.")));
    assert!(prog_low
        .signature
        .inputs_where(|r| *r == Role::Frozen)
        .any(|p| p.name == "model.embed_tokens.weight"));
    // The same losses.
    // (loss.up is at θ_K, which a LoRA step and a full step reach differently.)
    for m in ["loss.sft", "loss.rl"] {
        let (a, b) = (out_low[m].to_f64_vec()[0], out_full[m].to_f64_vec()[0]);
        assert!((a - b).abs() < 1e-11, "{m}: {a} vs {b}");
    }
    let lower = low.model.lower.as_ref().unwrap();
    let s = lower.scale();
    let mut checked = 0;
    for layer in 0..low.model.n_layers {
        for p in Projection::ALL {
            if !lower.targets.contains(&p) {
                continue;
            }
            let g = &out_full[&format!("lower.{}.weight", module_path(layer, p))];
            let (o, i) = (g.shape[0], g.shape[1]);
            let g = g.to_f64_vec();
            let a = p_low[&lower_lora_name(layer, p, 'A')].to_f64_vec();
            let b = p_low[&lower_lora_name(layer, p, 'B')].to_f64_vec();
            let r = lower.rank;
            // dL/dB = s·G·Aᵀ [o, r]; dL/dA = s·Bᵀ·G [r, i].
            let db: Vec<f64> = (0..o * r)
                .map(|x| {
                    let (row, k) = (x / r, x % r);
                    s * (0..i).map(|c| g[row * i + c] * a[k * i + c]).sum::<f64>()
                })
                .collect();
            let da: Vec<f64> = (0..r * i)
                .map(|x| {
                    let (k, c) = (x / i, x % i);
                    s * (0..o)
                        .map(|row| b[row * r + k] * g[row * i + c])
                        .sum::<f64>()
                })
                .collect();
            for (which, want) in [('A', da), ('B', db)] {
                let got =
                    out_low[&format!("lower.{}", lower_lora_name(layer, p, which))].to_f64_vec();
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
                assert!(scale > 1e-6, "a zero gradient checks nothing");
                assert!(
                    err < 1e-10 * (1.0 + scale),
                    "{layer} {p:?} {which}: {err:e}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 3 * 2);
    // w's hypergradient exists and is finite.
    let hyper = out_low
        .iter()
        .filter(|(n, _)| n.starts_with("hyper."))
        .count();
    assert_eq!(hyper, 2 * 3 * 2);
    assert!(
        out_low[&format!("hyper.{}", lora_name(0, Projection::QProj, 'B'))]
            .to_f64_vec()
            .iter()
            .all(|x| x.is_finite())
    );
}

#[test]
fn the_merge_the_sampler_decodes_with_is_the_forward_of_both_adapters() {
    use coopc_compiler::decode::{full_logits_program, lora_merge_program};
    use coopc_compiler::plan::{DECODE_IDS, DECODE_LOGITS};
    use coopc_runtime::execute;
    let low = lower_spec();
    let p = params(&low, 2);
    let dt = coopc_ir::DType::F64;
    let ids = HostTensor::from_f64(
        coopc_ir::DType::I32,
        vec![2, 6],
        &[1., 4., 7., 2., 9., 12., 0., 3., 5., 8., 11., 6.],
    )
    .unwrap();
    let logits = |g: &coopc_ir::Graph, params: &BTreeMap<String, HostTensor>| {
        let mut inputs: HashMap<String, HostTensor> = params.clone().into_iter().collect();
        inputs.insert(DECODE_IDS.into(), ids.clone());
        let out = execute(g, &inputs).unwrap();
        out.into_iter()
            .find(|(n, _)| n == DECODE_LOGITS)
            .map(|(_, t)| t.to_f64_vec())
            .unwrap()
    };
    let with_adapters = logits(&full_logits_program(&low.model, &low.lora, dt, 2, 6), &p);
    // Merged weights, read with no adapter at all.
    let merge = lora_merge_program(&low.model, &low.lora, dt).unwrap();
    let mut merged_inputs: HashMap<String, HostTensor> = p.clone().into_iter().collect();
    merged_inputs.remove(DECODE_IDS);
    let merged = execute(&merge, &merged_inputs).unwrap();
    let mut theta: BTreeMap<String, HostTensor> = p
        .iter()
        .filter(|(n, _)| !n.contains("lora_"))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    for (name, t) in merged {
        theta.insert(name, t);
    }
    // o_proj (lower only), q_proj (both), v_proj and down_proj (w only).
    assert_eq!(merge.outputs().len(), 2 * 5);
    let mut plain = low.clone();
    plain.model.lower = None;
    let no_lora = coopc_compiler::spec::LoraSpec {
        targets: vec![],
        ..low.lora.clone()
    };
    let merged_logits = logits(
        &full_logits_program(&plain.model, &no_lora, dt, 2, 6),
        &theta,
    );
    let err = with_adapters
        .iter()
        .zip(&merged_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-11, "{err:e}");
    // And the adapters matter.
    let base = logits(&full_logits_program(&plain.model, &no_lora, dt, 2, 6), &p);
    let moved = with_adapters
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "{moved:e}");
    let _ = compile(low);
}

#[test]
fn bad_lower_and_task_keys_are_errors_naming_the_key() {
    let err = |lower: &str, extra: &str| {
        let text = format!("{}{extra}", TINY.replace("LOWER", lower));
        match parse_pipeline(&text) {
            Ok(_) => panic!("accepted: {lower} {extra}"),
            Err(d) => d.render("p.toml", &text),
        }
    };
    let e = err("lower = \"half\"", "");
    assert!(
        e.contains("`model.lower` must be \"full\" or a table"),
        "{e}"
    );
    let e = err("lower = { rank = 4 }", "");
    assert!(e.contains("unknown key `model.lower.rank`"), "{e}");
    assert!(e.contains("missing key `model.lower.lora_rank`"), "{e}");
    let e = err("lower = { lora_rank = 0 }", "");
    assert!(
        e.contains("`model.lower.lora_rank` must be at least 1"),
        "{e}"
    );
    let e = err("lower = { lora_rank = 2, targets = [\"qproj\"] }", "");
    assert!(e.contains("did you mean \"q_proj\"?"), "{e}");
    let e = err("", "[task]\nformat = \"gsm8k\"\n");
    assert!(
        e.contains("`task.format`") && e.contains("kind = \"jsonl\""),
        "{e}"
    );
    let e = err(
        "",
        "[task]\nkind = \"jsonl\"\nsft_file = \"a\"\nrl_file = \"b\"\nsystem_prompt = \"Be brief.\"\n",
    );
    assert!(
        e.contains("`task.system_prompt`") && e.contains("chat_template"),
        "{e}"
    );
    let e = err("", "[task]\nreward_malformed = 2.0\n");
    assert!(e.contains("`task.reward_malformed`"), "{e}");
    // "full" is the default, spelled out.
    assert_eq!(spec("lower = \"full\"").model.lower, None);
}
