//! `coopc inspect PLAN`: prints what a plan file holds — its format version,
//! the pipeline it was compiled from, the method and model, the compiler's
//! notes, and per program its size, ops, inputs and outputs, estimated peak
//! memory and arithmetic.

use coopc_compiler::ir::{Graph, NodeId, Op};
use coopc_compiler::model::{lora_shapes, parameter_count, theta_shapes};
use coopc_compiler::plan::{Plan, Program, PLAN_FORMAT_VERSION};
use coopc_compiler::schedule::{human_bytes, peak_live, schedule};
use coopc_compiler::spec::{
    HypergradKind, Lambda, ModelSpec, OptimKind, OptimSpec, PipelineSpec, ShadowMode,
};
use std::fmt::Write;
use std::path::Path;

/// How many op kinds the per-program summary lists.
const TOP_OPS: usize = 8;
/// (op, type) groups listed at the peak.
const PEAK_GROUPS: usize = 8;

/// Prints the summary of the plan file at `path` and returns the process
/// exit status: 0, or 2 (with the reason on stderr) when the plan is refused.
pub fn inspect(path: &Path) -> i32 {
    match Plan::read(path) {
        Ok(plan) => {
            print!("{}", report(&plan, path));
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// The text `inspect` prints for a plan read from `path`.
pub fn report(plan: &Plan, path: &Path) -> String {
    let mut s = String::new();
    let spec = &plan.spec;
    let _ = writeln!(s, "plan           {}", path.display());
    let _ = writeln!(s, "format         version {PLAN_FORMAT_VERSION}");
    let _ = writeln!(s, "pipeline hash  {}", plan.pipeline_hash);
    if !plan.pipeline_path.is_empty() {
        let status = match plan.check_source() {
            Ok(()) if Path::new(&plan.pipeline_path).exists() => {
                "unchanged since compile".to_string()
            }
            Ok(()) => "no longer on disk; the plan carries its specification".to_string(),
            Err(_) => "CHANGED since compile: the plan is stale, recompile it".to_string(),
        };
        let _ = writeln!(s, "pipeline       {} ({status})", plan.pipeline_path);
    }
    let _ = writeln!(s, "method         {}", method(spec));
    let _ = writeln!(
        s,
        "optimisers     lower {} · upper {}",
        optim(&spec.optim.lower),
        optim(&spec.optim.upper)
    );
    let _ = writeln!(s, "model          {}", model(&spec.model));
    let lora = &spec.lora;
    let targets: Vec<&str> = lora.targets.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        s,
        "lora           rank {} · alpha {} · {} · {} parameters",
        lora.rank,
        lora.alpha,
        if targets.is_empty() {
            "no targets".to_string()
        } else {
            targets.join(", ")
        },
        count(lora_params(spec) as f64)
    );
    let rl = &spec.rl;
    let _ = writeln!(
        s,
        "data           task {} · SFT batch {} · RL {} prompts × {} rollouts, ≤ {} new tokens",
        spec.task.kind.name(),
        spec.sft.batch_size,
        rl.prompts_per_step,
        rl.group_size,
        rl.max_new_tokens
    );
    let _ = writeln!(s, "rl loss        {}", rl_loss(rl));
    let _ = writeln!(
        s,
        "training       {} meta-steps · seq_len {} · seed {} · backend {} ({})",
        spec.train.steps,
        spec.train.seq_len,
        spec.train.seed,
        spec.backend.kind.name(),
        spec.backend.dtype.name()
    );
    if plan.notes.is_empty() {
        let _ = writeln!(s, "notes          none");
    } else {
        let _ = writeln!(s, "notes");
        for n in &plan.notes {
            let _ = writeln!(s, "  - {n}");
        }
    }
    let _ = writeln!(s, "programs       {}", plan.programs.len());
    for p in &plan.programs {
        program(&mut s, p);
    }
    s
}

fn program(s: &mut String, p: &Program) {
    let g = &p.graph;
    let sc = schedule(g);
    let inputs = sc
        .order
        .iter()
        .filter(|&&id| matches!(g.op(id), Op::Input { .. }))
        .count();
    let _ = writeln!(s, "\n  {}", p.name());
    let _ = writeln!(
        s,
        "    nodes        {} ({} scheduled)",
        g.node_count(),
        p.schedule.len()
    );
    let _ = writeln!(s, "    kernels      {}", p.fused);
    let _ = writeln!(
        s,
        "    inputs       {inputs} · {}",
        human_bytes(sc.input_bytes)
    );
    let _ = writeln!(
        s,
        "    outputs      {} · {}",
        g.outputs().len(),
        human_bytes(sc.output_bytes)
    );
    let mut peak = format!("{} (estimate)", human_bytes(sc.peak_bytes));
    if p.peak_bytes != sc.peak_bytes {
        let _ = write!(
            peak,
            "; the compiler's plan says {}",
            human_bytes(p.peak_bytes)
        );
    }
    let _ = writeln!(s, "    peak memory  {peak}");
    at_peak(s, g, &sc.order);
    let _ = writeln!(s, "    flops        {}", count(sc.flops as f64));
    let mut ops: Vec<(&String, &usize)> = sc.op_counts.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut top: Vec<String> = ops
        .iter()
        .take(TOP_OPS)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if ops.len() > TOP_OPS {
        top.push(format!("(+{} more kinds)", ops.len() - TOP_OPS));
    }
    let _ = writeln!(s, "    top ops      {}", top.join(" · "));
}

/// What is live at the peak, grouped by (op, type), largest groups first.
fn at_peak(s: &mut String, g: &Graph, order: &[NodeId]) {
    let p = peak_live(g);
    let what = if let Some(&id) = order.get(p.step) {
        format!(
            "{}, step {} of {}",
            g.op(id).name(),
            p.step + 1,
            order.len()
        )
    } else {
        "handing out the results".to_string()
    };
    let _ = writeln!(
        s,
        "    at the peak  {what} · {} live buffers, largest groups:",
        p.buffers.len()
    );
    for line in buffer_groups(g, &p.buffers, |id| g.ty(id).size_bytes()) {
        let _ = writeln!(s, "      {line}");
    }
}

/// The largest groups of `buffers` by (op, type), as `bytes  n × op type`
/// lines, largest first; `bytes_of` sizes one buffer.
pub fn buffer_groups(
    g: &Graph,
    buffers: &[NodeId],
    bytes_of: impl Fn(NodeId) -> usize,
) -> Vec<String> {
    // (op, type) → (buffers, bytes).
    let mut by_kind: std::collections::BTreeMap<(&str, String), (usize, usize)> =
        Default::default();
    for &id in buffers {
        let e = by_kind
            .entry((g.op(id).name(), g.ty(id).to_string()))
            .or_default();
        e.0 += 1;
        e.1 += bytes_of(id);
    }
    let mut groups: Vec<_> = by_kind.into_iter().collect();
    groups.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    groups
        .iter()
        .take(PEAK_GROUPS)
        .map(|((op, ty), (n, total))| format!("{:>10}  {n} × {op} {ty}", human_bytes(*total)))
        .collect()
}

fn method(spec: &PipelineSpec) -> String {
    let b = &spec.bilevel;
    let lambda = match b.lambda {
        Lambda::Constant(v) => format!("λ {v}"),
        Lambda::Linear { start, end } => format!("λ {start} → {end}"),
    };
    let h = &b.hypergradient;
    let kind = match h.kind {
        HypergradKind::FiniteDifference { eps } => format!("{} (eps {eps})", h.kind.name()),
        other => other.name().to_string(),
    };
    format!(
        "{} · {lambda} · shadow {} · hypergradient {kind}, unroll {}, backprop {}",
        b.method.name(),
        match b.shadow {
            ShadowMode::Persistent => "persistent",
            ShadowMode::OneStep => "one_step",
        },
        h.unroll,
        h.backprop
    )
}

fn optim(o: &OptimSpec) -> String {
    let kind = match o.kind {
        OptimKind::Sgd => "sgd".to_string(),
        OptimKind::Momentum { momentum } => format!("momentum {momentum}"),
        OptimKind::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => format!("adamw (β {beta1}, {beta2}; eps {eps}; wd {weight_decay})"),
    };
    format!("{kind}, lr {}", o.lr)
}

fn model(m: &ModelSpec) -> String {
    let mut s = format!(
        "{} layer{} · d_model {} · {} heads ({} kv, head dim {}) · d_ff {} · vocab {} · max_seq {}",
        m.n_layers,
        if m.n_layers == 1 { "" } else { "s" },
        m.d_model,
        m.n_heads,
        m.n_kv_heads,
        m.head_dim(),
        m.d_ff,
        m.vocab_size,
        m.max_seq
    );
    if m.tie_embeddings {
        s += " · tied embeddings";
    }
    if m.qkv_bias {
        s += " · qkv bias";
    }
    let _ = write!(s, " · {} parameters", count(model_params(m) as f64));
    s
}

/// Parameters of the base model (θ), as in the Hugging Face layout.
fn model_params(m: &ModelSpec) -> usize {
    parameter_count(&theta_shapes(m))
}

/// Parameters of the LoRA adapter (w).
fn lora_params(spec: &PipelineSpec) -> usize {
    parameter_count(&lora_shapes(&spec.model, &spec.lora))
}

/// A count with an SI suffix: `950`, `12.3k`, `1.50M`, `7.20G`.
fn count(n: f64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in UNITS {
        if n >= scale {
            let v = n / scale;
            return if v >= 100.0 {
                format!("{v:.0}{unit}")
            } else if v >= 10.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.2}{unit}")
            };
        }
    }
    format!("{n:.0}")
}

