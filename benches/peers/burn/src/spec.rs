//! The pipeline file, read as far as the meta-step needs it: the keys that
//! decide what `coopc grad` computes, with the defaults of docs/pipeline.md.
//! Validation of the rest is coopc's job (`coopc check`); a key this peer does
//! not know, or a setting it cannot compute (any hypergradient but
//! `first_order`), is an error naming the key.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use toml::{Table, Value};

pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
const ATTN_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const PEFT_PREFIX: &str = "base_model.model.";

/// A valid pipeline asking for what this peer cannot compute (a
/// hypergradient other than `first_order`): reported as `unsupported`, not
/// as a bad input.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimKind {
    Sgd,
    Momentum,
    AdamW,
}

#[derive(Clone, Debug)]
pub struct Optim {
    pub kind: OptimKind,
    pub lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossAgg {
    TokenMean,
    SeqMean,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub max_seq: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub kl_coef: f64,
    pub loss_agg: LossAgg,
    pub method: String,
    /// λ at meta-step 0 of the method.
    pub lambda0: f64,
    pub shadow_persistent: bool,
    /// K, the lower (and shadow) steps per meta-step.
    pub unroll: usize,
    pub lower: Optim,
    pub dtype: Dtype,
}

impl Spec {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha / self.lora_rank as f64
    }

    pub fn bridge(&self) -> bool {
        self.method == "bridge"
    }

    pub fn has_lora(&self, proj: &str) -> bool {
        self.lora_targets.iter().any(|t| t == proj)
    }

    /// [out, in] of a projection.
    pub fn proj_dims(&self, proj: &str) -> (usize, usize) {
        let hd = self.head_dim();
        match proj {
            "q_proj" => (self.n_heads * hd, self.d_model),
            "k_proj" | "v_proj" => (self.n_kv_heads * hd, self.d_model),
            "o_proj" => (self.d_model, self.n_heads * hd),
            "gate_proj" | "up_proj" => (self.d_ff, self.d_model),
            "down_proj" => (self.d_model, self.d_ff),
            _ => unreachable!("unknown projection {proj}"),
        }
    }

    /// θ by Hugging Face names, with their shapes, in coopc's order.
    pub fn theta_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.d_model;
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for i in 0..self.n_layers {
            v.push((format!("model.layers.{i}.input_layernorm.weight"), vec![d]));
            for p in PROJECTIONS {
                let (o, inp) = self.proj_dims(p);
                v.push((format!("{}.weight", module_path(i, p)), vec![o, inp]));
                if self.qkv_bias && matches!(p, "q_proj" | "k_proj" | "v_proj") {
                    v.push((format!("{}.bias", module_path(i, p)), vec![o]));
                }
            }
            v.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                vec![d],
            ));
        }
        v.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_embeddings {
            v.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        }
        v
    }

    /// w (the LoRA adapter) by PEFT names, with their shapes.
    pub fn lora_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        for i in 0..self.n_layers {
            for p in PROJECTIONS {
                if self.has_lora(p) {
                    let (o, inp) = self.proj_dims(p);
                    v.push((lora_name(i, p, "A"), vec![self.lora_rank, inp]));
                    v.push((lora_name(i, p, "B"), vec![o, self.lora_rank]));
                }
            }
        }
        v
    }
}

pub fn module_path(layer: usize, proj: &str) -> String {
    let block = if ATTN_PROJECTIONS.contains(&proj) {
        "self_attn"
    } else {
        "mlp"
    };
    format!("model.layers.{layer}.{block}.{proj}")
}

pub fn lora_name(layer: usize, proj: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{}.lora_{which}.weight", module_path(layer, proj))
}

/// One table of the pipeline: typed getters that remember which keys were
/// read, so that whatever is left over can be reported as unknown.
struct Section<'a> {
    path: String,
    table: Option<&'a Table>,
    known: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(path: &str, table: Option<&'a Table>) -> Self {
        Section {
            path: path.to_string(),
            table,
            known: Vec::new(),
        }
    }

    fn of(parent: &'a Table, parent_path: &str, key: &str) -> Result<Self> {
        let path = if parent_path.is_empty() {
            key.to_string()
        } else {
            format!("{parent_path}.{key}")
        };
        match parent.get(key) {
            None => Ok(Section::new(&path, None)),
            Some(Value::Table(t)) => Ok(Section::new(&path, Some(t))),
            Some(_) => bail!("`{path}` must be a table"),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.table.and_then(|t| t.get(key))
    }

    /// Keys that do not change the meta-step (rollouts, batch sizes, the
    /// training loop, the upper optimiser): accepted and not used.
    fn ignore(&mut self, keys: &[&'static str]) {
        self.known.extend_from_slice(keys);
    }

    fn int(&mut self, key: &'static str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= 0 => Ok(Some(*i as usize)),
            Some(_) => bail!("`{}` must be a non-negative integer", self.key(key)),
        }
    }

    fn float(&mut self, key: &'static str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Float(f)) => Ok(Some(*f)),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(_) => bail!("`{}` must be a number", self.key(key)),
        }
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(_) => bail!("`{}` must be a boolean", self.key(key)),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => bail!("`{}` must be a string", self.key(key)),
        }
    }

    fn choice(
        &mut self,
        key: &'static str,
        default: &str,
        allowed: &[&str],
    ) -> Result<String> {
        let v = self.string(key)?.unwrap_or_else(|| default.to_string());
        if !allowed.contains(&v.as_str()) {
            bail!(
                "`{}` = {v:?} is not one of {}",
                self.key(key),
                allowed.join(", ")
            );
        }
        Ok(v)
    }

    fn finish(self) -> Result<()> {
        if let Some(t) = self.table {
            for k in t.keys() {
                if !self.known.contains(&k.as_str()) {
                    bail!(
                        "`{}.{k}` is not a key this peer knows (it reads only what decides the meta-step of `coopc grad`)",
                        self.path
                    );
                }
            }
        }
        Ok(())
    }
}

