//! `coopc grad`: one meta-step on fixed data on the CPU executor, writing the
//! lower gradient, the hypergradient, the losses and θ_K to safetensors — for
//! checking coopc against other frameworks. File conventions: README / docs.

use crate::cli::UserError;
use coopc_compiler::compile_gradients;
use coopc_compiler::ir::{DType, TensorType};
use coopc_compiler::lowering::BatchShapes;
use coopc_compiler::plan::{BatchField, Metric, Role, LAMBDA};
use coopc_compiler::spec::{BackendKind, PipelineSpec, ShadowMode};
use coopc_runtime::safetensors_io::{read_tensors, reject_unexpected, take_exact, write_tensors};
use coopc_runtime::HostTensor;
use coopc_train::init::initial_state;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// The batch fields of one step the pipeline reads (π_ref's log-probs only
/// with a KL term in the loss).
fn batch_fields(spec: &PipelineSpec) -> Vec<BatchField> {
    BatchField::ALL
        .into_iter()
        .filter(|&f| f != BatchField::RlRefLogprobs || spec.rl.loss_kl_coef() > 0.0)
        .collect()
}

fn shape_of(
    t: &BTreeMap<String, HostTensor>,
    key: &str,
    file: &str,
) -> Result<Vec<usize>, UserError> {
    let x = t
        .get(key)
        .ok_or_else(|| UserError(format!("{file}: missing tensor `{key}`")))?;
    if x.shape.len() != 2 {
        return Err(UserError(format!(
            "{file}: `{key}` must be [batch, seq], got shape {:?}",
            x.shape
        )));
    }
    Ok(x.shape.clone())
}

/// Reads the batch file into graph inputs `step{k}.…` for k < K, checking
/// names, shapes, token ranges and the mask convention.
pub fn load_batch(
    spec: &PipelineSpec,
    path: &Path,
    dt: DType,
) -> Result<(BatchShapes, HashMap<String, HostTensor>), UserError> {
    let file = path.display().to_string();
    let mut tensors = read_tensors(path)?;
    let k_steps = spec.bilevel.hypergradient.unroll.max(1);
    let fields = batch_fields(spec);
    let prefixed = tensors.keys().any(|k| {
        k.strip_prefix("step")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(n, _)| n.parse::<usize>().is_ok())
    });
    // Unprefixed keys serve every step; with step prefixes they are ignored.
    let source = |k: usize, key: &str| {
        if prefixed {
            format!("step{k}.{key}")
        } else {
            key.to_string()
        }
    };
    if prefixed {
        for f in BatchField::ALL {
            tensors.remove(f.key());
        }
    }
    let (sft, rl) = (
        shape_of(&tensors, &source(0, BatchField::SftInputIds.key()), &file)?,
        shape_of(&tensors, &source(0, BatchField::RlInputIds.key()), &file)?,
    );
    if sft[1] != rl[1] {
        return Err(UserError(format!(
            "{file}: sft.input_ids has {} positions but rl.input_ids has {}; both batches must share one sequence length",
            sft[1], rl[1]
        )));
    }
    let shapes = BatchShapes {
        sft_batch: sft[0],
        rl_batch: rl[0],
        seq_len: sft[1],
        world: 1,
    };
    if shapes.seq_len > spec.model.max_seq || shapes.seq_len < 2 {
        return Err(UserError(format!(
            "{file}: sequences of {} tokens; the model takes 2 to model.max_seq = {}",
            shapes.seq_len, spec.model.max_seq
        )));
    }
    let (bs, br, t) = (shapes.sft_batch, shapes.rl_batch, shapes.seq_len);
    let expected_type = |f: BatchField| -> TensorType {
        match f {
            BatchField::SftInputIds => TensorType::new(DType::I32, vec![bs, t]),
            BatchField::SftLossMask => TensorType::new(dt, vec![bs, t]),
            BatchField::RlInputIds => TensorType::new(DType::I32, vec![br, t]),
            BatchField::RlAdvantages => TensorType::new(dt, vec![br]),
            BatchField::RlLossMask | BatchField::RlOldLogprobs | BatchField::RlRefLogprobs => {
                TensorType::new(dt, vec![br, t])
            }
        }
    };
    let mut expected = Vec::new();
    for k in 0..if prefixed { k_steps } else { 1 } {
        for &f in &fields {
            expected.push((source(k, f.key()), expected_type(f)));
        }
    }
    let mut taken = take_exact(&mut tensors, &expected, &format!("batch file {file}"))?;
    if spec.rl.loss_kl_coef() == 0.0 {
        // Read only with a KL term in the loss.
        tensors.retain(|k, _| !k.ends_with(BatchField::RlRefLogprobs.key()));
    }
    reject_unexpected(&tensors, &format!("batch file {file}"))?;
    let vocab = spec.model.vocab_size;
    for (name, x) in &taken {
        if name.ends_with("input_ids") {
            if let Some(bad) = x
                .to_f64_vec()
                .into_iter()
                .find(|&v| v < 0.0 || v >= vocab as f64)
            {
                return Err(UserError(format!(
                    "{file}: `{name}` holds token id {bad}, outside the vocabulary 0..{vocab}"
                )));
            }
        }
        if name.ends_with("loss_mask") {
            let v = x.to_f64_vec();
            let rows = x.shape[0];
            if (0..rows).any(|i| v[i * t] != 0.0) {
                return Err(UserError(format!(
                    "{file}: `{name}`[:, 0] must be 0 — position 0 has no log-probability (logits at t−1 predict token t, docs/semantics.md §2.5)"
                )));
            }
            if v.iter().all(|&m| m == 0.0) {
                return Err(UserError(format!(
                    "{file}: `{name}` selects no response token"
                )));
            }
        }
    }
    let mut inputs = HashMap::new();
    for k in 0..k_steps {
        for &f in &fields {
            let src = source(k, f.key());
            let x = if prefixed {
                taken.remove(&src)
            } else {
                taken.get(&src).cloned()
            };
            let x = x.ok_or_else(|| UserError(format!("{file}: missing tensor `{src}`")))?;
            inputs.insert(f.input_name(k), x);
        }
    }
    Ok((shapes, inputs))
}