/// The RL loss's settings in one line: surrogate, ratio, clip range,
/// aggregation, KL term and where it goes, advantages, sampling.
fn rl_loss(rl: &coopc_compiler::spec::RlSpec) -> String {
    use coopc_compiler::spec::LossAgg;
    let agg = match rl.loss_agg {
        LossAgg::SeqMeanTokenSumNorm => format!("{} (/ {})", rl.loss_agg.name(), rl.max_new_tokens),
        other => other.name().to_string(),
    };
    let kl = if rl.kl_coef > 0.0 {
        let at = if rl.kl_in_reward { "reward" } else { "loss" };
        format!("KL {} × {} in the {at}", rl.kl_estimator.name(), rl.kl_coef)
    } else {
        "no KL".to_string()
    };
    let kl = if rl.entropy_coef > 0.0 {
        format!("{kl} · entropy bonus × {}", rl.entropy_coef)
    } else {
        kl
    };
    let kl = if rl.updates() > 1 {
        format!(
            "{kl} · {} epochs × {} mini-batches per rollout batch",
            rl.updates_per_batch, rl.mini_batches
        )
    } else {
        kl
    };
    let mut sampling = format!("temperature {}", rl.temperature);
    if rl.top_k > 0 {
        sampling += &format!(", top_k {}", rl.top_k);
    }
    if rl.top_p < 1.0 {
        sampling += &format!(", top_p {}", rl.top_p);
    }
    format!(
        "{} · {} ratio · clip [{}, {}] · {agg} · {kl} · advantage {} · {sampling}",
        rl.loss.name(),
        rl.ratio_level.name(),
        1.0 - rl.clip_low,
        1.0 + rl.clip_high,
        rl.advantage.name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use coopc_compiler::ir::{DType, Graph};
    use coopc_compiler::plan::{pipeline_hash, ProgramKind};
    use std::path::PathBuf;

    /// A one-layer pipeline small enough to count its parameters by hand.
    const PIPELINE: &str = r#"
[model]
vocab_size = 24
d_model = 8
n_layers = 1
n_heads = 2
n_kv_heads = 1
d_ff = 16
max_seq = 12
qkv_bias = false
[lora]
rank = 2
alpha = 4.0
targets = ["q_proj", "down_proj"]
[rl]
group_size = 4
prompts_per_step = 2
clip_high = 0.2
max_new_tokens = 6
top_p = 1.0
[sft]
batch_size = 4
[bilevel]
method = "bridge"
lambda = 0.5
shadow = "one_step"
[bilevel.hypergradient]
kind = "truncated"
unroll = 2
backprop = 1
[optim.lower]
kind = "sgd"
lr = 0.1
[optim.upper]
kind = "sgd"
lr = 0.01
[train]
steps = 3
seed = 1
eval_every = 0
seq_len = 12
[backend]
kind = "cpu"
"#;

    /// [`PIPELINE`] with a vocabulary of 10 tokens, for round parameter
    /// counts: the front end refuses fewer than the addition task's 24, and
    /// these tests never run the task.
    fn spec() -> PipelineSpec {
        let mut spec =
            coopc_compiler::frontend::parse_pipeline(PIPELINE).expect("a valid pipeline");
        spec.model.vocab_size = 10;
        spec
    }

    /// The pipeline's plan with a five-node graph in place of its meta-step.
    fn plan() -> Plan {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, vec![4, 8]);
        let b = g.input("b", DType::F32, vec![8, 2]);
        let y = g.matmul(a, b);
        let e = g.exp(y);
        let s = g.sum_all(e);
        g.set_output("loss", s);
        let mut plan = coopc_compiler::compile(spec());
        plan.pipeline_hash = pipeline_hash("pipeline");
        plan.notes = vec!["nothing recomputed".into()];
        let mut meta = coopc_compiler::compile_graph(g);
        meta.kind = ProgramKind::MetaStep;
        plan.programs[0] = meta;
        plan
    }

    #[test]
    fn report_summarises_spec_and_programs() {
        let r = report(&plan(), Path::new("x.plan"));
        for want in [
            &format!("format         version {PLAN_FORMAT_VERSION}"),
            "rl loss        ppo_clip · token ratio · clip [0.8, 1.2] · token_mean · no KL · \
             advantage group_std · temperature 1",
            &format!("pipeline hash  {}", pipeline_hash("pipeline")),
            "method         bridge · λ 0.5 · shadow one_step · hypergradient truncated",
            "  - nothing recomputed",
            "1 layer · d_model 8",
            "backend cpu (f32)",
            "  meta_step",
            "    nodes        5 (5 scheduled)",
            "    kernels      4 kernels (0 elementwise programs, 1 fused reductions, 3 other) for 2 fused nodes",
            "    inputs       2 · 192 B",
            "    outputs      1 · 4 B",
            "    peak memory  224 B (estimate)",
            "    at the peak  matmul, step 3 of 5 · 3 live buffers, largest groups:",
            "           128 B  1 × input f32[4,8]",
            "            64 B  1 × input f32[8,2]",
            "            32 B  1 × matmul f32[4,2]",
            "    flops        144",
            "    top ops      input 2 · exp 1 · matmul 1 · reduce_sum 1",
        ] {
            assert!(r.contains(want), "missing {want:?} in\n{r}");
        }
    }

    #[test]
    fn parameter_counts_follow_the_hf_layout() {
        let m = spec().model;
        // embed 80; layer: q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 +
        // down 128 + norms 16 = 592; final norm 8; tied head.
        assert_eq!(model_params(&m), 80 + 592 + 8);
        // q: 2·(8+8) = 32, down: 2·(16+8) = 48.
        assert_eq!(lora_params(&spec()), 80);
        assert_eq!(count(950.0), "950");
        assert_eq!(count(12_345.0), "12.3k");
        assert_eq!(count(1_500_000.0), "1.50M");
    }

    #[test]
    fn inspect_returns_0_for_a_plan_and_2_for_a_refused_file() {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("coopc-inspect-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.plan");
        plan().write(&path).unwrap();
        assert_eq!(inspect(&path), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(inspect(&path), 2);
        assert_eq!(inspect(&dir.join("missing.plan")), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
