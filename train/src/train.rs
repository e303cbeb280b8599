//! The training loop: per meta-step, SFT demonstrations and RL rollouts
//! (sampled from the current policy, scored by the task's verifier) become
//! the K step batches of the plan's meta-step, which runs on the chosen
//! backend; metrics go to `metrics.jsonl`, evaluations on the held-out set
//! happen every `train.eval_every` steps, and checkpoints are written so that
//! `--resume` continues bit-exactly.

use crate::checkpoint::{self, CheckpointError, TrainState};
use crate::init::{initial_state, pretrained_or_init};
use crate::sampler::{Generation, SampleError, Sampler, SamplingConfig};
use crate::tasks::{build_task, check_vocab, Problem, Task, TaskError};
use crate::tensorboard::{self, EventWriter};
use coopc_ir::plan::{BatchField, Metric, Plan, Role, Signature, LAMBDA, TOKEN_IDS};
use coopc_ir::spec::{Advantage, KlEstimator, Method, OnNonFinite, PipelineSpec};
use coopc_ir::DType;
use coopc_runtime::collective::{self, shard_rows, Collective};
use coopc_runtime::{Backend, CollectiveError, CpuBackend, ExecError, HostTensor, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("sampling: {0}")]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Io(String),
    #[error("data parallel: {0}")]
    Collective(#[from] CollectiveError),
    #[error(
        "meta-step {step}: {what} is {value}; stopping ({checkpoint}) — \
         lower optim.lower.lr / optim.upper.lr or check the data"
    )]
    NonFinite {
        step: usize,
        what: String,
        value: f64,
        checkpoint: String,
    },
    #[error("meta-step {step}: {source}; stopping ({kept})")]
    StepFailed {
        step: usize,
        source: ExecError,
        kept: String,
    },
    #[error("meta-step {step}: the checkpoint was not written: {source}; stopping ({kept})")]
    CheckpointWrite {
        step: usize,
        source: CheckpointError,
        kept: String,
    },
    #[error(
        "interrupted by {} after meta-step {step}: checkpoint written to {} \
         (continue with `coopc run --resume {}`)",
        crate::interrupt::signal_name(*signal),
        checkpoint.display(),
        out_dir.display()
    )]
    Interrupted {
        signal: i32,
        step: usize,
        checkpoint: PathBuf,
        out_dir: PathBuf,
    },
}

/// How to run.
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// Continue from the latest checkpoint in `out_dir`.
    pub resume: bool,
    /// Draw an indicatif progress bar on stderr.
    pub progress: bool,
    /// At most this many held-out problems per evaluation.
    pub eval_limit: usize,
    /// Stop (with a checkpoint) once this many meta-steps are done, as if
    /// interrupted; `--resume` continues to `train.steps`.
    pub stop_after: Option<usize>,
}

/// Held-out accuracy of `n` sampled answers per problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampledAccuracy {
    pub n: usize,
    /// Mean fraction of the samples that are correct.
    pub pass_at_1: f64,
    /// Fraction of problems with at least one correct sample.
    pub pass_at_n: f64,
    /// Fraction of problems whose most frequent answer is correct.
    pub maj_at_n: f64,
}

/// Several answers to one problem, judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vote {
    /// Answers that are correct.
    pub correct: usize,
    pub any_correct: bool,
    /// Whether the most frequent readable answer ([`Task::answer_of`],
    /// compared by [`Task::same_answer`]; ties go to the one seen first)
    /// is correct; false when none is readable.
    pub majority_correct: bool,
}

/// Judges `responses` to `problem`: how many are correct and whether
/// their majority answer is.
pub fn vote(task: &dyn Task, problem: &Problem, responses: &[String]) -> Vote {
    let right: Vec<bool> = responses
        .iter()
        .map(|t| task.is_correct(problem, t))
        .collect();
    let votes: Vec<(String, bool)> = responses
        .iter()
        .zip(&right)
        .filter_map(|(t, &c)| task.answer_of(problem, t).map(|a| (a, c)))
        .collect();
    let mut best: Option<(usize, bool)> = None;
    for (a, c) in &votes {
        let k = votes.iter().filter(|(b, _)| task.same_answer(a, b)).count();
        if best.is_none_or(|(most, _)| k > most) {
            best = Some((k, *c));
        }
    }
    Vote {
        correct: right.iter().filter(|&&c| c).count(),
        any_correct: right.iter().any(|&c| c),
        majority_correct: best.is_some_and(|(_, c)| c),
    }
}

/// A greedy answer to one problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub prompt: String,
    pub reference: String,
    pub response: String,
    pub correct: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    pub step: usize,
    pub method: String,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub lambda: f64,
    /// Mean reward of the step's rollouts (null on steps without rollouts).
    pub reward_mean: Option<f64>,
    /// Fraction of rollouts the verifier accepted.
    pub accuracy: Option<f64>,
    /// The SFT loss at the first lower step; NaN (written as `null`) when
    /// the program has none.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub sft_loss: f64,
    pub rl_loss: Option<f64>,
    /// Mean k3 estimate of KL(π_θ ‖ π_ref) over response tokens (kl_coef > 0).
    pub kl: Option<f64>,
    /// Mean entropy of the sampling policy's next-token distribution over
    /// the rollouts' response tokens (steps with rollouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    /// L_RL(θ̂_K) − L_RL(θ_K) (BRIDGE).
    pub coop_gain: Option<f64>,
    pub response_len: Option<f64>,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub step_time_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub wall_time_s: f64,
    pub eval_accuracy: Option<f64>,
    /// Bytes the meta-step (rollouts, scoring, the step program) copied
    /// host → device and device → host, on a device backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_to_device: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_from_device: Option<u64>,
    /// The plan's arithmetic count (`coopc compile --emit schedule`'s
    /// GFLOP) of every program training ran up to and including this step:
    /// meta-steps, rollouts' decode steps and merges, log-prob scoring; not
    /// evaluation. A count of the compiled graphs, not a measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops: Option<f64>,
    /// The step's objective had no signal (`rl.skip_no_signal`): nothing
    /// was updated, and the SFT loss was not computed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_signal: bool,
    /// The lower optimiser's learning rate at this step (its schedule's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The first lower step's gradient norm and the hypergradient's norm,
    /// before clipping (where that level clips: `max_grad_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_lower: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_upper: Option<f64>,
    /// The step's loss, gradient norm or new state was not finite and
    /// `train.on_nonfinite = "skip_step"` discarded its update.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped_nonfinite: bool,
    /// Fraction of the step's completions that did not stop (hit
    /// `max_new_tokens` or the sequence's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<f64>,
    /// With `rl.dynamic_sampling`: batches sampled and groups dropped
    /// (all rewards equal) over the step's lower steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rounds: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_groups: Option<usize>,
    /// With `train.eval_samples = k`, on evaluation steps: of k samples
    /// per held-out problem at `train.eval_temperature`, the mean fraction
    /// correct, whether any is (pass@k) and whether the majority answer is
    /// (maj@k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_pass_at_1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_pass_at_k: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_maj_at_k: Option<f64>,
}