/// Reads θ, w and optional `shadow.*` tensors (strict names and shapes).
fn load_params(
    spec: &PipelineSpec,
    path: &Path,
    theta: &[(String, Vec<usize>)],
    lora: &[(String, Vec<usize>)],
    dt: DType,
) -> Result<(HashMap<String, HostTensor>, bool), UserError> {
    let file = path.display().to_string();
    let what = format!("parameter file {file}");
    let mut tensors = read_tensors(path)?;
    let typed = |v: &[(String, Vec<usize>)], prefix: &str| -> Vec<(String, TensorType)> {
        v.iter()
            .map(|(n, s)| (format!("{prefix}{n}"), TensorType::new(dt, s.clone())))
            .collect()
    };
    let mut expected = typed(theta, "");
    expected.extend(typed(lora, ""));
    let has_shadow = tensors.keys().any(|k| k.starts_with("shadow."));
    if has_shadow {
        expected.extend(typed(theta, "shadow."));
    }
    let taken = take_exact(&mut tensors, &expected, &what)?;
    reject_unexpected(&tensors, &what)?;
    if has_shadow && spec.bilevel.shadow == ShadowMode::OneStep {
        eprintln!("note: bilevel.shadow = \"one_step\" starts θ̂ from θ; the shadow.* tensors of {file} are not used");
    }
    Ok((taken.into_iter().collect(), has_shadow))
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn run(
    pipeline: &Path,
    params: &Path,
    batch: &Path,
    out: &Path,
    repeat: usize,
    backend: Option<BackendKind>,
) -> Result<(), UserError> {
    let t0 = Instant::now();
    let (_, spec) =
        coopc_compiler::frontend::load_pipeline(pipeline).map_err(|e| UserError(e.render()))?;
    let dt = spec.backend.dtype.dtype();
    let (shapes, mut inputs) = load_batch(&spec, batch, dt)?;
    // The meta-step for the batch file's shapes, reduced to its gradients.
    let program = compile_gradients(&spec, shapes);
    let sig = &program.signature;
    let ports = |pred: &dyn Fn(&Role) -> bool| -> Vec<(String, Vec<usize>)> {
        sig.inputs_where(pred)
            .map(|p| (p.name.clone(), p.ty.shape.clone()))
            .collect()
    };
    // θ (trained, frozen, and the lower level's LoRA of it), then w.
    let theta = ports(&|r| matches!(r, Role::Theta | Role::Frozen));
    let (params_in, has_shadow) =
        load_params(&spec, params, &theta, &ports(&|r| *r == Role::Lora), dt)?;
    inputs.extend(params_in);
    // θ̂ starts from θ unless P gives it; optimiser state starts at zero.
    let start = initial_state(sig, |n| inputs.get(n).cloned());
    for (name, t) in start {
        let shadow = matches!(sig.input(&name).map(|p| &p.role), Some(Role::Shadow { .. }));
        if !(has_shadow && shadow) {
            inputs.insert(name, t);
        }
    }
    let lambda = spec.lambda_at(0);
    inputs.insert(LAMBDA.into(), HostTensor::from_f64(dt, vec![], &[lambda])?);
    // The learning-rates' multipliers at meta-step 0, where scheduled.
    for (name, s) in spec.lr_scales(0) {
        if sig.input(name).is_some() {
            inputs.insert(name.into(), HostTensor::from_f64(dt, vec![], &[s])?);
        }
    }
    let g = &program.graph;
    let exec = crate::cli::backend::open(backend.unwrap_or(BackendKind::Cpu), &spec.backend)?;
    let compiled = t0.elapsed();
    let mut results = exec.run(&program, &inputs)?;
    // `--repeat N`: time N further executions of the same compiled meta-step
    // (the first one above warms caches and allocations up).
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let t = Instant::now();
        results = exec.run(&program, &inputs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    // One more run on a device, recording the most device memory in use.
    let peak_memory = if repeat > 0 && exec.memory_peak().is_some() {
        exec.track_memory(true);
        exec.run(&program, &inputs)?;
        let peak = exec.memory_peak();
        exec.track_memory(false);
        peak
    } else {
        None
    };
    let mut tensors = BTreeMap::new();
    for (name, t) in results {
        tensors.insert(name, t);
    }
    write_tensors(out, &tensors)?;
    let scalar = |k: &str| tensors.get(k).map(|t| t.to_f64_vec()[0]);
    println!(
        "coopc grad: {} · {} hypergradient, K = {} · λ = {lambda} · {}",
        spec.bilevel.method.name(),
        spec.bilevel.hypergradient.kind.name(),
        spec.bilevel.hypergradient.unroll,
        exec.name()
    );
    for k in [Metric::SftLoss, Metric::RlLoss, Metric::UpperLoss].map(Metric::name) {
        if let Some(v) = scalar(k) {
            println!("  {k:<9} = {v:.9}");
        }
    }
    let norm = |prefix: &str| -> f64 {
        tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .flat_map(|(_, t)| t.to_f64_vec())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    };
    println!("  ‖lower‖   = {:.9}", norm("lower."));
    if spec.bilevel.method.updates_adapter() {
        println!("  ‖hyper‖   = {:.9}", norm("hyper."));
    }
    println!(
        "  {} tensors written to {} (graph {} nodes; build {:.2?}, total {:.2?})",
        tensors.len(),
        out.display(),
        g.node_count(),
        compiled,
        t0.elapsed()
    );
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let peak = peak_rss_bytes()
            .map(|b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64))
            .unwrap_or_else(|| "unknown".into());
        let device = peak_memory
            .map(|b| {
                format!(
                    ", device memory peak {:.1} MiB (buffers in use after any kernel, one more run)",
                    b as f64 / (1u64 << 20) as f64
                )
            })
            .unwrap_or_default();
        println!(
            "  timing: {} runs, median {:.3} ms, min {:.3} ms, peak RSS {peak}{device}",
            times.len(),
            median * 1e3,
            times[0] * 1e3
        );
    }
    Ok(())
}
