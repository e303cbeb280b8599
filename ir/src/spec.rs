//! The typed pipeline specification: what a validated `pipeline.toml` means.
//! The frontend (`frontend.rs`) parses and validates TOML into these types;
//! everything after it (graph builder, lowering, plan) reads only these.

use serde::{Deserialize, Serialize};

/// A whole, validated pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineSpec {
    pub model: ModelSpec,
    pub lora: LoraSpec,
    pub task: TaskSpec,
    pub rl: RlSpec,
    pub sft: SftSpec,
    pub bilevel: BilevelSpec,
    pub optim: OptimSpecs,
    pub train: TrainSpec,
    pub backend: BackendSpec,
}

impl PipelineSpec {
    /// The learning-rate multipliers of meta-step `step`, each with the
    /// meta-step input that takes it (an input only where that level's
    /// schedule is not constant).
    pub fn lr_scales(&self, step: usize) -> [(&'static str, f64); 2] {
        let total = self.train.steps;
        [
            (
                crate::signature::LR_SCALE_LOWER,
                self.optim.lower.schedule.scale(step, total),
            ),
            (
                crate::signature::LR_SCALE_UPPER,
                self.optim.upper.schedule.scale(step, total),
            ),
        ]
    }

    /// The λ of L_low = (1−λ) L_SFT + λ L_RL at meta-step `step` for this
    /// method: BRIDGE and `mix` follow `bilevel.lambda`; `rl_zero` is 1;
    /// `sft` is 0; `cold_start` is 0 for `sft.cold_start_steps` steps, then 1;
    /// `alternating` is 0 on even steps and 1 on odd ones.
    pub fn lambda_at(&self, step: usize) -> f64 {
        match self.bilevel.method {
            Method::Bridge | Method::Mix => self.bilevel.lambda.at(step, self.train.steps),
            Method::RlZero => 1.0,
            Method::Sft => 0.0,
            Method::ColdStart => {
                if step < self.sft.cold_start_steps {
                    0.0
                } else {
                    1.0
                }
            }
            Method::Alternating => (step % 2) as f64,
        }
    }
}

/// Llama/Qwen2-style decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Vocabulary size; defaults to the task tokenizer's size.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when < n_heads); divides n_heads.
    pub n_kv_heads: usize,
    pub d_ff: usize,
    /// Longest sequence (prompt + response) the model handles.
    pub max_seq: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    /// q/k/v projection biases (Qwen2 has them).
    pub qkv_bias: bool,
    /// Width of one attention head when it is not `d_model / n_heads`
    /// (Qwen3's `head_dim`); see [`ModelSpec::head_dim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3's `q_norm`,
    /// `k_norm`, each `[head_dim]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// How RoPE's frequencies are rescaled (`None`: the plain
    /// `theta^(-2i/head_dim)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The Hugging Face model folder the shapes (and the initial θ) come
    /// from, as an absolute path (`model.from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// What the lower level trains (`model.lower`): `None`, all of θ; a
    /// LoRA of θ's projections otherwise (θ's weights then stay frozen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<LoraSpec>,
}

impl ModelSpec {
    /// Width of one attention head: `head_dim` when given, else
    /// `d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads)
    }

    /// RoPE's inverse frequency of each rotated pair `i < head_dim / 2`,
    /// as Hugging Face computes it (`rope_init_fn` of the `rope_type`),
    /// in f64.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// A rescaling of RoPE's frequencies (Hugging Face's `rope_scaling`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1/3.2's: long wavelengths divided by `factor`, short ones
    /// kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The seven linear layers of a decoder block that LoRA can adapt (HF names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
    ];

    /// The HF module name, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Projection::QProj => "q_proj",
            Projection::KProj => "k_proj",
            Projection::VProj => "v_proj",
            Projection::OProj => "o_proj",
            Projection::GateProj => "gate_proj",
            Projection::UpProj => "up_proj",
            Projection::DownProj => "down_proj",
        }
    }

    /// `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Projection::QProj | Projection::KProj | Projection::VProj | Projection::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// LoRA adapter: the upper-level variables w.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Projection>,
}