fn nan() -> f64 {
    f64::NAN
}

/// JSON has no NaN: serde_json writes a non-finite f64 as `null`, and this
/// reads `null` back as NaN, so that every row the trainer writes reads
/// back (`--resume`, `coopc compare`).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Metrics {
    /// The fields that must agree between a resumed and an uninterrupted run
    /// (not timings, and not transfers: a resumed run uploads its state
    /// again).
    pub fn without_timing(&self) -> Metrics {
        Metrics {
            step_time_s: 0.0,
            wall_time_s: 0.0,
            bytes_to_device: None,
            bytes_from_device: None,
            ..self.clone()
        }
    }
}

/// The per-step random stream: a pure function of (seed, step, purpose), so
/// a resumed run draws exactly what the uninterrupted one did.
fn step_rng(seed: u64, step: usize, purpose: u64) -> StdRng {
    let mut z = seed
        ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Token sequences packed into [rows, T] ids and a response mask.
struct Packed {
    ids: Vec<i32>,
    mask: Vec<f64>,
}

/// A sequence row: its tokens, where the response starts, and how many
/// response tokens carry a loss.
pub type Row = (Vec<i32>, usize, usize);

/// A group of G rollouts of one prompt: rows (and whether each
/// completion stopped) and rewards.
type Group = (Vec<(Row, bool)>, Vec<f64>);

/// `rl.mask_truncated` (DAPO's overlong filtering) on a batch's rows:
/// a completion that did not stop carries no loss (its loss length
/// becomes 0). Where no completion of the batch stopped, the rows keep
/// their tokens and lose their advantage instead — a loss over no token
/// at all is 0/0 — so they give no policy-gradient signal either.
pub fn mask_truncated(rows: &mut [Row], adv: &mut [f64], stopped: &[bool]) {
    let any_kept = rows.iter().zip(stopped).any(|(r, &s)| s && r.2 > 0);
    for ((row, a), &s) in rows.iter_mut().zip(adv.iter_mut()).zip(stopped) {
        if s {
            continue;
        }
        if any_kept {
            row.2 = 0;
        } else {
            *a = 0.0;
        }
    }
}

/// `rl.kl_in_reward`: each completion's reward less `β Σ_t KL_t` over its
/// response tokens (`mask [B, T]` > 0), with the `estimator`'s per-token
/// estimate of KL(π_old ‖ π_ref) from the sampling policy's log-probs
/// `old` and the reference's `reference` (both `[B, T]`).
pub fn kl_penalty(
    rewards: &mut [f64],
    old: &[f64],
    reference: &[f64],
    mask: &[f64],
    beta: f64,
    estimator: KlEstimator,
) {
    let t = mask.len() / rewards.len().max(1);
    for (b, r) in rewards.iter_mut().enumerate() {
        let kl: f64 = (b * t..(b + 1) * t)
            .filter(|&i| mask[i] > 0.0)
            .map(|i| mask[i] * estimator.of(reference[i] - old[i]))
            .sum();
        *r -= beta * kl;
    }
}

/// Packs (full sequence, response start, response length) rows, padding with `pad`.
fn pack(rows: &[Row], t: usize, pad: i32) -> Packed {
    let mut ids = vec![pad; rows.len() * t];
    let mut mask = vec![0.0; rows.len() * t];
    for (r, (seq, start, len)) in rows.iter().enumerate() {
        for (j, &tok) in seq.iter().take(t).enumerate() {
            ids[r * t + j] = tok;
        }
        for j in *start..(*start + *len).min(t) {
            mask[r * t + j] = 1.0;
        }
    }
    Packed { ids, mask }
}

/// Advantages of `rewards`, groups of `g` consecutive rollouts
/// (`rl.advantage`). Standard deviations are the population's (divided by
/// the count).
pub fn advantages(rewards: &[f64], g: usize, kind: Advantage) -> Vec<f64> {
    let std = |xs: &[f64]| {
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        (xs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt()
    };
    let batch_std = std(rewards);
    let mut out = vec![0.0; rewards.len()];
    for (grp, o) in rewards.chunks(g).zip(out.chunks_mut(g)) {
        let n = grp.len() as f64;
        let mean = grp.iter().sum::<f64>() / n;
        let group_std = std(grp);
        for (a, r) in o.iter_mut().zip(grp) {
            *a = match kind {
                Advantage::GroupStd => (r - mean) / (group_std + 1e-6),
                Advantage::GroupMean => r - mean,
                Advantage::BatchStd => (r - mean) / (batch_std + 1e-6),
                // r − (Σ r − r) / (n − 1) = n / (n − 1) · (r − mean).
                Advantage::Rloo if n > 1.0 => n / (n - 1.0) * (r - mean),
                Advantage::Rloo => 0.0,
            };
        }
    }
    out
}

pub struct Trainer {
    spec: PipelineSpec,
    /// The compiled programs and their interfaces.
    plan: Plan,
    task: Box<dyn Task>,
    sampler: Sampler,
    dt: DType,
    /// Meta-steps done.
    step: usize,
    /// θ, w, shadow and optimiser state by meta-step input name, where the
    /// backend keeps them (resident on a device backend after the first
    /// meta-step; read back only for checkpoints).
    values: BTreeMap<String, Value>,
    /// π_ref's parameters (the initial θ, w) when kl_coef > 0.
    reference: Option<HashMap<String, Value>>,
    opts: RunOptions,
    /// Where the programs run.
    backend: Arc<dyn Backend>,
    /// Plan FLOPs of one meta-step and of one log-prob scoring call.
    meta_flops: u64,
    score_flops: u64,
    /// Log-prob scoring calls and meta-step programs run so far.
    scores_run: std::sync::atomic::AtomicU64,
    metas_run: u64,
    /// Meta-steps skipped in a row for a non-finite value (`skip_step`).
    nonfinite_in_row: usize,
    /// The processes of a data-parallel run (a single process by default):
    /// each samples and trains on its share of every batch; rank 0 writes.
    comm: Arc<dyn Collective>,
}

impl Trainer {
    /// A trainer of a compiled plan: its meta-step, scorer and decode step
    /// are what runs; its spec says what data to feed.
    pub fn new(plan: Plan, opts: RunOptions) -> Result<Trainer, TrainError> {
        let spec = plan.spec.clone();
        let dt = spec.backend.dtype.dtype();
        let task = build_task(&spec.task, spec.train.seq_len)?;
        check_vocab(task.as_ref(), spec.model.vocab_size)?;
        if let Some(need) = task.max_response_tokens() {
            if spec.rl.max_new_tokens < need {
                return Err(TrainError::Io(format!(
                    "rl.max_new_tokens = {} cuts responses short: the {} task needs up to {need} tokens",
                    spec.rl.max_new_tokens,
                    spec.task.kind.name()
                )));
            }
        }
        let comm = collective::current();
        if plan.world != comm.world() {
            return Err(TrainError::Io(format!(
                "the plan was compiled for {} process(es), and this run has {}: compile it for the run's processes (`coopc run` does so itself)",
                plan.world,
                comm.world()
            )));
        }
        if (comm.world() > 1 || spec.train.micro_batches > 1) && spec.rl.dynamic_sampling {
            return Err(TrainError::Io(
                "rl.dynamic_sampling is not supported on more than one process or with train.micro_batches > 1 yet: run it on one process without micro-batches, or set it to false".into(),
            ));
        }
        let sampler = Sampler::from_plan(&plan)?;
        let initial = Self::initial_state(&spec, &plan.meta_step().signature)?;
        let initial_values = initial
            .tensors
            .into_iter()
            .map(|(n, t)| (n, Value::host(t)))
            .collect();
        let reference =
            (spec.rl.kl_coef > 0.0).then(|| Self::policy_params(&plan, &initial_values));
        let (step, values) = if opts.resume {
            let s = checkpoint::load_latest(&opts.out_dir)?;
            let values = s
                .tensors
                .into_iter()
                .map(|(n, t)| (n, Value::host(t)))
                .collect();
            (s.step, values)
        } else {
            (initial.step, initial_values)
        };
        let flops =
            |p: &coopc_ir::plan::Program| coopc_ir::cost::program_flops(&p.graph, &p.schedule);
        let (meta_flops, score_flops) = (flops(plan.meta_step()), flops(plan.logprobs()));
        Ok(Trainer {
            meta_flops,
            score_flops,
            scores_run: Default::default(),
            metas_run: 0,
            nonfinite_in_row: 0,
            spec,
            plan,
            task,
            sampler,
            dt,
            step,
            values,
            reference,
            opts,
            backend: Arc::new(CpuBackend),
            comm,
        })
    }

    /// The same trainer running every program (meta-step, scorer, decode
    /// step) on `backend`.
    pub fn with_backend(mut self, backend: Arc<dyn Backend>) -> Trainer {
        self.sampler = self.sampler.with_backend(backend.clone());
        self.backend = backend;
        self
    }

    /// The backend the programs run on.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// θ from `model.from` or the seed, w from the seed; shadow = θ; zero
    /// optimiser state.
    fn initial_state(spec: &PipelineSpec, meta: &Signature) -> Result<TrainState, TrainError> {
        let params = pretrained_or_init(spec, meta.parameters(), spec.train.seed)
            .map_err(|e| TrainError::Io(e.to_string()))?;
        let mut tensors = initial_state(meta, |n| params.get(n).cloned());
        tensors.extend(params);
        Ok(TrainState { step: 0, tensors })
    }

    /// θ and w (the policy) out of a state.
    fn policy_params(plan: &Plan, tensors: &BTreeMap<String, Value>) -> HashMap<String, Value> {
        plan.meta_step()
            .signature
            .parameters()
            .filter_map(|p| tensors.get(&p.name).map(|t| (p.name.clone(), t.clone())))
            .collect()
    }

    /// Meta-steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The training state as host tensors (read back from the device on a
    /// device backend).
    pub fn state(&self) -> Result<TrainState, TrainError> {
        let mut tensors = BTreeMap::new();
        for (name, v) in &self.values {
            tensors.insert(name.clone(), self.backend.to_host(v)?);
        }
        Ok(TrainState {
            step: self.step,
            tensors,
        })
    }

    /// Moves the state (and π_ref) to where the backend keeps it: a no-op
    /// once resident, and on the CPU.
    fn make_resident(&mut self) -> Result<(), TrainError> {
        let reference = self.reference.iter_mut().flat_map(|r| r.values_mut());
        for v in self.values.values_mut().chain(reference) {
            if !v.is_resident() {
                *v = self.backend.resident(v.clone())?;
            }
        }
        Ok(())
    }

    fn tensor(&self, shape: Vec<usize>, v: &[f64]) -> HostTensor {
        HostTensor::from_f64(self.dt, shape, v).expect("length matches by construction")
    }

    /// Log-probs [rows, T] of packed ids under `params`, left where the
    /// backend computed them (they feed the meta-step), and the entropies
    /// of the distributions they come from.
    fn score(
        &self,
        params: &HashMap<String, Value>,
        ids: &[i32],
    ) -> Result<(Value, Option<Value>), TrainError> {
        let t = self.spec.train.seq_len;
        let rows = ids.len() / t;
        let mut inputs = params.clone();
        inputs.insert(
            TOKEN_IDS.into(),
            Value::host(HostTensor::i32(vec![rows, t], ids.to_vec())),
        );
        let scorer = self.plan.logprobs();
        self.scores_run
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out: HashMap<String, Value> = self
            .backend
            .run_values(scorer, &inputs, &|_| false)?
            .into_iter()
            .collect();
        let mut take = |role: Role| {
            scorer
                .signature
                .outputs
                .iter()
                .find(|p| p.role == role)
                .and_then(|p| out.remove(&p.name))
        };
        let logprobs = take(Role::LogProbs)
            .ok_or_else(|| TrainError::Io("the log-prob program returned no log-probs".into()))?;
        Ok((logprobs, take(Role::Entropy)))
    }

    /// Greedy accuracy on (at most `eval_limit` of) the held-out problems.
    pub fn evaluate(&self) -> Result<f64, TrainError> {
        self.evaluate_with(&mut |_, _| {})
    }

    /// [`Trainer::evaluate`], calling `progress(done, total)` after each
    /// batch of problems.
    pub fn evaluate_with(&self, progress: &mut dyn FnMut(usize, usize)) -> Result<f64, TrainError> {
        let problems = self.task.eval_set();
        let problems = &problems[..problems.len().min(self.opts.eval_limit)];
        let chunk = self.spec.rl.batch_size().max(1);
        let mut correct = 0;
        for (i, batch) in problems.chunks(chunk).enumerate() {
            correct += self.answer(batch)?.iter().filter(|a| a.correct).count();
            progress(
                (i * chunk + batch.len()).min(problems.len()),
                problems.len(),
            );
        }
        if problems.is_empty() {
            return Ok(f64::NAN);
        }
        Ok(correct as f64 / problems.len() as f64)
    }

    /// `n` sampled answers (at `temperature`) to each of (at most
    /// `eval_limit` of) the held-out problems: the mean fraction correct
    /// (pass@1), the fraction of problems with a correct answer among the
    /// n (pass@n), and the fraction whose majority answer is correct
    /// (maj@n; votes by [`Task::answer_of`], ties to the answer seen first).
    pub fn sampled_accuracy(
        &self,
        n: usize,
        temperature: f64,
    ) -> Result<SampledAccuracy, TrainError> {
        let problems = self.task.eval_set();
        let problems = &problems[..problems.len().min(self.opts.eval_limit)];
        let params = Self::policy_params(&self.plan, &self.values);
        let mut prompts = Vec::with_capacity(problems.len() * n);
        for p in problems {
            let enc = self.task.encode_prompt(p)?;
            prompts.extend(std::iter::repeat_n(enc, n));
        }
        let mut rng = step_rng(self.spec.train.seed, self.step, 11);
        let mut config = self.sampling(false, &prompts);
        config.temperature = temperature;
        let gens = self
            .sampler
            .generate(&params, &prompts, &config, &mut rng)?;
        let (mut correct, mut pass, mut maj) = (0usize, 0usize, 0usize);
        for (p, group) in problems.iter().zip(gens.chunks(n)) {
            let texts: Vec<String> = group
                .iter()
                .map(|g| self.task.decode_response(g.response()))
                .collect();
            let v = vote(self.task.as_ref(), p, &texts);
            correct += v.correct;
            pass += v.any_correct as usize;
            maj += v.majority_correct as usize;
        }
        let total = problems.len().max(1) as f64;
        Ok(SampledAccuracy {
            n,
            pass_at_1: correct as f64 / (total * n as f64),
            pass_at_n: pass as f64 / total,
            maj_at_n: maj as f64 / total,
        })
    }

    /// Greedy answers to (at most `eval_limit` of) `problems`.
    pub fn answer(&self, problems: &[Problem]) -> Result<Vec<Answer>, TrainError> {
        let problems = &problems[..problems.len().min(self.opts.eval_limit)];
        let params = Self::policy_params(&self.plan, &self.values);
        let prompts: Vec<Vec<i32>> = problems
            .iter()
            .map(|p| self.task.encode_prompt(p))
            .collect::<Result<_, _>>()?;
        let mut rng = step_rng(self.spec.train.seed, 0, 7);
        let gens =
            self.sampler
                .generate(&params, &prompts, &self.sampling(true, &prompts), &mut rng)?;
        Ok(problems
            .iter()
            .zip(&gens)
            .map(|(p, gen)| {
                let response = self.task.decode_response(gen.response());
                Answer {
                    prompt: p.prompt.clone(),
                    reference: p.answer.clone(),
                    correct: self.task.is_correct(p, &response),
                    response,
                }
            })
            .collect())
    }

    /// The task the run trains on.
    pub fn task(&self) -> &dyn Task {
        self.task.as_ref()
    }

    /// Sampling settings for `prompts`: responses stop at `rl.max_new_tokens`
    /// or where the longest prompt's sequence reaches `train.seq_len`.
    fn sampling(&self, greedy: bool, prompts: &[Vec<i32>]) -> SamplingConfig {
        let tok = self.task.tokenizer();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        SamplingConfig {
            temperature: self.spec.rl.temperature,
            top_p: self.spec.rl.top_p,
            top_k: self.spec.rl.top_k,
            max_new_tokens: self
                .spec
                .rl
                .max_new_tokens
                .min(self.spec.train.seq_len.saturating_sub(longest)),
            stop_tokens: tok.stop_tokens(),
            pad_token: tok.pad(),
            greedy,
        }
    }

    /// Runs meta-steps until `train.steps`, writing metrics and checkpoints.
    /// In a data-parallel run every process calls this; rank 0 evaluates
    /// and writes metrics and checkpoints, and a process that fails tells
    /// the others, which then stop with an error naming it.
    pub fn run(&mut self, on_step: impl FnMut(&Metrics)) -> Result<Vec<Metrics>, TrainError> {
        let out = self.run_inner(on_step);
        if let Err(e) = &out {
            if !matches!(e, TrainError::Collective(_)) {
                self.comm.abort(&e.to_string());
            }
        }
        out
    }

    fn run_inner(&mut self, mut on_step: impl FnMut(&Metrics)) -> Result<Vec<Metrics>, TrainError> {
        let writes = self.comm.rank() == 0;
        let metrics_path = self.opts.out_dir.join("metrics.jsonl");
        let mut history = read_metrics(&metrics_path)?;
        history.retain(|m| m.step < self.step);
        if writes {
            rewrite_metrics(&metrics_path, &history)?;
        }
        let wall0 = Instant::now();
        let wall_offset = history.last().map_or(0.0, |m| m.wall_time_s);
        let mut flops_total = history.last().and_then(|m| m.flops).unwrap_or(0.0);
        // TensorBoard's copy of the metrics, rewritten with them on resume;
        // event times count from the run's start.
        let started = tensorboard::now() - wall_offset;
        let dir = &self.opts.out_dir;
        let mut events = if writes {
            let mut events = EventWriter::create(dir).map_err(|e| io_err(dir, e))?;
            for m in &history {
                write_event(&mut events, m, started)?;
            }
            Some(events)
        } else {
            None
        };
        let total = self.spec.train.steps;
        let mut out = Vec::new();
        let stop = self.opts.stop_after.map_or(total, |s| s.min(total));
        while self.step < stop {
            let t0 = Instant::now();
            let before = self.backend.transfers();
            let work_before = self.work_done();
            let mut m = self.meta_step().map_err(|e| self.failed_at(self.step, e))?;
            // Every process's work, and whether a process was asked to
            // stop (a signal may reach them at different meta-steps).
            let mut shared = [
                (self.work_done() - work_before) as f64,
                crate::interrupt::requested().is_some() as u8 as f64,
            ];
            self.comm.all_reduce_sum_f64(&mut shared)?;
            flops_total += shared[0];
            m.flops = Some(flops_total);
            if let (Some(b), Some(a)) = (before, self.backend.transfers()) {
                let d = a.since(b);
                m.bytes_to_device = Some(d.uploaded);
                m.bytes_from_device = Some(d.downloaded);
            }
            let step = m.step;
            let every = self.spec.train.eval_every;
            let evaluates = (every > 0 && (step + 1) % every == 0) || step + 1 == total;
            if evaluates && writes {
                m.eval_accuracy = Some(self.evaluate().map_err(|e| self.failed_at(step, e))?);
                let n = self.spec.train.eval_samples;
                if n > 0 {
                    let temperature = self.spec.train.eval_temperature;
                    let s = self
                        .sampled_accuracy(n, temperature)
                        .map_err(|e| self.failed_at(step, e))?;
                    m.eval_pass_at_1 = Some(s.pass_at_1);
                    m.eval_pass_at_k = Some(s.pass_at_n);
                    m.eval_maj_at_k = Some(s.maj_at_n);
                }
            }
            m.step_time_s = t0.elapsed().as_secs_f64();
            m.wall_time_s = wall_offset + wall0.elapsed().as_secs_f64();
            if let Some(events) = events.as_mut() {
                append_metrics(&metrics_path, &m)?;
                write_event(events, &m, started)?;
            }
            // One process stops on a signal that came at any moment up to
            // now; several stop together, on one that came before the sum.
            let interrupted = if self.comm.world() == 1 {
                crate::interrupt::requested()
            } else {
                (shared[1] > 0.0).then(|| crate::interrupt::requested().unwrap_or(15))
            };
            if writes && (evaluates || self.step == stop || interrupted.is_some()) {
                let saved = checkpoint::save(&self.opts.out_dir, &self.spec, &self.state()?);
                if let Err(source) = saved {
                    return Err(TrainError::CheckpointWrite {
                        step: self.step,
                        source,
                        kept: self.kept_checkpoint(),
                    });
                }
            }
            on_step(&m);
            out.push(m);
            if let Some(signal) = interrupted {
                if self.step < stop {
                    return Err(TrainError::Interrupted {
                        signal,
                        step: self.step,
                        checkpoint: checkpoint::checkpoints_dir(&self.opts.out_dir)
                            .join(format!("step-{}", self.step)),
                        out_dir: self.opts.out_dir.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// An executor failure (a device error, a launch or memory failure)
    /// during meta-step `step`, with the checkpoint that is kept.
    fn failed_at(&self, step: usize, e: TrainError) -> TrainError {
        match e {
            TrainError::Exec(source) | TrainError::Sample(SampleError::Exec(source)) => {
                TrainError::StepFailed {
                    step,
                    source,
                    kept: self.kept_checkpoint(),
                }
            }
            other => other,
        }
    }

    /// What a run that stops now leaves to resume from.
    fn kept_checkpoint(&self) -> String {
        match checkpoint::load_latest(&self.opts.out_dir) {
            Ok(s) => format!(
                "the last good checkpoint, after meta-step {}, is kept in {}",
                s.step,
                checkpoint::checkpoints_dir(&self.opts.out_dir).display()
            ),
            Err(_) => "no checkpoint was written yet".to_string(),
        }
    }

    /// Plan FLOPs of every program this trainer has run (evaluation's
    /// sampling included; `run` counts the difference over meta-steps).
    fn work_done(&self) -> u64 {
        let scores = self.scores_run.load(std::sync::atomic::Ordering::Relaxed);
        let metas = self.metas_run;
        self.sampler
            .flops_done()
            .saturating_add(scores.saturating_mul(self.score_flops))
            .saturating_add(metas.saturating_mul(self.meta_flops))
    }

    /// The meta-step as `micro` instances, each on its slice of every
    /// batch input's rows, taking turns on threads of their own (see
    /// `collective::MicroBatches`); every instance ends with the same
    /// outputs, and the first's are returned.
    fn run_micro_batches(
        &self,
        meta: &coopc_ir::plan::Program,
        inputs: &HashMap<String, Value>,
        on_host: &(dyn Fn(&str) -> bool + Sync),
        micro: usize,
    ) -> Result<Vec<(String, Value)>, TrainError> {
        let mut per: Vec<HashMap<String, Value>> = vec![inputs.clone(); micro];
        for (name, v) in inputs {
            if !matches!(
                meta.signature.input(name).map(|p| &p.role),
                Some(Role::Batch { .. })
            ) {
                continue;
            }
            let t = self.backend.to_host(v)?;
            let rows = t.shape[0] / micro;
            for (i, inp) in per.iter_mut().enumerate() {
                inp.insert(
                    name.clone(),
                    Value::host(t.slice_rows(i * rows, (i + 1) * rows)),
                );
            }
        }
        let handles = collective::MicroBatches::handles(micro, self.comm.clone());
        let backend = &self.backend;
        let results: Vec<Result<Vec<(String, Value)>, TrainError>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .zip(&per)
                .map(|(h, inp)| {
                    s.spawn(move || {
                        h.run(|| backend.run_values(meta, inp, on_host))
                            .map_err(|e| match e {
                                collective::RunError::Inner(e) => TrainError::Exec(e),
                                collective::RunError::Collective(e) => TrainError::Collective(e),
                            })
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(TrainError::Io("a micro-batch panicked".into())))
                })
                .collect()
        });
        let mut first = None;
        for r in results {
            let r = r?;
            first.get_or_insert(r);
        }
        Ok(first.expect("at least one micro-batch"))
    }

    /// One meta-step: build the K batches, run the program, adopt the new state.
    fn meta_step(&mut self) -> Result<Metrics, TrainError> {
        self.make_resident()?;
        let spec = &self.spec;
        let step = self.step;
        let lambda = spec.lambda_at(step);
        let k_steps = spec.bilevel.hypergradient.unroll.max(1);
        let (t, bs) = (spec.train.seq_len, spec.sft.batch_size);
        let br = spec.rl.batch_size();
        let g = spec.rl.group_size;
        // This process's rows of the whole batch (all of them on one).
        let comm = self.comm.clone();
        let (rank, world) = (comm.rank(), comm.world());
        let minis = spec.rl.mini_batches.max(1);
        // With micro-batches, the process's rows are its instances' rows,
        // instance by instance (instance i is rank · M + i of world · M).
        let micro = spec.train.micro_batches.max(1);
        let mine = |rows: usize| -> Vec<usize> {
            (0..micro)
                .flat_map(|i| shard_rows(rows, minis, rank * micro + i, world * micro))
                .collect()
        };
        let sft_mine = mine(bs);
        let rl_mine = mine(br);
        let (bs_l, br_l) = (sft_mine.len(), rl_mine.len());
        let policy = Self::policy_params(&self.plan, &self.values);
        let tok = self.task.tokenizer();
        let pad = tok.pad();
        let mut inputs: HashMap<String, Value> = self.values.clone().into_iter().collect();
        let host = |t: HostTensor| Value::host(t);
        inputs.insert(LAMBDA.into(), host(self.tensor(vec![], &[lambda])));
        let scales = spec.lr_scales(step);
        for (name, s) in scales {
            if self.plan.meta_step().signature.input(name).is_some() {
                inputs.insert(name.into(), host(self.tensor(vec![], &[s])));
            }
        }
        let lr = spec.optim.lower.lr * scales[0].1;
        let needs_rollouts = lambda > 0.0 || spec.bilevel.method == Method::Bridge;
        let (mut rewards_all, mut correct, mut lens, mut kls) =
            (Vec::new(), 0usize, Vec::new(), Vec::new());
        // The sampling policy's entropy on each scored response token.
        let mut entropies = Vec::new();
        // Completions that did not stop; sampling batches and groups
        // dropped by dynamic sampling, over the step's K lower steps.
        let (mut truncated, mut rounds, mut dropped_groups) = (0usize, 0usize, 0usize);
        // Whether some rollout has a non-zero advantage.
        let mut rl_signal = false;
        for k in 0..k_steps {
            let mut rng = step_rng(spec.train.seed, step, 1 + k as u64);
            // SFT demonstrations: every process draws the whole batch and
            // keeps its rows.
            let mut all_rows = Vec::with_capacity(bs);
            for _ in 0..bs {
                let ex = self.task.sft_row(&mut rng)?;
                all_rows.push((ex.tokens, ex.prompt_len, ex.response_len));
            }
            let rows: Vec<Row> = sft_mine.iter().map(|&i| all_rows[i].clone()).collect();
            let sft = pack(&rows, t, pad);
            let field = |f: BatchField| f.input_name(k);
            inputs.insert(
                field(BatchField::SftInputIds),
                host(HostTensor::i32(vec![bs_l, t], sft.ids.clone())),
            );
            inputs.insert(
                field(BatchField::SftLossMask),
                host(self.tensor(vec![bs_l, t], &sft.mask)),
            );
            // RL rollouts: G completions of each prompt from the current policy.
            let (rl, adv, old, reference) = if needs_rollouts {
                let p_count = spec.rl.prompts_per_step;
                // Groups of G rollouts: their (ids, response start, loss
                // length) rows and their rewards.
                let mut kept: Vec<Group> = Vec::new();
                let mut dropped: Vec<Group> = Vec::new();
                let mut round = 0;
                loop {
                    round += 1;
                    // Every process draws the whole batch's problems and
                    // random streams, and samples its rows.
                    let problems: Vec<Problem> = (0..p_count)
                        .map(|_| self.task.rl_problem(&mut rng))
                        .collect();
                    let mut all_prompts = Vec::with_capacity(br);
                    for p in &problems {
                        let enc = self.task.encode_prompt(p)?;
                        for _ in 0..g {
                            all_prompts.push(enc.clone());
                        }
                    }
                    let seeds: Vec<u64> = all_prompts.iter().map(|_| rng.gen()).collect();
                    let prompts: Vec<Vec<i32>> =
                        rl_mine.iter().map(|&i| all_prompts[i].clone()).collect();
                    let streams = rl_mine
                        .iter()
                        .map(|&i| StdRng::seed_from_u64(seeds[i]))
                        .collect();
                    let gens: Vec<Generation> = self.sampler.generate_with_streams(
                        &policy,
                        &prompts,
                        &self.sampling(false, &all_prompts),
                        streams,
                    )?;
                    let mut round_rows = Vec::with_capacity(br_l);
                    let mut round_rewards = Vec::with_capacity(br_l);
                    for (gen, &i) in gens.iter().zip(&rl_mine) {
                        let problem = &problems[i / g];
                        let text = self.task.decode_response(gen.response());
                        correct += self.task.is_correct(problem, &text) as usize;
                        round_rewards.push(self.task.reward(problem, &text));
                        lens.push(gen.response_len as f64);
                        truncated += !gen.stopped as usize;
                        round_rows.push((
                            (gen.tokens.clone(), gen.prompt_len, gen.response_len),
                            gen.stopped,
                        ));
                    }
                    rewards_all.extend(&round_rewards);
                    if world > 1 || micro > 1 {
                        // No dynamic sampling (refused in `new`): the
                        // process's rows as they come.
                        kept.push((round_rows, round_rewards));
                        break;
                    }
                    let mut round_rows = round_rows.into_iter();
                    for rewards in round_rewards.chunks(g) {
                        let rows: Vec<_> = round_rows.by_ref().take(g).collect();
                        let rewards = rewards.to_vec();
                        let flat = rewards.iter().all(|&r| r == rewards[0]);
                        if spec.rl.dynamic_sampling && flat {
                            dropped.push((rows, rewards));
                        } else {
                            kept.push((rows, rewards));
                        }
                    }
                    if !spec.rl.dynamic_sampling
                        || kept.len() >= p_count
                        || round >= spec.rl.max_sampling_rounds
                    {
                        break;
                    }
                }
                rounds += round;
                dropped_groups += dropped.len();
                kept.truncate(p_count);
                // Short of groups with signal: dropped ones (advantage 0)
                // fill the batch, as they would without dynamic sampling.
                let short = p_count - kept.len();
                kept.extend(dropped.into_iter().take(short));
                let (mut rows, stopped): (Vec<Row>, Vec<bool>) =
                    kept.iter().flat_map(|(r, _)| r.iter().cloned()).unzip();
                let mut rewards: Vec<f64> =
                    kept.iter().flat_map(|(_, r)| r.iter().copied()).collect();
                // The ids do not depend on which tokens carry loss.
                let sampled = pack(&rows, t, pad);
                let (old, entropy) = self.score(&policy, &sampled.ids)?;
                if let Some(e) = entropy {
                    let e = self.backend.to_host(&e)?.to_f64_vec();
                    entropies.extend(
                        e.iter()
                            .zip(&sampled.mask)
                            .filter(|p| *p.1 > 0.0)
                            .map(|p| p.0),
                    );
                }
                let reference = match &self.reference {
                    Some(r) => {
                        let (lp, _) = self.score(r, &sampled.ids)?;
                        // The KL metric (and a penalty in the reward) reads
                        // both log-probs back.
                        let old_h = self.backend.to_host(&old)?.to_f64_vec();
                        let lp_h = self.backend.to_host(&lp)?.to_f64_vec();
                        for ((o, r), m) in old_h.iter().zip(&lp_h).zip(&sampled.mask) {
                            if *m > 0.0 {
                                kls.push(KlEstimator::K3.of(r - o));
                            }
                        }
                        if spec.rl.kl_in_reward {
                            kl_penalty(
                                &mut rewards,
                                &old_h,
                                &lp_h,
                                &sampled.mask,
                                spec.rl.kl_coef,
                                spec.rl.kl_estimator,
                            );
                        }
                        Some(lp)
                    }
                    None => None,
                };
                // Advantages from the whole batch's rewards (group and
                // batch statistics span processes).
                let mut all_rewards = vec![0.0; br];
                for (&i, &r) in rl_mine.iter().zip(&rewards) {
                    all_rewards[i] = r;
                }
                comm.all_reduce_sum_f64(&mut all_rewards)?;
                let all_adv = advantages(&all_rewards, g, spec.rl.advantage);
                let mut adv: Vec<f64> = rl_mine.iter().map(|&i| all_adv[i]).collect();
                if spec.rl.mask_truncated {
                    mask_truncated(&mut rows, &mut adv, &stopped);
                }
                // Only taking truncated completions off the loss changes the mask.
                let rl = if spec.rl.mask_truncated {
                    pack(&rows, t, pad)
                } else {
                    sampled
                };
                rl_signal |= adv.iter().zip(&rows).any(|(&a, row)| a != 0.0 && row.2 > 0);
                // The loss reads reference log-probs only with its KL term.
                let reference = reference.filter(|_| spec.rl.loss_kl_coef() > 0.0);
                (rl, adv, old, reference)
            } else {
                // λ = 0 and no upper level: the RL term has weight 0, so the
                // SFT rows stand in (zero advantages) and nothing is sampled.
                let reps: Vec<(Vec<i32>, usize, usize)> =
                    rl_mine.iter().map(|&i| all_rows[i % bs].clone()).collect();
                let rl = pack(&reps, t, pad);
                let zeros = host(self.tensor(vec![br_l, t], &vec![0.0; rl.ids.len()]));
                (rl, vec![0.0; br_l], zeros.clone(), Some(zeros))
            };
            inputs.insert(
                field(BatchField::RlInputIds),
                host(HostTensor::i32(vec![br_l, t], rl.ids)),
            );
            inputs.insert(
                field(BatchField::RlLossMask),
                host(self.tensor(vec![br_l, t], &rl.mask)),
            );
            inputs.insert(
                field(BatchField::RlAdvantages),
                host(self.tensor(vec![br_l], &adv)),
            );
            inputs.insert(field(BatchField::RlOldLogprobs), old);
            if let Some(r) = reference {
                inputs.insert(field(BatchField::RlRefLogprobs), r);
            }
        }
        // The rollouts' statistics over every process's rows: sums and
        // counts, added over processes.
        let sum = |xs: &[f64]| xs.iter().sum::<f64>();
        let mut stats = [
            sum(&rewards_all),
            rewards_all.len() as f64,
            correct as f64,
            sum(&kls),
            kls.len() as f64,
            sum(&entropies),
            entropies.len() as f64,
            sum(&lens),
            lens.len() as f64,
            truncated as f64,
            rl_signal as u8 as f64,
        ];
        comm.all_reduce_sum_f64(&mut stats)?;
        let [reward_sum, n, correct, kl_sum, kl_n, ent_sum, ent_n, len_sum, len_n, truncated, signal] =
            stats;
        let rl_signal = signal > 0.0;
        let n = n as usize;
        let mean = |total: f64, count: f64| (count > 0.0).then(|| total / count);
        // No signal: the lower objective is the RL term alone, without a KL
        // term or an entropy bonus, and every advantage is 0 — its gradient is exactly 0, and an
        // optimiser step would only let momentum and weight decay move θ.
        let no_signal = spec.rl.skip_no_signal
            && spec.bilevel.method != Method::Bridge
            && needs_rollouts
            && lambda == 1.0
            && spec.rl.loss_kl_coef() == 0.0
            && spec.rl.entropy_coef == 0.0
            && !rl_signal;
        // What the step's rollouts say; the losses come from the program.
        let rollouts = Metrics {
            step,
            method: spec.bilevel.method.name().to_string(),
            lambda,
            reward_mean: mean(reward_sum, n as f64),
            accuracy: (n > 0).then(|| correct / n as f64),
            sft_loss: f64::NAN,
            rl_loss: None,
            kl: mean(kl_sum, kl_n),
            entropy: mean(ent_sum, ent_n),
            coop_gain: None,
            response_len: mean(len_sum, len_n),
            step_time_s: 0.0,
            wall_time_s: 0.0,
            eval_accuracy: None,
            bytes_to_device: None,
            bytes_from_device: None,
            flops: None,
            no_signal: false,
            lr: Some(lr),
            grad_norm_lower: None,
            grad_norm_upper: None,
            skipped_nonfinite: false,
            truncated: (n > 0).then(|| truncated / n as f64),
            sampling_rounds: (spec.rl.dynamic_sampling && n > 0).then_some(rounds),
            dropped_groups: (spec.rl.dynamic_sampling && n > 0).then_some(dropped_groups),
            eval_pass_at_1: None,
            eval_pass_at_k: None,
            eval_maj_at_k: None,
        };
        if no_signal {
            self.step = step + 1;
            return Ok(Metrics {
                // −min(ρA, clip(ρ)A) with every A = 0.
                rl_loss: Some(0.0),
                no_signal: true,
                ..rollouts
            });
        }
        // Only the scalars the metrics need come back; the new state stays
        // where the backend keeps it.
        let meta = self.plan.meta_step();
        self.metas_run += 1;
        let on_host = |name: &str| {
            matches!(
                meta.signature.output(name).map(|p| &p.role),
                Some(Role::Metric(_))
            )
        };
        let outputs: HashMap<String, Value> = if micro == 1 {
            collective::scope(comm.clone(), || {
                self.backend.run_values(meta, &inputs, &on_host)
            })?
        } else {
            self.run_micro_batches(meta, &inputs, &on_host, micro)?
        }
        .into_iter()
        .collect();
        let scalar = |m: Metric| {
            outputs
                .get(m.name())
                .and_then(Value::as_host)
                .map(|t| t.to_f64_vec()[0])
        };
        let sft_loss = scalar(Metric::SftLoss).unwrap_or(f64::NAN);
        let checks = [
            (Metric::SftLoss, Some(sft_loss)),
            (Metric::RlLoss, scalar(Metric::RlLoss)),
            (Metric::UpperLoss, scalar(Metric::UpperLoss)),
            (Metric::LowerGradNorm, scalar(Metric::LowerGradNorm)),
            (Metric::UpperGradNorm, scalar(Metric::UpperGradNorm)),
        ];
        let mut bad = checks.into_iter().find_map(|(metric, v)| {
            let v = v?;
            let counts = metric != Metric::RlLoss || needs_rollouts;
            (!v.is_finite() && counts).then(|| (metric.name().to_string(), v))
        });
        // The next state of every state input; where it is on the host
        // (the CPU backend), it is checked too: an update can overflow
        // while the losses it came from are finite.
        let mut next = self.values.clone();
        for port in &meta.signature.outputs {
            if let (Role::Next { of }, Some(t)) = (&port.role, outputs.get(&port.name)) {
                if bad.is_none() {
                    if let Some(v) = t
                        .as_host()
                        .and_then(|h| h.to_f64_vec().into_iter().find(|v| !v.is_finite()))
                    {
                        bad = Some((format!("the new value of `{of}`"), v));
                    }
                }
                next.insert(of.clone(), t.clone());
            }
        }
        if let Some((what, value)) = bad {
            let skip = spec.train.on_nonfinite == OnNonFinite::SkipStep
                && self.nonfinite_in_row + 1 < spec.train.max_nonfinite_in_row;
            if !skip {
                let what = if self.nonfinite_in_row > 0 {
                    format!(
                        "{what} ({} meta-steps in a row, train.max_nonfinite_in_row = {})",
                        self.nonfinite_in_row + 1,
                        spec.train.max_nonfinite_in_row
                    )
                } else {
                    what
                };
                return Err(TrainError::NonFinite {
                    step,
                    what,
                    value,
                    checkpoint: self.kept_checkpoint(),
                });
            }
            // Skipped: parameters and optimiser state stay as they were.
            self.nonfinite_in_row += 1;
            self.step = step + 1;
            return Ok(Metrics {
                sft_loss,
                rl_loss: scalar(Metric::RlLoss).filter(|_| needs_rollouts),
                coop_gain: scalar(Metric::Gain),
                grad_norm_lower: scalar(Metric::LowerGradNorm),
                grad_norm_upper: scalar(Metric::UpperGradNorm),
                skipped_nonfinite: true,
                ..rollouts
            });
        }
        self.nonfinite_in_row = 0;
        self.values = next;
        self.step = step + 1;
        Ok(Metrics {
            sft_loss,
            rl_loss: if needs_rollouts {
                scalar(Metric::RlLoss)
            } else {
                None
            },
            coop_gain: scalar(Metric::Gain),
            grad_norm_lower: scalar(Metric::LowerGradNorm),
            grad_norm_upper: scalar(Metric::UpperGradNorm),
            ..rollouts
        })
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// The metrics already written to a run's `metrics.jsonl` (none if absent).
pub fn read_metrics(path: &Path) -> Result<Vec<Metrics>, TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, e)),
    };
    // A last line without its newline is a write the process did not
    // finish (killed mid-append): it is not a row, whatever it holds.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| io_err(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// A metrics row as TensorBoard scalars (tags grouped by a `/` prefix).
fn write_event(w: &mut EventWriter, m: &Metrics, started: f64) -> Result<(), TrainError> {
    let opt = |v: Option<f64>| v.unwrap_or(f64::NAN);
    let scalars = [
        ("loss/sft", m.sft_loss),
        ("loss/rl", opt(m.rl_loss)),
        ("rollout/reward", opt(m.reward_mean)),
        ("rollout/accuracy", opt(m.accuracy)),
        ("rollout/response_len", opt(m.response_len)),
        ("eval/accuracy", opt(m.eval_accuracy)),
        ("bilevel/lambda", m.lambda),
        ("bilevel/coop_gain", opt(m.coop_gain)),
        ("bilevel/kl", opt(m.kl)),
        ("rollout/entropy", opt(m.entropy)),
        ("time/step_s", m.step_time_s),
        ("compute/gflops", opt(m.flops.map(|f| f / 1e9))),
        ("rollout/no_signal", if m.no_signal { 1.0 } else { 0.0 }),
        ("optim/lr", opt(m.lr)),
        ("optim/grad_norm_lower", opt(m.grad_norm_lower)),
        ("optim/grad_norm_upper", opt(m.grad_norm_upper)),
        (
            "optim/skipped_nonfinite",
            if m.skipped_nonfinite { 1.0 } else { 0.0 },
        ),
        ("rollout/truncated", opt(m.truncated)),
        (
            "rollout/sampling_rounds",
            opt(m.sampling_rounds.map(|r| r as f64)),
        ),
        (
            "rollout/dropped_groups",
            opt(m.dropped_groups.map(|d| d as f64)),
        ),
        ("eval/pass_at_1", opt(m.eval_pass_at_1)),
        ("eval/pass_at_k", opt(m.eval_pass_at_k)),
        ("eval/maj_at_k", opt(m.eval_maj_at_k)),
    ];
    w.scalars(m.step as u64, started + m.wall_time_s, &scalars)
        .map_err(|e| io_err(w.path(), e))
}

fn rewrite_metrics(path: &Path, rows: &[Metrics]) -> Result<(), TrainError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let mut text = String::new();
    for m in rows {
        text.push_str(&serde_json::to_string(m).map_err(|e| io_err(path, e))?);
        text.push('\n');
    }
    coopc_ir::file::write_atomically(path, text.as_bytes()).map_err(|e| io_err(path, e))
}

fn append_metrics(path: &Path, m: &Metrics) -> Result<(), TrainError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let mut line = serde_json::to_string(m).map_err(|e| io_err(path, e))?;
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(|e| io_err(path, e))
}
