//! Typed program interfaces: every input and output of a compiled program
//! with its type and its *role* — θ, w, shadow, optimiser state, the step
//! batches, metrics, next state — so that the trainer, the sampler and
//! `coopc grad` find what to feed and what to read by role instead of by
//! spelling names. The names themselves are defined here once
//! ([`BatchField`], [`Metric`], [`LAMBDA`], the decode step's ports) and the
//! lowering declares its inputs and outputs with them.

use crate::TensorType;
use serde::{Deserialize, Serialize};

/// The meta-step's λ input (the SFT/RL mix weight of this meta-step).
pub const LAMBDA: &str = "lambda";

/// The meta-step's learning-rate multipliers of the lower (θ, and the
/// shadow) and upper (w) optimisers at this meta-step: inputs only where that
/// level's `schedule` is not constant.
pub const LR_SCALE_LOWER: &str = "lr_scale.lower";
pub const LR_SCALE_UPPER: &str = "lr_scale.upper";

/// The log-prob scorer's token input, i32 `[batch, seq_len]`.
pub const TOKEN_IDS: &str = "input_ids";
/// The log-prob scorer's output, `[batch, seq_len]`.
pub const LOGPROBS: &str = "logprobs";
/// The log-prob scorer's second output, `[batch, seq_len]`: entry t is the
/// entropy of the next-token distribution the log-prob of entry t is
/// taken from (0 at t = 0).
pub const ENTROPY: &str = "entropy";

/// The decode step's token input: the token at position `pos` of each row,
/// i32 `[batch]`.
pub const DECODE_IDS: &str = "ids";
/// The decode step's position input: the shared position, i32 `[1]`.
pub const DECODE_POS: &str = "pos";
/// The decode step's output: next-token logits, `[batch, vocab]`.
pub const DECODE_LOGITS: &str = "logits";

/// Name of the decode step's cache input of layer `layer`: `cache.{layer}.k`
/// or `.v`.
pub fn cache_input(layer: usize, which: char) -> String {
    format!("cache.{layer}.{which}")
}

/// Name of the next value of a state input: `next.{name}`.
pub fn next_name(name: &str) -> String {
    format!("next.{name}")
}

/// One tensor of a step batch of the meta-step (one of K per meta-step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BatchField {
    /// SFT demonstrations, i32 `[sft batch, seq_len]`.
    SftInputIds,
    /// 1 on the response tokens the SFT loss scores.
    SftLossMask,
    /// Rollouts (prompt and completion), i32 `[rl batch, seq_len]`.
    RlInputIds,
    /// 1 on the completion tokens the RL loss scores.
    RlLossMask,
    /// Per-rollout advantages, `[rl batch]`.
    RlAdvantages,
    /// π_old's log-probs of the rollouts.
    RlOldLogprobs,
    /// π_ref's log-probs of the rollouts (only with `rl.kl_coef > 0`).
    RlRefLogprobs,
}

impl BatchField {
    pub const ALL: [BatchField; 7] = [
        BatchField::SftInputIds,
        BatchField::SftLossMask,
        BatchField::RlInputIds,
        BatchField::RlLossMask,
        BatchField::RlAdvantages,
        BatchField::RlOldLogprobs,
        BatchField::RlRefLogprobs,
    ];

    /// The key in a batch file (`coopc grad --batch`, `coopc init`).
    pub fn key(self) -> &'static str {
        match self {
            BatchField::SftInputIds => "sft.input_ids",
            BatchField::SftLossMask => "sft.loss_mask",
            BatchField::RlInputIds => "rl.input_ids",
            BatchField::RlLossMask => "rl.loss_mask",
            BatchField::RlAdvantages => "rl.advantages",
            BatchField::RlOldLogprobs => "rl.old_logprobs",
            BatchField::RlRefLogprobs => "rl.ref_logprobs",
        }
    }

    /// The meta-step input of step `k`: `step{k}.{key}`.
    pub fn input_name(self, k: usize) -> String {
        format!("step{k}.{}", self.key())
    }

    /// Whether the tensor holds token ids (i32) rather than floats.
    pub fn is_token_ids(self) -> bool {
        matches!(self, BatchField::SftInputIds | BatchField::RlInputIds)
    }
}