impl LoraSpec {
    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Addition,
    Countdown,
    Jsonl,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Addition => "addition",
            TaskKind::Countdown => "countdown",
            TaskKind::Jsonl => "jsonl",
        }
    }
}

/// Where data and rewards come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub kind: TaskKind,
    /// Hugging Face `tokenizer.json`; the built-in character tokenizer when absent.
    pub tokenizer: Option<String>,
    /// jsonl: SFT file of {prompt, response}.
    pub sft_file: Option<String>,
    /// jsonl: RL file of {prompt, answer}.
    pub rl_file: Option<String>,
    /// jsonl: held-out file of {prompt, answer}.
    pub eval_file: Option<String>,
    pub reward_correct: f64,
    pub reward_wrong: f64,
    /// addition: SFT demonstrations have 1 to this many digits per operand.
    pub sft_max_digits: usize,
    /// addition: RL prompts have 1 to this many digits per operand.
    pub rl_max_digits: usize,
    /// addition: held-out problems have this many digits per operand (a
    /// length-generalisation split); `None`: they are drawn like RL prompts
    /// (the in-distribution split).
    #[serde(default)]
    pub eval_digits: Option<usize>,
    /// jsonl: the layout of the files' records.
    #[serde(default)]
    pub format: DataFormat,
    /// jsonl: render prompts through the tokenizer folder's chat template.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_template: bool,
    /// jsonl with `chat_template`: a system message before each prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Reward of a response whose answer is not in a recognised format
    /// (`None`: `reward_wrong`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_malformed: Option<f64>,
    /// SFT demonstrations are drawn from a fixed pool of this many distinct
    /// ones (the same pool for every `train.seed`); `None`: a fresh draw each
    /// time (built-in tasks) or the whole file (`jsonl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft_pool: Option<usize>,
    /// addition: a systematic flaw in every demonstration.
    #[serde(default, skip_serializing_if = "SftFlaw::is_none")]
    pub sft_flaw: SftFlaw,
    /// addition: demonstrations only of sums in which no column carries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sft_carry_free: bool,
    /// countdown: the puzzle generator's settings.
    #[serde(default, skip_serializing_if = "CountdownSpec::is_default")]
    pub countdown: CountdownSpec,
}

/// A systematic flaw in the built-in `addition` task's demonstrations, so
/// that SFT alone learns a wrong procedure that the verifier's reward can
/// correct.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftFlaw {
    /// Correct demonstrations.
    #[default]
    None,
    /// The answer after `#` drops the final carry: the carry chain is right,
    /// but a sum whose last column carries is written without its leading 1
    /// (`58+67=` answered `…#25`).
    DropFinalCarry,
}

impl SftFlaw {
    pub fn name(self) -> &'static str {
        match self {
            SftFlaw::None => "none",
            SftFlaw::DropFinalCarry => "drop_final_carry",
        }
    }

    pub fn is_none(&self) -> bool {
        *self == SftFlaw::None
    }
}

/// The built-in `countdown` task's generator: every SFT demonstration, RL
/// prompt and held-out puzzle gives `min_numbers..=max_numbers` numbers of
/// 1..=`max_number`, and every intermediate value and target is at most
/// `max_value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountdownSpec {
    pub min_numbers: usize,
    pub max_numbers: usize,
    pub max_number: u64,
    pub max_value: u64,
    /// Demonstrations show search: a dead-end attempt, marked `!`, before
    /// the solving trace.
    #[serde(default)]
    pub search_demos: bool,
}

impl Default for CountdownSpec {
    fn default() -> Self {
        CountdownSpec {
            min_numbers: 3,
            max_numbers: 4,
            max_number: 10,
            max_value: 100,
            search_demos: false,
        }
    }
}

impl CountdownSpec {
    pub fn is_default(&self) -> bool {
        *self == CountdownSpec::default()
    }
}

