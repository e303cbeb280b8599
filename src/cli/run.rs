//! `coopc run` (train), `coopc eval` (held-out accuracy of a run's latest
//! checkpoint): the command-line side of the training loop.

use crate::cli::{Failure, UserError};
use coopc_compiler::compile;
use coopc_compiler::plan::Plan;
use coopc_compiler::spec::{BackendKind, Method, PipelineSpec, Precision};
use coopc_train::{Metrics, RunOptions, Trainer};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Command-line overrides of pipeline keys.
pub struct Overrides {
    pub method: Option<Method>,
    pub steps: Option<usize>,
    pub seed: Option<u64>,
    pub backend: Option<BackendKind>,
    /// `--model DIR`: replaces model.from.
    pub model: Option<PathBuf>,
}

const SPEC_FILE: &str = "spec.json";

impl Overrides {
    /// The specification with these overrides.
    fn apply(&self, spec: &mut PipelineSpec) {
        if let Some(m) = self.method {
            spec.bilevel.method = m;
        }
        if let Some(s) = self.steps {
            // A cold-start switch at the default half-way point stays half-way.
            if spec.sft.cold_start_steps == spec.train.steps / 2 {
                spec.sft.cold_start_steps = s / 2;
            }
            spec.train.steps = s;
        }
        if let Some(s) = self.seed {
            spec.train.seed = s;
        }
        if let Some(b) = self.backend {
            spec.backend.kind = b;
        }
    }
}

/// The specification a run folder's `spec.json` records.
pub(crate) fn read_spec(dir: &Path) -> Result<PipelineSpec, UserError> {
    let path = dir.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        UserError(format!(
            "{}: {e} (is {} a coopc run folder?)",
            path.display(),
            dir.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| {
        UserError(format!(
            "{}: not a valid run specification: {e}",
            path.display()
        ))
    })
}

fn one_line(m: &Metrics) -> String {
    let f = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.3}"));
    format!(
        "reward {} · acc {} · sft {:.3} · rl {} · entropy {} · eval {}",
        f(m.reward_mean),
        f(m.accuracy),
        m.sft_loss,
        f(m.rl_loss),
        f(m.entropy),
        f(m.eval_accuracy)
    )
}

/// How `run` behaves beyond the pipeline.
pub struct RunFlags {
    pub eval_limit: usize,
    pub quiet: bool,
    pub stop_after: Option<usize>,
    /// Accept safe changes of the specification on resume.
    pub force: bool,
}

/// Keys a resumed run may change with `--force`: where and how long it
/// runs, not what a meta-step computes.
const SAFE_ON_RESUME: &[&str] = &[
    "train.steps",
    "train.eval_every",
    "train.on_nonfinite",
    "train.max_nonfinite_in_row",
    "backend.kind",
];

/// The leaves of a JSON value by dotted path (arrays are leaves).
fn leaves(
    v: &serde_json::Value,
    prefix: &str,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &path, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The keys whose values differ between two specifications, as
/// `key: old → new` (a key only one side has shows `–` on the other).
pub(crate) fn changed_keys(old: &PipelineSpec, new: &PipelineSpec) -> Vec<(String, String)> {
    let as_leaves = |s: &PipelineSpec| {
        let mut out = std::collections::BTreeMap::new();
        leaves(
            &serde_json::to_value(s).expect("a spec is JSON"),
            "",
            &mut out,
        );
        out
    };
    let (a, b) = (as_leaves(old), as_leaves(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "–".into())
            };
            (k.clone(), format!("{k}: {} → {}", show(&a), show(&b)))
        })
        .collect()
}

