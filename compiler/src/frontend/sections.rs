//! The pipeline's schema (sections, keys, choices, defaults) and one reader
//! per section, from the checked document to the spec.

use super::check::{
    closest, describe, plain_list, quoted_list, size_limit, Checker, Field, Section,
};
use super::diagnostics::Diagnostic;
use crate::spec::{
    Advantage, BackendKind, BackendSpec, BilevelSpec, CountdownSpec, DataFormat, HypergradKind,
    HypergradSpec, KlEstimator, Lambda, LoraSpec, LossAgg, LrSchedule, MatmulPrecision, Method,
    ModelSpec, OnNonFinite, OptimKind, OptimSpec, OptimSpecs, PipelineSpec, PolicyLoss, Precision,
    Projection, RatioLevel, RlSpec, ScheduleKind, SftFlaw, SftSpec, ShadowMode, TaskKind, TaskSpec,
    TrainSpec,
};
use std::ops::Range;
use toml_edit::{Item, Value};

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

/// The sections of a pipeline and the keys each accepts.
pub(super) const SECTIONS: &[(&str, &[&str])] = &[
    ("model", MODEL_KEYS),
    ("lora", LORA_KEYS),
    ("task", TASK_KEYS),
    ("rl", RL_KEYS),
    ("sft", SFT_KEYS),
    ("bilevel", BILEVEL_KEYS),
    ("optim", &["lower", "upper"]),
    ("train", TRAIN_KEYS),
    ("backend", BACKEND_KEYS),
];
pub(super) const MODEL_KEYS: &[&str] = &[
    "from",
    "lower",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "max_seq",
    "rope_theta",
    "rms_eps",
    "tie_embeddings",
    "qkv_bias",
];
pub(super) const LORA_KEYS: &[&str] = &["rank", "alpha", "targets"];
pub(super) const LOWER_KEYS: &[&str] = &["lora_rank", "alpha", "targets"];
pub(super) const TASK_KEYS: &[&str] = &[
    "kind",
    "tokenizer",
    "sft_file",
    "rl_file",
    "eval_file",
    "reward_correct",
    "reward_wrong",
    "sft_max_digits",
    "rl_max_digits",
    "eval_digits",
    "format",
    "chat_template",
    "system_prompt",
    "reward_malformed",
    "sft_pool",
    "sft_flaw",
    "sft_carry_free",
    "min_numbers",
    "max_numbers",
    "max_number",
    "max_value",
    "search_demos",
];
pub(super) const SFT_FLAWS: &[(&str, SftFlaw)] = &[
    ("none", SftFlaw::None),
    ("drop_final_carry", SftFlaw::DropFinalCarry),
];
pub(super) const DATA_FORMATS: &[(&str, DataFormat)] = &[
    ("prompt_response", DataFormat::PromptResponse),
    ("gsm8k", DataFormat::Gsm8k),
    ("math", DataFormat::Math),
];
pub(super) const RL_KEYS: &[&str] = &[
    "group_size",
    "prompts_per_step",
    "clip_low",
    "clip_high",
    "kl_coef",
    "kl_estimator",
    "kl_in_reward",
    "advantage",
    "loss_agg",
    "ratio_level",
    "loss",
    "entropy_coef",
    "updates_per_batch",
    "mini_batches",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "skip_no_signal",
    "mask_truncated",
    "dynamic_sampling",
    "max_sampling_rounds",
];
pub(super) const SFT_KEYS: &[&str] = &["batch_size", "cold_start_steps"];
pub(super) const BILEVEL_KEYS: &[&str] = &["method", "lambda", "shadow", "hypergradient"];
pub(super) const HYPERGRAD_KEYS: &[&str] = &["kind", "unroll", "backprop", "eps"];
pub(super) const LAMBDA_KEYS: &[&str] = &["start", "end"];
pub(super) const OPTIM_KEYS: &[&str] = &[
    "kind",
    "lr",
    "momentum",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "max_grad_norm",
];
pub(super) const SCHEDULES: &[(&str, ScheduleKind)] = &[
    ("constant", ScheduleKind::Constant),
    ("linear", ScheduleKind::Linear),
    ("cosine", ScheduleKind::Cosine),
];
pub(super) const TRAIN_KEYS: &[&str] = &[
    "steps",
    "seed",
    "eval_every",
    "seq_len",
    "on_nonfinite",
    "max_nonfinite_in_row",
    "eval_samples",
    "eval_temperature",
    "micro_batches",
];
pub(super) const ON_NONFINITE: &[(&str, OnNonFinite)] = &[
    ("stop", OnNonFinite::Stop),
    ("skip_step", OnNonFinite::SkipStep),
];
pub(super) const BACKEND_KEYS: &[&str] = &["kind", "dtype", "matmul", "memory_budget_gib"];

/// The model keys without a default.
pub(super) const MODEL_REQUIRED: &[&str] = &["d_model", "n_layers", "n_heads", "d_ff", "max_seq"];