/// How a `jsonl` task's records are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// SFT `{prompt, response}`; RL and held-out `{prompt, answer}`.
    #[default]
    PromptResponse,
    /// GSM8K: `{question, answer}`, the answer a worked solution ending in
    /// `#### N`; one file serves SFT (the solution) and RL (N).
    Gsm8k,
    /// MATH: `{problem, solution}`, the final answer the solution's last
    /// `\boxed{…}`.
    Math,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::PromptResponse => "prompt_response",
            DataFormat::Gsm8k => "gsm8k",
            DataFormat::Math => "math",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    /// (r − mean) / (std + 1e-6) within a group.
    GroupStd,
    /// r − mean within a group (Dr. GRPO).
    GroupMean,
    /// (r − group mean) / (std over the whole batch + 1e-6): TRL's
    /// `scale_rewards = "batch"`.
    BatchStd,
    /// Leave-one-out (RLOO): r − the mean of the group's other rewards.
    Rloo,
}

impl Advantage {
    /// As `rl.advantage` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Advantage::GroupStd => "group_std",
            Advantage::GroupMean => "group_mean",
            Advantage::BatchStd => "batch_std",
            Advantage::Rloo => "rloo",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// Mean over all response tokens of the batch.
    TokenMean,
    /// Mean per sequence, then over sequences with at least one response token.
    SeqMean,
    /// Dr. GRPO: each sequence's token sum divided by a constant,
    /// `max_new_tokens`, then the mean over all sequences of the batch.
    SeqMeanTokenSumNorm,
}

impl LossAgg {
    /// As `rl.loss_agg` spells it.
    pub fn name(self) -> &'static str {
        match self {
            LossAgg::TokenMean => "token_mean",
            LossAgg::SeqMean => "seq_mean",
            LossAgg::SeqMeanTokenSumNorm => "seq_mean_token_sum_norm",
        }
    }
}

/// Which importance ratio the policy loss clips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    /// Per token: `ρ_t = π(y_t) / π_old(y_t)` (PPO, GRPO).
    Token,
    /// Per sequence, length-normalised (GSPO): `s = exp(mean_t log ρ_t)`
    /// over the response tokens, the same for every token of the sequence.
    Sequence,
}

impl RatioLevel {
    /// As `rl.ratio_level` spells it.
    pub fn name(self) -> &'static str {
        match self {
            RatioLevel::Token => "token",
            RatioLevel::Sequence => "sequence",
        }
    }
}

/// The policy-gradient surrogate of the RL loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLoss {
    /// PPO's clipped surrogate `−min(ρA, clip(ρ, 1 − clip_low, 1 +
    /// clip_high) A)`.
    PpoClip,
    /// CISPO (MiniMax-M1): `−sg(clip(ρ, 1 − clip_low, 1 + clip_high)) A
    /// logπ`, the clipped ratio a constant weight, so no token's gradient
    /// is dropped.
    Cispo,
}

impl PolicyLoss {
    /// As `rl.loss` spells it.
    pub fn name(self) -> &'static str {
        match self {
            PolicyLoss::PpoClip => "ppo_clip",
            PolicyLoss::Cispo => "cispo",
        }
    }
}

/// The estimator of KL(π ‖ π_ref) per token, with `δ = logπ_ref − logπ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `−δ` (unbiased, can be negative).
    K1,
    /// `δ² / 2`.
    K2,
    /// `e^δ − δ − 1` (unbiased and non-negative; GRPO's).
    K3,
}

impl KlEstimator {
    /// As `rl.kl_estimator` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KlEstimator::K1 => "k1",
            KlEstimator::K2 => "k2",
            KlEstimator::K3 => "k3",
        }
    }

    /// The estimate of one token from `δ = logπ_ref − logπ`.
    pub fn of(self, diff: f64) -> f64 {
        match self {
            KlEstimator::K1 => -diff,
            KlEstimator::K2 => 0.5 * diff * diff,
            KlEstimator::K3 => diff.exp() - diff - 1.0,
        }
    }
}