/// A scalar output of the meta-step that the trainer reads every step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// The SFT loss at the first lower step.
    SftLoss,
    /// The RL loss at the first lower step.
    RlLoss,
    /// The upper-level loss (methods with an upper level).
    UpperLoss,
    /// The cooperation gain (BRIDGE).
    Gain,
    /// The 2-norm of the first lower step's gradient, before clipping
    /// (where the lower optimiser clips).
    LowerGradNorm,
    /// The 2-norm of the hypergradient, before clipping (where the upper
    /// optimiser clips).
    UpperGradNorm,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::SftLoss,
        Metric::RlLoss,
        Metric::UpperLoss,
        Metric::Gain,
        Metric::LowerGradNorm,
        Metric::UpperGradNorm,
    ];

    /// The output's name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::SftLoss => "loss.sft",
            Metric::RlLoss => "loss.rl",
            Metric::UpperLoss => "loss.up",
            Metric::Gain => "gain",
            Metric::LowerGradNorm => "grad_norm.lower",
            Metric::UpperGradNorm => "grad_norm.upper",
        }
    }
}

/// What an input or output of a program is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// θ: what the lower level trains — a base-model tensor (Hugging Face
    /// name), or, when the lower level trains a LoRA of θ, one of its
    /// factors (`lower_lora.*`).
    Theta,
    /// A base-model tensor the lower level does not update (θ under a
    /// lower-level LoRA): read by every program, never changed.
    Frozen,
    /// w: a LoRA factor (PEFT name), trained at the upper level.
    Lora,
    /// θ̂: the shadow copy of the θ tensor named `of`; θ̂ = θ at the start.
    Shadow { of: String },
    /// Optimiser state (moment buffers, step counts), zero at the start.
    OptimState,
    /// λ, this meta-step's mix weight.
    Lambda,
    /// A learning-rate multiplier of this meta-step ([`LR_SCALE_LOWER`],
    /// [`LR_SCALE_UPPER`]).
    LrScale,
    /// A tensor of step batch `step`.
    Batch { step: usize, field: BatchField },
    /// Token ids to score or to decode from.
    TokenIds,
    /// The decode step's position.
    Position,
    /// A key/value cache tensor of the decode step (input, and as output
    /// with [`Role::Next`]).
    Cache,
    /// The value the state input `of` takes after this call.
    Next { of: String },
    /// A scalar the trainer reads back every call.
    Metric(Metric),
    /// ∂L_lower/∂θ at the first lower step, for the θ tensor `of`.
    LowerGradient { of: String },
    /// The hypergradient for the w tensor `of`.
    Hypergradient { of: String },
    /// Per-token log-probs.
    LogProbs,
    /// Per-token entropies of the policy's next-token distribution.
    Entropy,
    /// Next-token logits.
    Logits,
    /// The θ tensor `of` with its LoRA factors merged in.
    Merged { of: String },
    /// A port of a standalone graph (no role in training).
    Value,
}

impl Role {
    /// Whether a trainer keeps this input from one call to the next (the
    /// state a checkpoint holds).
    pub fn is_state(&self) -> bool {
        matches!(
            self,
            Role::Theta | Role::Frozen | Role::Lora | Role::Shadow { .. } | Role::OptimState
        )
    }
}

/// One input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub ty: TensorType,
    pub role: Role,
}

/// A program's interface. Inputs are listed in the order the compiler
/// declared them (θ and w in the parameter schema's order); an input the
/// program does not read may be listed (the caller may supply it) but every
/// input the graph reads is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

impl Signature {
    /// The input named `name`.
    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }

    /// The output named `name`.
    pub fn output(&self, name: &str) -> Option<&Port> {
        self.outputs.iter().find(|p| p.name == name)
    }

    /// Inputs whose role satisfies `pred`, in declaration order.
    pub fn inputs_where<'a>(
        &'a self,
        pred: impl Fn(&Role) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Port> + 'a {
        self.inputs.iter().filter(move |p| pred(&p.role))
    }

    /// Outputs whose role satisfies `pred`, in declaration order.
    pub fn outputs_where<'a>(
        &'a self,
        pred: impl Fn(&Role) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Port> + 'a {
        self.outputs.iter().filter(move |p| pred(&p.role))
    }

    /// The policy's parameters (θ, frozen θ, w), in declaration order.
    pub fn parameters(&self) -> impl Iterator<Item = &Port> {
        self.inputs_where(|r| matches!(r, Role::Theta | Role::Frozen | Role::Lora))
    }

    /// The output that plays `role`.
    pub fn output_with(&self, role: &Role) -> Option<&Port> {
        self.outputs.iter().find(|p| &p.role == role)
    }

    /// The input that plays `role`.
    pub fn input_with(&self, role: &Role) -> Option<&Port> {
        self.inputs.iter().find(|p| &p.role == role)
    }
}