/// Refuses to resume the run in `dir` with `spec` where it differs from
/// what the latest checkpoint was trained under (`baseline`, with the same
/// command-line overrides applied), unless `force` and every change is in
/// [`SAFE_ON_RESUME`].
fn check_resume(
    dir: &Path,
    baseline: &PipelineSpec,
    spec: &PipelineSpec,
    force: bool,
) -> Result<(), UserError> {
    let changed = changed_keys(baseline, spec);
    if changed.is_empty() {
        return Ok(());
    }
    let unsafe_keys: Vec<&(String, String)> = changed
        .iter()
        .filter(|(k, _)| !SAFE_ON_RESUME.contains(&k.as_str()))
        .collect();
    if force && unsafe_keys.is_empty() {
        return Ok(());
    }
    let list = |keys: &[&(String, String)]| {
        keys.iter()
            .map(|(_, line)| format!("\n  {line}"))
            .collect::<String>()
    };
    let all: Vec<&(String, String)> = changed.iter().collect();
    let step_dir = coopc_train::checkpoint::latest_dir(dir)
        .unwrap_or_else(|_| coopc_train::checkpoint::checkpoints_dir(dir).join("step-N"));
    let restart = format!(
        "to train on from these weights under the new settings, start a new run with \
         `--model {}` (the latest checkpoint folder; its optimiser state is not carried over)",
        step_dir.display()
    );
    Err(UserError(if unsafe_keys.is_empty() {
        format!(
            "{}: the specification changed since the latest checkpoint:{}\n\
             these change only how long or where the run goes: resume with --force to accept them",
            dir.display(),
            list(&all)
        )
    } else {
        format!(
            "{}: the specification changed since the latest checkpoint:{}\n\
             {} what a meta-step computes, so resuming would not continue this run \
             (--force accepts only {}); {restart}",
            dir.display(),
            list(&all),
            if unsafe_keys.len() == 1 {
                format!("`{}` changes", unsafe_keys[0].0)
            } else {
                format!(
                    "{} change",
                    unsafe_keys
                        .iter()
                        .map(|(k, _)| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            SAFE_ON_RESUME.join(", ")
        )
    }))
}

pub fn run(
    pipeline: Option<&Path>,
    resume: Option<&Path>,
    out: Option<&Path>,
    ov: Overrides,
    flags: RunFlags,
) -> Result<(), Failure> {
    let RunFlags {
        eval_limit,
        quiet,
        stop_after,
        force,
    } = flags;
    let t0 = Instant::now();
    let (mut spec, plan) = match (pipeline, resume) {
        (None, Some(dir)) => (read_spec(dir)?, None),
        (Some(p), Some(_)) if p.extension().is_some_and(|e| e == "plan") => {
            (Plan::load(p).map_err(UserError::from)?.spec, None)
        }
        (Some(p), Some(_)) => {
            let (_, spec) =
                coopc_compiler::frontend::load_pipeline(p).map_err(|e| UserError(e.render()))?;
            (spec, None)
        }
        (Some(p), None) if p.extension().is_some_and(|e| e == "plan") => {
            let plan = Plan::load(p).map_err(UserError::from)?;
            (plan.spec.clone(), Some(plan))
        }
        (Some(p), None) => {
            let options = coopc_compiler::frontend::Options {
                model_from: ov.model.as_ref().map(|m| m.display().to_string()),
            };
            let (_, spec) = coopc_compiler::frontend::load_pipeline_with(p, &options)
                .map_err(|e| UserError(e.render()))?;
            (spec, None)
        }
        (None, None) => {
            return Err(UserError("give a pipeline (.toml or .plan) or --resume DIR".into()).into())
        }
    };
    if resume.is_some() && (ov.method.is_some() || ov.seed.is_some() || ov.model.is_some()) {
        return Err(UserError(
            "--resume continues a run as it was started; --method, --seed and --model cannot change"
                .into(),
        )
        .into());
    }
    if ov.model.is_some() && plan.is_some() {
        return Err(UserError(
            "--model applies to a pipeline.toml; a .plan was compiled with its model (recompile with `coopc compile --model DIR`)".into(),
        )
        .into());
    }
    let before = spec.clone();
    ov.apply(&mut spec);
    if let Some(dir) = resume {
        // What the checkpoint was trained under (older layouts did not
        // record it: then what the run folder says).
        let mut baseline = match coopc_train::checkpoint::latest_spec(dir) {
            Ok(Some(s)) => s,
            Ok(None) => read_spec(dir)?,
            Err(e) => return Err(UserError(e.to_string()).into()),
        };
        ov.apply(&mut baseline);
        check_resume(dir, &baseline, &spec, force)?;
    }
    let backend = crate::cli::backend::open(spec.backend.kind, &spec.backend)?;
    // A plan is used as compiled unless an override changed what it
    // computes; the overrides that do not (steps, seed, backend) take effect
    // through its spec.
    // Under an MPI launcher each process compiles the plan of its share.
    let world = coopc_runtime::collective::current();
    let plan = match plan {
        Some(mut p) if spec.bilevel == before.bilevel && p.world == world.world() => {
            p.spec = spec.clone();
            p
        }
        _ => coopc_compiler::compile_for_world(spec.clone(), world.world())
            .map_err(|e| UserError(format!("{} processes: {e}", world.world())))?,
    };
    // Only rank 0 reports; the others work quietly.
    let quiet = quiet || world.rank() > 0;
    let dir: PathBuf = match (resume, out) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(o)) => o.to_path_buf(),
        (None, None) => {
            let stem = pipeline
                .and_then(|p| p.file_stem())
                .map_or("run".into(), |s| s.to_string_lossy().to_string());
            PathBuf::from("runs").join(format!(
                "{stem}-{}-s{}",
                spec.bilevel.method.name(),
                spec.train.seed
            ))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| UserError(format!("{}: {e}", dir.display())))?;
    if world.rank() == 0 {
        let spec_json =
            serde_json::to_string_pretty(&spec).map_err(|e| UserError(e.to_string()))?;
        coopc_compiler::ir::file::write_atomically(&dir.join(SPEC_FILE), spec_json.as_bytes())
            .map_err(|e| UserError(format!("{}: {e}", dir.join(SPEC_FILE).display())))?;
    }
    let total = spec.train.steps;
    let opts = RunOptions {
        out_dir: dir.clone(),
        resume: resume.is_some(),
        progress: !quiet,
        eval_limit,
        stop_after,
    };
    // Errors before the first meta-step are the input's (a checkpoint to
    // resume from, the data, the model folder).
    let mut trainer = Trainer::new(plan, opts)
        .map_err(UserError::from)?
        .with_backend(backend);
    let start = trainer.step();
    if !quiet {
        eprintln!(
            "coopc run: {} on {} · {} meta-steps (from {start}) · backend {}{} · out {}",
            spec.bilevel.method.name(),
            spec.task.kind.name(),
            total,
            trainer.backend_name(),
            match spec.backend.dtype {
                Precision::F32 => "",
                Precision::F64 => " (f64)",
                Precision::Bf16 => " (bf16, f32 master weights)",
            },
            dir.display()
        );
        if world.world() > 1 {
            eprintln!(
                "coopc run: data parallel over {} processes ({}{}), each with 1/{} of every batch",
                world.world(),
                world.name(),
                if crate::cli::backend::sums_on_device() {
                    "; the device's sums through NCCL"
                } else {
                    ""
                },
                world.world()
            );
        }
    }
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b.set_position(start as u64);
        b
    };
    let mut last_eval = None;
    coopc_train::interrupt::clear();
    #[cfg(unix)]
    stop_on_signals();
    let metrics = trainer.run(|m| {
        if m.eval_accuracy.is_some() {
            last_eval = m.eval_accuracy;
        }
        bar.set_message(one_line(m));
        bar.inc(1);
    })?;
    bar.finish();
    if world.rank() > 0 {
        return Ok(());
    }
    let last = metrics.last();
    println!(
        "{} {} steps in {:.1?}: held-out accuracy {} · metrics {} · checkpoint {}",
        spec.bilevel.method.name(),
        metrics.len(),
        t0.elapsed(),
        last_eval.map_or("–".to_string(), |a| format!("{:.1}%", 100.0 * a)),
        dir.join("metrics.jsonl").display(),
        coopc_train::checkpoint::checkpoints_dir(&dir).display()
    );
    if let Some(m) = last {
        println!("last step: {}", one_line(m));
    }
    Ok(())
}

/// SIGINT and SIGTERM ask the training loop to stop after the current
/// meta-step with a checkpoint; the handler then gives the signal its
/// default action back, so a second one ends the process at once (the
/// last checkpoint is intact either way: checkpoints are written whole
/// before they become current).
#[cfg(unix)]
fn stop_on_signals() {
    extern "C" fn on_signal(signal: libc::c_int) {
        coopc_train::interrupt::request(signal);
        let msg: &[u8] = b"\ncoopc: stopping after this meta-step and writing a checkpoint (again to stop at once)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is static.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
        // handler only stores to an atomic and calls write(2).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Sampled answers per held-out problem and their temperature (`--samples`,
/// `--temperature`); 0 samples none.
pub type Sampled = (usize, f64);

pub fn eval(dir: &Path, eval_limit: usize, show: usize, sampled: Sampled) -> Result<(), UserError> {
    let spec = read_spec(dir)?;
    evaluate(
        spec,
        dir,
        true,
        (eval_limit, show, sampled),
        &dir.display().to_string(),
    )
}

/// `coopc eval --model DIR --task PIPELINE`: the model folder as it is
/// (LoRA at its PEFT initialisation, which adds nothing) on the
/// pipeline's held-out problems.
pub fn eval_model(
    model: &Path,
    pipeline: &Path,
    eval_limit: usize,
    show: usize,
    sampled: Sampled,
) -> Result<(), UserError> {
    let options = coopc_compiler::frontend::Options {
        model_from: Some(model.display().to_string()),
    };
    let (_, spec) = coopc_compiler::frontend::load_pipeline_with(pipeline, &options)
        .map_err(|e| UserError(e.render()))?;
    if spec.task.kind == coopc_compiler::spec::TaskKind::Jsonl && spec.task.eval_file.is_none() {
        return Err(UserError(format!(
            "{}: task.eval_file is not set; there are no held-out problems to evaluate on",
            pipeline.display()
        )));
    }
    evaluate(
        spec,
        Path::new("."),
        false,
        (eval_limit, show, sampled),
        &model.display().to_string(),
    )
}

fn evaluate(
    spec: PipelineSpec,
    dir: &Path,
    resume: bool,
    (eval_limit, show, (samples, temperature)): (usize, usize, Sampled),
    what: &str,
) -> Result<(), UserError> {
    let plan = compile(spec.clone());
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        resume,
        progress: false,
        eval_limit,
        stop_after: None,
    };
    // Evaluated where the run trained (`auto`/`cpu` runs on the CPU here too).
    let backend = crate::cli::backend::open(spec.backend.kind, &spec.backend)?;
    let trainer = Trainer::new(plan, opts)?.with_backend(backend);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let acc = trainer.evaluate_with(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if show > 0 {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let task = trainer.task();
        let train: Vec<_> = (0..show).map(|_| task.rl_problem(&mut rng)).collect();
        for (title, problems) in [
            ("held-out", task.eval_set()),
            ("training (RL) distribution", train),
        ] {
            println!("{title} problems:");
            for a in trainer.answer(&problems[..problems.len().min(show)])? {
                println!(
                    "  {} {}{}   (reference {})",
                    if a.correct { "✓" } else { "✗" },
                    a.prompt,
                    a.response,
                    a.reference
                );
            }
        }
    }
    println!(
        "{what}: step {} · held-out accuracy {:.1}% ({} problems)",
        trainer.step(),
        100.0 * acc,
        trainer.task().eval_set().len().min(eval_limit)
    );
    if samples > 0 {
        let s = trainer.sampled_accuracy(samples, temperature)?;
        println!(
            "{samples} samples per problem at temperature {temperature}: pass@1 {:.1}% · pass@{samples} {:.1}% · maj@{samples} {:.1}%",
            100.0 * s.pass_at_1,
            100.0 * s.pass_at_n,
            100.0 * s.maj_at_n
        );
    }
    Ok(())
}