/// GRPO rollouts and loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RlSpec {
    /// Completions per prompt (G).
    pub group_size: usize,
    pub prompts_per_step: usize,
    pub clip_low: f64,
    pub clip_high: f64,
    /// β of the KL penalty against the initial policy; 0 disables it.
    pub kl_coef: f64,
    /// How the KL penalty is estimated per token.
    #[serde(default = "default_kl_estimator")]
    pub kl_estimator: KlEstimator,
    /// The KL penalty is subtracted from each completion's reward (summed
    /// over its tokens, before the advantages) instead of added to the
    /// loss.
    #[serde(default)]
    pub kl_in_reward: bool,
    pub advantage: Advantage,
    pub loss_agg: LossAgg,
    #[serde(default = "default_ratio_level")]
    pub ratio_level: RatioLevel,
    #[serde(default = "default_policy_loss")]
    pub loss: PolicyLoss,
    /// c of the entropy bonus: the RL loss less `c ×` the policy's
    /// entropy on response tokens, aggregated as the loss is (`loss_agg`);
    /// 0 disables it.
    #[serde(default)]
    pub entropy_coef: f64,
    /// Policy updates per rollout batch (PPO's epochs): each of the K
    /// lower steps of a meta-step becomes `updates_per_batch ×
    /// mini_batches` optimiser updates on its batch, π_old fixed at
    /// sampling time.
    #[serde(default = "one_update")]
    pub updates_per_batch: usize,
    /// Mini-batches per epoch: the RL and SFT batches are cut into this
    /// many equal row slices, one update each.
    #[serde(default = "one_update")]
    pub mini_batches: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Sampling keeps the `top_k` most probable tokens (before `top_p`); 0
    /// keeps all.
    #[serde(default)]
    pub top_k: usize,
    /// Methods without an upper level: a meta-step whose objective has no
    /// signal (λ = 1, no KL term, every rollout's advantage 0) changes no
    /// parameter and no optimiser state, instead of letting momentum move
    /// θ on a zero gradient.
    #[serde(default = "yes")]
    pub skip_no_signal: bool,
    /// Completions that hit `max_new_tokens` (did not stop) get no loss
    /// (DAPO's overlong filtering); their rewards still count in their
    /// group's advantages.
    #[serde(default)]
    pub mask_truncated: bool,
    /// DAPO's dynamic sampling: groups whose rewards are all equal are
    /// dropped and more prompts sampled, up to `max_sampling_rounds`
    /// batches, until `prompts_per_step` groups with signal are found.
    #[serde(default)]
    pub dynamic_sampling: bool,
    #[serde(default = "default_max_sampling_rounds")]
    pub max_sampling_rounds: usize,
}

fn default_kl_estimator() -> KlEstimator {
    KlEstimator::K3
}

fn default_ratio_level() -> RatioLevel {
    RatioLevel::Token
}

fn default_policy_loss() -> PolicyLoss {
    PolicyLoss::PpoClip
}

fn default_max_sampling_rounds() -> usize {
    4
}

fn yes() -> bool {
    true
}

fn one_update() -> usize {
    1
}

impl RlSpec {
    /// Rollouts per step (Br).
    pub fn batch_size(&self) -> usize {
        self.group_size * self.prompts_per_step
    }

    /// Optimiser updates per rollout batch: `updates_per_batch ×
    /// mini_batches`.
    pub fn updates(&self) -> usize {
        self.updates_per_batch.max(1) * self.mini_batches.max(1)
    }

    /// β of the KL term in the loss: `kl_coef`, or 0 when the penalty is
    /// in the reward instead.
    pub fn loss_kl_coef(&self) -> f64 {
        if self.kl_in_reward {
            0.0
        } else {
            self.kl_coef
        }
    }
}

/// Supervised fine-tuning data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftSpec {
    /// Demonstrations per lower step (Bs).
    pub batch_size: usize,
    /// `cold_start`: meta-steps of SFT before switching to RL.
    pub cold_start_steps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