pub(super) const TASK_KINDS: &[(&str, TaskKind)] = &[
    ("addition", TaskKind::Addition),
    ("countdown", TaskKind::Countdown),
    ("jsonl", TaskKind::Jsonl),
];
pub(super) const ADVANTAGES: &[(&str, Advantage)] = &[
    ("group_std", Advantage::GroupStd),
    ("group_mean", Advantage::GroupMean),
    ("batch_std", Advantage::BatchStd),
    ("rloo", Advantage::Rloo),
];
pub(super) const LOSS_AGGS: &[(&str, LossAgg)] = &[
    ("token_mean", LossAgg::TokenMean),
    ("seq_mean", LossAgg::SeqMean),
    ("seq_mean_token_sum_norm", LossAgg::SeqMeanTokenSumNorm),
];
pub(super) const RATIO_LEVELS: &[(&str, RatioLevel)] = &[
    ("token", RatioLevel::Token),
    ("sequence", RatioLevel::Sequence),
];
pub(super) const POLICY_LOSSES: &[(&str, PolicyLoss)] = &[
    ("ppo_clip", PolicyLoss::PpoClip),
    ("cispo", PolicyLoss::Cispo),
];
pub(super) const KL_ESTIMATORS: &[(&str, KlEstimator)] = &[
    ("k1", KlEstimator::K1),
    ("k2", KlEstimator::K2),
    ("k3", KlEstimator::K3),
];
pub(super) const SHADOWS: &[(&str, ShadowMode)] = &[
    ("persistent", ShadowMode::Persistent),
    ("one_step", ShadowMode::OneStep),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OptimChoice {
    Sgd,
    Momentum,
    AdamW,
}
pub(super) const OPTIMS: &[(&str, OptimChoice)] = &[
    ("sgd", OptimChoice::Sgd),
    ("momentum", OptimChoice::Momentum),
    ("adamw", OptimChoice::AdamW),
];
pub(super) const DTYPES: &[(&str, Precision)] = &[
    ("f32", Precision::F32),
    ("f64", Precision::F64),
    ("bf16", Precision::Bf16),
];
pub(super) const MATMULS: &[(&str, MatmulPrecision)] = &[
    ("f32", MatmulPrecision::F32),
    ("tf32", MatmulPrecision::Tf32),
];

/// Vocabulary size of a task's built-in character tokenizer (`None` for
/// `jsonl`, which brings its own data and needs `model.vocab_size`).
pub fn builtin_vocab_size(kind: TaskKind) -> Option<usize> {
    match kind {
        TaskKind::Addition => Some(24),
        TaskKind::Countdown => Some(32),
        TaskKind::Jsonl => None,
    }
}

/// Default LoRA rank when `[lora]` gives none.
pub const DEFAULT_LORA_RANK: usize = 8;

pub(super) fn read_pipeline(c: &mut Checker, root: &Section) -> Option<PipelineSpec> {
    // Top level: only known sections.
    let section_names: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
    if let Some(table) = root.table {
        for (key, item) in table.iter() {
            if item.is_none() || section_names.contains(&key) {
                continue;
            }
            let span = root.key_span(key);
            if item.is_table_like() {
                let help = match closest(key, &section_names) {
                    Some(n) => format!("did you mean `[{n}]`?"),
                    None => format!("the sections are: {}", plain_list(&section_names)),
                };
                c.error_help(key, span, format!("unknown section `[{key}]`"), help);
            } else {
                let owners: Vec<String> = SECTIONS
                    .iter()
                    .filter(|(_, keys)| keys.contains(&key))
                    .map(|(s, _)| format!("[{s}]"))
                    .collect();
                let help = if owners.is_empty() {
                    format!(
                        "keys belong in one of the sections: {}",
                        plain_list(&section_names)
                    )
                } else {
                    format!("`{key}` belongs under {}", owners.join(" or "))
                };
                c.error_help(
                    key,
                    span,
                    format!("key `{key}` is outside any section"),
                    help,
                );
            }
        }
    }

    let model_sec = c.table(root, "model");
    let lora_sec = c.table(root, "lora");
    let task_sec = c.table(root, "task");
    let rl_sec = c.table(root, "rl");
    let sft_sec = c.table(root, "sft");
    let bilevel_sec = c.table(root, "bilevel");
    let optim_sec = c.table(root, "optim");
    let train_sec = c.table(root, "train");
    let backend_sec = c.table(root, "backend");

    let mut task = read_task(c, &task_sec);
    let model = read_model(c, &model_sec, root, &task);
    // A jsonl task on a model folder uses the folder's tokenizer unless it
    // names another.
    if let (Some(dir), None, TaskKind::Jsonl) = (
        model.as_ref().and_then(|m| m.from.as_deref()),
        &task.tokenizer,
        task.kind,
    ) {
        let t = std::path::Path::new(dir).join("tokenizer.json");
        if t.exists() {
            task.tokenizer = Some(t.display().to_string());
        }
    }
    let train = read_train(c, &train_sec, model.as_ref());
    let rl = read_rl(c, &rl_sec, &train);
    let sft = read_sft(c, &sft_sec, &train, rl.mini_batches);
    let bilevel = read_bilevel(c, &bilevel_sec);
    let lora = read_lora(c, &lora_sec, bilevel.method);
    let optim = read_optims(c, &optim_sec);
    let backend = read_backend(c, &backend_sec);

    Some(PipelineSpec {
        model: model?,
        lora,
        task,
        rl,
        sft,
        bilevel,
        optim,
        train: train.spec,
        backend,
    })
}

pub(super) fn read_task(c: &mut Checker, sec: &Section) -> TaskSpec {
    c.unknown_keys(sec, TASK_KEYS);
    let kind = c.choice_or(sec, "kind", TASK_KINDS, TaskKind::Addition);
    let tokenizer = c.string(sec, "tokenizer").map(|f| f.value);
    let sft_file = c.string(sec, "sft_file").map(|f| f.value);
    let rl_file = c.string(sec, "rl_file").map(|f| f.value);
    let eval_file = c.string(sec, "eval_file").map(|f| f.value);
    if kind.value == TaskKind::Jsonl {
        for key in ["sft_file", "rl_file"] {
            if !sec.has(key) {
                let path = sec.key_path(key);
                c.error_help(
                    &path,
                    kind.span.clone(),
                    format!("missing key `{path}`: kind = \"jsonl\" reads its data from files"),
                    format!(
                        "add `{key} = \"data/{}.jsonl\"` to [task]",
                        key.trim_end_matches("_file")
                    ),
                );
            }
        }
    } else {
        keys_of_another_kind(
            c,
            sec,
            kind.value,
            &["sft_file", "rl_file", "eval_file"],
            "built-in tasks generate their own data; data files need kind = \"jsonl\"",
        );
    }
    let format = c.choice_or(sec, "format", DATA_FORMATS, DataFormat::PromptResponse);
    let chat_template = c.bool_or(sec, "chat_template", false);
    let system_prompt = c.string(sec, "system_prompt");
    if kind.value != TaskKind::Jsonl {
        keys_of_another_kind(
            c,
            sec,
            kind.value,
            &["format", "chat_template", "system_prompt"],
            "data formats and chat templates apply to kind = \"jsonl\"",
        );
    } else if system_prompt.is_some() && !chat_template {
        c.not_applicable(
            sec,
            "system_prompt",
            "without `task.chat_template = true`",
            "a system message goes through the chat template: set chat_template = true",
        );
    }
    let reward_correct = c.float_or(sec, "reward_correct", 1.0);
    let reward_wrong = c.float_or(sec, "reward_wrong", -1.0);
    let reward_malformed = c.float(sec, "reward_malformed");
    if let Some(m) = &reward_malformed {
        c.check(
            sec,
            "reward_malformed",
            m,
            m.value < reward_correct.value,
            "be less than `task.reward_correct`",
        );
    }
    if reward_correct.value <= reward_wrong.value {
        let (key, field) = if reward_correct.span.is_some() {
            ("reward_correct", &reward_correct)
        } else {
            ("reward_wrong", &reward_wrong)
        };
        c.check(
            sec,
            key,
            field,
            false,
            "leave `task.reward_correct` greater than `task.reward_wrong`",
        );
    }
    let digit_keys = ["sft_max_digits", "rl_max_digits", "eval_digits"];
    if kind.value != TaskKind::Addition {
        keys_of_another_kind(
            c,
            sec,
            kind.value,
            &digit_keys,
            "digit counts set the curriculum of kind = \"addition\"",
        );
        keys_of_another_kind(
            c,
            sec,
            kind.value,
            &["sft_flaw", "sft_carry_free"],
            "`sft_flaw` and `sft_carry_free` shape the demonstrations of kind = \"addition\"",
        );
    }
    if kind.value != TaskKind::Countdown {
        keys_of_another_kind(
            c,
            sec,
            kind.value,
            &[
                "min_numbers",
                "max_numbers",
                "max_number",
                "max_value",
                "search_demos",
            ],
            "`min_numbers`, `max_numbers`, `max_number`, `max_value` and `search_demos` set \
             the puzzle generator of kind = \"countdown\"",
        );
    }
    let sft_max = c.usize_or(sec, "sft_max_digits", 3);
    let rl_max = c.usize_or(sec, "rl_max_digits", 4);
    let eval_digits = c.usize(sec, "eval_digits");
    let digit_fields = [Some(&sft_max), Some(&rl_max), eval_digits.as_ref()];
    for (key, field) in digit_keys.iter().zip(digit_fields) {
        let Some(field) = field else { continue };
        c.check(
            sec,
            key,
            field,
            (1..=18).contains(&field.value),
            "be between 1 and 18 (operands fit in 64 bits)",
        );
    }
    c.check(
        sec,
        "rl_max_digits",
        &rl_max,
        rl_max.value >= sft_max.value,
        "be at least `task.sft_max_digits` (RL extends what SFT teaches)",
    );
    let sft_pool = c.usize(sec, "sft_pool");
    if let Some(p) = &sft_pool {
        c.at_least_one(sec, "sft_pool", p);
    }
    let sft_flaw = c.choice_or(sec, "sft_flaw", SFT_FLAWS, SftFlaw::None);
    let sft_carry_free = c.bool_or(sec, "sft_carry_free", false);
    let countdown = read_countdown(c, sec);
    TaskSpec {
        kind: kind.value,
        tokenizer,
        sft_file,
        rl_file,
        eval_file,
        reward_correct: reward_correct.value,
        reward_wrong: reward_wrong.value,
        sft_max_digits: sft_max.value,
        rl_max_digits: rl_max.value,
        eval_digits: eval_digits.map(|f| f.value),
        format: format.value,
        chat_template,
        system_prompt: system_prompt.map(|f| f.value),
        reward_malformed: reward_malformed.map(|f| f.value),
        sft_pool: sft_pool.map(|f| f.value),
        sft_flaw: sft_flaw.value,
        sft_carry_free,
        countdown,
    }
}

/// Reports each of `keys` that `sec` sets: they belong to another task kind
/// than `kind`, as `help` says.
fn keys_of_another_kind(c: &mut Checker, sec: &Section, kind: TaskKind, keys: &[&str], help: &str) {
    for key in keys {
        if sec.has(key) {
            c.not_applicable(sec, key, &format!("to kind = \"{}\"", kind.name()), help);
        }
    }
}

/// `[task]`'s countdown generator keys.
fn read_countdown(c: &mut Checker, sec: &Section) -> CountdownSpec {
    let d = CountdownSpec::default();
    let min_numbers = c.usize_or(sec, "min_numbers", d.min_numbers);
    let max_numbers = c.usize_or(sec, "max_numbers", d.max_numbers);
    let max_number = c.usize_or(sec, "max_number", d.max_number as usize);
    let max_value = c.usize_or(sec, "max_value", d.max_value as usize);
    let search_demos = c.bool_or(sec, "search_demos", false);
    c.check(
        sec,
        "min_numbers",
        &min_numbers,
        (2..=8).contains(&min_numbers.value),
        "be between 2 and 8",
    );
    c.check(
        sec,
        "max_numbers",
        &max_numbers,
        (2..=8).contains(&max_numbers.value) && max_numbers.value >= min_numbers.value,
        "be between `task.min_numbers` and 8",
    );
    c.check(
        sec,
        "max_number",
        &max_number,
        (1..=1_000_000).contains(&max_number.value),
        "be between 1 and 1000000",
    );
    c.check(
        sec,
        "max_value",
        &max_value,
        max_value.value >= max_number.value && max_value.value <= 1_000_000_000,
        "be between `task.max_number` and 1000000000",
    );
    CountdownSpec {
        min_numbers: min_numbers.value,
        max_numbers: max_numbers.value,
        max_number: max_number.value as u64,
        max_value: max_value.value as u64,
        search_demos,
    }
}

pub(super) fn read_model(
    c: &mut Checker,
    sec: &Section,
    root: &Section,
    task: &TaskSpec,
) -> Option<ModelSpec> {
    if sec.table.is_none() {
        if !root.has("model") {
            c.diags.push(
                Diagnostic::error("missing section `[model]`")
                    .with_path("model")
                    .with_help(format!(
                        "every pipeline describes its model: add a [model] section with {}",
                        plain_list(MODEL_REQUIRED)
                    )),
            );
        }
        return None;
    }
    c.unknown_keys(sec, MODEL_KEYS);
    let from = match c.model_from.clone() {
        Some(dir) => Some(Field {
            value: dir,
            span: None,
        }),
        None => c.string(sec, "from"),
    };
    if let Some(from) = from {
        return read_model_from(c, sec, from);
    }

    let mut required = Vec::new();
    for key in MODEL_REQUIRED {
        let field = match c.usize(sec, key) {
            Some(f) => {
                if c.at_least_one(sec, key, &f) {
                    Some(f)
                } else {
                    None
                }
            }
            None => {
                if !sec.has(key) {
                    c.missing(sec, key, "", "<integer>");
                }
                None
            }
        };
        required.push(field);
    }
    let [d_model, n_layers, n_heads, d_ff, max_seq]: [Option<Field<usize>>; 5] =
        required.try_into().ok()?;

    let builtin = if task.tokenizer.is_none() {
        builtin_vocab_size(task.kind)
    } else {
        None
    };
    let vocab_size = match c.usize(sec, "vocab_size") {
        Some(f) => {
            let mut ok = c.at_least_one(sec, "vocab_size", &f);
            if let (true, Some(b)) = (ok, builtin) {
                ok = c.check(
                    sec,
                    "vocab_size",
                    &f,
                    f.value >= b,
                    &format!(
                        "be at least {b}, the size of the built-in {} vocabulary",
                        task.kind.name()
                    ),
                );
            }
            ok.then_some(f.value)
        }
        None if sec.has("vocab_size") => None,
        None => match builtin {
            Some(b) => Some(b),
            None => {
                let why = if task.kind == TaskKind::Jsonl {
                    ": task kind \"jsonl\" has no built-in vocabulary"
                } else {
                    ": a custom `task.tokenizer` is used"
                };
                c.missing(sec, "vocab_size", why, "<tokenizer vocabulary size>");
                None
            }
        },
    };

    let n_kv_heads = match c.usize(sec, "n_kv_heads") {
        Some(f) => c.at_least_one(sec, "n_kv_heads", &f).then_some(f),
        None => n_heads.clone().map(|f| Field {
            value: f.value,
            span: None,
        }),
    };
    if let (Some(d), Some(h)) = (&d_model, &n_heads) {
        if d.value % h.value != 0 {
            let path = sec.key_path("n_heads");
            c.error(
                &path,
                h.span.clone(),
                format!(
                    "`{path}` ({}) must divide `model.d_model` ({})",
                    h.value, d.value
                ),
            );
        } else if (d.value / h.value) % 2 != 0 {
            let path = sec.key_path("n_heads");
            c.error_help(
                &path,
                h.span.clone(),
                format!(
                    "the head dimension d_model / n_heads = {} / {} = {} must be even",
                    d.value,
                    h.value,
                    d.value / h.value
                ),
                "RoPE rotates pairs of dimensions, so each head needs an even width".to_string(),
            );
        }
    }
    if let (Some(h), Some(kv)) = (&n_heads, &n_kv_heads) {
        if h.value % kv.value != 0 {
            let path = sec.key_path("n_kv_heads");
            c.error(
                &path,
                kv.span.clone(),
                format!(
                    "`{path}` ({}) must divide `model.n_heads` ({})",
                    kv.value, h.value
                ),
            );
        }
    }
    let rope_theta = c.float_or(sec, "rope_theta", 10000.0);
    c.check(
        sec,
        "rope_theta",
        &rope_theta,
        rope_theta.value > 0.0,
        "be positive",
    );
    let rms_eps = c.float_or(sec, "rms_eps", 1e-6);
    c.check(sec, "rms_eps", &rms_eps, rms_eps.value > 0.0, "be positive");
    let tie_embeddings = c.bool_or(sec, "tie_embeddings", true);
    let qkv_bias = c.bool_or(sec, "qkv_bias", false);

    Some(ModelSpec {
        head_dim: None,
        qk_norm: false,
        rope_scaling: None,
        from: None,
        lower: read_lower(c, sec),
        vocab_size: vocab_size?,
        d_model: d_model?.value,
        n_layers: n_layers?.value,
        n_heads: n_heads?.value,
        n_kv_heads: n_kv_heads?.value,
        d_ff: d_ff?.value,
        max_seq: max_seq?.value,
        rope_theta: rope_theta.value,
        rms_eps: rms_eps.value,
        tie_embeddings,
        qkv_bias,
    })
}

/// `[model]` with `from = "DIR"`: every shape from the folder's
/// `config.json`; a key given as well must agree with it.
fn read_model_from(c: &mut Checker, sec: &Section, from: Field<String>) -> Option<ModelSpec> {
    let path = sec.key_path("from");
    let dir = std::path::Path::new(&from.value);
    let config = match coopc_ir::hf::read_config(dir) {
        Ok(config) => config,
        Err(e) => {
            c.error(&path, from.span.clone(), format!("`{path}`: {e}"));
            return None;
        }
    };
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let config_path = absolute.join("config.json");
    // The folder's sizes are held to the bounds a pipeline's are.
    let sizes = [
        ("model.vocab_size", "vocab_size", Some(config.vocab_size)),
        ("model.d_model", "hidden_size", Some(config.d_model)),
        ("model.n_layers", "num_hidden_layers", Some(config.n_layers)),
        ("model.n_heads", "num_attention_heads", Some(config.n_heads)),
        (
            "model.n_kv_heads",
            "num_key_value_heads",
            Some(config.n_kv_heads),
        ),
        ("model.d_ff", "intermediate_size", Some(config.d_ff)),
        ("model.head_dim", "head_dim", config.head_dim),
    ];
    let mut too_large = false;
    for (key, hf_key, value) in sizes {
        if let (Some(value), Some(limit)) = (value, size_limit(key)) {
            if value > limit {
                c.error(
                    &path,
                    from.span.clone(),
                    format!(
                        "{}: {hf_key} = {value} is larger than coopc can compile and allocate \
                         (`{key}` is at most {limit})",
                        config_path.display()
                    ),
                );
                too_large = true;
            }
        }
    }
    if too_large {
        return None;
    }
    let mut ok = true;
    let mut agree = |c: &mut Checker,
                     key: &str,
                     hf_key: &str,
                     given: Option<(String, Option<Range<usize>>)>,
                     expected: String| {
        if let Some((value, span)) = given {
            if value != expected {
                let kp = sec.key_path(key);
                c.error_help(
                    &kp,
                    span,
                    format!(
                        "`{kp}` = {value} contradicts {}: {hf_key} = {expected}",
                        config_path.display()
                    ),
                    format!("remove `{kp}`: with `model.from` the shapes come from config.json"),
                );
                ok = false;
            }
        }
    };
    let int = |c: &mut Checker, key: &str| c.usize(sec, key).map(|f| (f.value.to_string(), f.span));
    let float =
        |c: &mut Checker, key: &str| c.float(sec, key).map(|f| (f.value.to_string(), f.span));
    let boolean = |c: &mut Checker, key: &str| {
        sec.get(key)
            .map(|(_, span)| (c.bool_or(sec, key, false).to_string(), span))
    };
    for (key, hf_key, value) in [
        ("vocab_size", "vocab_size", config.vocab_size),
        ("d_model", "hidden_size", config.d_model),
        ("n_layers", "num_hidden_layers", config.n_layers),
        ("n_heads", "num_attention_heads", config.n_heads),
        ("n_kv_heads", "num_key_value_heads", config.n_kv_heads),
        ("d_ff", "intermediate_size", config.d_ff),
    ] {
        let given = int(c, key);
        agree(c, key, hf_key, given, value.to_string());
    }
    for (key, hf_key, value) in [
        ("rope_theta", "rope_theta", config.rope_theta),
        ("rms_eps", "rms_norm_eps", config.rms_eps),
    ] {
        let given = float(c, key);
        agree(c, key, hf_key, given, value.to_string());
    }
    let given = boolean(c, "tie_embeddings");
    agree(
        c,
        "tie_embeddings",
        "tie_word_embeddings",
        given,
        config.tie_embeddings.to_string(),
    );
    let given = boolean(c, "qkv_bias");
    let bias_source = format!("architectures = [{:?}]", config.architecture.class_name());
    agree(
        c,
        "qkv_bias",
        &bias_source,
        given,
        config.qkv_bias.to_string(),
    );

    let max_seq = match c.usize(sec, "max_seq") {
        Some(f) => {
            let kp = sec.key_path("max_seq");
            if f.value > config.max_position_embeddings {
                c.error(
                    &kp,
                    f.span.clone(),
                    format!(
                        "`{kp}` = {} is longer than the model handles: {} has max_position_embeddings = {}",
                        f.value,
                        config_path.display(),
                        config.max_position_embeddings
                    ),
                );
                None
            } else if let Some(w) = config.sliding_window.filter(|&w| f.value > w) {
                c.error_help(
                    &kp,
                    f.span.clone(),
                    format!(
                        "`{kp}` = {} exceeds the sliding attention window ({w}) of {}",
                        f.value,
                        config_path.display()
                    ),
                    format!("coopc attends over the whole sequence: keep `{kp}` at most {w}"),
                );
                None
            } else {
                c.at_least_one(sec, "max_seq", &f).then_some(f.value)
            }
        }
        None => {
            if !sec.has("max_seq") {
                c.missing(
                    sec,
                    "max_seq",
                    ": the longest sequence (prompt + response) to train on",
                    "512",
                );
            }
            None
        }
    };
    if !ok {
        return None;
    }
    Some(ModelSpec {
        vocab_size: config.vocab_size,
        d_model: config.d_model,
        n_layers: config.n_layers,
        n_heads: config.n_heads,
        n_kv_heads: config.n_kv_heads,
        d_ff: config.d_ff,
        max_seq: max_seq?,
        rope_theta: config.rope_theta,
        rms_eps: config.rms_eps,
        tie_embeddings: config.tie_embeddings,
        qkv_bias: config.qkv_bias,
        head_dim: config.head_dim,
        qk_norm: config.qk_norm,
        rope_scaling: config.rope_scaling,
        from: Some(absolute.display().to_string()),
        lower: read_lower(c, sec),
    })
}

pub(super) fn read_lora(c: &mut Checker, sec: &Section, method: Method) -> LoraSpec {
    c.unknown_keys(sec, LORA_KEYS);
    let rank = c.usize_or(sec, "rank", DEFAULT_LORA_RANK);
    c.at_least_one(sec, "rank", &rank);
    // The default 2 * rank is checked through `rank`.
    let alpha = c.float_or(sec, "alpha", 2.0 * rank.value as f64);
    if alpha.span.is_some() {
        c.check(sec, "alpha", &alpha, alpha.value > 0.0, "be positive");
    }

    let targets = read_targets(c, sec, method.updates_adapter());
    LoraSpec {
        rank: rank.value,
        alpha: alpha.value,
        targets,
    }
}

/// A LoRA's `targets` (default: all seven projections); `non_empty`: an
/// empty list is an error.
fn read_targets(c: &mut Checker, sec: &Section, non_empty: bool) -> Vec<Projection> {
    let names: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
    match sec.get("targets") {
        None => Projection::ALL.to_vec(),
        Some((item, span)) => match item.as_array() {
            None => {
                c.wrong_type(sec, "targets", "an array of projection names");
                Projection::ALL.to_vec()
            }
            Some(array) => {
                let path = sec.key_path("targets");
                let mut targets = Vec::new();
                for value in array.iter() {
                    let vspan = value.span();
                    let Some(name) = value.as_str() else {
                        c.error(
                            &path,
                            vspan,
                            format!(
                                "`{path}` entries must be strings, found {}",
                                describe(&Item::Value(value.clone()))
                            ),
                        );
                        continue;
                    };
                    match Projection::from_name(name) {
                        Some(p) if targets.contains(&p) => c.error_help(
                            &path,
                            vspan,
                            format!("`{path}` names \"{name}\" twice"),
                            "remove the duplicate".to_string(),
                        ),
                        Some(p) => targets.push(p),
                        None => {
                            let message = format!(
                                "`{path}` entry {name:?} is not one of {}",
                                quoted_list(&names)
                            );
                            match closest(name, &names) {
                                Some(n) => c.error_help(
                                    &path,
                                    vspan,
                                    message,
                                    format!("did you mean \"{n}\"?"),
                                ),
                                None => c.error(&path, vspan, message),
                            }
                        }
                    }
                }
                if array.is_empty() && non_empty {
                    c.error_help(
                        &path,
                        span,
                        format!("`{path}` must name at least one projection"),
                        "the adapter is trained, so it needs targets".to_string(),
                    );
                }
                targets
            }
        },
    }
}

/// `model.lower`: `"full"` (the default: the lower level trains all of
/// θ) or `{ lora_rank = r, alpha = .., targets = [..] }`, a LoRA of θ.
fn read_lower(c: &mut Checker, sec: &Section) -> Option<LoraSpec> {
    let (item, span) = sec.get("lower")?;
    let path = sec.key_path("lower");
    if let Some(text) = item.as_str() {
        if text != "full" {
            c.error_help(
                &path,
                span,
                format!("`{path}` must be \"full\" or a table {{ lora_rank = r }}, found {text:?}"),
                "\"full\" trains all of θ at the lower level; { lora_rank = 16 } trains a LoRA of θ".into(),
            );
        }
        return None;
    }
    let t = c.table(sec, "lower");
    t.table?;
    c.unknown_keys(&t, LOWER_KEYS);
    let rank = match c.usize(&t, "lora_rank") {
        Some(f) => c.at_least_one(&t, "lora_rank", &f).then_some(f.value)?,
        None => {
            if !t.has("lora_rank") {
                c.missing(
                    &t,
                    "lora_rank",
                    ": the rank of the lower level's LoRA of θ",
                    "16",
                );
            }
            return None;
        }
    };
    let alpha = c.float_or(&t, "alpha", 2.0 * rank as f64);
    if alpha.span.is_some() {
        c.check(&t, "alpha", &alpha, alpha.value > 0.0, "be positive");
    }
    let targets = read_targets(c, &t, true);
    Some(LoraSpec {
        rank,
        alpha: alpha.value,
        targets,
    })
}

/// `[train]` plus what other sections need from it.
pub(super) struct Train {
    pub(super) spec: TrainSpec,
    pub(super) seq_len_span: Option<Range<usize>>,
    /// Whether `spec.seq_len` is a checked value other checks can rely on.
    pub(super) seq_len_known: bool,
}

pub(super) fn read_train(c: &mut Checker, sec: &Section, model: Option<&ModelSpec>) -> Train {
    c.unknown_keys(sec, TRAIN_KEYS);
    let steps = c.usize_or(sec, "steps", 100);
    c.at_least_one(sec, "steps", &steps);
    let seed = c.usize_or(sec, "seed", 0);
    let eval_every = c.usize_or(sec, "eval_every", 10);
    let max_seq = model.map(|m| m.max_seq);
    let seq_len = c.usize_or(sec, "seq_len", max_seq.unwrap_or(1));
    let mut seq_len_known = max_seq.is_some() && c.at_least_one(sec, "seq_len", &seq_len);
    if seq_len_known {
        if let Some(max_seq) = max_seq {
            seq_len_known = c.check(
                sec,
                "seq_len",
                &seq_len,
                seq_len.value <= max_seq,
                &format!("be at most `model.max_seq` ({max_seq})"),
            );
        }
    }
    let on_nonfinite = c.choice_or(sec, "on_nonfinite", ON_NONFINITE, OnNonFinite::Stop);
    let eval_samples = c.usize_or(sec, "eval_samples", 0);
    let eval_temperature = c.float_or(sec, "eval_temperature", 1.0);
    c.check(
        sec,
        "eval_temperature",
        &eval_temperature,
        eval_temperature.value > 0.0,
        "be > 0",
    );
    let max_in_row = c.usize_or(sec, "max_nonfinite_in_row", 3);
    c.at_least_one(sec, "max_nonfinite_in_row", &max_in_row);
    let micro_batches = c.usize_or(sec, "micro_batches", 1);
    c.at_least_one(sec, "micro_batches", &micro_batches);
    Train {
        spec: TrainSpec {
            steps: steps.value,
            seed: seed.value as u64,
            eval_every: eval_every.value,
            seq_len: seq_len.value,
            on_nonfinite: on_nonfinite.value,
            max_nonfinite_in_row: max_in_row.value,
            eval_samples: eval_samples.value,
            eval_temperature: eval_temperature.value,
            micro_batches: micro_batches.value,
        },
        seq_len_span: seq_len.span,
        seq_len_known,
    }
}

pub(super) fn read_rl(c: &mut Checker, sec: &Section, train: &Train) -> RlSpec {
    c.unknown_keys(sec, RL_KEYS);
    let advantage = c.choice_or(sec, "advantage", ADVANTAGES, Advantage::GroupStd);
    let group_size = c.usize_or(sec, "group_size", 8);
    if c.at_least_one(sec, "group_size", &group_size)
        && matches!(advantage.value, Advantage::GroupStd | Advantage::Rloo)
        && group_size.value < 2
    {
        let path = sec.key_path("group_size");
        c.error_help(
            &path,
            group_size.span.clone(),
            format!(
                "`{path}` must be at least 2 with advantage = \"{}\", found {}",
                if advantage.value == Advantage::Rloo {
                    "rloo"
                } else {
                    "group_std"
                },
                group_size.value
            ),
            if advantage.value == Advantage::Rloo {
                "a leave-one-out baseline needs two or more completions".to_string()
            } else {
                "a group's standard deviation needs two or more completions".to_string()
            },
        );
    }
    let prompts = c.usize_or(sec, "prompts_per_step", 16);
    c.at_least_one(sec, "prompts_per_step", &prompts);
    let clip_low = c.float_or(sec, "clip_low", 0.2);
    c.check(
        sec,
        "clip_low",
        &clip_low,
        (0.0..1.0).contains(&clip_low.value),
        "be in [0, 1)",
    );
    let clip_high = c.float_or(sec, "clip_high", 0.28);
    c.check(
        sec,
        "clip_high",
        &clip_high,
        clip_high.value >= 0.0,
        "be at least 0",
    );
    let kl_coef = c.float_or(sec, "kl_coef", 0.0);
    c.check(
        sec,
        "kl_coef",
        &kl_coef,
        kl_coef.value >= 0.0,
        "be at least 0",
    );
    let kl_estimator = c.choice_or(sec, "kl_estimator", KL_ESTIMATORS, KlEstimator::K3);
    let loss_agg = c.choice_or(sec, "loss_agg", LOSS_AGGS, LossAgg::TokenMean);
    let ratio_level = c.choice_or(sec, "ratio_level", RATIO_LEVELS, RatioLevel::Token);
    let loss = c.choice_or(sec, "loss", POLICY_LOSSES, PolicyLoss::PpoClip);
    let entropy_coef = c.float_or(sec, "entropy_coef", 0.0);
    c.check(
        sec,
        "entropy_coef",
        &entropy_coef,
        entropy_coef.value >= 0.0,
        "be at least 0",
    );
    // 32, but leave at least half of a short sequence to the prompt.
    let default_max_new = if train.seq_len_known {
        (train.spec.seq_len / 2).clamp(1, 32)
    } else {
        32
    };
    let max_new = c.usize_or(sec, "max_new_tokens", default_max_new);
    if c.at_least_one(sec, "max_new_tokens", &max_new)
        && train.seq_len_known
        && max_new.value >= train.spec.seq_len
    {
        let path = sec.key_path("max_new_tokens");
        let seq_len = train.spec.seq_len;
        let span = max_new.span.clone().or_else(|| train.seq_len_span.clone());
        c.error_help(
            &path,
            span,
            format!(
                "`{path}` ({}) must be less than `train.seq_len` ({seq_len})",
                max_new.value
            ),
            format!(
                "a rollout is prompt + completion within train.seq_len tokens; set `max_new_tokens` to at most {} in [rl]",
                seq_len.saturating_sub(1).max(1)
            ),
        );
    }
    let temperature = c.float_or(sec, "temperature", 1.0);
    c.check(
        sec,
        "temperature",
        &temperature,
        temperature.value > 0.0,
        "be positive",
    );
    let top_p = c.float_or(sec, "top_p", 1.0);
    c.check(
        sec,
        "top_p",
        &top_p,
        top_p.value > 0.0 && top_p.value <= 1.0,
        "be in (0, 1]",
    );
    let top_k = c.usize_or(sec, "top_k", 0);
    let epochs = c.usize_or(sec, "updates_per_batch", 1);
    c.at_least_one(sec, "updates_per_batch", &epochs);
    let minis = c.usize_or(sec, "mini_batches", 1);
    let rl_rows = group_size.value * prompts.value;
    let micro = train.spec.micro_batches.max(1);
    if c.at_least_one(sec, "mini_batches", &minis)
        && rl_rows > 0
        && !rl_rows.is_multiple_of(minis.value * micro)
    {
        let path = sec.key_path("mini_batches");
        let what = if micro > 1 {
            format!(
                "`{path}` × `train.micro_batches` ({} × {micro})",
                minis.value
            )
        } else {
            format!("`{path}` ({})", minis.value)
        };
        c.error_help(
            &path,
            minis.span.clone(),
            format!(
                "{what} must divide the rollouts per step, group_size × prompts_per_step = {rl_rows}"
            ),
            "each mini-batch (and each micro-batch of it) is an equal slice of the rollout batch's rows".to_string(),
        );
    }
    let max_rounds = c.usize_or(sec, "max_sampling_rounds", 4);
    c.at_least_one(sec, "max_sampling_rounds", &max_rounds);
    RlSpec {
        group_size: group_size.value,
        prompts_per_step: prompts.value,
        clip_low: clip_low.value,
        clip_high: clip_high.value,
        kl_coef: kl_coef.value,
        kl_estimator: kl_estimator.value,
        kl_in_reward: c.bool_or(sec, "kl_in_reward", false),
        advantage: advantage.value,
        loss_agg: loss_agg.value,
        ratio_level: ratio_level.value,
        loss: loss.value,
        entropy_coef: entropy_coef.value,
        updates_per_batch: epochs.value,
        mini_batches: minis.value,
        max_new_tokens: max_new.value,
        temperature: temperature.value,
        top_p: top_p.value,
        top_k: top_k.value,
        skip_no_signal: c.bool_or(sec, "skip_no_signal", true),
        mask_truncated: c.bool_or(sec, "mask_truncated", false),
        dynamic_sampling: c.bool_or(sec, "dynamic_sampling", false),
        max_sampling_rounds: max_rounds.value,
    }
}

/// `[sft]`; its batch is cut into `rl.mini_batches` slices (`mini_batches`).
pub(super) fn read_sft(
    c: &mut Checker,
    sec: &Section,
    train: &Train,
    mini_batches: usize,
) -> SftSpec {
    c.unknown_keys(sec, SFT_KEYS);
    let batch_size = c.usize_or(sec, "batch_size", 16);
    let micro = train.spec.micro_batches.max(1);
    if c.at_least_one(sec, "batch_size", &batch_size) && mini_batches * micro > 1 {
        c.check(
            sec,
            "batch_size",
            &batch_size,
            batch_size.value.is_multiple_of(mini_batches * micro),
            &format!(
                "be a multiple of `rl.mini_batches` × `train.micro_batches` ({mini_batches} × {micro}): each update, and each micro-batch of it, reads an equal slice"
            ),
        );
    }
    let steps = train.spec.steps;
    let cold = c.usize_or(sec, "cold_start_steps", steps / 2);
    c.check(
        sec,
        "cold_start_steps",
        &cold,
        cold.value <= steps,
        &format!("be at most `train.steps` ({steps})"),
    );
    SftSpec {
        batch_size: batch_size.value,
        cold_start_steps: cold.value,
    }
}

pub(super) fn read_lambda(c: &mut Checker, sec: &Section) -> Lambda {
    let Some((item, span)) = sec.get("lambda") else {
        return Lambda::Constant(0.5);
    };
    let unit = |c: &mut Checker, s: &Section, key: &str, f: &Field<f64>| {
        c.check(s, key, f, (0.0..=1.0).contains(&f.value), "be in [0, 1]")
    };
    if let Some(table) = item.as_table_like() {
        let lsec = Section {
            path: sec.key_path("lambda"),
            table: Some(table),
            span,
        };
        c.unknown_keys(&lsec, LAMBDA_KEYS);
        let mut ends = [0.5, 0.5];
        for (i, key) in LAMBDA_KEYS.iter().enumerate() {
            match c.float(&lsec, key) {
                Some(f) => {
                    unit(c, &lsec, key, &f);
                    ends[i] = f.value;
                }
                None if !lsec.has(key) => c.missing(&lsec, key, "", "<number in [0, 1]>"),
                None => {}
            }
        }
        return Lambda::Linear {
            start: ends[0],
            end: ends[1],
        };
    }
    match item.as_value() {
        Some(Value::Float(_) | Value::Integer(_)) => match c.float(sec, "lambda") {
            Some(f) => {
                unit(c, sec, "lambda", &f);
                Lambda::Constant(f.value)
            }
            None => Lambda::Constant(0.5),
        },
        _ => {
            c.wrong_type(
                sec,
                "lambda",
                "a number or a table { start = .., end = .. }",
            );
            Lambda::Constant(0.5)
        }
    }
}

pub(super) fn read_bilevel(c: &mut Checker, sec: &Section) -> BilevelSpec {
    c.unknown_keys(sec, BILEVEL_KEYS);
    let methods = Method::ALL.map(|m| (m.name(), m));
    let method = c.choice_or(sec, "method", &methods, Method::Bridge);
    let lambda = read_lambda(c, sec);
    let shadow = c.choice_or(sec, "shadow", SHADOWS, ShadowMode::Persistent);
    let hg = c.table(sec, "hypergradient");
    let hypergradient = read_hypergradient(c, &hg);
    BilevelSpec {
        method: method.value,
        lambda,
        shadow: shadow.value,
        hypergradient,
    }
}

pub(super) fn read_hypergradient(c: &mut Checker, sec: &Section) -> HypergradSpec {
    c.unknown_keys(sec, HYPERGRAD_KEYS);
    let kinds = HypergradKind::KINDS.map(|k| (k.name(), k));
    let kind = c.choice_or(sec, "kind", &kinds, HypergradKind::FirstOrder);
    let unroll = c.usize_or(sec, "unroll", 1);
    let unroll_ok = c.at_least_one(sec, "unroll", &unroll);
    let kind_name = kind.value.name();
    let backprop = match kind.value {
        HypergradKind::FirstOrder => {
            let b = c.usize_or(sec, "backprop", 0);
            let path = sec.key_path("backprop");
            if b.value != 0 {
                c.error_help(
                    &path,
                    b.span.clone(),
                    format!(
                        "`{path}` must be 0 or absent with kind = \"first_order\", found {}",
                        b.value
                    ),
                    "first_order differentiates through no lower step; use kind = \"truncated\" to backpropagate through T steps".to_string(),
                );
            }
            0
        }
        HypergradKind::Truncated | HypergradKind::FiniteDifference { .. } => {
            let b = c.usize_or(sec, "backprop", unroll.value);
            if unroll_ok {
                c.check(
                    sec,
                    "backprop",
                    &b,
                    b.value <= unroll.value,
                    &format!("be at most `{}` ({})", sec.key_path("unroll"), unroll.value),
                );
            }
            b.value
        }
    };
    let kind = match kind.value {
        HypergradKind::FiniteDifference { eps: default } => {
            let eps = c.float_or(sec, "eps", default);
            c.check(sec, "eps", &eps, eps.value > 0.0, "be positive");
            HypergradKind::FiniteDifference { eps: eps.value }
        }
        other => other,
    };
    if !matches!(kind, HypergradKind::FiniteDifference { .. }) && sec.has("eps") {
        c.not_applicable(
            sec,
            "eps",
            &format!("to kind = \"{kind_name}\""),
            "`eps` is the step of kind = \"finite_difference\"",
        );
    }
    HypergradSpec {
        kind,
        unroll: unroll.value,
        backprop,
    }
}

pub(super) fn read_optims(c: &mut Checker, sec: &Section) -> OptimSpecs {
    c.unknown_keys(sec, &["lower", "upper"]);
    let lower = c.table(sec, "lower");
    let upper = c.table(sec, "upper");
    OptimSpecs {
        lower: read_optim(c, &lower, 3e-4),
        upper: read_optim(c, &upper, 1e-3),
    }
}

pub(super) fn read_optim(c: &mut Checker, sec: &Section, default_lr: f64) -> OptimSpec {
    c.unknown_keys(sec, OPTIM_KEYS);
    let kind = c.choice_or(sec, "kind", OPTIMS, OptimChoice::AdamW);
    let lr = c.float_or(sec, "lr", default_lr);
    c.check(sec, "lr", &lr, lr.value > 0.0, "be positive");

    let (kind_name, own): (&str, &[&str]) = match kind.value {
        OptimChoice::Sgd => ("sgd", &[]),
        OptimChoice::Momentum => ("momentum", &["momentum"]),
        OptimChoice::AdamW => ("adamw", &["beta1", "beta2", "eps", "weight_decay"]),
    };
    for key in ["momentum", "beta1", "beta2", "eps", "weight_decay"] {
        if sec.has(key) && !own.contains(&key) {
            let owner = if key == "momentum" {
                "momentum"
            } else {
                "adamw"
            };
            c.not_applicable(
                sec,
                key,
                &format!("to kind = \"{kind_name}\""),
                &format!("`{key}` is a setting of kind = \"{owner}\""),
            );
        }
    }
    let unit = |c: &mut Checker, key: &str, default: f64| {
        let f = c.float_or(sec, key, default);
        c.check(sec, key, &f, (0.0..1.0).contains(&f.value), "be in [0, 1)");
        f.value
    };
    let kind = match kind.value {
        OptimChoice::Sgd => OptimKind::Sgd,
        OptimChoice::Momentum => OptimKind::Momentum {
            momentum: unit(c, "momentum", 0.9),
        },
        OptimChoice::AdamW => {
            let beta1 = unit(c, "beta1", 0.9);
            let beta2 = unit(c, "beta2", 0.999);
            let eps = c.float_or(sec, "eps", 1e-8);
            c.check(sec, "eps", &eps, eps.value > 0.0, "be positive");
            let wd = c.float_or(sec, "weight_decay", 0.0);
            c.check(sec, "weight_decay", &wd, wd.value >= 0.0, "be at least 0");
            OptimKind::AdamW {
                beta1,
                beta2,
                eps: eps.value,
                weight_decay: wd.value,
            }
        }
    };
    let schedule = LrSchedule {
        kind: c
            .choice_or(sec, "schedule", SCHEDULES, ScheduleKind::Constant)
            .value,
        warmup_steps: c.usize_or(sec, "warmup_steps", 0).value,
    };
    let max_grad_norm = c.float(sec, "max_grad_norm").and_then(|f| {
        c.check(sec, "max_grad_norm", &f, f.value > 0.0, "be positive")
            .then_some(f.value)
    });
    OptimSpec {
        kind,
        lr: lr.value,
        schedule,
        max_grad_norm,
    }
}

pub(super) fn read_backend(c: &mut Checker, sec: &Section) -> BackendSpec {
    c.unknown_keys(sec, BACKEND_KEYS);
    let backends = BackendKind::ALL.map(|b| (b.name(), b));
    let kind = c.choice_or(sec, "kind", &backends, BackendKind::Auto);
    let dtype = c.choice_or(sec, "dtype", DTYPES, Precision::F32);
    let matmul = c.choice_or(sec, "matmul", MATMULS, MatmulPrecision::F32);
    // TF32 rounds f32 operands: it means nothing for f64 and bf16 products.
    let tf32_misplaced = matmul.value == MatmulPrecision::Tf32 && dtype.value != Precision::F32;
    c.check(
        sec,
        "matmul",
        &matmul,
        !tf32_misplaced,
        &format!(
            "be \"f32\" when `backend.dtype` is \"{}\" (TF32 rounds f32 operands; {})",
            dtype.value.name(),
            if dtype.value == Precision::F64 {
                "f64 products stay f64"
            } else {
                "bf16 products already take bf16 operands"
            }
        ),
    );
    let memory_budget = c.float(sec, "memory_budget_gib").and_then(|gib| {
        let ok = gib.value > 0.0 && gib.value < 1e9;
        c.check(
            sec,
            "memory_budget_gib",
            &gib,
            ok,
            "be a positive number of GiB",
        )
        .then_some((gib.value * (1u64 << 30) as f64) as u64)
    });
    BackendSpec {
        kind: kind.value,
        dtype: dtype.value,
        matmul: matmul.value,
        memory_budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each choice table spells its values as the enum's `name()` does
    /// (which inspect, the IR printer and run folders write), so that what
    /// coopc prints reads back.
    #[test]
    fn choice_tables_spell_the_names_the_enums_print() {
        fn same<T: Copy>(table: &[(&str, T)], name: fn(T) -> &'static str) {
            for &(s, v) in table {
                assert_eq!(name(v), s);
            }
        }
        same(TASK_KINDS, TaskKind::name);
        same(DATA_FORMATS, DataFormat::name);
        same(SFT_FLAWS, SftFlaw::name);
        same(ADVANTAGES, Advantage::name);
        same(LOSS_AGGS, LossAgg::name);
        same(RATIO_LEVELS, RatioLevel::name);
        same(POLICY_LOSSES, PolicyLoss::name);
        same(KL_ESTIMATORS, KlEstimator::name);
        same(SCHEDULES, ScheduleKind::name);
        same(DTYPES, Precision::name);
    }
}