pub fn load(path: &Path) -> Result<Spec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the pipeline {}", path.display()))?;
    let doc: Table = text
        .parse()
        .map_err(|e| anyhow!("{}: not valid TOML: {e}", path.display()))?;
    parse(&doc).with_context(|| format!("pipeline {}", path.display()))
}

fn parse(doc: &Table) -> Result<Spec> {
    const SECTIONS: [&str; 9] = [
        "model", "lora", "task", "rl", "sft", "bilevel", "optim", "train", "backend",
    ];
    for k in doc.keys() {
        if !SECTIONS.contains(&k.as_str()) {
            bail!("`{k}` is not a section this peer knows");
        }
    }

    let mut model = Section::of(doc, "", "model")?;
    let required = |s: &mut Section, key: &'static str| -> Result<usize> {
        s.int(key)?
            .ok_or_else(|| anyhow!("`model.{key}` is required"))
    };
    let d_model = required(&mut model, "d_model")?;
    let n_layers = required(&mut model, "n_layers")?;
    let n_heads = required(&mut model, "n_heads")?;
    let d_ff = required(&mut model, "d_ff")?;
    let max_seq = required(&mut model, "max_seq")?;
    let vocab_size = model.int("vocab_size")?;
    let n_kv_heads = model.int("n_kv_heads")?.unwrap_or(n_heads);
    let rope_theta = model.float("rope_theta")?.unwrap_or(10000.0);
    let rms_eps = model.float("rms_eps")?.unwrap_or(1e-6);
    let tie_embeddings = model.bool("tie_embeddings")?.unwrap_or(true);
    let qkv_bias = model.bool("qkv_bias")?.unwrap_or(false);
    model.finish()?;
    if n_heads == 0 || d_model % n_heads != 0 || (d_model / n_heads) % 2 != 0 {
        bail!("`model.n_heads` must divide `model.d_model` into an even head dimension");
    }
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        bail!("`model.n_kv_heads` must divide `model.n_heads`");
    }

    let mut task = Section::of(doc, "", "task")?;
    let task_kind = task.choice("kind", "addition", &["addition", "countdown", "jsonl"])?;
    task.ignore(&[
        "tokenizer",
        "sft_file",
        "rl_file",
        "eval_file",
        "reward_correct",
        "reward_wrong",
        "sft_max_digits",
        "rl_max_digits",
        "eval_digits",
    ]);
    task.finish()?;
    let vocab_size = match (vocab_size, task_kind.as_str()) {
        (Some(v), _) => v,
        (None, "addition") => 24,
        (None, "countdown") => 32,
        (None, k) => bail!("`model.vocab_size` is required for task.kind = {k:?}"),
    };

    let mut lora = Section::of(doc, "", "lora")?;
    let lora_rank = lora.int("rank")?.unwrap_or(8);
    let lora_alpha = lora.float("alpha")?.unwrap_or(2.0 * lora_rank as f64);
    let lora_targets = match lora.get("targets") {
        None => PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        Some(Value::Array(a)) => {
            let mut v = Vec::new();
            for x in a {
                match x {
                    Value::String(s) if PROJECTIONS.contains(&s.as_str()) => v.push(s.clone()),
                    _ => bail!(
                        "`lora.targets` must list projections among {}",
                        PROJECTIONS.join(", ")
                    ),
                }
            }
            v
        }
        Some(_) => bail!("`lora.targets` must be an array of strings"),
    };
    lora.finish()?;
    if lora_rank == 0 {
        bail!("`lora.rank` must be at least 1");
    }

    let mut rl = Section::of(doc, "", "rl")?;
    let clip_low = rl.float("clip_low")?.unwrap_or(0.2);
    let clip_high = rl.float("clip_high")?.unwrap_or(0.28);
    let kl_coef = rl.float("kl_coef")?.unwrap_or(0.0);
    let loss_agg = match rl
        .choice("loss_agg", "token_mean", &["token_mean", "seq_mean"])?
        .as_str()
    {
        "token_mean" => LossAgg::TokenMean,
        _ => LossAgg::SeqMean,
    };
    // Rollouts and advantages are data in B; these shape only sampling.
    rl.ignore(&[
        "group_size",
        "prompts_per_step",
        "advantage",
        "max_new_tokens",
        "temperature",
        "top_p",
    ]);
    rl.finish()?;

    let mut train = Section::of(doc, "", "train")?;
    let steps = train.int("steps")?.unwrap_or(100);
    train.ignore(&["seed", "eval_every", "seq_len"]);
    train.finish()?;

    let mut sft = Section::of(doc, "", "sft")?;
    let cold_start_steps = sft.int("cold_start_steps")?.unwrap_or(steps / 2);
    sft.ignore(&["batch_size"]);
    sft.finish()?;

    let mut bilevel = Section::of(doc, "", "bilevel")?;
    let method = bilevel.choice(
        "method",
        "bridge",
        &["bridge", "rl_zero", "sft", "cold_start", "mix", "alternating"],
    )?;
    let lam = match bilevel.get("lambda") {
        None => 0.5,
        Some(Value::Float(f)) => *f,
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Table(t)) => {
            // `start` at meta-step 0; the rest of the schedule is not needed.
            let mut s = Section::new("bilevel.lambda", Some(t));
            let start = s
                .float("start")?
                .ok_or_else(|| anyhow!("`bilevel.lambda.start` is required"))?;
            s.ignore(&["end"]);
            s.finish()?;
            start
        }
        Some(_) => bail!("`bilevel.lambda` must be a number or a table {{ start, end }}"),
    };
    let lambda0 = match method.as_str() {
        "bridge" | "mix" => lam,
        "rl_zero" => 1.0,
        "sft" | "alternating" => 0.0,
        "cold_start" => {
            if cold_start_steps > 0 {
                0.0
            } else {
                1.0
            }
        }
        _ => unreachable!(),
    };
    let shadow = bilevel.choice("shadow", "persistent", &["persistent", "one_step"])?;
    let empty = Table::new();
    let mut hg = Section::of(bilevel.table.unwrap_or(&empty), "bilevel", "hypergradient")?;
    bilevel.known.push("hypergradient");
    let kind = hg.string("kind")?.unwrap_or_else(|| "first_order".into());
    let unroll = hg.int("unroll")?.unwrap_or(1).max(1);
    let backprop = hg.int("backprop")?;
    let eps = hg.float("eps")?;
    hg.finish()?;
    bilevel.finish()?;
    if method == "bridge" {
        if kind != "first_order" {
            return Err(Unsupported(format!(
                "hypergradient kind {kind:?} (this peer computes only \"first_order\": burn has \
                 no second-order autodiff)"
            ))
            .into());
        }
        if backprop.unwrap_or(0) != 0 {
            bail!("`bilevel.hypergradient.backprop` must be 0 or absent with first_order");
        }
        if eps.is_some() {
            bail!("`bilevel.hypergradient.eps` belongs to finite_difference only");
        }
    }

    let optim = match doc.get("optim") {
        None => Table::new(),
        Some(Value::Table(t)) => t.clone(),
        Some(_) => bail!("`optim` must be a table"),
    };
    for k in optim.keys() {
        if k != "lower" && k != "upper" {
            bail!("`optim.{k}` is not a section this peer knows");
        }
    }
    let mut lo = Section::of(&optim, "optim", "lower")?;
    let kind = match lo
        .choice("kind", "adamw", &["sgd", "momentum", "adamw"])?
        .as_str()
    {
        "sgd" => OptimKind::Sgd,
        "momentum" => OptimKind::Momentum,
        _ => OptimKind::AdamW,
    };
    let lower = Optim {
        kind,
        lr: lo.float("lr")?.unwrap_or(3e-4),
        momentum: lo.float("momentum")?.unwrap_or(0.9),
        beta1: lo.float("beta1")?.unwrap_or(0.9),
        beta2: lo.float("beta2")?.unwrap_or(0.999),
        eps: lo.float("eps")?.unwrap_or(1e-8),
        weight_decay: lo.float("weight_decay")?.unwrap_or(0.0),
    };
    lo.finish()?;
    // The upper optimiser updates w after the hypergradient: not part of
    // what `coopc grad` writes.

    let mut backend = Section::of(doc, "", "backend")?;
    let dtype = match backend.choice("dtype", "f32", &["f32", "f64"])?.as_str() {
        "f64" => Dtype::F64,
        _ => Dtype::F32,
    };
    // `coopc grad` runs on the CPU executor whatever `backend.kind` says.
    backend.ignore(&["kind"]);
    backend.finish()?;

    Ok(Spec {
        vocab_size,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        d_ff,
        max_seq,
        rope_theta,
        rms_eps,
        tie_embeddings,
        qkv_bias,
        lora_rank,
        lora_alpha,
        lora_targets,
        clip_low,
        clip_high,
        kl_coef,
        loss_agg,
        method,
        lambda0,
        shadow_persistent: shadow == "persistent",
        unroll,
        lower,
        dtype,
    })
}