pub enum Method {
    Bridge,
    RlZero,
    Sft,
    ColdStart,
    Mix,
    Alternating,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Bridge,
        Method::RlZero,
        Method::Sft,
        Method::ColdStart,
        Method::Mix,
        Method::Alternating,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Bridge => "bridge",
            Method::RlZero => "rl_zero",
            Method::Sft => "sft",
            Method::ColdStart => "cold_start",
            Method::Mix => "mix",
            Method::Alternating => "alternating",
        }
    }

    /// Whether the adapter w is trained by the upper level (only BRIDGE).
    pub fn updates_adapter(self) -> bool {
        self == Method::Bridge
    }
}

/// λ: constant, or linear from `start` (meta-step 0) to `end` (last step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Lambda {
    Constant(f64),
    Linear { start: f64, end: f64 },
}

impl Lambda {
    /// λ at meta-step `step` of `steps`.
    pub fn at(self, step: usize, steps: usize) -> f64 {
        match self {
            Lambda::Constant(v) => v,
            Lambda::Linear { start, end } => {
                if steps <= 1 {
                    start
                } else {
                    start + (end - start) * step as f64 / (steps - 1) as f64
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowMode {
    /// θ̂ kept across meta-steps.
    Persistent,
    /// θ̂ restarts from the pre-step θ every meta-step.
    OneStep,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum HypergradKind {
    /// ∂L_up/∂w with θ, θ̂ held fixed.
    FirstOrder,
    /// Exact reverse mode through the last `backprop` lower steps.
    Truncated,
    /// Second-order products by central differences, step eps / ‖v‖.
    FiniteDifference { eps: f64 },
}

impl HypergradKind {
    /// One of each kind, as `bilevel.hypergradient.kind` names them
    /// (finite differences with the default step, 1e-2).
    pub const KINDS: [HypergradKind; 3] = [
        HypergradKind::FirstOrder,
        HypergradKind::Truncated,
        HypergradKind::FiniteDifference { eps: 1e-2 },
    ];

    pub fn name(self) -> &'static str {
        match self {
            HypergradKind::FirstOrder => "first_order",
            HypergradKind::Truncated => "truncated",
            HypergradKind::FiniteDifference { .. } => "finite_difference",
        }
    }
}

/// How the upper level's gradient is formed, over `unroll` lower steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HypergradSpec {
    pub kind: HypergradKind,
    /// K: lower steps per meta-step.
    pub unroll: usize,
    /// T ≤ K: steps differentiated through (0 for first_order).
    pub backprop: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BilevelSpec {
    pub method: Method,
    pub lambda: Lambda,
    pub shadow: ShadowMode,
    pub hypergradient: HypergradSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OptimKind {
    Sgd,
    /// PyTorch SGD with momentum (no dampening, no Nesterov).
    Momentum {
        momentum: f64,
    },
    /// AdamW (decoupled weight decay, bias-corrected).
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimSpec {
    pub kind: OptimKind,
    pub lr: f64,
    /// The learning rate's multiplier over meta-steps.
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub schedule: LrSchedule,
    /// Clip the gradient to this global 2-norm before each step (PyTorch's
    /// `clip_grad_norm_`: scaled by `min(1, max / (norm + 1e-6))`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
}

impl OptimSpec {
    /// A constant learning rate without clipping.
    pub fn new(kind: OptimKind, lr: f64) -> OptimSpec {
        OptimSpec {
            kind,
            lr,
            schedule: LrSchedule::default(),
            max_grad_norm: None,
        }
    }
}

/// How the learning rate changes over the meta-steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// The full rate after the warm-up.
    #[default]
    Constant,
    /// Linear decay from the end of the warm-up to 0 at `train.steps`.
    Linear,
    /// Half a cosine from the end of the warm-up to 0 at `train.steps`.
    Cosine,
}

impl ScheduleKind {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

/// A learning-rate schedule with the semantics of Hugging Face's
/// `get_{constant,linear,cosine}_schedule_with_warmup`: the multiplier of
/// meta-step `s` (from 0) is `s / warmup` during the warm-up, then 1, or
/// `(total − s) / (total − warmup)`, or `½ (1 + cos(π (s − warmup) / (total −
/// warmup)))`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
}

impl LrSchedule {
    /// The multiplier is 1 at every step.
    pub fn is_constant(&self) -> bool {
        self.kind == ScheduleKind::Constant && self.warmup_steps == 0
    }

    /// The learning rate's multiplier at meta-step `step` of `total`.
    pub fn scale(&self, step: usize, total: usize) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, total as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (n - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimSpecs {
    pub lower: OptimSpec,
    pub upper: OptimSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Meta-steps.
    pub steps: usize,
    pub seed: u64,
    /// Held-out evaluation every this many meta-steps (0: only at the end).
    pub eval_every: usize,
    /// Tokens per training sequence (T ≤ model.max_seq).
    pub seq_len: usize,
    /// What a meta-step whose loss, gradient norm or new state is not
    /// finite does.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip_step"`: the run stops when this many
    /// meta-steps in a row were skipped.
    #[serde(default = "default_max_nonfinite_in_row")]
    pub max_nonfinite_in_row: usize,
    /// Samples per held-out problem at each evaluation, beside greedy
    /// decoding (pass@k, maj@k); 0 samples none.
    #[serde(default)]
    pub eval_samples: usize,
    /// The temperature of those samples.
    #[serde(default = "one")]
    pub eval_temperature: f64,
    /// Each process's share of a batch runs as this many micro-batches in
    /// turn, their gradients summed (gradient accumulation): memory for
    /// steps. 1 runs the share at once.
    #[serde(default = "one_micro_batch")]
    pub micro_batches: usize,
}

fn one_micro_batch() -> usize {
    1
}

fn one() -> f64 {
    1.0
}

fn default_max_nonfinite_in_row() -> usize {
    3
}

/// `train.on_nonfinite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run; the last checkpoint is kept.
    #[default]
    Stop,
    /// Discard the meta-step's update (parameters and optimiser state stay
    /// as they were), record it in the metrics, and go on.
    SkipStep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
pub enum BackendKind {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
}

impl BackendKind {
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Auto,
        BackendKind::Cpu,
        BackendKind::Cuda,
        BackendKind::Wgpu,
    ];

    /// As `backend.kind` and `--backend` spell it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F64,
    /// Mixed precision: the policy's weights and activations in bf16 inside
    /// the programs; θ, w, the optimiser state and every program input and
    /// output in f32 (master copies); products, reductions, norms' statistics,
    /// softmax and the losses accumulate in f32.
    Bf16,
}

impl Precision {
    /// The float type of every program's parameters, optimiser state,
    /// inputs and outputs (the master copies): f32 for bf16.
    pub fn dtype(self) -> crate::DType {
        match self {
            Precision::F32 | Precision::Bf16 => crate::DType::F32,
            Precision::F64 => crate::DType::F64,
        }
    }

    /// The float type the policy computes its activations in: bf16 for
    /// bf16, else [`Precision::dtype`].
    pub fn compute(self) -> crate::DType {
        match self {
            Precision::Bf16 => crate::DType::Bf16,
            other => other.dtype(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
            Precision::Bf16 => "bf16",
        }
    }
}

/// How the GPU backends multiply f32 matrices (`backend.matmul`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatmulPrecision {
    /// f32 products on the arithmetic units (the CPU executor's results to
    /// rounding).
    #[default]
    F32,
    /// On tensor cores where the device has them: operands rounded to
    /// TF32's 10-bit mantissa, f32 accumulation (PyTorch's `allow_tf32`).
    Tf32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub kind: BackendKind,
    pub dtype: Precision,
    /// How the GPU backends multiply matrices; the CPU executor always
    /// computes in `dtype`.
    #[serde(default)]
    pub matmul: MatmulPrecision,
    /// Memory the compiled programs may plan for, in bytes
    /// (`memory_budget_gib`): a truncated hypergradient keeps the forward
    /// activations for its adjoint sweep (no recomputation) when that fits;
    /// `None` picks the plan with the smaller estimated peak.
    #[serde(default)]
    pub memory_budget: Option<u64>,
}
